// The provider kit (kit.hpp): the helpers every key provider shares, so that each
// provider file holds only its protocol. Secrets are wiped with OPENSSL_cleanse on
// every path; no secret is ever quoted in a message (files are named by path, never
// by content).
#include "kit.hpp"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "cmk_lakebase/base/child.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::kit {

KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}
KmsError unavailable(const std::string& m) {
    return KmsError(KmsErrorKind::Unavailable, m);
}
KmsError revoked(const std::string& m) {
    return KmsError(KmsErrorKind::Revoked, m);
}

KeyStatus status_from_error(const KmsError& e, const char* revoked_state) {
    if (e.kind == KmsErrorKind::Config) throw e;
    KeyStatus s;
    bool rev = e.kind == KmsErrorKind::Revoked;
    s.health = rev ? KeyHealth::Revoked : KeyHealth::Unavailable;
    s.state = rev ? revoked_state : "unavailable";
    s.detail = e.what();
    return s;
}

// ---------------------------------------------------------------- secrets

void wipe(std::string& s) {
    if (!s.empty()) OPENSSL_cleanse(&s[0], s.size());
    s.clear();
}

Secret::~Secret() {
    wipe(v_);
}

Secret& Secret::operator=(Secret&& o) noexcept {
    if (this != &o) {
        wipe(v_);
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
    // Trimmed in place: a copy would leave the secret's text behind.
    while (!text.empty() && std::isspace(static_cast<unsigned char>(text.back()))) {
        text.back() = 0;
        text.pop_back();
    }
    Secret s(std::move(text));
    if (s.empty()) throw config_error(field + ": \"" + path + "\" is empty");
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

void require_private_file(const std::string& field, const std::string& path) {
    require_readable_file(field, path);
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077)) {
        char mode[8];
        std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
        throw config_error(field + ": \"" + path + "\" is accessible by group or others (mode " + mode +
                           "); run: chmod 600 " + path);
    }
}

SecureBytes decode_secret(const char* b64, size_t n, bool url) {
    std::string text(b64, n);
    WipeOnExit wt{text};
    std::vector<uint8_t> raw = url ? base64url_decode(text) : base64_decode(text);
    SecureBytes out(raw.data(), raw.size());
    OPENSSL_cleanse(raw.data(), raw.size());
    return out;
}

SecureBytes decode_secret(const rapidjson::Value* v, const KmsError& absent, const KmsError& not_base64,
                          bool url) {
    if (!v || !v->IsString()) throw absent;
    try {
        return decode_secret(v->GetString(), v->GetStringLength(), url);
    } catch (const CryptoError&) {
        throw not_base64;
    }
}

// ---------------------------------------------------------------- options, environment

std::string option(const KeyConfig& cfg, const std::string& name, const std::string& def) {
    auto it = cfg.options.find(name);
    return it == cfg.options.end() ? def : it->second;
}

void require_known_options(const KeyConfig& cfg, const std::string& who,
                           std::initializer_list<const char*> known) {
    for (const auto& o : cfg.options) {
        bool ok = false;
        for (const char* k : known) ok = ok || o.first == k;
        if (ok) continue;
        std::string list;
        for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
        throw config_error(o.first + ": unknown option of " + who + " (known: " + list + ")");
    }
}

long int_option(const KeyConfig& cfg, const std::string& name, long def, long lo, long hi, const char* unit) {
    std::string v = option(cfg, name);
    if (v.empty()) return def;
    long n = -1;
    if (v.size() <= 18 && v.find_first_not_of("0123456789") == std::string::npos) n = std::stol(v);
    if (n < lo || n > hi)
        throw config_error(name + ": \"" + v + "\" is not a number " +
                           (unit ? std::string("of ") + unit + " " : "") + "from " + std::to_string(lo) +
                           " to " + std::to_string(hi));
    return n;
}

std::string env(const char* name) {
    const char* v = std::getenv(name);
    return v ? v : "";
}

std::string home_dir() {
    std::string h = env("HOME");
    if (h.empty()) {
        struct passwd* pw = getpwuid(getuid());
        if (pw && pw->pw_dir) h = pw->pw_dir;
    }
    return h;
}

bool parse_utc_time(const std::string& s, std::time_t* out) {
    std::tm tm{};
    const char* end = strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
    if (!end) return false;
    if (*end == '.') {
        ++end;
        while (*end >= '0' && *end <= '9') ++end;
    }
    long off = 0;
    if (*end == 'Z' || *end == 'z') {
        ++end;
    } else if ((*end == '+' || *end == '-') && std::strlen(end) == 6 && end[3] == ':') {
        int hh = 0, mm = 0;
        if (std::sscanf(end + 1, "%2d:%2d", &hh, &mm) != 2 || hh > 23 || mm > 59) return false;
        off = (hh * 3600L + mm * 60L) * (*end == '+' ? 1 : -1);
        end += 6;
    } else {
        return false;
    }
    if (*end) return false;
    *out = timegm(&tm) - off;
    return true;
}

std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = s.find_last_not_of(" \t\r\n");
    return s.substr(a, b - a + 1);
}

bool is_uuid(const std::string& s) {
    if (s.size() != 36) return false;
    for (size_t i = 0; i < s.size(); ++i) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-' : !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
    }
    return true;
}

bool truthy(const std::string& v) {
    return v == "1" || v == "true" || v == "yes" || v == "on";
}

// ---------------------------------------------------------------- plain http

bool loopback_authority(const std::string& a) {
    if (a.find('@') != std::string::npos) return false;  // user@host: the host is what follows
    if (!a.empty() && a[0] == '[') {
        size_t e = a.find(']');
        if (e == std::string::npos || (e + 1 < a.size() && a[e + 1] != ':')) return false;
        return a.compare(1, e - 1, "::1") == 0 && e == 4;
    }
    std::string host = a.substr(0, a.find(':'));
    if (host == "localhost") return true;
    // A literal only: a DNS name that merely starts with "127." may resolve anywhere.
    in_addr addr{};
    return inet_pton(AF_INET, host.c_str(), &addr) == 1 && (ntohl(addr.s_addr) >> 24) == 127;
}

bool numeric_host(const std::string& host) {
    unsigned char buf[sizeof(struct in6_addr)];
    if (host.size() > 2 && host.front() == '[' && host.back() == ']')
        return ::inet_pton(AF_INET6, host.substr(1, host.size() - 2).c_str(), buf) == 1;
    return ::inet_pton(AF_INET, host.c_str(), buf) == 1 || ::inet_pton(AF_INET6, host.c_str(), buf) == 1;
}

namespace {

constexpr size_t kMaxAddresses = 16;
constexpr size_t kMaxResolveAnswer = 4096;
constexpr int kMaxResolversLeft = 4;

// An address as resolve_in_child hands it on: IPv4, or IPv6 in brackets.
bool address_entry(const std::string& a) {
    return !a.empty() && (a.front() == '[' || a.find(':') == std::string::npos) && numeric_host(a);
}

// getaddrinfo, as libcurl's own resolver asks it: any family, stream sockets.
std::vector<std::string> system_resolve(const std::string& host, const std::string& port) {
    struct addrinfo hints;
    std::memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    struct addrinfo* res = nullptr;
    int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &res);
    if (rc != 0) throw std::runtime_error(rc == EAI_SYSTEM ? std::strerror(errno) : ::gai_strerror(rc));
    std::unique_ptr<struct addrinfo, decltype(&::freeaddrinfo)> hold(res, ::freeaddrinfo);
    std::vector<std::string> out;
    for (const struct addrinfo* a = res; a && out.size() < kMaxAddresses; a = a->ai_next) {
        char text[INET6_ADDRSTRLEN];
        std::string t;
        if (a->ai_family == AF_INET &&
            ::inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr, text, sizeof text))
            t = text;
        else if (a->ai_family == AF_INET6 &&
                 ::inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr, text,
                             sizeof text))
            t = "[" + std::string(text) + "]";
        if (!t.empty() && std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    }
    return out;
}

}  // namespace

std::vector<std::string> resolve_in_child(const std::string& host, const std::string& port, long timeout_ms,
                                          const Resolver& resolver) {
    auto fail = [&host](const std::string& why) { return unavailable("could not resolve host " + host + ": " + why); };
    if (sys::children_left_behind() >= kMaxResolversLeft)
        throw fail(std::to_string(kMaxResolversLeft) + " earlier resolutions have not ended");
    const Resolver& resolve = resolver ? resolver : Resolver(system_resolve);
    // The child sends 'A' and the addresses, comma-separated, or 'E' and the reason.
    auto work = [&](int fd) {
        std::string msg;
        try {
            std::vector<std::string> addrs = resolve(host, port);
            if (addrs.empty()) throw std::runtime_error("no address");
            msg = "A";
            for (size_t i = 0; i < addrs.size() && i < kMaxAddresses; ++i) msg += (i ? "," : "") + addrs[i];
        } catch (const std::exception& e) {
            msg = std::string("E") + e.what();
        }
        return sys::write_full(fd, msg.data(), std::min(msg.size(), kMaxResolveAnswer)) == 0 ? 0 : 1;
    };
    std::string got;
    const sys::ChildRun run = sys::run_in_child(work, timeout_ms, kMaxResolveAnswer, got);
    switch (run.outcome) {
        case sys::ChildRun::Outcome::NotStarted:
            throw fail(std::string("could not start a process to resolve it: ") + std::strerror(run.error));
        case sys::ChildRun::Outcome::TimedOut:
            throw fail("no answer within " + std::to_string(timeout_ms) + " ms");
        case sys::ChildRun::Outcome::Failed:
            throw fail("its resolver process failed");
        case sys::ChildRun::Outcome::Done:
            break;
    }
    if (!got.empty() && got[0] == 'E') throw fail(got.substr(1));
    if (got.size() < 2 || got[0] != 'A') throw fail("its resolver process failed");
    // Only numeric addresses are handed on (they reach libcurl's options and connect()).
    std::vector<std::string> out;
    size_t start = 1;
    for (;;) {
        size_t comma = got.find(',', start);
        std::string a = got.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!address_entry(a) || out.size() >= kMaxAddresses) throw fail("its resolver process answered \"" + a + "\"");
        out.push_back(a);
        if (comma == std::string::npos) break;
        start = comma + 1;
    }
    return out;
}

bool https_or_loopback(const std::string& url) {
    if (url.compare(0, 8, "https://") == 0) return url.size() > 8;
    if (url.compare(0, 7, "http://") != 0) return false;
    std::string rest = url.substr(7);
    return loopback_authority(rest.substr(0, rest.find_first_of("/?#")));
}

// ---------------------------------------------------------------- timeouts, retries

Timing read_timing(const KeyConfig& cfg) {
    Timing t;
    t.timeout_ms = int_option(cfg, "timeout_ms", kTimeoutMs, 100, 9999999, "milliseconds");
    t.connect_timeout_ms =
        int_option(cfg, "connect_timeout_ms", kConnectTimeoutMs, 100, 600000, "milliseconds");
    t.attempts = static_cast<int>(int_option(cfg, "retries", kAttempts, 1, 10));
    return t;
}

void Backoff::pause() {
    unsigned long half = static_cast<unsigned long>(delay_ms_ / 2);
    long jitter = static_cast<long>(rng_() % (half + 1));
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_ / 2 + jitter));
    delay_ms_ = std::min(delay_ms_ * 2, 2000L);
}

// ---------------------------------------------------------------- token cache

Secret TokenCache::get(bool refresh, const std::function<Secret(long* life_s)>& fetch) {
    std::lock_guard<std::mutex> g(mu_);
    auto now = std::chrono::steady_clock::now();
    if (!refresh && !token_.empty() && now < until_) return token_.copy();
    long life = 0;
    token_ = Secret();
    Secret t = fetch(&life);
    // The life comes from a peer's answer: bounded before it reaches clock arithmetic
    // (a huge expires_in would overflow steady_clock's nanoseconds).
    if (life < 0) life = 0;
    if (life > kMaxTokenLifeS) life = kMaxTokenLifeS;
    long keep = life > 2 * margin_s_ ? life - margin_s_ : life / 2;
    token_ = std::move(t);
    until_ = now + std::chrono::seconds(keep);
    return token_.copy();
}

void TokenCache::forget() {
    std::lock_guard<std::mutex> g(mu_);
    token_ = Secret();
}

// ---------------------------------------------------------------- JSON answers

const rapidjson::Value* member(const rapidjson::Value& o, const char* name) {
    if (!o.IsObject()) return nullptr;
    auto it = o.FindMember(name);
    return it == o.MemberEnd() ? nullptr : &it->value;
}

const rapidjson::Value& member_or_null(const rapidjson::Value& o, const char* name) {
    static const rapidjson::Value null_value;
    const rapidjson::Value* v = member(o, name);
    return v ? *v : null_value;
}

std::string string_of(const rapidjson::Value* v) {
    return v && v->IsString() ? std::string(v->GetString(), v->GetStringLength()) : std::string();
}

std::string string_member(const rapidjson::Value& o, const char* name) {
    return string_of(member(o, name));
}

bool int_member(const rapidjson::Value& o, const char* name, long long* out) {
    const rapidjson::Value* v = member(o, name);
    if (!v) return false;
    if (v->IsInt64()) {
        *out = v->GetInt64();
        return true;
    }
    if (v->IsNumber()) {  // a double from the peer: out of range is UB to convert
        double d = v->GetDouble();
        if (!(d > -9.0e18 && d < 9.0e18)) return false;
        *out = static_cast<long long>(d);
        return true;
    }
    if (v->IsString() && v->GetStringLength() > 0 && v->GetStringLength() < 19) {
        const char* s = v->GetString();
        for (const char* p = s; *p; ++p)
            if (!std::isdigit(static_cast<unsigned char>(*p))) return false;
        *out = std::strtoll(s, nullptr, 10);
        return true;
    }
    return false;
}

// ---------------------------------------------------------------- OpenSSL handles

void OpenSslFree::operator()(BIO* p) const {
    BIO_free(p);
}
void OpenSslFree::operator()(EVP_PKEY* p) const {
    EVP_PKEY_free(p);
}
void OpenSslFree::operator()(X509* p) const {
    X509_free(p);
}
void OpenSslFree::operator()(EVP_MD_CTX* p) const {
    EVP_MD_CTX_free(p);
}
void OpenSslFree::operator()(SSL_CTX* p) const {
    SSL_CTX_free(p);
}
void OpenSslFree::operator()(SSL* p) const {
    SSL_free(p);
}

BioPtr mem_bio(const std::string& pem, const std::string& field) {
    BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!b) throw config_error(field + ": out of memory");
    return b;
}

// ---------------------------------------------------------------- messages

std::string one_line(const std::string& s, size_t max) {
    std::string out = s.substr(0, max);
    for (char& c : out)
        if (static_cast<unsigned char>(c) < 0x20) c = ' ';
    if (s.size() > max) out += "...";
    return out;
}

std::string request_id_note(const std::string& id) {
    return id.empty() ? "" : " (request id " + id + ")";
}

}  // namespace cmk::kit
