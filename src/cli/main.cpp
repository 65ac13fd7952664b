// pg_cmk: the command-line tool of cmk_lakebase (docs/CONTRACTS.md, "pg_cmk command
// line"). Dispatches to one function per command and turns every failure into the
// contract's form: one line "pg_cmk: error: ..." on stderr and the exit code of the
// error's category (src/core/base/error.cpp): 2 for bad arguments (plus a pointer to
// the command's --help), 3 when the key provider refuses the key, 4 when it cannot be
// reached, 1 for anything else.
#include <sys/prctl.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cmk_lakebase/base/error.hpp"

#ifndef CMK_VERSION
#define CMK_VERSION "unknown"
#endif

namespace {

const char kUsage[] =
    "pg_cmk manages PostgreSQL clusters encrypted by cmk_lakebase (transparent data\n"
    "encryption with customer-managed keys).\n"
    "\n"
    "Usage:\n"
    "  pg_cmk initdb -D DATADIR [--provider local] [--key-store DIR] [--key-id ID]\n"
    "                [--create-key] [-- INITDB_ARGS...]\n"
    "  pg_cmk basebackup -D DIR [-F p|t] [KEY OPTIONS] [-- PG_BASEBACKUP_ARGS...]\n"
    "  pg_cmk combinebackup -o DIR [KEY OPTIONS] BACKUP... [-- PG_COMBINEBACKUP_ARGS...]\n"
    "  pg_cmk encrypt -D DATADIR [KEY OPTIONS] [--remove-original]\n"
    "  pg_cmk exec -D DATADIR -- TOOL [ARGS...]\n"
    "  pg_cmk upgrade -d OLDDATADIR -D NEWDATADIR -b OLDBINDIR -B NEWBINDIR [--link]\n"
    "  pg_cmk status -D DATADIR [--json]\n"
    "  pg_cmk key create|enable|disable|delete|show KEY_ID [--key-store DIR]\n"
    "  pg_cmk key list [--key-store DIR]\n"
    "  pg_cmk key rotate KEY_ID [--key-store DIR]\n"
    "  pg_cmk rewrap -D DATADIR\n"
    "  pg_cmk rotate-kek -D DATADIR\n"
    "  pg_cmk bind -D DATADIR CONFIG\n"
    "  pg_cmk config create|drop|list -D DATADIR [NAME] [--provider P --key-id ID ...]\n"
    "  pg_cmk audit -D DATADIR\n"
    "  pg_cmk bench-cipher [--seconds N]\n"
    "  pg_cmk --version\n"
    "\n"
    "Commands:\n"
    "  initdb        create a new encrypted cluster (runs the stock initdb under the layer)\n"
    "  basebackup    online base backup (or standby, with -R) of a running encrypted\n"
    "                cluster, encrypted on the destination (incremental on 17+)\n"
    "  combinebackup reconstruct a full backup from a full one and its incremental ones\n"
    "                (PostgreSQL 17+), encrypted\n"
    "  encrypt       convert a stopped plaintext cluster into an encrypted one (offline)\n"
    "  exec          run a PostgreSQL tool on an encrypted cluster\n"
    "  upgrade       major-version upgrade with the stock pg_upgrade into a new encrypted\n"
    "                cluster\n"
    "  status        show the key configuration and whether the key is usable\n"
    "  key           manage keys in the local key store\n"
    "  rewrap        re-wrap the KEK under the CMK's current version (offline cluster)\n"
    "  rotate-kek    rotate the KEK: DEKs re-sealed, no data rewritten (offline cluster)\n"
    "  bind          bind the cluster to another key configuration (offline cluster)\n"
    "  config        manage named key configurations (offline cluster)\n"
    "  audit         print the audit trail of key events\n"
    "  bench-cipher  measure the page cipher's throughput\n"
    "\n"
    "Run \"pg_cmk COMMAND --help\" for the options of a command.\n";

// Error text from lower layers may span lines; the contract wants one line.
std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    while (!s.empty() && s.back() == ' ') s.pop_back();
    return s;
}

void print_error(const std::string& msg) {
    std::fprintf(stderr, "pg_cmk: error: %s\n", one_line(msg).c_str());
}

int run(int argc, char** argv) {
    using namespace cmk::cli;
    if (argc < 2) throw UsageError("", "no command given");
    std::string cmd = argv[1];
    std::vector<std::string> args(argv + 2, argv + argc);

    if (cmd == "--help" || cmd == "-?" || cmd == "help") {
        std::fputs(kUsage, stdout);
        return 0;
    }
    if (cmd == "--version" || cmd == "-V") {
        std::printf("pg_cmk (cmk_lakebase) %s\n", CMK_VERSION);
        return 0;
    }
    if (cmd == "initdb") return cmd_initdb(args);
    if (cmd == "basebackup") return cmd_basebackup(args);
    if (cmd == "combinebackup") return cmd_combinebackup(args);
    if (cmd == "encrypt") return cmd_encrypt(args);
    if (cmd == "__encrypt-copy") return cmd_encrypt_copy(args);
    if (cmd == "exec") return cmd_exec(args);
    if (cmd == "upgrade") return cmd_upgrade(args);
    // Internal steps of pg_cmk upgrade (its pg_resetwal, and the encrypting copier).
    if (cmd == "upgrade-sync") return cmd_upgrade_sync(args);
    if (cmd == "upgrade-encrypt") return cmd_upgrade_encrypt(args);
    if (cmd == "status") return cmd_status(args);
    if (cmd == "key") return cmd_key(args);
    if (cmd == "bench-cipher") return cmd_bench_cipher(args);
    if (cmd == "rewrap" || cmd == "rotate-kek" || cmd == "bind" || cmd == "config" || cmd == "audit")
        return cmd_lifecycle(cmd, args);
    if (!cmd.empty() && cmd[0] == '-') throw UsageError("", "unrecognized option \"" + cmd + "\"");
    throw UsageError("", "unknown command \"" + cmd + "\"");
}

}  // namespace

int main(int argc, char** argv) {
    // pg_cmk unwraps KEKs and opens key maps: no core file and no ptrace by its own
    // user (the server and the tools under the layer do the same).
    const char* allow = std::getenv("CMK_LAKEBASE_ALLOW_CORE_DUMPS");
    if (!(allow && std::strcmp(allow, "1") == 0)) (void)prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    try {
        int rc = run(argc, argv);
        if (std::fflush(stdout) != 0) {
            print_error("could not write the output");
            return 1;
        }
        return rc;
    } catch (const cmk::cli::UsageError& e) {
        print_error(e.what());
        if (e.command.empty())
            std::fprintf(stderr, "Try \"pg_cmk --help\".\n");
        else
            std::fprintf(stderr, "Try \"pg_cmk %s --help\".\n", e.command.c_str());
        return cmk::category_info(e.category).exit_code;
    } catch (const cmk::cli::ExitError& e) {
        print_error(e.what());
        return e.exit_code;
    } catch (const std::exception& e) {
        // CliError, KmsError, KeyringError, KeyMapError, CryptoError, system errors:
        // their messages already say what failed.
        print_error(e.what());
        return cmk::category_info(cmk::category_of(e)).exit_code;
    }
}
