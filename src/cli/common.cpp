// Helpers shared by the pg_cmk commands: option parsing, path handling, and the
// environment that runs a stock PostgreSQL tool with the encrypting file layer
// preloaded (docs/CONTRACTS.md, "Layer environment").
#include <ftw.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cli.hpp"

extern char** environ;

#ifndef CMK_PG_BINDIR
#define CMK_PG_BINDIR "/usr/lib/postgresql/15/bin"
#endif
#ifndef CMK_PKGLIBDIR
#define CMK_PKGLIBDIR "/usr/lib/postgresql/15/lib"
#endif

namespace cmk::cli {

bool ParsedArgs::has(const std::string& name) const {
    for (const auto& o : options)
        if (o.first == name) return true;
    return false;
}

std::string ParsedArgs::get(const std::string& name, const std::string& def) const {
    std::string v = def;
    for (const auto& o : options)
        if (o.first == name) v = o.second;
    return v;
}

ParsedArgs parse_args(const std::string& command, const std::vector<std::string>& args,
                      const std::vector<OptSpec>& specs_in, bool stop_at_positional) {
    std::vector<OptSpec> specs = specs_in;
    specs.push_back({"help", '?', false});

    ParsedArgs out;
    for (size_t i = 0; i < args.size(); ++i) {
        const std::string& a = args[i];
        if (a == "--") {
            out.rest.assign(args.begin() + static_cast<long>(i) + 1, args.end());
            out.dash_dash = true;
            break;
        }
        if (a.size() > 2 && a.compare(0, 2, "--") == 0) {
            std::string name = a.substr(2);
            std::string value;
            bool has_eq = false;
            size_t eq = name.find('=');
            if (eq != std::string::npos) {
                value = name.substr(eq + 1);
                name.resize(eq);
                has_eq = true;
            }
            const OptSpec* spec = nullptr;
            for (const auto& s : specs)
                if (name == s.long_name) spec = &s;
            if (!spec) throw UsageError(command, "unrecognized option \"--" + name + "\"");
            if (spec->takes_value) {
                if (!has_eq) {
                    if (i + 1 >= args.size())
                        throw UsageError(command, "option \"--" + name + "\" requires a value");
                    value = args[++i];
                }
            } else if (has_eq) {
                throw UsageError(command, "option \"--" + name + "\" takes no value");
            }
            out.options.emplace_back(name, value);
            continue;
        }
        if (a.size() > 1 && a[0] == '-') {
            const OptSpec* spec = nullptr;
            for (const auto& s : specs)
                if (s.short_name != 0 && a[1] == s.short_name) spec = &s;
            if (!spec) throw UsageError(command, "unrecognized option \"" + a.substr(0, 2) + "\"");
            std::string value;
            if (spec->takes_value) {
                if (a.size() > 2) {
                    value = a.substr(2);
                } else {
                    if (i + 1 >= args.size())
                        throw UsageError(command, "option \"" + a + "\" requires a value");
                    value = args[++i];
                }
            } else if (a.size() > 2) {
                throw UsageError(command, "unrecognized option \"" + a + "\"");
            }
            out.options.emplace_back(spec->long_name, value);
            continue;
        }
        if (stop_at_positional) {
            out.rest.assign(args.begin() + static_cast<long>(i), args.end());
            break;
        }
        out.positional.push_back(a);
    }
    return out;
}

std::string current_dir() {
    std::vector<char> buf(PATH_MAX);
    for (;;) {
        if (getcwd(buf.data(), buf.size())) return std::string(buf.data());
        if (errno != ERANGE)
            throw CliError(std::string("cannot determine the current directory: ") + std::strerror(errno));
        buf.resize(buf.size() * 2);
    }
}

namespace {

// Lexical normalization of an absolute path: collapses "//", "/./" and "x/../".
std::string normalize_absolute(const std::string& p) {
    std::vector<std::string> parts;
    size_t i = 0;
    while (i < p.size()) {
        size_t j = p.find('/', i);
        if (j == std::string::npos) j = p.size();
        std::string c = p.substr(i, j - i);
        if (c == "..") {
            if (!parts.empty()) parts.pop_back();
        } else if (!c.empty() && c != ".") {
            parts.push_back(c);
        }
        i = j + 1;
    }
    std::string out;
    for (const auto& c : parts) out += "/" + c;
    return out.empty() ? "/" : out;
}

}  // namespace

std::string make_absolute(const std::string& p) {
    if (!p.empty() && p[0] == '/') return normalize_absolute(p);
    return normalize_absolute(current_dir() + "/" + p);
}

bool path_exists(const std::string& p) {
    struct stat st;
    return lstat(p.c_str(), &st) == 0;
}

bool is_directory(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::string parent_dir(const std::string& abs) {
    size_t pos = abs.rfind('/');
    if (pos == std::string::npos) return ".";
    if (pos == 0) return "/";
    return abs.substr(0, pos);
}

std::string base_name(const std::string& abs) {
    size_t pos = abs.rfind('/');
    return pos == std::string::npos ? abs : abs.substr(pos + 1);
}

std::string existing_dir(const std::string& p, const std::string& what) {
    char* rp = realpath(p.c_str(), nullptr);
    if (!rp) throw CliError("cannot access " + what + " \"" + p + "\": " + std::strerror(errno));
    std::string out(rp);
    free(rp);
    if (!is_directory(out)) throw CliError(what + " \"" + p + "\" is not a directory");
    return out;
}

std::string absolute_new_dir(const std::string& given) {
    std::string p = given;
    while (p.size() > 1 && p.back() == '/') p.pop_back();
    std::string base = base_name(p);
    if (base == "." || base == ".." || p == "/") {
        // Names an existing directory by a relative step: resolve it as a whole.
        return existing_dir(p, "directory");
    }
    std::string parent = p.find('/') == std::string::npos ? "." : parent_dir(p);
    char* rp = realpath(parent.c_str(), nullptr);
    if (!rp)
        throw CliError("cannot use \"" + given + "\": its parent directory \"" + parent +
                       "\" is not accessible (" + std::strerror(errno) +
                       "); create the parent directory first");
    std::string out(rp);
    free(rp);
    if (!is_directory(out))
        throw CliError("cannot use \"" + given + "\": \"" + parent + "\" is not a directory");
    return out == "/" ? "/" + base : out + "/" + base;
}

void remove_tree(const std::string& dir) {
    if (dir.empty() || dir == "/") return;
    nftw(
        dir.c_str(),
        [](const char* path, const struct stat*, int, struct FTW*) -> int {
            ::remove(path);
            return 0;
        },
        16, FTW_DEPTH | FTW_PHYS);
}

std::string pg_bindir() {
    const char* env = getenv("CMK_LAKEBASE_PG_BINDIR");
    if (env && *env) return env;
    return CMK_PG_BINDIR;
}

std::string layer_path() {
    const char* env = getenv("CMK_LAKEBASE_LAYER");
    std::string p =
        (env && *env) ? make_absolute(env) : std::string(CMK_PKGLIBDIR) + "/libcmk_lakebase_fs.so";
    if (access(p.c_str(), R_OK) != 0)
        throw CliError("the encrypting file layer " + p + " is not readable (" + std::strerror(errno) +
                       "); install cmk_lakebase (make install) or set CMK_LAKEBASE_LAYER to "
                       "the path of libcmk_lakebase_fs.so");
    return p;
}

namespace {

bool is_executable_file(const std::string& p) {
    struct stat st;
    return stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode) && access(p.c_str(), X_OK) == 0;
}

}  // namespace

std::string find_tool(const std::string& name) {
    if (name.empty()) return "";
    if (name.find('/') != std::string::npos) return name;
    std::string candidate = pg_bindir() + "/" + name;
    if (is_executable_file(candidate)) return candidate;
    const char* path_env = getenv("PATH");
    std::string path = path_env ? path_env : "/usr/local/bin:/usr/bin:/bin";
    size_t i = 0;
    while (i <= path.size()) {
        size_t j = path.find(':', i);
        if (j == std::string::npos) j = path.size();
        std::string dir = path.substr(i, j - i);
        if (dir.empty()) dir = ".";
        candidate = dir + "/" + name;
        if (is_executable_file(candidate)) return candidate;
        i = j + 1;
    }
    return "";
}

std::vector<std::string> layer_environment(const std::string& layer, const std::string& pgdata,
                                           const std::string& keyring_dir) {
    static const std::string kPreload = "LD_PRELOAD=";
    static const std::string kPgdata = "CMK_LAKEBASE_PGDATA=";
    static const std::string kKeyringDir = "CMK_LAKEBASE_KEYRING_DIR=";
    auto starts = [](const std::string& s, const std::string& prefix) {
        return s.compare(0, prefix.size(), prefix) == 0;
    };

    std::vector<std::string> env;
    std::string old_preload;
    for (char** e = environ; e && *e; ++e) {
        std::string kv(*e);
        if (starts(kv, kPreload)) {
            old_preload = kv.substr(kPreload.size());
            continue;
        }
        // An inherited list of read-only source directories (pg_cmk combinebackup sets
        // its own) would give another tool's paths keys from elsewhere.
        if (starts(kv, kPgdata) || starts(kv, kKeyringDir) || starts(kv, "CMK_LAKEBASE_SOURCE_DIRS=")) continue;
        env.push_back(kv);
    }

    // Loading the layer twice would transform data twice: keep only our copy, first.
    std::string preload = layer;
    size_t i = 0;
    while (i < old_preload.size()) {
        size_t j = old_preload.find_first_of(": ", i);
        if (j == std::string::npos) j = old_preload.size();
        std::string lib = old_preload.substr(i, j - i);
        if (!lib.empty() && base_name(lib) != "libcmk_lakebase_fs.so") preload += ":" + lib;
        i = j + 1;
    }
    env.push_back(kPreload + preload);
    env.push_back(kPgdata + pgdata);
    if (!keyring_dir.empty()) env.push_back(kKeyringDir + keyring_dir);
    return env;
}

std::string self_executable() {
    char buf[4096];
    ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
    if (n <= 0) throw CliError("cannot find this program's path (/proc/self/exe)");
    return std::string(buf, size_t(n));
}

std::vector<std::string> plain_environment() {
    std::vector<std::string> env;
    for (char** e = environ; e && *e; ++e) {
        std::string kv(*e);
        if (kv.compare(0, 11, "LD_PRELOAD=") == 0 || kv.compare(0, 13, "CMK_LAKEBASE_") == 0) continue;
        env.push_back(kv);
    }
    return env;
}

void exec_replacing(const std::string& path, const std::vector<std::string>& args,
                    const std::vector<std::string>& env) {
    std::vector<char*> argv;
    for (const auto& s : args) argv.push_back(const_cast<char*>(s.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (const auto& s : env) envp.push_back(const_cast<char*>(s.c_str()));
    envp.push_back(nullptr);
    std::fflush(stdout);
    std::fflush(stderr);
    execve(path.c_str(), argv.data(), envp.data());
    throw CliError("cannot run \"" + path + "\": " + std::strerror(errno));
}

std::string encrypted_datadir(const std::string& given) {
    std::string dir = existing_dir(given, "data directory");
    std::string keyring = dir + "/cmk_lakebase/keyring.json";
    if (!path_exists(keyring))
        throw CliError("data directory \"" + dir +
                       "\" is not an encrypted cluster (no cmk_lakebase/keyring.json)");
    return dir;
}

bool page_header_ok(const uint8_t* p) {
    auto u16 = [&](size_t o) { return unsigned(p[o]) | unsigned(p[o + 1]) << 8; };
    unsigned lower = u16(12), upper = u16(14), special = u16(16), version = u16(18);
    return version == (8192 | 4) && lower >= 24 && lower <= upper && upper <= special && special <= 8192;
}

}  // namespace cmk::cli
