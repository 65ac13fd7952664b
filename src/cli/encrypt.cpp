// `pg_cmk encrypt`: offline conversion of a cleanly shut down plaintext cluster into an
// encrypted one (issue 17 item 4; docs/encrypt.md has the design and its crash table).
//
// The cluster is rewritten into a staging directory beside it, <DIR>.encrypting, by a
// copy of pg_cmk itself run with the encrypting file layer preloaded and pointed at the
// staging directory as its data directory (`pg_cmk __encrypt-copy`, hidden): every file
// it writes there is classified and encrypted by the same code the server uses, under a
// new keyring made from the key options (those of pg_cmk initdb). A journal in the
// staging directory names the files already complete, so a run killed at any point
// resumes where it stopped. While the conversion runs, the original's global/pg_control
// is renamed to pg_control.pg_cmk-encrypting, so no server (plain or with the layer)
// starts on either directory; pg_control is copied into the staging directory last.
// Then two renames swap the directories: <DIR> -> <DIR>.plaintext (the original, kept
// unless --remove-original), <DIR>.encrypting -> <DIR>. Every step is idempotent and
// each state on disk says which step comes next, so the same command finishes the job.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
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
#include "cmk_lakebase/keys/encrypt_journal.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"

namespace cmk::cli {
namespace {

const char kUsage[] =
    "pg_cmk encrypt converts a cleanly shut down plaintext PostgreSQL cluster into one\n"
    "encrypted by cmk_lakebase (offline; crash-safe: run the same command again after\n"
    "an interruption and it continues).\n"
    "\n"
    "Usage:\n"
    "  pg_cmk encrypt -D DATADIR [OPTION]...\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DATADIR   data directory of the stopped plaintext cluster\n"
    "  --provider=NAME        key provider: local (the default), aws, azure, gcp,\n"
    "  --kms-option=KEY=VALUE vault, kmip, with the options of pg_cmk initdb\n"
    "  --key-store=DIR        local key store (default: $CMK_LAKEBASE_KEY_STORE, else\n"
    "                         $HOME/.cmk_lakebase/keys)\n"
    "  --key-id=ID            customer-managed key (local: a new key is made if none)\n"
    "  --create-key           create the key given by --key-id (local provider)\n"
    "  --remove-original      delete the plaintext original once the encrypted\n"
    "                         cluster is in place (default: kept as DATADIR.plaintext)\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "Needs free space for a second copy of the cluster beside it. While it runs, and\n"
    "until it has completed, neither directory can be started. The key options are\n"
    "read by the first run only; a resumed run keeps the keyring the first run made.\n"
    "Not supported (refused): a running or not cleanly shut down cluster, a standby,\n"
    "user tablespaces, pg_wal outside the data directory, shared_preload_libraries\n"
    "already set in postgresql.conf or postgresql.auto.conf.\n";

const char kMarker[] = "pg_control.pg_cmk-encrypting";  // the original's pg_control while converting
const char kJournal[] = "pg_cmk_encrypt.journal";        // in the staging directory

struct Paths {
    std::string dir, parent, name;
    std::string staging;      // <DIR>.encrypting
    std::string staging_new;  // .<name>.encrypting.new: made whole, then renamed to staging
    std::string orig;         // <DIR>.plaintext: the original after the swap
    std::string removing;     // .<name>.plaintext.removing (--remove-original)
    std::string lock;         // .<name>.pg_cmk-encrypt.lock
};

Paths paths_for(const std::string& dir) {
    Paths p;
    p.dir = dir;
    p.parent = parent_dir(dir);
    p.name = base_name(dir);
    p.staging = dir + ".encrypting";
    p.staging_new = p.parent + "/." + p.name + ".encrypting.new";
    p.orig = dir + ".plaintext";
    p.removing = p.parent + "/." + p.name + ".plaintext.removing";
    p.lock = p.parent + "/." + p.name + ".pg_cmk-encrypt.lock";
    return p;
}

std::string errno_text() { return std::strerror(errno); }

void must(bool ok, const std::string& what) {
    if (!ok) throw CliError(what + ": " + errno_text());
}

void rename_durable(const std::string& from, const std::string& to, const std::string& dir_to_sync) {
    must(::rename(from.c_str(), to.c_str()) == 0, "cannot rename \"" + from + "\" to \"" + to + "\"");
    must(sys::fsync_dir(dir_to_sync.c_str()) == 0, "cannot fsync \"" + dir_to_sync + "\"");
}

// --- what is copied ------------------------------------------------------------------

// Files the copy leaves out: pg_control (copied last, by the parent), the server's
// run files, and ephemeral files (temporary files and relations, spill files,
// pg_notify: PostgreSQL removes them at start, and their keys would be the copier's
// per-boot key, which no server has).
bool skipped(const std::string& rel) {
    if (rel == "postmaster.pid" || rel == "global/pg_control" || rel == std::string("global/") + kMarker ||
        rel == kJournal)
        return true;
    if (rel.find("pgsql_tmp") != std::string::npos) return true;
    return is_ephemeral(classify_relative(rel));
}

struct Entry {
    std::string rel;
    bool dir;
    mode_t mode;
    uint64_t size;
};

// Every directory and regular file under root (relative paths, sorted: parents before
// children), without the skipped ones. Anything else (a symbolic link, a device) is
// refused: the checks before the copy name the known cases.
void walk(const std::string& root, const std::string& rel, std::vector<Entry>& out) {
    const std::string abs = rel.empty() ? root : root + "/" + rel;
    DIR* d = opendir(abs.c_str());
    if (!d) throw CliError("cannot read directory \"" + abs + "\": " + errno_text());
    std::vector<std::string> names;
    while (struct dirent* e = readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.push_back(e->d_name);
    closedir(d);
    std::sort(names.begin(), names.end());
    for (const std::string& n : names) {
        std::string r = rel.empty() ? n : rel + "/" + n;
        if (skipped(r)) continue;
        struct stat sb;
        if (lstat((root + "/" + r).c_str(), &sb) != 0) throw CliError("cannot stat \"" + root + "/" + r + "\": " + errno_text());
        if (S_ISDIR(sb.st_mode)) {
            out.push_back({r, true, sb.st_mode & 07777, 0});
            walk(root, r, out);
        } else if (S_ISREG(sb.st_mode)) {
            out.push_back({r, false, sb.st_mode & 07777, uint64_t(sb.st_size)});
        } else {
            throw CliError("\"" + root + "/" + r + "\" is not a regular file or directory (a symbolic link?); " +
                               "pg_cmk encrypt does not convert clusters with links or special files in the data "
                               "directory (not supported)",
                           ErrorCategory::NotSupported);
        }
    }
}

// --- the source's checks ----------------------------------------------------------------

const char* state_name(int32_t s) {
    switch (s) {
        case 0: return "starting up";
        case 1: return "shut down";
        case 2: return "shut down in recovery";
        case 3: return "shutting down";
        case 4: return "in crash recovery";
        case 5: return "in archive recovery";
        case 6: return "in production";
    }
    return "unknown";
}

// The "Database cluster state" of pg_controldata: the DBState after system_identifier
// (8 bytes), pg_control_version and catalog_version_no (4 each), in every version.
int32_t control_state(const std::string& control) {
    std::string c = sys::read_file(control.c_str(), 65536);
    if (c.size() < 20) throw CliError("\"" + control + "\" is too short to be a pg_control file");
    int32_t s;
    std::memcpy(&s, c.data() + 16, sizeof s);
    return s;
}

void refuse_conf_preload(const std::string& dir) {
    for (const char* f : {"postgresql.conf", "postgresql.auto.conf"}) {
        const std::string path = dir + "/" + f;
        if (!path_exists(path)) continue;
        if (conf_sets_preload(sys::read_file(path.c_str())))
            throw CliError(path + " sets shared_preload_libraries; pg_cmk encrypt does not merge it with "
                                  "cmk_lakebase (not supported): remove the setting, run pg_cmk encrypt, then "
                                  "set it again with 'cmk_lakebase' as the first entry of the list",
                           ErrorCategory::NotSupported);
    }
}

// The refusals of the brief, one clear line each. control: the original's pg_control
// (under its own name, or renamed while a conversion is under way).
void check_source(const Paths& p, const std::string& control) {
    const std::string& dir = p.dir;
    if (!path_exists(dir + "/PG_VERSION") || !path_exists(control))
        throw CliError("\"" + dir + "\" is not a PostgreSQL data directory (no PG_VERSION or global/pg_control)");
    struct stat own;
    if (stat(dir.c_str(), &own) == 0 && own.st_uid != geteuid())
        throw CliError("\"" + dir + "\" belongs to another user (uid " + std::to_string(own.st_uid) +
                       "); run pg_cmk encrypt as the cluster's owner, so that the new files are its own");
    if (path_exists(dir + "/postmaster.pid"))
        throw CliError("a server is running on \"" + dir + "\" (or it crashed): postmaster.pid exists; stop it "
                       "cleanly with pg_ctl stop -D " + dir + " -m fast and run pg_cmk encrypt again",
                       ErrorCategory::State);
    int32_t s = control_state(control);
    if (s == 2)
        throw CliError("\"" + dir + "\" is a standby (pg_control state: shut down in recovery); convert its "
                       "primary and make the standby again with pg_cmk basebackup -R (not supported)",
                       ErrorCategory::NotSupported);
    if (s != 1)
        throw CliError("\"" + dir + "\" was not shut down cleanly (pg_control state: " + state_name(s) +
                           "); start it and stop it with pg_ctl stop -m fast, then run pg_cmk encrypt again",
                       ErrorCategory::State);
    const std::string ts = dir + "/pg_tblspc";
    if (is_directory(ts) && !dir_is_empty(ts))
        throw CliError("\"" + dir + "\" has user tablespaces (pg_tblspc is not empty); pg_cmk encrypt does not "
                       "convert tablespaces (not supported): move their tables to pg_default first",
                       ErrorCategory::NotSupported);
    struct stat sb;
    if (lstat((dir + "/pg_wal").c_str(), &sb) == 0 && S_ISLNK(sb.st_mode))
        throw CliError("\"" + dir + "/pg_wal\" is a symbolic link (initdb -X); pg_cmk encrypt does not convert "
                       "a WAL directory outside the data directory (not supported)",
                       ErrorCategory::NotSupported);
    refuse_conf_preload(dir);
}

std::string control_sum(const std::string& control) {
    std::string c = sys::read_file(control.c_str(), 65536);
    auto h = sha256(c.data(), c.size());
    return hex_encode(h.data(), h.size());
}

encrypt_journal::Parsed read_journal(const std::string& path) {
    if (!path_exists(path)) return {};
    return encrypt_journal::parse(sys::read_file(path.c_str(), size_t(1) << 30));
}

// Bytes the copy still has to write: files not in the journal with their current size.
uint64_t bytes_left(const std::vector<Entry>& entries, const encrypt_journal::Parsed& j) {
    uint64_t n = 0;
    for (const Entry& e : entries) {
        if (e.dir) continue;
        auto it = j.done.find(e.rel);
        if (it == j.done.end() || it->second != e.size) n += e.size;
    }
    return n;
}

void check_space(const std::string& parent, uint64_t need) {
    struct statvfs vfs;
    must(statvfs(parent.c_str(), &vfs) == 0, "cannot stat the file system of \"" + parent + "\"");
    const uint64_t avail = uint64_t(vfs.f_bavail) * vfs.f_frsize;
    const uint64_t margin = std::max<uint64_t>(64ull << 20, need / 50);  // key map, directories, slack
    if (avail < need + margin)
        throw CliError("not enough free disk space in \"" + parent + "\" for the encrypted copy: " +
                           std::to_string((need + margin) >> 20) + " MB needed, " + std::to_string(avail >> 20) +
                           " MB free; free some space and run pg_cmk encrypt again",
                       ErrorCategory::State);
}

// One conversion at a time per data directory. A run killed by SIGKILL releases it at
// once; its copier (which shares the lock and dies with it) a moment later: wait a bit.
int take_lock(const std::string& path) {
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0600);  // no O_CLOEXEC: the copier shares it
    must(fd >= 0, "cannot open the lock file \"" + path + "\"");
    for (int i = 0; i < 300; i++) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0) return fd;
        if (errno != EWOULDBLOCK && errno != EINTR) break;
        struct timespec ts{0, 100 * 1000 * 1000};
        nanosleep(&ts, nullptr);
    }
    ::close(fd);
    throw CliError("another pg_cmk encrypt is converting this cluster (\"" + path + "\" is locked)",
                   ErrorCategory::Conflict);
}

// postgresql.conf of the staging directory loads the module (atomically: a crash
// leaves the old file or the new one, never a torn line).
void add_preload(const std::string& dir) {
    const std::string path = dir + "/postgresql.conf";
    std::string conf = path_exists(path) ? sys::read_file(path.c_str()) : "";
    if (conf_sets_preload(conf)) return;  // done by an earlier run (the original's was refused)
    conf += "\n# Added by pg_cmk encrypt: the cmk_lakebase encrypting file layer and key management.\n"
            "shared_preload_libraries = 'cmk_lakebase'\n";
    sys::write_file_atomic(path.c_str(), conf.data(), conf.size(), 0600);
}

// After the swap: the original is kept (its pg_control back under its own name, so it
// is a usable plaintext cluster again) or removed (renamed away first, so that an
// interrupted removal is finished by the next run and never mistaken for a cluster).
void finish_original(const Paths& p, bool remove) {
    if (remove && path_exists(p.orig)) rename_durable(p.orig, p.removing, p.parent);
    lifecycle::crash_point("encrypt:removing_original");
    if (path_exists(p.removing)) {
        remove_tree(p.removing);
        if (path_exists(p.removing)) throw CliError("cannot remove \"" + p.removing + "\"; remove it by hand");
        must(sys::fsync_dir(p.parent.c_str()) == 0, "cannot fsync \"" + p.parent + "\"");
    }
    const std::string marker = p.orig + "/global/" + kMarker;
    if (path_exists(marker)) rename_durable(marker, p.orig + "/global/pg_control", p.orig + "/global");
}

double now_s() {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return double(t.tv_sec) + double(t.tv_nsec) / 1e9;
}

}  // namespace

// ---- the copier: runs with the layer preloaded on the staging directory ----------------

int cmd_encrypt_copy(const std::vector<std::string>& args) {
    if (args.size() != 3) throw UsageError("", "__encrypt-copy is internal to pg_cmk encrypt");
    const std::string& src = args[0];
    const std::string& dst = args[1];
    // Dies with the pg_cmk encrypt that started it (a kill -9 of it must not leave a
    // copier writing while the next run starts).
    (void)prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0);
    if (std::to_string(getppid()) != args[2]) _exit(1);

    const std::string jpath = dst + "/" + kJournal;
    encrypt_journal::Parsed j = read_journal(jpath);
    if (j.control_sha256.empty()) throw CliError("the journal " + jpath + " is missing");
    int jfd = ::open(jpath.c_str(), O_WRONLY | O_CLOEXEC);
    must(jfd >= 0, "cannot open " + jpath);
    if (j.torn_tail) must(::ftruncate(jfd, off_t(j.valid_bytes)) == 0 && fsync(jfd) == 0, "cannot cut " + jpath);
    must(lseek(jfd, 0, SEEK_END) >= 0, "cannot seek " + jpath);

    std::vector<Entry> entries;
    walk(src, "", entries);
    std::vector<uint8_t> buf(size_t(1) << 20);
    uint64_t copied = 0, skipped_bytes = 0, files = 0, skipped_files = 0, unsynced = 0;
    std::string pending;  // journal records whose files are fsync()ed, not yet appended
    // A file is journaled only once its bytes are durable: one syncfs() of the staging
    // directory's file system per batch, instead of an fsync() per file (a cluster is
    // mostly small files, and the layer already makes each new DEK durable on its own).
    auto flush_journal = [&]() {
        if (pending.empty()) return;
        must(syncfs(jfd) == 0, "cannot sync the file system of " + dst);
        must(sys::write_full(jfd, pending.data(), pending.size()) == 0 && fsync(jfd) == 0, "cannot write " + jpath);
        pending.clear();
        unsynced = 0;
    };
    const double t0 = now_s();
    for (const Entry& e : entries) {
        const std::string to = dst + "/" + e.rel;
        if (e.dir) {
            if (mkdir(to.c_str(), 0700) != 0 && errno != EEXIST) must(false, "cannot create \"" + to + "\"");
            must(chmod(to.c_str(), e.mode) == 0, "cannot chmod \"" + to + "\"");
            continue;
        }
        struct stat sb;
        const bool exists = lstat(to.c_str(), &sb) == 0;
        auto it = j.done.find(e.rel);
        if (exists && it != j.done.end() && it->second == e.size && uint64_t(sb.st_size) == e.size) {
            skipped_bytes += e.size;
            skipped_files++;
            continue;
        }
        // A partial file of a killed run: unlink through the layer (its DEK goes with
        // it), then write it again under a new one.
        if (exists) must(::unlink(to.c_str()) == 0, "cannot remove the partial copy \"" + to + "\"");
        const std::string from = src + "/" + e.rel;
        int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
        must(in >= 0, "cannot open \"" + from + "\"");
        int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (out < 0) {
            int err = errno;
            ::close(in);
            errno = err;
            must(false, "cannot create \"" + to + "\"");
        }
        uint64_t off = 0;
        while (true) {
            ssize_t n = ::pread(in, buf.data(), buf.size(), off_t(off));
            if (n < 0 && errno == EINTR) continue;
            must(n >= 0, "cannot read \"" + from + "\"");
            if (n == 0) break;
            ssize_t w = 0;
            while (w < n) {
                ssize_t r = ::pwrite(out, buf.data() + w, size_t(n - w), off_t(off + uint64_t(w)));
                if (r < 0 && errno == EINTR) continue;
                must(r > 0, "cannot write \"" + to + "\"");
                w += r;
            }
            off += uint64_t(n);
        }
        ::close(in);
        if (off != e.size)
            throw CliError("\"" + from + "\" changed size while being copied (is a server running on it?)");
        must(fchmod(out, e.mode) == 0, "cannot chmod \"" + to + "\"");
        must(::close(out) == 0, "cannot close \"" + to + "\"");
        pending += encrypt_journal::record(e.rel, e.size);
        copied += e.size;
        unsynced += e.size;
        files++;
        if (pending.size() > 16384 || unsynced > (uint64_t(256) << 20)) flush_journal();
    }
    flush_journal();
    for (auto it = entries.rbegin(); it != entries.rend(); ++it)
        if (it->dir) must(sys::fsync_dir((dst + "/" + it->rel).c_str()) == 0, "cannot fsync " + dst + "/" + it->rel);
    must(sys::fsync_dir(dst.c_str()) == 0, "cannot fsync " + dst);
    ::close(jfd);
    const double secs = now_s() - t0;
    std::printf("pg_cmk: encrypted %llu files, %.1f MB in %.1f s (%.1f MB/s); %llu files (%.1f MB) were already done\n",
                (unsigned long long)files, double(copied) / 1e6, secs, secs > 0 ? double(copied) / 1e6 / secs : 0.0,
                (unsigned long long)skipped_files, double(skipped_bytes) / 1e6);
    return 0;
}

// ---- pg_cmk encrypt -------------------------------------------------------------------

int cmd_encrypt(const std::vector<std::string>& args) {
    const std::string cmdname = "encrypt";
    ParsedArgs a = parse_args(cmdname, args,
                              with_key_option_specs({{"pgdata", 'D', true}, {"remove-original", 0, false}}));
    if (a.has("help")) {
        std::fputs(kUsage, stdout);
        return 0;
    }
    if (!a.positional.empty() || !a.rest.empty())
        throw UsageError(cmdname, "unexpected argument \"" +
                                      (a.positional.empty() ? a.rest[0] : a.positional[0]) + "\"");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");
    KeyOptions ko = parse_key_options(cmdname, a);
    const bool remove = a.has("remove-original");
    if (const char* hooks = std::getenv("CMK_LAKEBASE_TEST_HOOKS"); hooks && std::string(hooks) == "1")
        if (const char* at = std::getenv("CMK_LAKEBASE_TEST_CRASH_AT")) lifecycle::set_crash_point(at);
    if (geteuid() == 0)
        throw CliError("cannot be run as root (the converted files must belong to the cluster's owner); run it "
                       "as that user, e.g. runuser -u postgres -- pg_cmk encrypt ...");

    const Paths p = paths_for(absolute_new_dir(a.get("pgdata")));
    struct stat dsb;
    if (lstat(p.dir.c_str(), &dsb) == 0 && S_ISLNK(dsb.st_mode))
        throw CliError("\"" + p.dir + "\" is a symbolic link; give the data directory's real path (the "
                       "conversion renames it and writes beside it)",
                       ErrorCategory::Invalid);
    check_key_store_outside(cmdname, ko, p.dir);
    check_key_store_outside(cmdname, ko, p.staging);
    const std::string layer = layer_path();
    int lock_fd = take_lock(p.lock);
    struct LockFile {
        int fd;
        const std::string& path;
        bool done = false;
        ~LockFile() {
            if (done) ::unlink(path.c_str());
            ::close(fd);
        }
    } lock{lock_fd, p.lock};

    // --- where an earlier run stopped (docs/encrypt.md, "States") ----------------------
    // The staging directory is complete when it holds pg_control (under the marker
    // name: it must not start before the swap) and no journal.
    const std::string staged_control = p.staging + "/global/" + kMarker;
    auto staged_complete = [&]() {
        return is_directory(p.staging) && path_exists(staged_control) && !path_exists(p.staging + "/" + kJournal);
    };
    bool swapped = false;
    if (!path_exists(p.dir)) {
        // Between the two renames of the swap: the original is aside, the staging
        // directory complete.
        if (!(staged_complete() && path_exists(p.orig)))
            throw CliError("data directory \"" + p.dir + "\" does not exist");
        rename_durable(p.staging, p.dir, p.parent);
        lifecycle::crash_point("encrypt:after_swap");
        swapped = true;
    }
    if (!swapped && path_exists(p.dir + "/" + kKeyringDirName)) {
        if (!path_exists(p.dir + "/global/" + kMarker) && !path_exists(p.orig + "/global/" + kMarker) &&
            !path_exists(p.removing))
            throw CliError("\"" + p.dir + "\" is already encrypted by cmk_lakebase (it has a " + kKeyringDirName +
                               "/ directory)",
                           ErrorCategory::State);
        swapped = true;  // after the swap: activation and the original are left to settle
    }

    double secs = 0;
    if (!swapped) {
        const std::string marker = p.dir + "/global/" + kMarker;
        const bool marked = path_exists(marker);
        const std::string control = marked ? marker : p.dir + "/global/pg_control";
        check_source(p, control);
        if (path_exists(p.orig))
            throw CliError("\"" + p.orig + "\" exists (the plaintext original of an earlier conversion?); move it "
                                           "away, then run pg_cmk encrypt again",
                           ErrorCategory::Exists);
        const std::string sum = control_sum(control);
        if (!staged_complete()) {
            if (path_exists(p.staging_new)) remove_tree(p.staging_new);
            std::vector<Entry> entries;
            walk(p.dir, "", entries);
            encrypt_journal::Parsed j;
            const bool resume = is_directory(p.staging);
            if (resume) {
                j = read_journal(p.staging + "/" + kJournal);
                if (j.control_sha256 != sum || !path_exists(p.staging + "/" + kKeyringDirName + "/keyring.json"))
                    throw CliError("\"" + p.staging + "\" exists but is not a conversion of this cluster in "
                                   "progress (its journal is missing or names another pg_control); remove it, "
                                   "then run pg_cmk encrypt again",
                                   ErrorCategory::Exists);
                std::printf("pg_cmk: resuming the conversion of %s (%zu files already done)%s\n", p.dir.c_str(),
                            j.done.size(),
                            (a.has("key-id") || a.has("provider")) ? "; the keyring of the first run is kept, "
                                                                     "the key options are not used"
                                                                   : "");
            }
            check_space(p.parent, bytes_left(entries, j));
            std::optional<NewKeyring> nk;
            if (!resume) nk = new_keyring(ko);  // the KMS call, before anything changes on disk
            // From here the original does not start (no global/pg_control), plain or
            // with the layer; the staging directory gets pg_control only at the swap.
            if (!marked) rename_durable(p.dir + "/global/pg_control", marker, p.dir + "/global");
            lifecycle::crash_point("encrypt:after_mark");
            if (!resume) {
                // Made whole, then renamed into place: the staging directory exists only
                // with its keyring, its empty key map and its journal.
                struct stat sb;
                must(stat(p.dir.c_str(), &sb) == 0, "cannot stat \"" + p.dir + "\"");
                must(mkdir(p.staging_new.c_str(), 0700) == 0, "cannot create \"" + p.staging_new + "\"");
                must(chmod(p.staging_new.c_str(), sb.st_mode & 07777) == 0, "cannot chmod \"" + p.staging_new + "\"");
                const std::string kdir = p.staging_new + "/" + kKeyringDirName;
                must(mkdir(kdir.c_str(), 0700) == 0, "cannot create \"" + kdir + "\"");
                save_keyring(kdir, nk->kr);
                KeyMap::create_empty(kdir, nk->kr.cluster_id, nk->kr.kek_generation);
                const std::string h = encrypt_journal::header(sum);
                sys::write_file_atomic((p.staging_new + "/" + kJournal).c_str(), h.data(), h.size(), 0600);
                must(sys::fsync_dir(kdir.c_str()) == 0, "cannot fsync \"" + kdir + "\"");
                rename_durable(p.staging_new, p.staging, p.parent);
                lifecycle::crash_point("encrypt:after_staging");
                std::printf("pg_cmk: converting %s into %s (key \"%s\" of provider \"%s\"%s)\n", p.dir.c_str(),
                            p.staging.c_str(), nk->key_id.c_str(), ko.provider_name.c_str(),
                            nk->created_key ? ", created" : "");
            }
            std::fflush(stdout);

            const std::string self = self_executable();
            const double t0 = now_s();
            int status = run_and_wait(self, {self, "__encrypt-copy", p.dir, p.staging, std::to_string(getpid())},
                                      layer_environment(layer, p.staging, ""));
            secs = now_s() - t0;
            if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
                throw CliError(std::string("the encrypting copy failed (") +
                               (WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                                    : "exit " + std::to_string(WEXITSTATUS(status))) +
                               "); fix the cause above and run the same pg_cmk encrypt again: it resumes");

            // --- the staging directory is completed: configuration, pg_control last ---
            lifecycle::crash_point("encrypt:after_copy");
            add_preload(p.staging);
            std::string c = sys::read_file(marker.c_str(), 65536);
            sys::write_file_atomic(staged_control.c_str(), c.data(), c.size(), 0600);
            lifecycle::crash_point("encrypt:after_control");
            must(::unlink((p.staging + "/" + kJournal).c_str()) == 0, "cannot remove the journal");
            must(sys::fsync_dir(p.staging.c_str()) == 0, "cannot fsync \"" + p.staging + "\"");
        }
        // --- the swap ------------------------------------------------------------------
        lifecycle::crash_point("encrypt:before_swap");
        rename_durable(p.dir, p.orig, p.parent);
        lifecycle::crash_point("encrypt:after_original_aside");
        rename_durable(p.staging, p.dir, p.parent);
        lifecycle::crash_point("encrypt:after_swap");
    }
    // --- activation: the encrypted cluster gets its pg_control, and can start ----------
    const std::string activate = p.dir + "/global/" + kMarker;
    if (path_exists(activate)) rename_durable(activate, p.dir + "/global/pg_control", p.dir + "/global");
    lifecycle::crash_point("encrypt:after_activate");
    finish_original(p, remove);
    lock.done = true;

    Keyring kr = load_keyring(p.dir + "/" + kKeyringDirName);
    std::string pg_ctl = find_tool("pg_ctl");
    if (pg_ctl.empty()) pg_ctl = "pg_ctl";
    std::printf(
        "\npg_cmk: cluster encrypted%s\n"
        "  data directory:   %s\n"
        "  provider:         %s\n"
        "  key id:           %s\n"
        "  KEK fingerprint:  %s\n",
        secs > 0 ? "" : " (an interrupted conversion, completed)", p.dir.c_str(), kr.config.provider.c_str(),
        kr.config.key_id.c_str(), kr.kek_fingerprint.c_str());
    if (path_exists(p.orig))
        std::printf(
            "\nWARNING: the PLAINTEXT original of the cluster is kept at\n"
            "    %s\n"
            "It holds every row in clear and is not protected by the key. Once the encrypted\n"
            "cluster is verified, remove it:\n"
            "    rm -rf %s\n",
            p.orig.c_str(), p.orig.c_str());
    std::printf("Start the server with:\n    %s -D %s -l logfile start\n", pg_ctl.c_str(), p.dir.c_str());
    return 0;
}

}  // namespace cmk::cli
