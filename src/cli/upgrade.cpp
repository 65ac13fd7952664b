// `pg_cmk upgrade`: major-version upgrade of a cluster into a new encrypted cluster with
// the stock pg_upgrade (issue 17).
//
// pg_upgrade (15 and later) keeps every user relation's file number, database oid and
// tablespace oid, so a relation's file has the same path relative to the data
// directory in the old and in the new cluster, and our ciphertext does not depend on
// the path (a file's DEK and the page number are its only inputs). pg_upgrade moves
// files itself, outside any server: it copies pg_xact and pg_multixact with `cp -Rf`,
// then copies, clones or hard-links every user relation file. The new cluster's key map
// knows none of them. So pg_cmk runs the stock pg_upgrade with the new cluster's bindir
// replaced by a directory of links to it in which pg_resetwal is this program
// (`pg_cmk upgrade-sync`). pg_upgrade runs pg_resetwal on the new cluster right after
// each of its file transfers, before any server starts on the files (checked in its
// source for 17 and 18: copy_xact_xlog_xid, then transfer_all_new_tablespaces followed
// by "pg_resetwal -o"); each time, upgrade-sync first gives the new cluster's key map
// the old cluster's DEK of every file the new cluster holds an exact copy (or a hard
// link) of, then runs the real pg_resetwal under the layer of the new cluster (it
// writes a WAL segment). A file is recognised by its content, not by its name: same
// inode, or same size and same bytes; a file the new server wrote itself under its own
// DEK never equals the old ciphertext. From a plaintext old cluster, the copies are
// encrypted in place instead (through the layer, under new DEKs).
//
// The servers themselves each run their own version of the extension (the old
// cluster's postgresql.conf preloads it from the old pkglibdir, the new one's from the
// new); pg_control, PG_VERSION and the configuration files are plaintext, so
// pg_upgrade's pg_controldata and pg_resetwal -n need no keys.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::cli {
namespace {

const char kUpgradeUsage[] =
    "pg_cmk upgrade upgrades a cluster to a new PostgreSQL major version with the stock\n"
    "pg_upgrade of the new version, into a new cluster encrypted by cmk_lakebase.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk upgrade -d OLDDATADIR -D NEWDATADIR -b OLDBINDIR -B NEWBINDIR\n"
    "                 [--copy | --link | --clone | --copy-file-range] [--check]\n"
    "                 [-- PG_UPGRADE_ARGS...]\n"
    "\n"
    "Options:\n"
    "  -d, --old-datadir=DIR  the old cluster (encrypted, or plaintext with --copy);\n"
    "                         stopped, no database bound to a key configuration of its own\n"
    "  -D, --new-datadir=DIR  the new cluster, made by the new version's pg_cmk initdb\n"
    "                         (under the same CMK or another); stopped, empty\n"
    "  -b, --old-bindir=DIR   the old version's bindir\n"
    "  -B, --new-bindir=DIR   the new version's bindir\n"
    "      --copy             copy the files (default); the new cluster's key map takes\n"
    "                         the old DEKs of encrypted files (re-sealed under its KEK)\n"
    "      --link             hard-link the files (encrypted old cluster only)\n"
    "      --clone            clone the files (encrypted old cluster only)\n"
    "      --copy-file-range  copy with copy_file_range (encrypted old cluster only)\n"
    "  -c, --check            only check the clusters (pg_upgrade --check)\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "Not supported: --swap (it moves the new cluster's catalog files into the old\n"
    "directories); user tablespaces are carried.\n"
    "Arguments after \"--\" go to pg_upgrade as they are (e.g. --jobs, -o, -O).\n";

std::string data_version(const std::string& dir) {
    std::string v = sys::data_directory_major(dir);
    if (v.empty()) throw CliError("\"" + dir + "\" is not a PostgreSQL data directory (no readable PG_VERSION)");
    return v;
}

std::vector<std::string> entries(const std::string& dir) {
    std::vector<std::string> out;
    DIR* d = ::opendir(dir.c_str());
    if (!d) return out;
    while (struct dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") out.push_back(n);
    }
    ::closedir(d);
    return out;
}

bool all_digits(const std::string& s) {
    if (s.empty()) return false;
    for (char c : s)
        if (c < '0' || c > '9') return false;
    return true;
}

bool regular_file(const std::string& p, struct stat* st) { return ::lstat(p.c_str(), st) == 0 && S_ISREG(st->st_mode); }

// Whether the new cluster's file is a copy of the old one (both of the given size):
// equal bytes up to and including the first 1 MiB chunk that holds a non-zero byte.
// That suffices: a file the new server wrote encrypts every non-zero unit under its own
// DEK, so its first chunk with data differs from the old ciphertext (and a plaintext
// copy equals the plaintext original); a file of zeros reads the same under any key.
bool same_bytes(const std::string& a, const std::string& b, off_t size) {
    int fa = sys::open(a.c_str(), O_RDONLY | O_CLOEXEC);
    if (fa < 0) throw CliError("cannot open \"" + a + "\": " + std::strerror(errno));
    int fb = sys::open(b.c_str(), O_RDONLY | O_CLOEXEC);
    if (fb < 0) {
        int err = errno;
        sys::close(fa);
        throw CliError("cannot open \"" + b + "\": " + std::strerror(err));
    }
    constexpr size_t kBuf = 1 << 20;
    std::vector<uint8_t> x(kBuf), y(kBuf);
    bool equal = true;
    for (off_t off = 0; off < size && equal;) {
        size_t n = size_t(std::min<off_t>(kBuf, size - off));
        if (sys::pread_full(fa, x.data(), n, off) != ssize_t(n) || sys::pread_full(fb, y.data(), n, off) != ssize_t(n)) {
            equal = false;
            break;
        }
        equal = std::memcmp(x.data(), y.data(), n) == 0;
        off += off_t(n);
        if (equal && std::any_of(x.begin(), x.begin() + long(n), [](uint8_t v) { return v != 0; })) break;
    }
    sys::close(fa);
    sys::close(fb);
    return equal;
}

// A tablespace's per-version directory of a major version ("PG_17_202406281"), "" if
// none.
std::string version_dir(const std::string& tblspc, const std::string& major) {
    for (const std::string& n : entries(tblspc))
        if (n.compare(0, 4 + major.size(), "PG_" + major + "_") == 0) return n;
    return "";
}

// A file pg_upgrade may have carried into the new cluster: its path relative to the
// new data directory and to the old one (they differ only in a tablespace's version
// directory).
struct Carried {
    std::string rel_new, rel_old;
    FileClass cls;
};

void add_db_files(const std::string& new_dir, const std::string& rel_new_db, const std::string& rel_old_db,
                  std::vector<Carried>& out) {
    for (const std::string& f : entries(new_dir + "/" + rel_new_db)) {
        std::string rn = rel_new_db + "/" + f;
        FileClass c = classify_relative(rn);
        if (c == FileClass::Relation) out.push_back({rn, rel_old_db + "/" + f, c});
    }
}

// Every encrypted file of the new cluster that pg_upgrade may have carried over:
// pg_xact, pg_multixact, relation files of every database, in the default
// tablespace and in user tablespaces.
std::vector<Carried> carried_candidates(const std::string& new_dir, const std::string& old_major,
                                        const std::string& new_major) {
    std::vector<Carried> out;
    for (const char* sub : {"pg_xact", "pg_multixact/offsets", "pg_multixact/members"})
        for (const std::string& f : entries(new_dir + "/" + sub)) {
            std::string rel = std::string(sub) + "/" + f;
            if (classify_relative(rel) == FileClass::Slru) out.push_back({rel, rel, FileClass::Slru});
        }
    for (const std::string& db : entries(new_dir + "/base"))
        if (all_digits(db)) add_db_files(new_dir, "base/" + db, "base/" + db, out);
    for (const std::string& ts : entries(new_dir + "/pg_tblspc")) {
        if (!all_digits(ts)) continue;
        std::string tdir = new_dir + "/pg_tblspc/" + ts;
        std::string vn = version_dir(tdir, new_major), vo = version_dir(tdir, old_major);
        if (vn.empty() || vo.empty()) continue;
        for (const std::string& db : entries(tdir + "/" + vn))
            if (all_digits(db))
                add_db_files(new_dir, "pg_tblspc/" + ts + "/" + vn + "/" + db, "pg_tblspc/" + ts + "/" + vo + "/" + db,
                             out);
    }
    return out;
}

// A cluster's keys, opened offline through its own key provider.
struct OpenCluster {
    Keyring kr;
    std::unique_ptr<KeyProvider> provider;
    std::unique_ptr<KeyMap> map;
};

OpenCluster open_cluster(const std::string& datadir) {
    OpenCluster c;
    std::string dir = datadir + "/cmk_lakebase";
    c.kr = load_keyring(dir);
    c.provider = audit::audited_provider(make_provider(c.kr.config), c.kr.bound_name());
    ClusterKeys keys = unlock_cluster_keys(dir, c.kr, *c.provider);
    c.map = open_cluster_keymap(dir, c.kr, keys);
    return c;
}

bool is_encrypted_cluster(const std::string& datadir) { return path_exists(datadir + "/cmk_lakebase/keyring.json"); }

// Databases bound to key configurations of their own keep their DEKs in key maps of
// their own, which this route does not carry.
void refuse_bound_databases(const std::string& datadir, const std::string& which) {
    for (const std::string& oid : entries(datadir + "/cmk_lakebase/db"))
        if (path_exists(datadir + "/cmk_lakebase/db/" + oid + "/keyring.json"))
            throw CliError("database " + oid + " of the " + which +
                               " cluster is bound to a key configuration of its own; pg_cmk upgrade does not "
                               "carry database bindings (not supported): unbind it first",
                           ErrorCategory::NotSupported);
}

struct SyncResult {
    size_t rekeyed = 0;    // old DEK given to the new cluster's copy
    size_t encrypted = 0;  // plaintext copy encrypted in place
    size_t stale = 0;      // key-map entries of files pg_upgrade removed
};

// Plaintext copies of a plaintext old cluster's files, encrypted in place by a child
// that runs this program under the layer of the new cluster (`upgrade-encrypt`).
void encrypt_copies(const std::string& old_dir, const std::string& new_dir, const std::vector<Carried>& files) {
    if (files.empty()) return;
    char tmpl[] = "/tmp/pg_cmk_upgrade_list.XXXXXX";
    int fd = ::mkstemp(tmpl);
    if (fd < 0) throw CliError(std::string("cannot create a temporary file: ") + std::strerror(errno));
    std::string list;
    for (const Carried& f : files) list += f.rel_old + "\t" + f.rel_new + "\n";
    int w = sys::write_full(fd, list.data(), list.size());
    sys::close(fd);
    if (w != 0) {
        ::unlink(tmpl);
        throw CliError("cannot write the list of files to encrypt");
    }
    std::string self;
    try {
        self = self_executable();
    } catch (...) {
        ::unlink(tmpl);
        throw;
    }
    std::vector<std::string> env = layer_environment(layer_path(), new_dir, "");
    int status = run_and_wait(self, {self, "upgrade-encrypt", old_dir, new_dir, tmpl}, env);
    ::unlink(tmpl);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        throw CliError("encrypting the plaintext copies in the new cluster failed (see the lines above)");
}

// Gives the new cluster's key map the old cluster's DEK of every file it holds a copy
// or a link of (encrypted old cluster), or encrypts those copies (plaintext old
// cluster); drops key-map entries of files pg_upgrade removed.
SyncResult sync_keys(const std::string& old_dir, const std::string& new_dir) {
    SyncResult r;
    const std::string old_major = data_version(old_dir), new_major = data_version(new_dir);
    std::vector<Carried> cand = carried_candidates(new_dir, old_major, new_major);
    const bool old_encrypted = is_encrypted_cluster(old_dir);

    std::vector<Carried> carried;
    for (const Carried& c : cand) {
        struct stat sn, so;
        if (!regular_file(new_dir + "/" + c.rel_new, &sn) || !regular_file(old_dir + "/" + c.rel_old, &so)) continue;
        if (sn.st_size == 0) continue;  // no byte under any key: either DEK will do
        bool same_inode = sn.st_dev == so.st_dev && sn.st_ino == so.st_ino;
        if (same_inode && !old_encrypted)
            throw CliError("\"" + c.rel_new + "\" of the new cluster is a hard link to the plaintext old cluster's "
                           "file; upgrade a plaintext cluster with --copy");
        if (same_inode || (sn.st_size == so.st_size && same_bytes(new_dir + "/" + c.rel_new, old_dir + "/" + c.rel_old,
                                                                   sn.st_size)))
            carried.push_back(c);
    }

    OpenCluster nc = open_cluster(new_dir);
    if (old_encrypted) {
        OpenCluster oc = open_cluster(old_dir);
        std::vector<KeyMap::Import> imports;
        for (const Carried& c : carried) {
            std::optional<SecureBytes> dek = oc.map->get(c.rel_old);
            if (!dek && sys::file_all_zero((old_dir + "/" + c.rel_old).c_str()) == 1)
                continue;  // zeros only (extended, never written): no key, in either cluster
            if (!dek)
                throw CliError("\"" + c.rel_old + "\" of the old cluster has data but no key in its key map (a damaged "
                               "old cluster?); nothing was changed for it");
            std::optional<SecureBytes> have = nc.map->get(c.rel_new);
            if (have && have->size() == dek->size() && ct_equal(have->data(), dek->data(), dek->size())) continue;
            imports.push_back(KeyMap::Import{c.rel_new, c.cls, std::move(*dek)});
        }
        r.rekeyed = imports.size();
        if (!imports.empty()) nc.map->put(imports);
    } else {
        r.encrypted = carried.size();
        nc.map.reset();  // the child opens the key map itself
        encrypt_copies(old_dir, new_dir, carried);
        nc = open_cluster(new_dir);
    }
    // Entries of relation and SLRU files that are gone: pg_upgrade removed the new
    // cluster's own pg_xact and pg_multixact and unlinked the files it replaced.
    r.stale = nc.map->remove_if([&](const std::string& id) {
        FileClass c = classify_relative(id);
        if (c != FileClass::Relation && c != FileClass::Slru) return false;
        struct stat st;
        return ::lstat((new_dir + "/" + id).c_str(), &st) != 0 && errno == ENOENT;
    });
    return r;
}

// After pg_upgrade: every relation file of the new cluster with data has a key, and
// its first page with data decrypts to a PostgreSQL page header. Returns the number
// of files checked; throws on the first that fails.
size_t verify_new_cluster(const std::string& new_dir) {
    const std::string major = data_version(new_dir);
    OpenCluster nc = open_cluster(new_dir);
    size_t checked = 0;
    std::vector<uint8_t> page(kUnitSize);
    for (const Carried& c : carried_candidates(new_dir, major, major)) {
        if (c.cls != FileClass::Relation) continue;
        std::string path = new_dir + "/" + c.rel_new;
        int fd = sys::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        std::optional<SecureBytes> dek;
        bool ok = true, any = false;
        for (off_t off = 0; ok && !any; off += off_t(kUnitSize)) {
            ssize_t n = sys::pread_full(fd, page.data(), kUnitSize, off);
            if (n != ssize_t(kUnitSize)) break;
            bool zero = true;
            for (uint8_t b : page)
                if (b) {
                    zero = false;
                    break;
                }
            if (zero) continue;
            any = true;
            dek = nc.map->get(c.rel_new);
            if (!dek) {
                ok = false;
                break;
            }
            XtsCipher x(dek->data());
            x.decrypt(uint64_t(off) / kUnitSize, page.data(), page.data(), kUnitSize);
            ok = page_header_ok(page.data());
        }
        sys::close(fd);
        if (!ok)
            throw CliError("after pg_upgrade, \"" + c.rel_new + "\" of the new cluster " +
                           (dek ? "does not decrypt to PostgreSQL pages under its key"
                                : "holds data but has no key in the key map") +
                           ": do not start the new cluster; start the old one again (--copy) or restore it");
        if (any) checked++;
    }
    return checked;
}

void refuse_quote(const std::string& p) {
    if (p.find_first_of("'\n\r") != std::string::npos)
        throw CliError("the path \"" + p + "\" contains a quote or a line break; pg_cmk upgrade does not support that");
}

// A directory of symbolic links to the new bindir's programs in which pg_resetwal is
// `pg_cmk upgrade-sync`. Removed by the destructor.
struct WrapBindir {
    std::string path;
    ~WrapBindir() {
        if (!path.empty()) remove_tree(path);
    }
};

void make_wrap_bindir(WrapBindir& w, const std::string& self, const std::string& new_bindir,
                      const std::string& old_dir, const std::string& new_dir) {
    char tmpl[] = "/tmp/pg_cmk_upgrade_bin.XXXXXX";
    if (!::mkdtemp(tmpl)) throw CliError(std::string("cannot create a temporary directory: ") + std::strerror(errno));
    w.path = tmpl;
    for (const std::string& n : entries(new_bindir)) {
        if (n == "pg_resetwal") continue;
        std::string target = new_bindir + "/" + n;
        if (::symlink(target.c_str(), (w.path + "/" + n).c_str()) != 0)
            throw CliError("cannot link " + target + ": " + std::strerror(errno));
    }
    std::string script = "#!/bin/sh\n# pg_cmk upgrade: keys first, then the real pg_resetwal under the layer\nexec '" +
                         self + "' upgrade-sync '" + old_dir + "' '" + new_dir + "' '" + new_bindir +
                         "/pg_resetwal' \"$@\"\n";
    std::string sp = w.path + "/pg_resetwal";
    int fd = sys::open(sp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0700);
    if (fd < 0 || sys::write_full(fd, script.data(), script.size()) != 0) {
        int err = errno;
        if (fd >= 0) sys::close(fd);
        throw CliError("cannot write " + sp + ": " + std::strerror(err));
    }
    sys::close(fd);
}

void refuse_running(const std::string& dir, const std::string& which) {
    if (path_exists(dir + "/postmaster.pid"))
        throw CliError("the " + which + " cluster \"" + dir +
                       "\" has a postmaster.pid: stop it first (pg_upgrade needs both clusters stopped)");
}

}  // namespace

int cmd_upgrade(const std::vector<std::string>& args) {
    const std::string cmdname = "upgrade";
    ParsedArgs a = parse_args(cmdname, args,
                              {{"old-datadir", 'd', true},
                               {"new-datadir", 'D', true},
                               {"old-bindir", 'b', true},
                               {"new-bindir", 'B', true},
                               {"copy", 0, false},
                               {"link", 0, false},
                               {"clone", 0, false},
                               {"copy-file-range", 0, false},
                               {"swap", 0, false},
                               {"check", 'c', false}});
    if (a.has("help")) {
        std::fputs(kUpgradeUsage, stdout);
        return 0;
    }
    for (const char* o : {"old-datadir", "new-datadir", "old-bindir", "new-bindir"})
        if (!a.has(o) || a.get(o).empty()) throw UsageError(cmdname, std::string("--") + o + " is required");
    if (!a.positional.empty()) throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] + "\"");
    std::string mode = "copy";
    int modes = 0;
    for (const char* m : {"copy", "link", "clone", "copy-file-range", "swap"})
        if (a.has(m)) {
            mode = m;
            modes++;
        }
    if (modes > 1) throw UsageError(cmdname, "give at most one of --copy, --link, --clone, --copy-file-range");
    for (const std::string& x : a.rest)
        for (const char* m : {"--link", "-k", "--clone", "--copy-file-range", "--swap", "--copy", "-d", "-D", "-b",
                              "-B", "--old-datadir", "--new-datadir", "--old-bindir", "--new-bindir"})
            if (x == m || x.compare(0, std::strlen(m) + 1, std::string(m) + "=") == 0)
                throw UsageError(cmdname, "give " + x + " as pg_cmk upgrade's own option, not after \"--\"");
    if (mode == "swap")
        throw CliError("pg_cmk upgrade does not support --swap (not supported): it moves the new cluster's own "
                       "catalog files into the old cluster's directories, which this route cannot re-key; use "
                       "--link for an upgrade without copying",
                       ErrorCategory::NotSupported);

    const std::string old_dir = existing_dir(a.get("old-datadir"), "old data directory");
    const std::string new_dir = encrypted_datadir(a.get("new-datadir"));
    const std::string old_bindir = existing_dir(a.get("old-bindir"), "old bindir");
    const std::string new_bindir = existing_dir(a.get("new-bindir"), "new bindir");
    for (const std::string& p : {old_dir, new_dir, new_bindir}) refuse_quote(p);
    if (old_dir == new_dir) throw UsageError(cmdname, "the old and the new data directory are the same");
    const bool old_encrypted = is_encrypted_cluster(old_dir);
    if (old_encrypted) refuse_bound_databases(old_dir, "old");
    refuse_bound_databases(new_dir, "new");
    if (!old_encrypted && mode != "copy")
        throw CliError("the old cluster is plaintext: only --copy can upgrade it into an encrypted cluster (--" + mode +
                           " would leave the new cluster's files shared with, or equal to, the plaintext ones)",
                       ErrorCategory::NotSupported);
    const std::string old_major = data_version(old_dir), new_major = data_version(new_dir);
    if (std::atoi(old_major.c_str()) < 15)
        throw CliError("the old cluster is PostgreSQL " + old_major +
                           "; pg_cmk upgrade needs 15 or later (earlier pg_upgrade does not keep relation file "
                           "numbers, which the key map is keyed by)",
                       ErrorCategory::NotSupported);
    if (std::atoi(old_major.c_str()) < 19 && std::atoi(new_major.c_str()) >= 19)
        throw CliError("upgrading PostgreSQL " + old_major + " to " + new_major +
                           " is not supported yet: pg_upgrade " + new_major +
                           " converts pg_multixact to its new format by reading the old cluster's files "
                           "itself, which are ciphertext to it (found on 19rc1). Upgrade to 18 with pg_cmk "
                           "upgrade, or dump and restore into a cluster made by pg_cmk initdb",
                       ErrorCategory::NotSupported);
    refuse_running(old_dir, "old");
    refuse_running(new_dir, "new");
    std::string pg_upgrade = new_bindir + "/pg_upgrade";
    if (::access(pg_upgrade.c_str(), X_OK) != 0) throw CliError("no pg_upgrade in " + new_bindir);
    if (::access((new_bindir + "/pg_resetwal").c_str(), X_OK) != 0) throw CliError("no pg_resetwal in " + new_bindir);

    const std::string self = self_executable();
    refuse_quote(self);
    WrapBindir wrap;
    make_wrap_bindir(wrap, self, new_bindir, old_dir, new_dir);

    std::vector<std::string> up = {pg_upgrade, "-d", old_dir, "-D", new_dir, "-b", old_bindir, "-B", wrap.path};
    if (mode != "copy") up.push_back("--" + mode);
    if (a.has("check")) up.push_back("--check");
    up.insert(up.end(), a.rest.begin(), a.rest.end());
    std::printf("pg_cmk upgrade: running %s (%s, %s old cluster)\n", pg_upgrade.c_str(), mode.c_str(),
                old_encrypted ? "encrypted" : "plaintext");
    std::fflush(stdout);
    // No layer in pg_upgrade itself: the servers preload the extension through their own
    // configuration, and pg_resetwal runs under the layer through upgrade-sync.
    int status = run_and_wait(pg_upgrade, up, plain_environment());
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        std::fprintf(stderr,
                     "pg_cmk: error: pg_upgrade failed (its output is above; its logs are in %s/pg_upgrade_output.d); "
                     "make the new cluster again with pg_cmk initdb before retrying%s\n",
                     new_dir.c_str(),
                     mode == "link" ? "; in --link mode the old cluster must not be started once the new one was"
                                    : "");
        return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
    }
    if (a.has("check")) return 0;
    // Once more, in case pg_upgrade carried files after its last pg_resetwal; then a
    // check that every relation file of the new cluster reads back as pages.
    SyncResult last = sync_keys(old_dir, new_dir);
    size_t checked = verify_new_cluster(new_dir);
    std::printf("pg_cmk upgrade: the new cluster's key map covers every file pg_upgrade carried%s; %zu relation "
                "files verified (their first page decrypts to a page header)\n",
                last.rekeyed + last.encrypted ? " (a last pass re-keyed some)" : "", checked);
    if (!old_encrypted)
        std::printf("pg_cmk upgrade: the old cluster \"%s\" is still plaintext on disk: remove it (and its copies) "
                    "once the new cluster is verified\n",
                    old_dir.c_str());
    return 0;
}

// pg_upgrade's pg_resetwal in the wrapped bindir: args = OLD NEW REAL_PG_RESETWAL
// [pg_resetwal's own arguments].
int cmd_upgrade_sync(const std::vector<std::string>& args) {
    if (args.size() < 3) throw UsageError("upgrade-sync", "internal command of pg_cmk upgrade");
    const std::string& old_dir = args[0];
    const std::string& new_dir = args[1];
    const std::string& real = args[2];
    std::vector<std::string> tool(args.begin() + 2, args.end());
    bool writes = true;  // pg_resetwal -n, -V, --help write nothing: no key work needed
    for (size_t i = 1; i < tool.size(); i++)
        if (tool[i] == "-n" || tool[i] == "--dry-run" || tool[i] == "-V" || tool[i] == "--version" ||
            tool[i] == "--help" || tool[i] == "-?")
            writes = false;
    std::vector<std::string> env;
    if (writes) {
        SyncResult r = sync_keys(old_dir, new_dir);
        if (r.rekeyed || r.encrypted || r.stale)
            std::printf("pg_cmk upgrade: %zu files re-keyed, %zu encrypted, %zu stale keys removed\n", r.rekeyed,
                        r.encrypted, r.stale);
        env = layer_environment(layer_path(), new_dir, "");
    } else {
        env = plain_environment();
    }
    // pg_upgrade runs the wrapper; the wrapper becomes the real pg_resetwal.
    exec_replacing(real, tool, env);
}

// Runs under the layer of the new cluster (encrypt_copies): args = OLD NEW LISTFILE,
// each line "old-relative-path TAB new-relative-path". Each file is removed from the
// new cluster (its key with it) and written again from the old cluster's plaintext,
// created fresh so that it gets a new DEK, durable before its first byte.
int cmd_upgrade_encrypt(const std::vector<std::string>& args) {
    if (args.size() != 3) throw UsageError("upgrade-encrypt", "internal command of pg_cmk upgrade");
    const std::string& old_dir = args[0];
    const std::string& new_dir = args[1];
    std::string list = sys::read_file(args[2].c_str());
    std::vector<uint8_t> buf(1 << 20);
    size_t pos = 0;
    while (pos < list.size()) {
        size_t nl = list.find('\n', pos);
        if (nl == std::string::npos) nl = list.size();
        std::string line = list.substr(pos, nl - pos);
        pos = nl + 1;
        size_t tab = line.find('\t');
        if (tab == std::string::npos) continue;
        std::string src = old_dir + "/" + line.substr(0, tab), dst = new_dir + "/" + line.substr(tab + 1);
        if (::unlink(dst.c_str()) != 0 && errno != ENOENT)
            throw CliError("cannot remove \"" + dst + "\": " + std::strerror(errno));
        int in = ::open(src.c_str(), O_RDONLY | O_CLOEXEC);
        if (in < 0) throw CliError("cannot open \"" + src + "\": " + std::strerror(errno));
        int out = ::open(dst.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (out < 0) {
            int err = errno;
            ::close(in);
            throw CliError("cannot create \"" + dst + "\": " + std::strerror(err));
        }
        bool ok = true;
        for (off_t off = 0;;) {
            ssize_t n = ::pread(in, buf.data(), buf.size(), off);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                ok = n == 0;
                break;
            }
            if (::pwrite(out, buf.data(), size_t(n), off) != n) {
                ok = false;
                break;
            }
            off += n;
        }
        int err = errno;
        if (ok && ::fsync(out) != 0) ok = false;
        ::close(in);
        ::close(out);
        if (!ok) throw CliError("cannot encrypt \"" + dst + "\": " + std::strerror(err));
    }
    return 0;
}

}  // namespace cmk::cli
