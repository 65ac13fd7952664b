// Key lifecycle (lifecycle.hpp). The step order of each operation, and why a crash at
// any step leaves a startable cluster (also in docs/CONTRACTS.md, "Rotation"):
//
// rewrap / bind_cluster (the KEK stays the same; only keyring.json changes):
//   1. wrap the KEK with the (new) provider and unwrap the result again, comparing it
//      with the KEK: the new wrapping is proven before anything is written.
//                                                            [<op>:after_wrap]
//   2. under the key map's writer lock, check keyring.json is still the one we read,
//      write keyring.json.tmp (new wrapped KEK, configuration, MAC), fsync
//                                                            [<op>:after_keyring_tmp]
//   3. rename over keyring.json, fsync the directory         [<op>:after_keyring]
//   A crash before 3 leaves the old keyring (its wrapping still unwraps: the old CMK
//   version / old CMK is untouched); after 3 the new one. Both open the same key map.
//
// rotate_kek (a new KEK: keyring.json, keymap and configs.json change):
//   1. new KEK, wrapped by the provider, unwrap-checked       [rotate_kek:after_wrap]
//   2. publish it (server: every process can now resolve generation g+1)
//   3. keyring.json := new KEK (g+1) + previous = old wrapped KEK (g), MAC'd under the
//      new KEK                                                [rotate_kek:after_keyring]
//      From here the keyring opens a key map of either generation.
//   4. keymap.tmp := every DEK re-sealed under the new KEK, header g+1; fsync
//                                                            [rotate_kek:after_keymap_tmp]
//      rename over keymap, fsync directory                   [rotate_kek:after_keymap]
//   5. configs.json re-MAC'd under the new KEK                [rotate_kek:after_configs]
//      (until then it verifies under the previous KEK, which the keyring still has)
//   6. keyring.json := without previous: the old KEK's last wrapped copy is gone.
//   Steps 3 to 6 run under the key map's writer lock: no process appends a DEK sealed
//   under the old generation into the new file. A crash before 3 leaves the old state;
//   after 3, starting (or the next key operation) finishes 4 to 6 (finish_interrupted).
#include "cmk_lakebase/keys/lifecycle.hpp"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>

#include "cmk_lakebase/keys/audit.hpp"

namespace cmk::lifecycle {
namespace {

std::mutex g_crash_mu;
std::string g_crash_step;

std::unique_ptr<KeyProvider> provider_for(Context& ctx, const KeyConfig& cfg, const std::string& name) {
    if (ctx.make_provider) return ctx.make_provider(cfg, name);
    return make_provider(cfg);
}

// The keyring on disk must still be the one ctx holds (same wrapped KEK, generation,
// configuration): otherwise another process changed it between our KMS calls and the
// lock, and writing ours would undo that change.
void check_unchanged(const Context& ctx) {
    Keyring disk = load_keyring(ctx.dir);
    bool same = disk.kek_generation == ctx.keyring.kek_generation &&
                disk.wrapped_kek == ctx.keyring.wrapped_kek &&
                disk.config.provider == ctx.keyring.config.provider &&
                disk.config.key_id == ctx.keyring.config.key_id &&
                disk.config.options == ctx.keyring.config.options &&
                disk.previous.has_value() == ctx.keyring.previous.has_value();
    if (!same)
        throw LifecycleError(
            "the keyring was changed by a concurrent key operation while this one was running; nothing was "
            "changed by this one: run it again",
            LifecycleError::Conflict);
}

// The KEK of generation gen without a KMS call, if this process knows it.
std::optional<SecureBytes> known_kek(Context& ctx, uint32_t gen) {
    if (gen == ctx.keyring.kek_generation && !ctx.kek.empty()) return ctx.kek.clone();
    if (ctx.kek_of) return ctx.kek_of(gen);
    return std::nullopt;
}

// A KEK of this cluster for gen: known, or (previous generation of an interrupted
// rotation) unwrapped through the provider.
std::optional<SecureBytes> kek_for(Context& ctx, uint32_t gen) {
    if (auto k = known_kek(ctx, gen)) return k;
    if (ctx.keyring.previous && ctx.keyring.previous->kek_generation == gen)
        return unlock_previous_kek(ctx.keyring, *ctx.provider);
    return std::nullopt;
}

audit::Event event_for(const Context& ctx, const std::string& action) {
    audit::Event e;
    e.action = action;
    e.key_config = ctx.keyring.bound_name();
    e.provider = ctx.keyring.config.provider;
    e.key_id = ctx.keyring.config.key_id;
    e.key_version = ctx.keyring.kek_version;
    e.kek_generation = ctx.keyring.kek_generation;
    return e;
}

// Everything rotate_kek rewrites, read and verified before its first write (issue 18):
// the key map (header, every record, every DEK authenticates under the current KEK)
// and configs.json. Found damaged after keyring.json names the new KEK, they would
// leave a rotation that no start could complete. Caller holds KeyMap::Exclusive.
void verify_rotation_inputs(Context& ctx) {
    ctx.keymap->refresh();
    for (const auto& id : ctx.keymap->identities()) (void)ctx.keymap->get(id);
    if (key_configs_exist(ctx.dir))
        (void)load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
}

// Steps 4 to 6 of rotate_kek. Caller holds KeyMap::Exclusive; ctx.keyring has
// previous and ctx.kek is the new (current) KEK.
void finish_locked(Context& ctx) {
    const PreviousKek prev = *ctx.keyring.previous;
    const uint32_t gen = ctx.keyring.kek_generation;
    ctx.keymap->refresh();
    if (ctx.keymap->generation() != gen) {
        ctx.keymap->rewrap(ctx.kek, gen, [] { crash_point("rotate_kek:after_keymap_tmp"); });
    }
    crash_point("rotate_kek:after_keymap");
    if (key_configs_exist(ctx.dir)) {
        KeyConfigSet set = load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
        if (set.kek_generation != gen) {
            set.kek_generation = gen;
            save_key_configs(ctx.dir, set, ctx.kek);
        }
    }
    crash_point("rotate_kek:after_configs");
    Keyring done = ctx.keyring;
    done.previous.reset();
    seal_keyring(done, ctx.kek);
    save_keyring(ctx.dir, done);
    ctx.keyring = std::move(done);
    if (ctx.retire) ctx.retire(prev.kek_generation);
}

}  // namespace

WrapResult wrap_checked(KeyProvider& p, const SecureBytes& kek) {
    WrapResult wr = p.wrap(kek);
    SecureBytes back = p.unwrap(wr.blob);
    if (back.size() != kek.size() || !ct_equal(back.data(), kek.data(), kek.size()))
        throw LifecycleError(
            "key provider \"" + p.config().provider + "\" (key \"" + p.config().key_id +
            "\") did not unwrap the KEK it had just wrapped to the same key; nothing was changed");
    return wr;
}

void set_crash_point(const std::string& step) {
    std::lock_guard<std::mutex> g(g_crash_mu);
    g_crash_step = step;
}

void crash_point(const char* step) {
    std::lock_guard<std::mutex> g(g_crash_mu);
    if (g_crash_step.empty() || g_crash_step != step) return;
    static const char msg[] = "cmk_lakebase: test hook: crashing at an injected crash point\n";
    (void)!::write(2, msg, sizeof msg - 1);
    ::kill(::getpid(), SIGKILL);
    ::_exit(137);
}

const std::vector<std::string>& crash_steps() {
    static const std::vector<std::string> steps{
        "rewrap:after_wrap",       "rewrap:after_keyring_tmp",       "rewrap:after_keyring",
        "bind_cluster:after_wrap", "bind_cluster:after_keyring_tmp", "bind_cluster:after_keyring",
        "rotate_kek:after_wrap",   "rotate_kek:after_keyring",       "rotate_kek:after_keymap_tmp",
        "rotate_kek:after_keymap", "rotate_kek:after_configs",
        "bind_database:after_wrap", "bind_database:after_keymap", "bind_database:after_keyring",
        "rebind_database:after_wrap", "unbind_database:after_keymap", "unbind_database:after_keyring",
    };
    return steps;
}

bool finish_interrupted(Context& ctx) {
    if (!ctx.keyring.previous) return false;
    KeyMap::Exclusive lock(*ctx.keymap);
    Keyring disk = load_keyring(ctx.dir);
    if (!disk.previous) {
        // Another process finished it meanwhile; adopt its keyring.
        verify_keyring(disk, ctx.kek);
        ctx.keyring = std::move(disk);
        return false;
    }
    uint32_t from = ctx.keyring.previous->kek_generation;
    finish_locked(ctx);
    audit::Event e = event_for(ctx, "rotate_kek");
    e.outcome = "ok";
    e.detail = "completed an interrupted KEK rotation from generation " + std::to_string(from);
    audit::record(e);
    return true;
}

Result rewrap(Context& ctx) {
    Result r;
    r.action = "rewrap";
    r.finished_interrupted = finish_interrupted(ctx);
    r.key_version_before = ctx.keyring.kek_version;
    r.kek_generation_before = ctx.keyring.kek_generation;
    audit::Event e = event_for(ctx, "rewrap");
    try {
        WrapResult wr = wrap_checked(*ctx.provider, ctx.kek);
        crash_point("rewrap:after_wrap");
        KeyMap::Exclusive lock(*ctx.keymap);
        check_unchanged(ctx);
        Keyring nk = ctx.keyring;
        nk.wrapped_kek = wr.blob;
        nk.kek_version = wr.key_version;
        nk.rotated_at = now_iso8601();
        seal_keyring(nk, ctx.kek);
        save_keyring(ctx.dir, nk, [] { crash_point("rewrap:after_keyring_tmp"); });
        crash_point("rewrap:after_keyring");
        ctx.keyring = std::move(nk);
        e.request_id = wr.request_id;
    } catch (const std::exception& ex) {
        e.outcome = "error";
        if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
        e.detail = ex.what();
        audit::record(e);
        throw;
    }
    e.key_version = ctx.keyring.kek_version;
    e.outcome = "ok";
    e.detail = "KEK re-wrapped (CMK version " + (r.key_version_before.empty() ? "?" : r.key_version_before) +
               " -> " + (ctx.keyring.kek_version.empty() ? "?" : ctx.keyring.kek_version) + ")";
    audit::record(e);
    r.config_name = ctx.keyring.bound_name();
    r.provider = ctx.keyring.config.provider;
    r.key_id = ctx.keyring.config.key_id;
    r.key_version = ctx.keyring.kek_version;
    r.kek_generation = ctx.keyring.kek_generation;
    r.kek_fingerprint = ctx.keyring.kek_fingerprint;
    return r;
}

Result bind_cluster(Context& ctx, const std::string& name) {
    Result r;
    r.action = "bind_cluster";
    validate_config_name(name);
    r.finished_interrupted = finish_interrupted(ctx);
    r.key_version_before = ctx.keyring.kek_version;
    r.kek_generation_before = ctx.keyring.kek_generation;
    audit::Event e = event_for(ctx, "bind_cluster");
    try {
        if (name == ctx.keyring.bound_name())
            throw LifecycleError("the cluster is already bound to key configuration \"" + name +
                                 "\"; to re-wrap the KEK under its current key version use rewrap()");
        KeyConfigSet set = load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
        auto it = set.configs.find(name);
        if (it == set.configs.end())
            throw LifecycleError("key configuration \"" + name +
                                     "\" does not exist; list them with key_configs() or create it with "
                                     "create_key_config()",
                                 LifecycleError::NotFound);
        const NamedKeyConfig target = it->second;
        std::unique_ptr<KeyProvider> np = provider_for(ctx, target.config, name);
        // Unwrap with the old: the KEK in hand was unwrapped (and the keyring verified)
        // by the old configuration. Wrap with the new, and prove it.
        WrapResult wr = wrap_checked(*np, ctx.kek);
        crash_point("bind_cluster:after_wrap");
        KeyMap::Exclusive lock(*ctx.keymap);
        check_unchanged(ctx);
        // Keep the configuration being left, so that the cluster can be bound back.
        const std::string old_name = ctx.keyring.bound_name();
        if (!set.configs.count(old_name)) {
            NamedKeyConfig keep{old_name, ctx.keyring.config, ctx.keyring.created_at};
            set.configs[old_name] = keep;
            set.kek_generation = ctx.keyring.kek_generation;
            save_key_configs(ctx.dir, set, ctx.kek);
        }
        Keyring nk = ctx.keyring;
        nk.config = target.config;
        nk.config_name = name;
        nk.wrapped_kek = wr.blob;
        nk.kek_version = wr.key_version;
        nk.rotated_at = now_iso8601();
        seal_keyring(nk, ctx.kek);
        save_keyring(ctx.dir, nk, [] { crash_point("bind_cluster:after_keyring_tmp"); });
        crash_point("bind_cluster:after_keyring");
        e.detail = "bound from key configuration \"" + old_name + "\" (provider " +
                   ctx.keyring.config.provider + ", key " + ctx.keyring.config.key_id + ") to \"" + name +
                   "\"";
        ctx.keyring = std::move(nk);
        ctx.provider = std::move(np);
        e.request_id = wr.request_id;
    } catch (const std::exception& ex) {
        e.outcome = "error";
        if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
        e.detail = "binding to \"" + name + "\": " + ex.what();
        audit::record(e);
        throw;
    }
    e.key_config = name;
    e.provider = ctx.keyring.config.provider;
    e.key_id = ctx.keyring.config.key_id;
    e.key_version = ctx.keyring.kek_version;
    e.outcome = "ok";
    audit::record(e);
    r.config_name = name;
    r.provider = ctx.keyring.config.provider;
    r.key_id = ctx.keyring.config.key_id;
    r.key_version = ctx.keyring.kek_version;
    r.kek_generation = ctx.keyring.kek_generation;
    r.kek_fingerprint = ctx.keyring.kek_fingerprint;
    return r;
}

Result rotate_kek(Context& ctx) {
    Result r;
    r.action = "rotate_kek";
    r.finished_interrupted = finish_interrupted(ctx);
    r.key_version_before = ctx.keyring.kek_version;
    r.kek_generation_before = ctx.keyring.kek_generation;
    audit::Event e = event_for(ctx, "rotate_kek");
    try {
        const uint32_t gen = ctx.keyring.kek_generation;
        const uint32_t ngen = gen + 1;
        SecureBytes nkek = random_key(kKekSize);
        WrapResult wr = wrap_checked(*ctx.provider, nkek);
        crash_point("rotate_kek:after_wrap");
        if (ctx.publish) ctx.publish(ngen, nkek);
        {
            KeyMap::Exclusive lock(*ctx.keymap);
            check_unchanged(ctx);
            verify_rotation_inputs(ctx);
            Keyring mid = ctx.keyring;
            PreviousKek prev;
            prev.wrapped_kek = ctx.keyring.wrapped_kek;
            prev.kek_version = ctx.keyring.kek_version;
            prev.kek_fingerprint = ctx.keyring.kek_fingerprint;
            prev.kek_generation = gen;
            mid.previous = prev;
            mid.wrapped_kek = wr.blob;
            mid.kek_version = wr.key_version;
            mid.kek_generation = ngen;
            mid.rotated_at = now_iso8601();
            seal_keyring(mid, nkek);
            save_keyring(ctx.dir, mid);
            crash_point("rotate_kek:after_keyring");
            // The old KEK stays reachable (for configs.json until step 5) through kek_of
            // / this copy; ctx switches to the new generation.
            SecureBytes old = std::move(ctx.kek);
            auto outer = ctx.kek_of;
            ctx.kek_of = [&old, gen, outer](uint32_t g) -> std::optional<SecureBytes> {
                if (g == gen && !old.empty()) return old.clone();
                return outer ? outer(g) : std::nullopt;
            };
            ctx.keyring = std::move(mid);
            ctx.kek = std::move(nkek);
            try {
                finish_locked(ctx);
            } catch (...) {
                ctx.kek_of = outer;
                throw;
            }
            ctx.kek_of = outer;
            old.wipe();
        }
        e.request_id = wr.request_id;
    } catch (const std::exception& ex) {
        e.outcome = "error";
        if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
        e.detail = ex.what();
        audit::record(e);
        throw;
    }
    e.key_version = ctx.keyring.kek_version;
    e.kek_generation = ctx.keyring.kek_generation;
    e.outcome = "ok";
    e.detail = "KEK rotated from generation " + std::to_string(r.kek_generation_before) + " to " +
               std::to_string(ctx.keyring.kek_generation) + "; " + std::to_string(ctx.keymap->size()) +
               " DEKs re-sealed; the old KEK is destroyed";
    audit::record(e);
    r.config_name = ctx.keyring.bound_name();
    r.provider = ctx.keyring.config.provider;
    r.key_id = ctx.keyring.config.key_id;
    r.key_version = ctx.keyring.kek_version;
    r.kek_generation = ctx.keyring.kek_generation;
    r.kek_fingerprint = ctx.keyring.kek_fingerprint;
    return r;
}

std::vector<ConfigRow> list_configs(Context& ctx) {
    KeyConfigSet set = load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
    std::vector<ConfigRow> out;
    const std::string bound = ctx.keyring.bound_name();
    ConfigRow b;
    b.named = NamedKeyConfig{bound, ctx.keyring.config, ctx.keyring.created_at};
    auto it = set.configs.find(bound);
    if (it != set.configs.end()) b.named.created_at = it->second.created_at;
    b.bound = true;
    for (auto& [name, c] : set.configs) {
        if (name == bound) continue;
        out.push_back(ConfigRow{c, false});
    }
    out.push_back(b);
    std::sort(out.begin(), out.end(),
              [](const ConfigRow& a, const ConfigRow& z) { return a.named.name < z.named.name; });
    return out;
}

void create_config(Context& ctx, const NamedKeyConfig& c) {
    audit::Event e = event_for(ctx, "create_key_config");
    e.key_config = c.name;
    e.provider = c.config.provider;
    e.key_id = c.config.key_id;
    e.key_version.clear();
    try {
        validate_config_name(c.name);
        validate_key_config(c.config);
        KeyMap::Exclusive lock(*ctx.keymap);
        KeyConfigSet set = load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
        if (set.configs.count(c.name) || c.name == ctx.keyring.bound_name())
            throw LifecycleError("key configuration \"" + c.name + "\" already exists",
                                 LifecycleError::Exists);
        NamedKeyConfig nc = c;
        if (nc.created_at.empty()) nc.created_at = now_iso8601();
        set.configs[nc.name] = nc;
        set.kek_generation = ctx.keyring.kek_generation;
        save_key_configs(ctx.dir, set, ctx.kek);
    } catch (const std::exception& ex) {
        e.outcome = "error";
        if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
        e.detail = ex.what();
        audit::record(e);
        throw;
    }
    e.outcome = "ok";
    audit::record(e);
}

void drop_config(Context& ctx, const std::string& name) {
    audit::Event e = event_for(ctx, "drop_key_config");
    e.key_config = name;
    try {
        if (name == ctx.keyring.bound_name())
            throw LifecycleError(
                "key configuration \"" + name +
                "\" is the one the cluster is bound to and cannot be dropped; bind the cluster "
                "to another configuration first");
        KeyMap::Exclusive lock(*ctx.keymap);
        KeyConfigSet set = load_key_configs(ctx.dir, [&ctx](uint32_t g) { return kek_for(ctx, g); });
        auto it = set.configs.find(name);
        if (it == set.configs.end())
            throw LifecycleError("key configuration \"" + name + "\" does not exist",
                                 LifecycleError::NotFound);
        e.provider = it->second.config.provider;
        e.key_id = it->second.config.key_id;
        e.key_version.clear();
        set.configs.erase(it);
        set.kek_generation = ctx.keyring.kek_generation;
        save_key_configs(ctx.dir, set, ctx.kek);
    } catch (const std::exception& ex) {
        e.outcome = "error";
        e.detail = ex.what();
        audit::record(e);
        throw;
    }
    e.outcome = "ok";
    audit::record(e);
}

}  // namespace cmk::lifecycle
