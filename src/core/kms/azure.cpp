// The Azure Key Vault / Managed HSM key provider (kms_azure.hpp). The KEK is wrapped
// by POST {key_id}/wrapkey and unwrapped by POST {key_id}/unwrapkey under a versioned
// key identifier (a versionless id would follow the key's rotation and stop
// unwrapping blobs made under the old version); the key's state is GET {key_id}.
// The wrapped KEK is stored as the raw bytes Key Vault returned, so it can also be
// unwrapped by hand (az keyvault key decrypt / the REST API) with the same key.
//
// Tokens: Entra ID v2.0 client credentials (a secret, or a certificate through an
// RS256 client assertion) or a managed identity endpoint (IMDS, or App Service's
// IDENTITY_ENDPOINT). A token is cached until shortly before it expires; a 401 from
// the vault drops it and the request is retried once with a fresh token, so a 401
// that survives a fresh token is the vault's decision about this identity (revoked),
// not an outage.
#include "azure.hpp"
#include "jwt.hpp"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <rapidjson/document.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>

#include "cmk_lakebase/base/crypto.hpp"

#ifndef CMK_VERSION
#define CMK_VERSION "dev"
#endif

namespace cmk::azure {
namespace {

KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}
KmsError revoked(const std::string& m) {
    return KmsError(KmsErrorKind::Revoked, m);
}
KmsError unavailable(const std::string& m) {
    return KmsError(KmsErrorKind::Unavailable, m);
}

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

// One line for an error message: no control characters, bounded length.
std::string one_line(const std::string& s, size_t max = 200) {
    std::string out;
    for (char c : s) {
        if (out.size() >= max) {
            out += "...";
            break;
        }
        out.push_back(static_cast<unsigned char>(c) < 0x20 ? ' ' : c);
    }
    return out;
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

bool is_guid(const std::string& s) {
    if (s.size() != 36) return false;
    for (size_t i = 0; i < s.size(); ++i) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-' : !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
    }
    return true;
}

const rapidjson::Value* member(const rapidjson::Value& o, const char* name) {
    if (!o.IsObject()) return nullptr;
    auto it = o.FindMember(name);
    return it == o.MemberEnd() ? nullptr : &it->value;
}

std::string string_member(const rapidjson::Value& o, const char* name) {
    const rapidjson::Value* v = member(o, name);
    return v && v->IsString() ? std::string(v->GetString(), v->GetStringLength()) : "";
}

// A number that may come as a JSON number or a string of digits (IMDS sends strings).
bool int_member(const rapidjson::Value& o, const char* name, long long* out) {
    const rapidjson::Value* v = member(o, name);
    if (!v) return false;
    if (v->IsInt64()) {
        *out = v->GetInt64();
        return true;
    }
    if (v->IsNumber()) {
        *out = static_cast<long long>(v->GetDouble());
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

// Key Vault's error body {"error":{"code":..,"message":..,"innererror":{"code":..}}}.
struct VaultErrorBody {
    std::string code, inner, message;
};
VaultErrorBody parse_vault_error(const std::string& body) {
    VaultErrorBody e;
    rapidjson::Document d;
    d.Parse(body.c_str(), body.size());
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

std::string uuid4() {
    std::string h = random_id();  // 32 hex digits
    h[12] = '4';
    h[16] = "89ab"[std::strtol(h.substr(16, 1).c_str(), nullptr, 16) & 3];
    return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" +
           h.substr(20);
}

void scrub(std::string& s) {
    if (!s.empty()) OPENSSL_cleanse(&s[0], s.size());
    s.clear();
}

struct ScrubOnExit {
    std::string& s;
    ~ScrubOnExit() { scrub(s); }
};

// ------------------------------------------------------------- client certificate

struct BioFree {
    void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
    void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
    void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};

const char kCertField[] = "client_certificate_file";

std::unique_ptr<X509, X509Free> read_cert(const std::string& pem) {
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!bio) throw config_error(std::string(kCertField) + ": out of memory");
    std::unique_ptr<X509, X509Free> cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!cert) throw config_error(std::string(kCertField) + ": no PEM certificate in the file");
    return cert;
}

std::unique_ptr<EVP_PKEY, PkeyFree> read_key(const std::string& pem) {
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!bio) throw config_error(std::string(kCertField) + ": out of memory");
    // An empty passphrase callback: encrypted keys fail instead of prompting.
    auto no_pass = [](char*, int, int, void*) -> int { return 0; };
    std::unique_ptr<EVP_PKEY, PkeyFree> key(PEM_read_bio_PrivateKey(bio.get(), nullptr, no_pass, nullptr));
    if (!key)
        throw config_error(std::string(kCertField) +
                           ": no unencrypted PEM private key in the file (it must hold the "
                           "certificate and its private key)");
    return key;
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
    k.loopback = host == "127.0.0.1" || host == "localhost" || host == "[::1]";

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
    static const std::set<std::string> kKnown = {
        "algorithm",  "ca_file",        "tenant_id",         "client_id", "client_secret_file",
        "credential", "authority_host", "identity_endpoint", "resource",  "client_certificate_file",
        "timeout"};
    for (const auto& o : cfg.options)
        if (!kKnown.count(o.first))
            throw config_error(o.first +
                               ": unknown option of the azure provider (known: algorithm, ca_file, "
                               "credential, tenant_id, client_id, client_secret_file, "
                               "client_certificate_file, authority_host, identity_endpoint, resource, "
                               "timeout)");
    auto opt = [&](const char* n) { return http::option(cfg, n); };
    // The server reads these files with the data directory as its working directory.
    for (const char* f : {"ca_file", "client_secret_file", "client_certificate_file"}) {
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
    if (!s.ca_file.empty()) http::require_readable_file("ca_file", s.ca_file);

    s.tenant_id = opt("tenant_id");
    s.client_id = opt("client_id");
    s.client_secret_file = opt("client_secret_file");
    s.client_certificate_file = opt("client_certificate_file");
    if (!s.tenant_id.empty() && (s.tenant_id.size() > 128 || !all_of_set(s.tenant_id, ".-")))
        throw config_error("tenant_id: \"" + s.tenant_id + "\" is not a tenant id (a GUID or a domain name)");
    if (!s.client_id.empty() && !is_guid(s.client_id))
        throw config_error("client_id: \"" + s.client_id +
                           "\" is not a GUID (the application or identity client id)");

    std::string c = opt("credential");
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
    else
        throw config_error("credential: \"" + c +
                           "\" is not one of client_secret, client_certificate, managed_identity");

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

    std::string t = opt("timeout");
    if (!t.empty()) {
        char* end = nullptr;
        long v = std::strtol(t.c_str(), &end, 10);
        if (!end || *end || v < 1 || v > 300)
            throw config_error("timeout: \"" + t + "\" is not a number of seconds from 1 to 300");
        s.timeout_ms = v * 1000;
    }
    return s;
}

// ----------------------------------------------------------------- client assertion

std::string certificate_thumbprint(const std::string& pem) {
    return jwt::x509_thumbprint(pem, "sha1", kCertField);
}

// The RS256 client assertion (x5t header) Entra ID takes in place of a secret; the
// JWT itself is built and signed by jwt.hpp, shared with the GCP provider.
std::string client_assertion(const std::string& pem, const std::string& client_id,
                             const std::string& audience, std::time_t now, const std::string& jti) {
    auto cert = read_cert(pem);
    auto key = read_key(pem);
    if (EVP_PKEY_base_id(key.get()) != EVP_PKEY_RSA)
        throw config_error(std::string(kCertField) + ": the private key is not an RSA key (RS256 needs RSA)");
    if (X509_check_private_key(cert.get(), key.get()) != 1)
        throw config_error(std::string(kCertField) + ": the private key does not belong to the certificate");
    const int64_t t = static_cast<int64_t>(now);
    jwt::JsonObject claims;
    claims.set("aud", audience).set("iss", client_id).set("sub", client_id).set("jti", jti);
    claims.set("nbf", t).set("iat", t).set("exp", t + 600);
    return jwt::sign_rs256(jwt::rs256_header({{"x5t", certificate_thumbprint(pem)}}), claims, pem,
                           kCertField);
}

// -------------------------------------------------------------------- answers

Token parse_token_response(const http::Response& r, std::time_t now, const std::string& who, bool imds) {
    if (r.status != 200) {
        // Entra ID: {"error":"invalid_client","error_description":"AADSTS7000215: ..."};
        // IMDS: {"error":"invalid_request","error_description":"Identity not found"}.
        rapidjson::Document d;
        d.Parse(r.body.c_str(), r.body.size());
        std::string err, desc;
        if (!d.HasParseError() && d.IsObject()) {
            err = string_member(d, "error");
            desc = string_member(d, "error_description");
            desc = desc.substr(0, desc.find("\r"));
            desc = desc.substr(0, desc.find("\n"));
        }
        std::string what = "HTTP " + std::to_string(r.status) + (err.empty() ? "" : " " + err) +
                           (desc.empty() ? "" : ": " + one_line(desc, 160));
        bool transient = http::transient_status(r.status) || (imds && (r.status == 404 || r.status == 410));
        if (transient) throw unavailable(who + " is unavailable (" + what + "); retry later");
        if (r.status == 400 || r.status == 401 || r.status == 403)
            throw revoked(
                who + " refused the credentials (" + what +
                "); check the app's secret or certificate, or the identity assigned to this machine");
        throw unavailable(who + " gave an unexpected answer (" + what + ")");
    }
    std::string body = r.body;  // parsed in place, then wiped: it holds the token
    Token t;
    {
        rapidjson::Document d;
        d.ParseInsitu(&body[0]);
        if (d.HasParseError() || !d.IsObject()) {
            scrub(body);
            throw unavailable(who + " answered 200 with something that is not a token response");
        }
        const rapidjson::Value* at = member(d, "access_token");
        if (!at || !at->IsString() || at->GetStringLength() == 0) {
            scrub(body);
            throw unavailable(who + " answered 200 without an access_token");
        }
        t.value = http::Secret(std::string(at->GetString(), at->GetStringLength()));
        long long in = 0, on = 0;
        if (int_member(d, "expires_in", &in) && in > 0)
            t.expires_at = now + static_cast<std::time_t>(in);
        else if (int_member(d, "expires_on", &on) && on > 0)
            t.expires_at = static_cast<std::time_t>(on);
        else
            t.expires_at = now + 300;  // no lifetime given: use it briefly
    }
    scrub(body);
    return t;
}

KeyStatus key_status_from(const std::string& body, std::time_t now, const KeyId& key) {
    KeyStatus s;
    rapidjson::Document d;
    d.Parse(body.c_str(), body.size());
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
        : cfg_(cfg), s_(parse_settings(cfg)), transport_(std::move(transport)) {
        if (!transport_) {
            transport_ = [](const http::Request& r) { return http::perform_with_retry(r); };
        }
        switch (s_.credential) {
            case Credential::ClientSecret:
                secret_ = http::secret_from(cfg, "client_secret_file", "AZURE_CLIENT_SECRET");
                if (secret_.empty())
                    throw config_error(
                        "client_secret_file: no client secret for the azure provider: set "
                        "client_secret_file=PATH (a file of mode 0600) or AZURE_CLIENT_SECRET in the "
                        "environment (the server's, for the server)");
                break;
            case Credential::ClientCertificate:
                secret_ = http::read_secret_file(kCertField, s_.client_certificate_file);
                (void)client_assertion(secret_.str(), s_.client_id, s_.token_url(), std::time(nullptr),
                                       "validate");  // fails now, naming the field, if unusable
                break;
            case Credential::ManagedIdentity:
                if (s_.identity_endpoint.empty()) {
                    const char* ep = std::getenv("IDENTITY_ENDPOINT");
                    const char* hdr = std::getenv("IDENTITY_HEADER");
                    if (ep && *ep && hdr && *hdr) {
                        app_service_ = true;
                        mi_endpoint_ = ep;
                        secret_ = http::Secret(hdr);
                    } else {
                        mi_endpoint_ = "http://169.254.169.254/metadata/identity/oauth2/token";
                    }
                } else {
                    mi_endpoint_ = s_.identity_endpoint;
                }
                break;
        }
    }

    std::string name() const override { return "azure"; }
    const KeyConfig& config() const override { return cfg_; }

    WrapResult wrap(const SecureBytes& kek) override {
        std::string body;
        ScrubOnExit guard{body};  // it holds the KEK (base64url), on every path
        body.reserve(64 + 2 * kek.size());
        body = "{\"alg\":\"" + s_.algorithm + "\",\"value\":\"";
        std::string value = base64url_encode(kek.data(), kek.size());
        ScrubOnExit value_guard{value};
        body += value;
        body += "\"}";
        http::Response r = call("wrapkey", "POST", s_.key.url + "/wrapkey?api-version=" + kApiVersion, body);
        if (r.status != 200) throw vault_error(r, "wrapkey", s_.key);
        WrapResult w;
        w.request_id = r.header("x-ms-request-id");
        rapidjson::Document d;
        d.Parse(r.body.c_str(), r.body.size());
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
        std::string text = r.body;
        scrub(r.body);
        SecureBytes out;
        bool ok = false;
        {
            rapidjson::Document d;
            d.ParseInsitu(&text[0]);
            const rapidjson::Value* v = d.HasParseError() ? nullptr : member(d, "value");
            if (v && v->IsString() && v->GetStringLength() > 0) {
                try {
                    std::vector<uint8_t> raw =
                        base64url_decode(std::string(v->GetString(), v->GetStringLength()));
                    out = SecureBytes(raw.data(), raw.size());
                    OPENSSL_cleanse(raw.data(), raw.size());
                    ok = true;
                } catch (const std::exception&) {
                }
            }
        }
        scrub(text);
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
            if (e.kind == KmsErrorKind::Config) throw;
            KeyStatus st;
            st.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
            st.state = e.kind == KmsErrorKind::Revoked ? "credentials refused" : "unavailable";
            st.detail = e.what();
            return st;
        }
    }

private:
    // A Key Vault request with a bearer token; a 401 drops the token and retries once.
    http::Response call(const std::string& op, const std::string& method, const std::string& url,
                        const std::string& body) {
        for (int attempt = 0;; ++attempt) {
            http::Request req;
            req.method = method;
            req.url = url;
            req.body = body;
            req.ca_file = s_.ca_file;
            req.timeout_ms = s_.timeout_ms;
            req.headers.emplace_back("Authorization", std::string());
            bearer(req.headers[0].second, attempt > 0);
            req.headers.emplace_back("Accept", "application/json");
            req.headers.emplace_back("x-ms-client-request-id", uuid4());
            req.headers.emplace_back("User-Agent", std::string("cmk_lakebase/") + CMK_VERSION);
            if (method != "GET") req.headers.emplace_back("Content-Type", "application/json");
            http::Response r;
            try {
                r = transport_(req);
            } catch (const KmsError& e) {
                scrub(req.headers[0].second);
                scrub(req.body);
                throw transport_error(e, "azure key vault: " + op + " of key " + s_.key.url);
            } catch (...) {
                scrub(req.headers[0].second);
                scrub(req.body);
                throw;
            }
            scrub(req.headers[0].second);
            scrub(req.body);
            if (r.status == 401 && attempt == 0) {
                std::lock_guard<std::mutex> g(mu_);
                token_ = Token();
                continue;
            }
            return r;
        }
    }

    // A transport failure (timeout, refused, TLS) with the provider, key and a hint.
    KmsError transport_error(const KmsError& e, const std::string& what) const {
        std::string m = what + ": " + e.what();
        if (m.find("certificate") != std::string::npos || m.find("SSL") != std::string::npos)
            m += s_.ca_file.empty() ? "; if the endpoint uses a private CA, set ca_file=PATH (PEM)"
                                    : "; check that ca_file " + s_.ca_file + " holds the CA of the endpoint";
        return KmsError(e.kind, m);
    }

    // out = "Bearer <token>": the cached token, or a new one when missing, near expiry
    // or `fresh` is asked. Written in place so that no stray copy of the token is left.
    void bearer(std::string& out, bool fresh) {
        std::lock_guard<std::mutex> g(mu_);
        std::time_t now = std::time(nullptr);
        if (fresh || token_.value.empty() || now >= refresh_at_) {
            token_ = fetch_token(now);
            long life = static_cast<long>(token_.expires_at - now);
            refresh_at_ = token_.expires_at - std::min<long>(300, std::max<long>(life / 2, 0));
        }
        out.reserve(7 + token_.value.str().size());
        out = "Bearer ";
        out += token_.value.str();
    }

    Token fetch_token(std::time_t now) {
        http::Request req;
        req.timeout_ms = s_.timeout_ms;
        bool imds = s_.credential == Credential::ManagedIdentity;
        std::string who;
        if (imds) {
            req.method = "GET";
            who = "the managed identity endpoint " + mi_endpoint_;
            req.url = mi_endpoint_ + (mi_endpoint_.find('?') == std::string::npos ? "?" : "&") +
                      "api-version=" + (app_service_ ? "2019-08-01" : "2018-02-01") +
                      "&resource=" + http::url_encode(s_.key.resource) +
                      (s_.client_id.empty() ? "" : "&client_id=" + http::url_encode(s_.client_id));
            if (app_service_)
                req.headers.emplace_back("X-IDENTITY-HEADER", secret_.str());
            else
                req.headers.emplace_back("Metadata", "true");
            req.connect_timeout_ms = 2000;
            if (mi_endpoint_.compare(0, 8, "https://") == 0) req.ca_file = s_.ca_file;
        } else {
            who = "Entra ID (" + s_.authority_host + ", tenant " + s_.tenant_id + ")";
            req.method = "POST";
            req.url = s_.token_url();
            req.ca_file = s_.ca_file;
            req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
            req.headers.emplace_back("Accept", "application/json");
            req.body = "grant_type=client_credentials&client_id=" + http::url_encode(s_.client_id) +
                       "&scope=" + http::url_encode(s_.scope());
            if (s_.credential == Credential::ClientSecret) {
                std::string enc = http::url_encode(secret_.str());
                req.body += "&client_secret=" + enc;
                scrub(enc);
            } else {
                std::string a = client_assertion(secret_.str(), s_.client_id, s_.token_url(), now, uuid4());
                req.body +=
                    "&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
                    "&client_assertion=" +
                    a;
                scrub(a);
            }
        }
        req.headers.emplace_back("User-Agent", std::string("cmk_lakebase/") + CMK_VERSION);
        http::Response r;
        try {
            r = transport_(req);
        } catch (const KmsError& e) {
            scrub(req.body);
            if (app_service_) scrub(req.headers[0].second);
            throw transport_error(e, "azure key vault: token from " + who + " for key " + s_.key.url);
        } catch (...) {
            scrub(req.body);
            if (app_service_) scrub(req.headers[0].second);
            throw;
        }
        scrub(req.body);
        if (app_service_) scrub(req.headers[0].second);
        Token t = parse_token_response(r, now, who, imds);
        scrub(r.body);
        return t;
    }

    KeyConfig cfg_;
    Settings s_;
    Transport transport_;
    http::Secret secret_;  // client secret, certificate PEM (with key), or App Service header
    std::string mi_endpoint_;
    bool app_service_ = false;
    std::mutex mu_;
    Token token_;
    std::time_t refresh_at_ = 0;
};

}  // namespace

std::unique_ptr<KeyProvider> make_azure_provider(const KeyConfig& cfg, Transport transport) {
    return std::make_unique<AzureKeyVaultProvider>(cfg, std::move(transport));
}

}  // namespace cmk::azure
