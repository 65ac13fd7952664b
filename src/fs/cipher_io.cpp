// Cipher I/O: the read and write paths of an encrypted descriptor. A file is a
// sequence of 8 KiB units, each AES-256-XTS encrypted with its unit number as tweak
// over its current length (the last unit of an odd-length file is shorter and is
// re-encrypted when the file grows or shrinks). A unit whose bytes are all zero reads
// and writes as zeros (holes, never-written pages). Unaligned reads decrypt the
// covering units; unaligned writes read, modify and write them back. Aligned relation
// reads go to the mapping first (mapped_reads.cpp); WAL I/O takes the unit lock
// (wal_lock.cpp); files of the classes that lock as a whole take FileLock.
#include <fcntl.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

// ---- bounce buffers -----------------------------------------------------------------

struct Bounce {
    uint8_t* p = nullptr;
    size_t cap = 0;
    ~Bounce() { std::free(p); }
    uint8_t* get(size_t n) {
        if (n > cap) {
            std::free(p);
            p = nullptr;
            cap = 0;
            size_t want = (n + 4095) & ~size_t(4095);
            void* q = nullptr;
            if (posix_memalign(&q, 4096, want) != 0) return nullptr;
            p = static_cast<uint8_t*>(q);
            cap = want;
        }
        return p;
    }
};
thread_local Bounce tl_bounce;
thread_local Bounce tl_bounce2;

// ---- the caller's buffers ---------------------------------------------------------------
//
// PostgreSQL 17+ reads and writes up to io_combine_limit pages (128 KiB) with one preadv
// or pwritev into buffers that are not adjacent in memory. Those are served straight
// from and into the caller's buffers: read in one system call and decrypted in place,
// or encrypted piece by piece into the bounce buffer and written in one. A copy through
// a temporary buffer first (zeroed, filled, wiped: three passes over 128 KiB) cost more
// than the cipher itself with OpenSSL 3.5+.

// The total length of iov[0..cnt), and whether the vector is whole units at off. false
// (errno EINVAL) for what the kernel refuses: a count outside 0..IOV_MAX, a total past
// SSIZE_MAX.
bool vec_shape(const struct iovec* iov, int cnt, off_t off, size_t* total, bool* units) {
    if (cnt < 0 || cnt > IOV_MAX) {
        errno = EINVAL;
        return false;
    }
    size_t t = 0;
    bool u = off % off_t(U) == 0;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len > size_t(SSIZE_MAX) - t) {
            errno = EINVAL;
            return false;
        }
        t += iov[i].iov_len;
        u = u && iov[i].iov_len % U == 0;
    }
    *total = t;
    *units = u;
    return true;
}

// The bytes of one write: the caller's buffers in order (one for pwrite), len in all.
struct Src {
    const struct iovec* iov;
    int cnt;
    size_t len;
    const uint8_t* piece(int i) const { return static_cast<const uint8_t*>(iov[i].iov_base); }
    bool zero() const {
        for (int i = 0; i < cnt; i++)
            if (iov[i].iov_len && !all_zero(piece(i), iov[i].iov_len)) return false;
        return true;
    }
    void gather(uint8_t* dst) const {  // an empty piece may have no buffer at all
        for (int i = 0; i < cnt; dst += iov[i].iov_len, i++)
            if (iov[i].iov_len) std::memcpy(dst, piece(i), iov[i].iov_len);
    }
    bool pieces_are_units() const {
        for (int i = 0; i < cnt; i++)
            if (iov[i].iov_len % U) return false;
        return true;
    }
};

// preadv until len bytes or the end of the file; -1 with errno on error.
ssize_t preadv_full(int fd, const struct iovec* iov, int cnt, off_t off, size_t len) {
    ssize_t r;
    do r = real().preadv(fd, iov, cnt, off);
    while (r < 0 && errno == EINTR);
    if (r <= 0 || size_t(r) == len) return r;
    size_t done = size_t(r), start = 0;  // short (a signal, the end of the file): the rest by piece
    for (int i = 0; i < cnt; start += iov[i].iov_len, i++) {
        size_t end = start + iov[i].iov_len;
        if (done >= end) continue;
        size_t skip = done - start;
        ssize_t k = sys::pread_full(fd, static_cast<uint8_t*>(iov[i].iov_base) + skip, end - done, off + off_t(done));
        if (k < 0) return -1;
        done += size_t(k);
        if (done < end) break;  // end of file
    }
    return ssize_t(done);
}

// pwritev of all len bytes; -1 with errno on error.
ssize_t pwritev_full(int fd, const struct iovec* iov, int cnt, off_t off, size_t len) {
    ssize_t r;
    do r = real().pwritev(fd, iov, cnt, off);
    while (r < 0 && errno == EINTR);
    if (r < 0 || size_t(r) == len) return r;
    size_t done = size_t(r), start = 0;
    for (int i = 0; i < cnt; start += iov[i].iov_len, i++) {
        size_t end = start + iov[i].iov_len;
        if (done >= end) continue;
        size_t skip = done - start;
        const uint8_t* p = static_cast<const uint8_t*>(iov[i].iov_base) + skip;
        if (sys::pwrite_full(fd, p, end - done, off + off_t(done)) < 0) return -1;
        done = end;
    }
    return ssize_t(done);
}

}  // namespace

namespace {

// Unit 0 of a WAL segment under a derived key (file_keys.cpp): PostgreSQL's long page
// header stays plaintext with the mark set, the rest of the unit is XTS with tweak 0.
// Whether a unit has the plaintext header depends only on its length, the same when
// it is written and read.
void crypt_wal_head(FileKey& k, bool enc, const uint8_t* p, uint8_t* q, size_t n) {
    wal_crypt_head(k.cipher, enc, p, q, n);
}

}  // namespace

// Encrypts or decrypts len bytes of units from src into dst (which may be src). A unit
// of zeros stays zeros.
void crypt_units(FileKey& k, bool enc, const uint8_t* src, uint8_t* dst, uint64_t first_unit, size_t len) {
    std::lock_guard<std::mutex> g(k.mu);
    for (size_t pos = 0; pos < len; pos += U) {
        size_t n = std::min(U, len - pos);
        const uint8_t* p = src + pos;
        uint8_t* q = dst + pos;
        if (all_zero(p, n)) {
            if (q != p) std::memset(q, 0, n);
        } else if (k.wal_head && first_unit + pos / U == 0 && n >= k.wal_head + 16) {
            crypt_wal_head(k, enc, p, q, n);
        } else if (enc) {
            k.cipher.encrypt(first_unit + pos / U, p, q, n);
        } else {
            k.cipher.decrypt(first_unit + pos / U, p, q, n);
        }
    }
}
void crypt_units(FileKey& k, bool enc, uint8_t* buf, uint64_t first_unit, size_t len) {
    crypt_units(k, enc, buf, buf, first_unit, len);
}

namespace {

// The last partly filled WAL page this thread wrote: PostgreSQL writes the partly
// filled last page of the WAL again at every flush, each time with more records after
// the same prefix. XTS enciphers every 16-byte block on its own (key, unit, block
// position), so the blocks of the prefix that have not changed have the ciphertext they
// had: only the page from its first changed block needs the cipher
// (XtsCipher::encrypt_from). The copy is compared, never trusted: whatever another
// process wrote since, a block whose plaintext equals the copy's has the copy's
// ciphertext under the same key.
//
// The caller's page is PostgreSQL's WAL buffer, which other backends go on filling
// past the flush point while it is written: it may change under us. So a page that is
// kept is first copied (snap), and compared, enciphered and kept from that copy, so
// that the plaintext kept is exactly what the kept ciphertext enciphers.
struct WalPageCopy {
    uint64_t key_serial = 0;  // FileKey::serial; 0: empty
    uint64_t unit = 0;
    alignas(64) uint8_t pt[U];
    alignas(64) uint8_t ct[U];
    alignas(64) uint8_t snap[U];
};
thread_local std::unique_ptr<WalPageCopy> tl_wal_page;

// The number of leading 16-byte blocks a and b have in common (of U / 16).
size_t same_blocks(const uint8_t* a, const uint8_t* b) {
    size_t i = 0;
    while (i + 256 <= U && std::memcmp(a + i, b + i, 256) == 0) i += 256;
    while (i + 16 <= U && std::memcmp(a + i, b + i, 16) == 0) i += 16;
    return i / 16;
}

}  // namespace

// Encrypts whole WAL units from src into dst (not the same buffer) under a segment's
// derived key, as crypt_units does, reusing the ciphertext of the unchanged blocks of
// the partly filled page this thread wrote last.
void crypt_wal_units(FileKey& k, const uint8_t* src, uint8_t* dst, uint64_t first_unit, size_t len) {
    if (!tl_wal_page) tl_wal_page.reset(new (std::nothrow) WalPageCopy);
    WalPageCopy* w = tl_wal_page.get();
    if (!w || len % U || !k.wal_head || src == dst) return crypt_units(k, true, src, dst, first_unit, len);
    std::lock_guard<std::mutex> g(k.mu);
    for (size_t pos = 0; pos < len; pos += U) {
        uint64_t u = first_unit + pos / U;
        const uint8_t* p = src + pos;
        uint8_t* q = dst + pos;
        // Only the write's last page can be written again, and only while PostgreSQL
        // has not filled it: the rest of a partly filled WAL page is zeros.
        bool keep = false;
        if (pos + U == len && u != 0) {
            std::memcpy(w->snap, p, U);
            p = w->snap;
            keep = all_zero(p + U - 64, 64);
        }
        if (all_zero(p, U)) {
            std::memset(q, 0, U);
            continue;
        }
        if (u == 0) {
            crypt_wal_head(k, true, p, q, U);
            continue;
        }
        bool hit = w->key_serial == k.serial && w->unit == u;
        size_t same = hit ? same_blocks(p, w->pt) : 0;
        // A block of src compared equal may change before it is enciphered: the copy's
        // ciphertext of the block is then what goes out, the block's value when compared.
        if (same) std::memcpy(q, w->ct, same * 16);
        if (same < U / 16) k.cipher.encrypt_from(u, same, p + same * 16, q + same * 16, U - same * 16);
        if (keep) {
            w->key_serial = 0;
            std::memcpy(w->pt + same * 16, p + same * 16, U - same * 16);
            std::memcpy(w->ct + same * 16, q + same * 16, U - same * 16);
            w->unit = u;
            w->key_serial = k.serial;
        }
    }
}

// ---- the whole-file lock --------------------------------------------------------------------

void FileLock::lock(bool write) {
    struct flock fl {};
    fl.l_type = write ? F_WRLCK : F_RDLCK;
    fl.l_whence = SEEK_SET;  // l_start = l_len = 0: the whole file, however long it grows
    while (real().fcntl(fd_, F_OFD_SETLKW, &fl) != 0) {
        if (errno != EINTR) return;  // e.g. a write lock on a read-only descriptor: go unlocked
    }
    locked_ = true;
}

void FileLock::unlock() {
    int saved = errno;
    struct flock fl {};
    fl.l_type = F_UNLCK;
    fl.l_whence = SEEK_SET;
    real().fcntl(fd_, F_OFD_SETLK, &fl);
    errno = saved;
}

// ---- read ---------------------------------------------------------------------------------

ssize_t enc_pread(FileCtx* c, int fd, uint8_t* buf, size_t len, off_t off) {
    if (len == 0) return real().pread(fd, buf, 0, off);
    FileLock flk(fd, c->cls, false);
    std::shared_ptr<FileKey> key = ensure_key(c, false);
    if (!key) {
        if (errno != 0) return -1;
        // No key: the file holds zeros only (nothing was ever written through a key;
        // see enc_pwrite), which read as themselves. Any other byte is damage.
        ssize_t r = sys::pread_full(fd, buf, len, off);
        if (r > 0 && !all_zero(buf, size_t(r))) {
            std::memset(buf, 0, size_t(r));
            log_line("no data encryption key for non-empty file \"" + c->rel + "\"");
            errno = EIO;
            return -1;
        }
        return r;
    }
    if (c->cls == FileClass::Spill) {
        try {
            ssize_t r;
            if (spill_read(c, *key, fd, buf, len, off, &r)) return r;
        } catch (const std::exception& e) {
            log_line("decrypt of \"" + c->rel + "\" failed: " + e.what());
            errno = EIO;
            return -1;
        }
    }
    if (c->map_ok.load(std::memory_order_relaxed) && off % U == 0 && len % U == 0 && len <= kChunk) {
        try {
            ssize_t r = map_read(c, *key, fd, buf, len, off);
            if (r >= 0) return r;
        } catch (const std::exception& e) {
            log_line(std::string("decrypt failed: ") + e.what());
            errno = EIO;
            return -1;
        }
    }
    size_t total = 0;
    while (total < len) {
        off_t o = off + total;
        size_t want = std::min(len - total, kChunk);
        off_t span_start = o - (o % U);
        size_t span_len = ((o + want + U - 1) / U) * U - span_start;
        bool direct = (o % U == 0) && (want % U == 0);
        uint8_t* b = direct ? buf + total : tl_bounce.get(span_len);
        if (!b) {
            errno = ENOMEM;
            return total ? ssize_t(total) : -1;
        }
        ssize_t n;
        {
            UnitLock lk(fd, c->cls, span_start, span_len, false);
            n = sys::pread_full(fd, b, span_len, span_start);
        }
        if (n < 0) return total ? ssize_t(total) : -1;
        if (st().wiped.load()) {
            errno = EIO;
            return -1;
        }
        try {
            crypt_units(*key, false, b, span_start / U, size_t(n));
        } catch (const std::exception& e) {
            log_line("decrypt of \"" + c->rel + "\" failed: " + e.what());
            errno = EIO;
            return -1;
        }
        size_t avail = size_t(n) > size_t(o - span_start) ? size_t(n) - size_t(o - span_start) : 0;
        size_t got = std::min(avail, want);
        if (!direct && got) std::memcpy(buf + total, b + (o - span_start), got);
        total += got;
        if (got < want) break;  // end of file
    }
    return ssize_t(total);
}

// ---- write --------------------------------------------------------------------------------

// Re-encrypts unit u of a file whose size changes from old_size to new_size (the unit
// holds the end of the file in at least one of them). Extends with zeros.
namespace {

int reshape_unit(FileCtx* c, FileKey& key, int fd, uint64_t u, int64_t old_size, int64_t new_size) {
    int64_t start = int64_t(u) * U;
    size_t old_len = old_size > start ? size_t(std::min<int64_t>(U, old_size - start)) : 0;
    size_t new_len = new_size > start ? size_t(std::min<int64_t>(U, new_size - start)) : 0;
    if (old_len == new_len || new_len == 0) return 0;
    uint8_t* b = tl_bounce2.get(U);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    std::memset(b, 0, U);
    UnitLock lk(fd, c->cls, start, U, true);
    if (old_len) {
        ssize_t n = sys::pread_full(fd, b, old_len, start);
        if (n < 0) return -1;
        if (size_t(n) < old_len) std::memset(b + n, 0, old_len - n);
        crypt_units(key, false, b, u, old_len);
    }
    crypt_units(key, true, b, u, new_len);
    if (sys::pwrite_full(fd, b, new_len, start) < 0) return -1;
    return 0;
}
}  // namespace

int64_t file_size(int fd) {
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return -1;
    return sb.st_size;
}

namespace {

// This descriptor's idea of the file's size after a write that ended at `end`.
void grow_known_size(FileCtx* c, int64_t end) {
    int64_t cur = c->known_size.load(std::memory_order_relaxed);
    while (end > cur && !c->known_size.compare_exchange_weak(cur, end)) {
    }
}

ssize_t enc_pwrite_chunk(FileCtx* c, FileKey& key, int fd, const Src& src, off_t off) {
    const size_t len = src.len;
    int64_t end = off + int64_t(len);
    int64_t size = c->known_size.load(std::memory_order_relaxed);
    bool extends = end > size;
    // Another process may have changed the size of a file that locks as a whole. Whole
    // units written to a relation file of whole units need no size: nothing of the old
    // contents is kept and no partial last unit can be left behind (relation files
    // grow and shrink by pages; a torn extension is overwritten from its start). That
    // saves an fstat per page of every relation extension (COPY: ~11,000 per 73 MB).
    const bool whole_units = c->cls == FileClass::Relation && off % U == 0 && len % U == 0 && size % U == 0;
    if ((extends && !whole_units) || size % U || locks_whole_file(c->cls)) {
        size = file_size(fd);
        if (size < 0) return -1;
        extends = end > size;
    }
    uint64_t u0 = uint64_t(off) / U;
    uint64_t u1 = uint64_t(end - 1) / U;
    int64_t new_size = std::max<int64_t>(size, end);
    // The old last unit, if partial and before the span, grows: re-encrypt it first.
    if (extends && size % U && uint64_t(size) / U < u0) {
        if (reshape_unit(c, key, fd, uint64_t(size) / U, size, new_size) != 0) return -1;
    }
    int64_t span_start = int64_t(u0) * U;
    int64_t span_end = std::min<int64_t>(int64_t(u1 + 1) * U, new_size);
    size_t span_len = size_t(span_end - span_start);
    uint8_t* b = tl_bounce.get(span_len);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    UnitLock lk(fd, c->cls, span_start, span_end - span_start, true, off % U == 0 && end % U == 0);
    // Old contents are needed only in the first and last unit, where the write leaves
    // part of the unit as it was; they are decrypted over their old lengths.
    bool keep_head = off > span_start && size > span_start;
    bool keep_tail = size > end && end < span_end;
    if (off > span_start || end < span_end) std::memset(b, 0, span_len);
    auto load_unit = [&](uint64_t u) -> bool {
        int64_t us = int64_t(u) * U;
        size_t ol = size_t(std::min<int64_t>(U, size - us));
        ssize_t n = sys::pread_full(fd, b + (us - span_start), ol, us);
        if (n < 0) return false;
        crypt_units(key, false, b + (us - span_start), u, size_t(n));
        return true;
    };
    if (keep_head && !load_unit(u0)) return -1;
    if (keep_tail && !(keep_head && u1 == u0) && !load_unit(u1)) return -1;
    if (off == span_start && end == span_end && src.cnt == 1) {  // whole units (pages, WAL): no copy first
        if (key.wal_head)
            crypt_wal_units(key, src.piece(0), b, u0, span_len);
        else
            crypt_units(key, true, src.piece(0), b, u0, span_len);
    } else if (off == span_start && end == span_end && !key.wal_head && src.pieces_are_units()) {
        size_t pos = 0;  // each of the caller's pieces straight into its place
        for (int i = 0; i < src.cnt; pos += src.iov[i].iov_len, i++)
            crypt_units(key, true, src.piece(i), b + pos, u0 + pos / U, src.iov[i].iov_len);
    } else {
        src.gather(b + (off - span_start));
        crypt_units(key, true, b, u0, span_len);
    }
    if (st().wiped.load()) {
        errno = EIO;
        return -1;
    }
    ssize_t w = sys::pwrite_full(fd, b, span_len, span_start);
    if (w < 0) return -1;
    grow_known_size(c, new_size);
    return ssize_t(len);
}

}  // namespace

// Keys of new files (docs/how-it-works.md): a durable file gets its DEK with its first
// write of anything but zeros. Whole units of zeros are written as they are, which is
// what a unit of zeros is in every encoding, key or no key: PostgreSQL extends every
// relation with zero pages, CREATE DATABASE extends every copy to its final size first.
// So such a write needs no key, no key-map append, no fsync, and not even a look at the
// key map (the bytes on disk are the same either way), and a file that has only had
// such writes stays consistent without a key (the open, read and start-up checks hold
// a keyless file to zeros only). Only whole units in a file of whole units: a partial
// unit's encoding depends on the file's length, which a process with the key may be
// changing. Relation files, which only ever grow by pages, skip the fstat for the size.
namespace {
bool zero_units_write(FileCtx* c, int fd, const Src& src, off_t off, ssize_t* out) {
    const size_t len = src.len;
    if (c->source || !is_durable(c->cls) || off % U || len % U) return false;
    const bool relation = c->cls == FileClass::Relation;
    if (!relation && c->key) return false;  // other classes: the keyed path as always
    if (!src.zero()) return false;
    int64_t size = relation ? c->known_size.load(std::memory_order_relaxed) : file_size(fd);
    if (size < 0 || size % U) return false;
    {
        std::lock_guard<std::mutex> g(c->key_mu);
        if (st().wiped.load() || (c->db && file_db_locked(c))) {  // revoked: no I/O at all
            errno = EIO;
            *out = -1;
            return true;
        }
    }
    ssize_t w = src.cnt == 1 ? sys::pwrite_full(fd, src.piece(0), len, off) : pwritev_full(fd, src.iov, src.cnt, off, len);
    if (w < 0) {
        *out = -1;
        return true;
    }
    grow_known_size(c, off + int64_t(len));
    *out = ssize_t(len);
    return true;
}
}  // namespace

namespace {

// A write of src at off, from pwrite (one piece, any length) or pwritev (at most kChunk,
// not a spill file): the whole-file lock, zeros without a key, the key, the units.
ssize_t write_src(FileCtx* c, int fd, const Src& src, off_t off) {
    FileLock flk(fd, c->cls, true);
    ssize_t zr;
    if (zero_units_write(c, fd, src, off, &zr)) return zr;
    std::shared_ptr<FileKey> key = ensure_key(c, true);
    if (!key) {
        if (errno == 0) errno = EIO;
        return -1;
    }
    if (src.cnt != 1) {
        try {
            return enc_pwrite_chunk(c, *key, fd, src, off);
        } catch (const std::exception& e) {
            log_line(std::string("encrypt failed: ") + e.what());
            errno = EIO;
            return -1;
        }
    }
    const uint8_t* buf = src.piece(0);
    const size_t len = src.len;
    size_t total = 0;
    try {
        if (c->cls == FileClass::Spill) {
            ssize_t r;
            if (spill_append(c, *key, fd, buf, len, off, &r)) return r;
        }
        while (total < len) {
            size_t n = std::min(len - total, kChunk);
            struct iovec one = {const_cast<uint8_t*>(buf + total), n};
            ssize_t w = enc_pwrite_chunk(c, *key, fd, Src{&one, 1, n}, off + total);
            if (w < 0) return total ? ssize_t(total) : -1;
            total += size_t(w);
        }
    } catch (const std::exception& e) {
        log_line(std::string("encrypt failed: ") + e.what());
        errno = EIO;
        return total ? ssize_t(total) : -1;
    }
    return ssize_t(total);
}

// A temporary copy of a vector's bytes, wiped when done (it holds plaintext).
struct Gathered {
    uint8_t* p;
    size_t n;
    explicit Gathered(size_t len) : p(static_cast<uint8_t*>(std::malloc(len ? len : 1))), n(len) {}
    ~Gathered() {
        if (p) OPENSSL_cleanse(p, n);
        std::free(p);
    }
    Gathered(const Gathered&) = delete;
    Gathered& operator=(const Gathered&) = delete;
};

}  // namespace

ssize_t enc_pwrite(FileCtx* c, int fd, const uint8_t* buf, size_t len, off_t off) {
    if (len == 0) return real().pwrite(fd, buf, 0, off);
    struct iovec one = {const_cast<uint8_t*>(buf), len};
    return write_src(c, fd, Src{&one, 1, len}, off);
}

ssize_t enc_pwritev(FileCtx* c, int fd, const struct iovec* iov, int cnt, off_t off) {
    size_t len;
    bool units;
    if (!vec_shape(iov, cnt, off, &len, &units)) return -1;
    if (len == 0) return real().pwritev(fd, iov, cnt, off);
    if (cnt == 1) return enc_pwrite(c, fd, static_cast<const uint8_t*>(iov[0].iov_base), len, off);
    if (len <= kChunk && c->cls != FileClass::Spill) return write_src(c, fd, Src{iov, cnt, len}, off);
    Gathered g(len);  // a spill file's appends, or more than a chunk: as one buffer
    if (!g.p) {
        errno = ENOMEM;
        return -1;
    }
    Src{iov, cnt, len}.gather(g.p);
    return enc_pwrite(c, fd, g.p, len, off);
}

ssize_t enc_preadv(FileCtx* c, int fd, const struct iovec* iov, int cnt, off_t off) {
    size_t len;
    bool units;
    if (!vec_shape(iov, cnt, off, &len, &units)) return -1;
    if (len == 0) return real().preadv(fd, iov, cnt, off);
    if (cnt == 1) return enc_pread(c, fd, static_cast<uint8_t*>(iov[0].iov_base), len, off);
    const bool whole_lock = locks_whole_file(c->cls);
    if (units && len <= kChunk && c->cls != FileClass::Spill && !whole_lock &&
        !c->map_ok.load(std::memory_order_relaxed)) {
        std::shared_ptr<FileKey> key = ensure_key(c, false);
        if (!key && errno != 0) return -1;
        if (key) {  // one read into the caller's buffers, each decrypted in place
            ssize_t n;
            {
                UnitLock lk(fd, c->cls, off, off_t(len), false);
                n = preadv_full(fd, iov, cnt, off, len);
            }
            if (n < 0) return -1;
            if (st().wiped.load()) {
                errno = EIO;
                return -1;
            }
            try {
                size_t pos = 0;
                for (int i = 0; i < cnt && pos < size_t(n); i++) {
                    size_t k = std::min(iov[i].iov_len, size_t(n) - pos);
                    crypt_units(*key, false, static_cast<uint8_t*>(iov[i].iov_base), uint64_t(off + off_t(pos)) / U, k);
                    pos += k;
                }
            } catch (const std::exception& e) {
                log_line("decrypt of \"" + c->rel + "\" failed: " + e.what());
                errno = EIO;
                return -1;
            }
            return n;
        }
    }
    if (units && !whole_lock) {  // mapped reads, spill files, no key: each piece on its own
        size_t total = 0;
        for (int i = 0; i < cnt; i++) {
            ssize_t r = enc_pread(c, fd, static_cast<uint8_t*>(iov[i].iov_base), iov[i].iov_len, off + off_t(total));
            if (r < 0) return total ? ssize_t(total) : -1;
            total += size_t(r);
            if (size_t(r) < iov[i].iov_len) break;  // end of file
        }
        return ssize_t(total);
    }
    Gathered g(len);  // pieces that split units, or a file read under one lock: as one buffer
    if (!g.p) {
        errno = ENOMEM;
        return -1;
    }
    ssize_t r = enc_pread(c, fd, g.p, len, off);
    if (r <= 0) return r;
    size_t pos = 0;
    for (int i = 0; i < cnt && pos < size_t(r); i++) {
        size_t k = std::min(iov[i].iov_len, size_t(r) - pos);
        if (k) std::memcpy(iov[i].iov_base, g.p + pos, k);
        pos += k;
    }
    return r;
}

// Size change of an encrypted file: fix the unit that holds the (old or new) end.
int enc_resize(FileCtx* c, int fd, int64_t new_size) {
    int64_t size = file_size(fd);
    if (size < 0) return -1;
    if (size == new_size) return 0;
    if (new_size < size) {  // this descriptor's mapping must not read past the new end
        int64_t v = c->map_valid.load();
        int64_t nv = new_size - new_size % int64_t(U);
        while (v > nv && !c->map_valid.compare_exchange_weak(v, nv)) {
        }
    }
    // A file without a key holds zeros only, and growing or shrinking it keeps it so
    // (PostgreSQL 16+ extends relation files with posix_fallocate): no key needed.
    std::shared_ptr<FileKey> key = ensure_key(c, false);
    if (!key) {
        if (errno != 0) return -1;
        if (c->source) {  // a source directory's files are read-only
            errno = EROFS;
            return -1;
        }
        c->known_size.store(new_size);
        return 0;
    }
    try {
        if (new_size < size && new_size % U) {
            if (reshape_unit(c, *key, fd, uint64_t(new_size) / U, size, new_size) != 0) return -1;
        } else if (new_size > size && size % U) {
            if (reshape_unit(c, *key, fd, uint64_t(size) / U, size, new_size) != 0) return -1;
        }
    } catch (const std::exception& e) {
        log_line(std::string("resize failed: ") + e.what());
        errno = EIO;
        return -1;
    }
    c->known_size.store(new_size);
    return 0;
}

// Rewrites a whole file from one encoding to another in place (class change on
// rename). A null key means plaintext.
int transcode(const std::string& abs, const std::shared_ptr<FileKey>& from,
              const std::shared_ptr<FileKey>& to) {
    int fd = sys::open(abs.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    int64_t size = file_size(fd);
    std::vector<uint8_t> b(U);
    int rc = 0;
    bool wrote = false;
    try {
        for (int64_t pos = 0; pos < size && rc == 0; pos += U) {
            size_t n = size_t(std::min<int64_t>(U, size - pos));
            if (sys::pread_full(fd, b.data(), n, pos) != ssize_t(n)) {
                rc = -1;
                break;
            }
            // Zeros are zeros in every encoding: a new WAL segment (16 MiB of zeros,
            // renamed from xlogtemp.N) costs a read, not a rewrite.
            if (all_zero(b.data(), n)) continue;
            if (from) crypt_units(*from, false, b.data(), uint64_t(pos) / U, n);
            if (to) crypt_units(*to, true, b.data(), uint64_t(pos) / U, n);
            if (sys::pwrite_full(fd, b.data(), n, pos) < 0) rc = -1;
            wrote = true;
        }
    } catch (const std::exception& e) {
        log_line("rewrite of \"" + abs + "\" failed: " + e.what());
        errno = EIO;
        rc = -1;
    }
    std::fill(b.begin(), b.end(), 0);
    if (rc == 0 && wrote && ::fsync(fd) != 0) rc = -1;
    int saved = errno;
    sys::close(fd);
    errno = saved;
    return rc;
}

}  // namespace cmk::fs::detail
