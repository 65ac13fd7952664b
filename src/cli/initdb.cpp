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

// Removes the staging directory unless the cluster took it over.
struct StagingDir {
    std::string path;
    bool keep = false;
    StagingDir() = default;
    StagingDir(const StagingDir&) = delete;
    StagingDir& operator=(const StagingDir&) = delete;
    ~StagingDir() {
        if (!path.empty() && !keep) remove_tree(path);
    }
};

bool dir_is_empty(const std::string& dir) {
    DIR* d = opendir(dir.c_str());
    if (!d) throw CliError("cannot read directory \"" + dir + "\": " + std::strerror(errno));
    bool empty = true;
    while (struct dirent* e = readdir(d)) {
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) {
            empty = false;
            break;
        }
    }
    closedir(d);
    return empty;
}

bool is_within(const std::string& path, const std::string& dir) {
    return path == dir ||
           (path.size() > dir.size() && path.compare(0, dir.size(), dir) == 0 && path[dir.size()] == '/');
}

// The key must be usable before a keyring is wrapped under it; say how to fix it.
void require_enabled(const LocalKeyStore& ks, const std::string& id) {
    const std::string where = "in the local key store " + ks.dir();
    std::string state = ks.state(id);
    if (state == "enabled") return;
    if (state == "disabled")
        throw CliError("key \"" + id + "\" is disabled " + where + "; enable it with: pg_cmk key enable " +
                       id + " --key-store " + ks.dir());
    if (state == "deleted")
        throw CliError("key \"" + id + "\" was deleted " + where +
                       " (its key material is destroyed); use another key, or create a new "
                       "one with --key-id NEW_ID --create-key");
    throw CliError("key \"" + id + "\" " + where + " is in state \"" + state +
                   "\", not enabled; enable it with: pg_cmk key enable " + id + " --key-store " + ks.dir());
}

// Runs a program, waiting for it; returns its wait status. The parent ignores
// SIGINT/SIGQUIT meanwhile (as system() does), so that an interrupted initdb still
// lets us remove the staging directory.
int run_and_wait(const std::string& path, const std::vector<std::string>& args,
                 const std::vector<std::string>& env) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);

    struct sigaction ign {
    }, old_int{}, old_quit{};
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    sigaction(SIGINT, &ign, &old_int);
    sigaction(SIGQUIT, &ign, &old_quit);

    std::fflush(stdout);
    std::fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        int err = errno;
        sigaction(SIGINT, &old_int, nullptr);
        sigaction(SIGQUIT, &old_quit, nullptr);
        throw CliError(std::string("cannot start initdb: fork failed: ") + std::strerror(err));
    }
    if (pid == 0) {
        sigaction(SIGINT, &old_int, nullptr);
        sigaction(SIGQUIT, &old_quit, nullptr);
        execve(path.c_str(), argv.data(), envp.data());
        // Only async-signal-safe calls between fork and _exit.
        const char* err = std::strerror(errno);
        const char pre[] = "pg_cmk: error: cannot run ";
        (void)!write(2, pre, sizeof pre - 1);
        (void)!write(2, path.c_str(), path.size());
        (void)!write(2, ": ", 2);
        (void)!write(2, err, std::strlen(err));
        (void)!write(2, "\n", 1);
        _exit(127);
    }
    int status = 0;
    pid_t r;
    do {
        r = waitpid(pid, &status, 0);
    } while (r < 0 && errno == EINTR);
    int err = errno;
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGQUIT, &old_quit, nullptr);
    if (r < 0) throw CliError(std::string("cannot wait for initdb: ") + std::strerror(err));
    return status;
}

// True if an uncommented line of the configuration sets shared_preload_libraries.
bool conf_sets_preload(const std::string& conf) {
    static const std::string kName = "shared_preload_libraries";
    size_t i = 0;
    while (i < conf.size()) {
        size_t j = conf.find('\n', i);
        if (j == std::string::npos) j = conf.size();
        std::string line = conf.substr(i, j - i);
        i = j + 1;
        size_t k = line.find_first_not_of(" \t");
        if (k == std::string::npos) continue;
        std::string rest = line.substr(k);
        if (rest.size() < kName.size()) continue;
        bool match = true;
        for (size_t n = 0; n < kName.size(); ++n)
            if (std::tolower(static_cast<unsigned char>(rest[n])) != kName[n]) match = false;
        if (!match) continue;
        if (rest.size() == kName.size()) return true;
        char c = rest[kName.size()];
        if (c == ' ' || c == '\t' || c == '=') return true;
    }
    return false;
}

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
    ParsedArgs a = parse_args(cmdname, args,
                              {{"pgdata", 'D', true},
                               {"provider", 0, true},
                               {"key-store", 0, true},
                               {"key-id", 0, true},
                               {"create-key", 0, false},
                               {"kms-option", 0, true}});
    if (a.has("help")) {
        std::fputs(kInitdbUsage, stdout);
        return 0;
    }
    if (!a.positional.empty())
        throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] +
                                      "\" (arguments for initdb go after \"--\")");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");
    const std::string provider_name = a.get("provider", "local");
    const bool local = provider_name == "local";
    std::map<std::string, std::string> kms_options;
    for (const auto& o : a.options) {
        if (o.first != "kms-option") continue;
        size_t eq = o.second.find('=');
        if (eq == std::string::npos || eq == 0)
            throw UsageError(cmdname, "--kms-option wants KEY=VALUE, got \"" + o.second + "\"");
        kms_options[o.second.substr(0, eq)] = o.second.substr(eq + 1);
    }
    if (local && !kms_options.empty())
        throw UsageError(cmdname, "the local provider takes no --kms-option (its key store is --key-store)");
    if (!local && (a.has("key-store") || a.has("create-key")))
        throw UsageError(cmdname, "--key-store and --create-key are for the local provider only");
    if (!local && !a.has("key-id"))
        throw UsageError(cmdname, "provider \"" + provider_name + "\" needs --key-id (the key in the KMS)");
    for (const auto& arg : a.rest) {
        if (arg == "-D" || arg.compare(0, 2, "-D") == 0 || arg == "--pgdata" ||
            arg.compare(0, 9, "--pgdata=") == 0)
            throw UsageError(cmdname,
                             "give the data directory with pg_cmk's own -D, not in "
                             "the initdb arguments after \"--\"");
    }
    if (local && a.has("key-id") && !LocalKeyStore::valid_key_id(a.get("key-id")))
        throw UsageError(cmdname,
                         "invalid key id \"" + a.get("key-id") + "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
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
    const std::string store =
        local ? make_absolute(a.has("key-store") ? a.get("key-store") : default_local_key_store()) : "";
    if (local && is_within(store, datadir))
        throw UsageError(cmdname, "the key store \"" + store + "\" must be outside the data directory");
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

    // --- the key: the local provider may create one; a KMS key must exist ------------
    std::string key_id = a.get("key-id");
    bool created_key = false;
    KeyConfig cfg{provider_name, key_id, kms_options};
    if (local) {
        LocalKeyStore ks(store);
        ks.ensure_dir();
        if (!key_id.empty()) {
            if (a.has("create-key")) {
                if (ks.exists(key_id))
                    throw CliError("key \"" + key_id + "\" already exists in the local key store " + store +
                                   "; drop --create-key to use it");
                ks.create(key_id);
                created_key = true;
            } else if (!ks.exists(key_id)) {
                throw CliError("key \"" + key_id + "\" does not exist in the local key store " + store +
                               "; create it with: pg_cmk key create " + key_id + " --key-store " + store +
                               " (or add --create-key)");
            }
            require_enabled(ks, key_id);
        } else {
            do {
                std::vector<uint8_t> r = random_bytes(4);
                key_id = "cmk-" + hex_encode(r.data(), r.size());
            } while (ks.exists(key_id));
            ks.create(key_id);
            created_key = true;
        }
        cfg = KeyConfig{"local", key_id, {{"key_store", store}}};
    }

    // --- keyring and empty key map in the staging directory -------------------------
    // make_provider validates the configuration (one line naming the bad field); the
    // wrap below is the first KMS call and proves the key is usable.
    std::unique_ptr<KeyProvider> provider = make_provider(cfg);
    Keyring kr;
    {
        SecureBytes kek;
        kr = create_keyring(*provider, kek);
        kek.wipe();  // the layer unwraps its own copy through the provider
    }
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
