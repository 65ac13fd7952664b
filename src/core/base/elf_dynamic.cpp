// Reading an object's dynamic-linker tables (base/elf_dynamic.hpp).
#include "cmk_lakebase/base/elf_dynamic.hpp"

namespace cmk::elf {
namespace {

// Dynamic-section pointers are relocated in place by ld.so on x86-64; be robust to
// both forms.
template <typename T>
T* dyn_ptr(ElfW(Addr) base, ElfW(Addr) v) {
    return reinterpret_cast<T*>(v < base ? v + base : v);
}

}  // namespace

DynamicTables read_dynamic_tables(ElfW(Addr) base, const ElfW(Phdr)* phdr, ElfW(Half) phnum) {
    DynamicTables t;
    const ElfW(Dyn)* dyn = nullptr;
    for (int i = 0; i < phnum; i++) {
        if (phdr[i].p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(base + phdr[i].p_vaddr);
        if (phdr[i].p_type == PT_GNU_RELRO) {
            t.relro_start = base + phdr[i].p_vaddr;
            t.relro_end = t.relro_start + phdr[i].p_memsz;
        }
    }
    if (!dyn) return t;
    t.has_dynamic = true;
    for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
            case DT_SYMTAB: t.symtab = dyn_ptr<const ElfW(Sym)>(base, d->d_un.d_ptr); break;
            case DT_STRTAB: t.strtab = dyn_ptr<const char>(base, d->d_un.d_ptr); break;
            case DT_JMPREL: t.jmprel = dyn_ptr<const ElfW(Rela)>(base, d->d_un.d_ptr); break;
            case DT_PLTRELSZ: t.jmprel_sz = d->d_un.d_val; break;
            case DT_RELA: t.rela = dyn_ptr<const ElfW(Rela)>(base, d->d_un.d_ptr); break;
            case DT_RELASZ: t.rela_sz = d->d_un.d_val; break;
            default: break;
        }
    }
    return t;
}

}  // namespace cmk::elf
