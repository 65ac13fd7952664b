// The dynamic-linker tables of one loaded ELF object (its PT_DYNAMIC and PT_GNU_RELRO
// segments) and its relocation slots by symbol name: what the file layer (fs/got.cpp,
// the server's and other modules' file calls) and the key arena (key_arena.cpp,
// libcrypto's allocator) both walk to redirect an object's calls. x86-64 only, as the
// rest of the layer. No allocation: the key arena reads these while it installs itself.
#pragma once

#include <elf.h>
#include <link.h>

#include <cstddef>
#include <utility>

namespace cmk::elf {

struct DynamicTables {
    bool has_dynamic = false;
    const ElfW(Sym)* symtab = nullptr;
    const char* strtab = nullptr;
    const ElfW(Rela)* jmprel = nullptr;  // PLT relocations (DT_JMPREL, DT_PLTRELSZ)
    size_t jmprel_sz = 0;
    const ElfW(Rela)* rela = nullptr;  // other relocations (DT_RELA, DT_RELASZ): GLOB_DAT slots
    size_t rela_sz = 0;
    ElfW(Addr) relro_start = 0, relro_end = 0;  // the GOT part ld.so makes read-only
    bool usable() const { return has_dynamic && symtab && strtab; }
};

// Reads the tables of the object loaded at base with the given program headers.
DynamicTables read_dynamic_tables(ElfW(Addr) base, const ElfW(Phdr)* phdr, ElfW(Half) phnum);

// Calls fn(symbol name, slot address) for every JUMP_SLOT and GLOB_DAT relocation, PLT
// relocations first; stops when fn returns false. Returns false if it was stopped.
template <typename Fn>
bool for_each_slot(const DynamicTables& t, ElfW(Addr) base, Fn&& fn) {
    for (const auto& [r, sz] : {std::pair{t.jmprel, t.jmprel_sz}, std::pair{t.rela, t.rela_sz}}) {
        if (!r) continue;
        for (size_t i = 0; i < sz / sizeof(ElfW(Rela)); i++) {
            unsigned type = ELF64_R_TYPE(r[i].r_info);
            if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
            const char* name = t.strtab + t.symtab[ELF64_R_SYM(r[i].r_info)].st_name;
            if (!fn(name, reinterpret_cast<void**>(base + r[i].r_offset))) return false;
        }
    }
    return true;
}

}  // namespace cmk::elf
