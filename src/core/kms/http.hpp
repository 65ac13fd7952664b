// HTTP for the KMS providers (DESIGN §6): one libcurl request with bounded timeouts,
// TLS peer and host verification always on (an optional CA file replaces the system
// store; it never turns verification off), and retries with backoff for transient
// answers only. Transport failures are KmsError Unavailable; what an HTTP status
// means is each provider's decision. Also the small helpers every provider needs:
// secrets from files or the environment (wiped on release), URL encoding.
// Pure C++ on libcurl; knows nothing of PostgreSQL.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::http {

struct Request {
    std::string method = "POST";
    std::string url;
    std::vector<std::pair<std::string, std::string>> headers;  // name, value
    std::string body;
    long connect_timeout_ms = 3000;
    long timeout_ms = 10000;  // whole request
    std::string ca_file;      // PEM bundle; "" = the system's trust store
    std::string client_cert;  // PEM, for mutual TLS; "" = none
    std::string client_key;   // PEM
};

struct Response {
    long status = 0;
    std::string body;
    std::map<std::string, std::string> headers;  // names lower-cased; last value wins
    std::string header(const std::string& lower_name) const;
};

// One request. Throws KmsError Unavailable (timeout, refused, DNS, TLS failure) with a
// message naming the host and curl's reason; never the request body.
Response perform(const Request& req);

struct RetryPolicy {
    int attempts = 3;           // total tries
    long first_delay_ms = 200;  // doubled each retry (with jitter), capped below
    long max_delay_ms = 2000;
};

// HTTP statuses that are transient everywhere: 408, 429, 500, 502, 503, 504.
bool transient_status(long status);

// perform() with retries: a transport error or a response for which `transient`
// says true is retried after a backoff; the last response (or error) is returned
// (thrown). `transient` defaults to transient_status(status).
Response perform_with_retry(const Request& req, const RetryPolicy& policy = {},
                            const std::function<bool(const Response&)>& transient = nullptr);

// RFC 3986 percent-encoding of everything but unreserved characters.
std::string url_encode(const std::string& s);

// A secret's text that is wiped (OPENSSL_cleanse) when it goes away. Move-only.
class Secret {
public:
    Secret() = default;
    explicit Secret(std::string v) : v_(std::move(v)) {}
    ~Secret();
    Secret(Secret&& o) noexcept : v_(std::move(o.v_)) { o.v_.clear(); }
    Secret& operator=(Secret&& o) noexcept;
    Secret(const Secret&) = delete;
    Secret& operator=(const Secret&) = delete;
    const std::string& str() const { return v_; }
    bool empty() const { return v_.empty(); }

private:
    std::string v_;
};

// Reads a secret from a file (trailing newline/spaces trimmed). The file must be a
// regular file not readable by group or others. Throws KmsError Config naming `field`
// (missing, unreadable, empty, too open).
Secret read_secret_file(const std::string& field, const std::string& path);

// The value of cfg.options[file_option] read as a secret file if set, else the
// environment variable env_var if set and non-empty, else an empty Secret.
Secret secret_from(const KeyConfig& cfg, const std::string& file_option, const char* env_var);

// Throws KmsError Config naming `field` unless path is a readable regular file
// (CA bundles, client certificates: checked at configuration time).
void require_readable_file(const std::string& field, const std::string& path);

// Option lookup: the value, or def.
std::string option(const KeyConfig& cfg, const std::string& name, const std::string& def = "");

}  // namespace cmk::http
