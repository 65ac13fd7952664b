// Cluster key administration in a running server: the provider's view of the CMK
// (provider_status, the watchdog's probe_key), the online key operations (rewrap,
// KEK rotation, binding to another key configuration, key configurations), each run
// through lifecycle.hpp's steps with the process's keyring, KEK and provider, and the
// pick-up of a keyring another process rewrote (refresh_keyring_locked), and the
// kill switch (wipe_keys).
#include <sys/stat.h>

#include <openssl/crypto.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/fs/key_admin.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace detail {

// Picks up a keyring.json another process rewrote (rewrap, new binding, KEK rotation):
// verified with the KEK of its generation, known here or from shared memory, without a
// KMS call. A keyring that does not verify is reported and ignored. Caller holds
// keyring_mu.
void refresh_keyring_locked(State& s) {
    struct stat sb;
    std::string path = s.keyring_dir + "/" + kKeyringFile;
    if (::stat(path.c_str(), &sb) != 0) return;
    bool same = sb.st_ino == s.keyring_stamp.st_ino && sb.st_size == s.keyring_stamp.st_size &&
                sb.st_mtim.tv_sec == s.keyring_stamp.st_mtim.tv_sec &&
                sb.st_mtim.tv_nsec == s.keyring_stamp.st_mtim.tv_nsec;
    if (same && !s.kek.empty()) return;
    try {
        Keyring kr = same ? s.keyring : load_keyring(s.keyring_dir);
        std::optional<SecureBytes> k;
        if (kr.kek_generation == s.keyring.kek_generation && !s.kek.empty())
            k = s.kek.clone();
        else
            k = shared_kek(kr.kek_generation);
        if (!k) {
            log_line("keyring.json was changed to KEK generation " + std::to_string(kr.kek_generation) +
                     ", which this process does not know; keeping generation " +
                     std::to_string(s.keyring.kek_generation));
            s.keyring_stamp = sb;
            return;
        }
        verify_keyring(kr, *k);
        bool new_provider = !s.provider || kr.config.provider != s.keyring.config.provider ||
                            kr.config.key_id != s.keyring.config.key_id ||
                            kr.config.options != s.keyring.config.options;
        if (new_provider) s.provider = audited(kr.config, kr.bound_name());
        s.keyring = std::move(kr);
        s.kek = std::move(*k);
        s.keyring_stamp = sb;
    } catch (const std::exception& e) {
        log_line(std::string("ignoring a keyring.json that does not verify: ") + e.what());
        s.keyring_stamp = sb;
    }
}

lifecycle::Context make_context(State& s) {
    lifecycle::Context ctx;
    ctx.dir = s.keyring_dir;
    ctx.keymap = &keymap();
    ctx.keyring = s.keyring;
    ctx.kek = s.kek.clone();
    ctx.provider = std::move(s.provider);
    ctx.kek_of = shared_kek;
    ctx.publish = [](uint32_t g, const SecureBytes& k) { shared_write(g, k.data()); };
    ctx.retire = [](uint32_t g) { shared_write(g, nullptr); };
    ctx.make_provider = audited;
    return ctx;
}

void adopt_context(State& s, lifecycle::Context& ctx) {
    s.keyring = ctx.keyring;
    if (!ctx.kek.empty()) s.kek = std::move(ctx.kek);
    if (ctx.provider) s.provider = std::move(ctx.provider);
    stamp_keyring(s);
}

}  // namespace detail

using namespace detail;

KeyStatus provider_status() {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    if (s.mode.load() != Mode::Off) refresh_keyring_locked(s);
    if (s.mode.load() == Mode::Off || !s.provider) {
        KeyStatus ks;
        ks.health = KeyHealth::Unavailable;
        ks.state = "unknown";
        ks.detail = "the encrypting file layer is not active";
        return ks;
    }
    try {
        return s.provider->status();
    } catch (const KmsError& e) {
        KeyStatus ks;
        ks.health = health_of(e.category);
        ks.state = "error";
        ks.detail = e.what();
        return ks;
    }
}

// The watchdog's probe (on a thread of its own, probe_thread.cpp). No lock is held
// across the provider's calls: a probe hung in one must not block the next probe (nor
// anything else of the process). The provider is checked out of State for the call (a
// provider is used by one thread at a time); a probe that finds it checked out by a
// hung probe makes its own from the same configuration, and whichever ends first puts
// its provider back.
ProbeResult probe_key() {
    State& s = st();
    ProbeResult r;
    std::unique_ptr<KeyProvider> prov;
    KeyConfig cfg;
    std::string bound;
    SecureBytes kek;
    std::vector<uint8_t> wrapped;
    {
        std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
        if (s.mode.load() != Mode::Off && !s.wiped.load()) refresh_keyring_locked(s);
        if (s.mode.load() == Mode::Off) {
            r.detail = "the encrypting file layer is not active";
            return r;
        }
        if (s.wiped.load()) {
            r.health = KeyHealth::Revoked;
            r.detail = "keys have been wiped in this server";
            return r;
        }
        if (s.kek.empty()) {
            // Not a revocation: this process does not hold the KEK to compare with.
            r.detail =
                "this process does not know the KEK of generation " + std::to_string(s.keyring.kek_generation);
            return r;
        }
        kek = s.kek.clone();
        wrapped = s.keyring.wrapped_kek;
        cfg = s.keyring.config;
        bound = s.keyring.bound_name();
        prov = std::move(s.provider);
    }
    try {
        if (!prov) prov = audited(cfg, bound);
        KeyStatus ks = prov->status();
        r.request_id = ks.request_id;
        if (ks.health != KeyHealth::Ok) {
            r.health = ks.health;
            r.detail = status_detail(ks);
        } else {
            SecureBytes k = prov->unwrap(wrapped);
            if (k.size() != kek.size() || !ct_equal(k.data(), kek.data(), k.size())) {
                r.health = KeyHealth::Revoked;
                r.detail =
                    "the key provider unwrapped the key-encryption key to a different key (the CMK was replaced)";
            } else {
                r.health = KeyHealth::Ok;
                r.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state) + "; unwrap probe matched";
            }
        }
    } catch (const std::exception& e) {
        r.health = health_of(category_of(e));  // revoked only when the provider refused
        r.detail = e.what();
    }
    if (prov) {
        std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
        const KeyConfig& now = s.keyring.config;
        if (!s.provider && now.provider == cfg.provider && now.key_id == cfg.key_id && now.options == cfg.options)
            s.provider = std::move(prov);
    }
    return r;
}

void wipe_keys() {
    State& s = st();
    s.wiped.store(true);
    s.kek.wipe();
    s.per_boot.wipe();
    forget_kept_keys();
    // Every process's KEK source: from now on no process can open the key map.
    if (SharedKeys* sh = s.shared) {
        sh->seq.fetch_add(1);
        OPENSSL_cleanse(sh->slot, sizeof sh->slot);
        sh->seq.fetch_add(1);
    }
    if (DbShared* d = s.dbshared)
        for (auto& sl : d->slot)
            if (sl.state.load() != kDbFree) slot_set(sl.oid.load(), nullptr, kDbLocked);
    // Open descriptors keep their FileKey objects; they refuse to work from now on
    // (checked on every read and write) and are destroyed as descriptors close.
}

// ---- key lifecycle (online) --------------------------------------------------------------

KeyOpResult rewrap_kek() {
    return with_context([](lifecycle::Context& c) { return lifecycle::rewrap(c); });
}

KeyOpResult rotate_kek() {
    return with_context([](lifecycle::Context& c) { return lifecycle::rotate_kek(c); });
}

KeyOpResult bind_cluster(const std::string& config_name) {
    return with_context(
        [&](lifecycle::Context& c) { return lifecycle::bind_cluster(c, config_name); });
}

std::vector<KeyConfigInfo> key_configs() {
    return with_context([](lifecycle::Context& c) {
        std::vector<KeyConfigInfo> out;
        for (const auto& row : lifecycle::list_configs(c)) {
            KeyConfigInfo k;
            k.name = row.named.name;
            k.provider = row.named.config.provider;
            k.key_id = row.named.config.key_id;
            k.options = row.named.config.options;
            k.created_at = row.named.created_at;
            k.bound = row.bound;
            out.push_back(std::move(k));
        }
        return out;
    });
}

void create_key_config(const std::string& name, const KeyConfig& cfg) {
    with_context([&](lifecycle::Context& c) {
        lifecycle::create_config(c, NamedKeyConfig{name, cfg, ""});
        return 0;
    });
}

void drop_key_config(const std::string& name) {
    with_context([&](lifecycle::Context& c) {
        lifecycle::drop_config(c, name);
        return 0;
    });
}

std::string keyring_directory() {
    return st().keyring_dir;
}

void set_probe_audit_aggregation(bool on) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    s.aggregate_probes = on;
    if (s.provider) audit::set_aggregate_probes(*s.provider, on);
}

}  // namespace cmk::fs
