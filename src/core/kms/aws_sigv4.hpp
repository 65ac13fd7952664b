// AWS Signature Version 4 (AWS4-HMAC-SHA256) request signing for the AWS KMS provider:
// the canonical request, the string to sign, the signing key and the Authorization
// header, each a function of its own so the unit tests check every step against the
// published aws-sig-v4-test-suite vectors (test/data/aws_sigv4_vectors.txt).
// Pure C++ on OpenSSL; knows nothing of PostgreSQL.
#pragma once

#include <ctime>
#include <string>
#include <utility>
#include <vector>

#include "http.hpp"

namespace cmk::aws {

// An HTTP request as it will be sent. `path` is the path as it appears on the request
// line, not yet percent-encoded for signing (KMS and STS use "/"); `query` is the raw
// query string without '?'. Headers keep their order; duplicates are allowed.
struct SigV4Request {
    std::string method;
    std::string path = "/";
    std::string query;
    std::vector<std::pair<std::string, std::string>> headers;
    std::string body;
};

struct Credentials {
    std::string access_key_id;
    http::Secret secret_access_key;
    http::Secret session_token;  // empty for long-term keys
    std::time_t expiration = 0;  // 0 = does not expire
    std::string source;          // where they came from, for messages: "environment", ...
};

// Lower-case hex SHA-256 of data.
std::string sha256_hex(const std::string& data);

// "20150830T123600Z" and "20150830" for a time.
std::string amz_date(std::time_t t);

// Each step of SigV4 (docs.aws.amazon.com, "Create a signed AWS API request").
std::string canonical_uri(const std::string& path);     // each byte but unreserved and '/' %-encoded
std::string canonical_query(const std::string& query);  // decoded, re-encoded, sorted
// Canonical headers block (lower-case names sorted, values trimmed, inner runs of spaces
// collapsed, duplicates joined with ',') and the signed header list ("a;b;c").
std::string canonical_headers(const std::vector<std::pair<std::string, std::string>>& headers,
                              std::string* signed_headers);
std::string canonical_request(const SigV4Request& req, const std::string& payload_hash);
std::string credential_scope(const std::string& date8, const std::string& region, const std::string& service);
std::string string_to_sign(const std::string& amz_datetime, const std::string& scope,
                           const std::string& canonical_request);
// HMAC chain kSecret -> kDate -> kRegion -> kService -> kSigning, then the hex signature
// of the string to sign. Intermediate keys are wiped.
std::string signature(const http::Secret& secret_access_key, const std::string& date8,
                      const std::string& region, const std::string& service,
                      const std::string& string_to_sign);

// Signs req in place for `now`: adds X-Amz-Date, X-Amz-Security-Token (temporary
// credentials) and Authorization. The request must already carry a Host header. The
// payload hash is X-Amz-Content-Sha256 if present, else SHA-256 of the body.
void sign(SigV4Request& req, const Credentials& creds, const std::string& region, const std::string& service,
          std::time_t now);

}  // namespace cmk::aws
