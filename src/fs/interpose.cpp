// The layer's entry points under the C library's own names. Preloaded (LD_PRELOAD)
// they replace libc's for the whole process; in the server the same functions are
// written into the postgres executable's GOT slots (got.cpp). Each one only forwards
// to an op_* of file_ops.cpp, keeping errno semantics; none throws.
#include <fcntl.h>
#include <stdio.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "layer_internal.hpp"

using namespace cmk::fs::detail;

namespace {

mode_t mode_arg(int flags, va_list ap) {
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? mode_t(va_arg(ap, int)) : 0;
}

}  // namespace

#define CMK_EXPORT extern "C" __attribute__((visibility("default")))

CMK_EXPORT int open(const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return op_openat(AT_FDCWD, path, flags, m);
}

CMK_EXPORT int open64(const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return op_openat(AT_FDCWD, path, flags, m);
}

CMK_EXPORT int openat(int dirfd, const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return op_openat(dirfd, path, flags, m);
}

CMK_EXPORT int openat64(int dirfd, const char* path, int flags, ...) {
    va_list ap;
    va_start(ap, flags);
    mode_t m = mode_arg(flags, ap);
    va_end(ap);
    return op_openat(dirfd, path, flags, m);
}

// _FORTIFY_SOURCE variants (open without O_CREAT).
CMK_EXPORT int __open_2(const char* path, int flags) { return op_openat(AT_FDCWD, path, flags, 0); }
CMK_EXPORT int __open64_2(const char* path, int flags) { return op_openat(AT_FDCWD, path, flags, 0); }
CMK_EXPORT int __openat_2(int dirfd, const char* path, int flags) { return op_openat(dirfd, path, flags, 0); }
CMK_EXPORT int __openat64_2(int dirfd, const char* path, int flags) { return op_openat(dirfd, path, flags, 0); }

// pg_basebackup writes the files it extracts with fopen/fwrite, the server its
// AllocateFile files (stdio.cpp).
CMK_EXPORT FILE* fopen(const char* path, const char* mode) { return op_fopen(path, mode); }
CMK_EXPORT FILE* fopen64(const char* path, const char* mode) { return op_fopen(path, mode); }
CMK_EXPORT int fileno(FILE* f) { return op_fileno(f); }

CMK_EXPORT int creat(const char* path, mode_t mode) {
    return op_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}
CMK_EXPORT int creat64(const char* path, mode_t mode) {
    return op_openat(AT_FDCWD, path, O_CREAT | O_WRONLY | O_TRUNC, mode);
}

CMK_EXPORT int close(int fd) { return op_close(fd); }

CMK_EXPORT ssize_t read(int fd, void* buf, size_t n) { return op_read(fd, buf, n); }
CMK_EXPORT ssize_t __read_chk(int fd, void* buf, size_t n, size_t buflen) {
    if (n > buflen) std::abort();  // what glibc's __chk_fail does
    return op_read(fd, buf, n);
}
CMK_EXPORT ssize_t write(int fd, const void* buf, size_t n) { return op_write(fd, buf, n); }

CMK_EXPORT ssize_t pread(int fd, void* buf, size_t n, off_t off) { return op_pread(fd, buf, n, off); }
CMK_EXPORT ssize_t pread64(int fd, void* buf, size_t n, off_t off) { return op_pread(fd, buf, n, off); }
CMK_EXPORT ssize_t __pread_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) {
    if (n > buflen) std::abort();
    return op_pread(fd, buf, n, off);
}
CMK_EXPORT ssize_t __pread64_chk(int fd, void* buf, size_t n, off_t off, size_t buflen) {
    if (n > buflen) std::abort();
    return op_pread(fd, buf, n, off);
}
CMK_EXPORT ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) { return op_pwrite(fd, buf, n, off); }
CMK_EXPORT ssize_t pwrite64(int fd, const void* buf, size_t n, off_t off) {
    return op_pwrite(fd, buf, n, off);
}

CMK_EXPORT ssize_t readv(int fd, const struct iovec* iov, int cnt) { return op_preadv(fd, iov, cnt, -1); }
CMK_EXPORT ssize_t writev(int fd, const struct iovec* iov, int cnt) { return op_pwritev(fd, iov, cnt, -1); }
CMK_EXPORT ssize_t preadv(int fd, const struct iovec* iov, int cnt, off_t off) {
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    return op_preadv(fd, iov, cnt, off);
}
CMK_EXPORT ssize_t preadv64(int fd, const struct iovec* iov, int cnt, off_t off) { return preadv(fd, iov, cnt, off); }
CMK_EXPORT ssize_t pwritev(int fd, const struct iovec* iov, int cnt, off_t off) {
    if (off < 0) {
        errno = EINVAL;
        return -1;
    }
    return op_pwritev(fd, iov, cnt, off);
}
CMK_EXPORT ssize_t pwritev64(int fd, const struct iovec* iov, int cnt, off_t off) {
    return pwritev(fd, iov, cnt, off);
}
CMK_EXPORT ssize_t preadv2(int fd, const struct iovec* iov, int cnt, off_t off, int flags) {
    if (!op_is_encrypted_fd(fd)) return real().preadv2(fd, iov, cnt, off, flags);
    return op_preadv(fd, iov, cnt, off);  // off == -1: current offset, as preadv2 says
}
CMK_EXPORT ssize_t pwritev2(int fd, const struct iovec* iov, int cnt, off_t off, int flags) {
    if (!op_is_encrypted_fd(fd)) return real().pwritev2(fd, iov, cnt, off, flags);
    return op_pwritev(fd, iov, cnt, off);
}

CMK_EXPORT int rename(const char* from, const char* to) {
    return op_renameat2(AT_FDCWD, from, AT_FDCWD, to, 0);
}
CMK_EXPORT int renameat(int olddirfd, const char* from, int newdirfd, const char* to) {
    return op_renameat2(olddirfd, from, newdirfd, to, 0);
}
CMK_EXPORT int renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned flags) {
    return op_renameat2(olddirfd, from, newdirfd, to, flags);
}
CMK_EXPORT int link(const char* from, const char* to) { return op_linkat(AT_FDCWD, from, AT_FDCWD, to, 0); }
CMK_EXPORT int linkat(int olddirfd, const char* from, int newdirfd, const char* to, int flags) {
    return op_linkat(olddirfd, from, newdirfd, to, flags);
}
CMK_EXPORT int unlink(const char* path) { return op_unlinkat(AT_FDCWD, path, 0); }
CMK_EXPORT int unlinkat(int dirfd, const char* path, int flags) { return op_unlinkat(dirfd, path, flags); }

// Not file I/O, but the layer resolves relative paths against the working directory
// and a server keeps it (paths.cpp, absolute_of).
CMK_EXPORT int chdir(const char* path) {
    int r = real().chdir(path);
    int e = errno;
    note_cwd_change();
    errno = e;
    return r;
}
CMK_EXPORT int fchdir(int fd) {
    int r = real().fchdir(fd);
    int e = errno;
    note_cwd_change();
    errno = e;
    return r;
}

CMK_EXPORT int truncate(const char* path, off_t len) { return op_truncate(path, len); }
CMK_EXPORT int truncate64(const char* path, off_t len) { return op_truncate(path, len); }
CMK_EXPORT int ftruncate(int fd, off_t len) { return op_ftruncate(fd, len); }
CMK_EXPORT int ftruncate64(int fd, off_t len) { return op_ftruncate(fd, len); }
CMK_EXPORT int fallocate(int fd, int mode, off_t off, off_t len) { return op_fallocate(fd, mode, off, len, false); }
CMK_EXPORT int fallocate64(int fd, int mode, off_t off, off_t len) {
    return op_fallocate(fd, mode, off, len, false);
}
CMK_EXPORT int posix_fallocate(int fd, off_t off, off_t len) { return op_fallocate(fd, 0, off, len, true); }
CMK_EXPORT int posix_fallocate64(int fd, off_t off, off_t len) { return op_fallocate(fd, 0, off, len, true); }

CMK_EXPORT ssize_t copy_file_range(int fdin, off_t* offin, int fdout, off_t* offout, size_t len,
                                   unsigned flags) {
    return op_copy_file_range(fdin, offin, fdout, offout, len, flags);
}

CMK_EXPORT int dup(int fd) {
    int nfd = real().dup(fd);
    if (nfd >= 0) op_dup(fd, nfd);
    return nfd;
}
CMK_EXPORT int dup2(int fd, int nfd) {
    int r = real().dup2(fd, nfd);
    if (r >= 0) op_dup(fd, r);
    return r;
}
CMK_EXPORT int dup3(int fd, int nfd, int flags) {
    int r = real().dup3(fd, nfd, flags);
    if (r >= 0) op_dup(fd, r);
    return r;
}

CMK_EXPORT int fcntl(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void* arg = va_arg(ap, void*);
    va_end(ap);
    int r = real().fcntl(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) op_dup(fd, r);
    return r;
}
CMK_EXPORT int fcntl64(int fd, int cmd, ...) {
    va_list ap;
    va_start(ap, cmd);
    void* arg = va_arg(ap, void*);
    va_end(ap);
    int r = real().fcntl(fd, cmd, arg);
    if (r >= 0 && (cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC)) op_dup(fd, r);
    return r;
}

// Mapping an encrypted file would expose its ciphertext as if it were data.
CMK_EXPORT void* mmap(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
    if (fd >= 0 && op_is_encrypted_fd(fd)) {
        errno = ENODEV;
        return MAP_FAILED;
    }
    return real().mmap(addr, len, prot, flags, fd, off);
}
CMK_EXPORT void* mmap64(void* addr, size_t len, int prot, int flags, int fd, off_t off) {
    return mmap(addr, len, prot, flags, fd, off);
}
