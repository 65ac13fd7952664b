// The layer's operations (op_*), one per libc call it replaces: the entry points
// (interpose.cpp, got.cpp) forward here. Each classifies the path or looks the
// descriptor up, and either passes the call to libc untouched or serves it through
// cipher I/O, carrying the file's key along on open, rename, link and unlink. Each
// behaves like the call it replaces (return value, errno) and never throws.
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/keys/keymap.hpp"
#include "layer_internal.hpp"

namespace cmk::fs::detail {


namespace {
bool first_unit_zero(int fd) {
    uint8_t b[U];
    ssize_t n = sys::pread_full(fd, b, sizeof b, 0);
    return n >= 0 && all_zero(b, size_t(n));
}
}  // namespace

int op_openat(int dirfd, const char* path, int flags, mode_t mode) {
    std::optional<Resolved> r;
    if (!tl_in_layer && !(flags & O_PATH)) r = resolve(dirfd, path);
    if (r && r->source && ((flags & O_ACCMODE) != O_RDONLY || (flags & (O_CREAT | O_TRUNC))) &&
        refuse_source_write(r, "open for writing"))
        return -1;
    if (!r || !is_encrypted(r->cls) || !ensure_active()) return real().openat(dirfd, path, flags, mode);
    State& s = st();
    int rflags = flags;
    bool append = flags & O_APPEND;
    rflags &= ~O_APPEND;  // pwrite() on an O_APPEND descriptor ignores its offset
    if ((rflags & O_ACCMODE) == O_WRONLY) rflags = (rflags & ~O_ACCMODE) | O_RDWR;  // for read-modify-write
    int fd = real().openat(dirfd, path, rflags, mode);
    bool readable = true;
    if (fd < 0 && (flags & O_ACCMODE) == O_WRONLY && errno == EACCES) {
        fd = real().openat(dirfd, path, flags & ~O_APPEND, mode);
        readable = false;
    }
    if (fd < 0) return fd;
    struct stat sb;
    if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) return fd;
    if (s.wiped.load()) {
        real().close(fd);
        errno = EIO;
        return -1;
    }
    auto* c = new FileCtx();
    c->cls = r->cls;
    c->rel = r->rel;
    c->append = append;
    c->known_size.store(sb.st_size);
    c->map_ok.store(r->cls == FileClass::Relation && readable && !(flags & O_DIRECT) && map_reads_enabled());
    c->source = r->source;
    if (c->source) c->map_ok.store(false);
    try {
        if (c->source) {
            c->key = source_file_key(c->source, r->rel, r->cls);
        } else if (is_ephemeral(r->cls)) {
            c->key = ephemeral_key(sb.st_dev, sb.st_ino);
        } else if (r->wal_target) {
            c->key = wal_key(wal_segment_of(r->rel));
        } else if ((flags & O_CREAT) && (flags & O_EXCL)) {
            // A new file: its key comes with its first non-zero write. An entry of
            // this name belongs to an earlier file (removed without its key, by a crash
            // between the two): it must never serve this one, so it goes now.
            c->db_oid = database_of(r->rel);
            c->db = db_slot(c->db_oid);
            if (c->db && !db_usable(c->db)) throw DbUnavailable(c->db_oid);
            if (has_entry(r->rel)) remove_key(r->rel);
        } else {
            // Bind the key at open: the descriptor keeps it even if the name moves on
            // (a recycled WAL segment read by a walsender, for instance).
            if (auto k = lookup_file_key(r->rel, &c->db)) {
                c->db_oid = database_of(r->rel);
                c->key = std::move(k);
            }
        }
        // Without a key a file must hold zeros only (extended, never written with
        // data); its first unit is looked at here, every unit it serves when read.
        if (!c->key && sb.st_size > 0 && !first_unit_zero(fd)) {
            log_line("no data encryption key for non-empty file \"" + r->rel + "\"" +
                     (c->source ? " of a source directory" : "") +
                     " (key map damaged or truncated, or a file from elsewhere)");
            delete c;
            real().close(fd);
            errno = EIO;
            return -1;
        }
    } catch (const DbUnavailable& e) {
        log_line("cannot open \"" + r->rel + "\": " + e.what());
        delete c;
        real().close(fd);
        errno = EIO;
        return -1;
    } catch (const std::exception& e) {
        log_line(std::string("cannot open \"") + r->rel + "\": " + e.what());
        delete c;
        real().close(fd);
        errno = EIO;
        return -1;
    }
    ctx_set(fd, c);
    return fd;
}

int op_close(int fd) {
    if (FileCtx* c = ctx_get(fd)) {
        if (c->cls == FileClass::Spill) spill_flush(c, true);
        ctx_set(fd, nullptr);
        // A database locked since: the closes its revocation makes every process do
        // (SMGRRELEASE) also drop this process's key map of it. One atomic load.
        db_sweep();
    }
    return real().close(fd);
}

bool op_is_encrypted_fd(int fd) { return ctx_get(fd) != nullptr; }

void op_dup(int oldfd, int newfd) {
    if (newfd < 0 || oldfd == newfd) return;
    FileCtx* c = ctx_get(oldfd);
    if (c) c->refs.fetch_add(1);
    ctx_set(newfd, c);
}

ssize_t op_pread(int fd, void* buf, size_t n, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().pread(fd, buf, n, off);
    return enc_pread(c, fd, static_cast<uint8_t*>(buf), n, off);
}

ssize_t op_pwrite(int fd, const void* buf, size_t n, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().pwrite(fd, buf, n, off);
    return enc_pwrite(c, fd, static_cast<const uint8_t*>(buf), n, off);
}

namespace {
// Where a write() at the descriptor's offset goes: the end for O_APPEND (a spill file's
// end is known here: its last unit may still be in memory), else the offset.
off_t write_position(FileCtx* c, int fd) {
    return !c->append                     ? real().lseek(fd, 0, SEEK_CUR)
           : c->cls == FileClass::Spill ? off_t(c->known_size.load())
                                        : off_t(file_size(fd));
}
}  // namespace

ssize_t op_read(int fd, void* buf, size_t n) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().read(fd, buf, n);
    off_t cur = real().lseek(fd, 0, SEEK_CUR);
    if (cur < 0) return -1;
    ssize_t r = enc_pread(c, fd, static_cast<uint8_t*>(buf), n, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

ssize_t op_write(int fd, const void* buf, size_t n) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().write(fd, buf, n);
    off_t cur = write_position(c, fd);
    if (cur < 0) return -1;
    ssize_t r = enc_pwrite(c, fd, static_cast<const uint8_t*>(buf), n, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

// off < 0: readv/writev (and preadv2/pwritev2 with -1), at the descriptor's offset.
ssize_t op_preadv(int fd, const struct iovec* iov, int cnt, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return off < 0 ? real().readv(fd, iov, cnt) : real().preadv(fd, iov, cnt, off);
    if (off >= 0) return enc_preadv(c, fd, iov, cnt, off);
    off_t cur = real().lseek(fd, 0, SEEK_CUR);
    if (cur < 0) return -1;
    ssize_t r = enc_preadv(c, fd, iov, cnt, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

ssize_t op_pwritev(int fd, const struct iovec* iov, int cnt, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return off < 0 ? real().writev(fd, iov, cnt) : real().pwritev(fd, iov, cnt, off);
    if (off >= 0) return enc_pwritev(c, fd, iov, cnt, off);
    off_t cur = write_position(c, fd);
    if (cur < 0) return -1;
    ssize_t r = enc_pwritev(c, fd, iov, cnt, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

int op_ftruncate(int fd, off_t len) {
    FileCtx* c = ctx_get(fd);
    std::optional<FileLock> flk;
    if (c) flk.emplace(fd, c->cls, true);  // the re-encrypted end and the new size, at once
    if (c && c->cls == FileClass::Spill && spill_flush(c, true) != 0) return -1;
    if (c && enc_resize(c, fd, len) != 0) return -1;
    return real().ftruncate(fd, len);
}

int op_truncate(const char* path, off_t len) {
    std::optional<Resolved> r = tl_in_layer ? std::nullopt : resolve(AT_FDCWD, path);
    if (refuse_source_write(r, "truncate")) return -1;
    if (!r || !is_encrypted(r->cls) || !ensure_active()) return real().truncate(path, len);
    if (len == 0) return real().truncate(path, 0);  // nothing of the old content remains
    int fd = op_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return -1;
    int rc = op_ftruncate(fd, len);
    int saved = errno;
    op_close(fd);
    errno = saved;
    return rc;
}

int op_fallocate(int fd, int mode, off_t off, off_t len, bool posix) {
    FileCtx* c = ctx_get(fd);
    if (c && c->cls == FileClass::Spill && spill_flush(c, true) != 0) return posix ? errno : -1;
    if (c && (posix || mode == 0)) {
        int64_t size = file_size(fd);
        if (size >= 0 && off + len > size && enc_resize(c, fd, off + len) != 0)
            return posix ? errno : -1;
    }
    return posix ? real().posix_fallocate(fd, off, len) : real().fallocate(fd, mode, off, len);
}

ssize_t op_copy_file_range(int fdin, off_t* offin, int fdout, off_t* offout, size_t len, unsigned flags) {
    if (!ctx_get(fdin) && !ctx_get(fdout))
        return real().copy_file_range(fdin, offin, fdout, offout, len, flags);
    // Each side has its own key: copy through the layer (decrypt, re-encrypt).
    std::vector<uint8_t> b(std::min<size_t>(len, kChunk));
    size_t done = 0;
    while (done < len) {
        size_t want = std::min(len - done, b.size());
        ssize_t r = offin ? op_pread(fdin, b.data(), want, *offin) : op_read(fdin, b.data(), want);
        if (r < 0) return done ? ssize_t(done) : -1;
        if (r == 0) break;
        ssize_t w = offout ? op_pwrite(fdout, b.data(), size_t(r), *offout) : op_write(fdout, b.data(), size_t(r));
        if (w < 0) return done ? ssize_t(done) : -1;
        if (offin) *offin += r;
        if (offout) *offout += w;
        done += size_t(w);
        if (w < r) break;
    }
    std::fill(b.begin(), b.end(), 0);
    return ssize_t(done);
}

int op_unlinkat(int dirfd, const char* path, int flags) {
    std::optional<Resolved> r;
    if (!tl_in_layer) r = resolve(dirfd, path);
    if (refuse_source_write(r, "remove")) return -1;
    if (flags & AT_REMOVEDIR) r.reset();
    int rc = real().unlinkat(dirfd, path, flags);
    if (rc != 0 || !r || !is_durable(r->cls) || r->wal_target || !ensure_active()) return rc;
    int saved = errno;
    try {
        remove_key(r->rel);  // crypto-shredding: the segment's key is gone
    } catch (const std::exception& e) {
        log_line("could not remove the key of \"" + r->rel + "\": " + e.what());
    }
    errno = saved;
    return rc;
}

namespace {
// The key a file at `rel` (class cls, inode of sb) is encrypted under now.
// Null without a key: the file's zeros read the same in every encoding.
std::shared_ptr<FileKey> current_key(const Resolved& r, const struct stat& sb, const std::string& abs, bool* missing) {
    *missing = false;
    if (is_ephemeral(r.cls)) return ephemeral_key(sb.st_dev, sb.st_ino);
    if (auto k = lookup_file_key(r.rel, nullptr)) return k;
    *missing = sb.st_size > 0 && sys::file_all_zero(abs.c_str()) != 1;
    return nullptr;
}
}  // namespace

namespace {

// Clears the first unit of a file (durably): a recycled WAL segment from before the WAL
// key scheme then reads as the end of WAL, as its stale contents would.
int clear_first_unit(const std::string& abs) {
    int fd = sys::open(abs.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    std::vector<uint8_t> z(U, 0);
    int rc = file_size(fd) >= int64_t(U) && (sys::pwrite_full(fd, z.data(), U, 0) < 0 || ::fdatasync(fd) != 0) ? -1 : 0;
    int saved = errno;
    sys::close(fd);
    errno = saved;
    return rc;
}

// A rename inside pg_wal (docs/backups.md, "The WAL key scheme"). Segment names have
// derived keys: a recycled segment (A -> B) keeps its stale bytes, which B's key reads
// as garbage, the end of WAL to PostgreSQL as stale WAL is; a restored RECOVERYXLOG
// renamed to the segment it is needs nothing. A file with a key-map entry (xlogtemp.N,
// or a segment from before the scheme) is rewritten under the derived key of its new
// name (zero units cost a read), or, recycled, has its first page cleared. Returns 1
// when the generic path must handle the rename (a key-map key that follows its file).
template <class F>
int rename_wal(const Resolved& rf, const Resolved& rt, FileClass ct, const std::string& abs, F do_rename) {
    std::string to_seg = wal_segment_of(rt.rel);
    std::optional<SecureBytes> entry = lookup_key(rf.rel);
    if (entry) {
        std::string from_seg = wal_segment_of(rf.rel);
        if (to_seg.empty() || from_seg == to_seg) return 1;  // X -> X.partial: the entry follows
        if (!from_seg.empty()) {
            if (clear_first_unit(abs) != 0) return -1;
        } else if (transcode(abs, std::make_shared<FileKey>(*entry), wal_key(to_seg)) != 0) {
            return -1;
        }
    } else {
        std::string id = wal_identity(rf.rel);
        if (to_seg.empty()) {
            if (id.empty()) return 1;  // no key at all: the generic path refuses or moves nothing
            auto dst = std::make_shared<FileKey>(create_key(rt.rel, ct));
            if (transcode(abs, wal_key(id), dst) != 0) return -1;
        } else if (!id.empty() && wal_segment_of(rf.rel).empty() && wal_key_id(id) != wal_key_id(to_seg)) {
            // RECOVERYXLOG kept under another segment's name: its bytes keep their meaning.
            if (transcode(abs, wal_key(id), wal_key(to_seg)) != 0) return -1;
        }
    }
    int rc = do_rename();
    int saved = errno;
    if (rc == 0) {
        if (entry) remove_key(rf.rel);
        if (!to_seg.empty()) remove_key(rt.rel);  // a stale entry of the name the file takes
    }
    errno = saved;
    return rc;
}

}  // namespace

int op_renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned flags) {
    auto do_rename = [&] { return real().renameat2(olddirfd, from, newdirfd, to, flags); };
    if (tl_in_layer) return do_rename();
    std::optional<Resolved> rf = resolve(olddirfd, from), rt = resolve(newdirfd, to);
    if (refuse_source_write(rf, "rename") || refuse_source_write(rt, "rename a file to")) return -1;
    FileClass cf = rf ? rf->cls : FileClass::Plaintext;
    FileClass ct = rt ? rt->cls : FileClass::Plaintext;
    struct stat sb;
    bool have = ::fstatat(olddirfd, from, &sb, AT_SYMLINK_NOFOLLOW) == 0;
    bool is_dir = have && S_ISDIR(sb.st_mode);
    if ((!is_encrypted(cf) && !is_encrypted(ct) && !is_dir) || !have || !(rf || rt) || !ensure_active())
        return do_rename();
    try {
        KeyMap& km = keymap();
        if (is_dir) {
            // Durable keys below a renamed directory follow it.
            int rc = do_rename();
            if (rc != 0 || !rf || !rt) return rc;
            int saved = errno;
            km.refresh();
            std::string pf = rf->rel + "/";
            for (const std::string& id : km.identities())
                if (id.compare(0, pf.size(), pf) == 0) {
                    std::string nid = rt->rel + "/" + id.substr(pf.size());
                    move_key(id, nid, classify_relative(nid), false);
                }
            errno = saved;
            return 0;
        }
        if (!S_ISREG(sb.st_mode)) return do_rename();
        if ((rf && rf->wal_target) || (rt && rt->wal_target)) {
            // pg_receivewal: X.partial -> X keeps its identity; nothing else is allowed.
            if (rf && rt && rf->wal_target && rt->wal_target &&
                wal_key_id(wal_segment_of(rf->rel)) == wal_key_id(wal_segment_of(rt->rel)))
                return do_rename();
            log_line(std::string("refusing to rename \"") + from + "\" to \"" + to +
                     "\": a received WAL segment keeps its name");
            errno = EXDEV;
            return -1;
        }
        if (cf == FileClass::Wal && ct == FileClass::Wal) {
            int rc = rename_wal(*rf, *rt, ct, absolute_of(olddirfd, from), do_rename);
            if (rc != 1) return rc;
        }
        if (is_durable(cf) && is_durable(ct)) {
            if (!has_key(rf->rel)) {
                int rc = do_rename();
                if (rc == 0) remove_key(rt->rel);  // the new file has no key: drop any stale one
                return rc;
            }
            move_key(rf->rel, rt->rel, ct, true);
            int rc = do_rename();
            int saved = errno;
            if (rc == 0) remove_key(rf->rel);
            errno = saved;
            return rc;
        }
        if (is_ephemeral(cf) && is_ephemeral(ct)) return do_rename();  // key follows the inode
        // The class changes (e.g. pg_wal/xlogtemp.N -> 00000002.history, read by
        // PostgreSQL through stdio): rewrite the contents in the new encoding first.
        bool missing = false;
        std::shared_ptr<FileKey> src;
        if (is_encrypted(cf)) {
            src = current_key(*rf, sb, absolute_of(olddirfd, from), &missing);
            if (missing) {
                log_line("no data encryption key for \"" + rf->rel + "\"");
                errno = EIO;
                return -1;
            }
        }
        std::shared_ptr<FileKey> dst;
        if (is_durable(ct)) {
            dst = std::make_shared<FileKey>(create_key(rt->rel, ct));
        } else if (is_ephemeral(ct)) {
            dst = ephemeral_key(sb.st_dev, sb.st_ino);
        }
        std::string abs = absolute_of(olddirfd, from);
        if ((src || dst) && transcode(abs, src, dst) != 0) return -1;
        int rc = do_rename();
        int saved = errno;
        if (rc == 0) {
            if (is_durable(cf)) remove_key(rf->rel);
            if (!is_durable(ct) && rt) remove_key(rt->rel);
        }
        errno = saved;
        return rc;
    } catch (const std::exception& e) {
        log_line(std::string("rename of \"") + from + "\" failed: " + e.what());
        errno = EIO;
        return -1;
    }
}

int op_linkat(int olddirfd, const char* from, int newdirfd, const char* to, int flags) {
    if (tl_in_layer) return real().linkat(olddirfd, from, newdirfd, to, flags);
    std::optional<Resolved> rf = resolve(olddirfd, from), rt = resolve(newdirfd, to);
    if (refuse_source_write(rf, "link") || refuse_source_write(rt, "link a file to")) return -1;
    FileClass cf = rf ? rf->cls : FileClass::Plaintext;
    FileClass ct = rt ? rt->cls : FileClass::Plaintext;
    if ((!is_encrypted(cf) && !is_encrypted(ct)) || !ensure_active())
        return real().linkat(olddirfd, from, newdirfd, to, flags);
    if (is_ephemeral(cf) && is_ephemeral(ct)) return real().linkat(olddirfd, from, newdirfd, to, flags);
    if (!(is_durable(cf) && is_durable(ct))) {
        errno = EXDEV;  // one inode cannot hold two encodings; callers fall back to copying
        return -1;
    }
    if ((rf && rf->wal_target) || (rt && rt->wal_target)) {
        errno = EXDEV;  // one inode, one identity
        return -1;
    }
    try {
        if (cf == FileClass::Wal && !lookup_key(rf->rel)) {
            // A derived WAL key belongs to one segment name: one inode, one key.
            std::string id = wal_identity(rf->rel);
            if (id.empty() || wal_key_id(id) == wal_key_id(wal_segment_of(rt->rel)))
                return real().linkat(olddirfd, from, newdirfd, to, flags);
            errno = EXDEV;
            return -1;
        }
        if (!has_key(rf->rel)) return real().linkat(olddirfd, from, newdirfd, to, flags);
        move_key(rf->rel, rt->rel, ct, true);
        int rc = real().linkat(olddirfd, from, newdirfd, to, flags);
        int saved = errno;
        if (rc != 0) remove_key(rt->rel);
        errno = saved;
        return rc;
    } catch (const std::exception& e) {
        log_line(std::string("link of \"") + from + "\" failed: " + e.what());
        errno = EIO;
        return -1;
    }
}


}  // namespace cmk::fs::detail
