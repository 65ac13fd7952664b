// Installs the layer in a running server: rewrites the postgres executable's own
// dynamic-linker slots (GOT entries of its JUMP_SLOT / GLOB_DAT relocations) for the
// file calls it makes, so that they reach the layer instead of libc. Runs in the
// postmaster from _PG_init, before any child is forked; children inherit it.
// Only the executable's slots change here: libc itself, and other libraries, keep
// theirs; the PostgreSQL modules the server loads get theirs in modules.cpp, through
// the same read_object_slots/write_slots.
#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cmk_lakebase/base/elf_dynamic.hpp"
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

struct Hook {
    const char* name;
    void* replacement;
    bool required;
};

}  // namespace

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

const std::vector<std::pair<const char*, bool>>& hooked_names() {
    // Calls the postgres executable makes that move file bytes or file identity, and
    // chdir/fchdir (relative paths are resolved against a kept working directory).
    // "required": without a slot for it the layer cannot see PostgreSQL's data I/O.
    // fopen/fileno: AllocateFile's streams over encrypted files (stdio.cpp).
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
        {"dup3", false},        {"fcntl", false},         {"mmap", false},     {"fopen", false},
        {"fopen64", false},     {"fileno", false},        {"chdir", false},    {"fchdir", false},
    };
    return names;
}

ObjectSlots read_object_slots(ElfW(Addr) base, const ElfW(Phdr)* phdr, ElfW(Half) phnum, const std::string& what) {
    ObjectSlots o;
    o.what = what;
    elf::DynamicTables t = elf::read_dynamic_tables(base, phdr, phnum);
    o.relro_start = t.relro_start;
    o.relro_end = t.relro_end;
    if (!t.has_dynamic)
        throw LayerError("cmk_lakebase: " + what + " is not dynamically linked",
                         "The encrypting file layer needs its dynamic-linker slots.",
                         "Use a dynamically linked PostgreSQL build (such as Debian's).");
    if (!t.usable())
        throw LayerError("cmk_lakebase: cannot read the dynamic symbols of " + what, "",
                         "This PostgreSQL build is not supported.");
    elf::for_each_slot(t, base, [&](const char* name, void** slot) {
        o.slots[name].push_back(slot);
        return true;
    });
    return o;
}

void write_slots(const ObjectSlots& o, const std::vector<std::pair<std::string, void*>>& hooks) {
    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    std::vector<std::pair<void**, void*>> patches;
    for (const auto& [name, mine] : hooks) {
        auto it = o.slots.find(name);
        if (it == o.slots.end()) continue;
        void* theirs = libc ? dlsym(libc, name.c_str()) : nullptr;
        for (void** slot : it->second) {
            void* cur = *slot;
            if (cur == mine) continue;  // already ours (preloaded)
            // Another version of the same C library function (a module built against
            // an older glibc binds e.g. a compat symbol version) is still the C library.
            Dl_info dc{}, dt{};
            bool in_libc = theirs && (cur == theirs || (dladdr(cur, &dc) && dladdr(theirs, &dt) &&
                                                        dc.dli_fbase == dt.dli_fbase));
            if (theirs && !in_libc) {
                // Someone else already redirected this call: transforming data twice (or
                // not at all) would follow. Refuse.
                Dl_info di{};
                dladdr(cur, &di);
                throw LayerError("cmk_lakebase: another library already intercepts " + name + "() in " + o.what,
                                 std::string("The slot points into ") + (di.dli_fname ? di.dli_fname : "unknown code") + ".",
                                 "Remove the other file-interposing library (LD_PRELOAD) from the server's environment.");
            }
            patches.emplace_back(slot, mine);
        }
    }

    long page = sysconf(_SC_PAGESIZE);
    for (const auto& [slot, value] : patches) {
        auto addr = reinterpret_cast<ElfW(Addr)>(slot);
        void* pg = reinterpret_cast<void*>(addr & ~ElfW(Addr)(page - 1));
        bool relro = addr >= o.relro_start && addr < o.relro_end;
        if (mprotect(pg, page, PROT_READ | PROT_WRITE) != 0)
            throw LayerError("cmk_lakebase: cannot make the GOT of " + o.what + " writable", strerror(errno),
                             "A security policy may forbid mprotect() of a program's relocation data.");
        *slot = value;
        if (relro) mprotect(pg, page, PROT_READ);
    }
}

// The layer's entry points for hooked_names() present in o; throws for a required one
// the object has no slot for.
std::vector<std::pair<std::string, void*>> layer_hooks(const ObjectSlots& o, bool check_required) {
    std::vector<std::pair<std::string, void*>> hooks;
    for (auto& [name, required] : hooked_names()) {
        if (!o.slots.count(name)) {
            if (required && check_required)
                throw LayerError("cmk_lakebase: the encrypting file layer cannot hook the server's file I/O",
                                 std::string("The server executable has no dynamic-linker slot for ") + name + "().",
                                 "This PostgreSQL build is not supported by cmk_lakebase.");
            continue;
        }
        void* mine = self_sym(name);
        if (!mine)
            throw LayerError("cmk_lakebase: internal error: no layer entry point for " + std::string(name), "", "");
        hooks.emplace_back(name, mine);
    }
    return hooks;
}

void install_got() {
    // Calls through which the executable could move data the layer does not see.
    static const char* const unsupported[] = {"io_uring_setup", "io_uring_enter", "io_submit",
                                              "sendfile", "splice", "aio_write", "aio_read"};

    MainObject m;
    dl_iterate_phdr(find_main, &m);
    if (!m.found)
        throw LayerError("cmk_lakebase: cannot find the server executable's program headers", "",
                         "This platform is not supported.");
    ObjectSlots o = read_object_slots(m.base, m.phdr, m.phnum, "the server executable");

    for (const char* u : unsupported)
        if (o.slots.count(u))
            throw LayerError("cmk_lakebase: the server executable performs file I/O the layer cannot see",
                             std::string("It calls ") + u + "().",
                             "Run a PostgreSQL build without that I/O method (e.g. io_method = sync).");

    write_slots(o, layer_hooks(o, true));
}

}  // namespace cmk::fs::detail
