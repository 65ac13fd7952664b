// Path classification: where a path lies relative to the data directory (resolving
// tablespace links, directory descriptors and the data directory's real path) and so
// which file class (fileclass.hpp) it has. A path outside the data directory is none of
// the layer's business.
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <atomic>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <string>

#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

bool starts_with_dir(const std::string& s, const std::string& dir) {
    return !dir.empty() && s.size() > dir.size() && s.compare(0, dir.size(), dir) == 0 &&
           s[dir.size()] == '/';
}

}  // namespace

std::string real_path(const std::string& p) {
    char buf[PATH_MAX];
    if (::realpath(p.c_str(), buf)) return buf;
    return "";
}

void env_once() {
    State& s = st();
    std::call_once(s.env_once, [&s] {
        const char* d = ::getenv("CMK_LAKEBASE_PGDATA");
        if (d && *d == '/') s.env_datadir = normalize_path(d);
        const char* k = ::getenv("CMK_LAKEBASE_KEYRING_DIR");
        if (k && *k) s.env_keyring_dir = k;
        const char* w = ::getenv("CMK_LAKEBASE_WAL_TARGET");
        if (w && *w == '/') {
            s.env_wal_target = normalize_path(w);
            s.env_wal_target_real = real_path(s.env_wal_target);
        }
    });
}

namespace {

// The data directory paths are compared against, in any mode ("" if none).
const std::string& datadir_for_resolve() {
    State& s = st();
    if (s.mode.load(std::memory_order_acquire) != Mode::Off) return s.datadir;
    env_once();
    return s.env_datadir;
}

void refresh_tablespaces(const std::string& datadir) {
    State& s = st();
    std::string dir = datadir + "/pg_tblspc";
    struct stat sb;
    if (::stat(dir.c_str(), &sb) != 0) return;
    std::lock_guard<std::mutex> g(s.ts_mu);
    if (sb.st_mtim.tv_sec == s.ts_mtime.tv_sec && sb.st_mtim.tv_nsec == s.ts_mtime.tv_nsec &&
        !s.tablespaces.empty())
        return;
    s.ts_mtime = sb.st_mtim;
    s.tablespaces.clear();
    DIR* d = ::opendir(dir.c_str());
    if (!d) return;
    while (struct dirent* e = ::readdir(d)) {
        std::string name = e->d_name;
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::string target = real_path(dir + "/" + name);
        if (!target.empty()) s.tablespaces.emplace_back(target, name);
    }
    ::closedir(d);
}

}  // namespace

namespace {

// The working directory as this thread last read it, and the count of chdir()/fchdir()
// calls through the layer at that moment (note_cwd_change). Trusted only in a server
// (Mode::Got): PostgreSQL changes to its data directory before the layer is installed
// and never again, and the server's own and its modules' chdir slots are the layer's.
// Tools (preloaded) may change directory in ways the layer cannot see (glibc's nftw
// with FTW_CHDIR calls it internally): they ask every time.
std::atomic<uint64_t> g_cwd_changes{0};
struct CwdSeen {
    uint64_t changes = ~uint64_t(0);
    std::string dir;
};
thread_local CwdSeen tl_cwd;

bool read_cwd(std::string& out) {
    char buf[PATH_MAX];
    if (!::getcwd(buf, sizeof buf)) return false;
    out = buf;
    return true;
}

}  // namespace

void note_cwd_change() { g_cwd_changes.fetch_add(1, std::memory_order_acq_rel); }

std::string absolute_of(int dirfd, const char* path) {
    if (path[0] == '/') return normalize_path(path);
    std::string base;
    if (dirfd == AT_FDCWD) {
        if (st().mode.load(std::memory_order_acquire) == Mode::Got) {
            // Read the count before the directory: a change in between is seen next time.
            uint64_t n = g_cwd_changes.load(std::memory_order_acquire);
            if (tl_cwd.changes != n) {
                if (!read_cwd(tl_cwd.dir)) {
                    tl_cwd.changes = ~uint64_t(0);
                    return "";
                }
                tl_cwd.changes = n;
            }
            base = tl_cwd.dir;
        } else if (!read_cwd(base)) {
            return "";
        }
    } else {
        char link[64], buf[PATH_MAX];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = ::readlink(link, buf, sizeof buf - 1);
        if (n <= 0) return "";
        buf[n] = 0;
        base = buf;
    }
    return normalize_path(base + "/" + path);
}

namespace {

// A segment file directly inside the WAL target directory of pg_receivewal: the same
// identity as in pg_wal, so it is encrypted exactly as the segment is there (the same
// derived key, byte for byte the ciphertext archive_command would copy).
std::optional<Resolved> resolve_wal_target(const std::string& abs) {
    State& s = st();
    for (const std::string* dir : {&s.env_wal_target, &s.env_wal_target_real}) {
        if (dir->empty() || !starts_with_dir(abs, *dir)) continue;
        std::string name = abs.substr(dir->size() + 1);
        if (name.find('/') != std::string::npos) return std::nullopt;
        std::string rel = "pg_wal/" + name;
        if (wal_segment_of(rel).empty()) return std::nullopt;  // history files: plaintext, as in pg_wal
        return Resolved{rel, FileClass::Wal, true};
    }
    return std::nullopt;
}

}  // namespace

// Where a path lies relative to the data directory, and its class. nullopt: outside.
std::optional<Resolved> resolve(int dirfd, const char* path) {
    if (!path || !*path) return std::nullopt;
    const std::string& dd = datadir_for_resolve();
    if (dd.empty()) return std::nullopt;
    std::string abs = absolute_of(dirfd, path);
    if (abs.empty()) return std::nullopt;
    State& s = st();
    if (!s.env_wal_target.empty())
        if (auto r = resolve_wal_target(abs)) return r;
    if (auto r = resolve_source(abs)) return r;
    std::string rel;
    if (starts_with_dir(abs, dd)) {
        rel = abs.substr(dd.size() + 1);
    } else {
        if (s.datadir_real.empty() && s.mode.load() != Mode::Off) s.datadir_real = real_path(dd);
        const std::string& ddr = s.datadir_real;
        if (starts_with_dir(abs, ddr)) {
            rel = abs.substr(ddr.size() + 1);
        } else {
            // A tablespace reached by its own path (tools); the server itself always
            // goes through pg_tblspc/<oid>.
            for (int pass = 0; pass < 2 && rel.empty(); pass++) {
                if (pass == 1) refresh_tablespaces(dd);
                std::lock_guard<std::mutex> g(s.ts_mu);
                for (auto& [target, oid] : s.tablespaces)
                    if (starts_with_dir(abs, target)) {
                        rel = "pg_tblspc/" + oid + abs.substr(target.size());
                        break;
                    }
            }
            if (rel.empty()) return std::nullopt;
        }
    }
    return Resolved{rel, classify_relative(rel)};
}

}  // namespace cmk::fs::detail
