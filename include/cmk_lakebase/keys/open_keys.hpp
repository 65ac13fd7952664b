// One routine that opens a cluster's keys (issue 15): the keyring's KEK unwrapped
// through the provider and verified, and, when a KEK rotation was interrupted by a
// crash, the previous generation's KEK that the key map may still be sealed under.
// The server's start-up (src/fs/startup.cpp), pg_cmk's offline key commands and
// pg_cmk status all open a cluster this way, so they agree on what an interrupted
// rotation means.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk {

struct ClusterKeys {
    SecureBytes kek;               // KEK of the keyring's current generation
    uint32_t kek_generation = 0;   // ... that generation
    SecureBytes previous_kek;      // the previous generation's (see UnwrapPrevious), else empty
    uint32_t map_generation = 0;   // the generation the key map is sealed under
    // The KEK the key map is sealed under: kek, or previous_kek during an interrupted
    // rotation that had not re-sealed the key map yet.
    const SecureBytes& map_kek() const { return map_generation == kek_generation ? kek : previous_kek; }
};

enum class UnwrapPrevious {
    WhenMapNeedsIt,  // unwrapped only when the key map is still sealed under it
    Always,          // unwrapped whenever the keyring records one (offline lifecycle)
};

// Unwraps kr's KEK (and the previous one, per `previous`) through provider; dir is the
// keyring directory, whose key map is peeked for its generation (a key map that cannot
// be peeked is taken as sealed under the current generation: opening it reports the
// damage). Throws KmsError (from the provider) or KeyringError (tampered keyring).
ClusterKeys unlock_cluster_keys(const std::string& dir, const Keyring& kr, KeyProvider& provider,
                                UnwrapPrevious previous = UnwrapPrevious::WhenMapNeedsIt);

// Opens the key map of dir with the KEK it is sealed under. Throws KeyMapError.
std::unique_ptr<KeyMap> open_cluster_keymap(const std::string& dir, const Keyring& kr, const ClusterKeys& keys,
                                            KeyMap::KekResolver resolver = nullptr);

// Start-up check of configs.json (issue 18): a damaged file or one whose MAC does not
// verify is found here, not at the first key operation. Throws KeyringError. Skipped
// while a KEK rotation is pending (its completion reads and re-MACs the file).
void verify_key_configs(const std::string& dir, const Keyring& kr, const ClusterKeys& keys);

}  // namespace cmk
