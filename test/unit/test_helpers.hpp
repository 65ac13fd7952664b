// Shared helpers for the GoogleTest units: per-test temporary directories, hex
// decoding and locating test/data next to the test binary.
#pragma once

#include <gtest/gtest.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace cmk_test {

inline std::vector<uint8_t> unhex(const std::string& h) {
    std::vector<uint8_t> out;
    auto val = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    for (size_t i = 0; i + 1 < h.size(); i += 2) {
        int a = val(h[i]), b = val(h[i + 1]);
        if (a < 0 || b < 0) throw std::runtime_error("bad hex in test data");
        out.push_back(static_cast<uint8_t>(a * 16 + b));
    }
    return out;
}

// Sets environment variables for one test and restores them after.
class EnvGuard {
public:
    void set(const char* name, const std::string& value) {
        save(name);
        ::setenv(name, value.c_str(), 1);
    }
    void unset(const char* name) {
        save(name);
        ::unsetenv(name);
    }
    ~EnvGuard() {
        for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
            if (it->second.first)
                ::setenv(it->first.c_str(), it->second.second.c_str(), 1);
            else
                ::unsetenv(it->first.c_str());
        }
    }

private:
    void save(const char* name) {
        const char* v = std::getenv(name);
        saved_.emplace_back(name, std::make_pair(v != nullptr, v ? std::string(v) : std::string()));
    }
    std::vector<std::pair<std::string, std::pair<bool, std::string>>> saved_;
};

// A private temporary directory, removed with everything in it at scope exit.
class TempDir {
public:
    TempDir() {
        char tmpl[] = "/tmp/cmk_unit_XXXXXX";
        char* p = mkdtemp(tmpl);
        if (!p) throw std::runtime_error("mkdtemp failed");
        path_ = p;
    }
    ~TempDir() {
        std::error_code ec;
        // Make everything removable again (tests chmod things away).
        std::filesystem::permissions(path_, std::filesystem::perms::owner_all,
                                     std::filesystem::perm_options::add, ec);
        std::filesystem::remove_all(path_, ec);
    }
    const std::string& path() const { return path_; }
    std::string sub(const std::string& name) const { return path_ + "/" + name; }

private:
    std::string path_;
};

inline std::string data_dir() {
    char buf[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n > 0) {
        buf[n] = 0;
        std::filesystem::path exe(buf);
        auto d = exe.parent_path().parent_path() / "test" / "data";
        if (std::filesystem::exists(d)) return d.string();
    }
    return "test/data";
}

inline std::string slurp(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

inline void spit(const std::string& path, const std::string& data) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << data;
}

inline mode_t file_mode(const std::string& path) {
    struct stat st;
    if (stat(path.c_str(), &st) != 0) return 0;
    return st.st_mode & 07777;
}

}  // namespace cmk_test
