// `pg_cmk status`: what protects an encrypted cluster and whether it can be opened
// now. Asks the provider for the key's state, proves the KEK unwraps and the keyring
// is intact (its MAC), opens the key map, counts the DEKs and checks that every
// relation and SLRU file with data has one (as the server's start does). Works with the
// server running or not; reads only. Exit 0 usable, 3 revoked, 4 unavailable, 5 a key
// file damaged (the server would refuse to start), 1 other error.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "cli.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "cmk_lakebase/kms/provider.hpp"

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
    "Databases bound to key configurations of their own are listed with the state of\n"
    "their keys; the exit status is the cluster key's.\n"
    "\n"
    "Exit status: 0 if the key is usable, 3 if it is revoked (disabled, deleted, access\n"
    "denied), 4 if the provider is unavailable, 5 if a key file is damaged (keyring.json,\n"
    "the key map, or data files without a key: the server would refuse to start), 1 on\n"
    "other errors.\n";

constexpr int kExitRevoked = 3;
constexpr int kExitUnavailable = 4;
constexpr int kExitDamaged = 5;

[[noreturn]] void damaged(const std::string& msg) {
    throw ExitError(kExitDamaged, msg);
}

// Relation and SLRU files with data and no DEK, as the server's start counts them
// (files whose key the map records as removed are emptied by the server, not refused;
// WAL segments' keys derive from the WAL master key; files of a bound database whose
// map is not open here are not judged). Returns how many, and the first few in *first.
size_t files_without_key(const std::string& datadir, KeyMap& km,
                         const std::function<KeyMap*(uint32_t)>& db_map, std::string* first) {
    size_t count = 0;
    const std::string major = sys::data_directory_major(datadir);
    std::vector<std::string> stack{""};
    while (!stack.empty()) {
        std::string rel = stack.back();
        stack.pop_back();
        std::string abs = rel.empty() ? datadir : datadir + "/" + rel;
        DIR* d = ::opendir(abs.c_str());
        if (!d) continue;
        while (struct dirent* e = ::readdir(d)) {
            std::string name = e->d_name;
            if (name == "." || name == "..") continue;
            std::string r = rel.empty() ? name : rel + "/" + name;
            if (r == "cmk_lakebase") continue;
            if (other_version_tablespace_dir(r, major)) continue;  // another cluster's (pg_upgrade)
            struct stat sb;
            if (::stat((abs + "/" + name).c_str(), &sb) != 0) continue;  // follows pg_tblspc links
            if (S_ISDIR(sb.st_mode)) {
                stack.push_back(r);
                continue;
            }
            if (!S_ISREG(sb.st_mode) || sb.st_size == 0) continue;
            FileClass c = classify_relative(r);
            if (!is_durable(c) || c == FileClass::Wal) continue;
            if (km.contains(r) || km.removed(r)) continue;
            if (uint32_t oid = database_of(r)) {
                if (KeyMap* dm = db_map(oid)) {
                    if (dm->contains(r) || dm->removed(r)) continue;
                } else if (dbkeys::is_bound(datadir + "/cmk_lakebase", oid)) {
                    continue;
                }
            }
            // Zeros only (extended, never written with data) need no key.
            if (sys::file_all_zero((abs + "/" + name).c_str()) == 1) continue;
            if (count++ < 3) *first += (first->empty() ? "" : ", ") + r;
        }
        ::closedir(d);
    }
    return count;
}

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
    struct Database {
        uint32_t oid = 0;
        std::string config_name, provider, key_id, kek_fingerprint;
        KeyHealth health = KeyHealth::Unavailable;
        std::string provider_state, detail;
        std::optional<size_t> deks;
    };
    std::vector<Database> databases;
};

std::string key_state_text(KeyHealth health, const std::string& provider_state, const std::string& detail) {
    std::string s = key_health_name(health);
    std::string inner = provider_state.empty() ? "-" : provider_state;
    if (!detail.empty()) inner += ": " + detail;
    for (char& c : inner)
        if (c == '\n' || c == '\r') c = ' ';
    return s + " (" + inner + ")";
}

void print_lines(const StatusReport& r) {
    std::printf("data_directory: %s\n", r.data_directory.c_str());
    std::printf("provider: %s\n", r.provider.c_str());
    std::printf("key_id: %s\n", r.key_id.c_str());
    if (!r.key_store.empty()) std::printf("key_store: %s\n", r.key_store.c_str());
    std::printf("key_state: %s\n", key_state_text(r.health, r.provider_state, r.detail).c_str());
    std::printf("kek_fingerprint: %s\n", r.kek_fingerprint.c_str());
    std::printf("kek_generation: %u\n", r.kek_generation);
    std::printf("cluster_id: %s\n", r.cluster_id.c_str());
    if (r.deks)
        std::printf("deks: %zu\n", *r.deks);
    else
        std::printf("deks: unknown (the key is not usable)\n");
    for (const auto& d : r.databases) {
        std::printf("database %u: key_config %s, provider %s, key_id %s, kek_fingerprint %s, key_state %s, deks %s\n",
                    d.oid, d.config_name.c_str(), d.provider.c_str(), d.key_id.c_str(), d.kek_fingerprint.c_str(),
                    key_state_text(d.health, d.provider_state, d.detail).c_str(), d.deks ? std::to_string(*d.deks).c_str() : "unknown");
    }
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
    w.Key("databases");
    w.StartArray();
    for (const auto& d : r.databases) {
        w.StartObject();
        w.Key("oid");
        w.Uint(d.oid);
        field("key_config", d.config_name);
        field("provider", d.provider);
        field("key_id", d.key_id);
        field("kek_fingerprint", d.kek_fingerprint);
        field("key_state", key_health_name(d.health));
        field("provider_state", d.provider_state);
        field("detail", d.detail);
        w.Key("deks");
        if (d.deks)
            w.Uint64(*d.deks);
        else
            w.Null();
        w.EndObject();
    }
    w.EndArray();
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
        // Missing: not an encrypted cluster (1); present and unreadable: damaged (5).
        if (::access(keyring_file.c_str(), F_OK) != 0) throw CliError(std::string(e.what()) + " (" + keyring_file + ")");
        damaged(std::string(e.what()) + " (" + keyring_file + ")");
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
        r.health = health_of(e.category);
        r.provider_state = "error";
        r.detail = e.what();
    }

    std::unique_ptr<KeyMap> km;
    std::map<uint32_t, std::unique_ptr<KeyMap>> db_maps;
    if (r.health == KeyHealth::Ok) {
        // The provider says yes; prove it: unwrap the KEK, check the keyring's MAC and
        // that the key map opens under this KEK. KeyringError / KeyMapError (tampered,
        // damaged) are errors of their own, exit 1.
        try {
            // An interrupted KEK rotation is completed at the next start; until then the
            // key map may be sealed under the previous generation.
            ClusterKeys keys = unlock_cluster_keys(dir, kr, *provider);
            km = open_cluster_keymap(dir, kr, keys);
            r.deks = km->size();
            try {
                verify_key_configs(dir, kr, keys);
            } catch (const KeyringError& e) {
                damaged(std::string(e.what()) + " (" + dir + "/configs.json)");
            }
        } catch (const KeyringError& e) {
            damaged(std::string(e.what()) + " (" + keyring_file + ")");
        } catch (const KeyMapError& e) {
            damaged(std::string(e.what()) + " (" + dir + "/keymap)");
        } catch (const KmsError& e) {
            if (e.kind == KmsErrorKind::Config) throw;
            r.health = health_of(e.category);
            r.provider_state = "unwrap failed";
            r.detail = e.what();
        }
    }

    // Databases with keys of their own: their key states, proven the same way.
    for (uint32_t oid : dbkeys::bound_databases(dir)) {
        StatusReport::Database d;
        d.oid = oid;
        std::string ddir = dbkeys::dir_for(dir, oid);
        try {
            Keyring dk = load_keyring(ddir);
            d.config_name = dk.bound_name();
            d.provider = dk.config.provider;
            d.key_id = dk.config.key_id;
            d.kek_fingerprint = dk.kek_fingerprint;
            auto dp = audit::audited_provider(make_provider(dk.config), dk.bound_name());
            KeyStatus st = dp->status();
            d.health = st.health;
            d.provider_state = st.state;
            d.detail = st.detail;
            if (d.health == KeyHealth::Ok) {
                SecureBytes dkek = unlock_keyring(dk, *dp);
                auto dm = std::make_unique<KeyMap>(ddir, dkek, kr.cluster_id, dk.kek_generation);
                d.deks = dm->size();
                db_maps[oid] = std::move(dm);
            }
        } catch (const KmsError& e) {
            d.health = health_of(e.category);
            d.provider_state = "error";
            d.detail = e.what();
        } catch (const std::exception& e) {
            d.health = KeyHealth::Unavailable;
            d.provider_state = "error";
            d.detail = e.what();
        }
        r.databases.push_back(std::move(d));
    }

    if (km) {
        std::string first;
        size_t n = files_without_key(
            r.data_directory, *km,
            [&](uint32_t oid) -> KeyMap* {
                auto it = db_maps.find(oid);
                return it == db_maps.end() ? nullptr : it->second.get();
            },
            &first);
        if (n)
            damaged("the key map is damaged or truncated: " + std::to_string(n) +
                    " data file(s) have no data encryption key (first: " + first +
                    "); the server refuses to start. Restore the data directory together with its "
                    "cmk_lakebase/ directory from the same backup");
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
