// Units for the Azure Key Vault provider (kms_azure.hpp): key identifier parsing and
// option validation, the requests it builds (token endpoint, managed identity, Key
// Vault wrapkey/unwrapkey/GET) through a canned transport, the mapping of Key Vault
// and Entra ID answers onto ok/unavailable/revoked, the token cache and the 401 retry,
// and the certificate client assertion (verified with the certificate's public key).
#include <gtest/gtest.h>
#include <openssl/bn.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <deque>
#include <fstream>
#include <rapidjson/document.h>

#include "cmk_lakebase/base/crypto.hpp"
#include "core/kms/azure.hpp"
#include "test_helpers.hpp"

using namespace cmk;
using namespace cmk::azure;

namespace {

const char kKid[] = "https://myvault.vault.azure.net/keys/cmk/0123456789abcdef0123456789abcdef";
const char kTenant[] = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const char kClient[] = "11111111-2222-3333-4444-555555555555";

KmsErrorKind config_kind(const KeyConfig& c, std::string* msg) {
    try {
        make_azure_provider(c, [](const http::Request&) { return http::Response(); });
    } catch (const KmsError& e) {
        *msg = e.what();
        return e.kind;
    }
    *msg = "";
    return KmsErrorKind::Unavailable;  // "no error" for these tests
}

// Canned transport: answers in order, records every request.
struct Fake {
    std::deque<http::Response> answers;
    std::vector<http::Request> seen;
    Transport fn() {
        return [this](const http::Request& r) {
            seen.push_back(r);
            if (answers.empty()) throw KmsError(KmsErrorKind::Unavailable, "fake: no more answers");
            http::Response a = std::move(answers.front());
            answers.pop_front();
            if (a.status == -1) throw KmsError(KmsErrorKind::Unavailable, "fake: connection timed out");
            return a;
        };
    }
    void add(long status, const std::string& body, std::map<std::string, std::string> h = {}) {
        http::Response r;
        r.status = status;
        r.body = body;
        r.headers = std::move(h);
        answers.push_back(std::move(r));
    }
};

std::string header(const http::Request& r, const std::string& name) {
    for (const auto& h : r.headers)
        if (h.first == name) return h.second;
    return "";
}

std::string token_json(const std::string& tok, int expires_in = 3599) {
    return "{\"token_type\":\"Bearer\",\"expires_in\":" + std::to_string(expires_in) +
           ",\"ext_expires_in\":3599,\"access_token\":\"" + tok + "\"}";
}

struct SecretCfg {
    cmk_test::TempDir dir;
    KeyConfig cfg;
    SecretCfg() {
        std::string f = dir.path() + "/secret";
        {
            std::ofstream o(f);
            o << "s3cr&t=+\n";
        }
        chmod(f.c_str(), 0600);
        cfg.provider = "azure";
        cfg.key_id = kKid;
        cfg.options = {{"tenant_id", kTenant}, {"client_id", kClient}, {"client_secret_file", f}};
    }
};

// A throwaway RSA key and self-signed certificate, PEM (certificate, then key).
std::string make_cert_pem() {
    EVP_PKEY* key = EVP_RSA_gen(2048);
    EXPECT_NE(key, nullptr);
    X509* x = X509_new();
    ASN1_INTEGER_set(X509_get_serialNumber(x), 7);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, key);
    X509_NAME* n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>("cmk test app"),
                               -1, -1, 0);
    X509_set_issuer_name(x, n);
    X509_sign(x, key, EVP_sha256());
    BIO* b = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(b, x);
    PEM_write_bio_PrivateKey(b, key, nullptr, nullptr, 0, nullptr, nullptr);
    char* p = nullptr;
    long len = BIO_get_mem_data(b, &p);
    std::string pem(p, static_cast<size_t>(len));
    BIO_free(b);
    X509_free(x);
    EVP_PKEY_free(key);
    return pem;
}

std::string b64u_decode_str(const std::string& s) {
    auto v = base64url_decode(s);
    return std::string(v.begin(), v.end());
}

}  // namespace

// ------------------------------------------------------------------ key ids

TEST(AzureKeyId, VaultAndManagedHsm) {
    KeyId k = parse_key_id(std::string(kKid) + "/", "");
    EXPECT_EQ(k.url, kKid);
    EXPECT_EQ(k.vault_url, "https://myvault.vault.azure.net");
    EXPECT_EQ(k.name, "cmk");
    EXPECT_EQ(k.version, "0123456789abcdef0123456789abcdef");
    EXPECT_EQ(k.kind, VaultKind::KeyVault);
    EXPECT_EQ(k.resource, "https://vault.azure.net");
    EXPECT_FALSE(k.loopback);

    KeyId h = parse_key_id("https://myhsm.managedhsm.azure.net/keys/k1/abc", "");
    EXPECT_EQ(h.kind, VaultKind::ManagedHsm);
    EXPECT_EQ(h.resource, "https://managedhsm.azure.net");

    KeyId cn = parse_key_id("https://v-1.vault.azure.cn/keys/k/1", "");
    EXPECT_EQ(cn.authority_host, "https://login.chinacloudapi.cn");

    KeyId l = parse_key_id("https://127.0.0.1:8443/keys/k/v1", "");
    EXPECT_TRUE(l.loopback);
    EXPECT_EQ(l.vault_url, "https://127.0.0.1:8443");
    EXPECT_EQ(l.resource, "https://vault.azure.net");
    KeyId lh = parse_key_id("https://127.0.0.1:8443/keys/k/v1", "https://managedhsm.azure.net");
    EXPECT_EQ(lh.kind, VaultKind::ManagedHsm);
}

TEST(AzureKeyId, BadIdsNameTheField) {
    for (const char* bad :
         {"http://myvault.vault.azure.net/keys/k/v1", "https://myvault.vault.azure.net/keys/k",
          "https://myvault.vault.azure.net/secrets/k/v1", "https://myvault.vault.azure.net/keys/k/v1?x=1",
          "https://example.com/keys/k/v1", "https://myvault.vault.azure.net:99999/keys/k/v1",
          "https://myvault.vault.azure.net/keys/k_1/v1", "https://ab.vault.azure.net/keys/k/v1",
          "myvault.vault.azure.net/keys/k/v1"}) {
        try {
            parse_key_id(bad, "");
            ADD_FAILURE() << bad << " accepted";
        } catch (const KmsError& e) {
            EXPECT_EQ(e.kind, KmsErrorKind::Config) << bad;
            EXPECT_EQ(std::string(e.what()).rfind("key_id: ", 0), 0u) << e.what();
        }
    }
    try {
        parse_key_id("https://myvault.vault.azure.net/keys/k", "");
    } catch (const KmsError& e) {
        EXPECT_NE(std::string(e.what()).find("version"), std::string::npos) << e.what();
    }
    // Another cloud is possible, but only when its resource is named.
    EXPECT_NO_THROW(parse_key_id("https://kv.vault.example.org/keys/k/v1", "https://vault.example.org"));
}

TEST(AzureSettings, DefaultsAndErrors) {
    SecretCfg sc;
    Settings s = parse_settings(sc.cfg);
    EXPECT_EQ(s.algorithm, "RSA-OAEP-256");
    EXPECT_EQ(s.credential, Credential::ClientSecret);
    EXPECT_EQ(s.token_url(),
              std::string("https://login.microsoftonline.com/") + kTenant + "/oauth2/v2.0/token");
    EXPECT_EQ(s.scope(), "https://vault.azure.net/.default");

    KeyConfig hsm{"azure", "https://myhsm.managedhsm.azure.net/keys/k/v1", {}};
    Settings h = parse_settings(hsm);
    EXPECT_EQ(h.algorithm, "A256KW");
    EXPECT_EQ(h.credential, Credential::ManagedIdentity);
    EXPECT_EQ(h.scope(), "https://managedhsm.azure.net/.default");

    struct Case {
        std::map<std::string, std::string> opts;
        const char* field;
    } cases[] = {
        {{{"algorithm", "RSA1_5"}}, "algorithm: "},
        {{{"colour", "blue"}}, "colour: "},
        {{{"ca_file", "/nonexistent/ca.pem"}}, "ca_file: "},
        {{{"ca_file", "ca.pem"}}, "ca_file: "},
        {{{"tenant_id", kTenant}}, "client_id: "},
        {{{"credential", "client_secret"}, {"client_id", kClient}}, "tenant_id: "},
        {{{"client_id", "not-a-guid"}}, "client_id: "},
        {{{"credential", "password"}}, "credential: "},
        {{{"authority_host", "http://login.example"}}, "authority_host: "},
        {{{"timeout", "0"}}, "timeout: "},
        {{{"credential", "client_certificate"}, {"tenant_id", kTenant}, {"client_id", kClient}},
         "client_certificate_file: "},
        {{{"tenant_id", kTenant}, {"client_id", kClient}, {"client_certificate_file", "/nonexistent.pem"}},
         "client_certificate_file: "},
    };
    for (const auto& c : cases) {
        KeyConfig k{"azure", kKid, c.opts};
        std::string msg;
        EXPECT_EQ(config_kind(k, &msg), KmsErrorKind::Config) << c.field;
        EXPECT_EQ(msg.rfind(c.field, 0), 0u) << msg;
    }
}

TEST(AzureSettings, ClientSecretFromEnvironmentOrMissing) {
    KeyConfig k{"azure", kKid, {{"tenant_id", kTenant}, {"client_id", kClient}}};
    unsetenv("AZURE_CLIENT_SECRET");
    std::string msg;
    EXPECT_EQ(config_kind(k, &msg), KmsErrorKind::Config);
    EXPECT_EQ(msg.rfind("client_secret_file: ", 0), 0u) << msg;
    setenv("AZURE_CLIENT_SECRET", "from-env", 1);
    Fake f;
    f.add(200, token_json("tok"));
    f.add(200, "{\"key\":{\"kid\":\"x\"},\"attributes\":{\"enabled\":true}}");
    auto p = make_azure_provider(k, f.fn());
    EXPECT_EQ(p->status().health, KeyHealth::Ok);
    EXPECT_NE(f.seen[0].body.find("client_secret=from-env"), std::string::npos);
    unsetenv("AZURE_CLIENT_SECRET");
}

// ------------------------------------------------------------------ requests

TEST(AzureProvider, WrapUnwrapRequestsAndTokenCache) {
    SecretCfg sc;
    Fake f;
    SecureBytes kek = random_key(32);
    std::vector<uint8_t> blob = random_bytes(256);
    std::string blob64 = base64url_encode(blob.data(), blob.size());
    f.add(200, token_json("tok-1"));
    f.add(200, std::string("{\"kid\":\"") + kKid + "\",\"value\":\"" + blob64 + "\"}",
          {{"x-ms-request-id", "req-42"}});
    f.add(200, std::string("{\"kid\":\"") + kKid + "\",\"value\":\"" +
                   base64url_encode(kek.data(), kek.size()) + "\"}");
    auto p = make_azure_provider(sc.cfg, f.fn());
    EXPECT_EQ(p->name(), "azure");
    WrapResult w = p->wrap(kek);
    EXPECT_EQ(w.blob, blob);
    EXPECT_EQ(w.key_version, "0123456789abcdef0123456789abcdef");
    EXPECT_EQ(w.request_id, "req-42");
    SecureBytes back = p->unwrap(w.blob);
    ASSERT_EQ(back.size(), kek.size());
    EXPECT_TRUE(ct_equal(back.data(), kek.data(), kek.size()));

    ASSERT_EQ(f.seen.size(), 3u);  // one token for both calls
    const http::Request& t = f.seen[0];
    EXPECT_EQ(t.method, "POST");
    EXPECT_EQ(t.url, std::string("https://login.microsoftonline.com/") + kTenant + "/oauth2/v2.0/token");
    EXPECT_EQ(header(t, "Content-Type"), "application/x-www-form-urlencoded");
    EXPECT_NE(t.body.find("grant_type=client_credentials"), std::string::npos);
    EXPECT_NE(t.body.find(std::string("client_id=") + kClient), std::string::npos);
    EXPECT_NE(t.body.find("scope=https%3A%2F%2Fvault.azure.net%2F.default"), std::string::npos);
    EXPECT_NE(t.body.find("client_secret=s3cr%26t%3D%2B"), std::string::npos) << "secret url-encoded";

    const http::Request& wr = f.seen[1];
    EXPECT_EQ(wr.method, "POST");
    EXPECT_EQ(wr.url, std::string(kKid) + "/wrapkey?api-version=7.4");
    EXPECT_EQ(header(wr, "Content-Type"), "application/json");
    EXPECT_FALSE(header(wr, "x-ms-client-request-id").empty());
    rapidjson::Document d;
    d.Parse(wr.body.c_str());
    ASSERT_TRUE(d.IsObject());
    EXPECT_STREQ(d["alg"].GetString(), "RSA-OAEP-256");
    EXPECT_EQ(std::string(d["value"].GetString()), base64url_encode(kek.data(), kek.size()));

    const http::Request& ur = f.seen[2];
    EXPECT_EQ(ur.url, std::string(kKid) + "/unwrapkey?api-version=7.4");
    d.Parse(ur.body.c_str());
    EXPECT_EQ(std::string(d["value"].GetString()), blob64);
}

TEST(AzureProvider, UnauthorizedRetriesOnceWithAFreshToken) {
    SecretCfg sc;
    Fake f;
    f.add(200, token_json("old"));
    f.add(401, "{\"error\":{\"code\":\"Unauthorized\",\"message\":\"AKV10022: Invalid audience.\"}}");
    f.add(200, token_json("new"));
    f.add(200,
          "{\"key\":{\"kid\":\"x\",\"key_ops\":[\"wrapKey\",\"unwrapKey\"]},\"attributes\":{\"enabled\":true}"
          "}");
    auto p = make_azure_provider(sc.cfg, f.fn());
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Ok) << s.detail;
    ASSERT_EQ(f.seen.size(), 4u);
    EXPECT_EQ(f.seen[0].url.find("oauth2"), f.seen[2].url.find("oauth2"));
    EXPECT_EQ(f.seen[3].method, "GET");
    EXPECT_EQ(f.seen[3].url, std::string(kKid) + "?api-version=7.4");

    // 401 again after the fresh token: the vault's decision, revoked; it names the tenant.
    f.add(401, "{\"error\":{\"code\":\"Unauthorized\",\"message\":\"no\"}}",
          {{"www-authenticate",
            "Bearer authorization=\"https://login.microsoftonline.com/other-tenant\", "
            "resource=\"https://vault.azure.net\""}});
    f.add(200, token_json("newer"));
    f.add(401, "{\"error\":{\"code\":\"Unauthorized\",\"message\":\"no\"}}",
          {{"www-authenticate", "Bearer authorization=\"https://login.microsoftonline.com/other-tenant\""}});
    try {
        p->unwrap(random_bytes(256));
        ADD_FAILURE() << "unwrap passed";
    } catch (const KmsError& e) {
        EXPECT_EQ(e.kind, KmsErrorKind::Revoked);
        EXPECT_NE(std::string(e.what()).find("other-tenant"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find(kKid), std::string::npos) << e.what();
    }
}

TEST(AzureProvider, ManagedIdentityRequests) {
    KeyConfig k{"azure", kKid, {{"identity_endpoint", "http://127.0.0.1:9/metadata/identity/oauth2/token"}}};
    unsetenv("IDENTITY_ENDPOINT");
    Fake f;
    f.add(200, "{\"access_token\":\"mi-tok\",\"expires_on\":\"" + std::to_string(std::time(nullptr) + 3600) +
                   "\",\"resource\":\"https://vault.azure.net\",\"token_type\":\"Bearer\"}");
    f.add(200, "{\"key\":{},\"attributes\":{\"enabled\":true}}");
    auto p = make_azure_provider(k, f.fn());
    EXPECT_EQ(p->status().health, KeyHealth::Ok);
    ASSERT_EQ(f.seen.size(), 2u);
    EXPECT_EQ(f.seen[0].method, "GET");
    EXPECT_EQ(f.seen[0].url,
              "http://127.0.0.1:9/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
              "https%3A%2F%2Fvault.azure.net");
    EXPECT_EQ(header(f.seen[0], "Metadata"), "true");
    EXPECT_EQ(header(f.seen[1], "Authorization"), "Bearer mi-tok");
}

// ------------------------------------------------------------------ answers

TEST(AzureAnswers, KeyStatusFromBundle) {
    KeyId k = parse_key_id(kKid, "");
    std::time_t now = 1700000000;
    auto st = [&](const std::string& attrs, const std::string& ops = "") {
        return key_status_from("{\"key\":{\"kid\":\"x\"" + ops + "},\"attributes\":" + attrs + "}", now, k);
    };
    EXPECT_EQ(st("{\"enabled\":true}").health, KeyHealth::Ok);
    EXPECT_EQ(st("{\"enabled\":true,\"exp\":1800000000,\"nbf\":1600000000}").health, KeyHealth::Ok);
    KeyStatus d = st("{\"enabled\":false}");
    EXPECT_EQ(d.health, KeyHealth::Revoked);
    EXPECT_EQ(d.state, "disabled");
    EXPECT_EQ(st("{\"enabled\":true,\"exp\":1690000000}").state, "expired");
    EXPECT_EQ(st("{\"enabled\":true,\"exp\":1690000000}").health, KeyHealth::Revoked);
    EXPECT_EQ(st("{\"enabled\":true,\"nbf\":1800000000}").health, KeyHealth::Revoked);
    EXPECT_EQ(st("{\"enabled\":true}", ",\"key_ops\":[\"encrypt\",\"wrapKey\"]").health, KeyHealth::Revoked);
    EXPECT_EQ(key_status_from("<html>", now, k).health, KeyHealth::Unavailable);
    EXPECT_EQ(key_status_from("{\"key\":{}}", now, k).health, KeyHealth::Unavailable);
}

TEST(AzureAnswers, VaultErrorMapping) {
    KeyId k = parse_key_id(kKid, "");
    auto kind = [&](long status, const std::string& body, const std::string& op = "unwrapkey") {
        http::Response r;
        r.status = status;
        r.body = body;
        return vault_error(r, op, k).kind;
    };
    const std::string disabled =
        "{\"error\":{\"code\":\"Forbidden\",\"message\":\"Operation unwrapKey is not allowed on a disabled "
        "key.\",\"innererror\":{\"code\":\"KeyDisabled\"}}}";
    const std::string denied =
        "{\"error\":{\"code\":\"Forbidden\",\"message\":\"The user, group or application does not have keys "
        "unwrapKey permission\",\"innererror\":{\"code\":\"ForbiddenByPolicy\"}}}";
    EXPECT_EQ(kind(403, disabled), KmsErrorKind::Revoked);
    EXPECT_EQ(kind(403, denied), KmsErrorKind::Revoked);
    EXPECT_EQ(
        kind(404,
             "{\"error\":{\"code\":\"KeyNotFound\",\"message\":\"A key with (name/id) cmk was not found\"}}"),
        KmsErrorKind::Revoked);
    EXPECT_EQ(kind(401, "{\"error\":{\"code\":\"Unauthorized\"}}"), KmsErrorKind::Revoked);
    EXPECT_EQ(
        kind(400, "{\"error\":{\"code\":\"BadParameter\",\"message\":\"The parameter is incorrect.\"}}"),
        KmsErrorKind::Revoked);
    EXPECT_EQ(kind(400, "{\"error\":{\"code\":\"BadParameter\"}}", "wrapkey"), KmsErrorKind::Config);
    EXPECT_EQ(kind(400, "{\"error\":{\"code\":\"BadParameter\"}}", "get"), KmsErrorKind::Unavailable);
    EXPECT_EQ(kind(429, "{\"error\":{\"code\":\"Throttled\"}}"), KmsErrorKind::Unavailable);
    EXPECT_EQ(kind(500, "oops"), KmsErrorKind::Unavailable);
    EXPECT_EQ(kind(503, ""), KmsErrorKind::Unavailable);
    EXPECT_EQ(kind(302, ""), KmsErrorKind::Unavailable);

    http::Response r;
    r.status = 403;
    r.body = denied;
    std::string m = vault_error(r, "unwrapkey", k).what();
    EXPECT_NE(m.find("ForbiddenByPolicy"), std::string::npos) << m;
    EXPECT_NE(m.find("Crypto Service Encryption User"), std::string::npos) << m;
    EXPECT_EQ(m.find('\n'), std::string::npos);
}

TEST(AzureAnswers, StatusThroughTheProvider) {
    SecretCfg sc;
    struct Case {
        long status;
        std::string body;
        KeyHealth health;
        std::string state;
    } cases[] = {
        {200, "{\"key\":{},\"attributes\":{\"enabled\":false}}", KeyHealth::Revoked, "disabled"},
        {404, "{\"error\":{\"code\":\"KeyNotFound\"}}", KeyHealth::Revoked, "not found"},
        {403, "{\"error\":{\"code\":\"Forbidden\",\"innererror\":{\"code\":\"AccessDenied\"}}}",
         KeyHealth::Revoked, "access denied"},
        {500, "{\"error\":{\"code\":\"InternalServerError\"}}", KeyHealth::Unavailable, "unavailable"},
        {429, "", KeyHealth::Unavailable, "unavailable"},
        {-1, "", KeyHealth::Unavailable, "unavailable"},  // transport timeout
    };
    for (const auto& c : cases) {
        Fake f;
        f.add(200, token_json("t"));
        f.add(c.status, c.body);
        auto p = make_azure_provider(sc.cfg, f.fn());
        KeyStatus s = p->status();
        EXPECT_EQ(s.health, c.health) << c.status << " " << s.detail;
        EXPECT_EQ(s.state, c.state) << c.status;
        EXPECT_NE(s.detail.find("t\""), 0u);
    }
    // Entra ID refuses the credentials: revoked; an Entra outage: unavailable.
    Fake f;
    f.add(401,
          "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS7000215: Invalid client secret "
          "provided.\\r\\n"
          "Trace ID: x\",\"error_codes\":[7000215]}");
    KeyStatus s = make_azure_provider(sc.cfg, f.fn())->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("AADSTS7000215"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("Trace ID"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("s3cr"), std::string::npos) << "no secret in messages";
    Fake g;
    g.add(503, "");
    EXPECT_EQ(make_azure_provider(sc.cfg, g.fn())->status().health, KeyHealth::Unavailable);
}

TEST(AzureAnswers, TokenResponses) {
    std::time_t now = 1000;
    http::Response r;
    r.status = 200;
    r.body = token_json("abc", 60);
    Token t = parse_token_response(r, now, "entra", false);
    EXPECT_EQ(t.value.str(), "abc");
    EXPECT_EQ(t.expires_at, 1060);
    r.body = "{\"access_token\":\"x\",\"expires_in\":\"3599\",\"expires_on\":\"5000\"}";
    EXPECT_EQ(parse_token_response(r, now, "imds", true).expires_at, 1000 + 3599);
    // lifetimes from the peer are bounded before arithmetic (UBSan: no signed overflow)
    r.body = "{\"access_token\":\"x\",\"expires_in\":9223372036854775807}";
    EXPECT_EQ(parse_token_response(r, now, "entra", false).expires_at, 1000 + kit::kMaxTokenLifeS);
    r.body = "{\"access_token\":\"x\",\"expires_in\":1e300}";  // not a usable number: brief
    EXPECT_EQ(parse_token_response(r, now, "entra", false).expires_at, 1000 + 300);
    r.body = "{\"access_token\":\"x\",\"expires_on\":\"999999999999999999\"}";
    EXPECT_EQ(parse_token_response(r, now, "imds", true).expires_at, 1000 + kit::kMaxTokenLifeS);
    r.body = "{\"token_type\":\"Bearer\"}";
    EXPECT_THROW(parse_token_response(r, now, "x", false), KmsError);
    r.status = 404;  // IMDS while the identity is being set up: transient
    r.body = "";
    try {
        parse_token_response(r, now, "imds", true);
    } catch (const KmsError& e) {
        EXPECT_EQ(e.kind, KmsErrorKind::Unavailable);
    }
    r.status = 400;
    r.body = "{\"error\":\"invalid_request\",\"error_description\":\"Identity not found\"}";
    try {
        parse_token_response(r, now, "imds", true);
    } catch (const KmsError& e) {
        EXPECT_EQ(e.kind, KmsErrorKind::Revoked);
        EXPECT_NE(std::string(e.what()).find("Identity not found"), std::string::npos);
    }
}

// ------------------------------------------------------------------ client assertion

TEST(AzureAssertion, VerifiesWithTheCertificatesPublicKey) {
    std::string pem = make_cert_pem();
    std::string aud = std::string("https://login.microsoftonline.com/") + kTenant + "/oauth2/v2.0/token";
    std::string jwt = client_assertion(pem, kClient, aud, 1700000000, "jti-1");
    size_t a = jwt.find('.'), b = jwt.rfind('.');
    ASSERT_NE(a, b);
    std::string header = b64u_decode_str(jwt.substr(0, a));
    std::string claims = b64u_decode_str(jwt.substr(a + 1, b - a - 1));
    std::vector<uint8_t> sig = base64url_decode(jwt.substr(b + 1));

    rapidjson::Document h, c;
    h.Parse(header.c_str());
    c.Parse(claims.c_str());
    ASSERT_TRUE(h.IsObject() && c.IsObject());
    EXPECT_STREQ(h["alg"].GetString(), "RS256");
    EXPECT_STREQ(h["typ"].GetString(), "JWT");
    EXPECT_STREQ(c["aud"].GetString(), aud.c_str());
    EXPECT_STREQ(c["iss"].GetString(), kClient);
    EXPECT_STREQ(c["sub"].GetString(), kClient);
    EXPECT_STREQ(c["jti"].GetString(), "jti-1");
    EXPECT_EQ(c["nbf"].GetInt64(), 1700000000);
    EXPECT_EQ(c["exp"].GetInt64(), 1700000600);

    BIO* bio = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    X509* cert = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    ASSERT_NE(cert, nullptr);
    // x5t: SHA-1 of the DER certificate, base64url.
    unsigned char* der = nullptr;
    int n = i2d_X509(cert, &der);
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1(der, static_cast<size_t>(n), md);
    OPENSSL_free(der);
    EXPECT_EQ(std::string(h["x5t"].GetString()), base64url_encode(md, sizeof md));
    EXPECT_EQ(certificate_thumbprint(pem), base64url_encode(md, sizeof md));

    EVP_PKEY* pub = X509_get_pubkey(cert);
    std::string input = jwt.substr(0, b);
    auto verify = [&](const std::string& in) {
        EVP_MD_CTX* ctx = EVP_MD_CTX_new();
        EVP_DigestVerifyInit(ctx, nullptr, EVP_sha256(), nullptr, pub);
        int ok = EVP_DigestVerify(ctx, sig.data(), sig.size(),
                                  reinterpret_cast<const unsigned char*>(in.data()), in.size());
        EVP_MD_CTX_free(ctx);
        return ok;
    };
    EXPECT_EQ(verify(input), 1);
    EXPECT_NE(verify(input + "x"), 1);
    EVP_PKEY_free(pub);
    X509_free(cert);

    // A PEM without its key is refused, naming the field.
    std::string cert_only = pem.substr(0, pem.find("-----BEGIN PRIVATE KEY"));
    try {
        client_assertion(cert_only, kClient, aud, 1, "j");
        ADD_FAILURE() << "accepted a PEM without a key";
    } catch (const KmsError& e) {
        EXPECT_EQ(std::string(e.what()).rfind("client_certificate_file: ", 0), 0u) << e.what();
    }
}

TEST(AzureAssertion, CertificateCredentialSendsTheAssertion) {
    cmk_test::TempDir dir;
    std::string f = dir.path() + "/app.pem";
    {
        std::ofstream o(f);
        o << make_cert_pem();
    }
    chmod(f.c_str(), 0600);
    KeyConfig k{
        "azure", kKid, {{"tenant_id", kTenant}, {"client_id", kClient}, {"client_certificate_file", f}}};
    Fake fk;
    fk.add(200, token_json("t"));
    fk.add(200, "{\"key\":{},\"attributes\":{\"enabled\":true}}");
    auto p = make_azure_provider(k, fk.fn());
    EXPECT_EQ(p->status().health, KeyHealth::Ok);
    const std::string& body = fk.seen[0].body;
    EXPECT_NE(
        body.find("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"),
        std::string::npos);
    EXPECT_NE(body.find("&client_assertion=ey"), std::string::npos);
    EXPECT_EQ(body.find("client_secret"), std::string::npos);
    chmod(f.c_str(), 0644);  // a private key readable by others is refused
    std::string msg;
    EXPECT_EQ(config_kind(k, &msg), KmsErrorKind::Config);
    EXPECT_EQ(msg.rfind("client_certificate_file: ", 0), 0u) << msg;
}

TEST(AzureProvider, AppServiceIdentityAndManagedHsmScope) {
    setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi/token", 1);
    setenv("IDENTITY_HEADER", "hdr-secret", 1);
    KeyConfig k{"azure", "https://myhsm.managedhsm.azure.net/keys/k/v1", {{"client_id", kClient}}};
    Fake f;
    f.add(200, "{\"access_token\":\"as-tok\",\"expires_on\":\"" + std::to_string(std::time(nullptr) + 3600) +
                   "\"}");
    f.add(200, "{\"kid\":\"https://myhsm.managedhsm.azure.net/keys/k/v1\",\"value\":\"AAAA\"}");
    auto p = make_azure_provider(k, f.fn());
    p->wrap(random_key(32));
    unsetenv("IDENTITY_ENDPOINT");
    unsetenv("IDENTITY_HEADER");
    ASSERT_EQ(f.seen.size(), 2u);
    EXPECT_EQ(
        f.seen[0].url,
        "http://127.0.0.1:9/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagedhsm.azure.net"
        "&client_id=" +
            std::string(kClient));
    EXPECT_EQ(header(f.seen[0], "X-IDENTITY-HEADER"), "hdr-secret");
    EXPECT_EQ(header(f.seen[0], "Metadata"), "");
    rapidjson::Document d;
    d.Parse(f.seen[1].body.c_str());
    EXPECT_STREQ(d["alg"].GetString(), "A256KW");  // the Managed HSM default
}

// ------------------------------------------------------------------ workload identity federation (issue 19)

// The Kubernetes way: AZURE_FEDERATED_TOKEN_FILE / AZURE_CLIENT_ID / AZURE_TENANT_ID from
// the webhook; the token file's content is the client assertion (re-read at each token
// request: Kubernetes rotates it); the option tenant_id makes a multi-tenant app ask
// the customer's tenant instead of its home tenant.
TEST(AzureWorkloadIdentity, FederatedTokenIsTheAssertionInTheCustomersTenant) {
    cmk_test::TempDir dir;
    const std::string file = dir.path() + "/token";
    cmk_test::spit(file, "eyJhbGciOiJSUzI1NiJ9.first.sig\n");
    const char* home = "11111111-2222-3333-4444-555555555555";
    ::setenv("AZURE_FEDERATED_TOKEN_FILE", file.c_str(), 1);
    ::setenv("AZURE_CLIENT_ID", kClient, 1);
    ::setenv("AZURE_TENANT_ID", home, 1);
    KeyConfig c{"azure", kKid, {{"tenant_id", kTenant}}};  // the customer's tenant
    Fake f;
    f.add(200, token_json("tok-1", 1));  // short-lived: the next call fetches again
    f.add(200, "{\"key\":{\"kid\":\"" + std::string(kKid) + "\",\"kty\":\"RSA\"},\"attributes\":{\"enabled\":true}}");
    f.add(200, token_json("tok-2"));
    f.add(200, "{\"key\":{\"kid\":\"" + std::string(kKid) + "\",\"kty\":\"RSA\"},\"attributes\":{\"enabled\":true}}");
    auto p = make_azure_provider(c, f.fn());
    EXPECT_EQ(p->identity(), std::string("app ") + kClient + " in tenant " + kTenant +
                                 " (workload identity federation)");
    p->status();
    cmk_test::spit(file, "eyJhbGciOiJSUzI1NiJ9.second.sig\n");
    p->status();
    ASSERT_EQ(f.seen.size(), 4u);
    const http::Request& t = f.seen[0];
    EXPECT_EQ(t.url, std::string("https://login.microsoftonline.com/") + kTenant + "/oauth2/v2.0/token");
    EXPECT_NE(t.body.find("grant_type=client_credentials"), std::string::npos) << t.body;
    EXPECT_NE(t.body.find(std::string("client_id=") + kClient), std::string::npos) << t.body;
    EXPECT_NE(t.body.find("client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer"),
              std::string::npos);
    EXPECT_NE(t.body.find("client_assertion=eyJhbGciOiJSUzI1NiJ9.first.sig"), std::string::npos) << t.body;
    EXPECT_EQ(t.body.find("client_secret"), std::string::npos);
    EXPECT_NE(f.seen[2].body.find("client_assertion=eyJhbGciOiJSUzI1NiJ9.second.sig"), std::string::npos)
        << "the token file is read again";

    // The federated credential removed (AADSTS70021): a revocation.
    Fake g;
    g.add(400, "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS70021: No matching federated identity "
               "record found for presented assertion.\"}");
    auto q = make_azure_provider(c, g.fn());
    KeyStatus s = q->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked) << s.detail;
    EXPECT_NE(s.detail.find("AADSTS70021"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("eyJ"), std::string::npos) << "no assertion in the message";

    // Without the option: the home tenant from the environment.
    KeyConfig homecfg{"azure", kKid, {}};
    Fake h;
    h.add(200, token_json("tok"));
    h.add(200, "{\"key\":{\"kid\":\"" + std::string(kKid) + "\",\"kty\":\"RSA\"},\"attributes\":{\"enabled\":true}}");
    make_azure_provider(homecfg, h.fn())->status();
    ASSERT_FALSE(h.seen.empty());
    EXPECT_EQ(h.seen[0].url, std::string("https://login.microsoftonline.com/") + home + "/oauth2/v2.0/token");

    // Configuration errors name the field.
    std::string m;
    ::setenv("AZURE_FEDERATED_TOKEN_FILE", (dir.path() + "/missing").c_str(), 1);
    EXPECT_EQ(config_kind(homecfg, &m), KmsErrorKind::Config);
    EXPECT_EQ(m.rfind("federated_token_file: ", 0), 0u) << m;
    ::unsetenv("AZURE_FEDERATED_TOKEN_FILE");
    KeyConfig rel{"azure", kKid, {{"federated_token_file", "token"}, {"tenant_id", kTenant}}};
    EXPECT_EQ(config_kind(rel, &m), KmsErrorKind::Config);
    EXPECT_EQ(m.rfind("federated_token_file: ", 0), 0u) << m;
    KeyConfig mixed{"azure", kKid, {{"federated_token_file", file}, {"credential", "client_secret"}}};
    EXPECT_EQ(config_kind(mixed, &m), KmsErrorKind::Config);
    EXPECT_EQ(m.rfind("federated_token_file: ", 0), 0u) << m;
    cmk_test::spit(file, "\n");
    KeyConfig empty{"azure", kKid, {{"federated_token_file", file}, {"tenant_id", kTenant}}};
    EXPECT_EQ(config_kind(empty, &m), KmsErrorKind::Config);
    EXPECT_NE(m.find("is empty"), std::string::npos) << m;
    ::unsetenv("AZURE_CLIENT_ID");
    cmk_test::spit(file, "x.y.z\n");
    KeyConfig noclient{"azure", kKid, {{"federated_token_file", file}, {"tenant_id", kTenant}}};
    EXPECT_EQ(config_kind(noclient, &m), KmsErrorKind::Config);
    EXPECT_EQ(m.rfind("client_id: ", 0), 0u) << m;
    ::unsetenv("AZURE_TENANT_ID");
}
