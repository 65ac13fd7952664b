// `pg_cmk basebackup`: an online base backup of a running encrypted cluster over the
// replication protocol, encrypted on the destination from its first byte (issue 16).
//
// The server sends its files decrypted (the walsender reads them through the layer);
// the stock pg_basebackup then runs with the layer preloaded and pointed at the
// destination as a new data directory with a keyring of its own (a new KEK under the
// CMK given here: the source's or another one), so every data file, WAL segment and
// SLRU it writes gets a fresh DEK in the destination's key map, durable before its
// first byte. What the source sends of its own cmk_lakebase/ directory is its key
// material (wrapped, no secret in clear); once the stream is complete:
//   1. the source's WAL master key is unwrapped from that copy (through the source's
//      CMK) and re-keys the WAL segments the stream wrote (they were written under a
//      transfer key), then is sealed into the destination's key map, so the backup
//      replays segments from the source's WAL archive (derived from the same master);
//   2. the source's copy is replaced by the destination's keyring and key map;
//   3. backup_manifest's entries for cmk_lakebase/ are rewritten for the new files
//      (and the manifest checksum recomputed), so pg_verifybackup passes through the
//      wrapper (pg_cmk exec adds --ignore=cmk_lakebase/audit.log: the audit trail
//      grows with every tool run through the layer);
//   4. pg_verifybackup runs on the result through the layer (unless --no-verify);
//   5. for tar format, the encrypted directory is packed into base.tar and pg_wal.tar.
// Anything that fails leaves no destination behind.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "cli.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/base/walcipher.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::cli {
namespace {

const char kUsage[] =
    "pg_cmk basebackup takes an online base backup of a running cluster encrypted by\n"
    "cmk_lakebase, over the replication protocol; the backup is ciphertext on disk,\n"
    "under a new KEK wrapped by the customer-managed key given here (the source's or\n"
    "another one).\n"
    "\n"
    "Usage:\n"
    "  pg_cmk basebackup -D DIR [OPTION]... [-- PG_BASEBACKUP_ARGS...]\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DIR       directory to write the backup to (new or empty)\n"
    "  -F, --format=p|t       plain (a data directory, the default) or tar (base.tar\n"
    "                         and pg_wal.tar of the encrypted files)\n"
    "  --provider=NAME        key provider of the backup (default local; the options\n"
    "  --kms-option=KEY=VALUE are those of pg_cmk initdb, docs/providers/)\n"
    "  --key-store=DIR        local key store (default: $CMK_LAKEBASE_KEY_STORE, else\n"
    "                         $HOME/.cmk_lakebase/keys)\n"
    "  --key-id=ID            customer-managed key of the backup (local: a new key is\n"
    "                         made if none is given)\n"
    "  --create-key           create the key given by --key-id (local provider)\n"
    "  --no-verify            do not run pg_verifybackup on the result\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "Arguments after \"--\" go to pg_basebackup: connection (-h -p -U -d), -X stream|fetch,\n"
    "-c fast, -R (write standby configuration), -S/-C (slot), -l, -P, -r, -v.\n"
    "Not supported (refused): -D/-F (use pg_cmk's), compression, --waldir, -T/tablespaces,\n"
    "-t/--target. The source's CMK must be usable from this host (its WAL master key is\n"
    "carried into the backup).\n"
    "\n"
    "Incremental backups (PostgreSQL 17+, summarize_wal = on at the source): pass\n"
    "--incremental=PRIOR/backup_manifest after \"--\", PRIOR being an earlier backup made\n"
    "by pg_cmk basebackup; restore with pg_cmk combinebackup.\n";

const char kCombineUsage[] =
    "pg_cmk combinebackup reconstructs a full backup from a full backup and the chain of\n"
    "incremental backups taken after it (PostgreSQL 17+), all made by pg_cmk basebackup,\n"
    "with the stock pg_combinebackup. The output is encrypted like the inputs: under a\n"
    "new KEK wrapped by the customer-managed key given here, with the source cluster's\n"
    "WAL master key, so it replays the source's WAL archive.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk combinebackup -o DIR [KEY OPTIONS] FULL INCREMENTAL... [-- PG_COMBINEBACKUP_ARGS...]\n"
    "\n"
    "Options:\n"
    "  -o, --output=DIR       directory to write the combined backup to (new or empty)\n"
    "  --provider=NAME        key provider of the output (default local; the options\n"
    "  --kms-option=KEY=VALUE are those of pg_cmk initdb, docs/providers/)\n"
    "  --key-store=DIR        local key store (default: $CMK_LAKEBASE_KEY_STORE, else\n"
    "                         $HOME/.cmk_lakebase/keys)\n"
    "  --key-id=ID            customer-managed key of the output (local: a new key is\n"
    "                         made if none is given)\n"
    "  --create-key           create the key given by --key-id (local provider)\n"
    "  --no-verify            do not run pg_verifybackup on the result\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "The inputs are plain-format backups (unpack tar ones first), oldest first; each\n"
    "one's CMK must be usable from this host. Arguments after \"--\" go to\n"
    "pg_combinebackup (-d, -N, --manifest-checksums, --no-manifest, --sync-method).\n"
    "Not supported (refused): --link, --clone, --copy-file-range, -T, --dry-run.\n";

const char* const kRefusedArgs[][2] = {
    {"-D", "give the backup directory with pg_cmk's own -D"},
    {"--pgdata", "give the backup directory with pg_cmk's own -D"},
    {"-F", "give the format with pg_cmk's own -F"},
    {"--format", "give the format with pg_cmk's own -F"},
    {"-z", "compressed backups are not supported (ciphertext does not compress)"},
    {"--gzip", "compressed backups are not supported (ciphertext does not compress)"},
    {"-Z", "compressed backups are not supported (ciphertext does not compress)"},
    {"--compress", "compressed backups are not supported (ciphertext does not compress)"},
    {"--waldir", "a WAL directory outside the backup is not supported"},
    {"-T", "tablespaces are not supported by pg_cmk basebackup yet"},
    {"--tablespace-mapping", "tablespaces are not supported by pg_cmk basebackup yet"},
    {"-t", "server-side targets are not supported (the backup must be written here, encrypted)"},
    {"--target", "server-side targets are not supported (the backup must be written here, encrypted)"},
};

// pg_combinebackup's options that pg_cmk combinebackup refuses.
const char* const kCombineRefusedArgs[][2] = {
    {"-o", "give the output directory with pg_cmk's own -o"},
    {"--output", "give the output directory with pg_cmk's own -o"},
    {"-k", "--link would share files between the output and the input backups, which are encrypted under "
           "each backup's own keys (not supported)"},
    {"--link", "--link would share files between the output and the input backups, which are encrypted "
               "under each backup's own keys (not supported)"},
    {"--clone", "cloning would copy the input backups' ciphertext, under their keys, into the output (not supported)"},
    {"--copy-file-range", "copy_file_range would copy the input backups' ciphertext, under their keys, into the "
                          "output (not supported)"},
    {"-T", "tablespaces are not supported by pg_cmk basebackup yet"},
    {"--tablespace-mapping", "tablespaces are not supported by pg_cmk basebackup yet"},
    {"-n", "--dry-run is not supported by pg_cmk combinebackup"},
    {"--dry-run", "--dry-run is not supported by pg_cmk combinebackup"},
};

template <size_t N>
void check_passed_args(const char* command, const std::vector<std::string>& rest, const char* const (&refused)[N][2]) {
    for (const std::string& arg : rest) {
        for (const auto& r : refused) {
            const std::string opt = r[0];
            bool hit = arg == opt;
            if (!hit && opt.size() == 2) hit = arg.compare(0, 2, opt) == 0;  // -Zgzip
            if (!hit && opt.size() > 2) hit = arg.compare(0, opt.size() + 1, opt + "=") == 0;
            if (hit)
                throw CliError(std::string("pg_cmk ") + command + ": \"" + arg + "\": " + r[1],
                               ErrorCategory::NotSupported);
        }
    }
}

// The wait status of a child as words for an error message.
std::string exit_words(int status) {
    if (WIFEXITED(status)) return "exit " + std::to_string(WEXITSTATUS(status));
    if (WIFSIGNALED(status)) return "killed by signal " + std::to_string(WTERMSIG(status));
    return "status " + std::to_string(status);
}

std::vector<std::string> list_dir(const std::string& dir) {
    std::vector<std::string> out;
    DIR* d = opendir(dir.c_str());
    if (!d) return out;
    while (struct dirent* e = readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.push_back(e->d_name);
    closedir(d);
    return out;
}

bool is_segment_name(const std::string& n) {
    if (n.size() != 24) return false;
    for (char c : n)
        if (!((c >= '0' && c <= '9') || (c >= 'A' && c <= 'F'))) return false;
    return true;
}

// The source's WAL master key, from the copy of its key material the stream brought.
SecureBytes source_wal_master(const std::string& src_dir) {
    if (!path_exists(src_dir + "/keyring.json"))
        throw CliError("the source server is not a cluster encrypted by cmk_lakebase (its backup has no "
                       "cmk_lakebase/keyring.json); use pg_basebackup for a plaintext server");
    for (const std::string& oid : list_dir(src_dir + "/db"))
        if (path_exists(src_dir + "/db/" + oid + "/keyring.json"))
            throw CliError("database " + oid + " of the source is bound to a key configuration of its own; "
                           "pg_cmk basebackup does not carry database bindings yet (not supported): unbind "
                           "it, or back up with pg_backup_start()/pg_backup_stop() (docs/backups.md)",
                           ErrorCategory::NotSupported);
    Keyring kr = load_keyring(src_dir);
    auto provider = audit::audited_provider(make_provider(kr.config), kr.bound_name());
    ClusterKeys keys = unlock_cluster_keys(src_dir, kr, *provider);
    std::unique_ptr<KeyMap> km = open_cluster_keymap(src_dir, kr, keys);
    std::optional<SecureBytes> m = km->get(kWalMasterId);
    if (!m)
        throw CliError("the source's key map has no WAL master key (a cluster of an older cmk_lakebase that "
                       "has not been restarted since the upgrade?): restart the source and retry");
    return std::move(*m);
}

std::string http_date(time_t t) {
    struct tm tm;
    gmtime_r(&t, &tm);
    char buf[64];
    strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S GMT", &tm);
    return buf;
}

std::string to_json(const rapidjson::Value& v) {
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    v.Accept(w);
    return std::string(sb.GetString(), sb.GetSize());
}

// The audit trail grows with every tool run through the layer (pg_verifybackup too):
// not in the manifest, ignored by verification.
const char kAuditLogRel[] = "cmk_lakebase/audit.log";

// Rewrites backup_manifest: the entries of cmk_lakebase/ (the source's key material,
// which the backup does not keep) are replaced by the backup's own files, with SHA-256
// checksums, and the manifest checksum (SHA-256 of everything before its last line) is
// recomputed. Other entries are kept as the server wrote them.
void rewrite_manifest(const std::string& dir) {
    const std::string path = dir + "/backup_manifest";
    std::string text = sys::read_file(path.c_str());
    rapidjson::Document doc;
    doc.Parse<rapidjson::kParseStopWhenDoneFlag>(text.data(), text.size());
    if (doc.HasParseError() || !doc.IsObject() || !doc.HasMember("Files") || !doc["Files"].IsArray())
        throw CliError("cannot parse " + path + " (not a PostgreSQL backup manifest)");
    std::string out = "{ ";
    bool first_member = true;
    for (auto& m : doc.GetObject()) {
        std::string name = m.name.GetString();
        if (name == "Manifest-Checksum") continue;
        if (!first_member) out += ",\n";
        first_member = false;
        if (name != "Files") {
            out += to_json(m.name) + ": ";
            if (m.value.IsArray()) {
                out += "[";
                bool first = true;
                for (auto& e : m.value.GetArray()) {
                    out += first ? "\n" : ",\n";
                    first = false;
                    out += to_json(e);
                }
                out += "\n]";
            } else {
                out += to_json(m.value);
            }
            continue;
        }
        out += "\"Files\": [";
        bool first = true;
        for (auto& e : m.value.GetArray()) {
            if (e.IsObject() && e.HasMember("Path") && e["Path"].IsString() &&
                std::string(e["Path"].GetString()).compare(0, 13, "cmk_lakebase/") == 0)
                continue;
            out += first ? "\n" : ",\n";
            first = false;
            out += to_json(e);
        }
        std::vector<std::string> ours;
        std::vector<std::string> todo{"cmk_lakebase"};
        while (!todo.empty()) {
            std::string rel = todo.back();
            todo.pop_back();
            for (const std::string& n : list_dir(dir + "/" + rel)) {
                std::string r = rel + "/" + n;
                struct stat sb;
                if (lstat((dir + "/" + r).c_str(), &sb) != 0) continue;
                if (S_ISDIR(sb.st_mode)) todo.push_back(r);
                else if (S_ISREG(sb.st_mode) && r != kAuditLogRel) ours.push_back(r);
            }
        }
        for (const std::string& r : ours) {
            std::string content = sys::read_file((dir + "/" + r).c_str());
            struct stat sb;
            if (stat((dir + "/" + r).c_str(), &sb) != 0) throw CliError("cannot stat " + dir + "/" + r);
            auto sum = sha256(content.data(), content.size());
            rapidjson::StringBuffer sb2;
            rapidjson::Writer<rapidjson::StringBuffer> w(sb2);
            w.StartObject();
            w.Key("Path");
            w.String(r.c_str());
            w.Key("Size");
            w.Uint64(uint64_t(content.size()));
            w.Key("Last-Modified");
            w.String(http_date(sb.st_mtime).c_str());
            w.Key("Checksum-Algorithm");
            w.String("SHA256");
            w.Key("Checksum");
            w.String(hex_encode(sum.data(), sum.size()).c_str());
            w.EndObject();
            out += first ? "\n" : ",\n";
            first = false;
            out += std::string(sb2.GetString(), sb2.GetSize());
        }
        out += " ]";
    }
    out += ",\n";
    auto sum = sha256(out.data(), out.size());
    out += "\"Manifest-Checksum\": \"" + hex_encode(sum.data(), sum.size()) + "\"}\n";
    const std::string tmp = path + ".pg_cmk";
    int fd = sys::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || sys::write_full(fd, out.data(), out.size()) != 0 || fsync(fd) != 0) {
        int err = errno;
        if (fd >= 0) sys::close(fd);
        throw CliError("cannot write " + tmp + ": " + std::strerror(err));
    }
    sys::close(fd);
    if (sys::rename(tmp.c_str(), path.c_str()) != 0)
        throw CliError("cannot replace " + path + ": " + std::strerror(errno));
}

// Removes an output directory on failure (one that existed empty is left empty).
struct OutputCleanup {
    const std::string& dir;
    bool existed;
    bool done = false;
    ~OutputCleanup() {
        if (done) return;
        remove_tree(dir);
        if (existed) (void)mkdir(dir.c_str(), 0700);
    }
};

// A new keyring and an empty key map in a new staging directory path (removed by
// staging unless kept). Returns path.
std::string staging_keys(const std::string& path, const NewKeyring& nk, StagingDir& staging) {
    if (mkdir(path.c_str(), 0700) != 0)
        throw CliError("cannot create staging directory \"" + path + "\": " + std::strerror(errno));
    staging.path = path;
    save_keyring(path, nk.kr);
    KeyMap::create_empty(path, nk.kr.cluster_id, nk.kr.kek_generation);
    return path;
}

void run_checked(const std::string& what, const std::string& path, const std::vector<std::string>& args,
                 const std::vector<std::string>& env) {
    int status = run_and_wait(path, args, env);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0))
        throw CliError(what + " failed (" + exit_words(status) + ")");
}

}  // namespace

int cmd_basebackup(const std::vector<std::string>& args) {
    const std::string cmdname = "basebackup";
    ParsedArgs a = parse_args(
        cmdname, args,
        with_key_option_specs({{"pgdata", 'D', true}, {"format", 'F', true}, {"no-verify", 0, false}}));
    if (a.has("help")) {
        std::fputs(kUsage, stdout);
        return 0;
    }
    if (!a.positional.empty())
        throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] +
                                      "\" (arguments for pg_basebackup go after \"--\")");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no backup directory given (-D DIR)");
    const std::string format = a.get("format", "p");
    const bool tar = format == "t" || format == "tar";
    if (!tar && format != "p" && format != "plain")
        throw UsageError(cmdname, "invalid format \"" + format + "\" (use p/plain or t/tar)");
    if (a.get("pgdata") == "-") throw UsageError(cmdname, "writing the backup to standard output is not supported");
    KeyOptions ko = parse_key_options(cmdname, a);
    check_passed_args("basebackup", a.rest, kRefusedArgs);

    const std::string dest = absolute_new_dir(a.get("pgdata"));
    if (path_exists(dest)) {
        if (!is_directory(dest)) throw CliError("\"" + dest + "\" exists and is not a directory");
        if (!dir_is_empty(dest)) throw CliError("backup directory \"" + dest + "\" exists and is not empty");
    }
    check_key_store_outside(cmdname, ko, dest);
    const std::string parent = parent_dir(dest);
    const std::string layer = layer_path();
    const std::string pg_basebackup = find_tool("pg_basebackup");
    if (pg_basebackup.empty())
        throw CliError("pg_basebackup not found in " + pg_bindir() + " or PATH; set CMK_LAKEBASE_PG_BINDIR");
    const std::string pg_verifybackup = find_tool("pg_verifybackup");
    if (pg_verifybackup.empty() && !a.has("no-verify"))
        throw CliError("pg_verifybackup not found in " + pg_bindir() + " (or give --no-verify)");
    const std::string tag = "." + base_name(dest) + ".cmk_basebackup." + std::to_string(getpid());

    // The data directory pg_basebackup writes: the destination itself (plain), or a
    // work directory beside it that is packed into tar files at the end. On failure
    // both are removed (a destination that existed empty is left empty).
    const bool dest_existed = path_exists(dest);
    if (!dest_existed && mkdir(dest.c_str(), 0700) != 0)
        throw CliError("cannot create \"" + dest + "\": " + std::strerror(errno));
    const std::string work = tar ? parent + "/" + tag + ".work" : dest;
    StagingDir work_dir;  // tar only: removed at the end
    if (tar) {
        if (mkdir(work.c_str(), 0700) != 0) throw CliError("cannot create \"" + work + "\": " + std::strerror(errno));
        work_dir.path = work;
    }
    OutputCleanup dest_cleanup{dest, dest_existed};

    // --- the backup's keyring and (empty) key map, in a staging directory -----------
    NewKeyring nk = new_keyring(ko);
    StagingDir staging;
    const std::string staging_path = staging_keys(parent + "/" + tag + ".keys", nk, staging);

    {
        // --- the stream, under the layer --------------------------------------------
        std::vector<std::string> bb{pg_basebackup, "-D", work, "-F", "p"};
        bb.insert(bb.end(), a.rest.begin(), a.rest.end());
        run_checked("pg_basebackup", pg_basebackup, bb, layer_environment(layer, work, staging_path));

        // --- 1. the source's WAL master re-keys the streamed WAL, joins the key map ---
        const std::string src = work + "/" + kKeyringDirName;
        SecureBytes source_master = source_wal_master(src);
        {
            auto provider = audit::audited_provider(make_provider(nk.kr.config), nk.kr.bound_name());
            ClusterKeys keys = unlock_cluster_keys(staging_path, nk.kr, *provider);
            std::unique_ptr<KeyMap> km = open_cluster_keymap(staging_path, nk.kr, keys);
            std::optional<SecureBytes> transfer = km->get(kWalMasterId);
            if (transfer) {
                for (const std::string& n : list_dir(work + "/pg_wal"))
                    if (is_segment_name(n)) wal_rekey_file(work + "/pg_wal/" + n, n, *transfer, source_master);
                transfer->wipe();
            }
            std::vector<KeyMap::Import> imp;
            imp.push_back(KeyMap::Import{kWalMasterId, FileClass::Wal, std::move(source_master)});
            km->put(imp);
        }
        if (sys::fsync_dir((work + "/pg_wal").c_str()) != 0 && errno != ENOENT)
            throw CliError("cannot fsync " + work + "/pg_wal: " + std::strerror(errno));

        // --- 2. the backup's key material replaces the source's copy ------------------
        remove_tree(src);
        if (path_exists(src)) throw CliError("cannot remove the source's key material copy " + src);
        if (rename(staging_path.c_str(), src.c_str()) != 0)
            throw CliError("cannot move \"" + staging_path + "\" to \"" + src + "\": " + std::strerror(errno));
        staging.keep = true;
        if (sys::fsync_dir(work.c_str()) != 0) throw CliError("cannot fsync \"" + work + "\": " + std::strerror(errno));

        // --- 3. the manifest names the backup's own key files ------------------------
        const bool manifest = path_exists(work + "/backup_manifest");
        if (manifest) rewrite_manifest(work);

        // --- 4. verified through the layer -----------------------------------------
        if (!a.has("no-verify")) {
            if (!manifest)
                throw CliError("no backup_manifest to verify (--no-manifest given?); add --no-verify to skip "
                               "verification");
            run_checked("pg_verifybackup", pg_verifybackup,
                        {pg_verifybackup, std::string("--ignore=") + kAuditLogRel, work},
                        layer_environment(layer, work, ""));
        }

        // --- 5. tar format: the encrypted files packed ------------------------------
        if (tar) {
            const std::vector<std::string> env = plain_environment();
            run_checked("tar (base.tar)", "/bin/tar",
                        {"/bin/tar", "-C", work, "-cf", dest + "/base.tar", "--format=ustar", "--exclude=./pg_wal/?*",
                         "--exclude=./backup_manifest", "."},
                        env);
            if (path_exists(work + "/pg_wal"))
                run_checked("tar (pg_wal.tar)", "/bin/tar",
                            {"/bin/tar", "-C", work + "/pg_wal", "-cf", dest + "/pg_wal.tar", "--format=ustar", "."},
                            env);
            if (manifest) {
                std::string m = sys::read_file((work + "/backup_manifest").c_str());
                int fd = sys::open((dest + "/backup_manifest").c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
                if (fd < 0 || sys::write_full(fd, m.data(), m.size()) != 0 || fsync(fd) != 0) {
                    int err = errno;
                    if (fd >= 0) sys::close(fd);
                    throw CliError("cannot write " + dest + "/backup_manifest: " + std::strerror(err));
                }
                sys::close(fd);
            }
            for (const char* f : {"/base.tar", "/pg_wal.tar"}) {
                int fd = sys::open((dest + f).c_str(), O_RDONLY | O_CLOEXEC);
                if (fd >= 0) {
                    (void)fsync(fd);
                    sys::close(fd);
                }
            }
            if (sys::fsync_dir(dest.c_str()) != 0) throw CliError("cannot fsync \"" + dest + "\"");
        }
    }
    dest_cleanup.done = true;

    std::printf(
        "\npg_cmk: encrypted base backup written\n"
        "  backup:           %s (%s)\n"
        "  provider:         %s\n"
        "  key id:           %s%s\n"
        "  KEK fingerprint:  %s\n"
        "  verified:         %s\n",
        dest.c_str(), tar ? "tar: base.tar, pg_wal.tar" : "plain", ko.provider_name.c_str(), nk.key_id.c_str(),
        nk.created_key ? " (created)" : "", nk.kr.kek_fingerprint.c_str(),
        a.has("no-verify") ? "no (--no-verify)" : "pg_verifybackup passed");
    return 0;
}


namespace {

// The WAL master key of a backup made by pg_cmk basebackup (all backups of one cluster
// carry the same one).
SecureBytes backup_wal_master(const std::string& backup) {
    const std::string kdir = backup + "/" + kKeyringDirName;
    const std::string refusal = "\"" + backup + "\" is not a backup made by pg_cmk basebackup";
    if (!path_exists(kdir + "/keyring.json"))
        throw CliError(refusal + " (no " + kKeyringDirName +
                       "/keyring.json): pg_cmk combinebackup combines encrypted backups only");
    // The stock pg_basebackup copies the source's cmk_lakebase/ too, beside plaintext
    // files: the shared catalogs' first pages tell. In a backup of ours they are
    // ciphertext, which passes for a page header or an INCREMENTAL header with a
    // chance of about 2^-16 or 2^-32 per file; a plaintext backup shows them all.
    size_t checked = 0, plain = 0;
    std::vector<uint8_t> unit(kUnitSize);
    for (const std::string& n : list_dir(backup + "/global")) {
        if (classify_relative("global/" + n) != FileClass::Relation) continue;
        int fd = sys::open((backup + "/global/" + n).c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t got = sys::pread_full(fd, unit.data(), unit.size(), 0);
        sys::close(fd);
        if (got < 4) continue;
        const uint32_t head = uint32_t(unit[0]) | uint32_t(unit[1]) << 8 | uint32_t(unit[2]) << 16 |
                              uint32_t(unit[3]) << 24;
        bool incremental = n.compare(0, 12, "INCREMENTAL.") == 0;
        if (incremental) {
            checked++;
            if (head == 0xd3ae1f0d) plain++;  // PostgreSQL's INCREMENTAL_MAGIC
        } else if (got == ssize_t(kUnitSize) && !std::all_of(unit.begin(), unit.end(), [](uint8_t b) { return b == 0; })) {
            checked++;
            if (page_header_ok(unit.data())) plain++;
        }
    }
    if (checked > 0 && plain * 2 >= checked)
        throw CliError(refusal + ": its relation files are plaintext (" + std::to_string(plain) + " of " +
                       std::to_string(checked) + " shared catalog files checked), as the stock pg_basebackup "
                       "writes them; pg_cmk combinebackup combines encrypted backups only");
    return source_wal_master(kdir);
}

}  // namespace

int cmd_combinebackup(const std::vector<std::string>& args) {
    const std::string cmdname = "combinebackup";
    ParsedArgs a = parse_args(cmdname, args, with_key_option_specs({{"output", 'o', true}, {"no-verify", 0, false}}));
    if (a.has("help")) {
        std::fputs(kCombineUsage, stdout);
        return 0;
    }
    if (!a.has("output") || a.get("output").empty()) throw UsageError(cmdname, "no output directory given (-o DIR)");
    if (a.positional.empty()) throw UsageError(cmdname, "no backups given (FULL INCREMENTAL...)");
    KeyOptions ko = parse_key_options(cmdname, a);
    check_passed_args("combinebackup", a.rest, kCombineRefusedArgs);

    const std::string out = absolute_new_dir(a.get("output"));
    if (path_exists(out)) {
        if (!is_directory(out)) throw CliError("\"" + out + "\" exists and is not a directory");
        if (!dir_is_empty(out)) throw CliError("output directory \"" + out + "\" exists and is not empty");
    }
    std::vector<std::string> inputs;
    for (const std::string& p : a.positional) {
        std::string in = existing_dir(p, "backup directory");
        if (in.find(':') != std::string::npos)
            throw CliError("backup directory \"" + in + "\" has a ':' in its path (not supported)",
                           ErrorCategory::NotSupported);
        if (in == out || is_within(out, in) || is_within(in, out))
            throw CliError("the output directory \"" + out + "\" and the backup \"" + in + "\" overlap");
        for (const std::string& other : inputs)
            if (other == in) throw CliError("backup \"" + in + "\" is given twice");
        inputs.push_back(in);
    }
    check_key_store_outside(cmdname, ko, out);
    const std::string layer = layer_path();
    const std::string pg_combinebackup = find_tool("pg_combinebackup");
    if (pg_combinebackup.empty())
        throw CliError("pg_combinebackup not found in " + pg_bindir() +
                           " (incremental backups need PostgreSQL 17 or later); set CMK_LAKEBASE_PG_BINDIR",
                       ErrorCategory::NotSupported);
    const std::string pg_verifybackup = find_tool("pg_verifybackup");
    if (pg_verifybackup.empty() && !a.has("no-verify"))
        throw CliError("pg_verifybackup not found in " + pg_bindir() + " (or give --no-verify)");

    // Every input is an encrypted backup of the same cluster: one WAL master key. Each
    // CMK is asked now, before anything is written.
    SecureBytes master = backup_wal_master(inputs.back());
    for (size_t i = 0; i + 1 < inputs.size(); i++) {
        SecureBytes m = backup_wal_master(inputs[i]);
        if (m.size() != master.size() || !ct_equal(m.data(), master.data(), m.size()))
            throw CliError("backups \"" + inputs[i] + "\" and \"" + inputs.back() +
                           "\" are not of the same encrypted cluster (their WAL master keys differ)");
    }

    const std::string parent = parent_dir(out);
    const std::string tag = "." + base_name(out) + ".cmk_combinebackup." + std::to_string(getpid());
    const bool out_existed = path_exists(out);
    OutputCleanup out_cleanup{out, out_existed};

    // --- the output's keyring and key map (with the cluster's WAL master key) ---------
    NewKeyring nk = new_keyring(ko);
    StagingDir staging;
    const std::string staging_path = staging_keys(parent + "/" + tag + ".keys", nk, staging);
    {
        auto provider = audit::audited_provider(make_provider(nk.kr.config), nk.kr.bound_name());
        ClusterKeys keys = unlock_cluster_keys(staging_path, nk.kr, *provider);
        std::unique_ptr<KeyMap> km = open_cluster_keymap(staging_path, nk.kr, keys);
        std::vector<KeyMap::Import> imp;
        imp.push_back(KeyMap::Import{kWalMasterId, FileClass::Wal, std::move(master)});
        km->put(imp);
    }

    // --- pg_combinebackup under the layer: inputs read-only, each under its own keys --
    std::vector<std::string> cb{pg_combinebackup, "-o", out};
    cb.insert(cb.end(), inputs.begin(), inputs.end());
    cb.insert(cb.end(), a.rest.begin(), a.rest.end());
    std::vector<std::string> env = layer_environment(layer, out, staging_path);
    std::string sources;
    for (const std::string& in : inputs) sources += (sources.empty() ? "" : ":") + in;
    env.push_back("CMK_LAKEBASE_SOURCE_DIRS=" + sources);
    run_checked("pg_combinebackup", pg_combinebackup, cb, env);

    // --- the output's key material replaces the copy of the last input's -------------
    const std::string kdir = out + "/" + kKeyringDirName;
    remove_tree(kdir);
    if (path_exists(kdir)) throw CliError("cannot remove the copied key material " + kdir);
    if (rename(staging_path.c_str(), kdir.c_str()) != 0)
        throw CliError("cannot move \"" + staging_path + "\" to \"" + kdir + "\": " + std::strerror(errno));
    staging.keep = true;
    if (sys::fsync_dir(out.c_str()) != 0) throw CliError("cannot fsync \"" + out + "\": " + std::strerror(errno));

    const bool manifest = path_exists(out + "/backup_manifest");
    if (manifest) rewrite_manifest(out);
    if (!a.has("no-verify")) {
        if (!manifest)
            throw CliError("no backup_manifest to verify (--no-manifest given?); add --no-verify to skip verification");
        run_checked("pg_verifybackup", pg_verifybackup, {pg_verifybackup, std::string("--ignore=") + kAuditLogRel, out},
                    layer_environment(layer, out, ""));
    }
    out_cleanup.done = true;

    std::printf(
        "\npg_cmk: encrypted combined backup written\n"
        "  backup:           %s (from %zu backups)\n"
        "  provider:         %s\n"
        "  key id:           %s%s\n"
        "  KEK fingerprint:  %s\n"
        "  verified:         %s\n",
        out.c_str(), inputs.size(), ko.provider_name.c_str(), nk.key_id.c_str(), nk.created_key ? " (created)" : "",
        nk.kr.kek_fingerprint.c_str(), a.has("no-verify") ? "no (--no-verify)" : "pg_verifybackup passed");
    return 0;
}

}  // namespace cmk::cli
