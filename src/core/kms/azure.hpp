// The Azure Key Vault / Managed HSM key provider ("azure"): the KEK is wrapped and
// unwrapped by a versioned Key Vault key with the REST operations wrapkey/unwrapkey
// (api-version 7.4), and the key's state is read with a key GET. Tokens come from
// Entra ID (client credentials with a secret or a certificate assertion) or from a
// managed identity endpoint. The pieces below are exposed for the unit tests; the
// provider itself is made by make_provider() for provider "azure".
// Pure C++ on libcurl (cmk::http), OpenSSL and RapidJSON; knows nothing of PostgreSQL.
#pragma once

#include <ctime>
#include <functional>
#include <memory>
#include <string>

#include "http.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::azure {

constexpr const char* kApiVersion = "7.4";

enum class VaultKind { KeyVault, ManagedHsm };

// A parsed, versioned key identifier https://<host>[:port]/keys/<name>/<version>.
struct KeyId {
    std::string url;        // normalised: no trailing slash, no query
    std::string vault_url;  // https://<host>[:port]
    std::string host;       // lower-case, without the port
    std::string name;
    std::string version;
    VaultKind kind = VaultKind::KeyVault;
    std::string resource;        // token audience, e.g. https://vault.azure.net
    std::string authority_host;  // Entra ID host of that cloud
    bool loopback = false;       // 127.0.0.1 / ::1 / localhost (tests, emulators)
};

// Throws KmsError Config naming key_id. `resource` (option "resource", may be empty)
// overrides the audience and allows hosts outside the known Azure clouds.
KeyId parse_key_id(const std::string& url, const std::string& resource);

// WorkloadIdentity: a federated token (AZURE_FEDERATED_TOKEN_FILE, the Kubernetes way)
// sent as the client assertion of the app, as Entra ID's workload identity federation takes it.
enum class Credential { ClientSecret, ClientCertificate, ManagedIdentity, WorkloadIdentity };

// Every option of the provider, validated (throws KmsError Config naming the field).
// Secrets are not read here.
struct Settings {
    KeyId key;
    std::string algorithm;  // RSA-OAEP-256 | RSA-OAEP | A256KW
    std::string ca_file;
    Credential credential = Credential::ManagedIdentity;
    std::string tenant_id;
    std::string client_id;  // app id; for managed identity: a user-assigned identity
    std::string client_secret_file;
    std::string client_certificate_file;
    std::string federated_token_file;  // workload identity: re-read at each token request
    std::string authority_host;     // https://login.microsoftonline.com by default
    std::string identity_endpoint;  // IMDS protocol; "" = IDENTITY_ENDPOINT or IMDS
    long timeout_ms = 10000;
    std::string token_url() const;  // {authority_host}/{tenant}/oauth2/v2.0/token
    std::string scope() const;      // {resource}/.default
};
Settings parse_settings(const KeyConfig& cfg);

// The client assertion for certificate credentials: a JWT signed RS256 by the key in
// `pem` (certificate + unencrypted private key), header x5t = SHA-1 thumbprint of the
// certificate, claims aud/iss/sub/jti/nbf/iat/exp. Throws KmsError Config naming
// client_certificate_file when the PEM is unusable.
std::string client_assertion(const std::string& pem, const std::string& client_id,
                             const std::string& audience, std::time_t now, const std::string& jti);

// base64url of the SHA-1 of the certificate's DER form (the x5t header).
std::string certificate_thumbprint(const std::string& pem);

// An access token and when it stops being usable.
struct Token {
    http::Secret value;
    std::time_t expires_at = 0;
};

// Parses a token endpoint answer (Entra ID v2.0 or a managed identity endpoint) or
// throws KmsError: Revoked when the identity provider refuses the credentials,
// Unavailable for transient or unreadable answers. `who` names the endpoint.
Token parse_token_response(const http::Response& r, std::time_t now, const std::string& who, bool imds);

// The key's state from a key GET answer (status 200 only), at time `now`.
KeyStatus key_status_from(const std::string& body, std::time_t now, const KeyId& key);

// The KmsError an unsuccessful Key Vault answer stands for; op is "wrapkey",
// "unwrapkey" or "get".
KmsError vault_error(const http::Response& r, const std::string& op, const KeyId& key);

// How requests are sent: perform_with_retry by default; the unit tests pass canned answers.
using Transport = http::Transport;

std::unique_ptr<KeyProvider> make_azure_provider(const KeyConfig& cfg, Transport transport = nullptr);

}  // namespace cmk::azure
