// Unit tests of the key arena (base/key_arena.hpp): OpenSSL allocations made inside a
// KeyArenaScope land in pages marked "dd" (MADV_DONTDUMP) in /proc/self/smaps, those
// outside do not, free wipes, realloc keeps arena blocks in the arena, other threads
// are unaffected; and no AES key schedule of a page-cipher key is left in memory a
// core dump would hold (an independent AES-256 key expansion, searched in every
// dumpable mapping of the process, with a control that finds it without the scope).
#include <gtest/gtest.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/key_arena.hpp"

using namespace cmk;

namespace {

struct Mapping {
    uintptr_t lo = 0, hi = 0;
    std::string perms, name;
    bool dontdump = false;
};

std::vector<Mapping> mappings() {
    std::vector<Mapping> out;
    std::ifstream in("/proc/self/smaps");
    std::string line;
    while (std::getline(in, line)) {
        unsigned long lo, hi;
        char perms[8] = {};
        if (std::sscanf(line.c_str(), "%lx-%lx %7s", &lo, &hi, perms) == 3 && line.find(':') != 8 &&
            line.compare(0, 8, "VmFlags:") != 0) {
            Mapping m;
            m.lo = lo;
            m.hi = hi;
            m.perms = perms;
            std::istringstream ls(line);
            std::string f;
            for (int i = 0; i < 5 && ls >> f; i++) {
            }
            std::getline(ls, m.name);
            m.name.erase(0, m.name.find_first_not_of(' '));
            out.push_back(m);
        } else if (line.compare(0, 8, "VmFlags:") == 0 && !out.empty()) {
            std::istringstream ls(line.substr(8));
            std::string flag;
            while (ls >> flag)
                if (flag == "dd") out.back().dontdump = true;
        }
    }
    return out;
}

// The VmFlags "dd" of the mapping holding p; -1 if p is in no mapping.
int dontdump_at(const void* p) {
    auto a = reinterpret_cast<uintptr_t>(p);
    for (const Mapping& m : mappings())
        if (a >= m.lo && a < m.hi) return m.dontdump ? 1 : 0;
    return -1;
}

// ---- an AES-256 key expansion (FIPS-197 5.2), independent of OpenSSL
uint8_t xtime(uint8_t x) { return static_cast<uint8_t>((x << 1) ^ ((x & 0x80) ? 0x1b : 0)); }

uint8_t gmul(uint8_t a, uint8_t b) {
    uint8_t r = 0;
    while (b) {
        if (b & 1) r ^= a;
        a = xtime(a);
        b >>= 1;
    }
    return r;
}

uint8_t sbox(uint8_t x) {
    uint8_t inv = 0;
    if (x)
        for (int c = 1; c < 256; c++)
            if (gmul(x, static_cast<uint8_t>(c)) == 1) inv = static_cast<uint8_t>(c);
    uint8_t s = inv;
    for (int i = 1; i <= 4; i++) s ^= static_cast<uint8_t>((inv << i) | (inv >> (8 - i)));
    return s ^ 0x63;
}

// 240 bytes: the 15 round keys in FIPS byte order (what AES-NI code keeps).
std::vector<uint8_t> aes256_expand(const uint8_t* key) {
    std::vector<uint8_t> w(240);
    std::memcpy(w.data(), key, 32);
    uint8_t rcon = 1;
    for (int i = 8; i < 60; i++) {
        uint8_t t[4];
        std::memcpy(t, &w[4 * (i - 1)], 4);
        if (i % 8 == 0) {
            uint8_t r0 = t[0];
            t[0] = sbox(t[1]) ^ rcon;
            t[1] = sbox(t[2]);
            t[2] = sbox(t[3]);
            t[3] = sbox(r0);
            rcon = xtime(rcon);
        } else if (i % 8 == 4) {
            for (uint8_t& b : t) b = sbox(b);
        }
        for (int j = 0; j < 4; j++) w[4 * i + j] = w[4 * (i - 8) + j] ^ t[j];
    }
    return w;
}

// Occurrences of needle in the mappings a core dump would hold: readable, not "dd",
// not the kernel's [vvar]/[vsyscall]; also mappings of files (a key in a file-backed
// private page would be dumped). Skips the needle's own storage.
int occurrences_in_dumpable_memory(const uint8_t* needle, size_t n) {
    int found = 0;
    for (const Mapping& m : mappings()) {
        if (m.perms.empty() || m.perms[0] != 'r' || m.dontdump) continue;
        if (m.name == "[vvar]" || m.name == "[vsyscall]" || m.name == "[vvar_vclock]") continue;
        if (m.hi - m.lo > (size_t(1) << 30)) continue;  // a sanitizer's shadow, never keys
        const auto* p = reinterpret_cast<const uint8_t*>(m.lo);
        size_t len = m.hi - m.lo;
        for (const uint8_t* q = p; len >= n;) {
            const void* hit = memmem(q, len, needle, n);
            if (!hit) break;
            if (hit != needle) found++;
            size_t skip = static_cast<const uint8_t*>(hit) - q + 1;
            q += skip;
            len -= skip;
        }
    }
    return found;
}

TEST(KeyArena, IsActiveOnThisPlatform) {
    KeyArenaStats s = key_arena_stats();
    EXPECT_TRUE(s.active) << s.reason;
}

TEST(KeyArena, ScopedAllocationsAreInDontDumpPagesOthersAreNot) {
    void* outside = OPENSSL_malloc(200);
    void* inside;
    {
        KeyArenaScope scope;
        inside = OPENSSL_zalloc(200);
    }
    void* after = OPENSSL_malloc(200);
    ASSERT_NE(inside, nullptr);
    EXPECT_TRUE(key_arena_contains(inside));
    EXPECT_EQ(dontdump_at(inside), 1) << "an arena block must be in a MADV_DONTDUMP mapping";
    EXPECT_FALSE(key_arena_contains(outside));
    EXPECT_FALSE(key_arena_contains(after));
    EXPECT_EQ(dontdump_at(outside), 0);
    EXPECT_EQ(dontdump_at(after), 0);
    for (int i = 0; i < 200; i++) ASSERT_EQ(static_cast<uint8_t*>(inside)[i], 0) << "zalloc is zero";
    OPENSSL_free(inside);
    OPENSSL_free(outside);
    OPENSSL_free(after);
}

TEST(KeyArena, FreeWipesTheBlock) {
    uint8_t* p;
    {
        KeyArenaScope scope;
        p = static_cast<uint8_t*>(OPENSSL_malloc(100));
    }
    ASSERT_TRUE(key_arena_contains(p));
    std::memset(p, 0xA5, 100);
    OPENSSL_free(p);  // outside the scope: free recognises the block by its address
    // The arena's pages stay mapped: read what the block holds now (skip the free
    // list link the arena keeps in its first 8 bytes).
    for (int i = 8; i < 100; i++) ASSERT_EQ(p[i], 0) << "byte " << i << " not wiped";
}

TEST(KeyArena, ReallocKeepsArenaBlocksInTheArena) {
    uint8_t* p;
    {
        KeyArenaScope scope;
        p = static_cast<uint8_t*>(OPENSSL_malloc(40));
    }
    for (int i = 0; i < 40; i++) p[i] = static_cast<uint8_t>(i);
    auto* q = static_cast<uint8_t*>(OPENSSL_realloc(p, 5000));  // outside the scope
    ASSERT_NE(q, nullptr);
    EXPECT_TRUE(key_arena_contains(q));
    for (int i = 0; i < 40; i++) ASSERT_EQ(q[i], i);
    OPENSSL_free(q);
}

TEST(KeyArena, OtherThreadsAllocateOnTheHeapMeanwhile) {
    KeyArenaScope scope;
    void* theirs = nullptr;
    std::thread t([&] { theirs = OPENSSL_malloc(64); });
    t.join();
    EXPECT_FALSE(key_arena_contains(theirs));
    OPENSSL_free(theirs);
    void* mine = OPENSSL_malloc(64);
    EXPECT_TRUE(key_arena_contains(mine));
    OPENSSL_free(mine);
}

// A forked child (every server process is one) inherits the arena and the redirected
// slots, and can enter scopes even if the parent forked while another thread held one.
TEST(KeyArena, ForkedChildUsesTheArena) {
    void* parents;
    {
        KeyArenaScope scope;
        parents = OPENSSL_malloc(32);
    }
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        alarm(20);  // a deadlock fails the test instead of hanging it
        int bad = 0;
        if (dontdump_at(parents) != 1) bad |= 1;
        void* p;
        {
            KeyArenaScope scope;
            p = OPENSSL_malloc(32);
        }
        if (!key_arena_contains(p) || dontdump_at(p) != 1) bad |= 2;
        OPENSSL_free(p);
        OPENSSL_free(parents);
        _exit(bad);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status)) << "the child died (signal " << WTERMSIG(status) << ")";
    EXPECT_EQ(WEXITSTATUS(status), 0) << "1: inherited block not dontdump; 2: child's scope not in the arena";
    OPENSSL_free(parents);
}

TEST(KeyArena, LargeAllocationsFallBackToTheHeapAndAreCounted) {
    size_t before = key_arena_stats().fallbacks;
    void* big;
    {
        KeyArenaScope scope;
        big = OPENSSL_malloc(size_t(1) << 20);
    }
    EXPECT_FALSE(key_arena_contains(big));
    EXPECT_EQ(key_arena_stats().fallbacks, before + 1);
    OPENSSL_free(big);
}

TEST(KeyArena, PageCipherContextsCostAFewKiBEachAndAreReturned) {
    SecureBytes key = random_key(kXtsKeySize);
    KeyArenaStats s0 = key_arena_stats();
    constexpr int kKeys = 1000;
    std::vector<std::unique_ptr<XtsCipher>> ciphers;
    for (int i = 0; i < kKeys; i++) ciphers.push_back(std::make_unique<XtsCipher>(key.data()));
    KeyArenaStats s1 = key_arena_stats();
    size_t per_key = (s1.in_use - s0.in_use) / kKeys;
    std::printf("[          ] key arena: %zu bytes per XtsCipher (%zu blocks), %zu KiB committed for %d\n",
                per_key, (s1.blocks - s0.blocks) / kKeys, s1.committed / 1024, kKeys);
    EXPECT_GT(per_key, 500u) << "the contexts did not land in the arena";
    EXPECT_LT(per_key, 8192u);
    ciphers.clear();
    EXPECT_EQ(key_arena_stats().in_use, s0.in_use) << "freed contexts return their blocks";
}

#if defined(__SANITIZE_ADDRESS__)
#define CMK_UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CMK_UNDER_ASAN 1
#endif
#endif

// The test the issue asks for, in-process: every dumpable byte of this process is
// searched for the key's raw halves and for their AES-256 key schedules.
TEST(KeyArena, NoKeyScheduleOfAPageCipherInDumpableMemory) {
#ifdef CMK_UNDER_ASAN
    GTEST_SKIP() << "under ASan the heap is in the sanitizer's huge mappings, which the scan skips (its control could not pass): the scan runs in the plain build";
#endif
    SecureBytes key = random_key(kXtsKeySize);
    // Needles in DONTDUMP memory themselves, so that the search does not find them.
    SecureBytes needles(4 * 48);
    for (int half = 0; half < 2; half++) {
        std::vector<uint8_t> sched = aes256_expand(key.data() + 32 * half);
        // round keys 2 and 3 (bytes 32..63) and 13..14 (bytes 208..239)
        std::memcpy(needles.data() + 96 * half, sched.data() + 32, 48);
        std::memcpy(needles.data() + 96 * half + 48, sched.data() + 192, 48);
        OPENSSL_cleanse(sched.data(), sched.size());
    }
    auto count_all = [&] {
        int n = 0;
        for (int i = 0; i < 4; i++) n += occurrences_in_dumpable_memory(needles.data() + 48 * i, 48);
        for (int half = 0; half < 2; half++)
            n += occurrences_in_dumpable_memory(key.data() + 32 * half, 32);
        return n;
    };
    ASSERT_EQ(count_all(), 0) << "the key is in dumpable memory before any cipher exists";

    {
        XtsCipher cipher(key.data());
        uint8_t page[kUnitSize] = {};
        cipher.encrypt(7, page, page, sizeof page);
        cipher.decrypt(7, page, page, sizeof page);
        EXPECT_EQ(count_all(), 0) << "a live XtsCipher's key schedule is in dumpable memory";
    }

    // Control: the same context made outside the arena is found (the search works and
    // the schedule layout is the one searched for).
    EVP_CIPHER_CTX* raw = EVP_CIPHER_CTX_new();
    ASSERT_EQ(EVP_EncryptInit_ex2(raw, EVP_aes_256_xts(), key.data(), nullptr, nullptr), 1);
    EXPECT_GT(count_all(), 0) << "control: a heap context's schedule should be found";
    EVP_CIPHER_CTX_free(raw);
}

}  // namespace
