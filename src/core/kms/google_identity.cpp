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
        // Also check the private key parses (without quoting it) so a bad file fails here.
        jwt::JsonObject probe;
        probe.set("iss", sa.client_email);
        std::string signed_probe =
            jwt::sign_rs256(jwt::rs256_header(), probe, sa.private_key.str(), src.field + " private_key");
        kit::wipe(signed_probe);
    }
    return src;
}

Identity::Identity(IdentitySource src, kit::Timing timing, std::string ca_file, Send send)
    : src_(std::move(src)), timing_(timing), ca_file_(std::move(ca_file)), send_(std::move(send)) {}

kit::Secret Identity::token(bool refresh, const std::string& where) {
    return cache_.get(refresh, [&](long* life) { return fetch(life, where); });
}

kit::Secret Identity::fetch(long* life_s, const std::string& where) {
    http::Response r;
    if (!src_.path.empty()) {
        ServiceAccount sa = load_service_account(src_.field, src_.path);
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
                          http::url_encode(kScope);
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
