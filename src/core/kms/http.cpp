// libcurl behind cmk::http (http.hpp). Every handle is RAII; TLS verification is never
// switched off; CURLOPT_NOSIGNAL because this runs in the postmaster and in background
// workers whose signal handlers PostgreSQL owns. In a process with one thread a host
// name is resolved in a child process and handed to libcurl (resolve_entries), so that
// its threaded resolver never starts a thread there (kit::resolve_in_child; child.hpp
// says why that matters).
#include "http.hpp"

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <sys/single_threaded.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

namespace cmk::http {
namespace {

using kit::unavailable;

void global_init() {
    static std::once_flag once;
    std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

struct CurlDeleter {
    void operator()(CURL* c) const { curl_easy_cleanup(c); }
};
struct SlistDeleter {
    void operator()(curl_slist* l) const { curl_slist_free_all(l); }
};

size_t on_body(char* p, size_t size, size_t n, void* ud) {
    auto* out = static_cast<std::string*>(ud);
    size_t len = size * n;
    if (out->size() + len > (8u << 20)) return 0;  // a KMS answer is small: refuse floods
    out->append(p, len);
    return len;
}

size_t on_header(char* p, size_t size, size_t n, void* ud) {
    auto* h = static_cast<std::map<std::string, std::string>*>(ud);
    size_t len = size * n;
    std::string line(p, len);
    size_t colon = line.find(':');
    if (colon != std::string::npos) {
        std::string name = line.substr(0, colon);
        for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        std::string value = line.substr(colon + 1);
        size_t a = value.find_first_not_of(" \t");
        size_t b = value.find_last_not_of(" \t\r\n");
        value = a == std::string::npos ? "" : value.substr(a, b - a + 1);
        (*h)[name] = value;
    }
    return len;
}

std::string host_of(const std::string& url) {
    size_t s = url.find("://");
    size_t a = s == std::string::npos ? 0 : s + 3;
    size_t b = url.find_first_of("/?#", a);
    return url.substr(a, b == std::string::npos ? std::string::npos : b - a);
}


struct UrlDeleter {
    void operator()(CURLU* u) const { curl_url_cleanup(u); }
};

// The URL's scheme, host (as libcurl normalises it: an IPv6 literal in brackets) and
// port (default_port when it names none, or the scheme's when default_port is empty);
// false when libcurl cannot parse it (perform then reports libcurl's own error).
bool url_parts(const std::string& url, std::string& scheme, std::string& host, std::string& port,
               const char* default_port = nullptr) {
    std::unique_ptr<CURLU, UrlDeleter> u(curl_url());
    if (!u || curl_url_set(u.get(), CURLUPART_URL, url.c_str(), CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK) return false;
    auto part = [&u](CURLUPart what, unsigned flags, std::string& out) {
        char* v = nullptr;
        CURLUcode rc = curl_url_get(u.get(), what, &v, flags);
        if (rc == CURLUE_OK) out = v;
        curl_free(v);
        return rc;
    };
    if (part(CURLUPART_SCHEME, 0, scheme) != CURLUE_OK || part(CURLUPART_HOST, 0, host) != CURLUE_OK) return false;
    CURLUcode rc = part(CURLUPART_PORT, default_port ? 0 : CURLU_DEFAULT_PORT, port);
    if (rc == CURLUE_NO_PORT && default_port) {
        port = default_port;
        return true;
    }
    return rc == CURLUE_OK;
}

// The host and port of the proxy libcurl takes from the environment for a URL of this
// scheme, if any (it applies no_proxy; we do not). As libcurl does, the first variable
// set wins: https_proxy then HTTPS_PROXY (http_proxy in lower case only), then
// all_proxy, then ALL_PROXY; an empty one counts as unset. A proxy without a scheme is
// an HTTP proxy; one without a port listens on 443 (https://) or 1080 (the others). A
// proxy that does not parse gives an empty host.
std::optional<std::pair<std::string, std::string>> env_proxy(const std::string& scheme) {
    std::vector<const char*> names;
    if (scheme == "https") names = {"https_proxy", "HTTPS_PROXY"};
    if (scheme == "http") names = {"http_proxy"};
    names.push_back("all_proxy");
    names.push_back("ALL_PROXY");
    for (const char* n : names) {
        const char* v = std::getenv(n);
        if (!v || !*v) continue;
        std::string url = std::strstr(v, "://") ? v : std::string("http://") + v;
        std::string ps, ph, pp;
        // Unparsable: libcurl uses it all the same and reports it; nothing to resolve.
        if (!url_parts(url, ps, ph, pp, "")) return std::make_pair(std::string(), std::string());
        if (pp.empty()) pp = ps == "https" ? "443" : "1080";
        return std::make_pair(ph, pp);
    }
    return std::nullopt;
}

}  // namespace

std::string Response::header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? "" : it->second;
}

std::vector<std::string> resolve_entries(const std::string& url, long timeout_ms, const Resolver& resolver) {
    std::vector<std::string> out;
    std::string scheme, host, port;
    if (!url_parts(url, scheme, host, port)) return out;
    const auto proxy = env_proxy(scheme);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    // Behind a proxy only the proxy's name: the endpoint's is the proxy's to resolve,
    // and a local DNS that cannot (a firewalled one may not even answer) must not eat the
    // request's time. A proxy's name that does not resolve is libcurl's to report.
    auto add = [&](const std::string& h, const std::string& p, bool must_resolve) {
        if (h.empty() || kit::numeric_host(h)) return;
        const long left = static_cast<long>(
            (std::chrono::duration_cast<std::chrono::microseconds>(deadline - std::chrono::steady_clock::now()).count() +
             999) / 1000);  // rounded up: the first name gets the whole timeout
        std::vector<std::string> addrs;
        try {
            addrs = kit::resolve_in_child(h, p, std::max(1L, left), resolver);
        } catch (const KmsError&) {
            if (must_resolve) throw;
            return;
        }
        std::string entry = h + ":" + p + ":";
        for (size_t i = 0; i < addrs.size(); ++i) entry += (i ? "," : "") + addrs[i];
        out.push_back(entry);
    };
    if (proxy)
        add(proxy->first, proxy->second, false);
    else
        add(host, port, true);
    return out;
}

Response perform(const Request& req) {
    global_init();
    std::unique_ptr<CURL, CurlDeleter> c(curl_easy_init());
    if (!c) throw unavailable("could not initialise libcurl");
    std::unique_ptr<curl_slist, SlistDeleter> hdrs;
    for (const auto& h : req.headers) {
        std::string line = h.first + ": " + h.second;
        curl_slist* n = curl_slist_append(hdrs.get(), line.c_str());
        OPENSSL_cleanse(&line[0], line.size());  // may carry a bearer token
        if (!n) throw unavailable("out of memory building an HTTP request");
        hdrs.release();
        hdrs.reset(n);
    }
    // An empty Expect: stops libcurl from waiting for "100 Continue" on POST bodies.
    {
        curl_slist* n = curl_slist_append(hdrs.get(), "Expect:");
        if (!n) throw unavailable("out of memory building an HTTP request");
        hdrs.release();
        hdrs.reset(n);
    }
    Response r;
    CURL* h = c.get();
    // One thread: the host name is resolved in a child; the time it took comes off the
    // request's, so the whole request keeps its bound.
    long timeout_ms = req.timeout_ms, connect_timeout_ms = req.connect_timeout_ms;
    std::unique_ptr<curl_slist, SlistDeleter> resolved;
    if (__libc_single_threaded) {
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::string> entries;
        try {
            entries =
                resolve_entries(req.url, connect_timeout_ms > 0 ? std::min(connect_timeout_ms, timeout_ms) : timeout_ms);
        } catch (const KmsError& e) {
            throw KmsError(e.kind, "request to " + host_of(req.url) + " failed: " + e.what());
        }
        for (const std::string& entry : entries) {
            curl_slist* n = curl_slist_append(resolved.get(), entry.c_str());
            if (!n) throw unavailable("out of memory building an HTTP request");
            resolved.release();
            resolved.reset(n);
        }
        if (resolved) {
            curl_easy_setopt(h, CURLOPT_RESOLVE, resolved.get());
            const long spent = static_cast<long>(
                std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count());
            timeout_ms = std::max(1L, timeout_ms - spent);
            connect_timeout_ms = std::min(connect_timeout_ms, timeout_ms);
        }
    }
    curl_easy_setopt(h, CURLOPT_URL, req.url.c_str());
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(h, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
    if (!req.ca_file.empty()) curl_easy_setopt(h, CURLOPT_CAINFO, req.ca_file.c_str());
    if (!req.client_cert.empty()) curl_easy_setopt(h, CURLOPT_SSLCERT, req.client_cert.c_str());
    if (!req.client_key.empty()) curl_easy_setopt(h, CURLOPT_SSLKEY, req.client_key.c_str());
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, req.method.c_str());
    if (req.method == "GET") {
        curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    } else if (req.method != "HEAD") {
        curl_easy_setopt(h, CURLOPT_POSTFIELDS, req.body.data());
        curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(req.body.size()));
    }
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs.get());
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &r.body);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &r.headers);
    char errbuf[CURL_ERROR_SIZE] = {0};
    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf);
    CURLcode rc = curl_easy_perform(h);
    if (rc != CURLE_OK) {
        std::string why = errbuf[0] ? errbuf : curl_easy_strerror(rc);
        throw unavailable("request to " + host_of(req.url) + " failed: " + why);
    }
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r.status);
    return r;
}

bool transient_status(long s) {
    return s == 408 || s == 429 || s == 500 || s == 502 || s == 503 || s == 504;
}

Response perform_with_retry(const Request& req, const RetryPolicy& policy,
                            const std::function<bool(const Response&)>& transient) {
    kit::Backoff backoff;
    int attempts = policy.attempts < 1 ? 1 : policy.attempts;
    for (int i = 1;; ++i) {
        bool last = i >= attempts;
        try {
            Response r = perform(req);
            bool again = transient ? transient(r) : transient_status(r.status);
            if (!again || last) return r;
        } catch (const KmsError& e) {
            if (e.kind != KmsErrorKind::Unavailable || last) throw;
        }
        backoff.pause();
    }
}

std::string url_encode(const std::string& s, bool keep_slash) {
    static const char* hex = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) {
        if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
            out.push_back(static_cast<char>(c));
        } else {
            out.push_back('%');
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
        }
    }
    return out;
}

Request request(const std::string& method, const std::string& url, const kit::Timing& timing,
                const std::string& ca_file) {
    Request r;
    r.method = method;
    r.url = url;
    r.ca_file = ca_file;
    r.timeout_ms = timing.timeout_ms;
    r.connect_timeout_ms = std::min(timing.connect_timeout_ms, timing.timeout_ms);
    return r;
}

void wipe(Request& req) {
    for (auto& h : req.headers) kit::wipe(h.second);
    kit::wipe(req.body);
}

Response send_wiped_via(const Transport& transport, Request& req, const std::string& what) {
    struct Guard {
        Request& r;
        ~Guard() { wipe(r); }
    } guard{req};
    try {
        return transport ? transport(req) : perform_with_retry(req);
    } catch (const KmsError& e) {
        throw KmsError(e.kind, what + ": " + e.what());
    }
}

Response send_wiped(Request& req, const std::string& what, const RetryPolicy& policy,
                    const std::function<bool(const Response&)>& transient) {
    return send_wiped_via([&](const Request& r) { return perform_with_retry(r, policy, transient); }, req,
                          what);
}

}  // namespace cmk::http
