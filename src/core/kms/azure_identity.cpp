// The Azure identity (azure_identity.hpp): client credentials with a secret or a
// certificate assertion against Entra ID v2.0, or a managed identity endpoint, and the
// access token they yield. The certificate's PEM, the client secret, the App Service
// identity header and every token are kit::Secret or wiped on every path (the request
// bodies and headers that carried them included); a message names the endpoint and the
// key, never a secret.
#include "azure_identity.hpp"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <rapidjson/document.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "jwt.hpp"

#ifndef CMK_VERSION
#define CMK_VERSION "dev"
#endif

namespace cmk::azure {

using kit::config_error;
using kit::revoked;
using kit::unavailable;
using kit::wipe;

namespace {

const char kCertField[] = "client_certificate_file";

kit::X509Ptr read_cert(const std::string& pem) {
    kit::BioPtr bio = kit::mem_bio(pem, kCertField);
    kit::X509Ptr cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
    if (!cert) throw config_error(std::string(kCertField) + ": no PEM certificate in the file");
    return cert;
}

kit::PkeyPtr read_key(const std::string& pem) {
    kit::BioPtr bio = kit::mem_bio(pem, kCertField);
    // An empty passphrase callback: encrypted keys fail instead of prompting.
    auto no_pass = [](char*, int, int, void*) -> int { return 0; };
    kit::PkeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, no_pass, nullptr));
    if (!key)
        throw config_error(std::string(kCertField) +
                           ": no unencrypted PEM private key in the file (it must hold the "
                           "certificate and its private key)");
    return key;
}

}  // namespace

std::string uuid4() {
    std::string h = random_id();  // 32 hex digits
    h[12] = '4';
    h[16] = "89ab"[std::strtol(h.substr(16, 1).c_str(), nullptr, 16) & 3];
    return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" +
           h.substr(20);
}

std::string user_agent() {
    return std::string("cmk_lakebase/") + CMK_VERSION;
}

KmsError transport_error(const KmsError& e, const std::string& what, const std::string& ca_file) {
    std::string m = what + ": " + e.what();
    if (m.find("certificate") != std::string::npos || m.find("SSL") != std::string::npos)
        m += ca_file.empty() ? "; if the endpoint uses a private CA, set ca_file=PATH (PEM)"
                             : "; check that ca_file " + ca_file + " holds the CA of the endpoint";
    return KmsError(e.kind, m);
}

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

Token parse_token_response(const http::Response& r, std::time_t now, const std::string& who, bool imds) {
    if (r.status != 200) {
        // Entra ID: {"error":"invalid_client","error_description":"AADSTS7000215: ..."};
        // IMDS: {"error":"invalid_request","error_description":"Identity not found"}.
        rapidjson::Document d;
        parse_json_bounded(d, r.body, nullptr);
        std::string err, desc;
        if (!d.HasParseError() && d.IsObject()) {
            err = kit::string_member(d, "error");
            desc = kit::string_member(d, "error_description");
            desc = desc.substr(0, desc.find("\r"));
            desc = desc.substr(0, desc.find("\n"));
        }
        std::string what = "HTTP " + std::to_string(r.status) + (err.empty() ? "" : " " + err) +
                           (desc.empty() ? "" : ": " + kit::one_line(desc, 160));
        bool transient = http::transient_status(r.status) || (imds && (r.status == 404 || r.status == 410));
        if (transient) throw unavailable(who + " is unavailable (" + what + "); retry later");
        if (r.status == 400 || r.status == 401 || r.status == 403)
            throw revoked(
                who + " refused the credentials (" + what +
                "); check the app's secret, certificate or federated identity credential, its consent in the "
                "tenant, or the identity assigned to this machine");
        throw unavailable(who + " gave an unexpected answer (" + what + ")");
    }
    std::string body = r.body;  // parsed in place, then wiped: it holds the token
    Token t;
    {
        rapidjson::Document d;
        parse_json_bounded_insitu(d, body, nullptr);
        if (d.HasParseError() || !d.IsObject()) {
            wipe(body);
            throw unavailable(who + " answered 200 with something that is not a token response");
        }
        const rapidjson::Value* at = kit::member(d, "access_token");
        if (!at || !at->IsString() || at->GetStringLength() == 0) {
            wipe(body);
            throw unavailable(who + " answered 200 without an access_token");
        }
        t.value = kit::Secret(std::string(at->GetString(), at->GetStringLength()));
        long long in = 0, on = 0;
        // Both come from the peer: bounded before any arithmetic (signed overflow).
        if (kit::int_member(d, "expires_in", &in) && in > 0)
            t.expires_at = now + static_cast<std::time_t>(std::min<long long>(in, kit::kMaxTokenLifeS));
        else if (kit::int_member(d, "expires_on", &on) && on > 0)
            t.expires_at = static_cast<std::time_t>(std::min<long long>(on, now + kit::kMaxTokenLifeS));
        else
            t.expires_at = now + 300;  // no lifetime given: use it briefly
    }
    wipe(body);
    return t;
}

// -------------------------------------------------------------------- identity

Identity::Identity(const KeyConfig& cfg, const Settings& s, Transport transport)
    : s_(s), transport_(std::move(transport)) {
        switch (s_.credential) {
            case Credential::ClientSecret:
                secret_ = kit::secret_from(cfg, "client_secret_file", "AZURE_CLIENT_SECRET");
                if (secret_.empty())
                    throw config_error(
                        "client_secret_file: no client secret for the azure provider: set "
                        "client_secret_file=PATH (a file of mode 0600) or AZURE_CLIENT_SECRET in the "
                        "environment (the server's, for the server)");
                break;
            case Credential::ClientCertificate:
                secret_ = kit::read_secret_file(kCertField, s_.client_certificate_file);
                (void)client_assertion(secret_.str(), s_.client_id, s_.token_url(), std::time(nullptr),
                                       "validate");  // fails now, naming the field, if unusable
                break;
            case Credential::WorkloadIdentity: {
                // Checked now (present, readable, not empty); read again at each token
                // request, since Kubernetes rotates the projected token.
                kit::Secret t(kit::trim(sys::read_file(s_.federated_token_file.c_str())));
                if (t.empty())
                    throw config_error("federated_token_file: \"" + s_.federated_token_file + "\" is empty");
                break;
            }
            case Credential::ManagedIdentity:
                if (s_.identity_endpoint.empty()) {
                    const char* ep = std::getenv("IDENTITY_ENDPOINT");
                    const char* hdr = std::getenv("IDENTITY_HEADER");
                    if (ep && *ep && hdr && *hdr) {
                        app_service_ = true;
                        mi_endpoint_ = ep;
                        secret_ = kit::Secret(hdr);
                    } else {
                        mi_endpoint_ = "http://169.254.169.254/metadata/identity/oauth2/token";
                    }
                } else {
                    mi_endpoint_ = s_.identity_endpoint;
                }
                break;
        }
}

void Identity::bearer(std::string& out, bool fresh) {
    kit::Secret token = cache_.get(fresh, [this](long* life) { return fetch_token(life); });
    out.reserve(7 + token.str().size());
    out = "Bearer ";
    out += token.str();
}

kit::Secret Identity::fetch_token(long* life_s) {
    const std::time_t now = std::time(nullptr);
    bool imds = s_.credential == Credential::ManagedIdentity;
    kit::Timing timing;
    timing.timeout_ms = s_.timeout_ms;
    http::Request req = http::request(imds ? "GET" : "POST", "", timing, "");
    struct Scrub {  // the body (secret, assertion) and the identity header, on every path
        http::Request& r;
        ~Scrub() { http::wipe(r); }
    } scrub{req};
    std::string who;
    if (imds) {
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
        req.url = s_.token_url();
        req.ca_file = s_.ca_file;
        req.headers.emplace_back("Content-Type", "application/x-www-form-urlencoded");
        req.headers.emplace_back("Accept", "application/json");
        req.body = "grant_type=client_credentials&client_id=" + http::url_encode(s_.client_id) +
                   "&scope=" + http::url_encode(s_.scope());
        if (s_.credential == Credential::ClientSecret) {
            std::string enc = http::url_encode(secret_.str());
            req.body += "&client_secret=" + enc;
            wipe(enc);
        } else if (s_.credential == Credential::WorkloadIdentity) {
            kit::Secret a;
            try {
                a = kit::Secret(kit::trim(sys::read_file(s_.federated_token_file.c_str())));
            } catch (const std::exception& e) {
                throw unavailable("azure key vault: the federated token file " + s_.federated_token_file +
                                  " cannot be read: " + e.what());
            }
            std::string enc = http::url_encode(a.str());
            req.body +=
                "&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
                "&client_assertion=" +
                enc;
            wipe(enc);
        } else {
            std::string a = client_assertion(secret_.str(), s_.client_id, s_.token_url(), now, uuid4());
            req.body +=
                "&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"
                "&client_assertion=" +
                a;
            wipe(a);
        }
    }
    req.headers.emplace_back("User-Agent", user_agent());
    http::Response r;
    try {
        r = transport_(req);
    } catch (const KmsError& e) {
        throw transport_error(e, "azure key vault: token from " + who + " for key " + s_.key.url, s_.ca_file);
    }
    kit::WipeOnExit wr{r.body};
    Token t = parse_token_response(r, now, who, imds);
    *life_s = static_cast<long>(t.expires_at - now);
    return std::move(t.value);
}

}  // namespace cmk::azure
