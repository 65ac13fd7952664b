// The key arena (key_arena.hpp): OpenSSL's keyed contexts allocated in pages that a
// core dump leaves out (MADV_DONTDUMP), locked where RLIMIT_MEMLOCK allows, and wiped
// block by block on free. Reached by redirecting libcrypto's own GOT slots for malloc,
// calloc, realloc and free: OpenSSL 3's CRYPTO_malloc/CRYPTO_zalloc/CRYPTO_realloc/
// CRYPTO_free call those libc functions through libcrypto's slots (crypto/mem.c), and
// the provider contexts that hold the AES key schedules (e.g. PROV_AES_XTS_CTX, made by
// the cipher's newctx inside the first keyed EVP_CipherInit_ex2 of a context) are
// OPENSSL_zalloc'ed there. Kept apart from src/fs/got.cpp (which rewrites the postgres
// executable's slots for file calls): this works in any process that uses libcrypto,
// server, tools under the preload and pg_cmk alike.
//
// The arena is one reserved range of address space (kReserve, PROT_NONE until used),
// so that free() from any thread tells an arena block from a heap block with two
// compares and no lock. Blocks come in size classes with a 16-byte header; freed
// blocks are wiped and kept on per-class lists (the arena never shrinks: it holds
// what the process's live keys need at their peak). Forked children inherit the
// mapping (private, copy-on-write; MADV_DONTDUMP is inherited) and the redirected
// slots; mlock is not inherited, so a fork handler locks the used pages again.
#include "cmk_lakebase/base/key_arena.hpp"
#include "cmk_lakebase/base/elf_dynamic.hpp"

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>

namespace cmk {
namespace {

using MallocFn = void* (*)(size_t);
using CallocFn = void* (*)(size_t, size_t);
using ReallocFn = void* (*)(void*, size_t);
using FreeFn = void (*)(void*);

// What libcrypto's slots held before: every non-arena call goes there unchanged
// (glibc, or a sanitizer's interceptor).
std::atomic<MallocFn> g_next_malloc{nullptr};
std::atomic<CallocFn> g_next_calloc{nullptr};
std::atomic<ReallocFn> g_next_realloc{nullptr};
std::atomic<FreeFn> g_next_free{nullptr};

// 256 MiB of address space (not memory): about 2.4 KiB per page-cipher key, so some
// 100 000 keys live at once in one process before scoped allocations fall back to
// the heap (counted in KeyArenaStats::fallbacks).
constexpr size_t kReserve = size_t(256) << 20;
constexpr size_t kCommitStep = size_t(64) << 10;
constexpr size_t kHeader = 16;
// Block sizes, header included; multiples of 32 so that payloads stay 16-aligned.
constexpr size_t kClassSize[] = {64,   96,   128,  192,  256,   384,   512,   768,  1024,
                                 1536, 2048, 3072, 4096, 8192, 16384, 32768, 65536};
constexpr int kClasses = sizeof kClassSize / sizeof kClassSize[0];
constexpr uint32_t kLive = 0x6b617231;   // "kar1"
constexpr uint32_t kFreed = 0x66726565;  // "free"

struct Header {
    uint32_t magic;
    uint32_t cls;
    uint64_t size;  // requested bytes
};
static_assert(sizeof(Header) == kHeader, "arena header is 16 bytes");

// The reserved range; set once before any slot points here, never changed.
std::atomic<uintptr_t> g_lo{0};
std::atomic<uintptr_t> g_hi{0};

// Plain pthread mutexes rather than std::mutex: the child of a fork must get fresh,
// unlocked ones (a recursive mutex locked by the parent's thread cannot be unlocked
// by the child's, whose thread id differs).
struct Lock {
    pthread_mutex_t* m;
    explicit Lock(pthread_mutex_t& mu) : m(&mu) { pthread_mutex_lock(m); }
    ~Lock() { pthread_mutex_unlock(m); }
    Lock(const Lock&) = delete;
    Lock& operator=(const Lock&) = delete;
};

// Arena state, under g_arena_mu (taken by whichever thread allocates or frees).
pthread_mutex_t g_arena_mu = PTHREAD_MUTEX_INITIALIZER;
uintptr_t g_bump = 0;           // next unused byte
uintptr_t g_committed_end = 0;  // end of the read-write pages
void* g_free_list[kClasses] = {};
size_t g_in_use = 0;
size_t g_blocks = 0;
size_t g_fallbacks = 0;
bool g_lock_failed = false;

// Scopes: one thread at a time, nested on it. g_owner/g_depth are read without the
// lock by the allocation hooks; only the holder of g_scope_mu writes them.
pthread_mutex_t g_scope_mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
std::atomic<unsigned long> g_owner{0};
std::atomic<int> g_depth{0};

std::once_flag g_install_once;
std::atomic<bool> g_active{false};
const char* g_reason = "no key arena scope has been entered yet";

unsigned long self_id() { return static_cast<unsigned long>(pthread_self()); }

bool scoped_here() {
    return g_depth.load(std::memory_order_relaxed) > 0 &&
           g_owner.load(std::memory_order_relaxed) == self_id();
}

bool in_arena(const void* p) {
    auto a = reinterpret_cast<uintptr_t>(p);
    return a >= g_lo.load(std::memory_order_relaxed) && a < g_hi.load(std::memory_order_relaxed);
}

int class_for(size_t n) {
    for (int c = 0; c < kClasses; c++)
        if (n <= kClassSize[c] - kHeader) return c;
    return -1;
}

// Makes [g_committed_end, end) usable; false when the reservation is spent.
bool commit_to(uintptr_t end) {
    uintptr_t hi = g_hi.load(std::memory_order_relaxed);
    uintptr_t want = (end + kCommitStep - 1) / kCommitStep * kCommitStep;
    if (want > hi) want = hi;
    if (want < end) return false;
    void* at = reinterpret_cast<void*>(g_committed_end);
    size_t len = want - g_committed_end;
    if (mprotect(at, len, PROT_READ | PROT_WRITE) != 0) return false;
    if (mlock(at, len) != 0) g_lock_failed = true;
    g_committed_end = want;
    return true;
}

// A zero-filled block of at least n bytes, or nullptr (too large, reservation spent).
void* arena_alloc(size_t n) {
    int cls = class_for(n == 0 ? 1 : n);
    Lock lk(g_arena_mu);
    if (cls < 0) {
        g_fallbacks++;
        return nullptr;
    }
    uint8_t* block;
    if (g_free_list[cls]) {
        uint8_t* payload = static_cast<uint8_t*>(g_free_list[cls]);
        std::memcpy(&g_free_list[cls], payload, sizeof(void*));
        std::memset(payload, 0, sizeof(void*));  // the rest was wiped at free
        block = payload - kHeader;
    } else {
        size_t sz = kClassSize[cls];
        if (g_bump + sz > g_committed_end && !commit_to(g_bump + sz)) {
            g_fallbacks++;
            return nullptr;
        }
        block = reinterpret_cast<uint8_t*>(g_bump);
        g_bump += sz;
    }
    Header h{kLive, static_cast<uint32_t>(cls), n};
    std::memcpy(block, &h, sizeof h);
    g_in_use += kClassSize[cls];
    g_blocks++;
    return block + kHeader;
}

Header* header_of(void* p) {
    auto* h = reinterpret_cast<Header*>(static_cast<uint8_t*>(p) - kHeader);
    // A pointer into the arena that is not a live block is a double free or a wild
    // pointer: stop as glibc does rather than corrupt the free lists.
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0 || h->magic != kLive || h->cls >= unsigned(kClasses))
        abort();
    return h;
}

void arena_free(void* p) {
    Lock lk(g_arena_mu);
    Header* h = header_of(p);
    size_t cls = h->cls;
    explicit_bzero(p, kClassSize[cls] - kHeader);
    h->magic = kFreed;
    h->size = 0;
    std::memcpy(p, &g_free_list[cls], sizeof(void*));
    g_free_list[cls] = p;
    g_in_use -= kClassSize[cls];
    g_blocks--;
}

// ---------------------------------------------------------------- the hooks

void* hook_malloc(size_t n) {
    if (scoped_here()) {
        if (void* p = arena_alloc(n)) return p;
    }
    return g_next_malloc.load(std::memory_order_relaxed)(n);
}

void* hook_calloc(size_t count, size_t size) {
    if (scoped_here() && (size == 0 || count <= SIZE_MAX / size)) {
        if (void* p = arena_alloc(count * size)) return p;  // arena blocks are zero-filled
    }
    return g_next_calloc.load(std::memory_order_relaxed)(count, size);
}

void hook_free(void* p) {
    if (p && in_arena(p)) {
        arena_free(p);
        return;
    }
    g_next_free.load(std::memory_order_relaxed)(p);
}

void* hook_realloc(void* p, size_t n) {
    if (p && in_arena(p)) {
        // An arena block stays in the arena, whoever grows it.
        if (n == 0) {
            arena_free(p);
            return nullptr;
        }
        size_t old;
        {
            Lock lk(g_arena_mu);
            Header* h = header_of(p);
            old = h->size;
            if (n <= kClassSize[h->cls] - kHeader) {
                if (n < old) explicit_bzero(static_cast<uint8_t*>(p) + n, old - n);
                h->size = n;
                return p;
            }
        }
        void* q = arena_alloc(n);
        if (!q) q = g_next_malloc.load(std::memory_order_relaxed)(n);
        if (!q) return nullptr;  // p stays valid, as realloc promises
        std::memcpy(q, p, old);
        arena_free(p);
        return q;
    }
    if (!p && scoped_here()) return hook_malloc(n);
    return g_next_realloc.load(std::memory_order_relaxed)(p, n);
}

// ---------------------------------------------------------------- fork

// No scope is half-way and no block half-allocated when the process forks.
void before_fork() {
    pthread_mutex_lock(&g_scope_mu);
    pthread_mutex_lock(&g_arena_mu);
}

void after_fork_parent() {
    pthread_mutex_unlock(&g_arena_mu);
    pthread_mutex_unlock(&g_scope_mu);
}

void after_fork_child() {
    // Memory locks are not inherited: lock the used pages again (best effort).
    if (g_committed_end > g_lo.load(std::memory_order_relaxed)) {
        uintptr_t lo = g_lo.load(std::memory_order_relaxed);
        if (mlock(reinterpret_cast<void*>(lo), g_committed_end - lo) != 0) g_lock_failed = true;
    }
    g_arena_mu = PTHREAD_MUTEX_INITIALIZER;
    g_scope_mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
    // Forked inside a scope (the forking thread is the child's only thread): hold the
    // fresh lock as often as the scopes that will release it.
    for (int i = g_depth.load(std::memory_order_relaxed); i > 0; i--) pthread_mutex_lock(&g_scope_mu);
}

// ---------------------------------------------------------------- libcrypto's slots

struct Found {
    const dl_phdr_info* info = nullptr;
    bool done = false;
    const char* reason = "libcrypto is not loaded in this process";
    int patched = 0;
};

bool is_libcrypto(const char* name) {
    if (!name || !*name) return false;
    const char* base = std::strrchr(name, '/');
    base = base ? base + 1 : name;
    return std::strncmp(base, "libcrypto.so", 12) == 0;
}

// Redirects one libcrypto object's malloc/calloc/realloc/free slots. Returns a reason
// when it cannot (nothing written then), nullptr on success.
const char* patch_object(const dl_phdr_info* info) {
    const elf::DynamicTables t = elf::read_dynamic_tables(info->dlpi_addr, info->dlpi_phdr, info->dlpi_phnum);
    if (!t.has_dynamic) return "libcrypto has no dynamic section";
    if (!t.usable()) return "libcrypto has no dynamic symbol table";
    const ElfW(Addr) relro_lo = t.relro_start, relro_hi = t.relro_end;

    enum { kMalloc, kCalloc, kRealloc, kFree, kNames };
    static const char* const names[kNames] = {"malloc", "calloc", "realloc", "free"};
    void* const hooks[kNames] = {reinterpret_cast<void*>(&hook_malloc), reinterpret_cast<void*>(&hook_calloc),
                                 reinterpret_cast<void*>(&hook_realloc), reinterpret_cast<void*>(&hook_free)};
    constexpr int kMaxSlots = 8;
    void** slots[kNames][kMaxSlots] = {};
    int nslots[kNames] = {};
    void* prev[kNames] = {};
    const char* why = nullptr;
    elf::for_each_slot(t, info->dlpi_addr, [&](const char* name, void** slot) {
        for (int k = 0; k < kNames; k++) {
            if (std::strcmp(name, names[k]) != 0) continue;
            if (*slot == hooks[k]) why = "already redirected";
            else if (prev[k] && *slot != prev[k]) why = "libcrypto's allocator slots disagree";
            else if (nslots[k] == kMaxSlots) why = "libcrypto has too many allocator slots";
            if (why) return false;
            prev[k] = *slot;
            slots[k][nslots[k]++] = slot;
        }
        return true;
    });
    if (why) return why;
    // Without its malloc and free slots (a static or customised build) nothing can be
    // redirected; calloc and realloc may be absent.
    if (!nslots[kMalloc] || !nslots[kFree]) return "libcrypto does not call malloc and free through its GOT";
    // A slot not bound yet (lazy binding) holds an address inside libcrypto's own PLT,
    // which would only call the dynamic linker's resolver: chain to the function itself,
    // looked up by name.
    for (int k = 0; k < kNames; k++) {
        if (!nslots[k]) continue;
        Dl_info di{};
        if (dladdr(prev[k], &di) && di.dli_fbase == reinterpret_cast<void*>(info->dlpi_addr))
            prev[k] = dlsym(RTLD_DEFAULT, names[k]);
        if (!prev[k]) return "cannot resolve libcrypto's allocator";
    }
    g_next_malloc.store(reinterpret_cast<MallocFn>(prev[kMalloc]));
    g_next_free.store(reinterpret_cast<FreeFn>(prev[kFree]));
    g_next_calloc.store(reinterpret_cast<CallocFn>(prev[kCalloc] ? prev[kCalloc] : dlsym(RTLD_DEFAULT, "calloc")));
    g_next_realloc.store(reinterpret_cast<ReallocFn>(prev[kRealloc] ? prev[kRealloc] : dlsym(RTLD_DEFAULT, "realloc")));

    // free (and realloc) first: once malloc may hand out arena blocks, every way back
    // must already know them.
    long page = sysconf(_SC_PAGESIZE);
    static const int order[kNames] = {kFree, kRealloc, kCalloc, kMalloc};
    for (int k : order) {
        for (int s = 0; s < nslots[k]; s++) {
            auto addr = reinterpret_cast<ElfW(Addr)>(slots[k][s]);
            void* pg = reinterpret_cast<void*>(addr & ~ElfW(Addr)(page - 1));
            bool relro = addr >= relro_lo && addr < relro_hi;
            if (mprotect(pg, page, PROT_READ | PROT_WRITE) != 0) {
                // Nothing of malloc's is written before free's: an early failure leaves
                // a harmless partial state (free recognising an arena nobody uses).
                return "cannot make libcrypto's GOT writable";
            }
            __atomic_store_n(slots[k][s], hooks[k], __ATOMIC_RELEASE);
            if (relro) mprotect(pg, page, PROT_READ);
        }
    }
    return nullptr;
}

int find_libcrypto(struct dl_phdr_info* info, size_t, void* data) {
    auto* f = static_cast<Found*>(data);
    if (!is_libcrypto(info->dlpi_name)) return 0;
    const char* why = patch_object(info);
    if (why) {
        f->reason = why;
        return 1;
    }
    f->patched++;
    f->reason = nullptr;
    return 1;  // one libcrypto per process
}

void install() {
    void* p = mmap(nullptr, kReserve, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        g_reason = "cannot reserve address space for the key arena";
        return;
    }
    if (madvise(p, kReserve, MADV_DONTDUMP) != 0) {
        munmap(p, kReserve);
        g_reason = "MADV_DONTDUMP is not supported";
        return;
    }
    auto lo = reinterpret_cast<uintptr_t>(p);
    g_bump = lo;
    g_committed_end = lo;
    g_lo.store(lo);
    g_hi.store(lo + kReserve);
    if (pthread_atfork(before_fork, after_fork_parent, after_fork_child) != 0) {
        g_reason = "cannot register the key arena's fork handlers";
        return;
    }
    Found f;
    dl_iterate_phdr(find_libcrypto, &f);
    if (f.reason) {
        g_reason = f.reason;
        return;
    }
    g_reason = "";
    g_active.store(true);
}

void ensure_installed() { std::call_once(g_install_once, install); }

}  // namespace

KeyArenaScope::KeyArenaScope() {
    ensure_installed();
    pthread_mutex_lock(&g_scope_mu);
    if (g_depth.load(std::memory_order_relaxed) == 0) g_owner.store(self_id(), std::memory_order_relaxed);
    g_depth.fetch_add(1, std::memory_order_relaxed);
}

KeyArenaScope::~KeyArenaScope() {
    if (g_depth.fetch_sub(1, std::memory_order_relaxed) == 1) g_owner.store(0, std::memory_order_relaxed);
    pthread_mutex_unlock(&g_scope_mu);
}

KeyArenaStats key_arena_stats() {
    ensure_installed();
    KeyArenaStats s;
    s.active = g_active.load();
    s.reason = g_reason;
    Lock lk(g_arena_mu);
    s.committed = g_committed_end - g_lo.load(std::memory_order_relaxed);
    s.in_use = g_in_use;
    s.blocks = g_blocks;
    s.fallbacks = g_fallbacks;
    s.lock_failed = g_lock_failed;
    return s;
}

bool key_arena_contains(const void* p) { return p && in_arena(p); }

}  // namespace cmk
