// Key providers: the one interface through which the key-encryption key (KEK) is
// wrapped and unwrapped by the customer's master key (CMK), and the CMK's state asked.
// The CMK never leaves its provider. Pure C++; knows nothing of PostgreSQL.
#pragma once

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/base/crypto.hpp"

namespace cmk {

// What a provider's answer means for the cluster.
enum class KeyHealth { Ok, Unavailable, Revoked };
const char* key_health_name(KeyHealth h);  // "ok", "unavailable", "revoked"

enum class KmsErrorKind {
    Config,       // bad configuration: names the field; fails before any KMS call
    Unavailable,  // timeouts, 5xx, throttling, server unreachable: transient
    Revoked,      // disabled, deleted, destroyed, access denied, wrong key material
};

ErrorCategory category_of(KmsErrorKind k);  // Invalid, KeyUnavailable, KeyRevoked
KeyHealth health_of(ErrorCategory c);       // the watchdog's reading of a failed call

struct KmsError : Error {
    KmsError(KmsErrorKind k, const std::string& msg) : Error(category_of(k), msg), kind(k) {}
    KmsErrorKind kind;
};

// A key configuration: which provider, which key, and provider options (e.g. the
// local provider's key_store directory; credentials *references*, never secrets).
struct KeyConfig {
    std::string provider;
    std::string key_id;
    std::map<std::string, std::string> options;
};

struct KeyStatus {
    KeyHealth health = KeyHealth::Unavailable;
    std::string state;       // provider's own word: "enabled", "disabled", "Enabled", ...
    std::string detail;      // one line for logs and cmk_status(); no key material
    std::string request_id;  // KMS request id where the KMS returns one
};

struct WrapResult {
    std::vector<uint8_t> blob;  // the KMS's ciphertext of the KEK
    std::string key_version;    // CMK version that wrapped it, if the KMS says
    std::string request_id;
};

class KeyProvider {
public:
    virtual ~KeyProvider() = default;
    virtual std::string name() const = 0;
    virtual const KeyConfig& config() const = 0;
    // All three throw KmsError (Unavailable / Revoked / Config).
    virtual WrapResult wrap(const SecureBytes& kek) = 0;
    virtual SecureBytes unwrap(const std::vector<uint8_t>& blob) = 0;
    virtual KeyStatus status() = 0;
    // The KMS's request id of the last unwrap() that got an answer, where the KMS
    // returns one ("" otherwise): for the audit trail.
    virtual std::string last_request_id() const { return last_request_id_; }
    // Who the calls run as, where the provider knows without a network call (an
    // assumed role's session, an impersonated account): for the audit trail's "as".
    // "" = the provider does not say.
    virtual std::string identity() const { return ""; }

protected:
    std::string last_request_id_;
};

// Validates the configuration (throws KmsError Config naming the field) and returns
// the provider. Known providers: local, kmip, aws, azure, vault, gcp; any other name
// throws Config "unknown key provider".
std::unique_ptr<KeyProvider> make_provider(const KeyConfig& cfg);

// The local provider's key store: one file per CMK (<key_id>.key, mode 0600) in a
// directory outside the data directory (mode 0700). States: enabled, disabled,
// deleted (deleted destroys the key material: irreversible).
class LocalKeyStore {
public:
    // Does not create. Every read of a key file (state, rotate, the provider's calls)
    // gives up after timeout_ms with KmsError Unavailable: a store on a hung mount.
    explicit LocalKeyStore(std::string dir, long timeout_ms = kLocalTimeoutMs);
    static constexpr long kLocalTimeoutMs = 10000;
    const std::string& dir() const { return dir_; }
    long timeout_ms() const { return timeout_ms_; }
    static bool valid_key_id(const std::string& id);  // [A-Za-z0-9._-]{1,128}, not "." / ".."
    void ensure_dir();                           // mkdir -p with 0700
    void create(const std::string& key_id);      // throws KmsError Config if it exists
    bool exists(const std::string& key_id) const;
    std::string state(const std::string& key_id) const;  // throws if missing
    void set_state(const std::string& key_id, const std::string& state);  // enabled|disabled|deleted
    // Adds a new key version (new random material) and makes it the primary one, as a
    // KMS's key rotation does; older versions still unwrap. Returns the new version.
    uint32_t rotate(const std::string& key_id);
    uint32_t primary_version(const std::string& key_id) const;
    std::vector<std::string> list() const;
    std::string key_path(const std::string& key_id) const;

private:
    std::string dir_;
    long timeout_ms_;
};

// Default local key store: $CMK_LAKEBASE_KEY_STORE, else $HOME/.cmk_lakebase/keys.
std::string default_local_key_store();

}  // namespace cmk
