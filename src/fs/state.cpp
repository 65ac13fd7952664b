// The layer's process-wide state and its two lowest tools: the C library's own file
// functions (real(), resolved in libc itself so that the layer never calls itself) and
// the one-line log (log_line, to stderr: the server log). Every other file of the layer
// builds on these (layer_internal.hpp holds the State they share).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "layer_internal.hpp"

namespace cmk::fs::detail {

const Real& real() {
    static const Real r = [] {
        void* h = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        if (!h) h = dlopen("libc.so.6", RTLD_LAZY);
        auto sym = [h](const char* name) -> void* {
            void* p = h ? dlsym(h, name) : nullptr;
            if (!p) {
                const char msg[] = "cmk_lakebase: cannot resolve the C library's file functions\n";
                (void)!::syscall(1 /* SYS_write */, 2, msg, sizeof msg - 1);
                std::abort();
            }
            return p;
        };
        Real x{};
#define CMK_RESOLVE(field, name) x.field = reinterpret_cast<decltype(x.field)>(sym(name))
        CMK_RESOLVE(open, "open");
        CMK_RESOLVE(openat, "openat");
        CMK_RESOLVE(close, "close");
        CMK_RESOLVE(read, "read");
        CMK_RESOLVE(write, "write");
        CMK_RESOLVE(pread, "pread");
        CMK_RESOLVE(pwrite, "pwrite");
        CMK_RESOLVE(readv, "readv");
        CMK_RESOLVE(writev, "writev");
        CMK_RESOLVE(preadv, "preadv");
        CMK_RESOLVE(pwritev, "pwritev");
        CMK_RESOLVE(preadv2, "preadv2");
        CMK_RESOLVE(pwritev2, "pwritev2");
        CMK_RESOLVE(renameat2, "renameat2");
        CMK_RESOLVE(rename, "rename");
        CMK_RESOLVE(linkat, "linkat");
        CMK_RESOLVE(unlinkat, "unlinkat");
        CMK_RESOLVE(unlink, "unlink");
        CMK_RESOLVE(truncate, "truncate");
        CMK_RESOLVE(ftruncate, "ftruncate");
        CMK_RESOLVE(fallocate, "fallocate");
        CMK_RESOLVE(posix_fallocate, "posix_fallocate");
        CMK_RESOLVE(dup, "dup");
        CMK_RESOLVE(dup2, "dup2");
        CMK_RESOLVE(dup3, "dup3");
        CMK_RESOLVE(fcntl, "fcntl");
        CMK_RESOLVE(mmap, "mmap");
        CMK_RESOLVE(copy_file_range, "copy_file_range");
        CMK_RESOLVE(lseek, "lseek");
        CMK_RESOLVE(chdir, "chdir");
        CMK_RESOLVE(fchdir, "fchdir");
#undef CMK_RESOLVE
        return x;
    }();
    return r;
}

void log_line(const std::string& msg) {
    static const std::string prefix = "cmk_lakebase: ";
    std::string line = (msg.compare(0, prefix.size(), prefix) == 0 ? "" : prefix) + msg + "\n";
    (void)!real().write(2, line.data(), line.size());
}

State& st() {
    static State* s = new State();  // never destroyed: interposers run during exit
    return *s;
}

thread_local int tl_in_layer = 0;

}  // namespace cmk::fs::detail
