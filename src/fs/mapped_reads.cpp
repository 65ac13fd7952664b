// Mapped reads: aligned relation reads decrypt straight from a read-only MAP_SHARED
// mapping of the segment (the page cache itself) instead of a pread into a bounce
// buffer, under a SIGBUS guard for files truncated under the mapping, within a budget
// of bytes made readable per process. The long comment below has the why and the
// bounds.
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "layer_internal.hpp"

namespace cmk::fs::detail {

// ---- reads from the page cache ----------------------------------------------------------
//
// A relation page that misses shared_buffers costs a pread (system call, page-cache
// lookup, copy into the buffer) and then the decryption. Reading the ciphertext
// straight from a read-only MAP_SHARED mapping of the segment and decrypting it out of
// place into the caller's buffer costs the decryption alone once the page is mapped:
// select-only pgbench went from ~0.86 to ~0.91-0.94 of plaintext (bench/README.md).
// The mapping is the page cache itself, so writes through any descriptor are seen.
//
// A mapped page beyond the end of the file raises SIGBUS on access, and another
// process may truncate the file at any time (vacuum, while a pg_basebackup walsender
// reads it). So every access to a mapping runs under a SIGBUS guard: the handler
// (installed on the first mapping of a process, chaining to the previous disposition
// for faults that are not ours) jumps back, and the read is served by pread, which
// returns the short read PostgreSQL expects.
//
// Bounds: a mapping spans a whole 1 GiB segment's addresses from the start, so a file
// that grows after it was first read stays readable through the same mapping and is
// never remapped (addresses past the end of the file cost nothing until touched, and
// are never touched: reads stop at map_valid). Page tables grow with the pages a
// process touches (8 bytes per 4 KiB), so the budget counts bytes made readable, not
// addresses: a process reads at most map_budget() bytes in all through its mappings
// (page tables of at most 8 MiB, as for 4 GiB of shared_buffers); past that, reads use
// pread, as before. Reserving addresses this way needs a 64-bit address space without
// an RLIMIT_AS; where there is a limit, mapped reads are off (a mapping would use up
// the address space PostgreSQL allocates memory from).
//
// Off unless CMK_LAKEBASE_MAP_READS=on. Mapped reads pay off for reads only: on a
// read-write load every page the server writes back is a page of a file that every
// backend maps, and the kernel's writeback and reclaim walk all of those mappings
// (rmap) for it; and where a process reads a page once, the fault that maps it costs
// more than the copy pread makes. Measured alternated on one host (bench/README.md,
// 7 December; plaintext/encrypted server CPU per transaction): select-only 0.97 with
// mappings against 0.93 with pread, but TPC-B 0.76 against 1.15 and the full-page-write
// storm 0.77-0.78 against 0.93-1.09. A read-mostly server can turn them on.

namespace {

// CMK_LAKEBASE_MAP_BUDGET_MB overrides the budget (MiB, 1 to 1048576; default 4096).
int64_t map_budget() {
    static const int64_t b = [] {
        const char* v = std::getenv("CMK_LAKEBASE_MAP_BUDGET_MB");
        if (!v || !*v) return int64_t(4) << 30;
        char* e = nullptr;
        long long mb = std::strtoll(v, &e, 10);
        if (*e || mb < 1 || mb > (1ll << 20)) {
            log_line(std::string("CMK_LAKEBASE_MAP_BUDGET_MB=\"") + v + "\" is not a number of MiB from 1 to 1048576: using 4096");
            return int64_t(4) << 30;
        }
        return int64_t(mb) << 20;
    }();
    return b;
}
constexpr int64_t kSlowMappedReadNs = 20000;  // a warm 8 KiB read takes ~1-3 us
constexpr uint32_t kReadsAfterSlow = 64;
thread_local long tl_majflt = -1;  // this thread's major faults at its last slow mapped read
std::atomic<int64_t> g_mapped{0};

}  // namespace

FileCtx::~FileCtx() {
    spill_forget(this);
    if (const uint8_t* m = map.load()) ::munmap(const_cast<uint8_t*>(m), size_t(kMapMax));
    g_mapped.fetch_sub(map_charged);
}

bool map_reads_enabled() {
    static const bool on = [] {
        const char* v = std::getenv("CMK_LAKEBASE_MAP_READS");
        if (!v || !*v || std::strcmp(v, "off") == 0 || std::strcmp(v, "0") == 0) return false;
        if (std::strcmp(v, "on") != 0 && std::strcmp(v, "1") != 0) {
            log_line(std::string("CMK_LAKEBASE_MAP_READS=\"") + v + "\" is neither on nor off: reads use pread");
            return false;
        }
        struct rlimit rl {};
        return sizeof(void*) >= 8 && ::getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur == RLIM_INFINITY;
    }();
    return on;
}

namespace {

struct BusGuard {
    sigjmp_buf jb;
    const uint8_t* lo;
    const uint8_t* hi;
};
thread_local BusGuard* tl_bus = nullptr;  // initial-exec, as all TLS here (Makefile)
struct sigaction g_prev_bus;

void bus_handler(int sig, siginfo_t* si, void* uc) {
    BusGuard* g = tl_bus;
    auto* a = static_cast<const uint8_t*>(si->si_addr);
    if (g && a >= g->lo && a < g->hi) siglongjmp(g->jb, 1);
    // Not a read of a mapping of ours: whatever was there before.
    if (g_prev_bus.sa_flags & SA_SIGINFO) {
        if (g_prev_bus.sa_sigaction) return g_prev_bus.sa_sigaction(sig, si, uc);
    } else if (g_prev_bus.sa_handler != SIG_DFL && g_prev_bus.sa_handler != SIG_IGN) {
        return g_prev_bus.sa_handler(sig);
    }
    ::signal(SIGBUS, SIG_DFL);  // the default action, for a fault as for a kill
    ::raise(SIGBUS);
}

// True if SIGBUS is (still) handled by bus_handler in this process.
bool bus_guard_ready() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = bus_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (::sigaction(SIGBUS, &sa, &g_prev_bus) != 0) log_line("cannot handle SIGBUS: reads use pread");
    });
    struct sigaction cur {};
    return ::sigaction(SIGBUS, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
           cur.sa_sigaction == bus_handler;
}

// Decrypts len bytes (whole units) of the mapping at src into dst. False if the access
// faulted (the file was truncated under the mapping); dst is then partly written.
// No object with a destructor lives between sigsetjmp and the accesses it guards.
bool map_decrypt(FileKey& k, const uint8_t* src, uint8_t* dst, uint64_t unit0, size_t len) {
    BusGuard g;
    g.lo = src;
    g.hi = src + len;
    k.mu.lock();
    if (sigsetjmp(g.jb, 0) != 0) {
        tl_bus = nullptr;
        k.mu.unlock();
        return false;
    }
    tl_bus = &g;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    try {
        for (size_t pos = 0; pos < len; pos += U) {
            const uint8_t* p = src + pos;
            // A page read from the OS page cache is cold: ask for all of its cache lines
            // (and both 4 KiB pages' translations) at once, so their misses overlap
            // instead of stalling the cipher one after the other. Prefetches never
            // fault, also past the end of a truncated file. ~6 % of a mapped read.
            for (size_t o = 0; o < U; o += 64) __builtin_prefetch(p + o);
            if (all_zero(p, U))
                std::memset(dst + pos, 0, U);
            else
                k.cipher.decrypt(unit0 + pos / U, p, dst + pos, U);
        }
    } catch (...) {
        tl_bus = nullptr;
        k.mu.unlock();
        throw;
    }
    std::atomic_signal_fence(std::memory_order_seq_cst);
    tl_bus = nullptr;
    k.mu.unlock();
    return true;
}

// Makes [0, end) of the file readable through the mapping if it exists. False: use pread.
bool map_prepare(FileCtx* c, int fd, uint64_t end) {
    std::lock_guard<std::mutex> g(c->map_mu);
    if (!c->map_ok.load() || int64_t(end) > kMapMax) return false;
    if (c->map_capped && int64_t(end) > c->map_charged) return false;
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return false;
    int64_t valid = std::min<int64_t>(sb.st_size - sb.st_size % int64_t(U), kMapMax);
    if (int64_t(end) > valid) return false;  // past the end of the file: pread says so
    if (valid > c->map_charged) {
        int64_t more = valid - c->map_charged;
        if (g_mapped.fetch_add(more) + more > map_budget()) {
            g_mapped.fetch_sub(more);  // over the budget: what is charged stays mapped
            c->map_capped = true;
            valid = c->map_charged;
            if (int64_t(end) > valid) return false;
        } else {
            c->map_charged = valid;
        }
    }
    if (!c->map.load()) {
        void* m = bus_guard_ready() ? real().mmap(nullptr, size_t(kMapMax), PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (m == MAP_FAILED) {
            g_mapped.fetch_sub(c->map_charged);
            c->map_charged = 0;
            c->map_ok.store(false);
            return false;
        }
        (void)::madvise(m, size_t(kMapMax), MADV_RANDOM);
        (void)::madvise(m, size_t(kMapMax), MADV_DONTDUMP);
        c->map.store(static_cast<const uint8_t*>(m), std::memory_order_release);
    }
    c->map_valid.store(valid, std::memory_order_release);
    return true;
}

}  // namespace

// A read served from the mapping: len, or -1 if the caller must use pread.
ssize_t map_read(FileCtx* c, FileKey& key, int fd, uint8_t* buf, size_t len, off_t off) {
    uint64_t end = uint64_t(off) + len;
    uint32_t skip = c->map_skip.load(std::memory_order_relaxed);
    if (skip > 0) {  // backing off after a slow read (below): pread, without an fstat first
        c->map_skip.store(skip - 1, std::memory_order_relaxed);
        return -1;
    }
    if (!c->map.load(std::memory_order_acquire) ||
        int64_t(end) > c->map_valid.load(std::memory_order_acquire)) {
        if (!map_prepare(c, fd, end)) return -1;
    }
    if (st().wiped.load()) return -1;
    const uint8_t* m = c->map.load(std::memory_order_acquire);
    // A page that is not in the page cache faults in from disk one 4 KiB page at a time
    // (the mapping is MADV_RANDOM), where pread reads the whole request in one I/O; and
    // asking first (mincore) costs a system call, which is what the mapping saves. So
    // the mapping is used optimistically and timed (vDSO clock, no system call): a read
    // slower than kSlowMappedReadNs may have taken a disk fault, and if this thread's count
    // of major faults (getrusage, asked only after a slow read) grew since the last
    // slow one, the next kReadsAfterSlow reads of this descriptor go to pread. A
    // workload of cold reads then pays for one extra 4 KiB I/O in every
    // kReadsAfterSlow + 1 reads; a warm one never leaves the mapping, also when the
    // host preempts this VM in the middle of a read (slow, but no fault: on a shared
    // host that happened often enough to send a share of warm reads to pread).
    int64_t t0 = mono_ns();
    bool ok = map_decrypt(key, m + off, buf, uint64_t(off) / U, len);
    int64_t ns = mono_ns() - t0;
    if (ns > kSlowMappedReadNs) {
        struct rusage ru {};
        if (::getrusage(RUSAGE_THREAD, &ru) != 0 || ru.ru_majflt != tl_majflt) {
            tl_majflt = ru.ru_majflt;
            c->map_skip.store(kReadsAfterSlow, std::memory_order_relaxed);
        }
    }
    if (!ok) {
        // Truncated under us: forget what we knew of its size and let pread tell.
        c->map_valid.store(0, std::memory_order_release);
        return -1;
    }
    return ssize_t(len);
}

}  // namespace cmk::fs::detail
