// The Azure identity of the azure key provider: Entra ID v2.0 client credentials (a
// secret, or a certificate through an RS256 client assertion) or a managed identity
// endpoint (IMDS, or App Service's IDENTITY_ENDPOINT), and the access token they
// yield, cached until shortly before it expires. The parts the unit tests reach
// (client_assertion, parse_token_response, ...) are declared in azure.hpp.
// Internal to src/core/kms.
#pragma once

#include <string>

#include "azure.hpp"
#include "kit.hpp"

namespace cmk::azure {

// A random RFC 4122 version 4 UUID (request ids, assertion ids).
std::string uuid4();

// "cmk_lakebase/<version>".
std::string user_agent();

// A transport failure (timeout, refused, TLS) as a KmsError of the same kind naming
// `what`, with a hint about ca_file when TLS verification failed.
KmsError transport_error(const KmsError& e, const std::string& what, const std::string& ca_file);

class Identity {
public:
    // Reads the secret the credential needs now (client secret, certificate PEM, or
    // App Service identity header); throws KmsError Config naming the field.
    Identity(const KeyConfig& cfg, const Settings& s, Transport transport);

    // out = "Bearer <token>": the cached token, or a new one when missing, near expiry
    // or `fresh` is asked. Written in place so that no stray copy of the token is left.
    void bearer(std::string& out, bool fresh);

private:
    kit::Secret fetch_token(long* life_s);

    const Settings& s_;
    Transport transport_;
    kit::Secret secret_;  // client secret, certificate PEM (with key), or App Service header
    std::string mi_endpoint_;
    bool app_service_ = false;
    kit::TokenCache cache_{300};
};

}  // namespace cmk::azure
