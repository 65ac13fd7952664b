// HashiCorp Vault / OpenBao Transit key provider ("vault"): what is visible beyond the
// KeyProvider interface, for the rotation code, the unit tests and the fuzz targets.
// make_provider() makes the provider for provider "vault" with make_vault_provider().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cmk_lakebase/kms/provider.hpp"
#include "http.hpp"

namespace cmk::vault {

// The operation an HTTP answer came back for: it decides what a 400 means.
enum class Op { Login, ReadKey, Encrypt, Decrypt, Rewrap };

// Maps one Vault answer to KeyHealth: 2xx ok; 404, 403 (permission denied, bad or
// expired token) and 400 on decrypt/rewrap (wrong key material, version below
// min_decryption_version) and on login (invalid role or secret id) revoked;
// 429, 5xx (503 = sealed), 472/473 (standbys) unavailable; anything else on a
// request we built is a configuration error (returned as Unavailable with
// *config = true so that the caller can say so).
KeyHealth classify(Op op, long http_status, bool* config = nullptr);

// The first message of a Vault error body {"errors":["..."]}, one line, at most 200
// characters; "" if none.
std::string error_message(const std::string& body);

// The key version of a Transit ciphertext "vault:vN:...", or 0 if it is not one.
uint32_t ciphertext_version(const std::string& ciphertext);

// True if `name` is a usable Transit key name / mount path.
bool valid_key_name(const std::string& name);
bool valid_mount(const std::string& mount);

// Rewraps a wrapped KEK under the latest version of the Transit key (POST
// /v1/<mount>/rewrap/<key>): the KEK never leaves Vault. `provider` must be a "vault"
// provider (else KmsError Config). Returns the new blob; key_version receives "N".
std::vector<uint8_t> rewrap(KeyProvider& provider, const std::vector<uint8_t>& blob,
                            std::string* key_version = nullptr);

// The provider, its options checked now (KmsError Config). Requests go through
// `transport`, the network (perform_with_retry) when it is empty; the fuzz target
// passes canned answers.
std::unique_ptr<KeyProvider> make_vault_provider(const KeyConfig& cfg, http::Transport transport = nullptr);

}  // namespace cmk::vault
