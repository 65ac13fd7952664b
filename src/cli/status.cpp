// `pg_cmk status`: what protects an encrypted cluster and whether it can be opened
// now. Asks the provider for the key's state, proves the KEK unwraps and the keyring
// is intact (its MAC), opens the key map and counts the DEKs. Works with the server
// running or not; reads only. Exit 0 usable, 3 revoked, 4 unavailable, 1 other error.
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "cli.hpp"
#include "cmk_lakebase/audit.hpp"
#include "cmk_lakebase/crypto.hpp"
#include "cmk_lakebase/keymap.hpp"
#include "cmk_lakebase/keyring.hpp"
#include "cmk_lakebase/kms.hpp"

namespace cmk::cli {
namespace {

const char kStatusUsage[] =
    "pg_cmk status shows the key configuration of a cluster encrypted by cmk_lakebase\n"
    "and whether its key is usable.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk status -D DATADIR [--json]\n"
    "\n"
    "Options:\n"
    "  -D, --pgdata=DATADIR   data directory of the encrypted cluster\n"
    "  --json                 print one JSON object instead of lines\n"
    "  -?, --help             show this help, then exit\n"
    "\n"
    "Exit status: 0 if the key is usable, 3 if it is revoked (disabled, deleted, access\n"
    "denied), 4 if the provider is unavailable, 1 on other errors.\n";

constexpr int kExitRevoked = 3;
constexpr int kExitUnavailable = 4;

struct StatusReport {
    std::string data_directory;
    std::string provider;
    std::string key_id;
    std::string key_store;  // local provider only
    KeyHealth health = KeyHealth::Unavailable;
    std::string provider_state;
    std::string detail;
    std::string kek_fingerprint;
    uint32_t kek_generation = 0;
    std::string cluster_id;
    std::optional<size_t> deks;  // known only when the KEK unwrapped
};

KeyHealth health_of(KmsErrorKind k) {
    return k == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
}

std::string key_state_text(const StatusReport& r) {
    std::string s = key_health_name(r.health);
    std::string inner = r.provider_state.empty() ? "-" : r.provider_state;
    if (!r.detail.empty()) inner += ": " + r.detail;
    for (char& c : inner)
        if (c == '\n' || c == '\r') c = ' ';
    return s + " (" + inner + ")";
}

void print_lines(const StatusReport& r) {
    std::printf("data_directory: %s\n", r.data_directory.c_str());
    std::printf("provider: %s\n", r.provider.c_str());
    std::printf("key_id: %s\n", r.key_id.c_str());
    if (!r.key_store.empty()) std::printf("key_store: %s\n", r.key_store.c_str());
    std::printf("key_state: %s\n", key_state_text(r).c_str());
    std::printf("kek_fingerprint: %s\n", r.kek_fingerprint.c_str());
    std::printf("kek_generation: %u\n", r.kek_generation);
    std::printf("cluster_id: %s\n", r.cluster_id.c_str());
    if (r.deks)
        std::printf("deks: %zu\n", *r.deks);
    else
        std::printf("deks: unknown (the key is not usable)\n");
}

void print_json(const StatusReport& r) {
    rapidjson::StringBuffer buf;
    rapidjson::Writer<rapidjson::StringBuffer> w(buf);
    auto field = [&w](const char* k, const std::string& v) {
        w.Key(k);
        w.String(v.c_str(), static_cast<rapidjson::SizeType>(v.size()));
    };
    w.StartObject();
    field("data_directory", r.data_directory);
    field("provider", r.provider);
    field("key_id", r.key_id);
    w.Key("key_store");
    if (r.key_store.empty())
        w.Null();
    else
        w.String(r.key_store.c_str(), static_cast<rapidjson::SizeType>(r.key_store.size()));
    field("key_state", key_health_name(r.health));
    field("provider_state", r.provider_state);
    field("detail", r.detail);
    field("kek_fingerprint", r.kek_fingerprint);
    w.Key("kek_generation");
    w.Uint(r.kek_generation);
    field("cluster_id", r.cluster_id);
    w.Key("deks");
    if (r.deks)
        w.Uint64(*r.deks);
    else
        w.Null();
    w.EndObject();
    std::printf("%s\n", buf.GetString());
}

}  // namespace

int cmd_status(const std::vector<std::string>& args) {
    const std::string cmdname = "status";
    ParsedArgs a = parse_args(cmdname, args, {{"pgdata", 'D', true}, {"json", 0, false}});
    if (a.has("help")) {
        std::fputs(kStatusUsage, stdout);
        return 0;
    }
    if (!a.positional.empty()) throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] + "\"");
    if (!a.has("pgdata") || a.get("pgdata").empty())
        throw UsageError(cmdname, "no data directory given (-D DATADIR)");

    StatusReport r;
    r.data_directory = encrypted_datadir(a.get("pgdata"));
    const std::string dir = keyring_dir_for(r.data_directory);
    const std::string keyring_file = dir + "/" + kKeyringFile;
    Keyring kr;
    try {
        kr = load_keyring(dir);
    } catch (const KeyringError& e) {
        throw CliError(std::string(e.what()) + " (" + keyring_file + ")");
    }
    r.provider = kr.config.provider;
    r.key_id = kr.config.key_id;
    auto ks = kr.config.options.find("key_store");
    if (ks != kr.config.options.end()) r.key_store = ks->second;
    r.kek_fingerprint = kr.kek_fingerprint;
    r.kek_generation = kr.kek_generation;
    r.cluster_id = kr.cluster_id;

    // Every status and unwrap call is in the cluster's audit trail.
    audit::set_directory(dir);
    audit::set_default_actor("pg_cmk");
    std::unique_ptr<KeyProvider> provider =
        audit::audited_provider(make_provider(kr.config), kr.bound_name());
    try {
        KeyStatus st = provider->status();
        r.health = st.health;
        r.provider_state = st.state;
        r.detail = st.detail;
    } catch (const KmsError& e) {
        if (e.kind == KmsErrorKind::Config) throw;
        r.health = health_of(e.kind);
        r.provider_state = "error";
        r.detail = e.what();
    }

    if (r.health == KeyHealth::Ok) {
        // The provider says yes; prove it: unwrap the KEK, check the keyring's MAC and
        // that the key map opens under this KEK. KeyringError / KeyMapError (tampered,
        // damaged) are errors of their own, exit 1.
        try {
            SecureBytes kek = unlock_keyring(kr, *provider);
            uint32_t gen = kr.kek_generation;
            if (kr.previous && KeyMap::peek_generation(dir) == kr.previous->kek_generation) {
                // An interrupted KEK rotation (completed at the next start).
                kek = unlock_previous_kek(kr, *provider);
                gen = kr.previous->kek_generation;
            }
            KeyMap km(dir, kek, kr.cluster_id, gen);
            kek.wipe();
            r.deks = km.size();
        } catch (const KeyringError& e) {
            throw CliError(std::string(e.what()) + " (" + keyring_file + ")");
        } catch (const KmsError& e) {
            if (e.kind == KmsErrorKind::Config) throw;
            r.health = health_of(e.kind);
            r.provider_state = "unwrap failed";
            r.detail = e.what();
        }
    }

    if (a.has("json"))
        print_json(r);
    else
        print_lines(r);
    switch (r.health) {
        case KeyHealth::Ok:
            return 0;
        case KeyHealth::Revoked:
            return kExitRevoked;
        case KeyHealth::Unavailable:
            return kExitUnavailable;
    }
    return 1;
}

}  // namespace cmk::cli
