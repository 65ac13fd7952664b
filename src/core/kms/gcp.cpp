// The Google Cloud KMS key provider ("gcp"). The CMK is a symmetric CryptoKey
// (projects/P/locations/L/keyRings/R/cryptoKeys/K); the KEK is wrapped by
// POST v1/{name}:encrypt and unwrapped by :decrypt, with fixed additional
// authenticated data and CRC32C integrity fields in both directions, so the key never
// leaves Cloud KMS. Status reads the CryptoKey and judges its primary version's state.
//
// Credentials and access tokens: google_identity.cpp (a service-account key file, an
// external_account file for workload identity federation, or the metadata server). Options, secrets, timing
// and the loopback rule are the kit's (kit.hpp); no secret appears in a message.
#include "cmk_lakebase/base/json.hpp"
#include "gcp.hpp"

#include <rapidjson/document.h>

#include "google_identity.hpp"
#include "http.hpp"
#include "kit.hpp"

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
    parse_json_bounded(d, body, nullptr);
    if (d.HasParseError() || !d.IsObject()) return e;
    auto it = d.FindMember("error");
    if (it == d.MemberEnd()) return e;
    if (it->value.IsString()) {  // OAuth token endpoint
        e.status = it->value.GetString();
        auto ds = d.FindMember("error_description");
        if (ds != d.MemberEnd() && ds->value.IsString()) e.message = kit::one_line(ds->value.GetString());
        return e;
    }
    if (!it->value.IsObject()) return e;
    auto st = it->value.FindMember("status");
    if (st != it->value.MemberEnd() && st->value.IsString()) e.status = st->value.GetString();
    auto m = it->value.FindMember("message");
    if (m != it->value.MemberEnd() && m->value.IsString()) e.message = kit::one_line(m->value.GetString());
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
using kit::member;
using kit::string_member;

constexpr const char* kDefaultEndpoint = "https://cloudkms.googleapis.com";
// Binds our ciphertext to its purpose: decrypt with any other AAD fails.
constexpr const char* kWrapAad = "cmk_lakebase gcp kek v1";

std::string crc_str(const void* p, size_t n) {
    return std::to_string(crc32c(p, n));
}

class GcpProvider : public KeyProvider {
public:
    GcpProvider(KeyConfig cfg, gcp::IdentitySource identity, http::Transport transport)
        : cfg_(std::move(cfg)),
          transport_(std::move(transport)),
          endpoint_(kit::option(cfg_, "endpoint", kDefaultEndpoint)),
          ca_file_(kit::option(cfg_, "ca_file")),
          timing_(kit::read_timing(cfg_)),
          identity_(std::move(identity), timing_, ca_file_,
                    [this](http::Request& req) { return send(Op::Token, req); }) {
        while (!endpoint_.empty() && endpoint_.back() == '/') endpoint_.pop_back();
    }

    std::string name() const override { return "gcp"; }
    const KeyConfig& config() const override { return cfg_; }
    std::string identity() const override {
        const gcp::IdentitySource& s = identity_.source();
        if (s.external && !s.impersonate.empty())
            return "service account " + s.impersonate + " (impersonated, federated from " + s.ext.audience +
                   ")";
        if (s.external) return "federated principal of " + s.ext.audience;
        if (!s.impersonate.empty()) return "service account " + s.impersonate + " (impersonated)";
        if (!s.client_email.empty()) return "service account " + s.client_email;
        return "the metadata server's service account";
    }

    WrapResult wrap(const SecureBytes& kek) override {
        std::string b64 = base64_encode(kek.data(), kek.size());
        kit::WipeOnExit w1{b64};
        const std::string aad = kWrapAad;
        std::string body = "{\"plaintext\":\"" + b64 + "\",\"additionalAuthenticatedData\":\"" +
                           base64_encode(aad.data(), aad.size()) + "\",\"plaintextCrc32c\":\"" +
                           crc_str(kek.data(), kek.size()) + "\",\"additionalAuthenticatedDataCrc32c\":\"" +
                           crc_str(aad.data(), aad.size()) + "\"}";
        kit::WipeOnExit w2{body};
        http::Response r = call(Op::Encrypt, "POST", ":encrypt", body);
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        const rapidjson::Value* verified = member(d, "verifiedPlaintextCrc32c");
        const rapidjson::Value* verified_aad = member(d, "verifiedAdditionalAuthenticatedDataCrc32c");
        if (!verified || !verified->IsBool() || !verified->GetBool() || !verified_aad ||
            !verified_aad->IsBool() || !verified_aad->GetBool())
            throw unavailable_error("encrypt",
                                    "Cloud KMS did not verify the request's CRC32C (damaged in transit)");
        std::vector<uint8_t> ct;
        try {
            ct = base64_decode(string_member(d, "ciphertext"));
        } catch (const CryptoError&) {
            throw unavailable_error("encrypt", "the ciphertext in the answer is not base64");
        }
        if (ct.empty()) throw unavailable_error("encrypt", "the answer has no ciphertext");
        if (string_member(d, "ciphertextCrc32c") != crc_str(ct.data(), ct.size()))
            throw unavailable_error("encrypt", "the ciphertext's CRC32C does not match (damaged in transit)");
        WrapResult out;
        out.blob = std::move(ct);
        std::string ver = string_member(d, "name");
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
        kit::WipeOnExit wr{r.body};
        rapidjson::Document d;
        parse_json_bounded_insitu(d, r.body, nullptr);
        SecureBytes kek = kit::decode_secret(
            member(d, "plaintext"), unavailable_error("decrypt", "the answer has no plaintext"),
            unavailable_error("decrypt", "the plaintext in the answer is not base64"));
        if (string_member(d, "plaintextCrc32c") != crc_str(kek.data(), kek.size()))
            throw unavailable_error("decrypt", "the plaintext's CRC32C does not match (damaged in transit)");
        return kek;
    }

    KeyStatus status() override {
        KeyStatus s;
        try {
            http::Response r = call(Op::GetKey, "GET", "", "");
            s.request_id = r.header("x-goog-request-id");
            rapidjson::Document d;
            parse_json_bounded(d, r.body, nullptr);
            std::string purpose = string_member(d, "purpose");
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
                std::string st = string_member(*primary, "state");
                std::string ver = string_member(*primary, "name");
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
            s = kit::status_from_error(e);
        }
        return s;
    }

private:
    std::string where() const { return "Cloud KMS key " + cfg_.key_id; }

    KmsError unavailable_error(const std::string& op, const std::string& why) const {
        return KmsError(KmsErrorKind::Unavailable, "gcp " + op + " of " + where() + ": " + why);
    }

    static std::string op_name(Op op) {
        static const char* const kNames[] = {"access token request", "key read", "encrypt", "decrypt"};
        return kNames[static_cast<int>(op)];
    }

    // perform_with_retry + mapping of the final answer; wipes the request's secrets.
    http::Response send(Op op, http::Request& req) {
        http::Response r = http::send_wiped_via(transport_, req, "gcp " + op_name(op) + " for " + where());
        gcp::ApiError err = gcp::parse_error(r.body);
        bool cfg = false;
        KeyHealth h = gcp::classify(op, r.status, err, &cfg);
        last_status_ = r.status;
        if (h == KeyHealth::Ok) return r;
        if (op == Op::Decrypt || op == Op::Token) kit::wipe(r.body);
        std::string what = "gcp " + op_name(op) + " for " + where() + ": HTTP " + std::to_string(r.status) +
                           (err.status.empty() ? "" : " " + err.status) +
                           (err.message.empty() ? "" : " (" + err.message + ")");
        if (cfg) throw kit::config_error(what + "; check options endpoint and key_id");
        if (h == KeyHealth::Revoked)
            throw KmsError(KmsErrorKind::Revoked, what + "; " + revoked_hint(op, r.status));
        throw KmsError(KmsErrorKind::Unavailable, what + "; will retry");
    }

    std::string revoked_hint(Op op, long status) const {
        const gcp::IdentitySource& src = identity_.source();
        if (op == Op::Token && src.external)
            return "the workload identity pool or provider " + src.ext.audience +
                   " was disabled or deleted, or it refused the subject token (attribute condition, expired "
                   "token)" +
                   (src.impersonate.empty()
                        ? std::string(", or the federated principal lost access")
                        : ", or the federated principal may no longer impersonate " + src.impersonate +
                              " (roles/iam.workloadIdentityUser removed, or the account disabled or "
                              "deleted)");
        if (op == Op::Token && !identity_.source().impersonate.empty())
            return "the base identity may no longer impersonate " + identity_.source().impersonate +
                   " (roles/iam.serviceAccountTokenCreator removed, or the account disabled or deleted), or the "
                   "base identity itself was refused";
        if (op == Op::Token)
            return identity_.source().path.empty()
                       ? "the metadata server gave no token: attach a service account to the instance"
                       : "the service account or its key was disabled or deleted; check " +
                             identity_.source().field + " \"" + identity_.source().path + "\"";
        if (status == 404) return "the key does not exist (or the caller may not see it); restore it";
        if (status == 401 || status == 403)
            return "grant roles/cloudkms.cryptoKeyEncrypterDecrypter and roles/cloudkms.viewer on the key";
        return "the key version that wrapped the KEK is not enabled, or the key cannot decrypt it; "
               "enable or restore the version";
    }

    // A KMS API call with a bearer token; a 401 may be a token revoked early or a
    // clock jump: fetch a fresh token once before calling it.
    http::Response call(Op op, const std::string& method, const std::string& verb, const std::string& body) {
        for (int attempt = 0;; attempt++) {
            kit::Secret tok = identity_.token(attempt > 0, where());
            http::Request req =
                http::request(method, endpoint_ + "/v1/" + cfg_.key_id + verb, timing_, ca_file_);
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
    http::Transport transport_;  // empty: the network
    std::string endpoint_, ca_file_;
    kit::Timing timing_;
    long last_status_ = 0;
    gcp::Identity identity_;
};

}  // namespace

namespace gcp {

std::unique_ptr<KeyProvider> make_gcp_provider(const KeyConfig& cfg, http::Transport transport) {
    auto opt = [&](const char* n) { return kit::option(cfg, n); };
    kit::require_known_options(cfg, "the gcp provider",
                               {"endpoint", "ca_file", "credentials_file", "metadata_host", "timeout_ms",
                                "impersonate_service_account", "impersonation_delegates", "impersonation_lifetime",
                                "iam_credentials_endpoint"});
    if (!gcp::valid_crypto_key_name(cfg.key_id))
        throw kit::config_error("key_id: \"" + cfg.key_id +
                                "\" is not a Cloud KMS key name "
                                "(projects/PROJECT/locations/LOCATION/keyRings/RING/cryptoKeys/KEY)");
    std::string ep = opt("endpoint");
    if (!ep.empty() && (!kit::https_or_loopback(ep) || ep.find_first_of("?# ") != std::string::npos))
        throw kit::config_error("endpoint: must be an https:// URL (http:// only to this machine), got \"" +
                                ep + "\"");
    if (!opt("ca_file").empty()) kit::require_readable_file("ca_file", opt("ca_file"));
    kit::read_timing(cfg);  // checks timeout_ms now, before the identity
    return std::make_unique<GcpProvider>(cfg, gcp::choose_identity(cfg), std::move(transport));
}

}  // namespace gcp

}  // namespace cmk
