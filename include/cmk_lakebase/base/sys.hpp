// The C library's own file calls, bypassing the encrypting file layer. Code that runs
// inside the layer's process (key map, keyring, providers, the layer itself) uses
// these for its own files, so that it never re-enters the layer while holding a lock,
// whether the layer is preloaded (LD_PRELOAD) or installed over the executable's GOT.
#pragma once

#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <string>

namespace cmk::sys {

int open(const char* path, int flags, mode_t mode = 0);
int close(int fd);
ssize_t read(int fd, void* buf, size_t n);
ssize_t write(int fd, const void* buf, size_t n);
ssize_t pread(int fd, void* buf, size_t n, off_t off);
ssize_t pwrite(int fd, const void* buf, size_t n, off_t off);
int rename(const char* from, const char* to);
int unlink(const char* path);
int ftruncate(int fd, off_t len);

// Whole-buffer helpers: loop over short transfers and EINTR; -1 with errno on error.
ssize_t pread_full(int fd, void* buf, size_t n, off_t off);
ssize_t pwrite_full(int fd, const void* buf, size_t n, off_t off);
int write_full(int fd, const void* buf, size_t n);

// Whether every byte of the open file is zero (holes skipped with SEEK_DATA, data read
// in 64 KiB pieces: bounded memory, time linear in the allocated size). 1 yes, 0 no,
// -1 with errno when it cannot be read. A durable file without a data encryption key
// is consistent exactly when this holds (docs/how-it-works.md, "Keys of new files").
int file_all_zero(int fd);
int file_all_zero(const char* path);

// Whether a process with this pid exists (kill(pid, 0); EPERM counts as existing: it
// belongs to another user). Leaves errno as it was.
bool process_exists(pid_t pid);

// fsync() of a directory (after a rename or create in it).
int fsync_dir(const char* dir);

// Atomic durable replace: write tmp, fsync, rename over path, fsync directory.
// Throws std::runtime_error with errno text on failure.
void write_file_atomic(const char* path, const void* data, size_t n, mode_t mode);
// Reads a whole regular file of at most max_bytes; throws std::runtime_error (message
// names the path) for anything else: a FIFO or device (never blocks on one), a
// directory, a file past the limit.
constexpr size_t kReadFileMax = size_t(64) << 20;
std::string read_file(const char* path, size_t max_bytes = kReadFileMax);

// The major version a data directory's PG_VERSION names ("15"), "" if it cannot be
// read.
std::string data_directory_major(const std::string& datadir);

}  // namespace cmk::sys

namespace cmk {
// The current UTC time as 2026-12-05T12:00:00Z (timestamps in key files).
std::string now_iso8601();
}  // namespace cmk
