// Unit tests of the key map: round trips, persistence, several instances and
// processes on one directory, torn and damaged logs, tampering, and every crash point.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <new>

#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "test_helpers.hpp"

using namespace cmk;

namespace {

std::string hexkey(const SecureBytes& k) { return hex_encode(k.data(), k.size()); }

class KeyMapTest : public ::testing::Test {
protected:
    void SetUp() override {
        KeyMap::set_crash_point("");
        dir = tmp.sub("cmk_lakebase");
        kek = random_key(kKekSize);
        cluster = random_id();
        KeyMap::create_empty(dir, cluster, 1);
    }
    void TearDown() override { KeyMap::set_crash_point(""); }

    std::unique_ptr<KeyMap> open(uint32_t gen = 1) { return std::make_unique<KeyMap>(dir, kek, cluster, gen); }
    std::string path() const { return dir + "/keymap"; }
    // A change counter in MAP_SHARED memory (as a server's processes share theirs),
    // named to KeyMap for this process and the ones it forks.
    std::atomic<uint64_t>* shared_counter() {
        void* mem = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) return nullptr;
        auto* c = new (mem) std::atomic<uint64_t>(0);
        KeyMap::set_change_counter(c);
        return c;
    }
    void drop_counter(std::atomic<uint64_t>* c) {
        KeyMap::set_change_counter(nullptr);
        munmap(c, 4096);
    }
    // Another process creates identity's key (counted, if a counter is set): true when it did.
    bool create_in_child(const std::string& identity) {
        pid_t pid = fork();
        if (pid < 0) return false;
        if (pid == 0) {
            int rc = 0;
            try {
                KeyMap(dir, kek, cluster, 1).create(identity, FileClass::Relation);
            } catch (...) {
                rc = 1;
            }
            _exit(rc);
        }
        int status = 0;
        return waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    std::string bytes() const { return cmk_test::slurp(path()); }
    void write_bytes(const std::string& b) const {
        // Rewrite in place (same inode), as damage on disk would look.
        int fd = ::open(path().c_str(), O_WRONLY | O_TRUNC);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::write(fd, b.data(), b.size()), static_cast<ssize_t>(b.size()));
        ::close(fd);
    }
    // identity -> hex DEK, through a fresh instance
    std::map<std::string, std::string> snapshot() {
        auto km = open();
        std::map<std::string, std::string> m;
        for (const auto& id : km->identities()) m[id] = hexkey(*km->get(id));
        return m;
    }

    cmk_test::TempDir tmp;
    std::string dir;
    SecureBytes kek;
    std::string cluster;
};

// Offsets of the records in a key map file (header is 96 bytes).
std::vector<size_t> record_offsets(const std::string& b) {
    std::vector<size_t> offs;
    size_t pos = 96;
    while (pos + 8 <= b.size()) {
        uint32_t len;
        std::memcpy(&len, b.data() + pos, 4);
        if (pos + 12 + len > b.size()) break;
        offs.push_back(pos);
        pos += 12 + len;
    }
    return offs;
}

}  // namespace

TEST_F(KeyMapTest, CreateGetRoundTrip) {
    auto km = open();
    EXPECT_EQ(km->size(), 0u);
    EXPECT_FALSE(km->get("base/5/16384").has_value());
    SecureBytes dek = km->create("base/5/16384", FileClass::Relation);
    EXPECT_EQ(dek.size(), kXtsKeySize);
    auto got = km->get("base/5/16384");
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(hexkey(*got), hexkey(dek));
    EXPECT_TRUE(km->contains("base/5/16384"));
    EXPECT_FALSE(km->contains("base/5/16385"));
    EXPECT_EQ(km->entry_class("base/5/16384"), FileClass::Relation);
    EXPECT_FALSE(km->entry_class("nope").has_value());
    EXPECT_EQ(km->fingerprint("base/5/16384"), key_fingerprint(dek.data(), dek.size()));
    EXPECT_FALSE(km->fingerprint("nope").has_value());

    SecureBytes dek2 = km->create("base/5/16384", FileClass::Relation);  // replaces
    EXPECT_NE(hexkey(dek2), hexkey(dek));
    EXPECT_EQ(hexkey(*km->get("base/5/16384")), hexkey(dek2));
    EXPECT_EQ(km->size(), 1u);
    // the file holds no plaintext DEK
    EXPECT_EQ(bytes().find(std::string(reinterpret_cast<const char*>(dek2.data()), 16)), std::string::npos);
}

// create_absent: the first process to key a file makes the key, a second one (here a
// second instance: another process) gets the same key instead of replacing it, and
// appends nothing.
TEST_F(KeyMapTest, CreateAbsentKeepsTheKeyAnotherProcessMade) {
    auto a = open();
    auto b = open();
    SecureBytes ka = a->create_absent("base/5/16390", FileClass::Relation);
    size_t len = bytes().size();
    SecureBytes kb = b->create_absent("base/5/16390", FileClass::Relation);
    EXPECT_EQ(hexkey(kb), hexkey(ka));
    EXPECT_EQ(bytes().size(), len) << "no record for a key that exists";
    EXPECT_EQ(hexkey(*open()->get("base/5/16390")), hexkey(ka));
    SecureBytes kc = b->create("base/5/16390", FileClass::Relation);  // create() still replaces
    EXPECT_NE(hexkey(kc), hexkey(ka));
}

TEST_F(KeyMapTest, MoveRemovePrefix) {
    auto km = open();
    SecureBytes a = km->create("pg_wal/xlogtemp.77", FileClass::Wal);
    km->move("pg_wal/xlogtemp.77", "pg_wal/000000010000000000000003", FileClass::Wal, false);
    EXPECT_FALSE(km->contains("pg_wal/xlogtemp.77"));
    EXPECT_EQ(hexkey(*km->get("pg_wal/000000010000000000000003")), hexkey(a));
    km->move("pg_wal/000000010000000000000003", "copy", FileClass::Relation, true);
    EXPECT_TRUE(km->contains("pg_wal/000000010000000000000003"));
    EXPECT_EQ(km->entry_class("copy"), FileClass::Relation);
    EXPECT_EQ(hexkey(*km->get("copy")), hexkey(a));
    km->move("copy", "copy", FileClass::Wal, false);  // same identity: reclassify, not remove
    EXPECT_EQ(km->entry_class("copy"), FileClass::Wal);
    EXPECT_THROW(km->move("missing", "x", FileClass::Relation, false), KeyMapError);

    km->remove("copy");
    EXPECT_FALSE(km->contains("copy"));
    km->remove("copy");  // no-op
    for (int i = 0; i < 5; i++) km->create("base/7/" + std::to_string(16384 + i), FileClass::Relation);
    km->create("base/70/1", FileClass::Relation);
    km->remove_prefix("base/7/");
    EXPECT_EQ(km->identities(), (std::vector<std::string>{"base/70/1", "pg_wal/000000010000000000000003"}));
    EXPECT_THROW(km->remove_prefix(""), KeyMapError);
}

TEST_F(KeyMapTest, PersistsAcrossReopen) {
    std::map<std::string, std::string> want;
    {
        auto km = open();
        for (int i = 0; i < 20; i++) {
            std::string id = "base/5/" + std::to_string(20000 + i);
            want[id] = hexkey(km->create(id, FileClass::Relation));
        }
        km->remove("base/5/20003");
        want.erase("base/5/20003");
    }
    EXPECT_EQ(snapshot(), want);
    auto km = open();
    EXPECT_EQ(km->entry_class("base/5/20000"), FileClass::Relation);
}

TEST_F(KeyMapTest, OpenErrors) {
    EXPECT_THROW(KeyMap::create_empty(dir, cluster, 1), KeyMapError);  // exists
    EXPECT_THROW(KeyMap(dir, kek, random_id(), 1), KeyMapError);        // other cluster
    EXPECT_THROW(KeyMap(dir, kek, cluster, 2), KeyMapError);            // other generation
    EXPECT_THROW(KeyMap(tmp.sub("nowhere"), kek, cluster, 1), KeyMapError);
    try {
        KeyMap km(tmp.sub("nowhere"), kek, cluster, 1);
    } catch (const KeyMapError& e) {
        EXPECT_NE(std::string(e.what()).find("missing"), std::string::npos) << e.what();
    }
}

TEST_F(KeyMapTest, CompactKeepsLiveEntries) {
    auto km = open();
    for (int i = 0; i < 50; i++) km->create("base/5/" + std::to_string(i), FileClass::Relation);
    for (int i = 0; i < 40; i++) km->remove("base/5/" + std::to_string(i));
    auto before = snapshot();
    size_t size_before = bytes().size();
    km->compact();
    EXPECT_LT(bytes().size(), size_before);
    EXPECT_EQ(record_offsets(bytes()).size(), 10u);
    EXPECT_EQ(snapshot(), before);
    km->create("after", FileClass::Slru);  // appends to the new file
    EXPECT_EQ(snapshot().size(), 11u);
    EXPECT_TRUE(std::filesystem::exists(path()));
    EXPECT_FALSE(std::filesystem::exists(path() + ".tmp"));
}

TEST_F(KeyMapTest, MaybeCompactWhenDeadDominates) {
    auto km = open();
    for (int i = 0; i < 502; i++) km->create("t/" + std::to_string(i), FileClass::Relation);
    km->remove_prefix("t/");  // 502 ADD + 502 DEL dead records, 0 live
    EXPECT_EQ(km->size(), 0u);
    EXPECT_EQ(bytes().size(), 96u) << "remove_prefix should have compacted the log";
    km->create("x", FileClass::Relation);
    km->maybe_compact();  // nothing dead: no-op
    EXPECT_EQ(snapshot().size(), 1u);
}

TEST_F(KeyMapTest, RewrapSwapsKekAndGeneration) {
    auto km = open();
    km->create("a", FileClass::Relation);
    km->create("b", FileClass::Wal);
    auto before = snapshot();
    SecureBytes kek2 = random_key(kKekSize);
    km->rewrap(kek2, 2);
    EXPECT_EQ(hexkey(*km->get("a")), before["a"]);
    km->create("c", FileClass::Slru);  // sealed under the new KEK
    EXPECT_THROW(KeyMap(dir, kek, cluster, 1), KeyMapError);   // old generation refused
    KeyMap stale(dir, kek, cluster, 2);  // header matches, but the old KEK opens nothing
    EXPECT_THROW(stale.get("a"), KeyMapError);
    KeyMap fresh(dir, kek2, cluster, 2);
    EXPECT_EQ(hexkey(*fresh.get("b")), before["b"]);
    EXPECT_EQ(fresh.entry_class("c"), FileClass::Slru);
    EXPECT_THROW(km->rewrap(random_key(16), 3), KeyMapError);
}

TEST_F(KeyMapTest, TwoInstancesSeeEachOther) {
    auto a = open();
    auto b = open();
    SecureBytes k = a->create("base/5/1", FileClass::Relation);
    auto got = b->get("base/5/1");
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(hexkey(*got), hexkey(k));
    // replaced key (file recreated by another process) is noticed, not served stale
    SecureBytes k2 = b->create("base/5/1", FileClass::Relation);
    EXPECT_EQ(hexkey(*a->get("base/5/1")), hexkey(k2));
    b->remove("base/5/1");
    EXPECT_FALSE(a->get("base/5/1").has_value());
    // compaction by one instance (file replaced) is picked up by the other
    for (int i = 0; i < 10; i++) a->create("x/" + std::to_string(i), FileClass::Relation);
    a->remove("x/0");
    a->compact();
    EXPECT_EQ(b->size(), 9u);
    b->create("y", FileClass::Relation);
    EXPECT_TRUE(a->contains("y"));
    EXPECT_EQ(a->size(), 10u);
}

// The layer keeps unwrapped keys per process while an entry's tag is unchanged: the
// tag must change whenever the DEK or its sealing does, and only then.
TEST_F(KeyMapTest, EntryTagChangesWithTheKey) {
    auto a = open();
    auto b = open();
    EXPECT_FALSE(a->entry_tag("base/5/1").has_value());
    a->create("base/5/1", FileClass::Relation);
    std::vector<uint8_t> t0;
    ASSERT_TRUE(a->get("base/5/1", &t0).has_value());
    ASSERT_EQ(b->entry_tag("base/5/1"), t0) << "another instance sees another tag for the same entry";
    a->create("x", FileClass::Relation);
    a->remove("x");
    a->compact();  // rewrites the file: the entry, and its tag, stay
    EXPECT_EQ(b->entry_tag("base/5/1"), t0);
    b->create("base/5/1", FileClass::Relation);  // recreated by another process
    auto t1 = a->entry_tag("base/5/1");
    ASSERT_TRUE(t1.has_value());
    EXPECT_NE(*t1, t0);
    a->move("base/5/1", "base/5/2", FileClass::Relation, true);  // same DEK, sealed for another identity
    EXPECT_EQ(a->entry_tag("base/5/1"), t1);
    EXPECT_NE(a->entry_tag("base/5/2"), t1);
    a->rewrap(random_key(kKekSize), 2);  // same DEK, sealed under a new KEK generation
    EXPECT_NE(a->entry_tag("base/5/1"), t1);
    a->remove("base/5/1");
    EXPECT_FALSE(a->entry_tag("base/5/1").has_value());
}

TEST_F(KeyMapTest, ForkedProcessesAppendConcurrently) {
    auto km = open();  // opened before fork, like the postmaster's instance
    km->create("before-fork", FileClass::Relation);
    const int N = 150;
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        int rc = 0;
        try {
            for (int i = 0; i < N; i++) km->create("child/" + std::to_string(i), FileClass::Relation);
            // a second, independent instance in the child too
            KeyMap other(dir, kek, cluster, 1);
            for (int i = 0; i < 20; i++) other.create("child2/" + std::to_string(i), FileClass::Wal);
        } catch (...) {
            rc = 1;
        }
        _exit(rc);
    }
    for (int i = 0; i < N; i++) km->create("parent/" + std::to_string(i), FileClass::Relation);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0);
    EXPECT_EQ(km->size(), size_t(2 * N + 21));
    EXPECT_TRUE(km->get("child/149").has_value());
    EXPECT_TRUE(km->get("child2/19").has_value());
    EXPECT_EQ(snapshot().size(), size_t(2 * N + 21));
}

// The server's shortcut (KeyMap::skip_unchanged): a map that trusts the shared change
// counter looks at its file only after a writer section ended somewhere; a change made
// without counting is not seen until the next counted one. Processes share the counter
// through MAP_SHARED memory, as a server's do through its shared region.
TEST_F(KeyMapTest, ChangeCounterSkipsLooksUntilAWriterCounts) {
    std::atomic<uint64_t>* counter = shared_counter();
    ASSERT_NE(counter, nullptr);
    auto reader = open();
    reader->skip_unchanged(true);
    EXPECT_FALSE(reader->contains("base/5/1"));
    // Another process's create counts: seen at once.
    ASSERT_TRUE(create_in_child("base/5/1"));
    EXPECT_EQ(counter->load(), 1u) << "a writer section counts once";
    EXPECT_TRUE(reader->contains("base/5/1")) << "a counted change must be seen";
    // A change made without counting (no counter set in the writer) is not looked for...
    KeyMap::set_change_counter(nullptr);
    open()->create("base/5/2", FileClass::Relation);
    KeyMap::set_change_counter(counter);
    EXPECT_FALSE(reader->contains("base/5/2")) << "looked at the file although nothing counted";
    auto looker = open();  // a map that does not skip looks every time
    EXPECT_TRUE(looker->contains("base/5/2"));
    // ... until a counted change: then everything since is read.
    looker->create("base/5/3", FileClass::Relation);
    EXPECT_TRUE(reader->contains("base/5/2"));
    EXPECT_TRUE(reader->contains("base/5/3"));
    // Without a counter, a map looks every time again.
    KeyMap::set_change_counter(nullptr);
    open()->remove("base/5/1");
    EXPECT_FALSE(reader->contains("base/5/1"));
    drop_counter(counter);
}

// A server map's own writer section (create, remove) leaves it holding everything the
// file does: the next look needs no stat of the file for that change, while what
// another counted writer did before the section is in memory too, and a section that
// failed before its append was applied makes the next look read the file again.
TEST_F(KeyMapTest, OwnAppendNeedsNoLookAtTheFileAfterwards) {
    std::atomic<uint64_t>* counter = shared_counter();
    ASSERT_NE(counter, nullptr);
    auto writer = open();
    writer->skip_unchanged(true);
    EXPECT_FALSE(writer->contains("base/5/1"));
    ASSERT_TRUE(create_in_child("base/5/1"));
    SecureBytes k2 = writer->create("base/5/2", FileClass::Relation);
    EXPECT_EQ(counter->load(), 2u);
    // A change nobody counts, made after our section: not looked for.
    KeyMap::set_change_counter(nullptr);
    open()->create("base/5/3", FileClass::Relation);
    KeyMap::set_change_counter(counter);
    EXPECT_FALSE(writer->contains("base/5/3")) << "the writer's own change made it look at the file again";
    EXPECT_TRUE(writer->contains("base/5/1")) << "a change counted before our section was lost";
    auto got = writer->get("base/5/2");
    ASSERT_TRUE(got.has_value());
    EXPECT_EQ(hex_encode(got->data(), 64), hex_encode(k2.data(), 64));
    // Applied in memory exactly as read: a fresh map of the file agrees, and a removal
    // (the DEL and the shred of its ADD) applies alike.
    writer->remove("base/5/2");
    EXPECT_FALSE(writer->contains("base/5/2"));
    EXPECT_FALSE(open()->contains("base/5/2"));
    EXPECT_TRUE(writer->removed("base/5/2"));
    // A section that fails after writing (no fsync) leaves the next look to the file.
    KeyMap::set_crash_point("append-fsync");
    EXPECT_THROW(writer->create("base/5/4", FileClass::Relation), KeyMapCrash);
    KeyMap::set_crash_point("");
    EXPECT_TRUE(writer->contains("base/5/3")) << "a failed section was taken as applied";
    drop_counter(counter);
}

TEST_F(KeyMapTest, TornTailIgnoredThenRepaired) {
    auto km = open();
    km->create("a", FileClass::Relation);
    km->create("b", FileClass::Relation);
    std::string b = bytes();
    auto offs = record_offsets(b);
    ASSERT_EQ(offs.size(), 2u);
    write_bytes(b.substr(0, b.size() - 7));  // the last append was torn
    auto again = open();
    EXPECT_TRUE(again->contains("a"));
    EXPECT_FALSE(again->contains("b"));
    // a torn length word (fewer than 8 bytes of the record) too
    write_bytes(b.substr(0, offs[1] + 3));
    EXPECT_EQ(open()->size(), 1u);
    // an all-zero tail (file extended, data never written)
    write_bytes(b.substr(0, offs[1]) + std::string(200, '\0'));
    EXPECT_EQ(open()->size(), 1u);
    // the next append cuts the tail off and the log is whole again
    again->create("c", FileClass::Relation);
    auto snap = snapshot();
    EXPECT_EQ(snap.size(), 2u);
    EXPECT_TRUE(snap.count("a") && snap.count("c"));
    EXPECT_EQ(record_offsets(bytes()).size(), 2u);
}

TEST_F(KeyMapTest, DamagedMiddleRecordIsAnError) {
    auto km = open();
    km->create("a", FileClass::Relation);
    km->create("b", FileClass::Relation);
    km->create("c", FileClass::Relation);
    std::string b = bytes();
    auto offs = record_offsets(b);
    std::string bad = b;
    bad[offs[1] + 10] ^= 0x40;  // body byte of the middle record
    write_bytes(bad);
    try {
        open();
        FAIL() << "damaged record accepted";
    } catch (const KeyMapError& e) {
        EXPECT_NE(std::string(e.what()).find("offset " + std::to_string(offs[1])), std::string::npos) << e.what();
    }
    // a damaged length word in the middle is damage, not a torn tail
    bad = b;
    bad[offs[1] + 1] ^= 0x01;
    write_bytes(bad);
    EXPECT_THROW(open(), KeyMapError);
    // a complete final record with a bad checksum is damage too
    bad = b;
    bad[b.size() - 20] ^= 0x01;
    write_bytes(bad);
    EXPECT_THROW(open(), KeyMapError);
}

TEST_F(KeyMapTest, DamagedHeaderIsAnError) {
    auto km = open();
    km->create("a", FileClass::Relation);
    std::string b = bytes();
    write_bytes(b.substr(0, 50));
    EXPECT_THROW(open(), KeyMapError);
    std::string bad = b;
    bad[20] ^= 1;  // cluster id byte: header CRC mismatch
    write_bytes(bad);
    EXPECT_THROW(open(), KeyMapError);
    bad = b;
    bad[0] = 'X';
    write_bytes(bad);
    EXPECT_THROW(open(), KeyMapError);
    write_bytes("");
    EXPECT_THROW(open(), KeyMapError);
}

TEST_F(KeyMapTest, TamperedWrappedDekIsAnError) {
    auto km = open();
    km->create("base/5/1", FileClass::Relation);
    km->create("base/5/2", FileClass::Relation);
    std::string b = bytes();
    auto offs = record_offsets(b);
    // Flip a byte of the first record's wrapped DEK and fix its checksum, so the log
    // parses and only the AEAD can notice.
    size_t off = offs[0];
    uint32_t len;
    std::memcpy(&len, b.data() + off, 4);
    std::string bad = b;
    bad[off + 8 + len - 3] ^= 0x20;
    uint32_t c = crc32c(bad.data() + off, 4);
    c = crc32c(bad.data() + off + 8, len, c);
    std::memcpy(&bad[off + 8 + len], &c, 4);
    write_bytes(bad);
    auto t = open();
    EXPECT_THROW(t->get("base/5/1"), KeyMapError);
    EXPECT_THROW(t->fingerprint("base/5/1"), KeyMapError);
    EXPECT_TRUE(t->get("base/5/2").has_value());
    // an entry cannot be moved onto another identity: the identity is the AEAD's aad
    EXPECT_NE(dek_aad("base/5/1", 1), dek_aad("base/5/2", 1));
    EXPECT_NE(dek_aad("base/5/1", 1), dek_aad("base/5/1", 2));
    EXPECT_EQ(dek_aad("x", 7), std::string("cmk_lakebase dek v1\0" "7\0x", 23));
    // wrong KEK: same cluster and generation, nothing authenticates
    write_bytes(b);
    KeyMap wrong(dir, random_key(kKekSize), cluster, 1);
    EXPECT_THROW(wrong.get("base/5/2"), KeyMapError);
}

TEST_F(KeyMapTest, EveryCrashPointLeavesOldOrNewState) {
    for (const char* step : {"append-write", "append-fsync"}) {
        SCOPED_TRACE(step);
        auto km = open();
        km->create(std::string("keep-") + step, FileClass::Relation);
        auto old_state = snapshot();
        KeyMap::set_crash_point(step);
        EXPECT_THROW(km->create(std::string("new-") + step, FileClass::Relation), KeyMapCrash);
        auto after = snapshot();  // "restart": a fresh instance reads the files
        auto new_state = old_state;
        if (after.count(std::string("new-") + step)) new_state[std::string("new-") + step] = after[std::string("new-") + step];
        EXPECT_EQ(after, new_state);
        for (const auto& e : old_state) EXPECT_EQ(after[e.first], e.second);
        // and the map keeps working: the next append repairs a torn tail
        auto km2 = open();
        km2->create(std::string("later-") + step, FileClass::Relation);
        EXPECT_EQ(snapshot().size(), after.size() + 1);
    }
    for (const char* step : {"compact-write", "compact-fsync", "compact-rename"}) {
        SCOPED_TRACE(step);
        auto km = open();
        km->create(std::string("c-") + step, FileClass::Relation);
        km->remove(std::string("c-") + step);
        km->create(std::string("d-") + step, FileClass::Relation);
        auto old_state = snapshot();
        KeyMap::set_crash_point(step);
        EXPECT_THROW(km->compact(), KeyMapCrash);
        EXPECT_EQ(snapshot(), old_state);
        km->create(std::string("e-") + step, FileClass::Relation);
        km->compact();  // a later compaction succeeds over the leftover tmp file
        auto st = snapshot();
        EXPECT_EQ(st.size(), old_state.size() + 1);
        for (const auto& e : old_state) EXPECT_EQ(st[e.first], e.second);
    }
    // rewrap crashes: old KEK and generation still open the map, with every DEK
    for (const char* step : {"compact-write", "compact-fsync", "compact-rename"}) {
        SCOPED_TRACE(std::string("rewrap ") + step);
        auto km = open();
        auto old_state = snapshot();
        KeyMap::set_crash_point(step);
        EXPECT_THROW(km->rewrap(random_key(kKekSize), 2), KeyMapCrash);
        EXPECT_EQ(snapshot(), old_state);
        EXPECT_THROW(KeyMap(dir, kek, cluster, 2), KeyMapError);
    }
}

// Issue 18: a removed file's sealed DEK leaves the key map file at once (not at some
// later compaction), overwritten in place; removed() still answers, and a crash in the
// overwrite leaves a valid map whose next removal shreds the leftover (issue 20: a
// removal no longer rewrites the whole file).
TEST_F(KeyMapTest, RemoveShredsTheSealedDekAtOnce) {
    auto km = open();
    km->create("base/5/1", FileClass::Relation);
    km->create("base/5/2", FileClass::Relation);
    auto sealed = [&](const std::string& id) {
        std::vector<uint8_t> t = *km->entry_tag(id);
        return std::string(t.begin(), t.end() - 4);  // the tag is the sealed DEK + generation
    };
    std::string s1 = sealed("base/5/1");
    auto dek2 = km->get("base/5/2");
    ASSERT_NE(bytes().find(s1), std::string::npos);
    km->remove("base/5/1");
    EXPECT_EQ(bytes().find(s1), std::string::npos) << "the removed DEK's sealed bytes are still in the file";
    EXPECT_TRUE(km->removed("base/5/1"));
    {
        auto fresh = open();
        EXPECT_FALSE(fresh->contains("base/5/1"));
        EXPECT_TRUE(fresh->removed("base/5/1")) << "the tombstone keeps removed() answering after the rewrite";
        EXPECT_EQ(hex_encode(fresh->get("base/5/2")->data(), 64), hex_encode(dek2->data(), 64));
    }
    km->create("base/5/1", FileClass::Relation);
    EXPECT_FALSE(km->removed("base/5/1"));

    // A crash in the middle of the in-place overwrite (half of the sealed DEK zeroed,
    // the record's checksum now wrong): the DEL is durable, so the torn record is
    // superseded and the map opens; the next removal finishes the shred.
    km->create("base/5/3", FileClass::Relation);
    std::string s3 = sealed("base/5/3");
    const size_t size_before = bytes().size();
    KeyMap::set_crash_point("shred-write");
    EXPECT_THROW(km->remove("base/5/3"), KeyMapCrash);
    EXPECT_GT(bytes().size(), size_before) << "the DEL was appended before the overwrite";
    EXPECT_EQ(bytes().find(s3), std::string::npos) << "half of it is zeroed already";
    EXPECT_NE(bytes().find(s3.substr(s3.size() - 8)), std::string::npos) << "the other half is not";
    {
        auto fresh = open();  // "restart": the torn record is superseded, the map valid
        EXPECT_FALSE(fresh->contains("base/5/3"));
        EXPECT_TRUE(fresh->removed("base/5/3"));
        EXPECT_EQ(hex_encode(fresh->get("base/5/2")->data(), 64), hex_encode(dek2->data(), 64));
        fresh->remove("base/5/2");
    }
    EXPECT_EQ(bytes().find(s3.substr(s3.size() - 8)), std::string::npos) << "the next removal shreds the leftover";
    {
        auto fresh = open();  // and leaves every record with a sound checksum
        EXPECT_FALSE(fresh->contains("base/5/2"));
        EXPECT_TRUE(fresh->contains("base/5/1"));
    }

    // A removal costs one record's bytes, not a rewrite of the file: the file only grows.
    for (int i = 0; i < 50; i++) km->create("base/6/" + std::to_string(i), FileClass::Relation);
    std::string s6 = sealed("base/6/7");
    const std::string before = bytes();
    km->remove("base/6/7");
    const std::string after = bytes();
    EXPECT_EQ(after.size(), before.size() + 12 + 4 + std::string("base/6/7").size()) << "one DEL record appended";
    EXPECT_EQ(after.find(s6), std::string::npos);
    size_t diff = 0;
    for (size_t i = 0; i < before.size(); i++) diff += before[i] != after[i];
    EXPECT_LE(diff, s6.size() + 4) << "only the sealed DEK and its record's checksum changed in place";

    // The overwrite alone (the DEL lost to a crash: the two share one fsync) is a
    // removal too: an ADD whose sealed DEK is zeros holds no key.
    write_bytes(after.substr(0, before.size()));
    {
        auto fresh = open();
        EXPECT_FALSE(fresh->contains("base/6/7"));
        EXPECT_TRUE(fresh->removed("base/6/7"));
        EXPECT_TRUE(fresh->contains("base/6/8"));
    }
    write_bytes(after);

    // After a compaction the entries know their records in the new file.
    km->compact();
    std::string s8 = sealed("base/6/8");
    km->remove("base/6/8");
    EXPECT_EQ(bytes().find(s8), std::string::npos) << "shredded in the compacted file too";

    // A damaged live entry is still damage (only superseded records may be torn).
    std::string b = bytes();
    std::string s9 = sealed("base/6/9");
    size_t at = b.find(s9);
    ASSERT_NE(at, std::string::npos);
    b[at + 3] ^= 0x10;
    write_bytes(b);
    EXPECT_THROW(open(), KeyMapError);
}
