// Google Cloud KMS key provider ("gcp"): what is visible beyond the KeyProvider
// interface, for the unit tests. The provider itself is made by make_provider() with
// provider "gcp".
#pragma once

#include <string>

#include "cmk_lakebase/kms/provider.hpp"

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

}  // namespace cmk::gcp
