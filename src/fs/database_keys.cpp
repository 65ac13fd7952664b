// Database key administration: databases bound to key configurations of their own
// (dbkeys.hpp) in a running server. Binding, re-binding and unbinding move a database's
// DEKs between key maps online (no data file rewritten); the watchdog probes each
// bound database's CMK and revokes one database (closing, then locked) without
// touching the others; a locked database opens again when its key is usable.
#include <sys/stat.h>

#include <cerrno>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/fs/key_admin.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {

using namespace detail;

// ---- databases bound to key configurations of their own ------------------------------------

namespace {

const char* db_state_name(int state) {
    switch (state) {
        case kDbOpen: return "open";
        case kDbClosing: return "closing";
        case kDbLocked: return "locked";
        default: return "unbound";
    }
}

// This process's keyring and provider of a bound database, re-read when keyring.json
// changed (verified with the database KEK when it is available). Caller holds db_mu.
State::DbProc& db_proc(uint32_t oid) {
    State& s = st();
    std::string dir = dbkeys::dir_for(s.keyring_dir, oid);
    struct stat sb;
    if (::stat((dir + "/" + kKeyringFile).c_str(), &sb) != 0)
        throw lifecycle::LifecycleError("database " + std::to_string(oid) +
                                            " is not bound to a key configuration of its own",
                                        lifecycle::LifecycleError::NotFound);
    State::DbProc& p = s.dbs[oid];
    bool same = p.provider && sb.st_ino == p.stamp.st_ino && sb.st_size == p.stamp.st_size &&
                sb.st_mtim.tv_sec == p.stamp.st_mtim.tv_sec && sb.st_mtim.tv_nsec == p.stamp.st_mtim.tv_nsec;
    if (!same) {
        Keyring kr = load_keyring(dir);
        if (DbSlot* sl = db_slot(oid))
            if (auto k = slot_kek(sl)) verify_keyring(kr, *k);
        bool new_provider = !p.provider || kr.config.provider != p.keyring.config.provider ||
                            kr.config.key_id != p.keyring.config.key_id ||
                            kr.config.options != p.keyring.config.options;
        if (new_provider) p.provider = audited(kr.config, kr.bound_name());
        p.keyring = std::move(kr);
        p.stamp = sb;
    }
    return p;
}

void db_stamp(State::DbProc& p, uint32_t oid) {
    std::string path = dbkeys::dir_for(st().keyring_dir, oid) + "/" + kKeyringFile;
    if (::stat(path.c_str(), &p.stamp) != 0) p.stamp = {};
}

audit::Event db_event(const std::string& action, uint32_t oid, const std::string& config, const KeyConfig& cfg) {
    audit::Event e;
    e.action = action;
    e.key_config = config;
    e.provider = cfg.provider;
    e.key_id = cfg.key_id;
    e.detail = "database " + std::to_string(oid);
    return e;
}

std::optional<SecureBytes> cluster_kek_of(lifecycle::Context& c, uint32_t gen) {
    if (gen == c.keyring.kek_generation && !c.kek.empty()) return c.kek.clone();
    if (c.kek_of) return c.kek_of(gen);
    return std::nullopt;
}

}  // namespace

DbOpResult bind_database(uint32_t oid, const std::string& config_name) {
    return with_context([&](lifecycle::Context& c) {
        State& s = st();
        validate_config_name(config_name);
        struct stat sb;
        if (oid == 0 || ::stat((s.datadir + "/base/" + std::to_string(oid)).c_str(), &sb) != 0)
            throw lifecycle::LifecycleError("database " + std::to_string(oid) + " does not exist",
                                            lifecycle::LifecycleError::NotFound);
        KeyConfigSet set = load_key_configs(c.dir, [&c](uint32_t g) { return cluster_kek_of(c, g); });
        // The cluster's own configuration is a valid choice too (a database KEK of its
        // own under the same CMK), even before configs.json records it.
        if (!set.configs.count(config_name) && config_name == c.keyring.bound_name())
            set.configs[config_name] = NamedKeyConfig{config_name, c.keyring.config, c.keyring.created_at};
        auto it = set.configs.find(config_name);
        if (it == set.configs.end())
            throw lifecycle::LifecycleError("key configuration \"" + config_name +
                                                "\" does not exist; list them with key_configs() or create it "
                                                "with create_key_config()",
                                            lifecycle::LifecycleError::NotFound);
        const NamedKeyConfig target = it->second;
        DbOpResult r;
        r.oid = oid;
        std::lock_guard<std::recursive_mutex> g(s.db_mu);
        bool rebind = dbkeys::is_bound(c.dir, oid);
        r.action = rebind ? "rebind_database" : "bind_database";
        audit::Event e = db_event(r.action, oid, config_name, target.config);
        try {
            std::unique_ptr<KeyProvider> np = audited(target.config, config_name);
            if (rebind) {
                DbSlot* sl = db_slot(oid);
                std::optional<SecureBytes> k = sl ? slot_kek(sl) : std::nullopt;
                if (!k)
                    throw LayerError("cmk_lakebase: the key of database " + std::to_string(oid) +
                                         " is not available, so it cannot be re-wrapped",
                                     "", "Restore access to the database's current key first.");
                State::DbProc& p = db_proc(oid);
                if (p.keyring.bound_name() == config_name)
                    throw lifecycle::LifecycleError("database " + std::to_string(oid) +
                                                    " is already bound to key configuration \"" + config_name + "\"");
                e.detail += ", from key configuration \"" + p.keyring.bound_name() + "\"";
                KeyMap::Exclusive lock(*c.keymap);
                Keyring nk = dbkeys::rebind(c.dir, oid, p.keyring, *k, target, *np);
                p.keyring = std::move(nk);
                p.provider = std::move(np);
                db_stamp(p, oid);
                r.dek_count = db_keymap(oid, sl).size();
            } else {
                KeyMap::Exclusive lock(*c.keymap);
                dbkeys::Binding b = dbkeys::bind(c.dir, *c.keymap, c.keyring.cluster_id, oid, target, *np,
                                                 [oid](const SecureBytes& k) { slot_set(oid, &k, kDbOpen); });
                State::DbProc& p = s.dbs[oid];
                p.keyring = b.keyring;
                p.provider = std::move(np);
                db_stamp(p, oid);
                r.dek_count = b.moved;
            }
        } catch (const std::exception& ex) {
            e.outcome = "error";
            if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
            e.detail += ": " + std::string(ex.what());
            audit::record(e);
            throw;
        }
        const Keyring& kr = s.dbs[oid].keyring;
        r.config_name = config_name;
        r.provider = kr.config.provider;
        r.key_id = kr.config.key_id;
        r.key_version = kr.kek_version;
        r.kek_fingerprint = kr.kek_fingerprint;
        e.key_version = kr.kek_version;
        e.outcome = "ok";
        e.detail += ", " + std::to_string(r.dek_count) + " DEKs under the database's own KEK";
        audit::record(e);
        return r;
    });
}

DbOpResult unbind_database(uint32_t oid) {
    return with_context([&](lifecycle::Context& c) {
        State& s = st();
        std::lock_guard<std::recursive_mutex> g(s.db_mu);
        State::DbProc& p = db_proc(oid);
        DbOpResult r;
        r.action = "unbind_database";
        r.oid = oid;
        r.config_name = p.keyring.bound_name();
        r.provider = p.keyring.config.provider;
        r.key_id = p.keyring.config.key_id;
        audit::Event e = db_event(r.action, oid, r.config_name, p.keyring.config);
        try {
            DbSlot* sl = db_slot(oid);
            if (!sl || !db_usable(sl))
                throw LayerError("cmk_lakebase: the key of database " + std::to_string(oid) +
                                     " is not available, so its keys cannot be moved back",
                                 "", "Restore access to the database's key first.");
            KeyMap::Exclusive lock(*c.keymap);
            r.dek_count = dbkeys::unbind(c.dir, *c.keymap, db_keymap(oid, sl), oid);
            slot_set(oid, nullptr, kDbFree);
            s.dbs.erase(oid);
        } catch (const std::exception& ex) {
            e.outcome = "error";
            e.detail += ": " + std::string(ex.what());
            audit::record(e);
            throw;
        }
        e.outcome = "ok";
        e.detail += ", " + std::to_string(r.dek_count) + " DEKs back under the cluster KEK";
        audit::record(e);
        return r;
    });
}

std::vector<DatabaseKeyInfo> database_keys() {
    State& s = st();
    std::vector<DatabaseKeyInfo> out;
    if (s.mode.load() == Mode::Off) return out;
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    for (uint32_t oid : dbkeys::bound_databases(s.keyring_dir)) {
        DatabaseKeyInfo i;
        i.oid = oid;
        DbSlot* sl = db_slot(oid);
        i.state = sl ? db_state_name(sl->state.load()) : "locked";
        try {
            State::DbProc& p = db_proc(oid);
            i.config_name = p.keyring.bound_name();
            i.provider = p.keyring.config.provider;
            i.key_id = p.keyring.config.key_id;
            i.key_version = p.keyring.kek_version;
            i.kek_fingerprint = p.keyring.kek_fingerprint;
            i.bound_at = p.keyring.created_at;
            i.rotated_at = p.keyring.rotated_at;
            if (sl && db_usable(sl)) {
                KeyMap& dm = db_keymap(oid, sl);
                dm.refresh();
                i.dek_count = dm.size();
            }
        } catch (const std::exception& e) {
            i.state = "locked";
            log_line("database " + std::to_string(oid) + ": " + e.what());
        }
        out.push_back(std::move(i));
    }
    return out;
}

bool database_refused(uint32_t oid) {
    DbSlot* sl = db_slot(oid);
    if (!sl) return false;
    int state = sl->state.load(std::memory_order_acquire);
    return state == kDbClosing || state == kDbLocked;
}

bool any_database_refused() {
    DbShared* d = st().dbshared;
    if (!d || d->in_use.load(std::memory_order_acquire) == 0) return false;
    for (auto& sl : d->slot) {
        int state = sl.state.load(std::memory_order_acquire);
        if (state == kDbClosing || state == kDbLocked) return true;
    }
    return false;
}

// The watchdog's probe of each bound database's key. As in probe_key(), no lock is
// held across a provider call: the database's provider is checked out for the call
// (or, checked out by a hung probe, made afresh from the same configuration) and put
// back afterwards.
std::vector<DbProbe> probe_databases() {
    State& s = st();
    std::vector<DbProbe> out;
    if (s.mode.load() == Mode::Off || s.wiped.load()) return out;
    std::vector<uint32_t> oids;
    {
        std::lock_guard<std::recursive_mutex> g(s.db_mu);
        oids = dbkeys::bound_databases(s.keyring_dir);
    }
    for (uint32_t oid : oids) {
        DbProbe pr;
        pr.oid = oid;
        struct stat sb;
        if (::stat((s.datadir + "/base/" + std::to_string(oid)).c_str(), &sb) != 0 && errno == ENOENT) {
            pr.state = db_state_name(kDbLocked);
            if (DbSlot* sl = db_slot(oid)) pr.state = db_state_name(sl->state.load());
            pr.dropped = true;
            pr.detail = "the database no longer exists";
            out.push_back(std::move(pr));
            continue;
        }
        std::unique_ptr<KeyProvider> prov;
        KeyConfig cfg;
        try {
            std::optional<SecureBytes> kek;
            std::vector<uint8_t> wrapped;
            std::string bound;
            {
                std::lock_guard<std::recursive_mutex> g(s.db_mu);
                DbSlot* sl = db_slot(oid);
                pr.state = db_state_name(sl ? sl->state.load() : kDbLocked);
                State::DbProc& p = db_proc(oid);
                pr.config_name = p.keyring.bound_name();
                pr.provider = p.keyring.config.provider;
                pr.key_id = p.keyring.config.key_id;
                cfg = p.keyring.config;
                bound = p.keyring.bound_name();
                wrapped = p.keyring.wrapped_kek;
                if (sl) kek = slot_kek(sl);
                prov = std::move(p.provider);
            }
            if (!prov) prov = audited(cfg, bound);
            KeyStatus ks = prov->status();
            pr.request_id = ks.request_id;
            if (ks.health != KeyHealth::Ok) {
                pr.health = ks.health;
                pr.detail = status_detail(ks);
            } else if (kek) {
                SecureBytes u = prov->unwrap(wrapped);
                if (u.size() != kek->size() || !ct_equal(u.data(), kek->data(), u.size())) {
                    pr.health = KeyHealth::Revoked;
                    pr.detail = "the key provider unwrapped the database's KEK to a different key (the CMK was "
                                "replaced)";
                } else {
                    pr.health = KeyHealth::Ok;
                    pr.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state) +
                                "; unwrap probe matched";
                }
            } else {
                pr.health = KeyHealth::Ok;  // locked, and the key says usable again
                pr.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state);
            }
        } catch (const std::exception& e) {
            pr.health = health_of(category_of(e));  // revoked only when the provider refused
            pr.detail = e.what();
        }
        if (prov) {
            std::lock_guard<std::recursive_mutex> g(s.db_mu);
            auto it = s.dbs.find(oid);
            if (it != s.dbs.end() && !it->second.provider) {
                const KeyConfig& now = it->second.keyring.config;
                if (now.provider == cfg.provider && now.key_id == cfg.key_id && now.options == cfg.options)
                    it->second.provider = std::move(prov);
            }
        }
        out.push_back(std::move(pr));
    }
    return out;
}

void begin_database_revocation(uint32_t oid) {
    KeyMap::Exclusive lock(keymap());
    DbSlot* sl = db_slot(oid);
    if (sl && sl->state.load() == kDbOpen) slot_state(oid, kDbClosing);
}

void lock_database(uint32_t oid) {
    State& s = st();
    KeyMap::Exclusive lock(keymap());
    if (db_slot(oid)) slot_set(oid, nullptr, kDbLocked);
    forget_kept_keys();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    auto it = s.dbs.find(oid);
    if (it != s.dbs.end()) {
        it->second.map.reset();
        it->second.map_pid = 0;
    }
}

void unlock_database(uint32_t oid) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    State::DbProc& p = db_proc(oid);
    SecureBytes k = unlock_keyring(p.keyring, *p.provider);
    KeyMap::Exclusive lock(keymap());
    slot_set(oid, &k, kDbOpen);
    KeyMap& dm = db_keymap(oid, db_slot(oid));
    size_t n = dbkeys::settle(keymap(), dm, oid);
    if (n) log_line("database " + std::to_string(oid) + ": moved " + std::to_string(n) +
                    " keys left in the cluster key map by an interrupted binding");
}

void forget_database(uint32_t oid) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    KeyMap::Exclusive lock(keymap());
    dbkeys::forget(s.keyring_dir, oid);
    slot_set(oid, nullptr, kDbFree);
    s.dbs.erase(oid);
    forget_kept_keys();
}

}  // namespace cmk::fs
