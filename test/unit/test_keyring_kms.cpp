// Unit tests of the keyring (save/load/unlock, MAC tamper detection) and the local
// key provider (states, permissions, unavailable vs revoked, configuration errors).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdlib>
#include <functional>

#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "test_helpers.hpp"

using namespace cmk;

namespace {

// The base64 material of the first key version in a key file's JSON text.
std::string material_of(const std::string& text) {
    const std::string tag = "\"material\":\"";
    size_t a = text.find(tag);
    if (a == std::string::npos) return "";
    a += tag.size();
    return text.substr(a, text.find('"', a) - a);
}

class LocalKmsTest : public ::testing::Test {
protected:
    void SetUp() override {
        store_dir = tmp.sub("keys");
        LocalKeyStore ks(store_dir);
        ks.ensure_dir();
        ks.create("k1");
        cfg.provider = "local";
        cfg.key_id = "k1";
        cfg.options["key_store"] = store_dir;
        keyring_dir = tmp.sub("data/cmk_lakebase");
        ::mkdir(tmp.sub("data").c_str(), 0700);
    }
    LocalKeyStore store() { return LocalKeyStore(store_dir); }
    KmsErrorKind kind_of(const std::function<void()>& f) {
        try {
            f();
        } catch (const KmsError& e) {
            last_msg = e.what();
            return e.kind;
        }
        ADD_FAILURE() << "no KmsError thrown";
        return KmsErrorKind::Config;
    }

    cmk_test::TempDir tmp;
    std::string store_dir, keyring_dir, last_msg;
    KeyConfig cfg;
};

}  // namespace

TEST(Kms, HealthNames) {
    EXPECT_STREQ(key_health_name(KeyHealth::Ok), "ok");
    EXPECT_STREQ(key_health_name(KeyHealth::Unavailable), "unavailable");
    EXPECT_STREQ(key_health_name(KeyHealth::Revoked), "revoked");
}

TEST(Kms, DefaultKeyStore) {
    const char* old = std::getenv("CMK_LAKEBASE_KEY_STORE");
    std::string saved = old ? old : "";
    setenv("CMK_LAKEBASE_KEY_STORE", "/srv/keys", 1);
    EXPECT_EQ(default_local_key_store(), "/srv/keys");
    unsetenv("CMK_LAKEBASE_KEY_STORE");
    std::string home = std::getenv("HOME") ? std::getenv("HOME") : "";
    setenv("HOME", "/home/someone", 1);
    EXPECT_EQ(default_local_key_store(), "/home/someone/.cmk_lakebase/keys");
    if (home.empty()) unsetenv("HOME"); else setenv("HOME", home.c_str(), 1);
    if (old) setenv("CMK_LAKEBASE_KEY_STORE", saved.c_str(), 1);
}

TEST(Kms, ValidKeyIds) {
    EXPECT_TRUE(LocalKeyStore::valid_key_id("cmk-0a1b2c3d"));
    EXPECT_TRUE(LocalKeyStore::valid_key_id("A.b_c-9"));
    EXPECT_TRUE(LocalKeyStore::valid_key_id(std::string(128, 'a')));
    EXPECT_FALSE(LocalKeyStore::valid_key_id(std::string(129, 'a')));
    EXPECT_FALSE(LocalKeyStore::valid_key_id(""));
    EXPECT_FALSE(LocalKeyStore::valid_key_id("."));
    EXPECT_FALSE(LocalKeyStore::valid_key_id(".."));
    EXPECT_FALSE(LocalKeyStore::valid_key_id("a/b"));
    EXPECT_FALSE(LocalKeyStore::valid_key_id("a b"));
}

TEST_F(LocalKmsTest, MakeProviderValidatesConfig) {
    EXPECT_EQ(make_provider(cfg)->name(), "local");
    KeyConfig c = cfg;
    c.options.clear();
    EXPECT_EQ(kind_of([&] { make_provider(c); }), KmsErrorKind::Config);
    EXPECT_EQ(last_msg.rfind("key_store", 0), 0u) << last_msg;
    c.options["key_store"] = "relative/keys";
    EXPECT_EQ(kind_of([&] { make_provider(c); }), KmsErrorKind::Config);
    EXPECT_EQ(last_msg.rfind("key_store", 0), 0u) << last_msg;
    c = cfg;
    c.key_id = "../etc/passwd";
    EXPECT_EQ(kind_of([&] { make_provider(c); }), KmsErrorKind::Config);
    EXPECT_NE(last_msg.find("key_id"), std::string::npos) << last_msg;
    // timeout_ms: the deadline of every key-file read (a store on a hung mount)
    for (const char* bad : {"99", "600001", "10s", "-5"}) {
        c = cfg;
        c.options["timeout_ms"] = bad;
        EXPECT_EQ(kind_of([&] { make_provider(c); }), KmsErrorKind::Config) << bad;
        EXPECT_EQ(last_msg.rfind("timeout_ms", 0), 0u) << last_msg;
    }
    c = cfg;
    c.options["timeout_ms"] = "2000";
    EXPECT_EQ(make_provider(c)->status().health, KeyHealth::Ok);
    c = cfg;
    c.provider = "nonsense";
    EXPECT_EQ(kind_of([&] { make_provider(c); }), KmsErrorKind::Config);
    EXPECT_NE(last_msg.find("unknown key provider \"nonsense\" (known: local, aws, azure, gcp, vault, kmip)"),
              std::string::npos)
        << last_msg;
}

TEST_F(LocalKmsTest, KeyFileFormatAndMode) {
    std::string path = store().key_path("k1");
    EXPECT_EQ(path, store_dir + "/k1.key");
    EXPECT_EQ(cmk_test::file_mode(path), 0600u);
    EXPECT_EQ(cmk_test::file_mode(store_dir), 0700u);
    std::string text = cmk_test::slurp(path);
    for (const char* f : {"\"format\":1", "\"key_id\":\"k1\"", "\"state\":\"enabled\"", "\"created_at\":",
                          "\"versions\":[{\"version\":1,\"material\":\"", "\"primary_version\":1"})
        EXPECT_NE(text.find(f), std::string::npos) << f << " in " << text;
    EXPECT_EQ(base64_decode(material_of(text)).size(), 32u);
    EXPECT_TRUE(store().exists("k1"));
    EXPECT_FALSE(store().exists("k2"));
    EXPECT_EQ(store().state("k1"), "enabled");
    EXPECT_EQ(kind_of([&] { store().create("k1"); }), KmsErrorKind::Config);
    store().create("a0");
    EXPECT_EQ(store().list(), (std::vector<std::string>{"a0", "k1"}));
}

TEST_F(LocalKmsTest, WrapUnwrapAndBlobFormat) {
    auto p = make_provider(cfg);
    SecureBytes kek = random_key(kKekSize);
    WrapResult w = p->wrap(kek);
    ASSERT_EQ(w.blob.size(), 5u + 12 + 32 + 16);
    EXPECT_EQ(w.blob[0], 1);
    EXPECT_EQ(w.blob[1] | w.blob[2] | w.blob[3], 0);
    EXPECT_EQ(w.blob[4], 1);
    EXPECT_EQ(w.key_version, "1");
    EXPECT_EQ(w.request_id.size(), 32u);
    EXPECT_NE(w.request_id, p->wrap(kek).request_id);
    SecureBytes back = p->unwrap(w.blob);
    EXPECT_EQ(hex_encode(back.data(), back.size()), hex_encode(kek.data(), kek.size()));
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Ok);
    EXPECT_EQ(s.state, "enabled");
    EXPECT_EQ(s.request_id.size(), 32u);
    // bound to the key id: the same store under another key id cannot unwrap it
    store().create("k2");
    KeyConfig c2 = cfg;
    c2.key_id = "k2";
    auto p2 = make_provider(c2);
    EXPECT_EQ(kind_of([&] { p2->unwrap(w.blob); }), KmsErrorKind::Revoked);
    std::vector<uint8_t> bad = w.blob;
    bad[20] ^= 1;
    EXPECT_EQ(kind_of([&] { p->unwrap(bad); }), KmsErrorKind::Revoked);
    EXPECT_NE(last_msg.find("wrong key material"), std::string::npos) << last_msg;
}

TEST_F(LocalKmsTest, DisableEnableDelete) {
    auto p = make_provider(cfg);
    SecureBytes kek = random_key(kKekSize);
    WrapResult w = p->wrap(kek);
    store().set_state("k1", "disabled");
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Revoked);
    EXPECT_NE(last_msg.find("key k1 is disabled in the local key store"), std::string::npos) << last_msg;
    EXPECT_EQ(kind_of([&] { p->wrap(kek); }), KmsErrorKind::Revoked);
    EXPECT_EQ(p->status().health, KeyHealth::Revoked);
    EXPECT_EQ(p->status().state, "disabled");
    store().set_state("k1", "enabled");
    EXPECT_NO_THROW(p->unwrap(w.blob));
    EXPECT_EQ(p->status().health, KeyHealth::Ok);
    std::string material_before = cmk_test::slurp(store().key_path("k1"));
    store().set_state("k1", "deleted");
    std::string after = cmk_test::slurp(store().key_path("k1"));
    EXPECT_EQ(after.find("material"), std::string::npos) << "deleted key still has material: " << after;
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Revoked);
    EXPECT_EQ(p->status().health, KeyHealth::Revoked);
    EXPECT_EQ(kind_of([&] { store().set_state("k1", "enabled"); }), KmsErrorKind::Config);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Revoked);  // for ever
    EXPECT_EQ(kind_of([&] { store().set_state("k1", "frozen"); }), KmsErrorKind::Config);
}

TEST_F(LocalKmsTest, WrongKeyFileMissingKeyMissingStore) {
    auto p = make_provider(cfg);
    SecureBytes kek = random_key(kKekSize);
    WrapResult w = p->wrap(kek);
    // a different key file under the same name: wrong key material
    ASSERT_EQ(::unlink(store().key_path("k1").c_str()), 0);
    store().create("k1");
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Revoked);
    EXPECT_NE(last_msg.find("wrong key material"), std::string::npos) << last_msg;
    EXPECT_EQ(p->status().health, KeyHealth::Ok);  // the key itself is fine
    // key file gone, store present: revoked (not found)
    ASSERT_EQ(::unlink(store().key_path("k1").c_str()), 0);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Revoked);
    EXPECT_NE(last_msg.find("not found"), std::string::npos) << last_msg;
    EXPECT_EQ(p->status().health, KeyHealth::Revoked);
    EXPECT_EQ(kind_of([&] { store().state("k1"); }), KmsErrorKind::Revoked);
    // the store itself gone (unmounted): unavailable, not revoked
    ASSERT_EQ(::rename(store_dir.c_str(), tmp.sub("keys.away").c_str()), 0);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Unavailable);
    EXPECT_EQ(p->status().health, KeyHealth::Unavailable);
    EXPECT_EQ(kind_of([&] { p->wrap(kek); }), KmsErrorKind::Unavailable);
}

TEST_F(LocalKmsTest, RefusesGroupOrOtherAccessibleFiles) {
    auto p = make_provider(cfg);
    SecureBytes kek = random_key(kKekSize);
    WrapResult w = p->wrap(kek);
    std::string path = store().key_path("k1");
    ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Config);
    EXPECT_NE(last_msg.find(path), std::string::npos) << last_msg;
    EXPECT_NE(last_msg.find("0644"), std::string::npos) << last_msg;
    EXPECT_NE(p->status().health, KeyHealth::Ok);
    ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
    EXPECT_NO_THROW(p->unwrap(w.blob));
    ASSERT_EQ(::chmod(store_dir.c_str(), 0755), 0);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), KmsErrorKind::Config);
    EXPECT_NE(last_msg.find(store_dir), std::string::npos) << last_msg;
    EXPECT_NE(last_msg.find("0755"), std::string::npos) << last_msg;
    ASSERT_EQ(::chmod(store_dir.c_str(), 0700), 0);
}

TEST_F(LocalKmsTest, ErrorsNeverCarryKeyMaterial) {
    std::string text = cmk_test::slurp(store().key_path("k1"));
    std::string material = material_of(text);
    ASSERT_FALSE(material.empty());
    auto p = make_provider(cfg);
    SecureBytes kek = random_key(kKekSize);
    WrapResult w = p->wrap(kek);
    std::vector<std::string> msgs;
    std::vector<uint8_t> bad = w.blob;
    bad.back() ^= 1;
    try { p->unwrap(bad); } catch (const std::exception& e) { msgs.push_back(e.what()); }
    // damaged key file
    std::string damaged = text;
    damaged.replace(damaged.find("\"primary_version\""), 17, "\"primary_versioX\"");
    cmk_test::spit(store().key_path("k1"), damaged);
    try { p->unwrap(w.blob); } catch (const std::exception& e) { msgs.push_back(e.what()); }
    ASSERT_EQ(msgs.size(), 2u);
    for (const auto& s : msgs) {
        EXPECT_EQ(s.find(material), std::string::npos) << s;
        EXPECT_EQ(s.find(hex_encode(kek.data(), kek.size())), std::string::npos) << s;
    }
}

TEST_F(LocalKmsTest, KeyringSaveLoadUnlock) {
    auto p = make_provider(cfg);
    SecureBytes kek;
    Keyring kr = create_keyring(*p, kek);
    ASSERT_EQ(kek.size(), kKekSize);
    EXPECT_EQ(kr.cluster_id.size(), 32u);
    EXPECT_EQ(kr.config.key_id, "k1");
    EXPECT_EQ(kr.kek_generation, 1u);
    EXPECT_EQ(kr.kek_version, "1");
    EXPECT_EQ(kr.kek_fingerprint, key_fingerprint(kek.data(), kek.size()));
    ASSERT_EQ(kr.created_at.size(), 20u);  // YYYY-MM-DDTHH:MM:SSZ
    EXPECT_EQ(kr.created_at[4], '-');
    EXPECT_EQ(kr.created_at[10], 'T');
    EXPECT_EQ(kr.created_at[19], 'Z');
    EXPECT_EQ(kr.mac.size(), 64u);

    EXPECT_EQ(keyring_dir_for("/var/lib/pg/data/"), "/var/lib/pg/data/cmk_lakebase");
    EXPECT_FALSE(keyring_exists(keyring_dir));
    save_keyring(keyring_dir, kr);
    EXPECT_TRUE(keyring_exists(keyring_dir));
    EXPECT_EQ(cmk_test::file_mode(keyring_dir + "/keyring.json"), 0600u);
    std::string json = cmk_test::slurp(keyring_dir + "/keyring.json");
    EXPECT_EQ(json.find(hex_encode(kek.data(), kek.size())), std::string::npos);

    Keyring back = load_keyring(keyring_dir);
    EXPECT_EQ(back.cluster_id, kr.cluster_id);
    EXPECT_EQ(back.config.provider, "local");
    EXPECT_EQ(back.config.key_id, "k1");
    EXPECT_EQ(back.config.options, kr.config.options);
    EXPECT_EQ(back.wrapped_kek, kr.wrapped_kek);
    EXPECT_EQ(back.kek_version, kr.kek_version);
    EXPECT_EQ(back.kek_fingerprint, kr.kek_fingerprint);
    EXPECT_EQ(back.kek_generation, kr.kek_generation);
    EXPECT_EQ(back.created_at, kr.created_at);
    EXPECT_EQ(back.mac, kr.mac);
    auto p2 = make_provider(back.config);
    SecureBytes kek2 = unlock_keyring(back, *p2);
    EXPECT_EQ(hex_encode(kek2.data(), kek2.size()), hex_encode(kek.data(), kek.size()));

    // a legitimate change, resealed, still unlocks (e.g. KEK rotation bookkeeping)
    back.kek_generation = 2;
    EXPECT_THROW(unlock_keyring(back, *p2), KeyringError);
    seal_keyring(back, kek2);
    EXPECT_NO_THROW(unlock_keyring(back, *p2));
}

TEST_F(LocalKmsTest, KeyringTamperDetection) {
    auto p = make_provider(cfg);
    SecureBytes kek;
    Keyring kr = create_keyring(*p, kek);
    save_keyring(keyring_dir, kr);
    std::string path = keyring_dir + "/keyring.json";
    std::string good = cmk_test::slurp(path);
    store().create("k2");

    auto expect_unlock_fails = [&](const std::string& edited, const std::string& what) {
        SCOPED_TRACE(what);
        ASSERT_NE(edited, good);
        cmk_test::spit(path, edited);
        Keyring t = load_keyring(keyring_dir);
        bool failed = false;
        try {
            auto prov = make_provider(t.config);
            unlock_keyring(t, *prov);
        } catch (const KeyringError& e) {
            failed = true;
            EXPECT_STREQ(e.what(), "keyring has been modified or the key is not this cluster's");
        } catch (const KmsError&) {
            failed = true;
        }
        EXPECT_TRUE(failed);
    };
    auto replace = [&](const std::string& from, const std::string& to) {
        std::string s = good;
        size_t at = s.find(from);
        EXPECT_NE(at, std::string::npos) << from;
        if (at != std::string::npos) s.replace(at, from.size(), to);
        return s;
    };
    expect_unlock_fails(replace("\"key_id\": \"k1\"", "\"key_id\": \"k2\""), "key_id");
    expect_unlock_fails(replace("\"key_store\": \"", "\"extra\": \"x\", \"key_store\": \""), "options");
    expect_unlock_fails(replace("\"kek_generation\": 1", "\"kek_generation\": 5"), "kek_generation");
    expect_unlock_fails(replace("\"cluster_id\": \"", "\"cluster_id\": \"0"), "cluster_id");
    expect_unlock_fails(replace("\"created_at\": \"", "\"created_at\": \"1"), "created_at");
    {
        std::string s = good;
        size_t at = s.find("\"kek_fingerprint\": \"") + 20;
        s[at] = s[at] == '0' ? '1' : '0';
        expect_unlock_fails(s, "kek_fingerprint");
    }
    cmk_test::spit(path, good);
    SecureBytes ok = unlock_keyring(load_keyring(keyring_dir), *p);
    EXPECT_EQ(ok.size(), kKekSize);
}

TEST_F(LocalKmsTest, KeyringLoadErrors) {
    try {
        load_keyring(keyring_dir);
        FAIL();
    } catch (const KeyringError& e) {
        std::string m = e.what();
        EXPECT_NE(m.find("data directory is not encrypted by cmk_lakebase"), std::string::npos) << m;
        EXPECT_NE(m.find(keyring_dir + "/keyring.json"), std::string::npos) << m;
        EXPECT_NE(m.find("is missing"), std::string::npos) << m;
    }
    auto p = make_provider(cfg);
    SecureBytes kek;
    Keyring kr = create_keyring(*p, kek);
    save_keyring(keyring_dir, kr);
    std::string path = keyring_dir + "/keyring.json";
    std::string good = cmk_test::slurp(path);
    auto load_error = [&](const std::string& text) -> std::string {
        cmk_test::spit(path, text);
        try {
            load_keyring(keyring_dir);
        } catch (const KeyringError& e) {
            return e.what();
        }
        return "";
    };
    EXPECT_NE(load_error("{ not json").find("invalid JSON"), std::string::npos);
    EXPECT_NE(load_error("[]").find("not a JSON object"), std::string::npos);
    std::string s = good;
    s.replace(s.find("\"wrapped_kek\""), 13, "\"wrapped_kez\"");
    EXPECT_NE(load_error(s).find("\"wrapped_kek\""), std::string::npos);
    s = good;
    size_t at = s.find("\"wrapped_kek\": \"") + 16;
    s.insert(at, "!");
    EXPECT_NE(load_error(s).find("\"wrapped_kek\""), std::string::npos);
    s = good;
    s.replace(s.find("\"kek_generation\": 1"), 19, "\"kek_generation\": \"1\"");
    EXPECT_NE(load_error(s).find("\"kek_generation\""), std::string::npos);
    s = good;
    s.replace(s.find("\"config\""), 8, "\"konfig\"");
    EXPECT_NE(load_error(s).find("\"config\""), std::string::npos);
    s = good;
    s.replace(s.find("\"format\": 1"), 11, "\"format\": 9");
    EXPECT_NE(load_error(s).find("format 9"), std::string::npos);
    s = good;
    s.replace(s.find("\"mac\""), 5, "\"mic\"");
    EXPECT_NE(load_error(s).find("\"mac\""), std::string::npos);
}

// Issue 18: a damaged wrapped KEK is damage (KeyringError, before any KMS call), not a
// key the provider refuses; keyrings written before the checksum still load.
TEST_F(LocalKmsTest, DamagedWrappedKekIsDamageNotRevocation) {
    auto p = make_provider(cfg);
    SecureBytes kek;
    Keyring kr = create_keyring(*p, kek);
    save_keyring(keyring_dir, kr);
    std::string path = keyring_dir + "/keyring.json";
    std::string good = cmk_test::slurp(path);
    ASSERT_NE(good.find("\"wrapped_kek_check\": \""), std::string::npos);

    std::string flipped = good;
    size_t at = flipped.find("\"wrapped_kek\": \"") + 16 + 10;
    flipped[at] = flipped[at] == 'A' ? 'B' : 'A';
    cmk_test::spit(path, flipped);
    try {
        load_keyring(keyring_dir);
        FAIL() << "a keyring with a damaged wrapped KEK loaded";
    } catch (const KeyringError& e) {
        EXPECT_EQ(e.category, ErrorCategory::Damaged);
        EXPECT_NE(std::string(e.what()).find("wrapped key-encryption key is damaged"), std::string::npos) << e.what();
    }

    // Without the checksum (an older keyring): loads, unlocks when intact.
    std::string old = good;
    size_t b = old.find("\"wrapped_kek_check\": \"");
    size_t e = old.find('\n', b);
    old.erase(b, e - b + 1);
    cmk_test::spit(path, old);
    EXPECT_EQ(unlock_keyring(load_keyring(keyring_dir), *p).size(), kKekSize);
}

// Issue 18: a key id that is not UTF-8 text is refused, and the message escapes it.
TEST(KeyIdText, InvalidUtf8IsRefusedAndEscaped) {
    EXPECT_TRUE(printable_utf8("arn:aws:kms:eu-west-1:1:key/ab-\xc3\xa9"));
    EXPECT_FALSE(printable_utf8("k\xff"));
    EXPECT_FALSE(printable_utf8("k\xc3"));          // truncated sequence
    EXPECT_FALSE(printable_utf8("k\xc0\xaf"));      // overlong '/'
    EXPECT_FALSE(printable_utf8("k\xed\xa0\x80"));  // surrogate
    EXPECT_FALSE(printable_utf8("k\n1"));
    EXPECT_FALSE(printable_utf8("k\x1b[31m"));
    EXPECT_EQ(escape_text("a\xff\xc3\xa9\n"), "a\\xff\xc3\xa9\\x0a");

    for (const char* provider : {"local", "vault", "aws"}) {
        KeyConfig c;
        c.provider = provider;
        c.key_id = "bad\xff\xfeid";
        try {
            make_provider(c);
            FAIL() << provider << ": accepted";
        } catch (const KmsError& e) {
            std::string m = e.what();
            EXPECT_EQ(e.kind, KmsErrorKind::Config);
            EXPECT_TRUE(printable_utf8(m)) << m;
            EXPECT_NE(m.find("bad\\xff\\xfeid"), std::string::npos) << m;
        }
    }
}
