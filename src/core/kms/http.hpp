// HTTP for the KMS providers (DESIGN §6): one libcurl request with bounded timeouts,
// TLS peer and host verification always on (an optional CA file replaces the system
// store; it never turns verification off), and retries with backoff for transient
// answers only. Transport failures are KmsError Unavailable; what an HTTP status
// means is each provider's decision. The rest a provider needs (options, secrets,
// timing defaults, the loopback rule) is the kit's (kit.hpp). Pure C++ on libcurl;
// knows nothing of PostgreSQL.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "cmk_lakebase/kms/provider.hpp"
#include "kit.hpp"

namespace cmk::http {

struct Request {
    std::string method = "POST";
    std::string url;
    std::vector<std::pair<std::string, std::string>> headers;  // name, value
    std::string body;
    long connect_timeout_ms = kit::kConnectTimeoutMs;
    long timeout_ms = kit::kTimeoutMs;  // whole request
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
// message naming the host and curl's reason; never the request body. In a process with
// one thread (glibc's __libc_single_threaded) host names are resolved first by
// resolve_entries, within the connect timeout, and the request keeps what is left of
// its own; elsewhere libcurl resolves them (Debian's libcurl: on a thread).
Response perform(const Request& req);

using kit::Resolver;

// The CURLOPT_RESOLVE entries ("host:port:addr[,addr...]") for the names libcurl will
// look up for this URL, resolved by kit::resolve_in_child (in a child process, all
// within timeout_ms) so that libcurl's threaded resolver never starts a thread in this
// process: the URL's host, or, when the environment gives a proxy for its scheme, the
// host of the proxy libcurl takes (the first set of https_proxy, HTTPS_PROXY or
// http_proxy, then all_proxy, ALL_PROXY) instead: the proxy resolves the URL's; a URL
// that no_proxy exempts is then resolved by libcurl, on its thread. At most one entry. IP literals need no entry; an unparsable URL
// gets none (libcurl reports it). Throws kit::resolve_in_child's Unavailable when the
// URL's host does not resolve; a proxy's that does not gets no entry (libcurl reports
// it). Only for a process with one thread.
std::vector<std::string> resolve_entries(const std::string& url, long timeout_ms, const Resolver& resolver = nullptr);

struct RetryPolicy {
    int attempts = kit::kAttempts;  // total tries; pauses between them: kit::Backoff
};

// HTTP statuses that are transient everywhere: 408, 429, 500, 502, 503, 504.
bool transient_status(long status);

// perform() with retries: a transport error or a response for which `transient`
// says true is retried after a backoff; the last response (or error) is returned
// (thrown). `transient` defaults to transient_status(status).
Response perform_with_retry(const Request& req, const RetryPolicy& policy = {},
                            const std::function<bool(const Response&)>& transient = nullptr);

// RFC 3986 percent-encoding of everything but unreserved characters (and '/' when
// keep_slash: a path, as SigV4's canonical URI wants it).
std::string url_encode(const std::string& s, bool keep_slash = false);

// A request with a provider's timing and CA bundle ("" = the system's trust store).
// The connect timeout is never above the whole request's.
Request request(const std::string& method, const std::string& url, const kit::Timing& timing,
                const std::string& ca_file);

// Wipes every header value and the body of a request (tokens, signatures, key material).
void wipe(Request& req);

// perform_with_retry(), with the request wiped (wipe()) on every path. A transport
// failure is rethrown as a KmsError of the same kind whose message is
// `what + ": " + the transport's message`.
Response send_wiped(Request& req, const std::string& what, const RetryPolicy& policy = {},
                    const std::function<bool(const Response&)>& transient = nullptr);

// How a provider sends its requests: perform_with_retry in production; the unit tests
// and the fuzz targets give the provider factories canned answers instead.
using Transport = std::function<Response(const Request&)>;

// send_wiped() through `transport` (perform_with_retry with the default policy when it
// is empty): same wiping, same messages.
Response send_wiped_via(const Transport& transport, Request& req, const std::string& what);

// The secrets of kit.hpp, under the names the HTTP providers and their tests know.
using kit::Secret;

}  // namespace cmk::http
