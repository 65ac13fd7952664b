// The Google identity (google_identity.hpp): service-account key files and the JWT
// bearer grant, or the metadata server, and the access tokens they yield. The key
// file's text and its private key are kit::Secret or wiped as soon as the assertion
// is signed; the assertion and every token are wiped after use, on error paths too.
// A message names the file and the field, never their content.
#include "cmk_lakebase/base/json.hpp"
#include "google_identity.hpp"

#include <rapidjson/document.h>

#include <ctime>
#include <utility>
#include <vector>

#include "jwt.hpp"

namespace cmk::gcp {
namespace {

using kit::config_error;

constexpr const char* kScope = "https://www.googleapis.com/auth/cloudkms";
constexpr const char* kCloudPlatform = "https://www.googleapis.com/auth/cloud-platform";
constexpr const char* kIamEndpoint = "https://iamcredentials.googleapis.com";
constexpr const char* kDefaultMetadataHost = "metadata.google.internal";

// A service-account key file's fields. private_key is wiped with the object.
struct ServiceAccount {
    std::string client_email;
    std::string private_key_id;
    std::string token_uri;
    kit::Secret private_key;
};

ServiceAccount load_service_account(const std::string& field, const std::string& path) {
    kit::Secret text = kit::read_secret_file(field, path);
    std::string buf = text.str();
    kit::WipeOnExit w{buf};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, buf, nullptr);
    if (d.HasParseError() || !d.IsObject())
        throw config_error(field + ": \"" + path + "\" is not a JSON service-account key file");
    std::string type = kit::string_member(d, "type");
    if (type == "external_account" || type == "impersonated_service_account")
        throw config_error(field + ": \"" + path + "\" is an " + type +
                           " credential file (" +
                           (type == "external_account" ? "workload identity federation" : "impersonation by file") +
                           "), which the gcp key provider does not support; use a service-account key file, "
                           "the metadata server, or the option impersonate_service_account");
    if (type != "service_account")
        throw config_error(field + ": \"" + path + "\" has type \"" + type +
                           "\"; only service_account key files are supported (or use the metadata server)");
    ServiceAccount sa;
    sa.client_email = kit::string_member(d, "client_email");
    sa.private_key_id = kit::string_member(d, "private_key_id");
    sa.token_uri = kit::string_member(d, "token_uri");
    if (sa.token_uri.empty()) sa.token_uri = "https://oauth2.googleapis.com/token";
    const rapidjson::Value* pk = kit::member(d, "private_key");
    if (sa.client_email.empty()) throw config_error(field + ": \"" + path + "\" has no client_email");
    if (!pk || !pk->IsString() || pk->GetStringLength() == 0)
        throw config_error(field + ": \"" + path + "\" has no private_key");
    if (!kit::https_or_loopback(sa.token_uri))
        throw config_error(field + ": token_uri in \"" + path + "\" must be an https:// URL, got \"" +
                           sa.token_uri + "\"");
    sa.private_key = kit::Secret(std::string(pk->GetString(), pk->GetStringLength()));
    return sa;
}

}  // namespace

bool valid_service_account_email(const std::string& e) {
    size_t at = e.find('@');
    if (at == std::string::npos || at == 0 || e.find('@', at + 1) != std::string::npos || e.size() > 254)
        return false;
    std::string local = e.substr(0, at), domain = e.substr(at + 1);
    if (local.size() > 64 || domain.find('.') == std::string::npos || domain.front() == '.' || domain.back() == '.')
        return false;
    for (char c : local)
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-')) return false;
    for (char c : domain)
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.')) return false;
    return true;
}

std::string generate_access_token_url(const IdentitySource& src) {
    return src.iam_endpoint + "/v1/projects/-/serviceAccounts/" + src.impersonate + ":generateAccessToken";
}

// The e-mails are validated (no character JSON would escape), so plain concatenation.
std::string generate_access_token_body(const IdentitySource& src) {
    std::string body = "{";
    if (!src.delegates.empty()) {
        body += "\"delegates\":[";
        for (size_t i = 0; i < src.delegates.size(); ++i)
            body += std::string(i ? "," : "") + "\"projects/-/serviceAccounts/" + src.delegates[i] + "\"";
        body += "],";
    }
    body += "\"scope\":[\"" + std::string(kScope) + "\"],\"lifetime\":\"" + std::to_string(src.lifetime_s) + "s\"}";
    return body;
}

kit::Secret parse_generate_access_token(const std::string& body, std::time_t now, long* life_s,
                                        const std::string& where) {
    std::string copy = body;
    kit::WipeOnExit w{copy};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, copy, nullptr);
    const rapidjson::Value* tok = d.HasParseError() ? nullptr : kit::member(d, "accessToken");
    if (!tok || !tok->IsString() || tok->GetStringLength() == 0)
        throw kit::unavailable("gcp generateAccessToken for " + where + ": the answer has no accessToken");
    std::string exp = kit::string_member(d, "expireTime");
    std::tm tm{};
    if (exp.size() < 19 || !strptime(exp.c_str(), "%Y-%m-%dT%H:%M:%S", &tm))
        throw kit::unavailable("gcp generateAccessToken for " + where + ": the answer has no valid expireTime");
    long life = static_cast<long>(timegm(&tm) - now);
    *life_s = life < 1 ? 1 : life;
    return kit::Secret(std::string(tok->GetString(), tok->GetStringLength()));
}

IdentitySource choose_identity(const KeyConfig& cfg) {
    auto opt = [&](const char* n) { return kit::option(cfg, n); };
    IdentitySource src;
    if (!opt("credentials_file").empty()) {
        src.field = "credentials_file";
        src.path = opt("credentials_file");
    } else if (const char* e = std::getenv("GOOGLE_APPLICATION_CREDENTIALS");
               e && *e && opt("metadata_host").empty()) {
        src.field = "GOOGLE_APPLICATION_CREDENTIALS";
        src.path = e;
    }
    if (src.path.empty()) {
        src.metadata_host = opt("metadata_host");
        if (src.metadata_host.empty()) {
            const char* e = std::getenv("GCE_METADATA_HOST");
            src.metadata_host = e && *e ? e : kDefaultMetadataHost;
        }
        if (src.metadata_host.find_first_of("/?# @") != std::string::npos)
            throw config_error("metadata_host: must be HOST or HOST:PORT, got \"" + src.metadata_host + "\"");
    } else {
        ServiceAccount sa = load_service_account(src.field, src.path);  // validates now, wipes at once
        src.client_email = sa.client_email;
        // Also check the private key parses (without quoting it) so a bad file fails here.
        jwt::JsonObject probe;
        probe.set("iss", sa.client_email);
        std::string signed_probe =
            jwt::sign_rs256(jwt::rs256_header(), probe, sa.private_key.str(), src.field + " private_key");
        kit::wipe(signed_probe);
    }
    src.impersonate = opt("impersonate_service_account");
    if (src.impersonate.empty()) {
        for (const char* k : {"impersonation_delegates", "impersonation_lifetime", "iam_credentials_endpoint"})
            if (!opt(k).empty())
                throw config_error(std::string(k) + ": given without impersonate_service_account");
        return src;
    }
    if (!valid_service_account_email(src.impersonate))
        throw config_error("impersonate_service_account: \"" + kit::one_line(src.impersonate, 120) +
                           "\" is not a service-account e-mail (NAME@PROJECT.iam.gserviceaccount.com)");
    std::string dl = opt("impersonation_delegates");
    for (size_t i = 0; i < dl.size();) {
        size_t j = dl.find(',', i);
        if (j == std::string::npos) j = dl.size();
        std::string one = kit::trim(dl.substr(i, j - i));
        if (!valid_service_account_email(one))
            throw config_error("impersonation_delegates: \"" + kit::one_line(one, 120) +
                               "\" is not a service-account e-mail (comma-separated list)");
        src.delegates.push_back(one);
        i = j + 1;
    }
    src.lifetime_s = kit::int_option(cfg, "impersonation_lifetime", 3600, 300, 43200, "seconds");
    src.iam_endpoint = opt("iam_credentials_endpoint");
    if (src.iam_endpoint.empty()) src.iam_endpoint = kIamEndpoint;
    while (!src.iam_endpoint.empty() && src.iam_endpoint.back() == '/') src.iam_endpoint.pop_back();
    if (!kit::https_or_loopback(src.iam_endpoint) || src.iam_endpoint.find_first_of("?# ") != std::string::npos)
        throw config_error("iam_credentials_endpoint: must be an https:// URL (http:// only to this machine), got \"" +
                           src.iam_endpoint + "\"");
    return src;
}

Identity::Identity(IdentitySource src, kit::Timing timing, std::string ca_file, Send send)
    : src_(std::move(src)), timing_(timing), ca_file_(std::move(ca_file)), send_(std::move(send)) {}

kit::Secret Identity::token(bool refresh, const std::string& where) {
    return cache_.get(refresh, [&](long* life) { return fetch(life, where); });
}

kit::Secret Identity::fetch(long* life_s, const std::string& where) {
    if (!src_.impersonate.empty()) return impersonate(life_s, where);
    return fetch_base(life_s, where, kScope);
}

// The customer's service account's token, minted from the base identity's. A refusal
// (403 PERMISSION_DENIED: the token creator binding is gone; 404: the account is
// deleted) is a revocation through send_; a base token the IAM API no longer takes is
// fetched anew once first.
kit::Secret Identity::impersonate(long* life_s, const std::string& where) {
    for (int attempt = 0;; ++attempt) {
        kit::Secret base = base_cache_.get(attempt > 0, [&](long* life) {
            return fetch_base(life, where, kCloudPlatform);
        });
        http::Request req = http::request("POST", generate_access_token_url(src_), timing_, ca_file_);
        req.headers.emplace_back("Authorization", "Bearer " + base.str());
        req.headers.emplace_back("Content-Type", "application/json");
        req.body = generate_access_token_body(src_);
        http::Response r;
        try {
            r = send_(req);
        } catch (const KmsError& e) {
            if (attempt == 0 && e.kind == KmsErrorKind::Revoked &&
                std::string(e.what()).find("HTTP 401") != std::string::npos)
                continue;
            throw;
        }
        kit::WipeOnExit wr{r.body};
        return parse_generate_access_token(r.body, std::time(nullptr), life_s, where);
    }
}

kit::Secret Identity::fetch_base(long* life_s, const std::string& where, const char* scope) {
    http::Response r;
    if (!src_.path.empty()) {
        ServiceAccount sa = load_service_account(src_.field, src_.path);
        std::time_t t = std::time(nullptr);
        jwt::JsonObject claims;
        claims.set("iss", sa.client_email)
            .set("scope", scope)
            .set("aud", sa.token_uri)
            .set("iat", static_cast<int64_t>(t))
            .set("exp", static_cast<int64_t>(t) + 3600);
        std::vector<std::pair<std::string, std::string>> extra;
        if (!sa.private_key_id.empty()) extra.emplace_back("kid", sa.private_key_id);
        std::string assertion = jwt::sign_rs256(jwt::rs256_header(extra), claims, sa.private_key.str(),
                                                src_.field + " private_key");
        http::Request req = http::request("POST", sa.token_uri, timing_, ca_file_);
        req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
        req.body = "grant_type=" + http::url_encode("urn:ietf:params:oauth:grant-type:jwt-bearer") +
                   "&assertion=" + assertion;
        kit::wipe(assertion);
        r = send_(req);
    } else {
        std::string url = "http://" + src_.metadata_host +
                          "/computeMetadata/v1/instance/service-accounts/default/token?scopes=" +
                          http::url_encode(scope);
        http::Request req = http::request("GET", url, timing_, ca_file_);
        req.headers.emplace_back("Metadata-Flavor", "Google");
        r = send_(req);
    }
    kit::WipeOnExit wr{r.body};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, r.body, nullptr);
    const rapidjson::Value* tok = kit::member(d, "access_token");
    if (!tok || !tok->IsString() || tok->GetStringLength() == 0)
        throw kit::unavailable("gcp access token request for " + where + ": the answer has no access_token");
    long expires = 3600;
    const rapidjson::Value* ex = kit::member(d, "expires_in");
    if (ex && ex->IsInt64()) expires = static_cast<long>(ex->GetInt64());
    *life_s = expires;
    return kit::Secret(std::string(tok->GetString(), tok->GetStringLength()));
}

}  // namespace cmk::gcp
