// Shared helpers of the libFuzzer targets (fuzz/*.cpp, built by `make fuzz`): a
// private scratch directory per process for the parsers that read files, and the rule
// every target follows: the project's exceptions are a clean rejection; only crashes,
// sanitizer reports, timeouts and running out of memory count.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <system_error>
#include <string>

namespace cmk_fuzz {

// One directory (0700) per fuzzing process under $TMPDIR, holding only the last
// input; removed at a normal exit (a crash leaves it, with the input that crashed).
inline const std::string& scratch_dir() {
    static const std::string dir = [] {
        const char* tmp = std::getenv("TMPDIR");
        std::string t = std::string(tmp && *tmp ? tmp : "/tmp") + "/cmk_fuzz.XXXXXX";
        if (!::mkdtemp(&t[0])) std::abort();
        ::chmod(t.c_str(), 0700);
        return t;
    }();
    static const bool cleanup = [] {
        std::atexit([] {
            std::error_code ec;
            std::filesystem::remove_all(dir, ec);
        });
        return true;
    }();
    (void)cleanup;
    return dir;
}

// Writes the input as <dir>/<name> with the given mode (the loaders check modes).
inline void write_file(const std::string& path, const uint8_t* data, size_t size, mode_t mode = 0600) {
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0) std::abort();
    size_t off = 0;
    while (off < size) {
        ssize_t w = ::write(fd, data + off, size - off);
        if (w <= 0) std::abort();
        off += size_t(w);
    }
    ::fchmod(fd, mode);
    ::close(fd);
}

}  // namespace cmk_fuzz
