// Internal interface of the encrypting file layer: the C library's own entry points
// (Real), the layer's operations that the interposers and GOT hooks call (op_*), and
// the GOT installer. Not installed; used only by src/fs/*.cpp.
#pragma once

#include <fcntl.h>
#include <sys/types.h>
#include <sys/uio.h>

#include <string>

namespace cmk::fs::detail {

// The C library's functions, resolved in libc itself (never in ourselves).
struct Real {
    int (*open)(const char*, int, ...);
    int (*openat)(int, const char*, int, ...);
    int (*close)(int);
    ssize_t (*read)(int, void*, size_t);
    ssize_t (*write)(int, const void*, size_t);
    ssize_t (*pread)(int, void*, size_t, off_t);
    ssize_t (*pwrite)(int, const void*, size_t, off_t);
    ssize_t (*readv)(int, const struct iovec*, int);
    ssize_t (*writev)(int, const struct iovec*, int);
    ssize_t (*preadv)(int, const struct iovec*, int, off_t);
    ssize_t (*pwritev)(int, const struct iovec*, int, off_t);
    ssize_t (*preadv2)(int, const struct iovec*, int, off_t, int);
    ssize_t (*pwritev2)(int, const struct iovec*, int, off_t, int);
    int (*renameat2)(int, const char*, int, const char*, unsigned);
    int (*rename)(const char*, const char*);
    int (*linkat)(int, const char*, int, const char*, int);
    int (*unlinkat)(int, const char*, int);
    int (*unlink)(const char*);
    int (*truncate)(const char*, off_t);
    int (*ftruncate)(int, off_t);
    int (*fallocate)(int, int, off_t, off_t);
    int (*posix_fallocate)(int, off_t, off_t);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    void* (*mmap)(void*, size_t, int, int, int, off_t);
    ssize_t (*copy_file_range)(int, off_t*, int, off_t*, size_t, unsigned);
    off_t (*lseek)(int, off_t, int);
};
const Real& real();

// The layer's operations. Each behaves like the libc call it replaces (return value,
// errno) and never throws.
int op_openat(int dirfd, const char* path, int flags, mode_t mode);
int op_close(int fd);
ssize_t op_read(int fd, void* buf, size_t n);
ssize_t op_write(int fd, const void* buf, size_t n);
ssize_t op_pread(int fd, void* buf, size_t n, off_t off);
ssize_t op_pwrite(int fd, const void* buf, size_t n, off_t off);
// off < 0: at (and advancing) the file offset, as readv/writev.
ssize_t op_preadv(int fd, const struct iovec* iov, int cnt, off_t off);
ssize_t op_pwritev(int fd, const struct iovec* iov, int cnt, off_t off);
int op_renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned flags);
int op_linkat(int olddirfd, const char* from, int newdirfd, const char* to, int flags);
int op_unlinkat(int dirfd, const char* path, int flags);
int op_truncate(const char* path, off_t len);
int op_ftruncate(int fd, off_t len);
// posix: returns an error number like posix_fallocate(); else -1/errno like fallocate().
int op_fallocate(int fd, int mode, off_t off, off_t len, bool posix);
void op_dup(int oldfd, int newfd);  // after a successful dup*/F_DUPFD: share the state
bool op_is_encrypted_fd(int fd);
ssize_t op_copy_file_range(int fdin, off_t* offin, int fdout, off_t* offout, size_t len,
                           unsigned flags);

// Installs the hooks over the main executable's GOT. Throws LayerError.
void install_got();

// One line to stderr, prefixed "cmk_lakebase: " (reaches the server log).
void log_line(const std::string& msg);

}  // namespace cmk::fs::detail
