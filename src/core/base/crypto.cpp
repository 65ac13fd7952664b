// Crypto core (crypto.hpp): secure key memory, the AES-256-XTS page cipher, the
// AES-256-GCM AEAD that wraps keys, HMAC/HKDF, fingerprints and encodings. Everything
// goes through OpenSSL 3 EVP with algorithms fetched once per process: the page cipher
// runs on every buffer miss and every WAL write, so a per-call implicit fetch (a
// global lock and a property query) would cost more than the AES itself. Every keyed
// context is created and keyed inside a KeyArenaScope (key_arena.hpp), so its key
// schedule lives in the key arena (no core dump, wiped on free), not on the heap.
#include "cmk_lakebase/base/crypto.hpp"

#include "cmk_lakebase/base/key_arena.hpp"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace cmk {
namespace {

std::atomic<bool> g_mlock_failed{false};

[[noreturn]] void fail(const std::string& what) {
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    std::string msg = what;
    if (e != 0) {
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        msg += ": ";
        msg += buf;
    }
    throw CryptoError(msg);
}

struct CtxFree {
    void operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }
};
using CtxPtr = std::unique_ptr<EVP_CIPHER_CTX, CtxFree>;
struct KdfCtxFree {
    void operator()(EVP_KDF_CTX* k) const { EVP_KDF_CTX_free(k); }
};

// Process-wide fetched algorithms (never freed: they live as long as libcrypto).
const EVP_CIPHER* fetch_cipher(const char* name) {
    EVP_CIPHER* c = EVP_CIPHER_fetch(nullptr, name, nullptr);
    if (!c) fail(std::string("cannot fetch cipher ") + name);
    return c;
}
const EVP_CIPHER* xts_cipher() {
    static const EVP_CIPHER* c = fetch_cipher("AES-256-XTS");
    return c;
}
const EVP_CIPHER* ecb_cipher() {
    static const EVP_CIPHER* c = fetch_cipher("AES-256-ECB");
    return c;
}
const EVP_CIPHER* gcm_cipher() {
    static const EVP_CIPHER* c = fetch_cipher("AES-256-GCM");
    return c;
}

CtxPtr new_ctx() {
    CtxPtr c(EVP_CIPHER_CTX_new());
    if (!c) fail("EVP_CIPHER_CTX_new failed");
    return c;
}

constexpr size_t kGcmNonce = 12;
constexpr size_t kGcmTag = 16;
constexpr size_t kMaxXtsLen = size_t(16) << 20;

}  // namespace

// ---------------------------------------------------------------- SecureBytes

namespace {

// Released one-page buffers, already wiped, kept mapped, locked and out of core dumps
// for the next SecureBytes: a key unwrapped for every file a process opens cost five
// system calls (mmap, madvise, mlock, munlock, munmap, the last with a TLB flush)
// each time. A forked child drops them (its copies are not locked: mlock is not
// inherited).
struct PageCache {
    std::mutex mu;
    std::vector<uint8_t*> pages;
};
constexpr size_t kCachedPages = 32;
PageCache& page_cache() {
    static PageCache* c = new PageCache;  // never destroyed: used from exit paths
    return *c;
}
size_t page_size() {
    static const size_t page = [] {
        long pg = sysconf(_SC_PAGESIZE);
        return pg > 0 ? static_cast<size_t>(pg) : size_t(4096);
    }();
    return page;
}
void cache_prepare() { page_cache().mu.lock(); }
void cache_parent() { page_cache().mu.unlock(); }
void cache_child() {
    PageCache& c = page_cache();
    for (uint8_t* p : c.pages) munmap(p, page_size());
    c.pages.clear();
    c.mu.unlock();
}
std::once_flag g_cache_atfork;

uint8_t* cached_page() {
    std::call_once(g_cache_atfork, [] { pthread_atfork(cache_prepare, cache_parent, cache_child); });
    PageCache& c = page_cache();
    std::lock_guard<std::mutex> g(c.mu);
    if (c.pages.empty()) return nullptr;
    uint8_t* p = c.pages.back();
    c.pages.pop_back();
    return p;
}
// Takes a wiped page back; false when the cache is full.
bool cache_page(uint8_t* p) {
    PageCache& c = page_cache();
    std::lock_guard<std::mutex> g(c.mu);
    if (c.pages.size() >= kCachedPages) return false;
    c.pages.push_back(p);
    return true;
}

}  // namespace

SecureBytes::SecureBytes(size_t n) {
    if (n == 0) return;
    const size_t page = page_size();
    if (n > std::numeric_limits<size_t>::max() - page) throw CryptoError("key buffer too large");
    size_t len = (n + page - 1) / page * page;
    if (len == page) {
        if (uint8_t* p = cached_page()) {  // wiped when it was released: all zeros
            p_ = p;
            n_ = n;
            mapped_ = len;
            return;
        }
    }
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw CryptoError("cannot allocate secure key memory");
    // Excluded from core dumps whatever happens with mlock below.
    (void)madvise(p, len, MADV_DONTDUMP);
    if (mlock(p, len) != 0) g_mlock_failed.store(true, std::memory_order_relaxed);
    p_ = static_cast<uint8_t*>(p);
    n_ = n;
    mapped_ = len;
}

SecureBytes::SecureBytes(const uint8_t* p, size_t n) : SecureBytes(n) {
    if (n) std::memcpy(p_, p, n);
}

SecureBytes::~SecureBytes() { wipe(); }

SecureBytes::SecureBytes(SecureBytes&& o) noexcept : p_(o.p_), n_(o.n_), mapped_(o.mapped_) {
    o.p_ = nullptr;
    o.n_ = 0;
    o.mapped_ = 0;
}

SecureBytes& SecureBytes::operator=(SecureBytes&& o) noexcept {
    if (this != &o) {
        wipe();
        p_ = o.p_;
        n_ = o.n_;
        mapped_ = o.mapped_;
        o.p_ = nullptr;
        o.n_ = 0;
        o.mapped_ = 0;
    }
    return *this;
}

SecureBytes SecureBytes::clone() const { return SecureBytes(p_, n_); }

void SecureBytes::wipe() {
    if (p_) {
        OPENSSL_cleanse(p_, mapped_);
        if (mapped_ != page_size() || !cache_page(p_)) {
            munlock(p_, mapped_);
            munmap(p_, mapped_);
        }
    }
    p_ = nullptr;
    n_ = 0;
    mapped_ = 0;
}

bool secure_memory_lock_failed() { return g_mlock_failed.load(std::memory_order_relaxed); }

// ---------------------------------------------------------------- randomness

void random_fill(uint8_t* p, size_t n) {
    while (n > 0) {
        int chunk = n > (1u << 30) ? (1 << 30) : static_cast<int>(n);
        if (RAND_bytes(p, chunk) != 1) fail("RAND_bytes failed");
        p += chunk;
        n -= chunk;
    }
}

std::vector<uint8_t> random_bytes(size_t n) {
    std::vector<uint8_t> v(n);
    if (n) random_fill(v.data(), n);
    return v;
}

SecureBytes random_key(size_t n) {
    SecureBytes k(n);
    if (n) random_fill(k.data(), n);
    return k;
}

// ---------------------------------------------------------------- XtsCipher

struct XtsCipher::Impl {
    CtxPtr enc;
    CtxPtr dec;
    CtxPtr pad;  // AES-256-ECB under the first XTS key half, for sub-block fragments
    CtxPtr tweak_enc, tweak_dec;  // AES-256-ECB under the second half (seekable only)
};

XtsCipher::XtsCipher(const uint8_t* key64, bool seekable) : impl_(new Impl) {
    // Fetched outside the scope: the process-wide algorithm objects need not be in
    // the arena. Inside it: the contexts and the provider contexts that newctx makes
    // in the first keyed EVP_CipherInit_ex2 (PROV_AES_XTS_CTX, PROV_AES_CTX: the key
    // schedules). Re-inits with only a tweak (xts_run) allocate nothing.
    const EVP_CIPHER* xts = xts_cipher();
    const EVP_CIPHER* ecb = ecb_cipher();
    KeyArenaScope in_arena;
    impl_->enc = new_ctx();
    impl_->dec = new_ctx();
    impl_->pad = new_ctx();
    if (EVP_CipherInit_ex2(impl_->enc.get(), xts, key64, nullptr, 1, nullptr) != 1)
        fail("cannot key AES-256-XTS");
    if (EVP_CipherInit_ex2(impl_->dec.get(), xts, key64, nullptr, 0, nullptr) != 1)
        fail("cannot key AES-256-XTS");
    if (EVP_CipherInit_ex2(impl_->pad.get(), ecb, key64, nullptr, 1, nullptr) != 1)
        fail("cannot key AES-256-ECB");
    EVP_CIPHER_CTX_set_padding(impl_->pad.get(), 0);
    if (seekable) {
        impl_->tweak_enc = new_ctx();
        impl_->tweak_dec = new_ctx();
        if (EVP_CipherInit_ex2(impl_->tweak_enc.get(), ecb, key64 + 32, nullptr, 1, nullptr) != 1 ||
            EVP_CipherInit_ex2(impl_->tweak_dec.get(), ecb, key64 + 32, nullptr, 0, nullptr) != 1)
            fail("cannot key AES-256-ECB");
        EVP_CIPHER_CTX_set_padding(impl_->tweak_enc.get(), 0);
        EVP_CIPHER_CTX_set_padding(impl_->tweak_dec.get(), 0);
    }
}

XtsCipher::~XtsCipher() = default;  // EVP_CIPHER_CTX_free cleanses the key schedules

namespace {

void xts_run(EVP_CIPHER_CTX* ctx, EVP_CIPHER_CTX* pad, int enc, uint64_t unit,
             const uint8_t* in, uint8_t* out, size_t len) {
    if (len == 0 || len > kMaxXtsLen) throw CryptoError("XTS length out of range");
    uint8_t iv[16] = {0};
    for (int i = 0; i < 8; i++) iv[i] = static_cast<uint8_t>(unit >> (8 * i));
    if (len < 16) {
        // XTS cannot process less than one block. Such fragments only occur at the end
        // of odd-length files: XOR them with a pad E_K1(tweak with byte 15 = 0xFF).
        // Byte 15 of a real XTS tweak is always 0 here (64-bit unit numbers), so the
        // pad block is never an input block of the XTS tweak chain. Length-preserving
        // but not XTS: rewriting such a fragment in place reuses its pad (documented).
        iv[15] = 0xFF;
        uint8_t ks[16];
        int outl = 0;
        if (EVP_EncryptUpdate(pad, ks, &outl, iv, 16) != 1 || outl != 16) {
            OPENSSL_cleanse(ks, sizeof ks);
            fail("AES-256-ECB failed");
        }
        for (size_t i = 0; i < len; i++) out[i] = in[i] ^ ks[i];
        OPENSSL_cleanse(ks, sizeof ks);
        return;
    }
    // Only the tweak changes per call: the key schedule stays in the context.
    if (EVP_CipherInit_ex2(ctx, nullptr, nullptr, iv, enc, nullptr) != 1) fail("XTS re-init failed");
    int outl = 0;
    if (EVP_CipherUpdate(ctx, out, &outl, in, static_cast<int>(len)) != 1 ||
        static_cast<size_t>(outl) != len)
        fail("AES-256-XTS failed");
}

// cipher_counts(): this thread's bytes not yet added to the totals, and the totals.
std::atomic<uint64_t> g_own_encrypted{0}, g_own_decrypted{0};
std::atomic<std::atomic<uint64_t>*> g_total_encrypted{&g_own_encrypted}, g_total_decrypted{&g_own_decrypted};
thread_local uint64_t t_pending_encrypted = 0, t_pending_decrypted = 0;

void add_pending() {
    g_total_encrypted.load(std::memory_order_relaxed)->fetch_add(t_pending_encrypted, std::memory_order_relaxed);
    g_total_decrypted.load(std::memory_order_relaxed)->fetch_add(t_pending_decrypted, std::memory_order_relaxed);
    t_pending_encrypted = t_pending_decrypted = 0;
}

void count_cipher(uint64_t& pending, const std::atomic<std::atomic<uint64_t>*>& total, size_t len) {
    // A child of fork starts with its parent's pending count, which the parent adds
    // itself: forget it there. A process that exits adds what its exiting thread has
    // (a server's backends end with exit(), a tool returns from main).
    static const bool hooked = (::pthread_atfork(nullptr, nullptr, [] {
                                    t_pending_encrypted = 0;
                                    t_pending_decrypted = 0;
                                }) == 0) &&
                               (std::atexit(add_pending) == 0);
    (void)hooked;
    pending += len;
    if (pending >= kCipherCountBatch) {
        total.load(std::memory_order_relaxed)->fetch_add(pending, std::memory_order_relaxed);
        pending = 0;
    }
}

}  // namespace

void XtsCipher::encrypt(uint64_t unit, const uint8_t* in, uint8_t* out, size_t len) {
    xts_run(impl_->enc.get(), impl_->pad.get(), 1, unit, in, out, len);
    count_cipher(t_pending_encrypted, g_total_encrypted, len);
}

void XtsCipher::decrypt(uint64_t unit, const uint8_t* in, uint8_t* out, size_t len) {
    xts_run(impl_->dec.get(), impl_->pad.get(), 0, unit, in, out, len);
    count_cipher(t_pending_decrypted, g_total_decrypted, len);
}

namespace {
// t * x^s in GF(2^128) modulo x^128 + x^7 + x^2 + x + 1, for 0 < s <= 56, on the
// little-endian halves XTS uses: the s bits shifted out of the top come back
// multiplied by 0x87, which for s <= 56 stays within the low half.
void gf_shift(uint64_t& lo, uint64_t& hi, unsigned s) {
    uint64_t out = hi >> (64 - s);
    hi = (hi << s) | (lo >> (64 - s));
    lo = (lo << s) ^ out ^ (out << 1) ^ (out << 2) ^ (out << 7);
}
}  // namespace

void XtsCipher::encrypt_from(uint64_t unit, size_t block, const uint8_t* in, uint8_t* out, size_t len) {
    if (block == 0) return encrypt(unit, in, out, len);
    if (!impl_->tweak_enc) throw CryptoError("XTS cipher is not seekable");
    if (len < 16 || len > kMaxXtsLen || block > kMaxXtsLen / 16) throw CryptoError("XTS length out of range");
    uint8_t t[16] = {0};
    for (int i = 0; i < 8; i++) t[i] = static_cast<uint8_t>(unit >> (8 * i));
    int outl = 0;
    if (EVP_EncryptUpdate(impl_->tweak_enc.get(), t, &outl, t, 16) != 1 || outl != 16) {
        OPENSSL_cleanse(t, sizeof t);
        fail("AES-256-ECB failed");
    }
    uint64_t lo = 0, hi = 0;  // the tweak's bytes are little-endian
    for (int i = 7; i >= 0; i--) {
        lo = (lo << 8) | t[i];
        hi = (hi << 8) | t[8 + i];
    }
    for (size_t left = block; left > 0;) {
        unsigned s = static_cast<unsigned>(std::min<size_t>(left, 56));
        gf_shift(lo, hi, s);
        left -= s;
    }
    for (int i = 0; i < 8; i++) {
        t[i] = static_cast<uint8_t>(lo >> (8 * i));
        t[8 + i] = static_cast<uint8_t>(hi >> (8 * i));
    }
    lo = hi = 0;
    uint8_t iv[16];
    if (EVP_DecryptUpdate(impl_->tweak_dec.get(), iv, &outl, t, 16) != 1 || outl != 16) {
        OPENSSL_cleanse(t, sizeof t);
        OPENSSL_cleanse(iv, sizeof iv);
        fail("AES-256-ECB failed");
    }
    OPENSSL_cleanse(t, sizeof t);
    bool ok = EVP_CipherInit_ex2(impl_->enc.get(), nullptr, nullptr, iv, 1, nullptr) == 1;
    OPENSSL_cleanse(iv, sizeof iv);
    if (!ok) fail("XTS re-init failed");
    int n = 0;
    if (EVP_CipherUpdate(impl_->enc.get(), out, &n, in, static_cast<int>(len)) != 1 || static_cast<size_t>(n) != len)
        fail("AES-256-XTS failed");
    count_cipher(t_pending_encrypted, g_total_encrypted, len);
}

void set_cipher_count_totals(std::atomic<uint64_t>* encrypted, std::atomic<uint64_t>* decrypted) {
    g_total_encrypted.store(encrypted ? encrypted : &g_own_encrypted);
    g_total_decrypted.store(decrypted ? decrypted : &g_own_decrypted);
}

CipherCounts cipher_counts() {
    CipherCounts c;
    c.encrypted = g_total_encrypted.load()->load(std::memory_order_relaxed) + t_pending_encrypted;
    c.decrypted = g_total_decrypted.load()->load(std::memory_order_relaxed) + t_pending_decrypted;
    return c;
}

// ---------------------------------------------------------------- AEAD

std::vector<uint8_t> aead_seal(const uint8_t* key32, const uint8_t* pt, size_t n,
                               const std::string& aad) {
    if (n > static_cast<size_t>(std::numeric_limits<int>::max() - 64) ||
        aad.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
        throw CryptoError("AEAD input too large");
    std::vector<uint8_t> out(kGcmNonce + n + kGcmTag);
    random_fill(out.data(), kGcmNonce);
    const EVP_CIPHER* gcm = gcm_cipher();
    KeyArenaScope in_arena;  // the GCM context holds the key schedule while it lives
    CtxPtr ctx = new_ctx();
    if (EVP_EncryptInit_ex2(ctx.get(), gcm, key32, out.data(), nullptr) != 1)
        fail("AES-256-GCM init failed");
    int outl = 0;
    if (!aad.empty() &&
        EVP_EncryptUpdate(ctx.get(), nullptr, &outl,
                          reinterpret_cast<const unsigned char*>(aad.data()),
                          static_cast<int>(aad.size())) != 1)
        fail("AES-256-GCM aad failed");
    uint8_t* ct = out.data() + kGcmNonce;
    if (n && EVP_EncryptUpdate(ctx.get(), ct, &outl, pt, static_cast<int>(n)) != 1)
        fail("AES-256-GCM encrypt failed");
    int fin = 0;
    if (EVP_EncryptFinal_ex(ctx.get(), ct + n, &fin) != 1) fail("AES-256-GCM final failed");
    if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kGcmTag, ct + n) != 1)
        fail("AES-256-GCM tag failed");
    return out;
}

SecureBytes aead_open(const uint8_t* key32, const uint8_t* blob, size_t n, const std::string& aad) {
    if (n < kGcmNonce + kGcmTag) throw CryptoError("sealed blob too short");
    if (n > static_cast<size_t>(std::numeric_limits<int>::max() - 64) ||
        aad.size() > static_cast<size_t>(std::numeric_limits<int>::max()))
        throw CryptoError("AEAD input too large");
    size_t ctlen = n - kGcmNonce - kGcmTag;
    const EVP_CIPHER* gcm = gcm_cipher();
    SecureBytes pt(ctlen);
    KeyArenaScope in_arena;  // the GCM context holds the key schedule while it lives
    CtxPtr ctx = new_ctx();
    if (EVP_DecryptInit_ex2(ctx.get(), gcm, key32, blob, nullptr) != 1)
        fail("AES-256-GCM init failed");
    int outl = 0;
    if (!aad.empty() &&
        EVP_DecryptUpdate(ctx.get(), nullptr, &outl,
                          reinterpret_cast<const unsigned char*>(aad.data()),
                          static_cast<int>(aad.size())) != 1)
        fail("AES-256-GCM aad failed");
    if (ctlen && EVP_DecryptUpdate(ctx.get(), pt.data(), &outl, blob + kGcmNonce,
                                   static_cast<int>(ctlen)) != 1)
        fail("AES-256-GCM decrypt failed");
    uint8_t tag[kGcmTag];
    std::memcpy(tag, blob + kGcmNonce + ctlen, kGcmTag);
    if (EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kGcmTag, tag) != 1)
        fail("AES-256-GCM set tag failed");
    uint8_t dummy[16];
    int fin = 0;
    if (EVP_DecryptFinal_ex(ctx.get(), dummy, &fin) != 1) {
        ERR_clear_error();
        pt.wipe();  // never hand out unauthenticated plaintext
        throw CryptoError("authentication failed: the sealed data was modified, or the key or context is wrong");
    }
    return pt;
}

// ---------------------------------------------------------------- MAC, KDF

std::array<uint8_t, 32> hmac_sha256(const uint8_t* key, size_t keylen, const void* data, size_t n) {
    std::array<uint8_t, 32> out{};
    size_t outlen = 0;
    static const uint8_t empty = 0;
    KeyArenaScope in_arena;  // the HMAC context holds the key (or its padded digests)
    if (!EVP_Q_mac(nullptr, "HMAC", nullptr, "SHA256", nullptr, keylen ? key : &empty, keylen,
                   static_cast<const unsigned char*>(n ? data : &empty), n, out.data(), out.size(),
                   &outlen) ||
        outlen != out.size())
        fail("HMAC-SHA256 failed");
    return out;
}

std::array<uint8_t, 32> sha256(const void* data, size_t n) {
    std::array<uint8_t, 32> out{};
    unsigned int outlen = 0;
    static const uint8_t empty = 0;
    if (!EVP_Digest(n ? data : &empty, n, out.data(), &outlen, EVP_sha256(), nullptr) || outlen != out.size())
        fail("SHA-256 failed");
    return out;
}

SecureBytes hkdf_sha256(const uint8_t* ikm, size_t ikmlen, const std::string& info, size_t outlen) {
    static EVP_KDF* kdf = [] {
        EVP_KDF* k = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
        if (!k) fail("cannot fetch HKDF");
        return k;
    }();
    KeyArenaScope in_arena;  // the HKDF context keeps a copy of the input key
    std::unique_ptr<EVP_KDF_CTX, KdfCtxFree> kctx(EVP_KDF_CTX_new(kdf));
    if (!kctx) fail("EVP_KDF_CTX_new failed");
    char digest[] = "SHA256";
    OSSL_PARAM params[4];
    params[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, digest, 0);
    params[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY,
                                                  const_cast<uint8_t*>(ikm), ikmlen);
    params[2] = OSSL_PARAM_construct_octet_string(
        OSSL_KDF_PARAM_INFO, const_cast<char*>(info.data()), info.size());
    params[3] = OSSL_PARAM_construct_end();
    SecureBytes out(outlen);
    if (EVP_KDF_derive(kctx.get(), out.data(), outlen, params) != 1) fail("HKDF derive failed");
    return out;
}

std::string key_fingerprint(const uint8_t* key, size_t n) {
    static const char label[] = "cmk_lakebase key fingerprint v1";
    auto mac = hmac_sha256(key, n, label, sizeof label - 1);
    std::string fp = hex_encode(mac.data(), 16);
    OPENSSL_cleanse(mac.data(), mac.size());
    return fp;
}

bool ct_equal(const void* a, const void* b, size_t n) { return CRYPTO_memcmp(a, b, n) == 0; }

// ---------------------------------------------------------------- encodings

std::string hex_encode(const void* p, size_t n) {
    static const char digits[] = "0123456789abcdef";
    const uint8_t* b = static_cast<const uint8_t*>(p);
    std::string s(n * 2, '0');
    for (size_t i = 0; i < n; i++) {
        s[2 * i] = digits[b[i] >> 4];
        s[2 * i + 1] = digits[b[i] & 15];
    }
    return s;
}

namespace {

const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const char kB64Url[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

std::string b64_encode(const void* p, size_t n, const char* alpha, bool pad) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    std::string s;
    s.reserve((n + 2) / 3 * 4);
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t(b[i]) << 16) | (uint32_t(b[i + 1]) << 8) | b[i + 2];
        s += alpha[(v >> 18) & 63];
        s += alpha[(v >> 12) & 63];
        s += alpha[(v >> 6) & 63];
        s += alpha[v & 63];
    }
    size_t rest = n - i;
    if (rest == 1) {
        uint32_t v = uint32_t(b[i]) << 16;
        s += alpha[(v >> 18) & 63];
        s += alpha[(v >> 12) & 63];
        if (pad) s += "==";
    } else if (rest == 2) {
        uint32_t v = (uint32_t(b[i]) << 16) | (uint32_t(b[i + 1]) << 8);
        s += alpha[(v >> 18) & 63];
        s += alpha[(v >> 12) & 63];
        s += alpha[(v >> 6) & 63];
        if (pad) s += '=';
    }
    return s;
}

int b64_value(char c, bool url) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (!url && c == '+') return 62;
    if (!url && c == '/') return 63;
    if (url && c == '-') return 62;
    if (url && c == '_') return 63;
    return -1;
}

// Strict decoding: only the alphabet, canonical trailing bits, padding exactly as the
// encoder writes it (standard) or none at all (url).
std::vector<uint8_t> b64_decode(const std::string& in, bool url) {
    const char* what = url ? "invalid base64url" : "invalid base64";
    size_t n = in.size();
    size_t pads = 0;
    if (!url) {
        if (n % 4 != 0) throw CryptoError(std::string(what) + ": length is not a multiple of 4");
        while (pads < 2 && pads < n && in[n - 1 - pads] == '=') pads++;
    } else if (n % 4 == 1) {
        throw CryptoError(std::string(what) + ": impossible length");
    }
    size_t data = n - pads;
    std::vector<uint8_t> out;
    out.reserve(data * 3 / 4);
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < data; i++) {
        int v = b64_value(in[i], url);
        if (v < 0) throw CryptoError(std::string(what) + ": unexpected character at offset " + std::to_string(i));
        acc = (acc << 6) | static_cast<uint32_t>(v);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out.push_back(static_cast<uint8_t>(acc >> bits));
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0) throw CryptoError(std::string(what) + ": non-canonical trailing bits");
    return out;
}

}  // namespace

std::string base64_encode(const void* p, size_t n) { return b64_encode(p, n, kB64, true); }
std::vector<uint8_t> base64_decode(const std::string& s) { return b64_decode(s, false); }
std::string base64url_encode(const void* p, size_t n) { return b64_encode(p, n, kB64Url, false); }
std::vector<uint8_t> base64url_decode(const std::string& s) { return b64_decode(s, true); }

// ---------------------------------------------------------------- CRC32C

namespace {
struct Crc32cTable {
    uint32_t t[256];
    Crc32cTable() {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            t[i] = c;
        }
    }
};
}  // namespace

uint32_t crc32c(const void* p, size_t n, uint32_t crc) {
    static const Crc32cTable table;
    const uint8_t* b = static_cast<const uint8_t*>(p);
    uint32_t c = ~crc;
    for (size_t i = 0; i < n; i++) c = table.t[(c ^ b[i]) & 0xFF] ^ (c >> 8);
    return ~c;
}

std::string random_id() {
    uint8_t b[16];
    random_fill(b, sizeof b);
    return hex_encode(b, sizeof b);
}

}  // namespace cmk
