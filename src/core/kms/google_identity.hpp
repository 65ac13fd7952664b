// The Google identity of the gcp key provider: a service-account key file
// (credentials_file, else $GOOGLE_APPLICATION_CREDENTIALS) traded for an access token
// by the JWT bearer grant (RFC 7523, RS256 assertion signed here, jwt.hpp), or the
// metadata server (metadata_host, else $GCE_METADATA_HOST, else
// metadata.google.internal). With impersonate_service_account, that identity's token
// (scope cloud-platform) is traded for one of the customer's service account by IAM
// Credentials generateAccessToken (the caller needs roles/iam.serviceAccountTokenCreator
// on it). Workload identity federation: an external_account credential file names a
// subject token (a file or a URL: an OIDC token or SAML assertion of the operator's own
// identity provider) that Google's Security Token Service trades (RFC 8693 token
// exchange) for a federated access token, used as is or traded in turn by
// generateAccessToken for a service account's. Access tokens are cached until a minute
// before they expire. Internal to src/core/kms.
#pragma once

#include <ctime>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "http.hpp"
#include "kit.hpp"

namespace cmk::gcp {

// An external_account credential file (workload identity federation), checked field
// by field at configuration time. The subject token itself is read at each exchange.
struct ExternalAccount {
    std::string
        audience;  // //iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/X
    std::string subject_token_type;  // urn:ietf:params:oauth:token-type:jwt | id_token | saml2
    std::string token_url;           // STS, default https://sts.googleapis.com/v1/token
    std::string source_file;         // credential_source.file (absolute), or
    std::string source_url;          // credential_source.url
    std::vector<std::pair<std::string, std::string>> source_headers;  // credential_source.headers
    std::string json_field;  // format json: subject_token_field_name; "" = format text
};

// Where tokens come from, chosen and checked at configuration time: a key file
// (field names the option or variable that gave it), an external_account file, or the
// metadata server.
struct IdentitySource {
    std::string field;          // "credentials_file" or "GOOGLE_APPLICATION_CREDENTIALS"; "" = metadata
    std::string path;           // the key file
    std::string metadata_host;  // HOST[:PORT], when path is ""
    std::string client_email;   // the key file's service account ("" for the metadata server)
    bool external = false;      // path is an external_account file (ext below)
    ExternalAccount ext;
    // Impersonation (option impersonate_service_account, or the external_account
    // file's service_account_impersonation_url): "" = none.
    std::string impersonate;             // the customer's service account e-mail
    std::vector<std::string> delegates;  // e-mails of a delegation chain (option impersonation_delegates)
    std::string iam_endpoint;            // https://iamcredentials.googleapis.com (option iam_credentials_endpoint)
    std::string impersonation_url;  // the file's full generateAccessToken URL ("" = built from iam_endpoint)
    long lifetime_s = 3600;         // option impersonation_lifetime 300-43200, or the file's 600-43200
};

constexpr const char* kStsTokenUrl = "https://sts.googleapis.com/v1/token";
constexpr size_t kMaxSubjectToken = 64 * 1024;  // bytes: a JWT or a SAML assertion fits

// Parses and checks an external_account file's JSON (`path` and `field` name it in
// messages). Sets src.external, src.ext and, for service_account_impersonation_url,
// src.impersonate, src.impersonation_url and src.lifetime_s. Throws KmsError Config
// naming the field; "not supported" for executable, AWS (environment_id), workforce
// pools and other sources.
void parse_external_account(const std::string& json, const std::string& field, const std::string& path,
                            IdentitySource* src);

// The e-mail of .../v1/projects/-/serviceAccounts/EMAIL:generateAccessToken, or "".
std::string impersonation_url_account(const std::string& url);

// The STS request body (application/x-www-form-urlencoded, RFC 8693 as Google's STS v1
// takes it): grant_type token-exchange, audience, scope cloud-platform,
// requested_token_type access_token, subject_token, subject_token_type. The caller
// wipes it (it holds the subject token).
std::string sts_request_body(const ExternalAccount& ext, const std::string& subject_token);

// Parses the STS answer {"access_token", "issued_token_type", "token_type",
// "expires_in"}: the token and its life in seconds (3600 when absent). Throws KmsError
// Unavailable naming `where` when the answer has no token.
kit::Secret parse_sts_token(const std::string& body, long* life_s, const std::string& where);

// The subject token from text read at the source: trimmed (format text), or the
// string member `json_field` of a JSON object. Throws KmsError Unavailable naming
// `what` (never the content) when there is none.
kit::Secret subject_token_from(const std::string& text, const std::string& json_field,
                               const std::string& what);

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
    kit::Secret exchange(long* life_s, const std::string& where);
    kit::Secret subject_token(const std::string& where);

    IdentitySource src_;
    kit::Timing timing_;
    std::string ca_file_;
    Send send_;
    kit::TokenCache cache_{60};
    kit::TokenCache base_cache_{60};  // the base identity's cloud-platform token (impersonation)
};

}  // namespace cmk::gcp
