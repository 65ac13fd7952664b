// JSON Web Tokens signed with RS256 (RFC 7515/7519), for the providers that trade a
// signed assertion for an access token: Google's service-account JWT bearer grant
// (RFC 7523) and Entra ID's client-certificate assertion. Compact serialization only:
// base64url(header) "." base64url(claims) "." base64url(RSASSA-PKCS1-v1_5 SHA-256).
// Pure C++ on OpenSSL EVP and RapidJSON; knows nothing of PostgreSQL.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace cmk::jwt {

// A flat JSON object of string and integer members, serialized in insertion order
// (a member added twice is written twice: callers don't). Used for headers and claims.
class JsonObject {
public:
    JsonObject& set(const std::string& name, const std::string& value);
    JsonObject& set(const std::string& name, const char* value) { return set(name, std::string(value)); }
    JsonObject& set(const std::string& name, int64_t value);
    std::string json() const;  // compact, e.g. {"alg":"RS256","typ":"JWT"}

private:
    struct Member {
        std::string name;
        bool is_int = false;
        std::string str;
        int64_t num = 0;
    };
    std::vector<Member> members_;
};

// The JOSE header {"alg":"RS256","typ":"JWT"} followed by `extra` members (e.g. kid,
// x5t, x5t#S256).
JsonObject rs256_header(const std::vector<std::pair<std::string, std::string>>& extra = {});

// Signs header.claims with an RSA private key in PEM (PKCS#8 "BEGIN PRIVATE KEY" or
// PKCS#1 "BEGIN RSA PRIVATE KEY", unencrypted) and returns the compact JWT. Throws
// KmsError Config naming `field` (never quoting the key) if the PEM is not an RSA
// private key of at least 2048 bits, or if signing fails.
std::string sign_rs256(const JsonObject& header, const JsonObject& claims, const std::string& private_key_pem,
                       const std::string& field = "private_key");

// RSASSA-PKCS1-v1_5 with SHA-256 over `data`: the raw signature bytes.
std::vector<uint8_t> rs256_signature(const std::string& data, const std::string& private_key_pem,
                                     const std::string& field = "private_key");

// Verifies a compact RS256 JWT against a public key (PEM "BEGIN PUBLIC KEY") or an
// X.509 certificate (PEM "BEGIN CERTIFICATE"). Returns false on a bad signature, a
// wrong "alg" or a malformed token. On success, header_json/claims_json (if given)
// receive the decoded JSON texts. For tests and for checking our own output.
bool verify_rs256(const std::string& token, const std::string& public_pem, std::string* header_json = nullptr,
                  std::string* claims_json = nullptr);

// The "exp" claim of a compact JWT, read WITHOUT verifying it (for judging a token we
// only pass on, e.g. a workload's subject token). False if the text is not a JWT or
// has no integer "exp". The payload is parsed with the project's depth/size bounds.
bool unverified_exp(const std::string& token, int64_t* exp);

// base64url (no padding) of the SHA-1 / SHA-256 digest of an X.509 certificate's DER
// encoding: the JOSE "x5t" / "x5t#S256" header values. `digest` is "sha1" or "sha256".
// Throws KmsError Config naming `field` if the PEM holds no certificate.
std::string x509_thumbprint(const std::string& cert_pem, const std::string& digest,
                            const std::string& field = "certificate");

}  // namespace cmk::jwt
