// The WAL unit lock (UnitLock in layer_internal.hpp): WAL pages are rewritten while
// other processes read them, and a copy torn inside the one XTS block where appended
// bytes meet flushed bytes would damage flushed bytes. So WAL reads and writes lock the
// units they touch, except whole-unit writes while no WAL reader is registered.
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <mutex>

#include "cmk_lakebase/base/sys.hpp"
#include "layer_internal.hpp"

namespace cmk::fs::detail {

// WAL pages are rewritten while other processes (walsender, logical decoding, a
// standby's startup process) read them. XTS enciphers each 16-byte block on its own, so
// a read that sees part of a unit old and part new decrypts to the same mix of old and
// new plaintext that PostgreSQL would see unencrypted, except inside the one 16-byte
// block where appended bytes meet bytes already flushed: that block's ciphertext changes
// as a whole, and a copy torn inside it would turn up to 15 flushed bytes into garbage.
// So WAL reads and writes take an open-file-description lock over the units they touch.
//
// The lock costs a pair of fcntl calls per WAL write, about 4 us per transaction inside
// PostgreSQL's WALWriteLock in TPC-B, and most servers have no WAL reader at all while
// they write (no replication, no logical decoding). So a process registers in the
// shared region the first time it reads WAL, and a write of whole units skips the lock
// while no reader is registered. The two sides are ordered like Dekker's algorithm: the
// writer marks its write in flight, then looks for readers; the reader registers, then
// waits for every write in flight to end. Either the writer sees the reader (and locks)
// or the reader sees the write (and waits for it). Slots of processes that died are
// cleared: reader slots by writers that lock (at most once a second), writer slots by a
// reader that waits on one. Processes outside the server (tools under "pg_cmk exec")
// have a region of their own, so a tool reading a live cluster's WAL is not seen by
// the server's writers: it may, rarely, find the last flushed bytes damaged, as it may
// find the last record incomplete without encryption.

namespace {
std::atomic<pid_t> g_pid{0};  // this process's pid, reset in a forked child
}  // namespace

pid_t my_pid() {
    static const bool hooked = (::pthread_atfork(nullptr, nullptr, [] { g_pid.store(0); }) == 0);
    (void)hooked;
    pid_t p = g_pid.load(std::memory_order_relaxed);
    if (p == 0) {
        p = ::getpid();
        g_pid.store(p, std::memory_order_relaxed);
    }
    return p;
}

namespace {
std::atomic<pid_t> g_wal_reader{0};        // pid under which this process registered
std::atomic<int> g_unlocked_writes{0};     // this process's unlocked WAL writes in flight

void wal_sweep_readers(WalShared* w, bool now) {
    int64_t t = mono_ns();
    int64_t last = w->last_sweep_ns.load();
    if (!now && (t - last < 1000000000 || !w->last_sweep_ns.compare_exchange_strong(last, t))) return;
    for (auto& slot : w->reader_pid) {
        int32_t p = slot.load();
        if (p != 0 && !sys::process_exists(p) && slot.compare_exchange_strong(p, 0)) w->readers.fetch_sub(1);
    }
}

void wal_register_reader() {
    WalShared* w = st().walshared;
    pid_t me = my_pid();
    if (!w || g_wal_reader.load(std::memory_order_acquire) == me) return;
    static std::mutex mu;  // this process's threads
    std::lock_guard<std::mutex> g(mu);
    if (g_wal_reader.load() == me) return;
    int saved = errno;
    bool placed = false;
    for (int pass = 0; pass < 2 && !placed; pass++) {
        if (pass == 1) wal_sweep_readers(w, true);
        for (auto& slot : w->reader_pid) {
            int32_t z = 0;
            if (slot.compare_exchange_strong(z, me)) {
                placed = true;
                break;
            }
        }
    }
    // Without a free slot the count stays raised for good: writers lock from then on.
    w->readers.fetch_add(1);
    for (auto& slot : w->writer_pid) {
        for (uint32_t spins = 1;; spins++) {
            int32_t p = slot.load();
            if (p == 0) break;
            // Left behind by a writer that died mid-write (or by a dead process whose pid
            // this one now has): cleared; a live writer ends its write within microseconds.
            bool stale = p == me ? g_unlocked_writes.load() == 0 : (spins % 256 == 0 && !sys::process_exists(p));
            if (stale) {
                slot.compare_exchange_strong(p, 0);
                break;
            }
            if (spins < 64)
                ::sched_yield();
            else
                ::usleep(50);  // a writer stalled in the kernel (dirty-page throttling)
        }
    }
    g_wal_reader.store(me, std::memory_order_release);
    errno = saved;
}

// A slot index if this whole-unit write may go without the lock (no WAL reader), or -1.
int wal_unlocked_begin() {
    WalShared* w = st().walshared;
    if (!w || w->readers.load(std::memory_order_relaxed) != 0) return -1;
    pid_t me = my_pid();
    int i = int(uint32_t(me) % kWalSlots);
    g_unlocked_writes.fetch_add(1);
    int32_t z = 0;
    if (w->writer_pid[i].compare_exchange_strong(z, me)) {
        if (w->readers.load() == 0) return i;
        w->writer_pid[i].store(0);
    }
    g_unlocked_writes.fetch_sub(1);
    return -1;
}
void wal_unlocked_end(int i) {
    st().walshared->writer_pid[i].store(0, std::memory_order_release);
    g_unlocked_writes.fetch_sub(1);
}

}  // namespace

// The slow half of the constructor: only WAL files get here.
void UnitLock::lock_wal(off_t start, off_t len, bool write, bool whole) {
    if (!write) {
        wal_register_reader();
    } else if (whole && (unlocked_slot_ = wal_unlocked_begin()) >= 0) {
        return;
    } else if (WalShared* w = st().walshared) {
        wal_sweep_readers(w, false);
    }
    struct flock fl {};
    fl.l_type = write ? F_WRLCK : F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    while (real().fcntl(fd_, F_OFD_SETLKW, &fl) != 0) {
        if (errno != EINTR) return;  // e.g. write lock on a read-only fd: go unlocked
    }
    start_ = start;
    len_ = len;
    locked_ = true;
}

void UnitLock::release() {
    if (unlocked_slot_ >= 0) {
        wal_unlocked_end(unlocked_slot_);
        unlocked_slot_ = -1;
    }
    if (!locked_) return;
    int saved = errno;
    struct flock fl {};
    fl.l_type = F_UNLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = start_;
    fl.l_len = len_;
    real().fcntl(fd_, F_OFD_SETLK, &fl);
    errno = saved;
}

}  // namespace cmk::fs::detail
