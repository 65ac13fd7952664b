// The Google Cloud KMS key provider ("gcp"). The CMK is a symmetric CryptoKey
// (projects/P/locations/L/keyRings/R/cryptoKeys/K); the KEK is wrapped by
// POST v1/{name}:encrypt and unwrapped by :decrypt, with fixed additional
// authenticated data and CRC32C integrity fields in both directions, so the key never
// leaves Cloud KMS. Status reads the CryptoKey and judges its primary version's state.
//
// Credentials: a service-account key file (credentials_file, else
// $GOOGLE_APPLICATION_CREDENTIALS) traded for an access token by the JWT bearer grant
// (RFC 7523, RS256 assertion signed here, jwt.hpp), or the metadata server
// (metadata_host, else $GCE_METADATA_HOST, else metadata.google.internal). Access
// tokens are cached until a minute before they expire. The private key is read when a
// token is needed and wiped after signing; no secret appears in a message.
#include "gcp.hpp"

#include <openssl/crypto.h>

#include <rapidjson/document.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>

#include "http.hpp"
#include "jwt.hpp"

namespace cmk {

namespace gcp {

namespace {

bool part_ok(const std::string& p, bool project) {
    if (p.empty() || p.size() > 255) return false;
    for (char c : p) {
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
                  c == '-' || (project && (c == '.' || c == ':'));
        if (!ok) return false;
    }
    return true;
}

std::string one_line(std::string m) {
    for (char& c : m)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    if (m.size() > 200) m = m.substr(0, 200) + "...";
    return m;
}

}  // namespace

bool valid_crypto_key_name(const std::string& name) {
    static const char* labels[] = {"projects", "locations", "keyRings", "cryptoKeys"};
    size_t pos = 0;
    for (int i = 0; i < 4; i++) {
        size_t a = name.find('/', pos);
        if (a == std::string::npos || name.compare(pos, a - pos, labels[i]) != 0) return false;
        size_t b = name.find('/', a + 1);
        std::string part = name.substr(a + 1, b == std::string::npos ? std::string::npos : b - a - 1);
        if (!part_ok(part, i == 0)) return false;
        if (i == 3) return b == std::string::npos;
        if (b == std::string::npos) return false;
        pos = b + 1;
    }
    return false;
}

ApiError parse_error(const std::string& body) {
    ApiError e;
    rapidjson::Document d;
    d.Parse(body.c_str(), body.size());
    if (d.HasParseError() || !d.IsObject()) return e;
    auto it = d.FindMember("error");
    if (it == d.MemberEnd()) return e;
    if (it->value.IsString()) {  // OAuth token endpoint
        e.status = it->value.GetString();
        auto ds = d.FindMember("error_description");
        if (ds != d.MemberEnd() && ds->value.IsString()) e.message = one_line(ds->value.GetString());
        return e;
    }
    if (!it->value.IsObject()) return e;
    auto st = it->value.FindMember("status");
    if (st != it->value.MemberEnd() && st->value.IsString()) e.status = st->value.GetString();
    auto m = it->value.FindMember("message");
    if (m != it->value.MemberEnd() && m->value.IsString()) e.message = one_line(m->value.GetString());
    return e;
}

KeyHealth classify(Op op, long s, const ApiError& err, bool* config) {
    if (config) *config = false;
    if (s >= 200 && s < 300) return KeyHealth::Ok;
    if (s == 429 || s == 408 || s >= 500) return KeyHealth::Unavailable;
    if (op == Op::Token) {
        // A refused assertion because of our clock is an outage we can fix by waiting
        // (or NTP), not a revocation of the service account.
        bool skew = err.message.find("timeframe") != std::string::npos ||
                    err.message.find("clock") != std::string::npos;
        if ((s == 400 || s == 401) && skew) return KeyHealth::Unavailable;
        if (s == 400 || s == 401 || s == 403 || s == 404) return KeyHealth::Revoked;
    } else {
        if (s == 401 || s == 403 || s == 404) return KeyHealth::Revoked;
        if (s == 400 && err.status == "FAILED_PRECONDITION") return KeyHealth::Revoked;
        if (s == 400 && op == Op::Decrypt) return KeyHealth::Revoked;
    }
    if (config) *config = true;
    return KeyHealth::Unavailable;
}

KeyHealth version_state_health(const std::string& st) {
    if (st == "ENABLED") return KeyHealth::Ok;
    if (st == "DISABLED" || st == "DESTROY_SCHEDULED" || st == "DESTROYED" || st == "IMPORT_FAILED" ||
        st == "GENERATION_FAILED" || st == "EXTERNAL_DESTRUCTION_FAILED")
        return KeyHealth::Revoked;
    return KeyHealth::Unavailable;
}

}  // namespace gcp

namespace {

using gcp::Op;

constexpr const char* kScope = "https://www.googleapis.com/auth/cloudkms";
constexpr const char* kDefaultEndpoint = "https://cloudkms.googleapis.com";
constexpr const char* kDefaultMetadataHost = "metadata.google.internal";
// Binds our ciphertext to its purpose: decrypt with any other AAD fails.
constexpr const char* kWrapAad = "cmk_lakebase gcp kek v1";

KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}

struct Wipe {
    std::string& s;
    ~Wipe() {
        if (!s.empty()) OPENSSL_cleanse(&s[0], s.size());
    }
};

const rapidjson::Value* member(const rapidjson::Value& o, const char* name) {
    if (!o.IsObject()) return nullptr;
    auto it = o.FindMember(name);
    return it == o.MemberEnd() ? nullptr : &it->value;
}

std::string str_field(const rapidjson::Value& o, const char* name) {
    const rapidjson::Value* v = member(o, name);
    return v && v->IsString() ? std::string(v->GetString(), v->GetStringLength()) : std::string();
}

// Plain http is accepted only towards this machine (test servers, local proxies): a
// bearer token or a signed assertion never crosses a network in clear.
bool url_ok(const std::string& url) {
    if (url.rfind("https://", 0) == 0) return url.size() > 8;
    if (url.rfind("http://", 0) != 0) return false;
    std::string rest = url.substr(7);
    for (const char* h : {"127.0.0.1", "localhost", "[::1]"}) {
        size_t n = std::strlen(h);
        if (rest.compare(0, n, h) == 0 && (rest.size() == n || rest[n] == ':' || rest[n] == '/')) return true;
    }
    return false;
}

std::string crc_str(const void* p, size_t n) {
    return std::to_string(crc32c(p, n));
}

// A service-account key file's fields. private_key is wiped with the object.
struct ServiceAccount {
    std::string client_email;
    std::string private_key_id;
    std::string token_uri;
    http::Secret private_key;
};

ServiceAccount load_service_account(const std::string& field, const std::string& path) {
    http::Secret text = http::read_secret_file(field, path);
    std::string buf = text.str();
    Wipe w{buf};
    rapidjson::Document d;
    d.ParseInsitu(&buf[0]);
    if (d.HasParseError() || !d.IsObject())
        throw config_error(field + ": \"" + path + "\" is not a JSON service-account key file");
    std::string type = str_field(d, "type");
    if (type != "service_account")
        throw config_error(field + ": \"" + path + "\" has type \"" + type +
                           "\"; only service_account key files are supported (or use the metadata server)");
    ServiceAccount sa;
    sa.client_email = str_field(d, "client_email");
    sa.private_key_id = str_field(d, "private_key_id");
    sa.token_uri = str_field(d, "token_uri");
    if (sa.token_uri.empty()) sa.token_uri = "https://oauth2.googleapis.com/token";
    const rapidjson::Value* pk = member(d, "private_key");
    if (sa.client_email.empty()) throw config_error(field + ": \"" + path + "\" has no client_email");
    if (!pk || !pk->IsString() || pk->GetStringLength() == 0)
        throw config_error(field + ": \"" + path + "\" has no private_key");
    if (!url_ok(sa.token_uri))
        throw config_error(field + ": token_uri in \"" + path + "\" must be an https:// URL, got \"" +
                           sa.token_uri + "\"");
    sa.private_key = http::Secret(std::string(pk->GetString(), pk->GetStringLength()));
    return sa;
}

class GcpProvider : public KeyProvider {
public:
    GcpProvider(KeyConfig cfg, std::string creds_field, std::string creds_path, std::string metadata_host)
        : cfg_(std::move(cfg)),
          creds_field_(std::move(creds_field)),
          creds_path_(std::move(creds_path)),
          metadata_host_(std::move(metadata_host)) {
        endpoint_ = http::option(cfg_, "endpoint", kDefaultEndpoint);
        while (!endpoint_.empty() && endpoint_.back() == '/') endpoint_.pop_back();
        ca_file_ = http::option(cfg_, "ca_file");
        std::string t = http::option(cfg_, "timeout_ms");
        if (!t.empty()) timeout_ms_ = std::stol(t);
    }

    std::string name() const override { return "gcp"; }
    const KeyConfig& config() const override { return cfg_; }

    WrapResult wrap(const SecureBytes& kek) override {
        std::string b64 = base64_encode(kek.data(), kek.size());
        Wipe w1{b64};
        const std::string aad = kWrapAad;
        std::string body = "{\"plaintext\":\"" + b64 + "\",\"additionalAuthenticatedData\":\"" +
                           base64_encode(aad.data(), aad.size()) + "\",\"plaintextCrc32c\":\"" +
                           crc_str(kek.data(), kek.size()) + "\",\"additionalAuthenticatedDataCrc32c\":\"" +
                           crc_str(aad.data(), aad.size()) + "\"}";
        Wipe w2{body};
        http::Response r = call(Op::Encrypt, "POST", ":encrypt", body);
        rapidjson::Document d;
        d.Parse(r.body.c_str(), r.body.size());
        const rapidjson::Value* verified = member(d, "verifiedPlaintextCrc32c");
        const rapidjson::Value* verified_aad = member(d, "verifiedAdditionalAuthenticatedDataCrc32c");
        if (!verified || !verified->IsBool() || !verified->GetBool() || !verified_aad ||
            !verified_aad->IsBool() || !verified_aad->GetBool())
            throw unavailable_error("encrypt",
                                    "Cloud KMS did not verify the request's CRC32C (damaged in transit)");
        std::vector<uint8_t> ct;
        try {
            ct = base64_decode(str_field(d, "ciphertext"));
        } catch (const CryptoError&) {
            throw unavailable_error("encrypt", "the ciphertext in the answer is not base64");
        }
        if (ct.empty()) throw unavailable_error("encrypt", "the answer has no ciphertext");
        if (str_field(d, "ciphertextCrc32c") != crc_str(ct.data(), ct.size()))
            throw unavailable_error("encrypt", "the ciphertext's CRC32C does not match (damaged in transit)");
        WrapResult out;
        out.blob = std::move(ct);
        std::string ver = str_field(d, "name");
        size_t slash = ver.rfind('/');
        out.key_version = slash == std::string::npos ? ver : ver.substr(slash + 1);
        out.request_id = r.header("x-goog-request-id");
        return out;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        if (blob.empty())
            throw KmsError(KmsErrorKind::Revoked,
                           "the wrapped KEK is empty (wrong key material for " + where() + ")");
        const std::string aad = kWrapAad;
        std::string body = "{\"ciphertext\":\"" + base64_encode(blob.data(), blob.size()) +
                           "\",\"additionalAuthenticatedData\":\"" + base64_encode(aad.data(), aad.size()) +
                           "\",\"ciphertextCrc32c\":\"" + crc_str(blob.data(), blob.size()) +
                           "\",\"additionalAuthenticatedDataCrc32c\":\"" + crc_str(aad.data(), aad.size()) +
                           "\"}";
        last_request_id_.clear();
        http::Response r = call(Op::Decrypt, "POST", ":decrypt", body);
        last_request_id_ = r.header("x-goog-request-id");
        Wipe wr{r.body};
        rapidjson::Document d;
        d.ParseInsitu(&r.body[0]);
        const rapidjson::Value* pt = member(d, "plaintext");
        if (!pt || !pt->IsString()) throw unavailable_error("decrypt", "the answer has no plaintext");
        std::vector<uint8_t> raw;
        try {
            raw = base64_decode(std::string(pt->GetString(), pt->GetStringLength()));
        } catch (const CryptoError&) {
            throw unavailable_error("decrypt", "the plaintext in the answer is not base64");
        }
        SecureBytes kek(raw.data(), raw.size());
        OPENSSL_cleanse(raw.data(), raw.size());
        if (str_field(d, "plaintextCrc32c") != crc_str(kek.data(), kek.size()))
            throw unavailable_error("decrypt", "the plaintext's CRC32C does not match (damaged in transit)");
        return kek;
    }

    KeyStatus status() override {
        KeyStatus s;
        try {
            http::Response r = call(Op::GetKey, "GET", "", "");
            s.request_id = r.header("x-goog-request-id");
            rapidjson::Document d;
            d.Parse(r.body.c_str(), r.body.size());
            std::string purpose = str_field(d, "purpose");
            const rapidjson::Value* primary = member(d, "primary");
            if (!purpose.empty() && purpose != "ENCRYPT_DECRYPT") {
                s.health = KeyHealth::Revoked;
                s.state = purpose;
                s.detail = where() + " has purpose " + purpose + ", not ENCRYPT_DECRYPT";
            } else if (!primary || !primary->IsObject()) {
                s.health = KeyHealth::Revoked;
                s.state = "NO_PRIMARY";
                s.detail = where() + " has no primary version; restore or create one and make it primary";
            } else {
                std::string st = str_field(*primary, "state");
                std::string ver = str_field(*primary, "name");
                size_t slash = ver.rfind('/');
                ver = slash == std::string::npos ? ver : ver.substr(slash + 1);
                s.state = st.empty() ? "UNKNOWN" : st;
                s.health = gcp::version_state_health(st);
                s.detail = where() + " primary version " + ver + " is " + s.state;
                if (s.health == KeyHealth::Revoked)
                    s.detail += st == "DESTROY_SCHEDULED"
                                    ? "; restore it (gcloud kms keys versions restore) before it is destroyed"
                                : st == "DISABLED" ? "; enable it (gcloud kms keys versions enable)"
                                                   : "; its material is gone";
            }
        } catch (const KmsError& e) {
            if (e.kind == KmsErrorKind::Config) throw;
            s.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
            s.state = e.kind == KmsErrorKind::Revoked ? "revoked" : "unavailable";
            s.detail = e.what();
        }
        return s;
    }

private:
    std::string where() const { return "Cloud KMS key " + cfg_.key_id; }

    KmsError unavailable_error(const std::string& op, const std::string& why) const {
        return KmsError(KmsErrorKind::Unavailable, "gcp " + op + " of " + where() + ": " + why);
    }

    static std::string op_name(Op op) {
        switch (op) {
            case Op::Token:
                return "access token request";
            case Op::GetKey:
                return "key read";
            case Op::Encrypt:
                return "encrypt";
            case Op::Decrypt:
                return "decrypt";
        }
        return "request";
    }

    http::Request base_request(const std::string& method, const std::string& url) const {
        http::Request req;
        req.method = method;
        req.url = url;
        req.ca_file = ca_file_;
        req.timeout_ms = timeout_ms_;
        if (req.connect_timeout_ms > timeout_ms_) req.connect_timeout_ms = timeout_ms_;
        return req;
    }

    // perform_with_retry + mapping of the final answer; wipes the request's secrets.
    http::Response send(Op op, http::Request& req) {
        http::Response r;
        auto scrub = [&] {
            for (auto& h : req.headers) OPENSSL_cleanse(&h.second[0], h.second.size());
            if (!req.body.empty()) OPENSSL_cleanse(&req.body[0], req.body.size());
        };
        try {
            r = http::perform_with_retry(req);
        } catch (const KmsError& e) {
            scrub();
            throw KmsError(e.kind, "gcp " + op_name(op) + " for " + where() + ": " + e.what());
        }
        scrub();
        gcp::ApiError err = gcp::parse_error(r.body);
        bool cfg = false;
        KeyHealth h = gcp::classify(op, r.status, err, &cfg);
        last_status_ = r.status;
        if (h == KeyHealth::Ok) return r;
        if (op == Op::Decrypt || op == Op::Token) OPENSSL_cleanse(&r.body[0], r.body.size());
        std::string what = "gcp " + op_name(op) + " for " + where() + ": HTTP " + std::to_string(r.status) +
                           (err.status.empty() ? "" : " " + err.status) +
                           (err.message.empty() ? "" : " (" + err.message + ")");
        if (cfg) throw config_error(what + "; check options endpoint and key_id");
        if (h == KeyHealth::Revoked)
            throw KmsError(KmsErrorKind::Revoked, what + "; " + revoked_hint(op, r.status));
        throw KmsError(KmsErrorKind::Unavailable, what + "; will retry");
    }

    std::string revoked_hint(Op op, long status) const {
        if (op == Op::Token)
            return creds_path_.empty()
                       ? "the metadata server gave no token: attach a service account to the instance"
                       : "the service account or its key was disabled or deleted; check " + creds_field_ +
                             " \"" + creds_path_ + "\"";
        if (status == 404) return "the key does not exist (or the caller may not see it); restore it";
        if (status == 401 || status == 403)
            return "grant roles/cloudkms.cryptoKeyEncrypterDecrypter and roles/cloudkms.viewer on the key";
        return "the key version that wrapped the KEK is not enabled, or the key cannot decrypt it; "
               "enable or restore the version";
    }

    // An access token, cached until a minute before it expires.
    http::Secret access_token(bool refresh) {
        std::lock_guard<std::mutex> g(mu_);
        auto now = std::chrono::steady_clock::now();
        if (!refresh && !cached_.empty() && now < cached_until_) return http::Secret(cached_.str());
        http::Response r;
        if (!creds_path_.empty()) {
            ServiceAccount sa = load_service_account(creds_field_, creds_path_);
            std::time_t t = std::time(nullptr);
            jwt::JsonObject claims;
            claims.set("iss", sa.client_email)
                .set("scope", kScope)
                .set("aud", sa.token_uri)
                .set("iat", static_cast<int64_t>(t))
                .set("exp", static_cast<int64_t>(t) + 3600);
            std::vector<std::pair<std::string, std::string>> extra;
            if (!sa.private_key_id.empty()) extra.emplace_back("kid", sa.private_key_id);
            std::string assertion = jwt::sign_rs256(jwt::rs256_header(extra), claims, sa.private_key.str(),
                                                    creds_field_ + " private_key");
            http::Request req = base_request("POST", sa.token_uri);
            req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
            req.body = "grant_type=" + http::url_encode("urn:ietf:params:oauth:grant-type:jwt-bearer") +
                       "&assertion=" + assertion;
            OPENSSL_cleanse(&assertion[0], assertion.size());
            r = send(Op::Token, req);
        } else {
            http::Request req = base_request(
                "GET", "http://" + metadata_host_ +
                           "/computeMetadata/v1/instance/service-accounts/default/token?scopes=" +
                           http::url_encode(kScope));
            req.headers.emplace_back("Metadata-Flavor", "Google");
            r = send(Op::Token, req);
        }
        Wipe wr{r.body};
        rapidjson::Document d;
        d.ParseInsitu(&r.body[0]);
        const rapidjson::Value* tok = member(d, "access_token");
        if (!tok || !tok->IsString() || tok->GetStringLength() == 0)
            throw KmsError(KmsErrorKind::Unavailable,
                           "gcp access token request for " + where() + ": the answer has no access_token");
        long expires = 3600;
        const rapidjson::Value* ex = member(d, "expires_in");
        if (ex && ex->IsInt64()) expires = static_cast<long>(ex->GetInt64());
        long keep = expires > 120 ? expires - 60 : expires / 2;
        cached_ = http::Secret(std::string(tok->GetString(), tok->GetStringLength()));
        cached_until_ = now + std::chrono::seconds(keep);
        return http::Secret(cached_.str());
    }

    // A KMS API call with a bearer token; a 401 may be a token revoked early or a
    // clock jump: fetch a fresh token once before calling it.
    http::Response call(Op op, const std::string& method, const std::string& verb, const std::string& body) {
        for (int attempt = 0;; attempt++) {
            http::Secret tok = access_token(attempt > 0);
            http::Request req = base_request(method, endpoint_ + "/v1/" + cfg_.key_id + verb);
            req.headers.emplace_back("Authorization", "Bearer " + tok.str());
            if (method != "GET") {
                req.headers.emplace_back("Content-Type", "application/json");
                req.body = body;
            }
            try {
                return send(op, req);
            } catch (const KmsError& e) {
                if (attempt > 0 || e.kind != KmsErrorKind::Revoked || last_status_ != 401) throw;
            }
        }
    }

    KeyConfig cfg_;
    std::string creds_field_, creds_path_, metadata_host_;
    std::string endpoint_, ca_file_;
    long timeout_ms_ = 10000;
    long last_status_ = 0;
    std::mutex mu_;
    http::Secret cached_;
    std::chrono::steady_clock::time_point cached_until_{};
};

}  // namespace

std::unique_ptr<KeyProvider> make_gcp_provider(const KeyConfig& cfg) {
    auto opt = [&](const char* n) { return http::option(cfg, n); };
    static const char* known[] = {"endpoint", "ca_file", "credentials_file", "metadata_host", "timeout_ms"};
    for (const auto& o : cfg.options) {
        bool ok = false;
        for (const char* k : known) ok = ok || o.first == k;
        if (!ok)
            throw config_error(
                o.first +
                ": unknown option of the gcp provider (known: endpoint, ca_file, credentials_file, "
                "metadata_host, timeout_ms)");
    }
    if (!gcp::valid_crypto_key_name(cfg.key_id))
        throw config_error("key_id: \"" + cfg.key_id +
                           "\" is not a Cloud KMS key name "
                           "(projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY)");
    std::string ep = opt("endpoint");
    if (!ep.empty() && (!url_ok(ep) || ep.find_first_of("?# ") != std::string::npos))
        throw config_error("endpoint: must be an https:// URL (http:// only to this machine), got \"" + ep +
                           "\"");
    if (!opt("ca_file").empty()) http::require_readable_file("ca_file", opt("ca_file"));
    std::string t = opt("timeout_ms");
    if (!t.empty() &&
        (t.find_first_not_of("0123456789") != std::string::npos || t.size() > 7 || std::stol(t) < 100))
        throw config_error("timeout_ms: must be a number of milliseconds >= 100, got \"" + t + "\"");
    std::string field, path;
    if (!opt("credentials_file").empty()) {
        field = "credentials_file";
        path = opt("credentials_file");
    } else if (const char* e = std::getenv("GOOGLE_APPLICATION_CREDENTIALS");
               e && *e && opt("metadata_host").empty()) {
        field = "GOOGLE_APPLICATION_CREDENTIALS";
        path = e;
    }
    std::string md;
    if (path.empty()) {
        md = opt("metadata_host");
        if (md.empty()) {
            const char* e = std::getenv("GCE_METADATA_HOST");
            md = e && *e ? e : kDefaultMetadataHost;
        }
        if (md.find_first_of("/?# @") != std::string::npos)
            throw config_error("metadata_host: must be HOST or HOST:PORT, got \"" + md + "\"");
    } else {
        ServiceAccount sa = load_service_account(field, path);  // validates now, wipes at once
        // Also check the private key parses (without quoting it) so a bad file fails here.
        jwt::JsonObject probe;
        probe.set("iss", sa.client_email);
        jwt::sign_rs256(jwt::rs256_header(), probe, sa.private_key.str(), field + " private_key");
    }
    return std::make_unique<GcpProvider>(cfg, field, path, md);
}

}  // namespace cmk
