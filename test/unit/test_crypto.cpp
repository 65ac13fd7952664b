// Unit tests of the crypto core: published XTS and GCM vectors, the blob layout,
// tamper detection, fingerprints, encodings and CRC32C.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <openssl/evp.h>

#include <cstdlib>
#include <cstring>
#include <new>
#include <set>

#include "cmk_lakebase/base/crypto.hpp"
#include "test_helpers.hpp"

using namespace cmk;
using cmk_test::unhex;

namespace {

std::vector<uint8_t> pattern512() {
    std::vector<uint8_t> pt(512);
    for (size_t i = 0; i < pt.size(); i++) pt[i] = static_cast<uint8_t>(i & 0xff);
    return pt;
}

struct XtsVector {
    int number;
    uint64_t unit;
    std::vector<uint8_t> ct;
};

// test/data/xts_ieee1619_aes256.txt: IEEE Std 1619-2007 Annex B, vectors 10..14.
void load_ieee_vectors(std::vector<uint8_t>& key, std::vector<XtsVector>& vecs) {
    std::string text = cmk_test::slurp(cmk_test::data_dir() + "/xts_ieee1619_aes256.txt");
    ASSERT_FALSE(text.empty()) << "test/data/xts_ieee1619_aes256.txt not found";
    std::istringstream in(text);
    std::string line, k1, k2;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        std::istringstream ls(line);
        std::string tag;
        ls >> tag;
        if (tag == "key1") ls >> k1;
        if (tag == "key2") ls >> k2;
        if (tag == "vector") {
            XtsVector v;
            std::string seq, ct;
            ls >> v.number >> seq >> ct;
            v.unit = std::stoull(seq, nullptr, 16);
            v.ct = unhex(ct);
            vecs.push_back(v);
        }
    }
    key = unhex(k1 + k2);
}

}  // namespace

TEST(Xts, Ieee1619Vectors10to14) {
    std::vector<uint8_t> key;
    std::vector<XtsVector> vecs;
    load_ieee_vectors(key, vecs);
    ASSERT_EQ(key.size(), 64u);
    ASSERT_EQ(vecs.size(), 5u);
    std::vector<uint8_t> pt = pattern512();
    XtsCipher x(key.data());
    for (const auto& v : vecs) {
        SCOPED_TRACE("vector " + std::to_string(v.number));
        ASSERT_EQ(v.ct.size(), 512u);
        std::vector<uint8_t> out(512);
        x.encrypt(v.unit, pt.data(), out.data(), out.size());
        EXPECT_EQ(out, v.ct);
        std::vector<uint8_t> back(512);
        x.decrypt(v.unit, v.ct.data(), back.data(), back.size());
        EXPECT_EQ(back, pt);
        // in place
        std::vector<uint8_t> buf = pt;
        x.encrypt(v.unit, buf.data(), buf.data(), buf.size());
        EXPECT_EQ(buf, v.ct);
        x.decrypt(v.unit, buf.data(), buf.data(), buf.size());
        EXPECT_EQ(buf, pt);
    }
}

TEST(Xts, RoundTripManyLengths) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher x(key.data());
    for (size_t len : {size_t(1), size_t(15), size_t(16), size_t(17), size_t(100), size_t(8191), size_t(8192),
                       size_t(8192 + 13), size_t(1) << 20}) {
        SCOPED_TRACE("len " + std::to_string(len));
        std::vector<uint8_t> pt = random_bytes(len);
        std::vector<uint8_t> ct(len), ct2(len), back(len);
        x.encrypt(42, pt.data(), ct.data(), len);
        x.encrypt(43, pt.data(), ct2.data(), len);
        if (len >= 16) {
            EXPECT_NE(ct, pt);
            EXPECT_NE(ct, ct2) << "the unit number must change the ciphertext";
        }
        x.decrypt(42, ct.data(), back.data(), len);
        EXPECT_EQ(back, pt);
        std::vector<uint8_t> inplace = pt;
        x.encrypt(7, inplace.data(), inplace.data(), len);
        x.decrypt(7, inplace.data(), inplace.data(), len);
        EXPECT_EQ(inplace, pt);
    }
}

TEST(Xts, ManyUnitsOneInstanceIsDeterministic) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher a(key.data());
    XtsCipher b(key.data());
    std::vector<uint8_t> page = random_bytes(kUnitSize);
    for (uint64_t u = 0; u < 64; u++) {
        std::vector<uint8_t> c1(kUnitSize), c2(kUnitSize);
        a.encrypt(u, page.data(), c1.data(), kUnitSize);
        b.encrypt(u, page.data(), c2.data(), kUnitSize);
        ASSERT_EQ(c1, c2);
    }
}

TEST(Xts, ShortFragmentIsEcbPadOfTweakWithFF) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher x(key.data());
    uint64_t unit = 0x0102030405060708ull;
    uint8_t block[16] = {0};
    for (int i = 0; i < 8; i++) block[i] = static_cast<uint8_t>(unit >> (8 * i));
    block[15] = 0xFF;
    uint8_t pad[16];
    int outl = 0;
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    ASSERT_TRUE(EVP_EncryptInit_ex(c, EVP_aes_256_ecb(), nullptr, key.data(), nullptr));
    EVP_CIPHER_CTX_set_padding(c, 0);
    ASSERT_TRUE(EVP_EncryptUpdate(c, pad, &outl, block, 16));
    EVP_CIPHER_CTX_free(c);
    std::vector<uint8_t> pt = random_bytes(15), ct(15);
    x.encrypt(unit, pt.data(), ct.data(), 15);
    for (size_t i = 0; i < 15; i++) EXPECT_EQ(ct[i], pt[i] ^ pad[i]);
}

// cipher_stats() (issue 20): every byte through the cipher is counted once, each
// thread's count reaches the totals it was told within kCipherCountBatch bytes, a
// refused call counts nothing, and a child of fork does not count its parent's bytes.
TEST(Xts, CountsWhatItCiphersInTheTotalsNamed) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher x(key.data());
    std::vector<uint8_t> page = random_bytes(kUnitSize), out(kUnitSize);
    CipherCounts c0 = cipher_counts();
    for (uint64_t u = 0; u < 3; u++) x.encrypt(u, page.data(), out.data(), kUnitSize);
    x.encrypt(7, page.data(), out.data(), 15);
    for (uint64_t u = 0; u < 2; u++) x.decrypt(u, page.data(), out.data(), kUnitSize);
    uint8_t b[16] = {0};
    EXPECT_THROW(x.encrypt(0, b, b, 0), CryptoError);
    CipherCounts c1 = cipher_counts();
    EXPECT_EQ(c1.encrypted - c0.encrypted, 3 * kUnitSize + 15);
    EXPECT_EQ(c1.decrypted - c0.decrypted, 2 * kUnitSize);

    std::atomic<uint64_t> enc{0}, dec{0};
    set_cipher_count_totals(&enc, &dec);
    uint64_t pending = cipher_counts().encrypted - enc.load();
    ASSERT_LT(pending, kCipherCountBatch);
    size_t units = kCipherCountBatch / kUnitSize;
    for (uint64_t u = 0; u < units; u++) x.encrypt(u, page.data(), out.data(), kUnitSize);
    EXPECT_GE(enc.load(), kCipherCountBatch);
    EXPECT_EQ(cipher_counts().encrypted, pending + units * kUnitSize);
    EXPECT_LT(cipher_counts().encrypted - enc.load(), kCipherCountBatch);
    EXPECT_EQ(dec.load(), 0u);

    x.encrypt(0, page.data(), out.data(), kUnitSize);  // some pending in this thread
    ASSERT_GT(cipher_counts().encrypted, enc.load());
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) _exit(cipher_counts().encrypted == enc.load() ? 0 : 1);
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child counted its parent's bytes";

    // What a process has pending reaches the totals when it exits: here totals in
    // memory the child shares with its parent.
    void* shared = mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(shared, MAP_FAILED);
    auto* totals = new (shared) std::atomic<uint64_t>[2]{};
    pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        set_cipher_count_totals(&totals[0], &totals[1]);
        x.encrypt(1, page.data(), out.data(), kUnitSize);
        x.decrypt(1, page.data(), out.data(), 100);
        std::exit(0);  // atexit handlers run, as in a backend's proc_exit
    }
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_EQ(totals[0].load(), kUnitSize);
    EXPECT_EQ(totals[1].load(), 100u);
    munmap(shared, 4096);
    set_cipher_count_totals(nullptr, nullptr);
}

// encrypt_from: the tail of a unit from any block gives the bytes the whole unit's
// encryption has there (the WAL's partly rewritten last page, cipher_io.cpp), on
// pages of random bytes, at unit numbers small and large; decrypting the whole unit
// gives the page back. A cipher that is not seekable refuses.
TEST(Xts, EncryptFromAnyBlockMatchesTheWholeUnit) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher x(key.data(), true);
    for (uint64_t unit : {uint64_t(0), uint64_t(1), uint64_t(2047), uint64_t(0x0123456789abcdefull)}) {
        std::vector<uint8_t> page = random_bytes(kUnitSize), whole(kUnitSize);
        x.encrypt(unit, page.data(), whole.data(), kUnitSize);
        for (size_t b = 0; b < kUnitSize / 16; b++) {
            std::vector<uint8_t> tail(kUnitSize - 16 * b);
            x.encrypt_from(unit, b, page.data() + 16 * b, tail.data(), tail.size());
            ASSERT_EQ(0, std::memcmp(tail.data(), whole.data() + 16 * b, tail.size())) << "unit " << unit << " block " << b;
        }
        std::vector<uint8_t> mixed(whole.begin(), whole.begin() + 16 * 300);
        mixed.resize(kUnitSize);
        x.encrypt_from(unit, 300, page.data() + 16 * 300, mixed.data() + 16 * 300, kUnitSize - 16 * 300);
        x.decrypt(unit, mixed.data(), mixed.data(), kUnitSize);
        EXPECT_EQ(mixed, page);
    }
    // A tail shorter than one block is refused, and so is a cipher that is not seekable.
    std::vector<uint8_t> b(16);
    EXPECT_THROW(x.encrypt_from(0, 3, b.data(), b.data(), 15), CryptoError);
    XtsCipher plain(key.data());
    EXPECT_THROW(plain.encrypt_from(0, 1, b.data(), b.data(), 16), CryptoError);
}

TEST(Xts, RejectsBadLengths) {
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher x(key.data());
    uint8_t b[16] = {0};
    EXPECT_THROW(x.encrypt(0, b, b, 0), CryptoError);
    std::vector<uint8_t> big((size_t(16) << 20) + 16);
    EXPECT_THROW(x.encrypt(0, big.data(), big.data(), big.size()), CryptoError);
    std::vector<uint8_t> max(size_t(16) << 20);
    EXPECT_NO_THROW(x.encrypt(0, max.data(), max.data(), max.size()));
}

// GCM spec (McGrew & Viega, "The Galois/Counter Mode of Operation"), Test Case 16:
// AES-256, 96-bit IV, 60-byte plaintext, 20-byte AAD.
namespace gcm16 {
const char* K = "feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308";
const char* P =
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39";
const char* A = "feedfacedeadbeeffeedfacedeadbeefabaddad2";
const char* IV = "cafebabefacedbaddecaf888";
const char* C =
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662";
const char* T = "76fc6ece0f4e1768cddf8853bb2d551b";
}  // namespace gcm16

namespace {
// Reference AES-256-GCM straight on EVP: returns ct || tag.
std::vector<uint8_t> evp_gcm(const std::vector<uint8_t>& key, const std::vector<uint8_t>& iv,
                             const std::vector<uint8_t>& pt, const std::string& aad) {
    EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
    std::vector<uint8_t> out(pt.size() + 16);
    int outl = 0;
    EXPECT_TRUE(EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), nullptr, nullptr, nullptr));
    EXPECT_TRUE(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(iv.size()), nullptr));
    EXPECT_TRUE(EVP_EncryptInit_ex(c, nullptr, nullptr, key.data(), iv.data()));
    EXPECT_TRUE(EVP_EncryptUpdate(c, nullptr, &outl, reinterpret_cast<const uint8_t*>(aad.data()),
                                  static_cast<int>(aad.size())));
    EXPECT_TRUE(EVP_EncryptUpdate(c, out.data(), &outl, pt.data(), static_cast<int>(pt.size())));
    EXPECT_TRUE(EVP_EncryptFinal_ex(c, out.data() + outl, &outl));
    EXPECT_TRUE(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, out.data() + pt.size()));
    EVP_CIPHER_CTX_free(c);
    return out;
}
std::string as_str(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
}  // namespace

TEST(Aead, GcmTestCase16ViaEvpAndOurOpen) {
    auto k = unhex(gcm16::K), p = unhex(gcm16::P), a = unhex(gcm16::A), iv = unhex(gcm16::IV);
    auto c = unhex(gcm16::C), t = unhex(gcm16::T);
    std::vector<uint8_t> ct_tag = c;
    ct_tag.insert(ct_tag.end(), t.begin(), t.end());
    EXPECT_EQ(evp_gcm(k, iv, p, as_str(a)), ct_tag);  // the vector itself, on EVP
    std::vector<uint8_t> blob = iv;                    // our layout: nonce || ct || tag
    blob.insert(blob.end(), ct_tag.begin(), ct_tag.end());
    SecureBytes pt = aead_open(k.data(), blob.data(), blob.size(), as_str(a));
    EXPECT_EQ(std::vector<uint8_t>(pt.data(), pt.data() + pt.size()), p);
}

TEST(Aead, SealLayoutMatchesEvp) {
    auto k = unhex(gcm16::K), p = unhex(gcm16::P);
    std::string aad = "some context";
    std::vector<uint8_t> blob = aead_seal(k.data(), p.data(), p.size(), aad);
    ASSERT_EQ(blob.size(), 12 + p.size() + 16);
    std::vector<uint8_t> nonce(blob.begin(), blob.begin() + 12);
    std::vector<uint8_t> rest(blob.begin() + 12, blob.end());
    EXPECT_EQ(evp_gcm(k, nonce, p, aad), rest);
    // fresh nonce every time
    std::vector<uint8_t> blob2 = aead_seal(k.data(), p.data(), p.size(), aad);
    EXPECT_NE(std::vector<uint8_t>(blob2.begin(), blob2.begin() + 12), nonce);
}

TEST(Aead, TamperDetection) {
    SecureBytes key = random_key(32);
    std::vector<uint8_t> pt = random_bytes(64);
    std::string aad = std::string("cmk_lakebase dek v1\0", 20) + "1" + std::string(1, '\0') + "base/5/1";
    std::vector<uint8_t> blob = aead_seal(key.data(), pt.data(), pt.size(), aad);
    SecureBytes ok = aead_open(key.data(), blob.data(), blob.size(), aad);
    ASSERT_EQ(ok.size(), pt.size());
    EXPECT_EQ(0, std::memcmp(ok.data(), pt.data(), pt.size()));
    for (size_t pos : {size_t(0), size_t(11), size_t(12), size_t(40), size_t(12 + 63), blob.size() - 16,
                       blob.size() - 1}) {
        SCOPED_TRACE("flipped byte " + std::to_string(pos));
        std::vector<uint8_t> bad = blob;
        bad[pos] ^= 0x01;
        EXPECT_THROW(aead_open(key.data(), bad.data(), bad.size(), aad), CryptoError);
    }
    std::string aad2 = aad;
    aad2.back() = '2';
    EXPECT_THROW(aead_open(key.data(), blob.data(), blob.size(), aad2), CryptoError);
    EXPECT_THROW(aead_open(key.data(), blob.data(), blob.size(), ""), CryptoError);
    SecureBytes other = random_key(32);
    EXPECT_THROW(aead_open(other.data(), blob.data(), blob.size(), aad), CryptoError);
    EXPECT_THROW(aead_open(key.data(), blob.data(), 27, aad), CryptoError);
    EXPECT_THROW(aead_open(key.data(), blob.data(), blob.size() - 1, aad), CryptoError);
}

TEST(Aead, EmptyPlaintext) {
    SecureBytes key = random_key(32);
    std::vector<uint8_t> blob = aead_seal(key.data(), nullptr, 0, "x");
    EXPECT_EQ(blob.size(), 28u);
    EXPECT_EQ(aead_open(key.data(), blob.data(), blob.size(), "x").size(), 0u);
}

TEST(Mac, HmacSha256Rfc4231Case2) {
    const char* key = "Jefe";
    const char* data = "what do ya want for nothing?";
    auto mac = hmac_sha256(reinterpret_cast<const uint8_t*>(key), 4, data, std::strlen(data));
    EXPECT_EQ(hex_encode(mac.data(), mac.size()),
              "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(Kdf, HkdfSha256Rfc5869Case3) {
    std::vector<uint8_t> ikm(22, 0x0b);
    SecureBytes okm = hkdf_sha256(ikm.data(), ikm.size(), "", 42);
    EXPECT_EQ(hex_encode(okm.data(), okm.size()),
              "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
    SecureBytes a = hkdf_sha256(ikm.data(), ikm.size(), "a", 64);
    SecureBytes b = hkdf_sha256(ikm.data(), ikm.size(), "b", 64);
    EXPECT_NE(hex_encode(a.data(), 64), hex_encode(b.data(), 64));
}

TEST(Fingerprint, StableDistinctAndIsTheDocumentedHmac) {
    SecureBytes k1 = random_key(32), k2 = random_key(32);
    std::string f1 = key_fingerprint(k1.data(), k1.size());
    EXPECT_EQ(f1.size(), 32u);
    EXPECT_EQ(f1, key_fingerprint(k1.data(), k1.size()));
    SecureBytes k1c = k1.clone();
    EXPECT_EQ(f1, key_fingerprint(k1c.data(), k1c.size()));
    EXPECT_NE(f1, key_fingerprint(k2.data(), k2.size()));
    const char label[] = "cmk_lakebase key fingerprint v1";
    auto mac = hmac_sha256(k1.data(), k1.size(), label, sizeof label - 1);
    EXPECT_EQ(f1, hex_encode(mac.data(), 16));
    // known value: the all-zero 32-byte key
    std::vector<uint8_t> zero(32, 0);
    auto zmac = hmac_sha256(zero.data(), 32, label, sizeof label - 1);
    EXPECT_EQ(key_fingerprint(zero.data(), 32), hex_encode(zmac.data(), 16));
}

TEST(Encoding, Hex) {
    uint8_t b[] = {0x00, 0x01, 0xab, 0xff};
    EXPECT_EQ(hex_encode(b, 4), "0001abff");
    EXPECT_EQ(hex_encode(b, 0), "");
}

TEST(Encoding, Base64Rfc4648) {
    std::vector<std::pair<std::string, std::string>> v = {{"", ""},         {"f", "Zg=="},     {"fo", "Zm8="},
                                                          {"foo", "Zm9v"},  {"foob", "Zm9vYg=="}, {"fooba", "Zm9vYmE="},
                                                          {"foobar", "Zm9vYmFy"}};
    for (const auto& p : v) {
        EXPECT_EQ(base64_encode(p.first.data(), p.first.size()), p.second);
        auto d = base64_decode(p.second);
        EXPECT_EQ(std::string(d.begin(), d.end()), p.first);
        std::string url = p.second;
        while (!url.empty() && url.back() == '=') url.pop_back();
        EXPECT_EQ(base64url_encode(p.first.data(), p.first.size()), url);
        auto du = base64url_decode(url);
        EXPECT_EQ(std::string(du.begin(), du.end()), p.first);
    }
    uint8_t special[] = {0xfb, 0xff, 0xbf};
    EXPECT_EQ(base64_encode(special, 3), "+/+/");
    EXPECT_EQ(base64url_encode(special, 3), "-_-_");
    for (size_t n = 0; n < 300; n++) {
        std::vector<uint8_t> r = random_bytes(n);
        EXPECT_EQ(base64_decode(base64_encode(r.data(), n)), r);
        EXPECT_EQ(base64url_decode(base64url_encode(r.data(), n)), r);
    }
}

TEST(Encoding, Base64Rejects) {
    for (const char* bad : {"Zg=", "Zg", "Zm9v!A==", "Zh==", "=Zg=", "Zg==Zg==", "Zm9", "Zm9v YmFy", "Zg===",
                            "-_-_", "Zm8=\n"}) {
        SCOPED_TRACE(bad);
        EXPECT_THROW(base64_decode(bad), CryptoError);
    }
    for (const char* bad : {"Zg==", "+/+/", "Z", "Zh", "Zm9v!", "Zm8="}) {
        SCOPED_TRACE(bad);
        EXPECT_THROW(base64url_decode(bad), CryptoError);
    }
}

TEST(Crc32c, KnownValueAndChaining) {
    EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
    EXPECT_EQ(crc32c("", 0), 0u);
    uint32_t part = crc32c("12345", 5);
    EXPECT_EQ(crc32c("6789", 4, part), 0xE3069283u);
}

TEST(Misc, CtEqualAndRandomId) {
    EXPECT_TRUE(ct_equal("abc", "abc", 3));
    EXPECT_FALSE(ct_equal("abc", "abd", 3));
    std::set<std::string> ids;
    for (int i = 0; i < 100; i++) {
        std::string id = random_id();
        EXPECT_EQ(id.size(), 32u);
        EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos);
        ids.insert(id);
    }
    EXPECT_EQ(ids.size(), 100u);
}

TEST(SecureMemory, ZeroedMovableCloneWipe) {
    SecureBytes a(40);
    ASSERT_EQ(a.size(), 40u);
    for (size_t i = 0; i < a.size(); i++) EXPECT_EQ(a.data()[i], 0);
    std::memset(a.data(), 0x5a, 40);
    SecureBytes b = a.clone();
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), 40));
    EXPECT_NE(a.data(), b.data());
    SecureBytes c(std::move(a));
    EXPECT_TRUE(a.empty());
    EXPECT_EQ(c.size(), 40u);
    c = std::move(b);
    EXPECT_TRUE(b.empty());
    EXPECT_EQ(c.data()[39], 0x5a);
    c.wipe();
    EXPECT_TRUE(c.empty());
    EXPECT_EQ(c.data(), nullptr);
    SecureBytes empty;
    EXPECT_TRUE(empty.empty());
    SecureBytes e2 = empty.clone();
    EXPECT_TRUE(e2.empty());
    (void)secure_memory_lock_failed();
    EXPECT_EQ(random_key(64).size(), 64u);
}

// Released one-page buffers are reused (no mmap per key): a reused buffer must come
// back zero-filled, whatever the previous owner held, also in a forked child (which
// drops the parent's cached pages: its copies are not locked).
TEST(SecureBytes, ReusedPagesComeBackZeroed) {
    const uint8_t* first;
    {
        SecureBytes a(64);
        std::memset(a.data(), 0xA5, a.size());
        first = a.data();
    }
    bool reused = false;
    for (int i = 0; i < 4; i++) {
        SecureBytes b(64);
        reused = reused || b.data() == first;
        for (size_t j = 0; j < b.size(); j++) ASSERT_EQ(b.data()[j], 0) << j;
        std::memset(b.data(), 0x5A, b.size());
    }
    EXPECT_TRUE(reused) << "a released page should be taken again";
    SecureBytes big(10000);  // more than a page: mapped for itself
    for (size_t j = 0; j < big.size(); j++) ASSERT_EQ(big.data()[j], 0);
    { SecureBytes c(32); std::memset(c.data(), 0x77, 32); }
    pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        SecureBytes d(32);
        bool zero = true;
        for (size_t j = 0; j < d.size(); j++) zero = zero && d.data()[j] == 0;
        _exit(zero ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}
