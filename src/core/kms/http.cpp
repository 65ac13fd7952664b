// libcurl behind cmk::http (http.hpp). Every handle is RAII; TLS verification is never
// switched off; CURLOPT_NOSIGNAL because this runs in the postmaster and in background
// workers whose signal handlers PostgreSQL owns.
#include "http.hpp"

#include <curl/curl.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <cctype>
#include <memory>
#include <mutex>

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

}  // namespace

std::string Response::header(const std::string& lower_name) const {
    auto it = headers.find(lower_name);
    return it == headers.end() ? "" : it->second;
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
    curl_easy_setopt(h, CURLOPT_URL, req.url.c_str());
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, req.connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, req.timeout_ms);
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
