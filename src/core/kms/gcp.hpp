// Google Cloud KMS key provider ("gcp"): what is visible beyond the KeyProvider
// interface, for the unit tests and the fuzz targets. make_provider() makes the
// provider for provider "gcp" with make_gcp_provider().
#pragma once

#include <memory>
#include <string>

#include "cmk_lakebase/kms/provider.hpp"
#include "http.hpp"

namespace cmk::gcp {

// True if `name` is projects/P/locations/L/keyRings/R/cryptoKeys/K with each part a
// non-empty run of A-Z a-z 0-9 _ - (and . : in the project id).
bool valid_crypto_key_name(const std::string& name);

// The operation an answer came back for: it decides what a 400 means.
enum class Op { Token, GetKey, Encrypt, Decrypt };

// Google's error body {"error":{"code":403,"message":"...","status":"PERMISSION_DENIED"}}
// (or OAuth's {"error":"invalid_grant","error_description":"..."}): the status word
// (or OAuth error code) and a one-line message of at most 200 characters.
struct ApiError {
    std::string status;
    std::string message;
};
ApiError parse_error(const std::string& body);

// Maps one answer to KeyHealth: 2xx ok; 403 PERMISSION_DENIED, 404 NOT_FOUND,
// 400 FAILED_PRECONDITION (version not enabled), 400 INVALID_ARGUMENT on decrypt
// (wrong key material / AAD), 401 UNAUTHENTICATED after a fresh token, 400/401 from
// the token endpoint (invalid_grant, service account key deleted or disabled) revoked;
// 429 RESOURCE_EXHAUSTED, 5xx, 408, and a token refusal for clock skew unavailable;
// anything else is a configuration error (*config = true).
KeyHealth classify(Op op, long http_status, const ApiError& err, bool* config = nullptr);

// A cryptoKeyVersion state word -> health: ENABLED ok; DISABLED, DESTROY_SCHEDULED,
// DESTROYED, IMPORT_FAILED, GENERATION_FAILED revoked; PENDING_* and anything
// unknown unavailable.
KeyHealth version_state_health(const std::string& state);

// The provider, its options and identity checked now (KmsError Config). Every request
// (Cloud KMS, and the token requests of the identity: metadata server, OAuth, STS,
// IAM Credentials) goes through `transport`, the network (perform_with_retry) when it
// is empty; the fuzz target passes canned answers. A credential_source.url subject
// token is always fetched from the network.
std::unique_ptr<KeyProvider> make_gcp_provider(const KeyConfig& cfg, http::Transport transport = nullptr);

}  // namespace cmk::gcp
