// Unit tests of pg_cmk encrypt's journal (encrypt_journal.hpp): records round-trip, a
// torn last line is dropped (and says where to cut), damage anywhere else is an error.
#include <gtest/gtest.h>

#include <string>

#include "cmk_lakebase/keys/encrypt_journal.hpp"

using namespace cmk;
namespace ej = cmk::encrypt_journal;

namespace {
const std::string kSum(64, 'a');
}

TEST(EncryptJournal, RoundTrip) {
    std::string t = ej::header(kSum) + ej::record("base/5/16384", 8192) + ej::record("pg_wal/000000010000000000000001", 16777216) +
                    ej::record("base/5/16384", 16384);  // a later record of the same file wins
    ej::Parsed p = ej::parse(t);
    EXPECT_EQ(p.control_sha256, kSum);
    ASSERT_EQ(p.done.size(), 2u);
    EXPECT_EQ(p.done.at("base/5/16384"), 16384u);
    EXPECT_EQ(p.done.at("pg_wal/000000010000000000000001"), 16777216u);
    EXPECT_EQ(p.valid_bytes, t.size());
    EXPECT_FALSE(p.torn_tail);
}

TEST(EncryptJournal, PathsWithSpaces) {
    ej::Parsed p = ej::parse(ej::header(kSum) + ej::record("a dir/with spaces", 0));
    EXPECT_EQ(p.done.at("a dir/with spaces"), 0u);
}

TEST(EncryptJournal, EmptyIsNoJournal) {
    ej::Parsed p = ej::parse("");
    EXPECT_TRUE(p.control_sha256.empty());
    EXPECT_TRUE(p.done.empty());
}

TEST(EncryptJournal, TornTailIsDropped) {
    std::string good = ej::header(kSum) + ej::record("base/1/1259", 106496);
    std::string rec = ej::record("base/1/1249", 8192);
    for (size_t cut = 0; cut < rec.size(); cut++) {  // every prefix of the last record
        ej::Parsed p = ej::parse(good + rec.substr(0, cut));
        EXPECT_EQ(p.done.size(), 1u) << cut;
        EXPECT_EQ(p.valid_bytes, good.size()) << cut;
        EXPECT_EQ(p.torn_tail, cut > 0) << cut;
    }
    // A tail of zeros (a crash after the size grew, before the data reached the disk).
    ej::Parsed p = ej::parse(good + std::string(100, '\0'));
    EXPECT_TRUE(p.torn_tail);
    EXPECT_EQ(p.valid_bytes, good.size());
}

TEST(EncryptJournal, DamageIsAnError) {
    std::string r1 = ej::record("base/5/16384", 8192);
    std::string r2 = ej::record("base/5/16385", 8192);
    std::string bad = r1;
    bad[12] = '9';  // the size changed, the checksum did not
    EXPECT_THROW(ej::parse(ej::header(kSum) + bad + r2), Error);
    EXPECT_THROW(ej::parse("not a journal\n" + r1), Error);
    EXPECT_THROW(ej::parse(ej::header("short") + r1), Error);
    EXPECT_THROW(ej::parse(ej::header(kSum) + "\n" + r1), Error);
    try {
        ej::parse(ej::header(kSum) + r1 + bad);
        FAIL();
    } catch (const Error& e) {
        EXPECT_EQ(e.category, ErrorCategory::Damaged);
        EXPECT_NE(std::string(e.what()).find("line 3"), std::string::npos) << e.what();
    }
}

TEST(EncryptJournal, RecordRefusesNewlines) {
    EXPECT_THROW(ej::record("base/5/a\nb", 1), Error);
    EXPECT_THROW(ej::record("", 1), Error);
}
