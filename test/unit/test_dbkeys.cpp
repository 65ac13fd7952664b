// Database bindings (src/core/dbkeys.cpp): routing by database, bind/unbind moving
// DEKs between the cluster's and the database's key maps without changing them, the
// database KEK wrapped by its own CMK, and a crash at each step (death tests) leaving
// a state that remove_strays + settle turn into the old or the new binding with every
// DEK intact.
#include <sys/stat.h>

#include <map>
#include <string>

#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "test_helpers.hpp"

using namespace cmk;

TEST(DatabaseOf, RelationFilesOfDatabasesOnly) {
    EXPECT_EQ(database_of("base/16384/16385"), 16384u);
    EXPECT_EQ(database_of("base/5/2608_fsm"), 5u);
    EXPECT_EQ(database_of("base/5/16385.3"), 5u);
    EXPECT_EQ(database_of("pg_tblspc/16390/PG_15_202209061/16384/16391"), 16384u);
    EXPECT_EQ(database_of("global/1262"), 0u);             // shared catalog
    EXPECT_EQ(database_of("pg_wal/000000010000000000000001"), 0u);
    EXPECT_EQ(database_of("pg_xact/0000"), 0u);
    EXPECT_EQ(database_of("base/16384/t3_16400"), 0u);     // temp relation: per-boot key
    EXPECT_EQ(database_of("base/pgsql_tmp/pgsql_tmp1.0"), 0u);
    EXPECT_EQ(database_of("base/16384/PG_VERSION"), 0u);
    EXPECT_EQ(database_of("base/99999999999/16385"), 0u);  // not an oid
}

namespace {

class DbKeysTest : public ::testing::Test {
protected:
    void SetUp() override {
        store = tmp.sub("keys");
        ::mkdir(store.c_str(), 0700);
        LocalKeyStore ks(store);
        ks.create("cluster-cmk");
        ks.create("db-cmk");
        ks.create("db-cmk-2");
        dir = tmp.sub("cmk_lakebase");
        KeyConfig c;
        c.provider = "local";
        c.key_id = "cluster-cmk";
        c.options["key_store"] = store;
        auto p = make_provider(c);
        Keyring kr = create_keyring(*p, kek);
        cluster_id = kr.cluster_id;
        save_keyring(dir, kr);
        KeyMap::create_empty(dir, cluster_id, 1);
        KeyMap km(dir, kek, cluster_id, 1);
        for (const char* db : {"16384", "16500"})
            for (int i = 0; i < 20; i++) {
                std::string id = std::string("base/") + db + "/" + std::to_string(17000 + i);
                SecureBytes d = km.create(id, FileClass::Relation);
                deks[id] = key_fingerprint(d.data(), d.size());
            }
        SecureBytes g = km.create("global/1262", FileClass::Relation);
        deks["global/1262"] = key_fingerprint(g.data(), g.size());
    }

    NamedKeyConfig config(const std::string& key) {
        NamedKeyConfig n;
        n.name = key + "-cfg";
        n.config.provider = "local";
        n.config.key_id = key;
        n.config.options["key_store"] = store;
        return n;
    }

    // Every DEK is where its route says, with the same key as at the start. Uses the
    // database KEK unwrapped through its own provider, as the server does at start.
    void expect_intact(bool app_bound) {
        KeyMap cm(dir, kek, cluster_id, 1);
        std::unique_ptr<KeyMap> dm;
        if (app_bound) {
            Keyring dk = load_keyring(dbkeys::dir_for(dir, 16384));
            auto p = make_provider(dk.config);
            SecureBytes dkek = unlock_keyring(dk, *p);
            dm = std::make_unique<KeyMap>(dbkeys::dir_for(dir, 16384), dkek, cluster_id, 1);
            dbkeys::settle(cm, *dm, 16384);
        }
        for (const auto& [id, fp] : deks) {
            bool in_db = app_bound && database_of(id) == 16384;
            KeyMap& km = in_db ? *dm : cm;
            ASSERT_EQ(km.fingerprint(id).value_or("missing"), fp) << id;
            if (in_db) {
                EXPECT_FALSE(cm.contains(id)) << id << " left in the cluster key map";
            }
        }
        EXPECT_EQ(dbkeys::is_bound(dir, 16384), app_bound);
    }

    // Unbinds database 16384 as the server does (its KEK through its own provider),
    // crashing at `step` if one is named.
    void unbind_app(const std::string& step = "") {
        Keyring dk = load_keyring(dbkeys::dir_for(dir, 16384));
        auto p = make_provider(dk.config);
        SecureBytes dkek = unlock_keyring(dk, *p);
        KeyMap cm(dir, kek, cluster_id, 1);
        KeyMap dm(dbkeys::dir_for(dir, 16384), dkek, cluster_id, 1);
        lifecycle::set_crash_point(step);
        dbkeys::unbind(dir, cm, dm, 16384);
    }

    cmk_test::TempDir tmp;
    std::string store, dir, cluster_id;
    SecureBytes kek;
    std::map<std::string, std::string> deks;
};

}  // namespace

TEST_F(DbKeysTest, BindMovesTheDatabasesDeksUnderItsOwnCmk) {
    KeyMap cm(dir, kek, cluster_id, 1);
    NamedKeyConfig nc = config("db-cmk");
    auto p = make_provider(nc.config);
    bool published = false;
    dbkeys::Binding b = dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, [&](const SecureBytes& k) {
        published = true;
        EXPECT_EQ(k.size(), kKekSize);
    });
    EXPECT_TRUE(published);
    EXPECT_EQ(b.moved, 20u);
    EXPECT_EQ(b.keyring.config.key_id, "db-cmk");
    EXPECT_EQ(b.keyring.cluster_id, cluster_id);
    EXPECT_NE(b.keyring.kek_fingerprint, load_keyring(dir).kek_fingerprint);
    EXPECT_EQ(dbkeys::bound_databases(dir), std::vector<uint32_t>{16384});
    expect_intact(true);
    // The database KEK is wrapped by the database's CMK, not the cluster's.
    KeyConfig wrong = nc.config;
    wrong.key_id = "cluster-cmk";
    auto pw = make_provider(wrong);
    EXPECT_ANY_THROW(unlock_keyring(load_keyring(dbkeys::dir_for(dir, 16384)), *pw));
    // Twice is an error; another database is not affected.
    EXPECT_THROW(dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr), lifecycle::LifecycleError);
    EXPECT_TRUE(cm.contains("base/16500/17000"));
}

TEST_F(DbKeysTest, RebindRewrapsOnlyTheKeyring) {
    KeyMap cm(dir, kek, cluster_id, 1);
    NamedKeyConfig nc = config("db-cmk");
    auto p = make_provider(nc.config);
    dbkeys::Binding b = dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
    NamedKeyConfig n2 = config("db-cmk-2");
    auto p2 = make_provider(n2.config);
    Keyring nk = dbkeys::rebind(dir, 16384, b.keyring, b.kek, n2, *p2);
    EXPECT_EQ(nk.config.key_id, "db-cmk-2");
    EXPECT_EQ(nk.kek_fingerprint, b.keyring.kek_fingerprint);  // same KEK
    Keyring disk = load_keyring(dbkeys::dir_for(dir, 16384));
    SecureBytes k = unlock_keyring(disk, *p2);
    EXPECT_TRUE(ct_equal(k.data(), b.kek.data(), k.size()));
    // The old CMK disabled: the database does not care any more.
    LocalKeyStore(store).set_state("db-cmk", "disabled");
    expect_intact(true);
}

TEST_F(DbKeysTest, UnbindMovesThemBack) {
    KeyMap cm(dir, kek, cluster_id, 1);
    NamedKeyConfig nc = config("db-cmk");
    auto p = make_provider(nc.config);
    dbkeys::Binding b = dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
    {
        KeyMap dm(dbkeys::dir_for(dir, 16384), b.kek, cluster_id, 1);
        EXPECT_EQ(dbkeys::unbind(dir, cm, dm, 16384), 20u);
    }
    struct stat sb;
    EXPECT_NE(::stat(dbkeys::dir_for(dir, 16384).c_str(), &sb), 0);
    expect_intact(false);
}

TEST_F(DbKeysTest, ForgetRemovesTheKeyDirectory) {
    KeyMap cm(dir, kek, cluster_id, 1);
    NamedKeyConfig nc = config("db-cmk");
    auto p = make_provider(nc.config);
    dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
    dbkeys::forget(dir, 16384);
    EXPECT_TRUE(dbkeys::bound_databases(dir).empty());
    struct stat sb;
    EXPECT_NE(::stat(dbkeys::dir_for(dir, 16384).c_str(), &sb), 0);
}

TEST_F(DbKeysTest, CrashAtEachStepLeavesTheOldOrTheNewBinding) {
    const std::vector<std::string> bind_steps = {"bind_database:after_wrap", "bind_database:after_keymap",
                                                 "bind_database:after_keyring"};
    const std::vector<std::string> unbind_steps = {"unbind_database:after_keymap",
                                                   "unbind_database:after_keyring"};
    NamedKeyConfig nc = config("db-cmk");
    for (const std::string& step : bind_steps) {
        SCOPED_TRACE(step);
        EXPECT_EXIT(
            {
                KeyMap cm(dir, kek, cluster_id, 1);
                auto p = make_provider(nc.config);
                lifecycle::set_crash_point(step);
                dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
                std::exit(0);
            },
            ::testing::KilledBySignal(SIGKILL), "");
        dbkeys::remove_strays(dir);  // as at server start
        bool bound = step == "bind_database:after_keyring";
        expect_intact(bound);
        if (bound) unbind_app();  // back to unbound for the next step
    }
    for (const std::string& step : unbind_steps) {
        SCOPED_TRACE(step);
        {
            KeyMap cm(dir, kek, cluster_id, 1);
            auto p = make_provider(nc.config);
            dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
        }
        EXPECT_EXIT(
            {
                unbind_app(step);
                std::exit(0);
            },
            ::testing::KilledBySignal(SIGKILL), "");
        dbkeys::remove_strays(dir);
        bool bound = step == "unbind_database:after_keymap";
        expect_intact(bound);
        if (bound) unbind_app();
    }
}

TEST_F(DbKeysTest, SettleAdoptsKeysCreatedInTheClusterMapAfterTheCommit) {
    // A key created in the cluster key map while the binding was committed but not yet
    // published (a crash restart in between): the next start moves it, losing nothing.
    KeyMap cm(dir, kek, cluster_id, 1);
    NamedKeyConfig nc = config("db-cmk");
    auto p = make_provider(nc.config);
    dbkeys::Binding b = dbkeys::bind(dir, cm, cluster_id, 16384, nc, *p, nullptr);
    SecureBytes late = cm.create("base/16384/18000", FileClass::Relation);
    deks["base/16384/18000"] = key_fingerprint(late.data(), late.size());
    expect_intact(true);  // settle() inside
}
