// Key lifecycle units (src/core/lifecycle.cpp, keyconfigs.cpp, audit.cpp): KEK
// rotation keeps every DEK, a crash at each named step (death tests: the child kills
// itself at the step) leaves a state that opens and completes, rewrap and
// bind_cluster switch the keyring only, configs.json is tamper-evident, the audit
// trail aggregates probes and never holds key material.
#include <sys/stat.h>

#include <map>
#include <memory>
#include <string>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "test_helpers.hpp"

using namespace cmk;

namespace {

class LifecycleTest : public ::testing::Test {
protected:
    void SetUp() override {
        store_dir = tmp.sub("keys");
        ::mkdir(store_dir.c_str(), 0700);
        LocalKeyStore ks(store_dir);
        ks.create("k1");
        ks.create("k2");
        dir = tmp.sub("cmk_lakebase");
        cfg.provider = "local";
        cfg.key_id = "k1";
        cfg.options["key_store"] = store_dir;
        auto p = make_provider(cfg);
        SecureBytes kek;
        Keyring kr = create_keyring(*p, kek);
        save_keyring(dir, kr);
        KeyMap::create_empty(dir, kr.cluster_id, kr.kek_generation);
        KeyMap km(dir, kek, kr.cluster_id, kr.kek_generation);
        for (int i = 0; i < 50; i++) {
            std::string id = "base/5/" + std::to_string(16384 + i);
            SecureBytes d = km.create(id, FileClass::Relation);
            deks[id] = key_fingerprint(d.data(), d.size());
        }
        audit::set_directory(dir);
        audit::set_default_actor("unit");
    }

    // Opens the cluster the way the server does at start (previous KEK of an
    // interrupted rotation included), completing an interrupted rotation.
    void open(bool finish = true) {
        keymap.reset();
        previous.wipe();
        ctx = lifecycle::Context();
        ctx.dir = dir;
        ctx.keyring = load_keyring(dir);
        ctx.provider = make_provider(ctx.keyring.config);
        ctx.kek = unlock_keyring(ctx.keyring, *ctx.provider);
        uint32_t gen = ctx.keyring.kek_generation;
        SecureBytes mk = ctx.kek.clone();
        if (ctx.keyring.previous) {
            previous = unlock_previous_kek(ctx.keyring, *ctx.provider);
            if (KeyMap::peek_generation(dir) == ctx.keyring.previous->kek_generation) {
                gen = ctx.keyring.previous->kek_generation;
                mk = previous.clone();
            }
        }
        auto lookup = [this](uint32_t g) -> std::optional<SecureBytes> {
            if (g == ctx.keyring.kek_generation) return ctx.kek.clone();
            if (ctx.keyring.previous && g == ctx.keyring.previous->kek_generation && !previous.empty())
                return previous.clone();
            return std::nullopt;
        };
        keymap = std::make_unique<KeyMap>(dir, mk, ctx.keyring.cluster_id, gen, lookup);
        ctx.keymap = keymap.get();
        ctx.kek_of = lookup;
        if (finish) lifecycle::finish_interrupted(ctx);
    }

    void expect_deks_intact() {
        ASSERT_EQ(keymap->size(), deks.size());
        for (const auto& [id, fp] : deks) {
            auto d = keymap->get(id);
            ASSERT_TRUE(d.has_value()) << id;
            EXPECT_EQ(key_fingerprint(d->data(), d->size()), fp) << id;
        }
    }

    cmk_test::TempDir tmp;
    std::string store_dir, dir;
    KeyConfig cfg;
    std::map<std::string, std::string> deks;
    std::unique_ptr<KeyMap> keymap;
    SecureBytes previous;
    lifecycle::Context ctx;
};

}  // namespace

TEST_F(LifecycleTest, RotateKekKeepsEveryDekAndBumpsTheGeneration) {
    open();
    std::string fp_before = ctx.keyring.kek_fingerprint;
    lifecycle::Result r = lifecycle::rotate_kek(ctx);
    EXPECT_EQ(r.kek_generation_before, 1u);
    EXPECT_EQ(r.kek_generation, 2u);
    EXPECT_NE(r.kek_fingerprint, fp_before);
    Keyring disk = load_keyring(dir);
    EXPECT_EQ(disk.kek_generation, 2u);
    EXPECT_FALSE(disk.previous.has_value()) << "the old KEK's last wrapped copy is gone";
    EXPECT_EQ(KeyMap::peek_generation(dir), 2u);
    open();
    expect_deks_intact();
}

TEST_F(LifecycleTest, RewrapUsesTheNewPrimaryVersionAndKeepsTheKek) {
    open();
    LocalKeyStore(store_dir).rotate("k1");
    std::string fp = ctx.keyring.kek_fingerprint;
    lifecycle::Result r = lifecycle::rewrap(ctx);
    EXPECT_EQ(r.key_version_before, "1");
    EXPECT_EQ(r.key_version, "2");
    EXPECT_EQ(r.kek_fingerprint, fp);
    EXPECT_EQ(r.kek_generation, 1u);
    open();
    expect_deks_intact();
    EXPECT_EQ(ctx.keyring.kek_version, "2");
}

TEST_F(LifecycleTest, BindClusterMovesToAnotherCmkAndBack) {
    open();
    KeyConfig c2 = cfg;
    c2.key_id = "k2";
    lifecycle::create_config(ctx, NamedKeyConfig{"second", c2, ""});
    lifecycle::Result r = lifecycle::bind_cluster(ctx, "second");
    EXPECT_EQ(r.key_id, "k2");
    // The old CMK no longer matters: disabling it leaves the cluster usable.
    LocalKeyStore(store_dir).set_state("k1", "disabled");
    open();
    expect_deks_intact();
    EXPECT_EQ(ctx.keyring.bound_name(), "second");
    auto rows = lifecycle::list_configs(ctx);
    ASSERT_EQ(rows.size(), 2u);  // "default" was kept so that the cluster can go back
    LocalKeyStore(store_dir).set_state("k1", "enabled");
    lifecycle::bind_cluster(ctx, "default");
    open();
    EXPECT_EQ(ctx.keyring.config.key_id, "k1");
    EXPECT_THROW(lifecycle::bind_cluster(ctx, "nope"), lifecycle::LifecycleError);
    EXPECT_THROW(lifecycle::drop_config(ctx, "default"), lifecycle::LifecycleError);
}

TEST_F(LifecycleTest, BindToAnUnusableCmkChangesNothing) {
    open();
    KeyConfig c3 = cfg;
    c3.key_id = "missing";
    lifecycle::create_config(ctx, NamedKeyConfig{"third", c3, ""});
    std::string before = cmk_test::slurp(dir + "/keyring.json");
    EXPECT_THROW(lifecycle::bind_cluster(ctx, "third"), KmsError);
    EXPECT_EQ(cmk_test::slurp(dir + "/keyring.json"), before);
}

TEST_F(LifecycleTest, CrashAtEachStepLeavesAStartableCluster) {
    for (const std::string& step : lifecycle::crash_steps()) {
        // Database binding steps: test_dbkeys.cpp.
        if (step.find("_database:") != std::string::npos) continue;
        SCOPED_TRACE(step);
        open();
        if (step.rfind("bind_cluster", 0) == 0 && !key_configs_exist(dir)) {
            KeyConfig c2 = cfg;
            c2.key_id = "k2";
            lifecycle::create_config(ctx, NamedKeyConfig{"second", c2, ""});
        }
        std::string target = ctx.keyring.bound_name() == "second" ? "default" : "second";
        uint32_t gen = ctx.keyring.kek_generation;
        EXPECT_EXIT(
            {
                lifecycle::set_crash_point(step);
                if (step.rfind("rewrap", 0) == 0) lifecycle::rewrap(ctx);
                if (step.rfind("bind_cluster", 0) == 0) lifecycle::bind_cluster(ctx, target);
                if (step.rfind("rotate_kek", 0) == 0) lifecycle::rotate_kek(ctx);
                std::exit(0);
            },
            ::testing::KilledBySignal(SIGKILL), "");
        open();  // as at server start: completes an interrupted rotation
        expect_deks_intact();
        EXPECT_FALSE(load_keyring(dir).previous.has_value());
        bool late = step != "rotate_kek:after_wrap";
        if (step.rfind("rotate_kek", 0) == 0) {
            EXPECT_EQ(ctx.keyring.kek_generation, gen + (late ? 1 : 0));
        }
        if (step == "bind_cluster:after_keyring") {
            EXPECT_EQ(ctx.keyring.bound_name(), target);
        }
        if (step == "bind_cluster:after_wrap" || step == "bind_cluster:after_keyring_tmp") {
            EXPECT_NE(ctx.keyring.bound_name(), target);
        }
        // configs.json verifies under the current generation afterwards.
        if (key_configs_exist(dir)) {
            EXPECT_NO_THROW(lifecycle::list_configs(ctx));
        }
    }
}

TEST_F(LifecycleTest, InterruptedRotationIsUsableBeforeItIsCompleted) {
    open();
    EXPECT_EXIT(
        {
            lifecycle::set_crash_point("rotate_kek:after_keyring");
            lifecycle::rotate_kek(ctx);
            std::exit(0);
        },
        ::testing::KilledBySignal(SIGKILL), "");
    open(false);
    ASSERT_TRUE(ctx.keyring.previous.has_value());
    EXPECT_EQ(keymap->generation(), 1u);  // still the previous generation
    expect_deks_intact();
    // A DEK made in this state is sealed under the generation the file is in.
    SecureBytes d = keymap->create("base/5/99999", FileClass::Relation);
    deks["base/5/99999"] = key_fingerprint(d.data(), d.size());
    EXPECT_TRUE(lifecycle::finish_interrupted(ctx));
    open();
    expect_deks_intact();
    EXPECT_EQ(keymap->generation(), 2u);
}

TEST_F(LifecycleTest, ConfigsAreTamperEvidentAndValidated) {
    open();
    KeyConfig c2 = cfg;
    c2.key_id = "k2";
    lifecycle::create_config(ctx, NamedKeyConfig{"second", c2, ""});
    EXPECT_THROW(lifecycle::create_config(ctx, NamedKeyConfig{"second", c2, ""}), lifecycle::LifecycleError);
    KeyConfig bad = cfg;
    bad.options["client_secret"] = "hunter2";
    EXPECT_THROW(lifecycle::create_config(ctx, NamedKeyConfig{"bad", bad, ""}), KmsError);
    bad = cfg;
    bad.options["client_secret_file"] = "/etc/secret";
    EXPECT_NO_THROW(validate_key_config(bad));
    EXPECT_THROW(validate_config_name("Upper"), KmsError);
    EXPECT_THROW(validate_config_name(""), KmsError);
    EXPECT_THROW(validate_config_name("-x"), KmsError);
    EXPECT_NO_THROW(validate_config_name("prod-eu_1"));
    std::string text = cmk_test::slurp(dir + "/configs.json");
    size_t at = text.find("\"k2\"");
    ASSERT_NE(at, std::string::npos);
    text.replace(at, 4, "\"k3\"");
    cmk_test::spit(dir + "/configs.json", text);
    EXPECT_THROW(lifecycle::list_configs(ctx), KeyringError);
}

// Issue 18: rotate_kek reads and verifies every file it rewrites before its first
// write. A damaged configs.json fails the rotation with nothing changed, so the
// cluster still opens (and a start notices configs.json at once: verify_key_configs).
TEST_F(LifecycleTest, RotationOnDamagedInputChangesNothing) {
    open();
    KeyConfig c2 = cfg;
    c2.key_id = "k2";
    lifecycle::create_config(ctx, NamedKeyConfig{"second", c2, ""});
    const std::string keyring_before = cmk_test::slurp(dir + "/keyring.json");
    const std::string keymap_before = cmk_test::slurp(dir + "/keymap");
    const std::string configs_good = cmk_test::slurp(dir + "/configs.json");

    cmk_test::spit(dir + "/configs.json", configs_good.substr(0, configs_good.size() / 2));
    EXPECT_THROW(lifecycle::rotate_kek(ctx), KeyringError);
    EXPECT_EQ(cmk_test::slurp(dir + "/keyring.json"), keyring_before) << "keyring.json was written";
    EXPECT_EQ(cmk_test::slurp(dir + "/keymap"), keymap_before) << "the key map was written";
    {
        ClusterKeys keys;
        keys.kek = ctx.kek.clone();
        keys.kek_generation = ctx.keyring.kek_generation;
        EXPECT_THROW(verify_key_configs(dir, ctx.keyring, keys), KeyringError);
        cmk_test::spit(dir + "/configs.json", configs_good);
        EXPECT_NO_THROW(verify_key_configs(dir, ctx.keyring, keys));
    }

    // Restored: the rotation runs.
    EXPECT_NO_THROW(lifecycle::rotate_kek(ctx));
    open();
    EXPECT_EQ(ctx.keyring.kek_generation, 2u);
    EXPECT_FALSE(load_keyring(dir).previous.has_value());
}

TEST_F(LifecycleTest, AuditAggregatesProbesAndHoldsNoKeyMaterial) {
    std::string log = dir + "/audit.log";
    ::unlink(log.c_str());
    auto p = audit::audited_provider(make_provider(cfg), "default", true);
    for (int i = 0; i < 5; i++) p->status();
    LocalKeyStore(store_dir).set_state("k1", "disabled");
    p->status();
    LocalKeyStore(store_dir).set_state("k1", "enabled");
    SecureBytes kek = random_key(kKekSize);
    WrapResult wr = p->wrap(kek);
    std::vector<audit::Event> ev = audit::read_all(dir);
    ASSERT_EQ(ev.size(), 4u);  // first ok, the 4 repeats closed, the revoked answer, the wrap
    EXPECT_EQ(ev[0].outcome, "ok");
    EXPECT_EQ(ev[1].count, 4u);
    EXPECT_EQ(ev[2].outcome, "revoked");
    EXPECT_EQ(ev[3].action, "wrap");
    EXPECT_EQ(ev[3].key_version, "1");
    EXPECT_EQ(ev[3].request_id, wr.request_id);
    EXPECT_EQ(ev[3].actor, "unit");
    std::string raw = cmk_test::slurp(log);
    std::string b64 = base64_encode(kek.data(), kek.size());
    EXPECT_EQ(raw.find(b64), std::string::npos);
    EXPECT_EQ(raw.find(hex_encode(kek.data(), kek.size())), std::string::npos);
}

TEST_F(LifecycleTest, AuditRotatesAtTheSizeLimit) {
    audit::set_max_bytes(4096);
    for (int i = 0; i < 100; i++) {
        audit::Event e;
        e.action = "status";
        e.outcome = "ok";
        audit::record(e);
    }
    audit::set_max_bytes(0);
    struct stat st;
    ASSERT_EQ(::stat((dir + "/audit.log.1").c_str(), &st), 0);
    ASSERT_EQ(::stat((dir + "/audit.log").c_str(), &st), 0);
    EXPECT_LT(st.st_size, 4096 + 1024);
    EXPECT_GT(audit::read_all(dir).size(), 10u);
}

TEST(KeyringCompat, KeyringWithoutNewFieldsKeepsItsMac) {
    cmk_test::TempDir t;
    std::string store = t.sub("keys");
    ::mkdir(store.c_str(), 0700);
    LocalKeyStore(store).create("k");
    KeyConfig c{"local", "k", {{"key_store", store}}};
    auto p = make_provider(c);
    SecureBytes kek;
    Keyring kr = create_keyring(*p, kek);
    save_keyring(t.path(), kr);
    std::string text = cmk_test::slurp(t.sub("keyring.json"));
    EXPECT_EQ(text.find("config_name"), std::string::npos);
    EXPECT_EQ(text.find("previous"), std::string::npos);
    Keyring back = load_keyring(t.path());
    EXPECT_NO_THROW(unlock_keyring(back, *p));
    back.config_name = "other";  // an edited binding is detected
    EXPECT_THROW(verify_keyring(back, kek), KeyringError);
}
