// Logical-decoding spill files (pg_replslot/SLOT/xid-*.spill, FileClass::Spill): the
// fast path (issue 20). A walsender or decoding backend appends one small record per
// change (write() on an O_APPEND descriptor) and later reads them back in two small
// reads each. Through the generic cipher path every append was an fstat, a read and a
// decryption of its 8 KiB unit, a re-encryption and a write of it; every read a
// decryption of each unit it touched. Spill files belong to the process that writes
// them (no other process opens them; a crash or restart discards them, and they are
// under the per-boot key), which allows two per-descriptor caches:
//
//  - the tail: the plaintext of the file's last, partial unit. Appends go into it; a
//    unit that fills is encrypted and written at once; the partial rest is written on
//    close, before any read, before any other write, resize or fallocate of the file in
//    this process. Space for what the tail holds is reserved first (fallocate with
//    FALLOC_FL_KEEP_SIZE, 64 KiB at a time), so a full disk fails the append, as it
//    would in plaintext, and not the later write; where the file system cannot reserve,
//    every append is written at once (still without the read and decryption);
//  - the read unit: the last unit decrypted for reading, valid until this process
//    writes any spill file again (an epoch counter).
//
// Neither cache holds a key; both hold plaintext the server itself just had in memory,
// and are wiped when the descriptor goes away.
#include <fcntl.h>
#include <sys/stat.h>

#include <openssl/crypto.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include "layer_internal.hpp"

namespace cmk::fs::detail {

struct SpillCache {
    std::mutex mu;
    int fd = -1;            // the descriptor the tail was written through (flushes use it)
    bool loaded = false;    // tail_unit/tail_len describe the file's end
    bool dirty = false;     // tail bytes not yet written
    bool no_reserve = false;  // the file system cannot reserve space: write through
    uint64_t tail_unit = 0;
    size_t tail_len = 0;
    int64_t reserved = 0;   // space reserved up to here
    uint8_t tail[U];
    uint8_t enc[U];
    bool rvalid = false;
    uint64_t runit = 0;
    size_t rlen = 0;
    uint64_t repoch = 0;
    uint8_t rbuf[U];
    ~SpillCache() {
        OPENSSL_cleanse(tail, sizeof tail);
        OPENSSL_cleanse(enc, sizeof enc);
        OPENSSL_cleanse(rbuf, sizeof rbuf);
    }
};

namespace {

constexpr int64_t kReserveStep = 64 * 1024;

std::atomic<uint64_t> g_epoch{1};  // bumped by every spill write of this process

// Descriptor contexts of this process with a dirty tail (flushed before any spill read).
std::mutex g_dirty_mu;
std::set<FileCtx*>& dirty_set() {
    static std::set<FileCtx*>* s = new std::set<FileCtx*>;
    return *s;
}

void mark_dirty(FileCtx* c, bool dirty) {
    std::lock_guard<std::mutex> g(g_dirty_mu);
    if (dirty)
        dirty_set().insert(c);
    else
        dirty_set().erase(c);
}

SpillCache& cache_of(FileCtx* c) {
    std::lock_guard<std::mutex> g(c->key_mu);
    if (!c->spill) c->spill.reset(new SpillCache);
    return *c->spill;
}

// Writes the dirty tail (caller holds s.mu). -1/errno on failure (the tail is then
// forgotten: the file's end on disk is what it is).
int flush_locked(FileCtx* c, SpillCache& s, FileKey& key) {
    if (!s.dirty) return 0;
    g_epoch.fetch_add(1);
    if (st().wiped.load()) {  // keys wiped (revocation): nothing more is written
        s.dirty = s.loaded = false;
        mark_dirty(c, false);
        errno = EIO;
        return -1;
    }
    crypt_units(key, true, s.tail, s.enc, s.tail_unit, s.tail_len);
    ssize_t w = sys::pwrite_full(s.fd, s.enc, s.tail_len, off_t(s.tail_unit * U));
    s.dirty = false;
    mark_dirty(c, false);
    if (w < 0) {
        s.loaded = false;
        return -1;
    }
    return 0;
}

}  // namespace

void SpillCacheDeleter::operator()(SpillCache* s) const { delete s; }

int spill_flush(FileCtx* c, bool forget) {
    if (c->cls != FileClass::Spill || !c->spill) return 0;
    SpillCache& s = *c->spill;
    std::lock_guard<std::mutex> g(s.mu);
    if (forget) {  // the file's size is about to change other than by an append
        s.loaded = false;
        s.rvalid = false;
        g_epoch.fetch_add(1);
    }
    if (!s.dirty) return 0;
    std::shared_ptr<FileKey> key = c->key;
    if (!key) return 0;
    try {
        if (flush_locked(c, s, *key) != 0) {
            log_line("could not write the end of spill file \"" + c->rel + "\": " + std::strerror(errno));
            return -1;
        }
    } catch (const std::exception& e) {
        log_line("could not write the end of spill file \"" + c->rel + "\": " + e.what());
        errno = EIO;
        return -1;
    }
    return 0;
}

void spill_flush_all() {
    std::set<FileCtx*> todo;
    {
        std::lock_guard<std::mutex> g(g_dirty_mu);
        if (dirty_set().empty()) return;
        todo = dirty_set();
    }
    for (FileCtx* c : todo) spill_flush(c, false);
}

void spill_forget(FileCtx* c) {
    if (c->spill) mark_dirty(c, false);
}

bool spill_append(FileCtx* c, FileKey& key, int fd, const uint8_t* buf, size_t len, off_t off, ssize_t* out) {
    SpillCache& s = cache_of(c);
    std::lock_guard<std::mutex> g(s.mu);
    int64_t size = c->known_size.load();
    if (off != size) {
        // Not an append: write the tail out first; the generic path does the rest.
        if (flush_locked(c, s, key) != 0) {
            *out = -1;
            return true;
        }
        s.loaded = false;
        g_epoch.fetch_add(1);
        return false;
    }
    g_epoch.fetch_add(1);
    const int64_t end = size + int64_t(len);
    // The space for this write, reserved now: a full disk fails here, not at the flush.
    if (!s.no_reserve && end > s.reserved) {
        int64_t from = std::max(s.reserved, size);
        int64_t to = (end + kReserveStep - 1) / kReserveStep * kReserveStep;
        if (real().fallocate(fd, FALLOC_FL_KEEP_SIZE, from, to - from) == 0) {
            s.reserved = to;
        } else if (errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL) {
            s.no_reserve = true;
        } else {
            *out = -1;
            return true;
        }
    }
    if (!s.loaded) {
        s.tail_unit = uint64_t(size) / U;
        s.tail_len = size_t(size % int64_t(U));
        if (s.tail_len) {
            ssize_t n = sys::pread_full(fd, s.tail, s.tail_len, off_t(s.tail_unit * U));
            if (n != ssize_t(s.tail_len)) {
                if (n >= 0) errno = EIO;
                *out = -1;
                return true;
            }
            crypt_units(key, false, s.tail, s.tail_unit, s.tail_len);
        }
        s.loaded = true;
    }
    s.fd = fd;
    size_t done = 0;
    while (done < len) {
        size_t k = std::min(U - s.tail_len, len - done);
        std::memcpy(s.tail + s.tail_len, buf + done, k);
        s.tail_len += k;
        done += k;
        s.dirty = true;
        if (s.tail_len == U) {
            crypt_units(key, true, s.tail, s.enc, s.tail_unit, U);
            if (st().wiped.load()) errno = EIO;
            if (st().wiped.load() || sys::pwrite_full(fd, s.enc, U, off_t(s.tail_unit * U)) < 0) {
                int saved = errno;
                s.loaded = s.dirty = false;
                mark_dirty(c, false);
                struct stat sb;
                if (::fstat(fd, &sb) == 0) c->known_size.store(sb.st_size);
                errno = saved;
                *out = -1;
                return true;
            }
            s.tail_unit++;
            s.tail_len = 0;
            s.dirty = false;
        }
    }
    c->known_size.store(end);
    if (s.dirty && s.no_reserve) {
        if (flush_locked(c, s, key) != 0) {
            *out = -1;
            return true;
        }
        s.loaded = true;  // flushed, still the file's end
    }
    mark_dirty(c, s.dirty);
    *out = ssize_t(len);
    return true;
}

bool spill_read(FileCtx* c, FileKey& key, int fd, uint8_t* buf, size_t len, off_t off, ssize_t* out) {
    spill_flush_all();
    SpillCache& s = cache_of(c);
    std::lock_guard<std::mutex> g(s.mu);
    const uint64_t epoch = g_epoch.load();
    size_t done = 0;
    while (done < len) {
        uint64_t o = uint64_t(off) + done;
        uint64_t u = o / U;
        if (!(s.rvalid && s.runit == u && s.repoch == epoch)) {
            s.rvalid = false;
            ssize_t n = sys::pread_full(fd, s.rbuf, U, off_t(u * U));
            if (n < 0) {
                *out = done ? ssize_t(done) : -1;
                return true;
            }
            if (st().wiped.load()) {
                errno = EIO;
                *out = -1;
                return true;
            }
            crypt_units(key, false, s.rbuf, u, size_t(n));
            s.rvalid = true;
            s.runit = u;
            s.rlen = size_t(n);
            s.repoch = epoch;
        }
        size_t in = size_t(o - u * U);
        if (in >= s.rlen) break;  // end of file
        size_t k = std::min(s.rlen - in, len - done);
        std::memcpy(buf + done, s.rbuf + in, k);
        done += k;
        if (s.rlen < U) break;  // the last unit
    }
    *out = ssize_t(done);
    return true;
}

}  // namespace cmk::fs::detail
