// `pg_cmk initdb`: creates a new cluster that is encrypted from its first byte. The
// keyring (a new KEK wrapped by the CMK) and an empty key map are prepared in a
// staging directory next to the data directory; the stock initdb then runs with the
// encrypting file layer preloaded and pointed at that staging keyring; on success the
// staging directory becomes <DATADIR>/cmk_lakebase and postgresql.conf loads the
// module. On failure nothing of ours is left behind except a key we created.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::cli {
namespace {

const char kInitdbUsage[] =
    "pg_cmk initdb creates a new PostgreSQL cluster encrypted by cmk_lakebase.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk initdb -D DATADIR [OPTION]... [-- INITDB_ARGS...]\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DATADIR   data directory to create (must not exist, or be empty)\n"
    "  --provider=NAME        key provider: local (the default), aws, azure, gcp,\n"
    "                         vault, kmip (docs/providers/ has each one's options)\n"
    "  --kms-option=KEY=VALUE a provider option (repeatable), e.g. region=eu-west-1;\n"
    "                         credentials are references (file paths, environment),\n"
    "                         never secrets\n"
    "  --key-store=DIR        local key store directory, outside the data directory\n"
    "                         (default: $CMK_LAKEBASE_KEY_STORE, else\n"
    "                         $HOME/.cmk_lakebase/keys)\n"
    "  --key-id=ID            customer-managed key to use; it must exist in the key\n"
    "                         store unless --create-key is given (default: a new key\n"
    "                         \"cmk-<8 hex digits>\")\n"
    "  --create-key           create the key given by --key-id\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "Arguments after \"--\" go to initdb (e.g. -A trust -U postgres --locale=C).\n"
    "initdb always runs with data checksums (-k).\n";

const char kConfBlock[] =
    "\n# Added by pg_cmk initdb: the cmk_lakebase encrypting file layer and key management.\n"
    "shared_preload_libraries = 'cmk_lakebase'\n";

void append_conf(const std::string& datadir) {
    const std::string conf_path = datadir + "/postgresql.conf";
    std::string conf;
    try {
        conf = sys::read_file(conf_path.c_str());
    } catch (const std::exception& e) {
        throw CliError("initdb succeeded but " + conf_path + " cannot be read (" + e.what() +
                       "); add shared_preload_libraries = 'cmk_lakebase' to it by hand");
    }
    if (conf_sets_preload(conf))
        throw CliError(conf_path +
                       " already sets shared_preload_libraries; add 'cmk_lakebase' as the "
                       "first entry of that list before starting the server");
    int fd = sys::open(conf_path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 || sys::write_full(fd, kConfBlock, sizeof kConfBlock - 1) != 0 || fsync(fd) != 0) {
        int err = errno;
        if (fd >= 0) sys::close(fd);
        throw CliError("cannot append to " + conf_path + ": " + std::strerror(err) +
                       "; add shared_preload_libraries = 'cmk_lakebase' to it by hand");
    }
    sys::close(fd);
}

}  // namespace

int cmd_initdb(const std::vector<std::string>& args) {
    const std::string cmdname = "initdb";
    ParsedArgs a = parse_args(cmdname, args, with_key_option_specs({{"pgdata", 'D', true}}));
    if (a.has("help")) {
        std::fputs(kInitdbUsage, stdout);
        return 0;
    }
    if (!a.positional.empty())
        throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] +
                                      "\" (arguments for initdb go after \"--\")");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");
    KeyOptions ko = parse_key_options(cmdname, a);
    const bool local = ko.local;
    for (const auto& arg : a.rest) {
        if (arg == "-D" || arg.compare(0, 2, "-D") == 0 || arg == "--pgdata" ||
            arg.compare(0, 9, "--pgdata=") == 0)
            throw UsageError(cmdname,
                             "give the data directory with pg_cmk's own -D, not in "
                             "the initdb arguments after \"--\"");
    }
    if (geteuid() == 0)
        throw CliError(
            "cannot be run as root (initdb refuses to); run it as the operating "
            "system user that will own the server, e.g. runuser -u postgres -- "
            "pg_cmk initdb ...");

    // --- validate everything before any side effect --------------------------------
    const std::string datadir = absolute_new_dir(a.get("pgdata"));
    if (path_exists(datadir)) {
        if (!is_directory(datadir))
            throw CliError("\"" + datadir +
                           "\" exists and is not a directory; give a new "
                           "directory for -D");
        if (!dir_is_empty(datadir))
            throw CliError("data directory \"" + datadir +
                           "\" exists and is not empty; give "
                           "a new or empty directory for -D");
    }
    const std::string parent = parent_dir(datadir);
    check_key_store_outside(cmdname, ko, datadir);
    const std::string& store = ko.store;
    const std::string layer = layer_path();
    const std::string initdb = find_tool("initdb");
    if (initdb.empty())
        throw CliError("initdb not found in " + pg_bindir() +
                       " or PATH; install the PostgreSQL server package or set "
                       "CMK_LAKEBASE_PG_BINDIR");
    StagingDir staging;
    const std::string staging_path =
        parent + "/." + base_name(datadir) + ".cmk_lakebase." + std::to_string(getpid());
    if (path_exists(staging_path))
        throw CliError("staging directory \"" + staging_path +
                       "\" already exists (left by an earlier run?); remove it and retry");

    // --- the key (the local provider may create one), the keyring under it ---------
    NewKeyring nk = new_keyring(ko);
    const std::string& key_id = nk.key_id;
    const bool created_key = nk.created_key;
    const std::string& provider_name = ko.provider_name;
    Keyring& kr = nk.kr;
    if (mkdir(staging_path.c_str(), 0700) != 0)
        throw CliError("cannot create staging directory \"" + staging_path + "\": " + std::strerror(errno));
    staging.path = staging_path;
    save_keyring(staging_path, kr);
    KeyMap::create_empty(staging_path, kr.cluster_id, kr.kek_generation);

    // --- the stock initdb under the layer -------------------------------------------
    std::vector<std::string> initdb_args{initdb, "-D", datadir, "-k"};
    initdb_args.insert(initdb_args.end(), a.rest.begin(), a.rest.end());
    int status = run_and_wait(initdb, initdb_args, layer_environment(layer, datadir, staging_path));
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        throw CliError("initdb failed (exit " + std::to_string(WEXITSTATUS(status)) + ")");
    if (WIFSIGNALED(status))
        throw CliError("initdb failed (killed by signal " + std::to_string(WTERMSIG(status)) + ")");

    // --- the keyring joins the cluster ----------------------------------------------
    const std::string keyring_dir = datadir + "/" + kKeyringDirName;
    if (rename(staging_path.c_str(), keyring_dir.c_str()) != 0)
        throw CliError("cannot move the keyring from \"" + staging_path + "\" to \"" + keyring_dir +
                       "\": " + std::strerror(errno) + "; the new cluster cannot be used, remove " + datadir);
    staging.keep = true;
    if (sys::fsync_dir(datadir.c_str()) != 0 || sys::fsync_dir(parent.c_str()) != 0)
        throw CliError("cannot fsync \"" + datadir + "\": " + std::strerror(errno));
    append_conf(datadir);

    std::string pg_ctl = find_tool("pg_ctl");
    if (pg_ctl.empty()) pg_ctl = "pg_ctl";
    std::printf(
        "\npg_cmk: encrypted cluster created\n"
        "  data directory:   %s\n"
        "  provider:         %s\n"
        "  key id:           %s%s\n"
        "  key store:        %s\n"
        "  KEK fingerprint:  %s\n"
        "Start the server with:\n"
        "    %s -D %s -l logfile start\n",
        datadir.c_str(), provider_name.c_str(), key_id.c_str(), created_key ? " (created)" : "",
        local ? store.c_str() : "-", kr.kek_fingerprint.c_str(), pg_ctl.c_str(), datadir.c_str());
    return 0;
}

}  // namespace cmk::cli
