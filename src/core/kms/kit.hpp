// The provider kit: what every key provider needs besides its own protocol, written
// once (issue 15). Error makers that build KmsError of each kind; option lookup, the
// unknown-option check and whole-number options; secrets read from files or the
// environment and wiped (OPENSSL_cleanse) when they go away, on error paths too; the
// one rule for plain http (loopback hosts only); one set of timeout and retry
// defaults with one backoff; a token cache; RapidJSON member helpers; bounded one-line
// quotes of a server's answer. A new provider brings its protocol and uses these.
// No network here (that is http.hpp's, which KMIP does not use); knows nothing of
// PostgreSQL.
#pragma once

#include <openssl/ossl_typ.h>
#include <rapidjson/document.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::kit {

// ---------------------------------------------------------------- errors
// The category follows from the kind (category_of in provider.cpp).
KmsError config_error(const std::string& msg);  // names the field first: "field: ..."
KmsError unavailable(const std::string& msg);
KmsError revoked(const std::string& msg);

// The KeyStatus a failed status probe stands for: Revoked or Unavailable with the
// error's message as detail; state is `revoked_state` or "unavailable". A Config error
// is not a key state: it is rethrown.
KeyStatus status_from_error(const KmsError& e, const char* revoked_state = "revoked");

// ---------------------------------------------------------------- secrets
// Wipes and empties a string that held a secret (a token, base64 of a KEK, a body).
void wipe(std::string& s);

// Wipes the string it names when the scope ends, however it ends.
struct WipeOnExit {
    std::string& s;
    ~WipeOnExit() { wipe(s); }
};

// A secret's text that is wiped when it goes away. Move-only.
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
    Secret copy() const { return Secret(v_); }

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

// As require_readable_file, and not accessible by group or others (private keys).
void require_private_file(const std::string& field, const std::string& path);

// A secret's bytes from its base64 (or base64url) text, with no copy left behind.
// Throws CryptoError when the text is not base64.
SecureBytes decode_secret(const char* b64, size_t n, bool url = false);

// The same for a JSON answer's member value `v` (a KEK coming back from unwrap):
// throws `absent` when v is missing or not a string, `not_base64` when it is not
// base64 (both a provider's own message, naming the operation and the key).
SecureBytes decode_secret(const rapidjson::Value* v, const KmsError& absent, const KmsError& not_base64,
                          bool url = false);

// ---------------------------------------------------------------- options, environment
// Option lookup: the value, or def.
std::string option(const KeyConfig& cfg, const std::string& name, const std::string& def = "");

// Throws Config "<name>: unknown option of <who> (known: a, b, ...)" for the first
// option not in `known` (listed in the message in the order given).
void require_known_options(const KeyConfig& cfg, const std::string& who,
                           std::initializer_list<const char*> known);

// A whole-number option (digits only) from lo to hi, or def when not set. Throws
// Config "<name>: \"v\" is not a number [of <unit> ]from lo to hi".
long int_option(const KeyConfig& cfg, const std::string& name, long def, long lo, long hi,
                const char* unit = nullptr);

// The environment variable's value, or "".
std::string env(const char* name);

// $HOME, else the password database's home directory, else "".
std::string home_dir();

// s without leading and trailing spaces, tabs and line ends.
std::string trim(const std::string& s);
// An RFC 3339 / ISO 8601 time as the KMS and identity services write it:
// 2026-12-06T18:00:00Z, with optional fractional seconds, Z or a +HH:MM / -HH:MM offset.
// False for anything else (trailing text included).
bool parse_utc_time(const std::string& s, std::time_t* out);

// 8-4-4-4-12 hexadecimal digits (either case).
bool is_uuid(const std::string& s);

// "1", "true", "yes", "on".
bool truthy(const std::string& v);

// ---------------------------------------------------------------- plain http
// The one rule for plain http: only to this machine, so that a token, a signed
// assertion or a KEK never crosses a network in clear. `authority` is host[:port]
// as written in a URL; loopback is localhost, an IPv4 literal in 127.0.0.0/8 or [::1];
// an authority with user information ("@") is never loopback.
bool loopback_authority(const std::string& authority);

// True for https://... and for http:// to a loopback authority (loopback_authority).
bool https_or_loopback(const std::string& url);

// ---- host names -------------------------------------------------------------------

// Whether host is a numeric IPv4 or IPv6 address (IPv6 with or without brackets).
bool numeric_host(const std::string& host);

// Runs in resolve_in_child's child: the numeric addresses of host for port (IPv6 in
// brackets); throws std::runtime_error with the reason when there are none.
using Resolver = std::function<std::vector<std::string>(const std::string& host, const std::string& port)>;

// The addresses of host for port (numeric, IPv6 in brackets, at most 16), resolved by
// getaddrinfo (or `resolver`) in a child process (sys::run_in_child) within timeout_ms:
// a process with one thread keeps one (no resolver thread), and a resolver that does not
// answer costs at most timeout_ms (the child is killed). Throws KmsError Unavailable
// "could not resolve host HOST: why" when the name does not resolve, the child does not
// answer in time, answers anything but numeric addresses, or when 4 children killed
// earlier have not ended yet. Only for a process with one thread.
std::vector<std::string> resolve_in_child(const std::string& host, const std::string& port, long timeout_ms,
                                          const Resolver& resolver = nullptr);

// ---------------------------------------------------------------- timeouts, retries
// One name and one default each. Providers whose documented option names or defaults
// predate the kit (aws: timeout_ms 5000; azure: timeout in seconds; kmip: attempts)
// keep them and say so where they read them.
constexpr long kTimeoutMs = 10000;        // option timeout_ms: a whole request
constexpr long kConnectTimeoutMs = 3000;  // option connect_timeout_ms
constexpr int kAttempts = 3;              // option retries: tries in all

struct Timing {
    long timeout_ms = kTimeoutMs;
    long connect_timeout_ms = kConnectTimeoutMs;
    int attempts = kAttempts;
};

// The kit's options timeout_ms (100 ms to 9999999 ms), connect_timeout_ms (100 ms to
// 600000 ms) and retries (1 to 10), each with its default when not set. A provider
// lists in its known options those it offers. Throws Config naming the option.
Timing read_timing(const KeyConfig& cfg);

// The pause between two tries: 200 ms doubled each time up to 2 s, each pause drawn
// between half and all of it so that clients retrying together spread out.
class Backoff {
public:
    void pause();

private:
    long delay_ms_ = 200;
    std::minstd_rand rng_{std::random_device{}()};
};

// ---------------------------------------------------------------- token cache
// An access token kept until shortly before it expires: `margin_s` seconds early,
// or at half its life when the life is shorter than two margins. Thread-safe: one
// fetch at a time, under the cache's lock.
// No access token is kept longer than this, whatever lifetime its issuer announces
// (Entra, Google and STS issue at most 24 h).
constexpr long kMaxTokenLifeS = 24 * 3600;

class TokenCache {
public:
    explicit TokenCache(long margin_s) : margin_s_(margin_s) {}
    // The cached token, or fetch()'s when none is fresh or `refresh` is asked; fetch
    // returns the token and sets its life in seconds.
    Secret get(bool refresh, const std::function<Secret(long* life_s)>& fetch);
    void forget();

private:
    long margin_s_;
    std::mutex mu_;
    Secret token_;
    std::chrono::steady_clock::time_point until_{};
};

// ---------------------------------------------------------------- JSON answers
// The member `name` of an object, or nullptr (also when `o` is not an object).
const rapidjson::Value* member(const rapidjson::Value& o, const char* name);
// The member, or a null value: for chains such as member(member_or_null(d, "data"), "x").
const rapidjson::Value& member_or_null(const rapidjson::Value& o, const char* name);
// A string member's text, or "".
std::string string_member(const rapidjson::Value& o, const char* name);
std::string string_of(const rapidjson::Value* v);
// A number that may come as a JSON number or a string of digits (IMDS sends strings).
bool int_member(const rapidjson::Value& o, const char* name, long long* out);

// ---------------------------------------------------------------- OpenSSL handles
// RAII for the OpenSSL objects providers hold (certificates, keys, memory BIOs,
// digest contexts, TLS): one deleter, freed with the library's own call.
struct OpenSslFree {
    void operator()(BIO* p) const;
    void operator()(EVP_PKEY* p) const;
    void operator()(X509* p) const;
    void operator()(EVP_MD_CTX* p) const;
    void operator()(SSL_CTX* p) const;
    void operator()(SSL* p) const;
};
using BioPtr = std::unique_ptr<BIO, OpenSslFree>;
using PkeyPtr = std::unique_ptr<EVP_PKEY, OpenSslFree>;
using X509Ptr = std::unique_ptr<X509, OpenSslFree>;
using MdCtxPtr = std::unique_ptr<EVP_MD_CTX, OpenSslFree>;
using SslCtxPtr = std::unique_ptr<SSL_CTX, OpenSslFree>;
using SslPtr = std::unique_ptr<SSL, OpenSslFree>;

// A read-only memory BIO over `pem` (which must outlive it). Throws Config naming
// `field` when out of memory.
BioPtr mem_bio(const std::string& pem, const std::string& field);

// ---------------------------------------------------------------- messages
// A server's text quoted in a message: control characters as spaces, at most `max`
// characters then "...".
std::string one_line(const std::string& s, size_t max = 200);

// " (request id X)", or "" for none.
std::string request_id_note(const std::string& id);

}  // namespace cmk::kit
