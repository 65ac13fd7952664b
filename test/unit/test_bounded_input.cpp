// Bounded reading of untrusted key files (issue 18): nesting and size limits of every
// JSON text, and sys::read_file's refusal of what is not a regular file or is too
// large, each shown against the keyring loader that the server and pg_cmk use.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <string>

#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "test_helpers.hpp"

using namespace cmk;
using namespace cmk_test;

TEST(BoundedJson, AcceptsOurFormatsAndCountsOnlyStructure) {
    EXPECT_EQ(json_bounds_error("{\"a\":[1,{\"b\":2}]}", 17), "");
    // Brackets inside strings, escaped quotes included, are not nesting.
    std::string s = "{\"k\":\"[[[[\\\"[[[[\"}";
    EXPECT_EQ(json_bounds_error(s.data(), s.size(), 2), "");
    std::string at_limit(64, '[');
    at_limit += std::string(64, ']');
    EXPECT_EQ(json_bounds_error(at_limit.data(), at_limit.size()), "");
}

TEST(BoundedJson, RefusesDeepNestingAndSizeQuickly) {
    std::string deep(200000, '[');
    auto t0 = std::chrono::steady_clock::now();
    rapidjson::Document d;
    std::string why;
    EXPECT_FALSE(parse_json_bounded(d, deep, &why));
    EXPECT_EQ(why, "JSON nested deeper than 64 levels");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
    std::string one_more(65, '{');
    EXPECT_NE(json_bounds_error(one_more.data(), one_more.size()), "");
    std::string big(100, ' ');
    EXPECT_EQ(json_bounds_error(big.data(), big.size(), 64, 99), "larger than 99 bytes");
    std::string broken = "{\"a\":";
    EXPECT_FALSE(parse_json_bounded(d, broken, &why));
    EXPECT_NE(why.find("invalid JSON at offset"), std::string::npos) << why;
}

TEST(BoundedRead, KeyringNestedTooDeepIsDamagedNotACrash) {
    TempDir t;
    spit(t.sub(kKeyringFile), std::string(200000, '['));
    try {
        load_keyring(t.path());
        FAIL() << "a nested keyring loaded";
    } catch (const KeyringError& e) {
        EXPECT_NE(std::string(e.what()).find("nested deeper than 64 levels"), std::string::npos) << e.what();
    }
}

TEST(BoundedRead, RefusesFifoDeviceDirectoryAndOversizedFile) {
    TempDir t;
    std::string fifo = t.sub("fifo");
    ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
    auto t0 = std::chrono::steady_clock::now();
    EXPECT_THROW(sys::read_file(fifo.c_str()), std::runtime_error);  // would block forever before
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
    std::string zero = t.sub("zero");
    ASSERT_EQ(::symlink("/dev/zero", zero.c_str()), 0);
    EXPECT_THROW(sys::read_file(zero.c_str()), std::runtime_error);  // would grow without end
    EXPECT_THROW(sys::read_file(t.path().c_str()), std::runtime_error);
    spit(t.sub("big"), std::string(4096, 'x'));
    EXPECT_THROW(sys::read_file(t.sub("big").c_str(), 4095), std::runtime_error);
    EXPECT_EQ(sys::read_file(t.sub("big").c_str(), 4096).size(), 4096u);
    // The keyring loader says which file and why, as a KeyringError.
    ASSERT_EQ(::symlink("/dev/zero", t.sub(kKeyringFile).c_str()), 0);
    try {
        load_keyring(t.path());
        FAIL() << "a keyring on /dev/zero loaded";
    } catch (const KeyringError& e) {
        EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
}

TEST(BoundedRead, LocalKeyFileNestedTooDeepIsAnErrorNotACrash) {
    TempDir t;
    LocalKeyStore ks(t.sub("keys"));
    ks.ensure_dir();
    ks.create("k1");
    spit(ks.key_path("k1"), std::string(200000, '['));
    ::chmod(ks.key_path("k1").c_str(), 0600);
    EXPECT_THROW(ks.state("k1"), KmsError);
}

// A key store on a hung mount, or a FIFO or device in a key file's place: the local
// provider refuses at once (one line naming the file) instead of blocking in open()
// or reading without end.
TEST(BoundedRead, LocalKeyFileThatIsAFifoOrDeviceIsRefusedAtOnce) {
    TempDir t;
    LocalKeyStore ks(t.sub("keys"));
    ks.ensure_dir();
    ks.create("k1");
    ASSERT_EQ(::unlink(ks.key_path("k1").c_str()), 0);
    ASSERT_EQ(::mkfifo(ks.key_path("k1").c_str(), 0600), 0);
    try {
        ks.state("k1");
        FAIL() << "a FIFO key file was read";
    } catch (const KmsError& e) {
        EXPECT_NE(std::string(e.what()).find("not a regular file"), std::string::npos) << e.what();
    }
    ASSERT_EQ(::unlink(ks.key_path("k1").c_str()), 0);
    ASSERT_EQ(::symlink("/dev/zero", ks.key_path("k1").c_str()), 0);
    EXPECT_THROW(ks.state("k1"), KmsError);
}
