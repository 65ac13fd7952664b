// Files opened through the C library's stdio (fopen): a tool that writes a data
// directory with fopen/fwrite (pg_basebackup's plain-format extractor) or reads one with
// fread would otherwise reach the kernel through libc's internal calls, past the
// layer, and write plaintext. An fopen of a path of an encrypted class opens the file
// through op_openat and wraps the descriptor in a stdio stream (fopencookie) whose
// reads and writes are op_pread/op_pwrite at the stream's own offset. Paths of other
// classes, and anything outside the data directory, get the C library's fopen.
// Preloaded tools reach this by the exported fopen; the server by the fopen slot of its
// executable's GOT (AllocateFile: pg_stat_statements' dump file) and of the modules it
// loads (modules.cpp). fileno() of such a stream is the descriptor under it (the C
// library's answer for a cookie stream would be -1): pg_stat_statements truncates
// through it.
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

// A stdio function of the C library itself (ours replace them, interpose.cpp).
template <typename Fn>
Fn libc_fn(const char* name) {
    void* h = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    void* p = h ? dlsym(h, name) : nullptr;
    if (!p) {
        log_line(std::string("cannot resolve the C library's ") + name);
        std::abort();
    }
    return reinterpret_cast<Fn>(p);
}

using FopenFn = FILE* (*)(const char*, const char*);
FopenFn real_fopen() {
    static const FopenFn f = libc_fn<FopenFn>("fopen");
    return f;
}

struct Stream {
    int fd;
    off64_t off;
    bool append;
    FILE* file = nullptr;
};

// The streams op_fopen made, and the descriptor under each (for fileno).
std::mutex g_streams_mu;
std::unordered_map<FILE*, int>& streams() {
    static auto* m = new std::unordered_map<FILE*, int>();  // never destroyed: used until exit
    return *m;
}

ssize_t stream_read(void* cookie, char* buf, size_t n) {
    auto* s = static_cast<Stream*>(cookie);
    ssize_t r = op_pread(s->fd, buf, n, s->off);
    if (r > 0) s->off += r;
    return r;
}

ssize_t stream_write(void* cookie, const char* buf, size_t n) {
    auto* s = static_cast<Stream*>(cookie);
    if (s->append) {
        struct stat sb;
        if (::fstat(s->fd, &sb) != 0) return 0;
        s->off = sb.st_size;
    }
    size_t done = 0;
    while (done < n) {
        ssize_t r = op_pwrite(s->fd, buf + done, n - done, s->off);
        if (r <= 0) break;
        s->off += r;
        done += size_t(r);
    }
    return ssize_t(done);  // short: stdio reports the error (errno from op_pwrite)
}

int stream_seek(void* cookie, off64_t* pos, int whence) {
    auto* s = static_cast<Stream*>(cookie);
    off64_t base = 0;
    if (whence == SEEK_CUR) {
        base = s->off;
    } else if (whence == SEEK_END) {
        struct stat sb;  // the layer keeps sizes: ciphertext is as long as the plaintext
        if (::fstat(s->fd, &sb) != 0) return -1;
        base = sb.st_size;
    } else if (whence != SEEK_SET) {
        errno = EINVAL;
        return -1;
    }
    if (*pos < 0 && base + *pos < 0) {
        errno = EINVAL;
        return -1;
    }
    s->off = base + *pos;
    *pos = s->off;
    return 0;
}

int stream_close(void* cookie) {
    auto* s = static_cast<Stream*>(cookie);
    if (s->file) {
        std::lock_guard<std::mutex> g(g_streams_mu);
        streams().erase(s->file);
    }
    int r = op_close(s->fd);
    delete s;
    return r;
}

// fopen's mode string as open(2) flags; -1 if it is not one.
int flags_of_mode(const char* mode) {
    int flags;
    switch (mode[0]) {
        case 'r': flags = 0; break;
        case 'w': flags = O_CREAT | O_TRUNC; break;
        case 'a': flags = O_CREAT | O_APPEND; break;
        default: return -1;
    }
    bool plus = false;
    for (const char* p = mode + 1; *p && *p != ','; p++) {
        if (*p == '+') plus = true;
        else if (*p == 'x') flags |= O_EXCL;
        else if (*p == 'e') flags |= O_CLOEXEC;
    }
    if (plus) flags |= O_RDWR;
    else if (mode[0] != 'r') flags |= O_WRONLY;
    return flags;
}

}  // namespace

FILE* op_fopen(const char* path, const char* mode) {
    std::optional<Resolved> r;
    if (!tl_in_layer && path && mode) r = resolve(AT_FDCWD, path);
    if (!r || !is_encrypted(r->cls) || !ensure_active()) return real_fopen()(path, mode);
    int flags = flags_of_mode(mode);
    if (flags < 0) {
        errno = EINVAL;
        return nullptr;
    }
    int fd = op_openat(AT_FDCWD, path, flags, 0666);
    if (fd < 0) return nullptr;
    if (!op_is_encrypted_fd(fd)) {  // not a regular file after all: a plain stream
        FILE* f = ::fdopen(fd, mode[0] == 'r' ? (std::strchr(mode, '+') ? "r+" : "r")
                                              : (std::strchr(mode, '+') ? "r+" : "w"));
        if (!f) real().close(fd);
        return f;
    }
    auto* s = new Stream{fd, 0, (flags & O_APPEND) != 0};
    cookie_io_functions_t io{stream_read, stream_write, stream_seek, stream_close};
    FILE* f = ::fopencookie(s, mode, io);
    if (!f) {
        int err = errno;
        op_close(fd);
        delete s;
        errno = err;
        return nullptr;
    }
    s->file = f;
    {
        std::lock_guard<std::mutex> g(g_streams_mu);
        streams()[f] = fd;
    }
    // Whole units per write where the caller writes sequentially: no read-modify-write.
    (void)::setvbuf(f, nullptr, _IOFBF, 16 * kUnitSize);
    return f;
}

int op_fileno(FILE* f) {
    if (f) {
        std::lock_guard<std::mutex> g(g_streams_mu);
        auto it = streams().find(f);
        if (it != streams().end()) return it->second;
    }
    using FilenoFn = int (*)(FILE*);
    static const FilenoFn real_fileno = libc_fn<FilenoFn>("fileno");
    return real_fileno(f);
}

}  // namespace cmk::fs::detail
