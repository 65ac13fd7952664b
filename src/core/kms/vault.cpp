// The HashiCorp Vault / OpenBao Transit key provider ("vault"). The CMK is a Transit
// key; the KEK is wrapped by POST /v1/<mount>/encrypt/<key> and unwrapped by
// /decrypt, so the key never leaves Vault. Status reads the key (GET
// /v1/<mount>/keys/<key>): a missing key, a permission denial, or a
// min_decryption_version above the version of our ciphertext ("vault:vN:...") is a
// revocation; a sealed, throttling or unreachable Vault is an outage.
//
// Credentials: a token from token_file (re-read on every login, so a rotated file is
// picked up) or $VAULT_TOKEN, or AppRole (role_id_file + secret_id_file ->
// POST /v1/auth/<approle_mount>/login) with the client token cached until shortly
// before its lease ends (kit::TokenCache). Options, secrets, timing and the loopback
// rule are the kit's (kit.hpp). Secrets are wiped after use and never appear in messages.
#include "cmk_lakebase/base/json.hpp"
#include "vault.hpp"

#include <rapidjson/document.h>

#include "http.hpp"
#include "kit.hpp"

namespace cmk {

namespace vault {

KeyHealth classify(Op op, long s, bool* config) {
    if (config) *config = false;
    if (s >= 200 && s < 300) return KeyHealth::Ok;
    if (s == 404 || s == 403 || s == 401) return KeyHealth::Revoked;
    if (s == 400 && (op == Op::Decrypt || op == Op::Rewrap || op == Op::Login)) return KeyHealth::Revoked;
    if (s == 429 || s >= 500 || s == 472 || s == 473 || s == 412 || s == 408) return KeyHealth::Unavailable;
    if (config) *config = true;
    return KeyHealth::Unavailable;
}

std::string error_message(const std::string& body) {
    rapidjson::Document d;
    parse_json_bounded(d, body, nullptr);
    if (d.HasParseError() || !d.IsObject()) return "";
    auto it = d.FindMember("errors");
    if (it == d.MemberEnd() || !it->value.IsArray()) return "";
    std::string out;
    for (const auto& e : it->value.GetArray()) {
        if (!e.IsString()) continue;
        std::string m = e.GetString();
        // Vault wraps messages as "1 error occurred:\n\t* permission denied\n\n".
        size_t star = m.find("* ");
        if (m.rfind("1 error occurred", 0) == 0 && star != std::string::npos) m = m.substr(star + 2);
        for (char& c : m)
            if (c == '\n' || c == '\t' || c == '\r') c = ' ';
        while (!m.empty() && m.back() == ' ') m.pop_back();
        if (!m.empty()) {
            out = m;
            break;
        }
    }
    if (out.size() > 200) out = out.substr(0, 200) + "...";
    return out;
}

uint32_t ciphertext_version(const std::string& ct) {
    if (ct.rfind("vault:v", 0) != 0) return 0;
    size_t i = 7;
    uint64_t v = 0;
    while (i < ct.size() && ct[i] >= '0' && ct[i] <= '9' && v < 0xffffffffu) v = v * 10 + (ct[i++] - '0');
    if (i == 7 || i >= ct.size() || ct[i] != ':' || v == 0 || v > 0xffffffffu) return 0;
    return static_cast<uint32_t>(v);
}

bool valid_key_name(const std::string& n) {
    if (n.empty() || n.size() > 128 || n == "." || n == "..") return false;
    for (char c : n) {
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                  c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}

bool valid_mount(const std::string& m) {
    if (m.empty() || m.size() > 256 || m.front() == '/' || m.back() == '/') return false;
    size_t a = 0;
    while (a <= m.size()) {
        size_t b = m.find('/', a);
        if (b == std::string::npos) b = m.size();
        if (!valid_key_name(m.substr(a, b - a))) return false;
        a = b + 1;
    }
    return true;
}

}  // namespace vault

namespace {

using vault::Op;

using kit::config_error;
using kit::member;
using kit::member_or_null;
using kit::string_of;

class VaultProvider : public KeyProvider {
public:
    VaultProvider(KeyConfig cfg, http::Transport transport)
        : cfg_(std::move(cfg)), transport_(std::move(transport)) {
        addr_ = kit::option(cfg_, "addr");
        while (!addr_.empty() && addr_.back() == '/') addr_.pop_back();
        mount_ = kit::option(cfg_, "mount", "transit");
        namespace_ = kit::option(cfg_, "namespace");
        ca_file_ = kit::option(cfg_, "ca_file");
        approle_mount_ = kit::option(cfg_, "approle_mount", "approle");
        approle_ = !kit::option(cfg_, "role_id_file").empty();
        timing_ = kit::read_timing(cfg_);
    }

    std::string name() const override { return "vault"; }
    const KeyConfig& config() const override { return cfg_; }

    WrapResult wrap(const SecureBytes& kek) override {
        // Transit's encrypt creates a missing key when the token may: refuse that, a
        // CMK must be created (and its policy set) by its owner, not by us.
        read_key();
        std::string b64 = base64_encode(kek.data(), kek.size());
        kit::WipeOnExit w1{b64};
        std::string body = "{\"plaintext\":\"" + b64 + "\"}";
        kit::WipeOnExit w2{body};
        http::Response r = call(Op::Encrypt, "POST", key_path("encrypt"), body);
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        std::string ct = string_of(member(member_or_null(d, "data"), "ciphertext"));
        uint32_t ver = vault::ciphertext_version(ct);
        if (ver == 0) throw unavailable_error("encrypt", "the answer has no Transit ciphertext");
        WrapResult out;
        out.blob.assign(ct.begin(), ct.end());
        out.key_version = std::to_string(ver);
        out.request_id = request_id(r);
        our_version_ = ver;
        return out;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        std::string ct(blob.begin(), blob.end());
        uint32_t ver = vault::ciphertext_version(ct);
        if (ver == 0)
            throw KmsError(KmsErrorKind::Revoked,
                           "the wrapped KEK is not a Vault Transit ciphertext for key " + cfg_.key_id +
                               " (wrong key material)");
        std::string body = "{\"ciphertext\":\"" + ct + "\"}";
        last_request_id_.clear();
        http::Response r = call(Op::Decrypt, "POST", key_path("decrypt"), body);
        kit::WipeOnExit wr{r.body};
        rapidjson::Document d;
        parse_json_bounded_insitu(d, r.body, nullptr);  // in place: no copy of the plaintext outside r.body
        last_request_id_ = string_of(member(d, "request_id"));
        SecureBytes kek = kit::decode_secret(member(member_or_null(d, "data"), "plaintext"),
                                             unavailable_error("decrypt", "the answer has no plaintext"),
                                             unavailable_error("decrypt", "the plaintext is not base64"));
        our_version_ = ver;
        return kek;
    }

    KeyStatus status() override {
        KeyStatus s;
        try {
            KeyInfo k = read_key();
            s.request_id = k.request_id;
            s.state =
                "v" + std::to_string(k.latest) + " min_decryption_version=" + std::to_string(k.min_decrypt);
            if (!k.supports_decryption) {
                s.health = KeyHealth::Revoked;
                s.state = "no decryption";
                s.detail =
                    where() + " does not support decryption (type " + k.type + "); use an aes256-gcm96 key";
            } else if (our_version_ != 0 && k.min_decrypt > our_version_) {
                s.health = KeyHealth::Revoked;
                s.state = "version disallowed";
                s.detail = where() + " has min_decryption_version " + std::to_string(k.min_decrypt) +
                           " above version " + std::to_string(our_version_) +
                           " that wrapped the KEK; lower it (vault write " + mount_ + "/keys/" + cfg_.key_id +
                           "/config min_decryption_version=" + std::to_string(our_version_) + ")";
            } else {
                s.health = KeyHealth::Ok;
                s.state = "enabled";
                s.detail = where() + " exists, latest version " + std::to_string(k.latest) +
                           ", min_decryption_version " + std::to_string(k.min_decrypt);
            }
        } catch (const KmsError& e) {
            s = kit::status_from_error(e);
        }
        return s;
    }

    std::vector<uint8_t> rewrap(const std::vector<uint8_t>& blob, std::string* key_version) {
        std::string ct(blob.begin(), blob.end());
        if (vault::ciphertext_version(ct) == 0)
            throw KmsError(KmsErrorKind::Revoked,
                           "the wrapped KEK is not a Vault Transit ciphertext for key " + cfg_.key_id +
                               " (wrong key material)");
        http::Response r = call(Op::Rewrap, "POST", key_path("rewrap"), "{\"ciphertext\":\"" + ct + "\"}");
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        std::string nct = string_of(member(member_or_null(d, "data"), "ciphertext"));
        uint32_t ver = vault::ciphertext_version(nct);
        if (ver == 0) throw unavailable_error("rewrap", "the answer has no Transit ciphertext");
        if (key_version) *key_version = std::to_string(ver);
        our_version_ = ver;
        return std::vector<uint8_t>(nct.begin(), nct.end());
    }

private:
    struct KeyInfo {
        uint32_t latest = 0;
        uint32_t min_decrypt = 0;
        bool supports_decryption = true;
        std::string type;
        std::string request_id;
    };

    std::string where() const {
        return "Vault Transit key " + cfg_.key_id + " (mount " + mount_ + " at " + addr_ +
               (namespace_.empty() ? "" : ", namespace " + namespace_) + ")";
    }

    std::string key_path(const std::string& what) const {
        return "/v1/" + mount_ + "/" + what + "/" + cfg_.key_id;
    }

    static std::string request_id(const http::Response& r) {
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        return string_of(member(d, "request_id"));
    }

    KmsError unavailable_error(const std::string& op, const std::string& why) const {
        return KmsError(KmsErrorKind::Unavailable, "vault " + op + " of " + where() + ": " + why);
    }

    KeyInfo read_key() {
        http::Response r = call(Op::ReadKey, "GET", "/v1/" + mount_ + "/keys/" + cfg_.key_id, "");
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        const rapidjson::Value& data = member_or_null(d, "data");
        if (!data.IsObject()) throw unavailable_error("key read", "the answer has no key data");
        KeyInfo k;
        const rapidjson::Value* v = member(data, "latest_version");
        if (v && v->IsUint()) k.latest = v->GetUint();
        v = member(data, "min_decryption_version");
        if (v && v->IsUint()) k.min_decrypt = v->GetUint();
        v = member(data, "supports_decryption");
        if (v && v->IsBool()) k.supports_decryption = v->GetBool();
        k.type = string_of(member(data, "type"));
        k.request_id = string_of(member(d, "request_id"));
        return k;
    }

    // The token for the next request: the file or environment, or an AppRole login.
    kit::Secret token(bool force_login) {
        if (!approle_) {
            kit::Secret t = kit::secret_from(cfg_, "token_file", "VAULT_TOKEN");
            if (t.empty())
                throw config_error("token_file: no Vault token for " + where() +
                                   " (set option token_file, the environment variable VAULT_TOKEN of the "
                                   "server, or role_id_file and secret_id_file)");
            return t;
        }
        return login_.get(force_login, [this](long* life) { return login(life); });
    }

    // An AppRole login: the client token and its lease. The ids are read from their
    // files on each login, so that a rotated secret id is picked up.
    kit::Secret login(long* life_s) {
        kit::Secret role = kit::read_secret_file("role_id_file", kit::option(cfg_, "role_id_file"));
        kit::Secret secret = kit::read_secret_file("secret_id_file", kit::option(cfg_, "secret_id_file"));
        std::string body = "{\"role_id\":\"" + json_escape(role.str()) + "\",\"secret_id\":\"" +
                           json_escape(secret.str()) + "\"}";
        kit::WipeOnExit wb{body};
        http::Response r = send(Op::Login, "POST", "/v1/auth/" + approle_mount_ + "/login", body, nullptr);
        kit::WipeOnExit wr{r.body};
        rapidjson::Document d;
        parse_json_bounded_insitu(d, r.body, nullptr);
        const rapidjson::Value& auth = member_or_null(d, "auth");
        const rapidjson::Value* tok = member(auth, "client_token");
        if (!tok || !tok->IsString() || tok->GetStringLength() == 0)
            throw kit::unavailable("vault AppRole login at " + addr_ + " for " + where() +
                                   " returned no client token");
        long lease = 0;
        const rapidjson::Value* ld = member(auth, "lease_duration");
        if (ld && ld->IsInt64()) lease = static_cast<long>(ld->GetInt64());
        // A lease of 0 means no expiry (root-like): log in again within the hour anyway.
        *life_s = lease <= 0 ? 3600 : lease;
        return kit::Secret(std::string(tok->GetString(), tok->GetStringLength()));
    }

    static std::string json_escape(const std::string& s) {
        std::string o;
        for (char c : s) {
            if (c == '"' || c == '\\') {
                o.push_back('\\');
                o.push_back(c);
            } else if (static_cast<unsigned char>(c) < 0x20) {
                continue;  // ids are printable; drop control characters rather than send them
            } else {
                o.push_back(c);
            }
        }
        return o;
    }

    // One request with retries for transient answers; maps the final answer.
    http::Response send(Op op, const std::string& method, const std::string& path, const std::string& body,
                        const kit::Secret* tok) {
        http::Request req = http::request(method, addr_ + path, timing_, ca_file_);
        req.body = body;
        req.headers.emplace_back("Content-Type", "application/json");
        req.headers.emplace_back("X-Vault-Request", "true");
        if (!namespace_.empty()) req.headers.emplace_back("X-Vault-Namespace", namespace_);
        if (tok) req.headers.emplace_back("X-Vault-Token", tok->str());
        http::Response r = http::send_wiped_via(transport_, req, "vault " + op_name(op) + " of " + where());
        bool cfg = false;
        KeyHealth h = vault::classify(op, r.status, &cfg);
        if (h == KeyHealth::Ok) return r;
        std::string msg = vault::error_message(r.body);
        std::string what = "vault " + op_name(op) + " of " + where() + ": HTTP " + std::to_string(r.status) +
                           (msg.empty() ? "" : " (" + msg + ")");
        if (cfg) throw config_error(what + "; check options addr, mount and namespace");
        if (h == KeyHealth::Revoked) {
            last_status_ = r.status;
            throw KmsError(KmsErrorKind::Revoked, what + "; " + revoked_hint(op, r.status));
        }
        throw KmsError(KmsErrorKind::Unavailable,
                       what + (r.status == 503 ? "; unseal Vault or wait for it" : "; will retry"));
    }

    std::string revoked_hint(Op op, long status) const {
        if (op == Op::Login)
            return "check the AppRole role_id_file and secret_id_file (the secret id may be expired)";
        if (status == 404)
            return "the key does not exist; restore it or create it (vault write -f " + mount_ + "/keys/" +
                   cfg_.key_id + ")";
        if (status == 403 || status == 401)
            return "the token may not use this key; grant the policy paths in docs/providers/vault.md or renew the token";
        return "the key cannot decrypt the wrapped KEK (wrong key, or its version is below "
               "min_decryption_version)";
    }

    static std::string op_name(Op op) {
        static const char* const kNames[] = {"AppRole login", "key read", "encrypt", "decrypt", "rewrap"};
        return kNames[static_cast<int>(op)];
    }

    // An authenticated request. With AppRole, a 403 may be our cached token having
    // expired or been revoked early: log in once more and retry before calling it.
    http::Response call(Op op, const std::string& method, const std::string& path, const std::string& body) {
        kit::Secret t = token(false);
        try {
            return send(op, method, path, body, &t);
        } catch (const KmsError& e) {
            if (!(approle_ && e.kind == KmsErrorKind::Revoked &&
                  (last_status_ == 403 || last_status_ == 401)))
                throw;
        }
        kit::Secret t2 = token(true);
        return send(op, method, path, body, &t2);
    }

    KeyConfig cfg_;
    http::Transport transport_;  // empty: the network
    std::string addr_, mount_, namespace_, ca_file_, approle_mount_;
    bool approle_ = false;
    kit::Timing timing_;
    uint32_t our_version_ = 0;  // Transit version of the last ciphertext we made or opened
    long last_status_ = 0;
    kit::TokenCache login_{60};  // the AppRole client token, renewed before its lease ends
};

}  // namespace

namespace vault {

std::vector<uint8_t> rewrap(KeyProvider& provider, const std::vector<uint8_t>& blob,
                            std::string* key_version) {
    auto* v = dynamic_cast<VaultProvider*>(&provider);
    if (!v)
        throw config_error("rewrap: provider \"" + provider.name() + "\" is not a Vault Transit provider");
    return v->rewrap(blob, key_version);
}

std::unique_ptr<KeyProvider> make_vault_provider(const KeyConfig& cfg, http::Transport transport) {
    auto opt = [&](const char* n) { return kit::option(cfg, n); };
    kit::require_known_options(cfg, "the vault provider",
                               {"addr", "mount", "namespace", "ca_file", "token_file", "role_id_file",
                                "secret_id_file", "approle_mount", "timeout_ms"});
    std::string addr = opt("addr");
    if (addr.empty())
        throw config_error(
            "addr: the vault provider needs option addr (e.g. https://vault.example.com:8200)");
    if (!kit::https_or_loopback(addr))
        throw config_error(
            "addr: must be an https:// URL (http:// only to 127.0.0.1 or localhost: a token "
            "never crosses a network in clear), got \"" +
            addr + "\"");
    if (addr.find_first_of("?# ") != std::string::npos)
        throw config_error("addr: must be a plain URL without query, fragment or spaces, got \"" + addr +
                           "\"");
    if (!vault::valid_key_name(cfg.key_id))
        throw config_error("key_id: invalid Vault Transit key name \"" + cfg.key_id +
                           "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
    std::string mount = opt("mount").empty() ? "transit" : opt("mount");
    if (!vault::valid_mount(mount)) throw config_error("mount: invalid Transit mount path \"" + mount + "\"");
    std::string am = opt("approle_mount").empty() ? "approle" : opt("approle_mount");
    if (!vault::valid_mount(am)) throw config_error("approle_mount: invalid auth mount path \"" + am + "\"");
    if (!opt("ca_file").empty()) kit::require_readable_file("ca_file", opt("ca_file"));
    kit::read_timing(cfg);  // checks timeout_ms now
    bool role = !opt("role_id_file").empty(), secret = !opt("secret_id_file").empty();
    if (role != secret)
        throw config_error(std::string(role ? "secret_id_file" : "role_id_file") +
                           ": AppRole needs both role_id_file and secret_id_file");
    if (role) {
        if (!opt("token_file").empty())
            throw config_error("token_file: give either token_file or role_id_file/secret_id_file, not both");
        kit::read_secret_file("role_id_file", opt("role_id_file"));
        kit::read_secret_file("secret_id_file", opt("secret_id_file"));
    } else if (kit::secret_from(cfg, "token_file", "VAULT_TOKEN").empty()) {
        throw config_error(
            "token_file: no Vault token for key " + cfg.key_id +
            " (set option token_file, the environment variable VAULT_TOKEN, or role_id_file and "
            "secret_id_file)");
    }
    return std::make_unique<VaultProvider>(cfg, std::move(transport));
}

}  // namespace vault

}  // namespace cmk
