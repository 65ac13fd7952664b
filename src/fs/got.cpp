// Installs the layer in a running server: rewrites the postgres executable's own
// dynamic-linker slots (GOT entries of its JUMP_SLOT / GLOB_DAT relocations) for the
// file calls it makes, so that they reach the layer instead of libc. Runs in the
// postmaster from _PG_init, before any child is forked; children inherit it.
// Only the executable's slots change: libc itself, and other libraries, keep theirs.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cmk_lakebase/fs/io.hpp"
#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

struct MainObject {
    ElfW(Addr) base = 0;
    const ElfW(Phdr)* phdr = nullptr;
    ElfW(Half) phnum = 0;
    bool found = false;
};

int find_main(struct dl_phdr_info* info, size_t, void* data) {
    auto* m = static_cast<MainObject*>(data);
    // The first object is the executable (empty name).
    m->base = info->dlpi_addr;
    m->phdr = info->dlpi_phdr;
    m->phnum = info->dlpi_phnum;
    m->found = true;
    return 1;
}

// Dynamic-section pointers are relocated in place by ld.so on x86-64; be robust to
// both forms.
template <typename T>
T* dyn_ptr(ElfW(Addr) base, ElfW(Addr) v) {
    return reinterpret_cast<T*>(v < base ? v + base : v);
}

struct Hook {
    const char* name;
    void* replacement;
    bool required;
};

void* self_sym(const char* name) {
    // Our own definition of the libc name (interpose.cpp), looked up in this library.
    Dl_info di;
    if (!dladdr(reinterpret_cast<void*>(&install_got), &di)) return nullptr;
    void* h = dlopen(di.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!h) return nullptr;
    void* p = dlsym(h, name);
    dlclose(h);
    return p;
}

}  // namespace

void install_got() {
    // Calls the postgres executable makes that move file bytes or file identity.
    // "required": without a slot for it the layer cannot see PostgreSQL's data I/O.
    static const std::vector<std::pair<const char*, bool>> names = {
        {"open", true},         {"open64", false},        {"openat", false},   {"openat64", false},
        {"__open_2", false},    {"__open64_2", false},    {"creat", false},    {"close", true},
        {"read", true},         {"__read_chk", false},    {"write", true},     {"pread", true},
        {"pread64", false},     {"__pread_chk", false},   {"pwrite", true},    {"pwrite64", false},
        {"readv", false},       {"writev", false},        {"preadv", false},   {"pwritev", false},
        {"preadv2", false},     {"pwritev2", false},      {"rename", true},    {"renameat", false},
        {"renameat2", false},   {"link", false},          {"linkat", false},   {"unlink", true},
        {"unlinkat", false},    {"truncate", false},      {"ftruncate", true}, {"fallocate", false},
        {"posix_fallocate", false}, {"copy_file_range", false}, {"dup", false}, {"dup2", false},
        {"dup3", false},        {"fcntl", false},         {"mmap", false},
    };
    // Calls through which the executable could move data the layer does not see.
    static const char* const unsupported[] = {"io_uring_setup", "io_uring_enter", "io_submit",
                                              "sendfile", "splice", "aio_write", "aio_read"};

    MainObject m;
    dl_iterate_phdr(find_main, &m);
    if (!m.found)
        throw LayerError("cmk_lakebase: cannot find the server executable's program headers", "",
                         "This platform is not supported.");

    const ElfW(Dyn)* dyn = nullptr;
    ElfW(Addr) relro_start = 0, relro_end = 0;
    for (int i = 0; i < m.phnum; i++) {
        if (m.phdr[i].p_type == PT_DYNAMIC) dyn = reinterpret_cast<const ElfW(Dyn)*>(m.base + m.phdr[i].p_vaddr);
        if (m.phdr[i].p_type == PT_GNU_RELRO) {
            relro_start = m.base + m.phdr[i].p_vaddr;
            relro_end = relro_start + m.phdr[i].p_memsz;
        }
    }
    if (!dyn)
        throw LayerError("cmk_lakebase: the server executable is not dynamically linked",
                         "The encrypting file layer needs the executable's dynamic-linker slots.",
                         "Use a dynamically linked PostgreSQL build (such as Debian's).");

    const ElfW(Sym)* symtab = nullptr;
    const char* strtab = nullptr;
    const ElfW(Rela)* jmprel = nullptr;
    size_t jmprel_sz = 0;
    const ElfW(Rela)* rela = nullptr;
    size_t rela_sz = 0;
    for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; d++) {
        switch (d->d_tag) {
            case DT_SYMTAB: symtab = dyn_ptr<const ElfW(Sym)>(m.base, d->d_un.d_ptr); break;
            case DT_STRTAB: strtab = dyn_ptr<const char>(m.base, d->d_un.d_ptr); break;
            case DT_JMPREL: jmprel = dyn_ptr<const ElfW(Rela)>(m.base, d->d_un.d_ptr); break;
            case DT_PLTRELSZ: jmprel_sz = d->d_un.d_val; break;
            case DT_RELA: rela = dyn_ptr<const ElfW(Rela)>(m.base, d->d_un.d_ptr); break;
            case DT_RELASZ: rela_sz = d->d_un.d_val; break;
            default: break;
        }
    }
    if (!symtab || !strtab)
        throw LayerError("cmk_lakebase: cannot read the server executable's dynamic symbols", "",
                         "This PostgreSQL build is not supported.");

    std::map<std::string, std::vector<void**>> slots;
    auto scan = [&](const ElfW(Rela)* r, size_t sz) {
        if (!r) return;
        for (size_t i = 0; i < sz / sizeof(ElfW(Rela)); i++) {
            unsigned type = ELF64_R_TYPE(r[i].r_info);
            if (type != R_X86_64_JUMP_SLOT && type != R_X86_64_GLOB_DAT) continue;
            const char* name = strtab + symtab[ELF64_R_SYM(r[i].r_info)].st_name;
            slots[name].push_back(reinterpret_cast<void**>(m.base + r[i].r_offset));
        }
    };
    scan(jmprel, jmprel_sz);
    scan(rela, rela_sz);

    for (const char* u : unsupported)
        if (slots.count(u))
            throw LayerError("cmk_lakebase: the server executable performs file I/O the layer cannot see",
                             std::string("It calls ") + u + "().",
                             "Run a PostgreSQL build without that I/O method (e.g. io_method = sync).");

    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    struct Patch {
        void** slot;
        void* value;
    };
    std::vector<Patch> patches;
    for (auto& [name, required] : names) {
        auto it = slots.find(name);
        if (it == slots.end()) {
            if (required)
                throw LayerError("cmk_lakebase: the encrypting file layer cannot hook the server's file I/O",
                                 std::string("The server executable has no dynamic-linker slot for ") + name + "().",
                                 "This PostgreSQL build is not supported by cmk_lakebase.");
            continue;
        }
        void* mine = self_sym(name);
        void* theirs = libc ? dlsym(libc, name) : nullptr;
        if (!mine)
            throw LayerError("cmk_lakebase: internal error: no layer entry point for " + std::string(name), "", "");
        for (void** slot : it->second) {
            void* cur = *slot;
            if (cur == mine) continue;  // already ours (preloaded)
            if (theirs && cur != theirs) {
                // Someone else already redirected this call: transforming data twice (or
                // not at all) would follow. Refuse.
                Dl_info di{};
                dladdr(cur, &di);
                throw LayerError("cmk_lakebase: another library already intercepts " + std::string(name) + "()",
                                 std::string("The slot points into ") + (di.dli_fname ? di.dli_fname : "unknown code") + ".",
                                 "Remove the other file-interposing library (LD_PRELOAD) from the server's environment.");
            }
            patches.push_back({slot, mine});
        }
    }

    long page = sysconf(_SC_PAGESIZE);
    for (const Patch& p : patches) {
        auto addr = reinterpret_cast<ElfW(Addr)>(p.slot);
        void* pg = reinterpret_cast<void*>(addr & ~ElfW(Addr)(page - 1));
        bool relro = addr >= relro_start && addr < relro_end;
        if (mprotect(pg, page, PROT_READ | PROT_WRITE) != 0)
            throw LayerError("cmk_lakebase: cannot make the server's GOT writable", strerror(errno),
                             "A security policy may forbid mprotect() of the executable's relocation data.");
        *p.slot = p.value;
        if (relro) mprotect(pg, page, PROT_READ);
    }
}

}  // namespace cmk::fs::detail
