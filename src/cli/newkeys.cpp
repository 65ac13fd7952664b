// New key material for a cluster about to be created (pg_cmk initdb, pg_cmk
// basebackup): the key options both commands take, the key (the local provider may
// create one) and a keyring wrapping a new KEK under it, plus the small process and
// directory helpers they share.
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
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::cli {

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
namespace {

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

}  // namespace

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
        throw CliError("cannot start " + path + ": fork failed: " + std::strerror(err));
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
    if (r < 0) throw CliError("cannot wait for " + path + ": " + std::strerror(err));
    return status;
}


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

std::vector<OptSpec> with_key_option_specs(std::vector<OptSpec> own) {
    own.insert(own.end(), {{"provider", 0, true},
                           {"key-store", 0, true},
                           {"key-id", 0, true},
                           {"create-key", 0, false},
                           {"kms-option", 0, true}});
    return own;
}

KeyOptions parse_key_options(const std::string& cmdname, const ParsedArgs& a) {
    KeyOptions ko;
    ko.provider_name = a.get("provider", "local");
    ko.local = ko.provider_name == "local";
    const bool local = ko.local;
    const std::string& provider_name = ko.provider_name;
    std::map<std::string, std::string>& kms_options = ko.kms_options;
    for (const auto& o : a.options) {
        if (o.first != "kms-option") continue;
        size_t eq = o.second.find('=');
        if (eq == std::string::npos || eq == 0)
            throw UsageError(cmdname, "--kms-option wants KEY=VALUE, got \"" + o.second + "\"");
        kms_options[o.second.substr(0, eq)] = o.second.substr(eq + 1);
    }
    if (local && kms_options.count("key_store"))
        throw UsageError(cmdname, "the local provider's key store is --key-store, not --kms-option key_store");
    // The server ignores other options of a stored local configuration (an old one must
    // start); a new one takes only what the provider reads, so a typo fails here.
    for (const auto& o : kms_options)
        if (local && o.first != "timeout_ms")
            throw UsageError(cmdname, o.first + ": unknown option of the local provider (known: timeout_ms)");
    if (!local && (a.has("key-store") || a.has("create-key")))
        throw UsageError(cmdname, "--key-store and --create-key are for the local provider only");
    if (!local && !a.has("key-id"))
        throw UsageError(cmdname, "provider \"" + provider_name + "\" needs --key-id (the key in the KMS)");
    if (local && a.has("key-id") && !LocalKeyStore::valid_key_id(a.get("key-id")))
        throw UsageError(cmdname,
                         "invalid key id \"" + a.get("key-id") + "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
    ko.key_id = a.get("key-id");
    ko.create_key = a.has("create-key");
    if (local) ko.store = make_absolute(a.has("key-store") ? a.get("key-store") : default_local_key_store());
    return ko;
}

void check_key_store_outside(const std::string& cmdname, const KeyOptions& ko, const std::string& datadir) {
    if (ko.local && is_within(ko.store, datadir))
        throw UsageError(cmdname, "the key store \"" + ko.store + "\" must be outside the data directory");
}

NewKeyring new_keyring(const KeyOptions& ko) {
    NewKeyring nk;
    nk.key_id = ko.key_id;
    KeyConfig cfg{ko.provider_name, ko.key_id, ko.kms_options};
    if (ko.local) {
        // Options first (timeout_ms's range): a bad one must not leave a new key behind.
        KeyConfig check{"local", "options-check", ko.kms_options};
        check.options["key_store"] = ko.store;
        make_provider(check);
        LocalKeyStore ks(ko.store);
        ks.ensure_dir();
        if (!nk.key_id.empty()) {
            if (ko.create_key) {
                if (ks.exists(nk.key_id))
                    throw CliError("key \"" + nk.key_id + "\" already exists in the local key store " + ko.store +
                                   "; drop --create-key to use it");
                ks.create(nk.key_id);
                nk.created_key = true;
            } else if (!ks.exists(nk.key_id)) {
                throw CliError("key \"" + nk.key_id + "\" does not exist in the local key store " + ko.store +
                               "; create it with: pg_cmk key create " + nk.key_id + " --key-store " + ko.store +
                               " (or add --create-key)");
            }
            require_enabled(ks, nk.key_id);
        } else {
            do {
                std::vector<uint8_t> r = random_bytes(4);
                nk.key_id = "cmk-" + hex_encode(r.data(), r.size());
            } while (ks.exists(nk.key_id));
            ks.create(nk.key_id);
            nk.created_key = true;
        }
        cfg = KeyConfig{"local", nk.key_id, ko.kms_options};  // timeout_ms, checked by make_provider
        cfg.options["key_store"] = ko.store;
    }
    // make_provider validates the configuration (one line naming the bad field); the
    // wrap is the first KMS call and proves the key is usable.
    std::unique_ptr<KeyProvider> provider = make_provider(cfg);
    SecureBytes kek;
    nk.kr = create_keyring(*provider, kek);
    kek.wipe();  // the layer unwraps its own copy through the provider
    return nk;
}

}  // namespace cmk::cli
