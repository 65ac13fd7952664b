// The Google identity of the gcp key provider: a service-account key file
// (credentials_file, else $GOOGLE_APPLICATION_CREDENTIALS) traded for an access token
// by the JWT bearer grant (RFC 7523, RS256 assertion signed here, jwt.hpp), or the
// metadata server (metadata_host, else $GCE_METADATA_HOST, else
// metadata.google.internal). With impersonate_service_account, that identity's token
// (scope cloud-platform) is traded for one of the customer's service account by IAM
// Credentials generateAccessToken (the caller needs roles/iam.serviceAccountTokenCreator
// on it). Access tokens are cached until a minute before they expire. Internal to
// src/core/kms.
#pragma once

#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include "http.hpp"
#include "kit.hpp"

namespace cmk::gcp {

// Where tokens come from, chosen and checked at configuration time: a key file
// (field names the option or variable that gave it) or the metadata server.
struct IdentitySource {
    std::string field;          // "credentials_file" or "GOOGLE_APPLICATION_CREDENTIALS"; "" = metadata
    std::string path;           // the key file
    std::string metadata_host;  // HOST[:PORT], when path is ""
    std::string client_email;   // the key file's service account ("" for the metadata server)
    // Impersonation (option impersonate_service_account): "" = none.
    std::string impersonate;             // the customer's service account e-mail
    std::vector<std::string> delegates;  // e-mails of a delegation chain (option impersonation_delegates)
    std::string iam_endpoint;            // https://iamcredentials.googleapis.com (option iam_credentials_endpoint)
    long lifetime_s = 3600;              // option impersonation_lifetime, 300-43200
};

// A service-account e-mail as IAM names one: NAME@DOMAIN with NAME of a-z 0-9 - (6-30,
// or a longer legacy/Google-managed name) and a DOMAIN with a dot.
bool valid_service_account_email(const std::string& email);

// The generateAccessToken request body for src (scope cloudkms).
std::string generate_access_token_body(const IdentitySource& src);
// The URL: IAM_ENDPOINT/v1/projects/-/serviceAccounts/EMAIL:generateAccessToken.
std::string generate_access_token_url(const IdentitySource& src);
// Parses the answer {"accessToken": ..., "expireTime": RFC 3339}: the token and its
// life in seconds from `now`. Throws KmsError Unavailable naming `where` when the
// answer lacks them.
kit::Secret parse_generate_access_token(const std::string& body, std::time_t now, long* life_s,
                                        const std::string& where);

// Reads options credentials_file and metadata_host and the environment; a key file is
// parsed and its private key tried now (wiped at once). Throws KmsError Config.
IdentitySource choose_identity(const KeyConfig& cfg);

class Identity {
public:
    // `send` performs one token request and maps a refusal to a KmsError.
    using Send = std::function<http::Response(http::Request&)>;
    Identity(IdentitySource src, kit::Timing timing, std::string ca_file, Send send);

    // An access token: the cached one, or a new one when none is fresh or `refresh`.
    kit::Secret token(bool refresh, const std::string& where);

    const IdentitySource& source() const { return src_; }

private:
    kit::Secret fetch(long* life_s, const std::string& where);
    kit::Secret fetch_base(long* life_s, const std::string& where, const char* scope);
    kit::Secret impersonate(long* life_s, const std::string& where);

    IdentitySource src_;
    kit::Timing timing_;
    std::string ca_file_;
    Send send_;
    kit::TokenCache cache_{60};
    kit::TokenCache base_cache_{60};  // the base identity's cloud-platform token (impersonation)
};

}  // namespace cmk::gcp
