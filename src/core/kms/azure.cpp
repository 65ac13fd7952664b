// The Azure Key Vault / Managed HSM key provider (azure.hpp). The KEK is wrapped
// by POST {key_id}/wrapkey and unwrapped by POST {key_id}/unwrapkey under a versioned
// key identifier (a versionless id would follow the key's rotation and stop
// unwrapping blobs made under the old version); the key's state is GET {key_id}.
// The wrapped KEK is stored as the raw bytes Key Vault returned, so it can also be
// unwrapped by hand (az keyvault key decrypt / the REST API) with the same key.
//
// Tokens: Entra ID v2.0 client credentials (a secret, or a certificate through an
// RS256 client assertion) or a managed identity endpoint (IMDS, or App Service's
// IDENTITY_ENDPOINT), in azure_identity.cpp. A token is cached until shortly before it
// expires; a 401 from the vault drops it and the request is retried once with a fresh
// token, so a 401 that survives a fresh token is the vault's decision about this
// identity (revoked), not an outage. Options and secrets are the kit's (kit.hpp).
#include "azure.hpp"

#include <rapidjson/document.h>

#include <cctype>
#include <cstdlib>
#include <cstring>

#include "azure_identity.hpp"
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/crypto.hpp"

namespace cmk::azure {

using kit::config_error;
using kit::int_member;
using kit::member;
using kit::one_line;
using kit::revoked;
using kit::string_member;
using kit::unavailable;
using kit::wipe;

namespace {

std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool all_of_set(const std::string& s, const char* extra) {
    for (char c : s)
        if (!std::isalnum(static_cast<unsigned char>(c)) && !std::strchr(extra, c)) return false;
    return true;
}

struct Cloud {
    const char* suffix;
    VaultKind kind;
    const char* authority;
};
const Cloud kClouds[] = {
    {"vault.azure.net", VaultKind::KeyVault, "https://login.microsoftonline.com"},
    {"vault.azure.cn", VaultKind::KeyVault, "https://login.chinacloudapi.cn"},
    {"vault.usgovcloudapi.net", VaultKind::KeyVault, "https://login.microsoftonline.us"},
    {"managedhsm.azure.net", VaultKind::ManagedHsm, "https://login.microsoftonline.com"},
    {"managedhsm.azure.cn", VaultKind::ManagedHsm, "https://login.chinacloudapi.cn"},
    {"managedhsm.usgovcloudapi.net", VaultKind::ManagedHsm, "https://login.microsoftonline.us"},
};

// https://host[:port] with nothing after it (authority_host, resource).
bool plain_origin(const std::string& u, bool https_only) {
    std::string rest;
    if (u.compare(0, 8, "https://") == 0)
        rest = u.substr(8);
    else if (!https_only && u.compare(0, 7, "http://") == 0)
        rest = u.substr(7);
    else
        return false;
    return !rest.empty() && all_of_set(rest, ".-:[]");
}

// Key Vault's error body {"error":{"code":..,"message":..,"innererror":{"code":..}}}.
struct VaultErrorBody {
    std::string code, inner, message;
};
VaultErrorBody parse_vault_error(const std::string& body) {
    VaultErrorBody e;
    rapidjson::Document d;
    parse_json_bounded(d, body, nullptr);
    if (d.HasParseError() || !d.IsObject()) return e;
    const rapidjson::Value* err = member(d, "error");
    if (!err) return e;
    e.code = string_member(*err, "code");
    e.message = string_member(*err, "message");
    const rapidjson::Value* in = member(*err, "innererror");
    if (!in) in = member(*err, "innerError");
    if (in) e.inner = string_member(*in, "code");
    return e;
}

std::string describe(const VaultErrorBody& e) {
    std::string s = e.code.empty() ? "no error code" : e.code;
    if (!e.inner.empty()) s += "/" + e.inner;
    if (!e.message.empty()) s += ": " + one_line(e.message);
    return s;
}

// The tenant a 401 challenge names: authorization="https://login.../<tenant>".
std::string challenge_tenant(const std::string& www_authenticate) {
    for (const char* k : {"authorization_uri=\"", "authorization=\""}) {
        size_t p = www_authenticate.find(k);
        if (p == std::string::npos) continue;
        p += std::strlen(k);
        size_t q = www_authenticate.find('"', p);
        if (q == std::string::npos) continue;
        std::string uri = www_authenticate.substr(p, q - p);
        size_t s = uri.find("://");
        size_t slash = uri.find('/', s == std::string::npos ? 0 : s + 3);
        if (slash == std::string::npos) continue;
        std::string t = uri.substr(slash + 1);
        t = t.substr(0, t.find('/'));
        if (!t.empty() && all_of_set(t, ".-")) return t;
    }
    return "";
}

}  // namespace

// ---------------------------------------------------------------- key id, settings

KeyId parse_key_id(const std::string& url, const std::string& resource) {
    const std::string f = "key_id: ";
    const std::string shape = " (want https://<vault>.vault.azure.net/keys/<name>/<version>)";
    KeyId k;
    if (url.compare(0, 8, "https://") != 0)
        throw config_error(f + "\"" + url + "\" is not an https URL" + shape);
    std::string rest = url.substr(8);
    if (rest.find_first_of("?#") != std::string::npos)
        throw config_error(f + "\"" + url + "\" has a query or fragment" + shape);
    size_t slash = rest.find('/');
    if (slash == std::string::npos) throw config_error(f + "\"" + url + "\" names no key" + shape);
    std::string authority = lower(rest.substr(0, slash));
    std::string path = rest.substr(slash);
    while (path.size() > 1 && path.back() == '/') path.pop_back();

    // host[:port]; IPv6 only as the loopback literal [::1].
    std::string host = authority, port;
    if (authority.compare(0, 5, "[::1]") == 0) {
        host = "[::1]";
        if (authority.size() > 5) {
            if (authority[5] != ':') throw config_error(f + "bad host in \"" + url + "\"");
            port = authority.substr(6);
        }
    } else {
        size_t colon = authority.find(':');
        if (colon != std::string::npos) {
            host = authority.substr(0, colon);
            port = authority.substr(colon + 1);
        }
        if (host.empty() || !all_of_set(host, ".-") || host.front() == '.' || host.back() == '.')
            throw config_error(f + "bad host \"" + host + "\" in \"" + url + "\"" + shape);
    }
    if (!port.empty()) {
        if (port.size() > 5 || !all_of_set(port, "") || std::atol(port.c_str()) < 1 ||
            std::atol(port.c_str()) > 65535 || !std::isdigit(static_cast<unsigned char>(port[0])))
            throw config_error(f + "bad port \"" + port + "\" in \"" + url + "\"");
        for (char c : port)
            if (!std::isdigit(static_cast<unsigned char>(c)))
                throw config_error(f + "bad port \"" + port + "\" in \"" + url + "\"");
    }

    // /keys/<name>/<version>
    std::vector<std::string> parts;
    for (size_t i = 1; i <= path.size();) {
        size_t j = path.find('/', i);
        if (j == std::string::npos) j = path.size();
        parts.push_back(path.substr(i, j - i));
        i = j + 1;
    }
    if (parts.size() == 2 && parts[0] == "keys")
        throw config_error(f + "\"" + url +
                           "\" names no key version; give the versioned key identifier "
                           "(.../keys/" +
                           parts[1] + "/<version>): a versionless id would stop unwrapping after a rotation");
    if (parts.size() != 3 || parts[0] != "keys")
        throw config_error(f + "\"" + url + "\" is not a key identifier" + shape);
    k.name = parts[1];
    k.version = parts[2];
    if (k.name.empty() || k.name.size() > 127 || !all_of_set(k.name, "-"))
        throw config_error(f + "bad key name \"" + k.name + "\" (1-127 letters, digits, -)");
    if (k.version.empty() || k.version.size() > 64 || !all_of_set(k.version, ""))
        throw config_error(f + "bad key version \"" + k.version + "\" (letters and digits)");

    k.host = host;
    k.vault_url = "https://" + authority;
    k.url = k.vault_url + "/keys/" + k.name + "/" + k.version;
    k.loopback = kit::loopback_authority(host);

    bool known = false;
    for (const Cloud& c : kClouds) {
        std::string dot = std::string(".") + c.suffix;
        if (ends_with(host, dot) && host.size() > dot.size()) {
            std::string vault = host.substr(0, host.size() - dot.size());
            if (vault.size() < 3 || vault.size() > 24 || !all_of_set(vault, "-"))
                throw config_error(f + "bad vault name \"" + vault + "\" in \"" + url +
                                   "\" (3-24 letters, digits, -)");
            k.kind = c.kind;
            k.resource = std::string("https://") + c.suffix;
            k.authority_host = c.authority;
            known = true;
            break;
        }
    }
    if (!resource.empty()) {
        if (!plain_origin(resource, true))
            throw config_error("resource: \"" + resource +
                               "\" is not an https origin (e.g. https://vault.azure.net)");
        k.resource = resource;
        while (!k.resource.empty() && k.resource.back() == '/') k.resource.pop_back();
        k.kind =
            k.resource.find("managedhsm") != std::string::npos ? VaultKind::ManagedHsm : VaultKind::KeyVault;
        if (k.authority_host.empty()) k.authority_host = "https://login.microsoftonline.com";
    } else if (!known) {
        if (!k.loopback)
            throw config_error(f + "host \"" + host +
                               "\" is not a Key Vault (*.vault.azure.net, .cn, .usgovcloudapi.net) or "
                               "Managed HSM (*.managedhsm.azure.net, ...) host; for another cloud set "
                               "resource=https://<its vault DNS suffix>");
        k.kind = VaultKind::KeyVault;
        k.resource = "https://vault.azure.net";
        k.authority_host = "https://login.microsoftonline.com";
    }
    return k;
}

std::string Settings::token_url() const {
    return authority_host + "/" + tenant_id + "/oauth2/v2.0/token";
}
std::string Settings::scope() const {
    return key.resource + "/.default";
}

Settings parse_settings(const KeyConfig& cfg) {
    kit::require_known_options(cfg, "the azure provider",
                               {"algorithm", "ca_file", "credential", "tenant_id", "client_id",
                                "client_secret_file", "client_certificate_file", "federated_token_file",
                                "authority_host", "identity_endpoint", "resource", "timeout"});
    auto opt = [&](const char* n) { return kit::option(cfg, n); };
    // The server reads these files with the data directory as its working directory.
    for (const char* f : {"ca_file", "client_secret_file", "client_certificate_file", "federated_token_file"}) {
        std::string v = opt(f);
        if (!v.empty() && v[0] != '/')
            throw config_error(std::string(f) + ": \"" + v + "\" is not an absolute path");
    }
    Settings s;
    if (cfg.key_id.empty()) throw config_error("key_id: the azure provider needs a key identifier URL");
    s.key = parse_key_id(cfg.key_id, opt("resource"));

    s.algorithm = opt("algorithm");
    if (s.algorithm.empty()) s.algorithm = s.key.kind == VaultKind::ManagedHsm ? "A256KW" : "RSA-OAEP-256";
    if (s.algorithm != "RSA-OAEP-256" && s.algorithm != "RSA-OAEP" && s.algorithm != "A256KW")
        throw config_error("algorithm: \"" + s.algorithm +
                           "\" is not supported (RSA-OAEP-256, RSA-OAEP, or A256KW for Managed HSM "
                           "oct-HSM keys)");

    s.ca_file = opt("ca_file");
    if (!s.ca_file.empty()) kit::require_readable_file("ca_file", s.ca_file);

    s.tenant_id = opt("tenant_id");
    s.client_id = opt("client_id");
    s.client_secret_file = opt("client_secret_file");
    s.client_certificate_file = opt("client_certificate_file");
    if (!s.tenant_id.empty() && (s.tenant_id.size() > 128 || !all_of_set(s.tenant_id, ".-")))
        throw config_error("tenant_id: \"" + s.tenant_id + "\" is not a tenant id (a GUID or a domain name)");
    if (!s.client_id.empty() && !kit::is_uuid(s.client_id))
        throw config_error("client_id: \"" + s.client_id +
                           "\" is not a GUID (the application or identity client id)");

    std::string c = opt("credential");
    // Workload identity (the Kubernetes webhook's environment): the token file, the app
    // and its home tenant from AZURE_*; the option tenant_id overrides the tenant, for a
    // multi-tenant app acting in the customer's tenant.
    s.federated_token_file = opt("federated_token_file");
    const bool federated_env = kit::env("AZURE_FEDERATED_TOKEN_FILE").size() && s.client_secret_file.empty() &&
                               s.client_certificate_file.empty() && (c.empty() || c == "workload_identity");
    if (c == "workload_identity" || !s.federated_token_file.empty() || federated_env) {
        if (!c.empty() && c != "workload_identity")
            throw config_error("federated_token_file: given with credential " + c +
                               "; it belongs to credential workload_identity");
        c = "workload_identity";
        if (s.federated_token_file.empty()) s.federated_token_file = kit::env("AZURE_FEDERATED_TOKEN_FILE");
        if (s.federated_token_file.empty())
            throw config_error("federated_token_file: workload_identity credentials need the federated token "
                               "file (option federated_token_file or AZURE_FEDERATED_TOKEN_FILE)");
        if (s.federated_token_file[0] != '/')
            throw config_error("federated_token_file: \"" + s.federated_token_file + "\" is not an absolute path");
        kit::require_readable_file("federated_token_file", s.federated_token_file);
        if (s.tenant_id.empty()) s.tenant_id = kit::env("AZURE_TENANT_ID");
        if (s.client_id.empty()) s.client_id = kit::env("AZURE_CLIENT_ID");
        if (!s.tenant_id.empty() && (s.tenant_id.size() > 128 || !all_of_set(s.tenant_id, ".-")))
            throw config_error("tenant_id: \"" + s.tenant_id + "\" is not a tenant id (a GUID or a domain name)");
        if (!s.client_id.empty() && !kit::is_uuid(s.client_id))
            throw config_error("client_id: \"" + s.client_id + "\" is not a GUID (the application client id)");
    }
    if (c.empty())
        c = !s.client_certificate_file.empty()                      ? "client_certificate"
            : !s.client_secret_file.empty() || !s.tenant_id.empty() ? "client_secret"
                                                                    : "managed_identity";
    if (c == "client_secret")
        s.credential = Credential::ClientSecret;
    else if (c == "client_certificate")
        s.credential = Credential::ClientCertificate;
    else if (c == "managed_identity")
        s.credential = Credential::ManagedIdentity;
    else if (c == "workload_identity")
        s.credential = Credential::WorkloadIdentity;
    else
        throw config_error("credential: \"" + c +
                           "\" is not one of client_secret, client_certificate, managed_identity, "
                           "workload_identity");

    if (s.credential != Credential::ManagedIdentity) {
        if (s.tenant_id.empty())
            throw config_error("tenant_id: " + c +
                               " credentials need tenant_id (the Entra ID tenant of the app)");
        if (s.client_id.empty())
            throw config_error("client_id: " + c + " credentials need client_id (the application id)");
    }
    if (s.credential == Credential::ClientCertificate && s.client_certificate_file.empty())
        throw config_error(
            "client_certificate_file: client_certificate credentials need a PEM file with the "
            "certificate and its private key");

    s.authority_host = opt("authority_host");
    if (s.authority_host.empty()) s.authority_host = s.key.authority_host;
    while (!s.authority_host.empty() && s.authority_host.back() == '/') s.authority_host.pop_back();
    if (!plain_origin(s.authority_host, true))
        throw config_error("authority_host: \"" + s.authority_host +
                           "\" is not an https origin (e.g. https://login.microsoftonline.com)");

    s.identity_endpoint = opt("identity_endpoint");
    if (!s.identity_endpoint.empty() && s.identity_endpoint.compare(0, 7, "http://") != 0 &&
        s.identity_endpoint.compare(0, 8, "https://") != 0)
        throw config_error("identity_endpoint: \"" + s.identity_endpoint + "\" is not an http(s) URL");

    // In seconds here (documented before the kit's timeout_ms); the kit's default.
    s.timeout_ms = kit::int_option(cfg, "timeout", kit::kTimeoutMs / 1000, 1, 300, "seconds") * 1000;
    return s;
}

// -------------------------------------------------------------------- answers

KeyStatus key_status_from(const std::string& body, std::time_t now, const KeyId& key) {
    KeyStatus s;
    rapidjson::Document d;
    parse_json_bounded(d, body, nullptr);
    if (d.HasParseError() || !d.IsObject()) {
        s.health = KeyHealth::Unavailable;
        s.state = "unreadable";
        s.detail =
            "Key Vault answered the key GET of " + key.url + " with something that is not a key bundle";
        return s;
    }
    const rapidjson::Value* attrs = member(d, "attributes");
    const rapidjson::Value* enabled = attrs ? member(*attrs, "enabled") : nullptr;
    if (!enabled || !enabled->IsBool()) {
        s.health = KeyHealth::Unavailable;
        s.state = "unreadable";
        s.detail = "the key bundle of " + key.url + " has no attributes.enabled";
        return s;
    }
    long long exp = 0, nbf = 0;
    bool has_exp = int_member(*attrs, "exp", &exp);
    bool has_nbf = int_member(*attrs, "nbf", &nbf);
    s.health = KeyHealth::Revoked;
    if (!enabled->GetBool()) {
        s.state = "disabled";
        s.detail = "key " + key.url + " is disabled in Key Vault; enable it to use the cluster";
        return s;
    }
    if (has_exp && exp <= static_cast<long long>(now)) {
        s.state = "expired";
        s.detail = "key " + key.url + " expired (attributes.exp " + std::to_string(exp) +
                   "); move its expiry date or change the cluster's key";
        return s;
    }
    if (has_nbf && nbf > static_cast<long long>(now)) {
        s.state = "not yet valid";
        s.detail = "key " + key.url + " is not valid before " + std::to_string(nbf) + " (attributes.nbf)";
        return s;
    }
    const rapidjson::Value* k = member(d, "key");
    const rapidjson::Value* ops = k ? member(*k, "key_ops") : nullptr;
    if (ops && ops->IsArray()) {
        bool unwrap = false;
        for (const auto& o : ops->GetArray())
            if (o.IsString() && std::string(o.GetString()) == "unwrapKey") unwrap = true;
        if (!unwrap) {
            s.state = "unwrapKey not permitted";
            s.detail = "key " + key.url +
                       " does not permit unwrapKey (key_ops); add unwrapKey and wrapKey to its operations";
            return s;
        }
    }
    s.health = KeyHealth::Ok;
    s.state = "enabled";
    s.detail = "key " + key.url + " is enabled in Key Vault";
    return s;
}

KmsError vault_error(const http::Response& r, const std::string& op, const KeyId& key) {
    VaultErrorBody e = parse_vault_error(r.body);
    const std::string pre = "azure key vault: " + op + " of key " + key.url + ": ";
    const std::string http = "HTTP " + std::to_string(r.status) + " " + describe(e);
    switch (r.status) {
        case 401: {
            std::string t = challenge_tenant(r.header("www-authenticate"));
            return revoked(pre + "the vault rejected a fresh access token (" + http +
                           "): this identity is not accepted by the vault" +
                           (t.empty() ? "" : " (the vault's tenant is " + t + ")") +
                           "; check tenant_id and the vault's tenant");
        }
        case 403:
            if (e.inner == "KeyDisabled" || e.message.find("disabled") != std::string::npos)
                return revoked(pre + "the key is disabled (" + http + "); enable it to use the cluster");
            return revoked(pre + "access denied (" + http +
                           "); grant the identity keys get, wrapKey and unwrapKey (or the Key Vault "
                           "Crypto Service Encryption User role)");
        case 404:
            return revoked(pre + "key not found (" + http +
                           "): deleted, purged or never created; recover it if it is soft-deleted");
        case 400:
            if (op == "unwrapkey")
                return revoked(pre + "the key cannot unwrap this cluster's KEK (" + http +
                               "): wrong key material or a damaged keyring");
            if (op == "get") break;  // nothing of ours to fix: an unexpected answer
            return config_error(
                pre + "the vault refused the request (" + http +
                "); check algorithm (RSA keys: RSA-OAEP-256, oct-HSM keys: A256KW) and key_id");
        default:
            break;
    }
    if (http::transient_status(r.status))
        return unavailable(pre + "Key Vault is unavailable (" + http + "); retry later");
    return unavailable(pre + "unexpected answer (" + http + ")");
}

// -------------------------------------------------------------------- provider

namespace {

class AzureKeyVaultProvider : public KeyProvider {
public:
    AzureKeyVaultProvider(const KeyConfig& cfg, Transport transport)
        : cfg_(cfg),
          s_(parse_settings(cfg)),
          transport_(transport ? std::move(transport)
                               : [](const http::Request& r) { return http::perform_with_retry(r); }),
          identity_(cfg_, s_, transport_) {}

    std::string name() const override { return "azure"; }
    const KeyConfig& config() const override { return cfg_; }
    std::string identity() const override {
        switch (s_.credential) {
            case Credential::ManagedIdentity:
                return s_.client_id.empty() ? "managed identity" : "managed identity " + s_.client_id;
            case Credential::WorkloadIdentity:
                return "app " + s_.client_id + " in tenant " + s_.tenant_id + " (workload identity federation)";
            default:
                return "app " + s_.client_id + " in tenant " + s_.tenant_id;
        }
    }

    WrapResult wrap(const SecureBytes& kek) override {
        std::string body;
        kit::WipeOnExit guard{body};  // it holds the KEK (base64url), on every path
        body.reserve(64 + 2 * kek.size());
        body = "{\"alg\":\"" + s_.algorithm + "\",\"value\":\"";
        std::string value = base64url_encode(kek.data(), kek.size());
        kit::WipeOnExit value_guard{value};
        body += value;
        body += "\"}";
        http::Response r = call("wrapkey", "POST", s_.key.url + "/wrapkey?api-version=" + kApiVersion, body);
        if (r.status != 200) throw vault_error(r, "wrapkey", s_.key);
        WrapResult w;
        w.request_id = r.header("x-ms-request-id");
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        std::string v = d.HasParseError() ? "" : string_member(d, "value");
        std::string kid = d.HasParseError() ? "" : string_member(d, "kid");
        if (v.empty())
            throw unavailable("azure key vault: wrapkey of key " + s_.key.url + " answered without a value");
        try {
            w.blob = base64url_decode(v);
        } catch (const std::exception&) {
            throw unavailable("azure key vault: wrapkey of key " + s_.key.url +
                              " answered a value that is not base64url");
        }
        w.key_version = kid.empty() ? s_.key.version : kid.substr(kid.rfind('/') + 1);
        return w;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        std::string body = "{\"alg\":\"" + s_.algorithm + "\",\"value\":\"" +
                           base64url_encode(blob.data(), blob.size()) + "\"}";
        last_request_id_.clear();
        http::Response r =
            call("unwrapkey", "POST", s_.key.url + "/unwrapkey?api-version=" + kApiVersion, body);
        last_request_id_ = r.header("x-ms-request-id");
        if (r.status != 200) throw vault_error(r, "unwrapkey", s_.key);
        kit::WipeOnExit wr{r.body};
        SecureBytes out;
        bool ok = false;
        {
            rapidjson::Document d;
            parse_json_bounded_insitu(d, r.body, nullptr);
            const rapidjson::Value* v = d.HasParseError() ? nullptr : member(d, "value");
            if (v && v->IsString() && v->GetStringLength() > 0) {
                try {
                    out = kit::decode_secret(v->GetString(), v->GetStringLength(), true);
                    ok = true;
                } catch (const std::exception&) {
                }
            }
        }
        if (!ok)
            throw unavailable("azure key vault: unwrapkey of key " + s_.key.url +
                              " answered 200 without a readable value");
        return out;
    }

    KeyStatus status() override {
        try {
            http::Response r = call("get", "GET", s_.key.url + "?api-version=" + kApiVersion, "");
            KeyStatus st;
            if (r.status == 200) {
                st = key_status_from(r.body, std::time(nullptr), s_.key);
            } else {
                KmsError e = vault_error(r, "get", s_.key);
                if (e.kind == KmsErrorKind::Config) throw e;
                st.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
                st.state = r.status == 404   ? "not found"
                           : r.status == 403 ? (std::string(e.what()).find("disabled") != std::string::npos
                                                    ? "disabled"
                                                    : "access denied")
                           : r.status == 401 ? "unauthorized"
                                             : "unavailable";
                st.detail = e.what();
            }
            st.request_id = r.header("x-ms-request-id");
            return st;
        } catch (const KmsError& e) {
            return kit::status_from_error(e, "credentials refused");
        }
    }

private:
    // A Key Vault request with a bearer token; a 401 drops the token and retries once.
    http::Response call(const std::string& op, const std::string& method, const std::string& url,
                        const std::string& body) {
        for (int attempt = 0;; ++attempt) {
            kit::Timing timing;
            timing.timeout_ms = s_.timeout_ms;
            http::Request req = http::request(method, url, timing, s_.ca_file);
            struct Scrub {  // the bearer token and the body (the KEK), on every path
                http::Request& r;
                ~Scrub() { http::wipe(r); }
            } scrub{req};
            req.body = body;
            req.headers.emplace_back("Authorization", std::string());
            identity_.bearer(req.headers[0].second, attempt > 0);
            req.headers.emplace_back("Accept", "application/json");
            req.headers.emplace_back("x-ms-client-request-id", uuid4());
            req.headers.emplace_back("User-Agent", user_agent());
            if (method != "GET") req.headers.emplace_back("Content-Type", "application/json");
            http::Response r;
            try {
                r = transport_(req);
            } catch (const KmsError& e) {
                throw transport_error(e, "azure key vault: " + op + " of key " + s_.key.url, s_.ca_file);
            }
            if (r.status == 401 && attempt == 0) continue;  // the next try asks a fresh token
            return r;
        }
    }

    KeyConfig cfg_;
    Settings s_;
    Transport transport_;
    Identity identity_;
};

}  // namespace

std::unique_ptr<KeyProvider> make_azure_provider(const KeyConfig& cfg, Transport transport) {
    return std::make_unique<AzureKeyVaultProvider>(cfg, std::move(transport));
}

}  // namespace cmk::azure
