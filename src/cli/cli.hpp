// Shared pieces of the pg_cmk command-line tool: the two kinds of failure it reports
// (usage errors, exit 2; runtime errors, exit 1), a small option parser, path and
// process helpers, and one entry point per command. Only src/cli uses this header.
#pragma once

#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/keys/keyring.hpp"

namespace cmk::cli {

// Bad arguments: reported as one error line plus a pointer to `pg_cmk COMMAND --help`,
// exit 2. `command` is what goes into that pointer ("initdb", "key create", "" for the
// top level).
struct UsageError : Error {
    UsageError(std::string cmd, const std::string& msg) : Error(ErrorCategory::Usage, msg), command(std::move(cmd)) {}
    std::string command;
};

// A runtime failure the tool explains itself (what failed, what to do): exit 1.
struct CliError : Error {
    explicit CliError(const std::string& m, ErrorCategory c = ErrorCategory::Internal) : Error(c, m) {}
};

// A failure with an exit status of its own command's (pg_cmk status: 5 for damaged key
// files), instead of its category's.
struct ExitError : Error {
    ExitError(int code, const std::string& m) : Error(ErrorCategory::Damaged, m), exit_code(code) {}
    int exit_code;
};

// --- option parsing -------------------------------------------------------------

struct OptSpec {
    const char* long_name;  // without "--"
    char short_name;        // 0 if none
    bool takes_value;
};

struct ParsedArgs {
    std::vector<std::pair<std::string, std::string>> options;  // long name -> value
    std::vector<std::string> positional;
    std::vector<std::string> rest;  // everything after "--" (or the first positional)
    bool dash_dash = false;         // rest came from an explicit "--"

    bool has(const std::string& name) const;
    // Last value given for name, or def.
    std::string get(const std::string& name, const std::string& def = "") const;
};

// Parses args (the words after the command). Accepts "--name value", "--name=value",
// "-X value", "-Xvalue"; "--" ends options. With stop_at_positional the first
// non-option word also ends options (it and the rest go to `rest`), so that a tool's
// own options are never taken for ours. "--help" and "-?" are always known.
ParsedArgs parse_args(const std::string& command, const std::vector<std::string>& args,
                      const std::vector<OptSpec>& specs, bool stop_at_positional = false);

// --- paths ------------------------------------------------------------------------

std::string current_dir();
// Lexically absolute (relative to the working directory), normalized.
std::string make_absolute(const std::string& p);
// Absolute form of a directory that may not exist yet: realpath of its parent (which
// must exist) + its last component. Throws CliError.
std::string absolute_new_dir(const std::string& p);
// realpath() of an existing directory. Throws CliError naming `what`.
std::string existing_dir(const std::string& p, const std::string& what);
bool path_exists(const std::string& p);
bool is_directory(const std::string& p);
std::string parent_dir(const std::string& abs);  // of an absolute, normalized path
std::string base_name(const std::string& abs);
// Removes a directory tree (no symlink following); best effort.
void remove_tree(const std::string& dir);

// --- running PostgreSQL tools under the layer -------------------------------------

// Absolute path of the encrypting file layer to preload: $CMK_LAKEBASE_LAYER, else
// CMK_PKGLIBDIR/libcmk_lakebase_fs.so. Throws CliError if it is not there.
std::string layer_path();
// The PostgreSQL bindir: $CMK_LAKEBASE_PG_BINDIR, else the compiled-in CMK_PG_BINDIR.
std::string pg_bindir();
// A tool name without '/' is looked up in pg_bindir(), then PATH; a name with '/' is
// taken as is. Returns "" if no executable is found.
std::string find_tool(const std::string& name);
// The current environment with LD_PRELOAD (layer first, any other copy of the layer
// removed), CMK_LAKEBASE_PGDATA and, if keyring_dir is non-empty,
// CMK_LAKEBASE_KEYRING_DIR set; an inherited CMK_LAKEBASE_KEYRING_DIR (and
// CMK_LAKEBASE_SOURCE_DIRS) is dropped.
std::vector<std::string> layer_environment(const std::string& layer, const std::string& pgdata,
                                           const std::string& keyring_dir);

// This program's own path (/proc/self/exe), to run it again as a child. Throws CliError.
std::string self_executable();
// The current environment without LD_PRELOAD and CMK_LAKEBASE_* (a tool that must not
// run under the layer).
std::vector<std::string> plain_environment();
// Replaces this process with path (argv args, environment env); throws CliError if
// execve fails.
[[noreturn]] void exec_replacing(const std::string& path, const std::vector<std::string>& args,
                                 const std::vector<std::string>& env);

// Data directory of an existing encrypted cluster (absolute); throws CliError if the
// directory is missing or has no cmk_lakebase/keyring.json.
std::string encrypted_datadir(const std::string& given);

// --- new clusters (newkeys.cpp): pg_cmk initdb and pg_cmk basebackup ---------------

// The key options of a command that creates a cluster: --provider, --kms-option,
// --key-store, --key-id, --create-key (validated, no side effect).
struct KeyOptions {
    std::string provider_name;
    bool local = true;
    std::map<std::string, std::string> kms_options;
    std::string key_id;  // "" (local only): a new key is made
    bool create_key = false;
    std::string store;   // local key store, absolute
};
KeyOptions parse_key_options(const std::string& cmdname, const ParsedArgs& a);
// The option specs parse_key_options reads, appended to a command's own.
std::vector<OptSpec> with_key_option_specs(std::vector<OptSpec> own);
void check_key_store_outside(const std::string& cmdname, const KeyOptions& ko, const std::string& datadir);

// The key (made if asked, or if none was named for the local provider) and a new
// keyring wrapping a fresh KEK under it.
struct NewKeyring {
    std::string key_id;
    bool created_key = false;
    Keyring kr;
};
NewKeyring new_keyring(const KeyOptions& ko);

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

// The first 8 KiB of p are a PostgreSQL page header (8 KiB pages, layout version 4).
bool page_header_ok(const uint8_t* p);

bool dir_is_empty(const std::string& dir);
bool is_within(const std::string& path, const std::string& dir);
// Runs a program and waits for it; returns its wait status. SIGINT/SIGQUIT are ignored
// meanwhile (as system() does), so that an interrupted child still lets us clean up.
int run_and_wait(const std::string& path, const std::vector<std::string>& args,
                 const std::vector<std::string>& env);
// True if an uncommented line of a postgresql.conf text sets shared_preload_libraries.
bool conf_sets_preload(const std::string& conf);

// --- commands (args: the words after the command name) ----------------------------

int cmd_initdb(const std::vector<std::string>& args);
int cmd_basebackup(const std::vector<std::string>& args);
int cmd_combinebackup(const std::vector<std::string>& args);
int cmd_encrypt(const std::vector<std::string>& args);
int cmd_encrypt_copy(const std::vector<std::string>& args);  // internal: the copier under the layer
int cmd_exec(const std::vector<std::string>& args);
// pg_cmk upgrade, and its internal steps upgrade-sync and upgrade-encrypt (upgrade.cpp)
int cmd_upgrade(const std::vector<std::string>& args);
int cmd_upgrade_sync(const std::vector<std::string>& args);
int cmd_upgrade_encrypt(const std::vector<std::string>& args);
int cmd_status(const std::vector<std::string>& args);
int cmd_key(const std::vector<std::string>& args);
int cmd_bench_cipher(const std::vector<std::string>& args);
// rewrap, rotate-kek, bind, config, audit (lifecycle.cpp)
int cmd_lifecycle(const std::string& cmd, const std::vector<std::string>& args);

}  // namespace cmk::cli
