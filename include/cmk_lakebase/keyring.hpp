// The keyring: the cluster's key configuration and its KEK as the KMS returned it
// (wrapped by the CMK), stored in <datadir>/cmk_lakebase/keyring.json. Holds no
// secret: the wrapped KEK is the KMS's ciphertext, and a MAC keyed by the KEK makes
// any edit of the configuration detectable once the KEK is unwrapped.
// Replaced atomically (write, fsync, rename, fsync directory).
#pragma once

#include <string>
#include <vector>

#include "cmk_lakebase/crypto.hpp"
#include "cmk_lakebase/kms.hpp"

namespace cmk {

constexpr const char* kKeyringDirName = "cmk_lakebase";  // inside the data directory
constexpr const char* kKeyringFile = "keyring.json";
constexpr const char* kKeyMapFile = "keymap";
constexpr const char* kKeyMapLockFile = "keymap.lock";

struct KeyringError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Keyring {
    int format = 1;
    std::string cluster_id;   // random, also in the key map header
    KeyConfig config;         // provider, key id, options (no secrets)
    std::vector<uint8_t> wrapped_kek;
    std::string kek_version;  // CMK version that wrapped the KEK, if known
    std::string kek_fingerprint;
    uint32_t kek_generation = 1;  // bumped by KEK rotation
    std::string created_at;       // ISO 8601 UTC
    std::string mac;              // hex HMAC-SHA256(KEK, canonical fields)
};

// <datadir>/cmk_lakebase
std::string keyring_dir_for(const std::string& datadir);

// Throws KeyringError (missing: message says the directory is not encrypted by
// cmk_lakebase; damaged: says which field).
Keyring load_keyring(const std::string& dir);
bool keyring_exists(const std::string& dir);
void save_keyring(const std::string& dir, const Keyring& kr);  // atomic replace

// A new keyring: random KEK wrapped by the provider; MAC and fingerprint set.
// kek_out receives the plaintext KEK (secure memory).
Keyring create_keyring(KeyProvider& provider, SecureBytes& kek_out);

// Unwraps the KEK through the provider and checks the MAC and fingerprint.
// Throws KmsError (from the provider) or KeyringError (MAC mismatch: tampered).
SecureBytes unlock_keyring(const Keyring& kr, KeyProvider& provider);

// Recomputes kr.mac with the given KEK (after changing fields).
void seal_keyring(Keyring& kr, const SecureBytes& kek);

}  // namespace cmk
