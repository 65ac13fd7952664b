// The C library's own file calls, looked up once in libc itself so that neither an
// LD_PRELOADed layer nor a patched GOT can intercept them (see sys.hpp).
#include "cmk_lakebase/base/sys.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <ctime>
#include <algorithm>
#include <string>
#include <vector>

namespace cmk::sys {
namespace {

void* libc_sym(const char* name) {
    static void* handle = [] {
        void* h = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        if (!h) h = dlopen("libc.so.6", RTLD_LAZY);
        return h;
    }();
    void* p = handle ? dlsym(handle, name) : nullptr;
    if (!p) {
        // Without the C library's own entry points nothing below can work safely.
        const char msg[] = "cmk_lakebase: cannot resolve a C library file function\n";
        (void)!::write(2, msg, sizeof msg - 1);
        std::abort();
    }
    return p;
}

template <typename F>
F resolve(const char* name) {
    return reinterpret_cast<F>(libc_sym(name));
}

}  // namespace

int open(const char* path, int flags, mode_t mode) {
    static auto f = resolve<int (*)(const char*, int, ...)>("open");
    return f(path, flags, mode);
}
int close(int fd) {
    static auto f = resolve<int (*)(int)>("close");
    return f(fd);
}
ssize_t read(int fd, void* buf, size_t n) {
    static auto f = resolve<ssize_t (*)(int, void*, size_t)>("read");
    return f(fd, buf, n);
}
ssize_t write(int fd, const void* buf, size_t n) {
    static auto f = resolve<ssize_t (*)(int, const void*, size_t)>("write");
    return f(fd, buf, n);
}
ssize_t pread(int fd, void* buf, size_t n, off_t off) {
    static auto f = resolve<ssize_t (*)(int, void*, size_t, off_t)>("pread");
    return f(fd, buf, n, off);
}
ssize_t pwrite(int fd, const void* buf, size_t n, off_t off) {
    static auto f = resolve<ssize_t (*)(int, const void*, size_t, off_t)>("pwrite");
    return f(fd, buf, n, off);
}
int rename(const char* from, const char* to) {
    static auto f = resolve<int (*)(const char*, const char*)>("rename");
    return f(from, to);
}
int unlink(const char* path) {
    static auto f = resolve<int (*)(const char*)>("unlink");
    return f(path);
}
int ftruncate(int fd, off_t len) {
    static auto f = resolve<int (*)(int, off_t)>("ftruncate");
    return f(fd, len);
}

ssize_t pread_full(int fd, void* buf, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pread(fd, static_cast<char*>(buf) + done, n - done, off + done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        done += r;
    }
    return static_cast<ssize_t>(done);
}

int file_all_zero(int fd) {
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return -1;
    const off_t size = sb.st_size;
    std::vector<uint8_t> b(size_t(64) << 10);
    off_t pos = 0;
    while (pos < size) {
        off_t data = ::lseek(fd, pos, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) return 1;  // only a hole from here to the end
            if (errno != EINVAL) return -1;
            data = pos;  // no SEEK_DATA on this file system: read everything
        }
        if (data >= size) return 1;
        off_t hole = ::lseek(fd, data, SEEK_HOLE);
        if (hole < 0 || hole > size) hole = size;
        for (pos = data; pos < hole;) {
            size_t n = size_t(std::min<off_t>(off_t(b.size()), hole - pos));
            ssize_t r = pread_full(fd, b.data(), n, pos);
            if (r < 0) return -1;
            if (r == 0) return 1;  // shrunk meanwhile
            for (ssize_t i = 0; i < r; i++)
                if (b[size_t(i)]) return 0;
            pos += r;
        }
    }
    return 1;
}

int file_all_zero(const char* path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int r = file_all_zero(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return r;
}

ssize_t pwrite_full(int fd, const void* buf, size_t n, off_t off) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = pwrite(fd, static_cast<const char*>(buf) + done, n - done, off + done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) {
            errno = ENOSPC;
            return -1;
        }
        done += r;
    }
    return static_cast<ssize_t>(done);
}

int write_full(int fd, const void* buf, size_t n) {
    size_t done = 0;
    while (done < n) {
        ssize_t r = write(fd, static_cast<const char*>(buf) + done, n - done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) {
            errno = ENOSPC;
            return -1;
        }
        done += r;
    }
    return 0;
}

int fsync_dir(const char* dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = ::fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

namespace {
std::runtime_error sys_error(const std::string& what, const char* path) {
    return std::runtime_error(what + " \"" + path + "\": " + std::strerror(errno));
}
}  // namespace

void write_file_atomic(const char* path, const void* data, size_t n, mode_t mode) {
    std::string tmp = std::string(path) + ".tmp";
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) throw sys_error("could not create file", tmp.c_str());
    if (write_full(fd, data, n) != 0 || ::fsync(fd) != 0) {
        int saved = errno;
        close(fd);
        unlink(tmp.c_str());
        errno = saved;
        throw sys_error("could not write file", tmp.c_str());
    }
    close(fd);
    if (rename(tmp.c_str(), path) != 0) {
        int saved = errno;
        unlink(tmp.c_str());
        errno = saved;
        throw sys_error("could not rename file into place", path);
    }
    std::string dir(path);
    size_t slash = dir.rfind('/');
    dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : dir.substr(0, slash));
    if (fsync_dir(dir.c_str()) != 0) throw sys_error("could not fsync directory", dir.c_str());
}

std::string read_file(const char* path, size_t max_bytes) {
    // O_NONBLOCK: a FIFO must not hang the open (nor a server start or pg_cmk status);
    // only a regular file is read, and never more than max_bytes (a symlink to
    // /dev/zero would otherwise grow the process without end).
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw sys_error("could not open file", path);
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        throw sys_error("could not stat file", path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        throw std::runtime_error(std::string("could not read file \"") + path + "\": not a regular file");
    }
    auto too_large = [&] {
        close(fd);
        return std::runtime_error(std::string("could not read file \"") + path + "\": larger than " +
                                  std::to_string(max_bytes) + " bytes");
    };
    if (uint64_t(st.st_size) > max_bytes) throw too_large();
    std::string out;
    char buf[65536];
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0) {
            if (errno == EINTR) continue;
            int saved = errno;
            close(fd);
            errno = saved;
            throw sys_error("could not read file", path);
        }
        if (r == 0) break;
        if (out.size() + size_t(r) > max_bytes) throw too_large();
        out.append(buf, r);
    }
    close(fd);
    return out;
}

bool process_exists(pid_t pid) {
    int saved = errno;
    bool exists = ::kill(pid, 0) == 0 || errno == EPERM;
    errno = saved;
    return exists;
}

std::string data_directory_major(const std::string& datadir) {
    std::string v;
    try {
        v = read_file((datadir + "/PG_VERSION").c_str(), 64);
    } catch (const std::exception&) {
        return "";
    }
    while (!v.empty() && (v.back() == '\n' || v.back() == '\r' || v.back() == ' ')) v.pop_back();
    for (char ch : v)
        if (ch < '0' || ch > '9') return "";
    return v;
}

}  // namespace cmk::sys

namespace cmk {

std::string now_iso8601() {
    std::time_t t = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&t, &tm);
    char buf[32];
    std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
    return buf;
}

}  // namespace cmk
