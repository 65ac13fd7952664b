// libcurl behind cmk::http (http.hpp). Every handle is RAII; TLS verification is never
// switched off; CURLOPT_NOSIGNAL because this runs in the postmaster and in background
// workers whose signal handlers PostgreSQL owns.
#include "http.hpp"

#include <curl/curl.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <thread>

#include "cmk_lakebase/base/sys.hpp"

namespace cmk::http {
namespace {

KmsError unavailable(const std::string& m) {
    return KmsError(KmsErrorKind::Unavailable, m);
}
KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}

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
    std::mt19937 rng(std::random_device{}());
    long delay = policy.first_delay_ms;
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
        long jitter = delay > 1 ? static_cast<long>(rng() % static_cast<unsigned long>(delay / 2 + 1)) : 0;
        std::this_thread::sleep_for(std::chrono::milliseconds(delay / 2 + jitter));
        delay = std::min(delay * 2, policy.max_delay_ms);
    }
}

std::string url_encode(const std::string& s) {
    static const char* hex = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : s) {
        if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
            out.push_back(static_cast<char>(c));
        } else {
            out.push_back('%');
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 15]);
        }
    }
    return out;
}

Secret::~Secret() {
    if (!v_.empty()) OPENSSL_cleanse(&v_[0], v_.size());
}

Secret& Secret::operator=(Secret&& o) noexcept {
    if (this != &o) {
        if (!v_.empty()) OPENSSL_cleanse(&v_[0], v_.size());
        v_ = std::move(o.v_);
        o.v_.clear();
    }
    return *this;
}

Secret read_secret_file(const std::string& field, const std::string& path) {
    if (path.empty()) throw config_error(field + ": empty file path");
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
        throw config_error(field + ": cannot read \"" + path + "\": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw config_error(field + ": \"" + path + "\" is not a regular file");
    if (st.st_mode & 077)
        throw config_error(field + ": \"" + path + "\" is readable by group or others; run: chmod 600 " +
                           path);
    std::string text;
    try {
        text = sys::read_file(path.c_str());
    } catch (const std::exception& e) {
        throw config_error(field + ": " + e.what());
    }
    Secret s(std::move(text));
    std::string& v = const_cast<std::string&>(s.str());
    while (!v.empty() && std::isspace(static_cast<unsigned char>(v.back()))) {
        v.back() = 0;
        v.pop_back();
    }
    if (v.empty()) throw config_error(field + ": \"" + path + "\" is empty");
    return s;
}

Secret secret_from(const KeyConfig& cfg, const std::string& file_option, const char* env_var) {
    auto it = cfg.options.find(file_option);
    if (it != cfg.options.end() && !it->second.empty()) return read_secret_file(file_option, it->second);
    const char* e = env_var ? std::getenv(env_var) : nullptr;
    if (e && *e) return Secret(e);
    return Secret();
}

void require_readable_file(const std::string& field, const std::string& path) {
    struct stat st;
    if (path.empty()) throw config_error(field + ": empty file path");
    if (::stat(path.c_str(), &st) != 0)
        throw config_error(field + ": cannot read \"" + path + "\": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw config_error(field + ": \"" + path + "\" is not a regular file");
    if (::access(path.c_str(), R_OK) != 0)
        throw config_error(field + ": cannot read \"" + path + "\": " + std::strerror(errno));
}

std::string option(const KeyConfig& cfg, const std::string& name, const std::string& def) {
    auto it = cfg.options.find(name);
    return it == cfg.options.end() ? def : it->second;
}

}  // namespace cmk::http
