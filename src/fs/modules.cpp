// The PostgreSQL modules a server loads (pg_stat_statements, pg_prewarm, …) make their
// own file calls through their own dynamic-linker slots, not the postgres executable's:
// pg_stat_statements reads and pwrites its query-text file itself. So the layer points
// each module's slots for the file calls at itself too (got.cpp's read_object_slots and
// write_slots), as it does the executable's:
//   - at start (cover_modules, from _PG_init): every object already loaded from the
//     server's pkglibdir (libraries listed before cmk_lakebase in
//     shared_preload_libraries), except the layer and its module;
//   - from then on, every object PostgreSQL loads: the executable's dlopen slot is
//     pointed at hooked_dlopen, which patches the object it loaded before PostgreSQL
//     looks up its _PG_init. That covers libraries listed after cmk_lakebase, LOAD,
//     session_preload_libraries and the libraries of functions loaded on first call,
//     in whichever process loads them (children inherit the hook by fork).
// A module the caller names as refused (one that would move decrypted data out of the
// data directory) is not loaded at all: FATAL at start, a failed load later.
// Only the object PostgreSQL asked for is patched, not the libraries it depends on
// (libpython, libxml2, libcrypto): their file calls are their own business and never
// touch files of an encrypted class. A module's calls on plaintext files pass through
// the layer to the C library unchanged, as the executable's do.
#include <dlfcn.h>
#include <link.h>

#include <set>
#include <string>
#include <utility>
#include <vector>

#include "cmk_lakebase/fs/io.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace detail {
namespace {

using DlopenFn = void* (*)(const char*, int);
using DlerrorFn = char* (*)();

std::string g_pkglibdir, g_pkglibdir_real;
std::set<std::string> g_skip;                     // the layer library and its module
std::vector<RefusedModule> g_refused;
std::set<std::pair<uintptr_t, std::string>> g_done;  // objects patched (base, name)
DlopenFn g_real_dlopen = nullptr;
DlerrorFn g_real_dlerror = nullptr;
thread_local std::string tl_dlerror;  // our refusal, reported once by hooked_dlerror
thread_local bool tl_dlerror_pending = false;

std::string object_name_of(const void* addr) {
    Dl_info di{};
    if (!dladdr(addr, &di) || !di.dli_fname) return "";
    std::string r = real_path(di.dli_fname);
    return r.empty() ? di.dli_fname : r;
}

bool under(const std::string& path, const std::string& dir) {
    return !dir.empty() && path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 &&
           path[dir.size()] == '/';
}

struct Found {
    uintptr_t base;
    const char* name;
    bool ok = false;
    ElfW(Addr) addr = 0;
    const ElfW(Phdr)* phdr = nullptr;
    ElfW(Half) phnum = 0;
};

// Patches one loaded object (skipping ourselves and objects done already).
void cover_object(ElfW(Addr) addr, const char* name, const ElfW(Phdr)* phdr, ElfW(Half) phnum) {
    if (!name || !*name) return;  // the executable (install_got) or the vDSO
    std::string path = real_path(name);
    if (path.empty()) path = name;
    if (g_skip.count(path)) return;
    std::string base = path.substr(path.rfind('/') + 1);
    for (const RefusedModule& r : g_refused)
        if (base == r.name + ".so")
            throw LayerError("cmk_lakebase: the module \"" + r.name + "\" cannot be used in an encrypted cluster",
                             r.detail, r.hint);
    if (!g_done.emplace(uintptr_t(addr), path).second) return;
    ObjectSlots o = read_object_slots(addr, phdr, phnum, "module \"" + path + "\"");
    write_slots(o, layer_hooks(o, false));
}

void cover_handle(void* h) {
    struct link_map* lm = nullptr;
    if (dlinfo(h, RTLD_DI_LINKMAP, &lm) != 0 || !lm) return;
    Found f{uintptr_t(lm->l_addr), lm->l_name};
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* data) -> int {
            auto* f = static_cast<Found*>(data);
            if (info->dlpi_addr != f->base || !info->dlpi_name || !f->name ||
                std::string(info->dlpi_name) != f->name)
                return 0;
            f->ok = true;
            f->addr = info->dlpi_addr;
            f->phdr = info->dlpi_phdr;
            f->phnum = info->dlpi_phnum;
            return 1;
        },
        &f);
    if (f.ok) cover_object(f.addr, f.name, f.phdr, f.phnum);
}

// PostgreSQL's dlopen (internal_load_library): the module is patched before
// PostgreSQL calls its _PG_init. A module that cannot be patched is not loaded.
void* hooked_dlopen(const char* file, int mode) {
    void* h = g_real_dlopen(file, mode);
    if (!h || (mode & RTLD_NOLOAD)) return h;
    try {
        cover_handle(h);
    } catch (const std::exception& e) {
        std::string msg = e.what();
        if (auto* le = dynamic_cast<const Error*>(&e)) {
            if (!le->detail.empty()) msg += ". " + le->detail;
            if (!le->hint.empty()) msg += " " + le->hint;
        }
        log_line("refused to load \"" + std::string(file ? file : "") + "\": " + msg);
        dlclose(h);
        tl_dlerror = msg;
        tl_dlerror_pending = true;
        return nullptr;
    }
    return h;
}

char* hooked_dlerror() {
    if (tl_dlerror_pending) {
        tl_dlerror_pending = false;
        return tl_dlerror.data();
    }
    return g_real_dlerror();
}

// Points the executable's dlopen and dlerror slots at the hooks above.
void hook_dlopen() {
    struct Main {
        ElfW(Addr) base = 0;
        const ElfW(Phdr)* phdr = nullptr;
        ElfW(Half) phnum = 0;
    } m;
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* data) -> int {
            auto* m = static_cast<Main*>(data);
            m->base = info->dlpi_addr;
            m->phdr = info->dlpi_phdr;
            m->phnum = info->dlpi_phnum;
            return 1;  // the first object is the executable
        },
        &m);
    ObjectSlots o = read_object_slots(m.base, m.phdr, m.phnum, "the server executable");
    if (!o.slots.count("dlopen")) {
        log_line("the server executable has no dynamic-linker slot for dlopen(): libraries loaded after "
                 "start (LOAD, session_preload_libraries) are not covered by the layer");
        return;
    }
    write_slots(o, {{"dlopen", reinterpret_cast<void*>(&hooked_dlopen)},
                    {"dlerror", reinterpret_cast<void*>(&hooked_dlerror)}});
}

}  // namespace
}  // namespace detail

void cover_modules(const std::string& pkglibdir, const void* module_addr,
                   const std::vector<RefusedModule>& refused) {
    using namespace detail;
    State& s = st();
    // Preloaded (a server started under LD_PRELOAD): every object's calls reach the
    // layer already. Off: nothing to cover.
    if (s.mode.load() != Mode::Got) return;
    if (g_real_dlopen) return;  // once per postmaster (not again after a crash restart)
    g_pkglibdir = normalize_path(pkglibdir);
    g_pkglibdir_real = real_path(g_pkglibdir);
    g_skip.insert(object_name_of(reinterpret_cast<const void*>(&install_got)));
    if (module_addr) g_skip.insert(object_name_of(module_addr));
    g_skip.erase("");
    g_refused = refused;

    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    g_real_dlopen = libc ? reinterpret_cast<DlopenFn>(dlsym(libc, "dlopen")) : nullptr;
    g_real_dlerror = libc ? reinterpret_cast<DlerrorFn>(dlsym(libc, "dlerror")) : nullptr;
    if (!g_real_dlopen || !g_real_dlerror)
        throw LayerError("cmk_lakebase: cannot resolve the C library's dlopen", "",
                         "This platform is not supported.");

    // Libraries loaded before this one (listed before it in shared_preload_libraries).
    std::vector<Found> loaded;
    dl_iterate_phdr(
        [](struct dl_phdr_info* info, size_t, void* data) -> int {
            auto* v = static_cast<std::vector<Found>*>(data);
            Found f{uintptr_t(info->dlpi_addr), info->dlpi_name, true, info->dlpi_addr, info->dlpi_phdr,
                    info->dlpi_phnum};
            v->push_back(f);
            return 0;
        },
        &loaded);
    for (const Found& f : loaded) {
        if (!f.name || !*f.name) continue;
        std::string p = real_path(f.name);
        if (under(f.name, g_pkglibdir) || under(p, g_pkglibdir) || under(p, g_pkglibdir_real))
            cover_object(f.addr, f.name, f.phdr, f.phnum);
    }

    hook_dlopen();  // every library PostgreSQL loads from now on
}

}  // namespace cmk::fs
