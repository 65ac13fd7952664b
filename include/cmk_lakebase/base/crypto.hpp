// Crypto core: the page cipher (AES-256-XTS per 8 KiB unit), the AEAD that wraps
// keys (AES-256-GCM with associated data), secure key memory, fingerprints and small
// encoding helpers. Pure C++ on OpenSSL EVP; knows nothing of PostgreSQL or files.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"

namespace cmk {

// Authentication failures (tampered or wrong-key blobs, bad encodings) are Damaged.
struct CryptoError : Error {
    explicit CryptoError(const std::string& m) : Error(ErrorCategory::Damaged, m) {}
};

// Key memory: page-aligned, mlock()ed where the rlimit allows, excluded from core
// dumps (MADV_DONTDUMP), wiped with OPENSSL_cleanse when released. Move-only.
class SecureBytes {
public:
    SecureBytes() = default;
    explicit SecureBytes(size_t n);  // zero-filled
    SecureBytes(const uint8_t* p, size_t n);
    ~SecureBytes();
    SecureBytes(SecureBytes&& o) noexcept;
    SecureBytes& operator=(SecureBytes&& o) noexcept;
    SecureBytes(const SecureBytes&) = delete;
    SecureBytes& operator=(const SecureBytes&) = delete;

    SecureBytes clone() const;
    uint8_t* data() { return p_; }
    const uint8_t* data() const { return p_; }
    size_t size() const { return n_; }
    bool empty() const { return n_ == 0; }
    void wipe();  // cleanse and release now

private:
    uint8_t* p_ = nullptr;
    size_t n_ = 0;
    size_t mapped_ = 0;
};

// True if mlock() of key memory has failed at least once in this process (e.g.
// RLIMIT_MEMLOCK too small); key memory is then still excluded from core dumps.
bool secure_memory_lock_failed();

void random_fill(uint8_t* p, size_t n);  // OpenSSL RAND_bytes; throws CryptoError
std::vector<uint8_t> random_bytes(size_t n);
SecureBytes random_key(size_t n);

constexpr size_t kUnitSize = 8192;   // data unit: one PostgreSQL page / WAL page
constexpr size_t kXtsKeySize = 64;   // AES-256-XTS: two 256-bit keys
constexpr size_t kKekSize = 32;      // AES-256-GCM key-encryption key

// AES-256-XTS bound to one 64-byte key. The tweak is the unit number (little-endian
// in the first 8 bytes of the 16-byte tweak). Units of 16 bytes or more use XTS with
// ciphertext stealing; fragments shorter than 16 bytes (only at the end of
// odd-length files) are XORed with an AES keystream block derived from the unit
// number (documented limitation: such a fragment rewritten in place reuses its pad).
// Not thread-safe: one instance per thread or an external lock.
class XtsCipher {
public:
    // seekable: also keys the two AES-256-ECB contexts of the second key half that
    // encrypt_from needs (WAL segment keys only: two more key schedules per key).
    explicit XtsCipher(const uint8_t* key64, bool seekable = false);
    ~XtsCipher();
    XtsCipher(const XtsCipher&) = delete;
    XtsCipher& operator=(const XtsCipher&) = delete;

    // in and out may be the same buffer; len >= 1 and <= 16 MiB.
    void encrypt(uint64_t unit, const uint8_t* in, uint8_t* out, size_t len);
    void decrypt(uint64_t unit, const uint8_t* in, uint8_t* out, size_t len);

    // The tail of a unit: encrypts the len bytes that begin at 16-byte block `block` of
    // unit `unit` (in and out point at that block) into exactly the bytes encrypt()
    // gives there for the whole unit. XTS enciphers each block on its own under the
    // tweak E_K2(unit) * alpha^block, so a tail can start with that tweak: the IV
    // handed to OpenSSL is D_K2(E_K2(unit) * alpha^block). len >= 16; a seekable
    // cipher only (throws CryptoError otherwise).
    void encrypt_from(uint64_t unit, size_t block, const uint8_t* in, uint8_t* out, size_t len);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

// What XtsCipher has enciphered and deciphered (bytes, units and fragments alike): a
// count for operators and the benchmark (how much cipher work a workload made), never
// used for a decision. Each thread counts on its own and adds its count to the totals
// once it reaches kCipherCountBatch bytes, so a total lags by at most that much per
// thread that ever ran the cipher. The totals are this process's own, or the ones
// set_cipher_count_totals names (a server's processes share theirs in shared memory).
struct CipherCounts {
    uint64_t encrypted = 0;
    uint64_t decrypted = 0;
};
constexpr uint64_t kCipherCountBatch = 256 * 1024;
void set_cipher_count_totals(std::atomic<uint64_t>* encrypted, std::atomic<uint64_t>* decrypted);
// The totals, plus what the calling thread has not added yet.
CipherCounts cipher_counts();

// AEAD (AES-256-GCM). Output blob = 12-byte nonce || ciphertext || 16-byte tag.
// aad binds the blob to its context (e.g. the file identity of a DEK).
std::vector<uint8_t> aead_seal(const uint8_t* key32, const uint8_t* pt, size_t n,
                               const std::string& aad);
// Throws CryptoError if the blob was tampered with, the aad differs or the key is wrong.
SecureBytes aead_open(const uint8_t* key32, const uint8_t* blob, size_t n, const std::string& aad);

std::array<uint8_t, 32> sha256(const void* data, size_t n);  // not for secrets: checksums
std::array<uint8_t, 32> hmac_sha256(const uint8_t* key, size_t keylen, const void* data, size_t n);
SecureBytes hkdf_sha256(const uint8_t* ikm, size_t ikmlen, const std::string& info, size_t outlen);

// Fingerprint of a key: first 16 bytes of HMAC-SHA256(key, fixed label), hex.
// A PRF output: reveals nothing about the key, stable across processes.
std::string key_fingerprint(const uint8_t* key, size_t n);

bool ct_equal(const void* a, const void* b, size_t n);  // constant time

std::string hex_encode(const void* p, size_t n);
std::string base64_encode(const void* p, size_t n);
std::vector<uint8_t> base64_decode(const std::string& s);  // throws CryptoError
std::string base64url_encode(const void* p, size_t n);     // no padding
std::vector<uint8_t> base64url_decode(const std::string& s);

uint32_t crc32c(const void* p, size_t n, uint32_t crc = 0);

// 16-byte random identifier as lower-case hex (cluster ids, request ids).
std::string random_id();

}  // namespace cmk
