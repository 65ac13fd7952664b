// `pg_cmk exec`: runs a stock PostgreSQL tool (pg_waldump, pg_checksums, pg_resetwal,
// ...) on an encrypted cluster by replacing this process with it, the encrypting file
// layer preloaded and pointed at the data directory. The exit status is the tool's.
// Tools that would write plaintext copies of the cluster or move key maps between
// clusters are refused before they run (issue 16: no route may report success while
// writing something that cannot be restored or that is not ciphertext).
#include <limits.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli.hpp"

namespace cmk::cli {
namespace {

const char kExecUsage[] =
    "pg_cmk exec runs a PostgreSQL tool on a cluster encrypted by cmk_lakebase, with\n"
    "the encrypting file layer preloaded, so that the tool reads and writes the\n"
    "cluster's files as plaintext.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk exec -D DATADIR -- TOOL [ARGS...]\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DATADIR   data directory of the encrypted cluster\n"
    "      --allow-core-dumps let the tool dump core and be traced by its user (its\n"
    "                         memory holds the cluster's keys: debugging only)\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "TOOL is a name looked up in the PostgreSQL bindir first, then in PATH, or a path.\n"
    "Pass the data directory to the tool as well if it needs one, e.g.\n"
    "  pg_cmk exec -D /srv/pg -- pg_checksums --check -D /srv/pg\n"
    "The exit status is the tool's.\n"
    "\n"
    "Refused (they would write plaintext copies or copy key maps between clusters):\n"
    "pg_basebackup, pg_combinebackup, pg_rewind, pg_upgrade.\n"
    "pg_receivewal runs with its segments encrypted as in pg_wal (uncompressed only).\n";

// Tools that cannot run safely under the layer, with why and what to do instead. The
// layer encrypts only paths inside the one data directory it serves: a copy written
// elsewhere is plaintext, and a tool that copies files between two clusters would
// carry ciphertext under one cluster's keys into the other's key map.
struct Refusal {
    const char* tool;
    const char* why;
    const char* instead;
};
const Refusal kRefused[] = {
    {"pg_basebackup", "it would write a plaintext copy of the cluster (the server sends the files decrypted)",
     "use pg_cmk basebackup, which runs it with the backup encrypted under its own keyring"},
    {"pg_combinebackup", "the layer would read every input backup under the keys of one data directory",
     "use pg_cmk combinebackup, which runs it with each input read under its own keys"},
    {"pg_rewind", "it copies files and the key map from the source cluster over the target's without re-keying them",
     "re-create the old primary as a standby of the new one with pg_cmk basebackup -R"},
    {"pg_upgrade", "it copies data files between clusters without re-keying them, leaving a corrupt new cluster",
     "use pg_cmk upgrade, which runs it and gives the new cluster's key map the keys of the files it carries"},
};

// pg_receivewal's target directory, absolute (the layer encrypts the segments written
// there under the keys they have in pg_wal). Compression is refused: a compressed
// segment has another name and would be written in plaintext.
std::string receivewal_target(const std::vector<std::string>& argv) {
    std::string dir;
    for (size_t i = 1; i < argv.size(); i++) {
        const std::string& a = argv[i];
        std::string compress;
        if (a == "-D" || a == "--directory") {
            if (i + 1 < argv.size()) dir = argv[++i];
        } else if (a.compare(0, 2, "-D") == 0 && a.size() > 2) {
            dir = a.substr(2);
        } else if (a.compare(0, 12, "--directory=") == 0) {
            dir = a.substr(12);
        } else if (a == "-Z" || a == "--compress") {
            compress = i + 1 < argv.size() ? argv[++i] : "";
        } else if (a.compare(0, 2, "-Z") == 0 && a.size() > 2) {
            compress = a.substr(2);
        } else if (a.compare(0, 11, "--compress=") == 0) {
            compress = a.substr(11);
        } else if (a == "--help" || a == "-?" || a == "--version" || a == "-V") {
            return "/nonexistent";
        }
        if (!compress.empty() && compress != "0" && compress != "none")
            throw CliError("pg_cmk exec runs pg_receivewal without compression only: a compressed segment would be "
                           "written in plaintext (ciphertext does not compress; drop -Z/--compress)",
                           ErrorCategory::NotSupported);
    }
    if (dir.empty()) throw UsageError("exec", "pg_receivewal needs its target directory (-D DIR) on the command line");
    if (dir[0] != '/') {
        char cwd[PATH_MAX];
        if (!::getcwd(cwd, sizeof cwd)) throw CliError(std::string("getcwd: ") + std::strerror(errno));
        dir = std::string(cwd) + "/" + dir;
    }
    return dir;
}

std::string base_of(const std::string& path) {
    size_t slash = path.rfind('/');
    return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

int cmd_exec(const std::vector<std::string>& args) {
    const std::string cmdname = "exec";
    ParsedArgs a = parse_args(cmdname, args, {{"pgdata", 'D', true}, {"allow-core-dumps", 0, false}}, true);
    if (a.has("help")) {
        std::fputs(kExecUsage, stdout);
        return 0;
    }
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");
    if (a.rest.empty() || a.rest[0].empty())
        throw UsageError(cmdname, "no tool given (pg_cmk exec -D DATADIR -- TOOL [ARGS...])");

    const std::string datadir = encrypted_datadir(a.get("pgdata"));
    const std::string layer = layer_path();
    const std::string& tool = a.rest[0];
    std::string path = find_tool(tool);
    if (path.empty())
        throw CliError("tool \"" + tool + "\" not found in " + pg_bindir() + " or PATH; give its path");

    for (const Refusal& r : kRefused)
        if (base_of(path) == r.tool)
            throw CliError(std::string("pg_cmk exec refuses ") + r.tool + ": " + r.why +
                               ", which is not supported on a cluster encrypted by cmk_lakebase; instead, " +
                               r.instead + " (see docs/backups.md)",
                           ErrorCategory::NotSupported);

    std::vector<std::string> env = layer_environment(layer, datadir, "");
    // The layer makes the tool non-dumpable unless this says otherwise (startup.cpp).
    for (auto it = env.begin(); it != env.end();)
        it = it->compare(0, 30, "CMK_LAKEBASE_ALLOW_CORE_DUMPS=") == 0 ? env.erase(it) : it + 1;
    if (a.has("allow-core-dumps")) env.push_back("CMK_LAKEBASE_ALLOW_CORE_DUMPS=1");
    if (base_of(path) == "pg_receivewal") env.push_back("CMK_LAKEBASE_WAL_TARGET=" + receivewal_target(a.rest));
    // argv[0] is the resolved path: PostgreSQL tools find their siblings (pg_upgrade,
    // pg_rewind run postgres) through it.
    std::vector<std::string> tool_args = a.rest;
    tool_args[0] = path;
    // The audit trail grows with every tool run through the layer, this one included:
    // pg_cmk basebackup leaves it out of the manifest, and verification ignores it.
    if (base_of(path) == "pg_verifybackup")
        tool_args.insert(tool_args.begin() + 1, "--ignore=cmk_lakebase/audit.log");
    exec_replacing(path, tool_args, env);
}

}  // namespace cmk::cli
