// pg_cmk's key lifecycle commands for a cluster that is not running (issue 5):
// rewrap, rotate-kek, bind, config create|drop|list and audit. The same code as the
// server's SQL functions (src/core/keys/lifecycle.cpp), with the KEK unwrapped here
// through the provider as the server does it (keys/open_keys.hpp). A running cluster
// is refused: its processes hold the KEK and must switch together, which only the SQL
// functions do.
#include <signal.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::cli {
namespace {

const char kLifecycleUsage[] =
    "Key lifecycle commands for an encrypted cluster that is not running (for a running\n"
    "cluster use the SQL functions cmk_lakebase.rewrap(), rotate_kek(), bind_cluster()).\n"
    "\n"
    "Usage:\n"
    "  pg_cmk rewrap -D DATADIR              re-wrap the KEK under the CMK's current version\n"
    "  pg_cmk rotate-kek -D DATADIR          new KEK, every DEK re-sealed, old KEK destroyed\n"
    "  pg_cmk bind -D DATADIR CONFIG         bind the cluster to a named key configuration\n"
    "  pg_cmk config create -D DATADIR NAME --provider P --key-id ID [--kms-option K=V ...]\n"
    "  pg_cmk config drop -D DATADIR NAME\n"
    "  pg_cmk config list -D DATADIR\n"
    "  pg_cmk audit -D DATADIR               print the audit trail (JSON lines)\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DATADIR   data directory of the encrypted cluster\n"
    "  --provider=NAME        provider of a new key configuration (local, ...)\n"
    "  --key-id=ID            key id of a new key configuration\n"
    "  --key-store=DIR        local provider: the key store (sets option key_store)\n"
    "  --kms-option=KEY=VALUE a provider option (repeatable); credentials references only\n"
    "  -?, --help             show this help, then exit\n";

bool cluster_running(const std::string& datadir) {
    std::ifstream f(datadir + "/postmaster.pid");
    long pid = 0;
    if (!(f >> pid) || pid <= 0) return false;
    return sys::process_exists(static_cast<pid_t>(pid));
}

// Everything a lifecycle operation needs, for an offline cluster.
struct Offline {
    std::string datadir;
    std::unique_ptr<KeyMap> keymap;
    lifecycle::Context ctx;
    SecureBytes previous_kek;
};

std::unique_ptr<Offline> open_offline(const std::string& given, const std::string& cmdname) {
    auto o = std::make_unique<Offline>();
    o->datadir = encrypted_datadir(given);
    if (cluster_running(o->datadir))
        throw CliError("the cluster in \"" + o->datadir +
                       "\" is running; use the SQL functions (cmk_lakebase.rewrap(), rotate_kek(), "
                       "bind_cluster(), create_key_config()) or stop it first");
    (void)cmdname;
    const std::string dir = keyring_dir_for(o->datadir);
    audit::set_directory(dir);
    audit::set_default_actor("pg_cmk");
    if (const char* hooks = std::getenv("CMK_LAKEBASE_TEST_HOOKS"); hooks && std::string(hooks) == "1")
        if (const char* at = std::getenv("CMK_LAKEBASE_TEST_CRASH_AT")) lifecycle::set_crash_point(at);
    Keyring kr = load_keyring(dir);
    auto make = [](const KeyConfig& c, const std::string& name) {
        return audit::audited_provider(make_provider(c), name);
    };
    o->ctx.make_provider = make;
    o->ctx.dir = dir;
    o->ctx.provider = make(kr.config, kr.bound_name());
    // The previous KEK too, whenever the keyring records one: completing an interrupted
    // rotation may need it (kek_of below), whatever the key map is sealed under.
    ClusterKeys keys = unlock_cluster_keys(dir, kr, *o->ctx.provider, UnwrapPrevious::Always);
    o->keymap = open_cluster_keymap(dir, kr, keys);
    o->ctx.kek = std::move(keys.kek);
    o->previous_kek = std::move(keys.previous_kek);
    Offline* self = o.get();
    auto lookup = [self](uint32_t g) -> std::optional<SecureBytes> {
        if (g == self->ctx.keyring.kek_generation && !self->ctx.kek.empty()) return self->ctx.kek.clone();
        if (self->ctx.keyring.previous && g == self->ctx.keyring.previous->kek_generation &&
            !self->previous_kek.empty())
            return self->previous_kek.clone();
        return std::nullopt;
    };
    o->keymap->set_kek_resolver(lookup);
    o->ctx.kek_of = lookup;
    o->ctx.keymap = o->keymap.get();
    o->ctx.keyring = std::move(kr);
    return o;
}

void print_result(const lifecycle::Result& r) {
    if (r.finished_interrupted) std::printf("completed an interrupted KEK rotation first\n");
    std::printf("%s: ok\nkey_config: %s\nprovider: %s\nkey_id: %s\n", r.action.c_str(), r.config_name.c_str(),
                r.provider.c_str(), r.key_id.c_str());
    std::printf("key_version: %s -> %s\n", r.key_version_before.empty() ? "-" : r.key_version_before.c_str(),
                r.key_version.empty() ? "-" : r.key_version.c_str());
    std::printf("kek_generation: %u -> %u\nkek_fingerprint: %s\n", r.kek_generation_before, r.kek_generation,
                r.kek_fingerprint.c_str());
}

}  // namespace

int cmd_lifecycle(const std::string& cmd, const std::vector<std::string>& args_in) {
    std::vector<std::string> args = args_in;
    std::string sub;
    std::string cmdname = cmd;
    if (cmd == "config") {
        if (args.empty()) throw UsageError("config", "no config command given (create, drop or list)");
        sub = args[0];
        if (sub == "--help" || sub == "-?" || sub == "help") {
            std::fputs(kLifecycleUsage, stdout);
            return 0;
        }
        if (sub != "create" && sub != "drop" && sub != "list")
            throw UsageError("config", "unknown config command \"" + sub + "\"");
        args.erase(args.begin());
        cmdname = "config " + sub;
    }
    ParsedArgs a = parse_args(cmdname, args,
                              {{"pgdata", 'D', true},
                               {"provider", 0, true},
                               {"key-id", 0, true},
                               {"key-store", 0, true},
                               {"kms-option", 0, true}});
    if (a.has("help")) {
        std::fputs(kLifecycleUsage, stdout);
        return 0;
    }
    if (!a.rest.empty()) throw UsageError(cmdname, "unexpected argument \"" + a.rest[0] + "\"");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");
    size_t want_pos = (cmd == "bind" || sub == "create" || sub == "drop") ? 1 : 0;
    if (a.positional.size() < want_pos)
        throw UsageError(cmdname, cmd == "bind" ? "no key configuration name given" : "no name given");
    if (a.positional.size() > want_pos)
        throw UsageError(cmdname, "unexpected argument \"" + a.positional[want_pos] + "\"");

    if (cmd == "audit") {
        std::string dir = keyring_dir_for(encrypted_datadir(a.get("pgdata")));
        for (const auto& e : audit::read_all(dir)) std::printf("%s\n", audit::event_to_json(e).c_str());
        return 0;
    }

    std::unique_ptr<Offline> o = open_offline(a.get("pgdata"), cmdname);
    if (cmd == "rewrap") {
        print_result(lifecycle::rewrap(o->ctx));
        return 0;
    }
    if (cmd == "rotate-kek") {
        print_result(lifecycle::rotate_kek(o->ctx));
        return 0;
    }
    if (cmd == "bind") {
        print_result(lifecycle::bind_cluster(o->ctx, a.positional[0]));
        return 0;
    }
    if (sub == "list") {
        for (const auto& row : lifecycle::list_configs(o->ctx)) {
            std::string opts;
            for (const auto& kv : row.named.config.options)
                opts += (opts.empty() ? "" : ",") + kv.first + "=" + kv.second;
            std::printf("%s%s\t%s\t%s\t%s\n", row.named.name.c_str(), row.bound ? " (bound)" : "",
                        row.named.config.provider.c_str(), row.named.config.key_id.c_str(), opts.c_str());
        }
        return 0;
    }
    if (sub == "drop") {
        lifecycle::drop_config(o->ctx, a.positional[0]);
        std::printf("dropped key configuration \"%s\"\n", a.positional[0].c_str());
        return 0;
    }
    // create
    NamedKeyConfig nc;
    nc.name = a.positional[0];
    nc.config.provider = a.get("provider");
    nc.config.key_id = a.get("key-id");
    if (nc.config.provider.empty()) throw UsageError(cmdname, "no provider given (--provider NAME)");
    if (nc.config.key_id.empty()) throw UsageError(cmdname, "no key id given (--key-id ID)");
    for (const auto& opt : a.options) {
        if (opt.first != "kms-option") continue;
        size_t eq = opt.second.find('=');
        if (eq == std::string::npos || eq == 0)
            throw UsageError(cmdname, "--kms-option wants KEY=VALUE, got \"" + opt.second + "\"");
        nc.config.options[opt.second.substr(0, eq)] = opt.second.substr(eq + 1);
    }
    if (a.has("key-store")) nc.config.options["key_store"] = make_absolute(a.get("key-store"));
    lifecycle::create_config(o->ctx, nc);
    std::printf("created key configuration \"%s\" (provider %s, key %s)\n", nc.name.c_str(),
                nc.config.provider.c_str(), nc.config.key_id.c_str());
    return 0;
}

}  // namespace cmk::cli
