// The Google identity (google_identity.hpp): service-account key files and the JWT
// bearer grant, external_account files and the STS token exchange, or the metadata
// server, and the access tokens they yield. The key file's text and its private key
// are kit::Secret or wiped as soon as the assertion is signed; the assertion, the
// subject token and every token are wiped after use, on error paths too. A message
// names the file and the field, never their content.
#include "cmk_lakebase/base/json.hpp"
#include "google_identity.hpp"

#include <rapidjson/document.h>

#include <cctype>
#include <ctime>
#include <utility>
#include <vector>

#include "cmk_lakebase/base/sys.hpp"
#include "jwt.hpp"

namespace cmk::gcp {
namespace {

using kit::config_error;

constexpr const char* kScope = "https://www.googleapis.com/auth/cloudkms";
constexpr const char* kCloudPlatform = "https://www.googleapis.com/auth/cloud-platform";
constexpr const char* kIamEndpoint = "https://iamcredentials.googleapis.com";
// The "aud" of a service account's JWT bearer grant: Google documents it as always this
// URL for an access token request, whatever endpoint the key file's token_uri names (a
// private endpoint, a test peer), and google-auth sends it so; the token endpoint
// refuses any other audience.
constexpr const char* kTokenAudience = "https://oauth2.googleapis.com/token";
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
    if (type == "impersonated_service_account")
        throw config_error(
            field + ": \"" + path +
            "\" is an impersonated_service_account credential file (impersonation by file), "
            "which the gcp key provider does not support; use the option impersonate_service_account");
    if (type != "service_account")
        throw config_error(
            field + ": \"" + path + "\" has type \"" + type +
            "\"; only service_account and external_account files are supported (or use the metadata "
            "server)");
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

// An OAuth 2.0 token answer {"access_token", "expires_in", ...} (token endpoint,
// metadata server, STS): the token and its life (3600 s when absent, at most a day).
// Throws KmsError Unavailable "<what>: the answer has no access_token".
kit::Secret oauth_token(const std::string& body, long* life_s, const std::string& what) {
    std::string copy = body;
    kit::WipeOnExit w{copy};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, copy, nullptr);
    const rapidjson::Value* tok = d.HasParseError() ? nullptr : kit::member(d, "access_token");
    if (!tok || !tok->IsString() || tok->GetStringLength() == 0)
        throw kit::unavailable(what + ": the answer has no access_token");
    long long expires = 3600;
    if (!kit::int_member(d, "expires_in", &expires) || expires < 1) expires = 3600;
    *life_s = static_cast<long>(expires > kit::kMaxTokenLifeS ? kit::kMaxTokenLifeS : expires);
    return kit::Secret(std::string(tok->GetString(), tok->GetStringLength()));
}

// The type of a credential file ("" when it is not a JSON object), and its text.
std::string credential_type(const std::string& field, const std::string& path, kit::Secret* text) {
    *text = kit::read_secret_file(field, path);
    std::string buf = text->str();
    kit::WipeOnExit w{buf};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, buf, nullptr);
    if (d.HasParseError() || !d.IsObject()) return "";
    return kit::string_member(d, "type");
}

bool printable(const std::string& s) {
    for (unsigned char c : s)
        if (c < 0x21 || c > 0x7e) return false;
    return true;
}

bool header_name_ok(const std::string& n) {
    if (n.empty() || n.size() > 100) return false;
    for (unsigned char c : n)
        if (!(std::isalnum(c) || c == '-' || c == '_')) return false;
    return true;
}

// Fields of an external_account file the provider reads or may ignore (documented);
// any other is refused, so that a credential that means more than we do fails at once.
const char* const kExternalFields[] = {"type",
                                       "audience",
                                       "subject_token_type",
                                       "token_url",
                                       "service_account_impersonation_url",
                                       "service_account_impersonation",
                                       "credential_source",
                                       "token_info_url",    // introspection only: not used
                                       "quota_project_id",  // billing header for other APIs: not used
                                       "universe_domain"};

std::string unsupported_reason(const std::string& f) {
    if (f == "workforce_pool_user_project") return "workforce identity federation";
    if (f == "client_id" || f == "client_secret") return "STS client authentication";
    if (f == "credential_source.executable") return "executable-sourced credentials";
    if (f == "credential_source.environment_id" || f == "credential_source.region_url" ||
        f == "credential_source.regional_cred_verification_url" ||
        f == "credential_source.imdsv2_session_token_url")
        return "AWS-sourced credentials";
    if (f == "credential_source.certificate") return "X.509-sourced credentials";
    return "unknown field";
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

std::string impersonation_url_account(const std::string& url) {
    static const std::string kMid = "/v1/projects/-/serviceAccounts/", kEnd = ":generateAccessToken";
    size_t m = url.find(kMid);
    if (m == std::string::npos || url.size() < kEnd.size() ||
        url.compare(url.size() - kEnd.size(), kEnd.size(), kEnd) != 0)
        return "";
    size_t a = m + kMid.size(), b = url.size() - kEnd.size();
    if (b <= a) return "";
    std::string email = url.substr(a, b - a);
    return valid_service_account_email(email) ? email : "";
}

void parse_external_account(const std::string& json, const std::string& field, const std::string& path,
                            IdentitySource* src) {
    std::string buf = json;
    kit::WipeOnExit w{buf};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, buf, nullptr);
    if (d.HasParseError() || !d.IsObject())
        throw config_error(field + ": \"" + path + "\" is not a JSON credential file");
    const std::string in = " in \"" + path + "\"";
    auto bad = [&](const std::string& f, const std::string& why) {
        return config_error(field + ": " + f + in + " " + why);
    };
    auto unsupported = [&](const std::string& f) {
        return bad(kit::one_line(f, 80), "is not supported by the gcp key provider (" +
                                             unsupported_reason(f) +
                                             "); see docs/providers/gcp.md, workload identity federation");
    };
    // A member that must be a string when present.
    auto str = [&](const rapidjson::Value& o, const char* name, const std::string& dotted) -> std::string {
        const rapidjson::Value* v = kit::member(o, name);
        if (!v) return "";
        if (!v->IsString()) throw bad(dotted, "must be a string");
        return std::string(v->GetString(), v->GetStringLength());
    };
    for (const auto& m : d.GetObject()) {
        std::string name(m.name.GetString(), m.name.GetStringLength());
        bool known = false;
        for (const char* k : kExternalFields) known = known || name == k;
        if (!known) throw unsupported(name);
    }
    std::string universe = str(d, "universe_domain", "universe_domain");
    if (!universe.empty() && universe != "googleapis.com")
        throw bad("universe_domain",
                  "is \"" + kit::one_line(universe, 80) + "\"; only googleapis.com is supported");
    str(d, "token_info_url", "token_info_url");
    str(d, "quota_project_id", "quota_project_id");

    ExternalAccount x;
    x.audience = str(d, "audience", "audience");
    if (x.audience.empty()) throw bad("audience", "is missing");
    if (x.audience.find("/workforcePools/") != std::string::npos)
        throw bad("audience", "names a workforce pool: workforce identity federation is not supported");
    if (x.audience.size() > 512 || !printable(x.audience) ||
        x.audience.rfind("//iam.googleapis.com/", 0) != 0 ||
        x.audience.find("/workloadIdentityPools/") == std::string::npos ||
        x.audience.find("/providers/") == std::string::npos)
        throw bad("audience",
                  "must be //iam.googleapis.com/projects/NUMBER/locations/global/workloadIdentityPools/"
                  "POOL/providers/PROVIDER, got \"" +
                      kit::one_line(x.audience, 120) + "\"");
    x.subject_token_type = str(d, "subject_token_type", "subject_token_type");
    if (x.subject_token_type.empty()) throw bad("subject_token_type", "is missing");
    if (x.subject_token_type == "urn:ietf:params:aws:token-type:aws4_request")
        throw bad("subject_token_type", "is AWS's: AWS-sourced credentials are not supported");
    if (x.subject_token_type != "urn:ietf:params:oauth:token-type:jwt" &&
        x.subject_token_type != "urn:ietf:params:oauth:token-type:id_token" &&
        x.subject_token_type != "urn:ietf:params:oauth:token-type:saml2")
        throw bad("subject_token_type",
                  "\"" + kit::one_line(x.subject_token_type, 80) +
                      "\" is not supported (urn:ietf:params:oauth:token-type:jwt, id_token "
                      "or saml2)");
    x.token_url = str(d, "token_url", "token_url");
    if (x.token_url.empty()) x.token_url = kStsTokenUrl;
    if (!kit::https_or_loopback(x.token_url) || !printable(x.token_url) ||
        x.token_url.find_first_of("?#") != std::string::npos)
        throw bad("token_url", "must be an https:// URL (http:// only to this machine), got \"" +
                                   kit::one_line(x.token_url, 120) + "\"");

    std::string imp_url = str(d, "service_account_impersonation_url", "service_account_impersonation_url");
    if (!imp_url.empty()) {
        if (!kit::https_or_loopback(imp_url) || !printable(imp_url) ||
            imp_url.find_first_of("?#") != std::string::npos)
            throw bad("service_account_impersonation_url",
                      "must be an https:// URL (http:// only to this machine), got \"" +
                          kit::one_line(imp_url, 160) + "\"");
        std::string email = impersonation_url_account(imp_url);
        if (email.empty())
            throw bad("service_account_impersonation_url",
                      "must be https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                      "NAME@PROJECT.iam.gserviceaccount.com:generateAccessToken, got \"" +
                          kit::one_line(imp_url, 160) + "\"");
        src->impersonate = email;
        src->impersonation_url = imp_url;
        src->lifetime_s = 3600;
    }
    if (const rapidjson::Value* sai = kit::member(d, "service_account_impersonation")) {
        if (!sai->IsObject()) throw bad("service_account_impersonation", "must be an object");
        for (const auto& m : sai->GetObject()) {
            std::string name(m.name.GetString(), m.name.GetStringLength());
            if (name != "token_lifetime_seconds") throw unsupported("service_account_impersonation." + name);
        }
        if (const rapidjson::Value* lt = kit::member(*sai, "token_lifetime_seconds")) {
            if (imp_url.empty())
                throw bad("service_account_impersonation.token_lifetime_seconds",
                          "is given without service_account_impersonation_url");
            if (!lt->IsInt64() || lt->GetInt64() < 600 || lt->GetInt64() > 43200)
                throw bad("service_account_impersonation.token_lifetime_seconds",
                          "must be a whole number of seconds from 600 to 43200");
            src->lifetime_s = static_cast<long>(lt->GetInt64());
        }
    }

    const rapidjson::Value* cs = kit::member(d, "credential_source");
    if (!cs) throw bad("credential_source", "is missing");
    if (!cs->IsObject()) throw bad("credential_source", "must be an object");
    for (const auto& m : cs->GetObject()) {
        std::string name(m.name.GetString(), m.name.GetStringLength());
        if (name != "file" && name != "url" && name != "headers" && name != "format")
            throw unsupported("credential_source." + name);
    }
    x.source_file = str(*cs, "file", "credential_source.file");
    x.source_url = str(*cs, "url", "credential_source.url");
    if (x.source_file.empty() && x.source_url.empty())
        throw bad("credential_source", "has neither file nor url (the subject token's source)");
    if (!x.source_file.empty() && !x.source_url.empty())
        throw bad("credential_source", "has both file and url; give one");
    if (!x.source_file.empty() && x.source_file[0] != '/')
        throw bad("credential_source.file",
                  "must be an absolute path, got \"" + kit::one_line(x.source_file, 120) + "\"");
    if (!x.source_url.empty() &&
        ((!kit::https_or_loopback(x.source_url) && x.source_url.rfind("http://169.254.169.254/", 0) != 0) ||
         !printable(x.source_url)))
        throw bad("credential_source.url",
                  "must be an https:// URL (http:// only to this machine or to the instance metadata address "
                  "169.254.169.254), got \"" +
                      kit::one_line(x.source_url, 120) + "\"");
    if (const rapidjson::Value* h = kit::member(*cs, "headers")) {
        if (x.source_url.empty())
            throw bad("credential_source.headers", "is given without credential_source.url");
        if (!h->IsObject()) throw bad("credential_source.headers", "must be an object of strings");
        for (const auto& m : h->GetObject()) {
            std::string name(m.name.GetString(), m.name.GetStringLength());
            if (!header_name_ok(name) || !m.value.IsString())
                throw bad("credential_source.headers",
                          "must map header names to strings (\"" + kit::one_line(name, 60) + "\")");
            std::string v(m.value.GetString(), m.value.GetStringLength());
            for (unsigned char c : v)
                if (c < 0x20 || c == 0x7f)
                    throw bad("credential_source.headers." + name, "holds a control character");
            x.source_headers.emplace_back(name, v);
        }
    }
    if (const rapidjson::Value* f = kit::member(*cs, "format")) {
        if (!f->IsObject()) throw bad("credential_source.format", "must be an object");
        std::string type = str(*f, "type", "credential_source.format.type");
        for (const auto& m : f->GetObject()) {
            std::string name(m.name.GetString(), m.name.GetStringLength());
            if (name != "type" && name != "subject_token_field_name")
                throw unsupported("credential_source.format." + name);
        }
        if (type == "json") {
            x.json_field =
                str(*f, "subject_token_field_name", "credential_source.format.subject_token_field_name");
            if (x.json_field.empty())
                throw bad("credential_source.format.subject_token_field_name", "is missing (format json)");
        } else if (type != "text" && !type.empty()) {
            throw bad("credential_source.format.type",
                      "must be text or json, got \"" + kit::one_line(type, 40) + "\"");
        }
    }
    src->external = true;
    src->ext = std::move(x);
}

std::string sts_request_body(const ExternalAccount& ext, const std::string& subject_token) {
    std::string tok = http::url_encode(subject_token);
    kit::WipeOnExit wt{tok};
    std::string head =
        "grant_type=" + http::url_encode("urn:ietf:params:oauth:grant-type:token-exchange") +
        "&audience=" + http::url_encode(ext.audience) + "&scope=" + http::url_encode(kCloudPlatform) +
        "&requested_token_type=" + http::url_encode("urn:ietf:params:oauth:token-type:access_token") +
        "&subject_token=";
    std::string tail = "&subject_token_type=" + http::url_encode(ext.subject_token_type);
    std::string body;
    body.reserve(head.size() + tok.size() + tail.size());  // one buffer: no stray copy of the token
    body += head;
    body += tok;
    body += tail;
    return body;
}

kit::Secret parse_sts_token(const std::string& body, long* life_s, const std::string& where) {
    return oauth_token(body, life_s, "gcp STS token exchange for " + where);
}

kit::Secret subject_token_from(const std::string& text, const std::string& json_field,
                               const std::string& what) {
    if (json_field.empty()) {
        std::string t = kit::trim(text);
        if (t.empty()) throw kit::unavailable(what + " is empty");
        return kit::Secret(std::move(t));
    }
    std::string copy = text;
    kit::WipeOnExit w{copy};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, copy, nullptr);
    if (d.HasParseError() || !d.IsObject())
        throw kit::unavailable(what + " is not a JSON object (format json)");
    const rapidjson::Value* v = kit::member(d, json_field.c_str());
    if (!v || !v->IsString() || v->GetStringLength() == 0)
        throw kit::unavailable(what + " has no string " + kit::one_line(json_field, 60) + " (format json)");
    return kit::Secret(std::string(v->GetString(), v->GetStringLength()));
}

std::string generate_access_token_url(const IdentitySource& src) {
    if (!src.impersonation_url.empty()) return src.impersonation_url;
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
    std::time_t at = 0;
    if (!kit::parse_utc_time(exp, &at))
        throw kit::unavailable("gcp generateAccessToken for " + where + ": the answer has no valid expireTime");
    long life = static_cast<long>(at - now);
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
        kit::Secret text;
        if (credential_type(src.field, src.path, &text) == "external_account")
            parse_external_account(text.str(), src.field, src.path, &src);
    }
    if (!src.path.empty() && !src.external) {
        ServiceAccount sa = load_service_account(src.field, src.path);  // validates now, wipes at once
        src.client_email = sa.client_email;
        // Also check the private key parses (without quoting it) so a bad file fails here.
        jwt::JsonObject probe;
        probe.set("iss", sa.client_email);
        std::string signed_probe =
            jwt::sign_rs256(jwt::rs256_header(), probe, sa.private_key.str(), src.field + " private_key");
        kit::wipe(signed_probe);
    }
    if (!src.impersonation_url.empty()) {
        // One route to the customer's account: the file's own, or the option's.
        if (!opt("impersonate_service_account").empty())
            throw config_error("impersonate_service_account: \"" + src.path +
                               "\" (an external_account file) already impersonates " + src.impersonate +
                               " (service_account_impersonation_url); remove one of the two");
        for (const char* k :
             {"impersonation_delegates", "impersonation_lifetime", "iam_credentials_endpoint"})
            if (!opt(k).empty())
                throw config_error(
                    std::string(k) +
                    ": not used with an external_account file's service_account_impersonation_url "
                    "(use service_account_impersonation.token_lifetime_seconds in the file)");
        return src;
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

// Workload identity federation: the subject token, read fresh, traded at STS for a
// federated token (scope cloud-platform whatever `scope` asks: STS issues no narrower
// one). A refusal (400 invalid_grant or invalid_target: pool or provider disabled or
// deleted, subject refused by the attribute condition; 401; 403) is a revocation
// through send_.
kit::Secret Identity::exchange(long* life_s, const std::string& where) {
    kit::Secret subject = subject_token(where);
    http::Request req = http::request("POST", src_.ext.token_url, timing_, ca_file_);
    req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
    req.body = sts_request_body(src_.ext, subject.str());
    http::Response r = send_(req);
    kit::WipeOnExit wr{r.body};
    return parse_sts_token(r.body, life_s, where);
}

kit::Secret Identity::subject_token(const std::string& where) {
    const ExternalAccount& x = src_.ext;
    const std::string pre = "gcp workload identity federation for " + where + ": ";
    std::string text;
    kit::WipeOnExit wt{text};
    std::string what;
    if (!x.source_file.empty()) {
        what = pre + "the subject token file \"" + x.source_file + "\" (credential_source.file of " +
               src_.field + " \"" + src_.path + "\")";
        try {
            text = sys::read_file(x.source_file.c_str(), kMaxSubjectToken);
        } catch (const std::exception& e) {
            throw kit::unavailable(what + " cannot be read (" + kit::one_line(e.what()) +
                                   "); the workload's token must be there and readable by the server");
        }
    } else {
        what =
            pre + "the subject token from " + kit::one_line(x.source_url, 120) + " (credential_source.url)";
        http::Request req = http::request("GET", x.source_url, timing_, ca_file_);
        for (const auto& h : x.source_headers) req.headers.push_back(h);
        http::Response r = http::send_wiped(req, what);
        text = std::move(r.body);
        kit::wipe(r.body);
        if (r.status < 200 || r.status >= 300)
            throw kit::unavailable(what + ": HTTP " + std::to_string(r.status) + "; will retry");
        if (text.size() > kMaxSubjectToken)
            throw kit::unavailable(what + ": the answer is larger than 64 KiB");
    }
    kit::Secret token = subject_token_from(text, x.json_field, what);
    // A JWT that has already expired would be refused by STS with invalid_grant, which
    // reads as a revocation: a workload whose token rotation broke is an outage, not a
    // withdrawn trust. Judged here, before the exchange (exp is not verified: STS does).
    int64_t exp = 0;
    std::time_t now = std::time(nullptr);
    if (jwt::unverified_exp(token.str(), &exp) && exp <= static_cast<int64_t>(now))
        throw kit::unavailable(what + " holds a token that expired " + std::to_string(now - exp) +
                               " s ago; whatever refreshes it (the projected service account token, the identity "
                               "provider's agent) has stopped: fix that, the trust itself was not withdrawn");
    return token;
}

kit::Secret Identity::fetch_base(long* life_s, const std::string& where, const char* scope) {
    if (src_.external) return exchange(life_s, where);
    http::Response r;
    if (!src_.path.empty()) {
        ServiceAccount sa = load_service_account(src_.field, src_.path);
        std::time_t t = std::time(nullptr);
        jwt::JsonObject claims;
        claims.set("iss", sa.client_email)
            .set("scope", scope)
            .set("aud", kTokenAudience)
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
    return oauth_token(r.body, life_s, "gcp access token request for " + where);
}

}  // namespace cmk::gcp
