// The keyring: the cluster's key configuration and its KEK as the KMS returned it
// (wrapped by the CMK), stored in <datadir>/cmk_lakebase/keyring.json. Holds no
// secret: the wrapped KEK is the KMS's ciphertext, and a MAC keyed by the KEK makes
// any edit of the configuration detectable once the KEK is unwrapped.
// Replaced atomically (write, fsync, rename, fsync directory).
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk {

constexpr const char* kKeyringDirName = "cmk_lakebase";  // inside the data directory
constexpr const char* kKeyringFile = "keyring.json";
constexpr const char* kKeyMapFile = "keymap";
constexpr const char* kKeyMapLockFile = "keymap.lock";
constexpr const char* kDefaultConfigName = "default";

// The KEK of the generation before an interrupted KEK rotation (docs/CONTRACTS.md,
// "Rotation"): kept wrapped in the keyring only while the key map may still be sealed
// under it; dropped (the old KEK destroyed) once the key map is re-sealed.
struct PreviousKek {
    std::vector<uint8_t> wrapped_kek;
    std::string kek_version;
    std::string kek_fingerprint;
    uint32_t kek_generation = 0;
};

// A keyring that is missing, damaged or fails its MAC.
struct KeyringError : Error {
    explicit KeyringError(const std::string& m) : Error(ErrorCategory::Damaged, m) {}
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
    std::string config_name;      // named key configuration bound ("" = "default")
    std::string rotated_at;       // last rewrap / rotation / binding change ("" = never)
    std::optional<PreviousKek> previous;  // only during a KEK rotation
    std::string mac;              // hex HMAC-SHA256(KEK, canonical fields)

    const std::string& bound_name() const;  // config_name or "default"
};

// <datadir>/cmk_lakebase
std::string keyring_dir_for(const std::string& datadir);

// Throws KeyringError (missing: message says the directory is not encrypted by
// cmk_lakebase; damaged: says which field).
Keyring load_keyring(const std::string& dir);
bool keyring_exists(const std::string& dir);
void save_keyring(const std::string& dir, const Keyring& kr);  // atomic replace
// The same, calling before_rename after the new file is written and fsync()ed under
// its temporary name (crash-injection seam for the rotation tests).
void save_keyring(const std::string& dir, const Keyring& kr, const std::function<void()>& before_rename);

// A new keyring: random KEK wrapped by the provider; MAC and fingerprint set.
// kek_out receives the plaintext KEK (secure memory).
Keyring create_keyring(KeyProvider& provider, SecureBytes& kek_out);

// Unwraps the KEK through the provider and checks the MAC and fingerprint.
// Throws KmsError (from the provider) or KeyringError (MAC mismatch: tampered).
SecureBytes unlock_keyring(const Keyring& kr, KeyProvider& provider);

// Recomputes kr.mac with the given KEK (after changing fields).
void seal_keyring(Keyring& kr, const SecureBytes& kek);

// Checks the MAC and fingerprint against a KEK already in hand (no KMS call): how a
// running process accepts a keyring another process rewrote (rewrap, new binding, KEK
// rotation). Throws KeyringError on mismatch.
void verify_keyring(const Keyring& kr, const SecureBytes& kek);

// Unwraps the previous generation's KEK of an interrupted rotation and checks it
// against the fingerprint the (already verified) keyring records for it.
SecureBytes unlock_previous_kek(const Keyring& kr, KeyProvider& provider);

// One field of a canonical, unambiguous serialization (the input of the keyring's and
// the key configurations' MACs): name NUL length ':' value LF.
void canonical_field(std::string& out, const std::string& name, const std::string& value);

}  // namespace cmk
