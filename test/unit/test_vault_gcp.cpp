// Unit tests of the Vault Transit and Google Cloud KMS providers: key id parsing,
// configuration errors naming the field, the answer -> ok/unavailable/revoked mapping
// from canned responses, and (when /usr/bin/python3 with python3-cryptography and
// python3-jwt is there) wrap/unwrap/status against the loopback test servers in
// test/kms, through each state those servers can be put in.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <thread>

#include "core/kms/http.hpp"
#include "core/kms/kit.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "core/kms/gcp.hpp"
#include "core/kms/google_identity.hpp"
#include "core/kms/jwt.hpp"
#include "core/kms/vault.hpp"
#include "test_helpers.hpp"

using namespace cmk;

namespace {

KmsErrorKind kind_of(const std::function<void()>& f, std::string* msg = nullptr) {
    try {
        f();
    } catch (const KmsError& e) {
        if (msg) *msg = e.what();
        return e.kind;
    }
    ADD_FAILURE() << "no KmsError thrown";
    return KmsErrorKind::Unavailable;
}

std::string config_msg(const KeyConfig& cfg) {
    std::string m;
    EXPECT_EQ(kind_of([&] { make_provider(cfg); }, &m), KmsErrorKind::Config);
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    return m;
}

void write_private(const std::string& path, const std::string& text, mode_t mode = 0600) {
    cmk_test::spit(path, text);
    ::chmod(path.c_str(), mode);
}

// A loopback test server (test/kms/*.py) run for one test; killed at scope exit.
class LoopbackServer {
public:
    LoopbackServer(const std::string& script, std::vector<std::string> args, const std::string& dir) {
        std::string py = "/usr/bin/python3";
        std::string path = cmk_test::data_dir() + "/../kms/" + script;
        port_file_ = dir + "/" + script + ".port";
        if (::access(py.c_str(), X_OK) != 0 || ::access(path.c_str(), R_OK) != 0 ||
            std::system("/usr/bin/python3 -c 'import cryptography, jwt' 2>/dev/null") != 0) {
            skip_ = "no /usr/bin/python3 with python3-cryptography and python3-jwt, or no " + path;
            return;
        }
        args.insert(args.begin(), {py, path, "--port-file", port_file_, "--lifetime", "120", "--stall", "5"});
        pid_ = ::fork();
        if (pid_ == 0) {
            std::vector<char*> argv;
            for (auto& a : args) argv.push_back(&a[0]);
            argv.push_back(nullptr);
            ::execv(py.c_str(), argv.data());
            ::_exit(127);
        }
        for (int i = 0; i < 200; i++) {
            std::ifstream f(port_file_);
            if (f >> port_) break;
            std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        if (port_ == 0) skip_ = "the loopback server " + script + " did not start";
    }
    ~LoopbackServer() {
        if (pid_ > 0) {
            ::kill(pid_, SIGTERM);
            ::waitpid(pid_, nullptr, 0);
        }
    }
    const std::string& skip() const { return skip_; }
    std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }
    std::string control(const std::string& json) const {
        http::Request r;
        r.url = url() + "/__control";
        r.body = json;
        http::Response resp = http::perform(r);
        EXPECT_EQ(resp.status, 200) << json << " -> " << resp.body;
        return resp.body;
    }

private:
    pid_t pid_ = -1;
    int port_ = 0;
    std::string port_file_, skip_;
};

}  // namespace

// ------------------------------------------------------------------ Vault, canned

TEST(Vault, KeyNamesMountsAndCiphertextVersions) {
    EXPECT_TRUE(vault::valid_key_name("cmk-prod.1_a"));
    EXPECT_FALSE(vault::valid_key_name(""));
    EXPECT_FALSE(vault::valid_key_name("a/b"));
    EXPECT_FALSE(vault::valid_key_name(".."));
    EXPECT_TRUE(vault::valid_mount("transit"));
    EXPECT_TRUE(vault::valid_mount("team-a/transit"));
    EXPECT_FALSE(vault::valid_mount("/transit"));
    EXPECT_FALSE(vault::valid_mount("a/../b"));
    EXPECT_FALSE(vault::valid_mount("a//b"));
    EXPECT_EQ(vault::ciphertext_version("vault:v1:abcd"), 1u);
    EXPECT_EQ(vault::ciphertext_version("vault:v42:x"), 42u);
    EXPECT_EQ(vault::ciphertext_version("vault:v0:x"), 0u);
    EXPECT_EQ(vault::ciphertext_version("vault:v:x"), 0u);
    EXPECT_EQ(vault::ciphertext_version("vault:v1"), 0u);
    EXPECT_EQ(vault::ciphertext_version("vault:v99999999999:x"), 0u);
    EXPECT_EQ(vault::ciphertext_version("gcp:v1:x"), 0u);
}

TEST(Vault, AnswerMapping) {
    using vault::Op;
    bool cfg = true;
    EXPECT_EQ(vault::classify(Op::Encrypt, 200, &cfg), KeyHealth::Ok);
    EXPECT_FALSE(cfg);
    EXPECT_EQ(vault::classify(Op::ReadKey, 404), KeyHealth::Revoked);
    EXPECT_EQ(vault::classify(Op::Decrypt, 403), KeyHealth::Revoked);
    EXPECT_EQ(vault::classify(Op::Decrypt, 400), KeyHealth::Revoked);      // wrong key, too old
    EXPECT_EQ(vault::classify(Op::Login, 400), KeyHealth::Revoked);        // invalid role or secret id
    EXPECT_EQ(vault::classify(Op::ReadKey, 503), KeyHealth::Unavailable);  // sealed
    EXPECT_EQ(vault::classify(Op::ReadKey, 429), KeyHealth::Unavailable);
    EXPECT_EQ(vault::classify(Op::ReadKey, 500), KeyHealth::Unavailable);
    EXPECT_EQ(vault::classify(Op::ReadKey, 473), KeyHealth::Unavailable);  // performance standby
    EXPECT_EQ(vault::classify(Op::Encrypt, 400, &cfg), KeyHealth::Unavailable);
    EXPECT_TRUE(cfg);  // a 400 on a request we built is our configuration's fault
    EXPECT_EQ(vault::error_message("{\"errors\":[\"1 error occurred:\\n\\t* permission denied\\n\\n\"]}"),
              "permission denied");
    EXPECT_EQ(vault::error_message("{\"errors\":[\"Vault is sealed\"]}"), "Vault is sealed");
    EXPECT_EQ(vault::error_message("{\"errors\":[]}"), "");
    EXPECT_EQ(vault::error_message("<html>"), "");
    EXPECT_LE(vault::error_message("{\"errors\":[\"" + std::string(500, 'x') + "\"]}").size(), 203u);
}

TEST(Vault, ConfigErrorsNameTheField) {
    cmk_test::TempDir tmp;
    ::unsetenv("VAULT_TOKEN");
    KeyConfig c{"vault", "k1", {}};
    EXPECT_EQ(config_msg(c).rfind("addr: ", 0), 0u);
    c.options["addr"] = "vault.example.com:8200";
    EXPECT_EQ(config_msg(c).rfind("addr: ", 0), 0u);
    c.options["addr"] = "http://vault.example.com:8200";  // a token in clear over a network
    EXPECT_EQ(config_msg(c).rfind("addr: ", 0), 0u);
    c.options["addr"] = "http://localhost.example.com:8200";
    EXPECT_EQ(config_msg(c).rfind("addr: ", 0), 0u);
    c.options["addr"] = "https://vault.example.com:8200";
    EXPECT_EQ(config_msg(c).rfind("token_file: ", 0), 0u);  // no token anywhere
    c.options["token_file"] = tmp.sub("missing");
    EXPECT_EQ(config_msg(c).rfind("token_file: ", 0), 0u);
    write_private(tmp.sub("tok"), "s.abc\n", 0644);
    c.options["token_file"] = tmp.sub("tok");
    EXPECT_NE(config_msg(c).find("chmod 600"), std::string::npos);
    ::chmod(tmp.sub("tok").c_str(), 0600);
    EXPECT_NO_THROW(make_provider(c));
    c.options["ca_file"] = tmp.sub("nope.pem");
    EXPECT_EQ(config_msg(c).rfind("ca_file: ", 0), 0u);
    c.options.erase("ca_file");
    c.options["mount"] = "/bad/";
    EXPECT_EQ(config_msg(c).rfind("mount: ", 0), 0u);
    c.options.erase("mount");
    c.options["colour"] = "blue";
    EXPECT_EQ(config_msg(c).rfind("colour: unknown option", 0), 0u);
    c.options.erase("colour");
    c.options["role_id_file"] = tmp.sub("tok");
    std::string m = config_msg(c);
    EXPECT_EQ(m.rfind("secret_id_file: ", 0), 0u) << m;
    c.options["secret_id_file"] = tmp.sub("tok");
    EXPECT_EQ(config_msg(c).rfind("token_file: ", 0), 0u);  // both kinds given
    c.options.erase("token_file");
    EXPECT_NO_THROW(make_provider(c));
    c.key_id = "a/b";
    EXPECT_EQ(config_msg(c).rfind("key_id: ", 0), 0u);
    // The environment is a token source too.
    KeyConfig e{"vault", "k1", {{"addr", "http://127.0.0.1:1"}}};
    ::setenv("VAULT_TOKEN", "s.env", 1);
    EXPECT_NO_THROW(make_provider(e));
    ::unsetenv("VAULT_TOKEN");
}

// ------------------------------------------------------------------ GCP, canned

TEST(Gcp, CryptoKeyNames) {
    EXPECT_TRUE(
        gcp::valid_crypto_key_name("projects/p-1/locations/europe-west1/keyRings/r_1/cryptoKeys/k-1"));
    EXPECT_TRUE(
        gcp::valid_crypto_key_name("projects/example.com:p/locations/global/keyRings/r/cryptoKeys/k"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("projects/p/locations/global/keyRings/r/cryptoKeys/k/"));
    EXPECT_FALSE(gcp::valid_crypto_key_name(
        "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("projects/p/locations/global/keyRings/r"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("projects//locations/global/keyRings/r/cryptoKeys/k"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("project/p/locations/global/keyRings/r/cryptoKeys/k"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("projects/p/locations/global/keyRings/r/cryptoKeys/k?x=1"));
    EXPECT_FALSE(gcp::valid_crypto_key_name("projects/p/locations/glo.bal/keyRings/r/cryptoKeys/k"));
    EXPECT_FALSE(gcp::valid_crypto_key_name(""));
}

TEST(Gcp, AnswerMapping) {
    using gcp::Op;
    auto err = [](const char* body) { return gcp::parse_error(body); };
    gcp::ApiError e =
        err("{\"error\":{\"code\":403,\"message\":\"Permission denied\\non x\",\"status\":"
            "\"PERMISSION_DENIED\"}}");
    EXPECT_EQ(e.status, "PERMISSION_DENIED");
    EXPECT_EQ(e.message, "Permission denied on x");
    EXPECT_EQ(gcp::classify(Op::Decrypt, 403, e), KeyHealth::Revoked);
    EXPECT_EQ(gcp::classify(Op::GetKey, 404, err("{\"error\":{\"code\":404,\"status\":\"NOT_FOUND\"}}")),
              KeyHealth::Revoked);
    gcp::ApiError fp =
        err("{\"error\":{\"code\":400,\"message\":\"projects/p/.../cryptoKeyVersions/1 is not "
            "enabled, current state is: DISABLED.\",\"status\":\"FAILED_PRECONDITION\"}}");
    EXPECT_EQ(gcp::classify(Op::Encrypt, 400, fp), KeyHealth::Revoked);
    EXPECT_EQ(gcp::classify(Op::Decrypt, 400, fp), KeyHealth::Revoked);
    gcp::ApiError inv =
        err("{\"error\":{\"code\":400,\"message\":\"Decryption failed: the ciphertext is "
            "invalid.\",\"status\":\"INVALID_ARGUMENT\"}}");
    EXPECT_EQ(gcp::classify(Op::Decrypt, 400, inv), KeyHealth::Revoked);
    bool cfg = false;
    EXPECT_EQ(gcp::classify(Op::Encrypt, 400, inv, &cfg), KeyHealth::Unavailable);
    EXPECT_TRUE(cfg);
    EXPECT_EQ(gcp::classify(Op::GetKey, 429, err("{\"error\":{\"status\":\"RESOURCE_EXHAUSTED\"}}")),
              KeyHealth::Unavailable);
    EXPECT_EQ(gcp::classify(Op::GetKey, 503, {}), KeyHealth::Unavailable);
    EXPECT_EQ(gcp::classify(Op::GetKey, 500, {}), KeyHealth::Unavailable);
    EXPECT_EQ(gcp::classify(Op::GetKey, 401, {}), KeyHealth::Revoked);
    // OAuth token endpoint answers.
    gcp::ApiError grant =
        err("{\"error\":\"invalid_grant\",\"error_description\":\"Invalid JWT Signature.\"}");
    EXPECT_EQ(grant.status, "invalid_grant");
    EXPECT_EQ(gcp::classify(Op::Token, 400, grant), KeyHealth::Revoked);
    gcp::ApiError skew =
        err("{\"error\":\"invalid_grant\",\"error_description\":\"Invalid JWT: Token must be a "
            "short-lived token (60 minutes) and in a reasonable timeframe.\"}");
    EXPECT_EQ(gcp::classify(Op::Token, 400, skew), KeyHealth::Unavailable);
    EXPECT_EQ(gcp::classify(Op::Token, 503, {}), KeyHealth::Unavailable);
    // Version states.
    EXPECT_EQ(gcp::version_state_health("ENABLED"), KeyHealth::Ok);
    for (const char* s : {"DISABLED", "DESTROY_SCHEDULED", "DESTROYED"})
        EXPECT_EQ(gcp::version_state_health(s), KeyHealth::Revoked) << s;
    EXPECT_EQ(gcp::version_state_health("PENDING_GENERATION"), KeyHealth::Unavailable);
    EXPECT_EQ(gcp::parse_error("not json").status, "");
}

TEST(Gcp, ConfigErrorsNameTheField) {
    cmk_test::TempDir tmp;
    ::unsetenv("GOOGLE_APPLICATION_CREDENTIALS");
    const std::string key = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
    KeyConfig c{"gcp", "projects/p/keyRings/r", {}};
    std::string m = config_msg(c);
    EXPECT_EQ(m.rfind("key_id: ", 0), 0u) << m;
    EXPECT_NE(m.find("projects/PROJECT/locations/LOCATION"), std::string::npos);
    c.key_id = key;
    c.options["credentials_file"] = tmp.sub("missing.json");
    EXPECT_EQ(config_msg(c).rfind("credentials_file: ", 0), 0u);
    write_private(tmp.sub("user.json"), "{\"type\":\"authorized_user\",\"client_id\":\"x\"}");
    c.options["credentials_file"] = tmp.sub("user.json");
    m = config_msg(c);
    EXPECT_NE(m.find("only service_account"), std::string::npos) << m;
    write_private(tmp.sub("nokey.json"), "{\"type\":\"service_account\",\"client_email\":\"a@b\"}");
    c.options["credentials_file"] = tmp.sub("nokey.json");
    EXPECT_NE(config_msg(c).find("no private_key"), std::string::npos);
    std::string pem = cmk_test::slurp(cmk_test::data_dir() + "/jwt_rs256_test_key.pem");
    std::string esc;
    for (char ch : pem) esc += ch == '\n' ? std::string("\\n") : std::string(1, ch);
    std::string sa =
        "{\"type\":\"service_account\",\"client_email\":\"a@p.iam.gserviceaccount.com\","
        "\"private_key_id\":\"k1\",\"private_key\":\"" +
        esc + "\"";
    write_private(tmp.sub("sa.json"), sa + "}", 0644);
    c.options["credentials_file"] = tmp.sub("sa.json");
    EXPECT_NE(config_msg(c).find("chmod 600"), std::string::npos);
    ::chmod(tmp.sub("sa.json").c_str(), 0600);
    EXPECT_NO_THROW(make_provider(c));
    write_private(tmp.sub("sa_http.json"), sa + ",\"token_uri\":\"http://oauth.example.com/token\"}");
    c.options["credentials_file"] = tmp.sub("sa_http.json");
    EXPECT_NE(config_msg(c).find("token_uri"), std::string::npos);
    write_private(tmp.sub("sa_bad.json"),
                  "{\"type\":\"service_account\",\"client_email\":\"a@b\","
                  "\"private_key\":\"-----BEGIN PRIVATE KEY-----\\nAAAA\\n-----END "
                  "PRIVATE KEY-----\\n\"}");
    c.options["credentials_file"] = tmp.sub("sa_bad.json");
    m = config_msg(c);
    EXPECT_EQ(m.rfind("credentials_file private_key: ", 0), 0u) << m;
    EXPECT_EQ(m.find("AAAA"), std::string::npos) << m;
    c.options["credentials_file"] = tmp.sub("sa.json");
    c.options["endpoint"] = "http://cloudkms.example.com";
    EXPECT_EQ(config_msg(c).rfind("endpoint: ", 0), 0u);
    c.options["endpoint"] = "http://127.0.0.1:9";
    EXPECT_NO_THROW(make_provider(c));
    c.options["timeout_ms"] = "fast";
    EXPECT_EQ(config_msg(c).rfind("timeout_ms: ", 0), 0u);
    c.options.erase("timeout_ms");
    c.options["region"] = "x";
    EXPECT_EQ(config_msg(c).rfind("region: unknown option", 0), 0u);
    // Neither file nor env: the metadata server (no config-time check possible).
    KeyConfig md{"gcp", key, {{"metadata_host", "127.0.0.1:1"}}};
    EXPECT_NO_THROW(make_provider(md));
    md.options["metadata_host"] = "http://x/";
    EXPECT_EQ(config_msg(md).rfind("metadata_host: ", 0), 0u);
}

// ------------------------------------------------------------------ against the loopback servers

namespace {

KeyHealth health(KeyProvider& p) {
    return p.status().health;
}

KmsErrorKind unwrap_kind(KeyProvider& p, const std::vector<uint8_t>& blob, std::string* msg = nullptr) {
    return kind_of([&] { p.unwrap(blob); }, msg);
}

bool same(const SecureBytes& a, const SecureBytes& b) {
    return a.size() == b.size() && ct_equal(a.data(), b.data(), a.size());
}

}  // namespace

TEST(VaultLoopback, TokenWrapUnwrapStatusAndEveryState) {
    cmk_test::TempDir tmp;
    write_private(tmp.sub("root"), "root-token-for-tests\n");
    LoopbackServer srv("vault_server.py",
                       {"--token-file", tmp.sub("root"), "--key", "k1", "--namespace", "team"}, tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    KeyConfig c{"vault",
                "k1",
                {{"addr", srv.url()},
                 {"token_file", tmp.sub("root")},
                 {"namespace", "team"},
                 {"timeout_ms", "1500"}}};
    auto p = make_provider(c);
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    SecureBytes kek = random_key(32);
    WrapResult w = p->wrap(kek);
    EXPECT_EQ(std::string(w.blob.begin(), w.blob.begin() + 9), "vault:v1:");
    EXPECT_EQ(w.key_version, "1");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    // The namespace header went out on every request.
    std::string reqs = srv.control("{\"action\":\"requests\"}");
    EXPECT_NE(reqs.find("\"x-vault-namespace\": \"team\""), std::string::npos);
    // Rotation: rewrap moves the KEK to v2 without it leaving Vault.
    srv.control("{\"action\":\"rotate\",\"name\":\"k1\"}");
    std::string ver;
    std::vector<uint8_t> v2 = vault::rewrap(*p, w.blob, &ver);
    EXPECT_EQ(ver, "2");
    EXPECT_TRUE(same(p->unwrap(v2), kek));
    // min_decryption_version above our ciphertext's version: revoked (status and unwrap).
    srv.control("{\"action\":\"min_decryption_version\",\"name\":\"k1\",\"value\":3}");
    EXPECT_EQ(health(*p), KeyHealth::Revoked);
    std::string m;
    EXPECT_EQ(unwrap_kind(*p, v2, &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("disallowed by policy"), std::string::npos) << m;
    EXPECT_NE(m.find("k1"), std::string::npos) << m;
    srv.control("{\"action\":\"min_decryption_version\",\"name\":\"k1\",\"value\":1}");
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    // Permission denied, sealed, 500, throttle, stall.
    srv.control("{\"action\":\"deny\",\"name\":\"k1\"}");
    EXPECT_EQ(health(*p), KeyHealth::Revoked);
    EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Revoked);
    srv.control("{\"action\":\"allow\",\"name\":\"k1\"}");
    srv.control("{\"action\":\"seal\"}");
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Unavailable);
    EXPECT_NE(s.detail.find("sealed"), std::string::npos) << s.detail;
    EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Unavailable);
    srv.control("{\"action\":\"unseal\"}");
    for (const char* mode : {"error500", "throttle", "stall"}) {
        srv.control(std::string("{\"action\":\"mode\",\"value\":\"") + mode + "\"}");
        EXPECT_EQ(health(*p), KeyHealth::Unavailable) << mode;
        EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Unavailable) << mode;
    }
    srv.control("{\"action\":\"mode\",\"value\":\"normal\"}");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    // A bad token: 403 -> revoked.
    srv.control("{\"action\":\"revoke_tokens\"}");
    EXPECT_EQ(health(*p), KeyHealth::Revoked);
    srv.control("{\"action\":\"restore_tokens\"}");
    // Wrong key material: another key's ciphertext under our key id.
    std::string other = "vault:v1:" + base64_encode(random_bytes(44).data(), 44);
    EXPECT_EQ(unwrap_kind(*p, std::vector<uint8_t>(other.begin(), other.end()), &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("message authentication failed"), std::string::npos) << m;
    // The key gone: 404 -> revoked; wrap refuses to let encrypt create it.
    srv.control("{\"action\":\"delete_key\",\"name\":\"k1\"}");
    s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("does not exist"), std::string::npos) << s.detail;
    EXPECT_EQ(kind_of([&] { p->wrap(kek); }), KmsErrorKind::Revoked);
    EXPECT_EQ(health(*p), KeyHealth::Revoked);  // still gone: wrap did not upsert it
    // Secrets never in messages.
    EXPECT_EQ(m.find("root-token-for-tests"), std::string::npos);
    EXPECT_EQ(s.detail.find("root-token-for-tests"), std::string::npos);
}

TEST(VaultLoopback, AppRoleLoginAndRelogin) {
    cmk_test::TempDir tmp;
    write_private(tmp.sub("root"), "root-token\n");
    write_private(tmp.sub("role"), "role-123\n");
    write_private(tmp.sub("secret"), "secret-456\n");
    LoopbackServer srv("vault_server.py",
                       {"--token-file", tmp.sub("root"), "--key", "k1", "--role-id", "role-123",
                        "--secret-id", "secret-456", "--token-ttl", "600"},
                       tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    KeyConfig c{
        "vault",
        "k1",
        {{"addr", srv.url()}, {"role_id_file", tmp.sub("role")}, {"secret_id_file", tmp.sub("secret")}}};
    auto p = make_provider(c);
    SecureBytes kek = random_key(32);
    WrapResult w = p->wrap(kek);
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    std::string reqs = srv.control("{\"action\":\"requests\"}");
    size_t logins = 0;
    for (size_t i = reqs.find("/v1/auth/approle/login"); i != std::string::npos;
         i = reqs.find("/v1/auth/approle/login", i + 1))
        logins++;
    EXPECT_EQ(logins, 1u);  // the token is cached
    // Our token revoked at Vault: the provider logs in again once and carries on.
    srv.control("{\"action\":\"revoke_issued\"}");
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    reqs = srv.control("{\"action\":\"requests\"}");
    logins = 0;
    for (size_t i = reqs.find("/v1/auth/approle/login"); i != std::string::npos;
         i = reqs.find("/v1/auth/approle/login", i + 1))
        logins++;
    EXPECT_EQ(logins, 2u);
    // An expired secret id: revoked, with what to do.
    srv.control("{\"action\":\"expire_secret_id\"}");
    srv.control("{\"action\":\"revoke_tokens\"}");
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("secret_id_file"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("secret-456"), std::string::npos);
}

TEST(GcpLoopback, ServiceAccountJwtWrapUnwrapStatusAndEveryState) {
    cmk_test::TempDir tmp;
    const std::string key = "projects/cmk-project/locations/global/keyRings/ring/cryptoKeys/k1";
    LoopbackServer srv("gcp_kms_server.py", {"--write-credentials", tmp.sub("sa.json"), "--key", key},
                       tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    KeyConfig c{"gcp",
                key,
                {{"endpoint", srv.url()}, {"credentials_file", tmp.sub("sa.json")}, {"timeout_ms", "1500"}}};
    auto p = make_provider(c);
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    SecureBytes kek = random_key(32);
    WrapResult w = p->wrap(kek);
    EXPECT_EQ(w.key_version, "1");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    // One assertion, verified by PyJWT in the server; the token was cached since.
    std::string stats = srv.control("{\"action\":\"stats\"}");
    EXPECT_NE(stats.find("\"verified_assertions\": 1"), std::string::npos) << stats;
    // States of the primary version.
    auto set_state = [&](const char* st) {
        srv.control(std::string("{\"action\":\"set_state\",\"name\":\"") + key + "\",\"state\":\"" + st +
                    "\"}");
    };
    for (const char* st : {"DISABLED", "DESTROY_SCHEDULED"}) {
        set_state(st);
        KeyStatus s = p->status();
        EXPECT_EQ(s.health, KeyHealth::Revoked) << st;
        EXPECT_EQ(s.state, st);
        EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Revoked) << st;
        set_state("ENABLED");
        EXPECT_EQ(health(*p), KeyHealth::Ok);
    }
    // Rotation: the new primary is enabled, our KEK's version 1 still decrypts; disabling
    // version 1 only is caught by the unwrap probe.
    srv.control("{\"action\":\"rotate\",\"name\":\"" + key + "\"}");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    srv.control("{\"action\":\"set_state\",\"name\":\"" + key + "\",\"state\":\"DISABLED\",\"version\":1}");
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    std::string m;
    EXPECT_EQ(unwrap_kind(*p, w.blob, &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("FAILED_PRECONDITION"), std::string::npos) << m;
    srv.control("{\"action\":\"set_state\",\"name\":\"" + key + "\",\"state\":\"ENABLED\",\"version\":1}");
    // Access denied, 500, throttle, stall.
    srv.control("{\"action\":\"deny\",\"name\":\"" + key + "\"}");
    EXPECT_EQ(health(*p), KeyHealth::Revoked);
    EXPECT_EQ(unwrap_kind(*p, w.blob, &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("PERMISSION_DENIED"), std::string::npos) << m;
    EXPECT_NE(m.find("roles/cloudkms.cryptoKeyEncrypterDecrypter"), std::string::npos) << m;
    srv.control("{\"action\":\"allow\",\"name\":\"" + key + "\"}");
    for (const char* mode : {"error500", "throttle", "stall"}) {
        srv.control(std::string("{\"action\":\"mode\",\"value\":\"") + mode + "\"}");
        EXPECT_EQ(health(*p), KeyHealth::Unavailable) << mode;
        EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Unavailable) << mode;
    }
    srv.control("{\"action\":\"mode\",\"value\":\"normal\"}");
    // Tokens revoked early: one fresh grant, then on.
    srv.control("{\"action\":\"revoke_tokens\"}");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    stats = srv.control("{\"action\":\"stats\"}");
    EXPECT_NE(stats.find("\"verified_assertions\": 2"), std::string::npos) << stats;
    // The service account's key deleted: invalid_grant -> revoked.
    srv.control("{\"action\":\"revoke_sa\"}");
    srv.control("{\"action\":\"revoke_tokens\"}");
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("invalid_grant"), std::string::npos) << s.detail;
    srv.control("{\"action\":\"restore_sa\"}");
    // Wrong key material: a ciphertext of another key.
    std::vector<uint8_t> junk = random_bytes(60);
    EXPECT_EQ(unwrap_kind(*p, junk, &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("INVALID_ARGUMENT"), std::string::npos) << m;
    // Destroyed, then the key gone altogether.
    set_state("DESTROYED");
    EXPECT_EQ(p->status().state, "DESTROYED");
    srv.control("{\"action\":\"delete_key\",\"name\":\"" + key + "\"}");
    s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("NOT_FOUND"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("ya29."), std::string::npos);
}

TEST(GcpLoopback, MetadataServerToken) {
    cmk_test::TempDir tmp;
    const std::string key = "projects/cmk-project/locations/global/keyRings/ring/cryptoKeys/k1";
    LoopbackServer srv("gcp_kms_server.py", {"--write-credentials", tmp.sub("sa.json"), "--key", key},
                       tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    std::string hostport = srv.url().substr(7);
    ::unsetenv("GOOGLE_APPLICATION_CREDENTIALS");
    ::setenv("GCE_METADATA_HOST", hostport.c_str(), 1);
    KeyConfig c{"gcp", key, {{"endpoint", srv.url()}}};
    auto p = make_provider(c);
    ::unsetenv("GCE_METADATA_HOST");
    SecureBytes kek = random_key(32);
    WrapResult w = p->wrap(kek);
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    std::string reqs = srv.control("{\"action\":\"requests\"}");
    EXPECT_NE(reqs.find("\"metadata-flavor\": \"Google\""), std::string::npos);
    srv.control("{\"action\":\"metadata\",\"value\":\"off\"}");
    srv.control("{\"action\":\"revoke_tokens\"}");
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_NE(s.detail.find("attach a service account"), std::string::npos) << s.detail;
}

// ------------------------------------------------------------------ canned transports
// The factories' transport seam (what fuzz/fuzz_answers.cpp drives): the provider's
// requests and its reading of the answers, without a server.

TEST(VaultCanned, WrapReadsTheKeyFirstAndUnwrapDecodes) {
    cmk_test::TempDir tmp;
    write_private(tmp.sub("token"), "hvs.test\n");
    KeyConfig c{
        "vault", "k1", {{"addr", "https://vault.example.com:8200"}, {"token_file", tmp.sub("token")}}};
    SecureBytes kek = random_key(32);
    std::vector<std::string> sent;
    long error_status = 0;
    auto p = vault::make_vault_provider(c, [&](const http::Request& r) {
        std::string token;
        for (const auto& h : r.headers)
            if (h.first == "X-Vault-Token") token = h.second;
        sent.push_back(r.method + " " + r.url + " " + token);
        http::Response a;
        a.status = 200;
        if (r.url.find("/keys/") != std::string::npos) {
            a.body =
                "{\"data\":{\"type\":\"aes256-gcm96\",\"latest_version\":2,\"min_decryption_version\":1,"
                "\"supports_decryption\":true}}";
        } else if (r.url.find("/encrypt/") != std::string::npos) {
            a.body =
                "{\"request_id\":\"r1\",\"data\":{\"ciphertext\":\"vault:v2:QUJDRA==\",\"key_version\":2}}";
        } else if (error_status != 0) {
            a.status = error_status;
            a.body =
                "{\"errors\":[\"1 error occurred:\\n\\t* cipher: message authentication failed\\n\\n\"]}";
        } else {
            a.body = "{\"data\":{\"plaintext\":\"" + base64_encode(kek.data(), kek.size()) + "\"}}";
        }
        return a;
    });
    WrapResult w = p->wrap(kek);
    EXPECT_EQ(std::string(w.blob.begin(), w.blob.end()), "vault:v2:QUJDRA==");
    EXPECT_EQ(w.key_version, "2");
    EXPECT_EQ(w.request_id, "r1");
    ASSERT_EQ(sent.size(), 2u);
    EXPECT_EQ(sent[0], "GET https://vault.example.com:8200/v1/transit/keys/k1 hvs.test");
    EXPECT_EQ(sent[1], "POST https://vault.example.com:8200/v1/transit/encrypt/k1 hvs.test");
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    EXPECT_EQ(p->status().health, KeyHealth::Ok);
    error_status = 400;
    std::string m;
    EXPECT_EQ(unwrap_kind(*p, w.blob, &m), KmsErrorKind::Revoked);
    EXPECT_NE(m.find("HTTP 400 (cipher: message authentication failed)"), std::string::npos) << m;
}

TEST(GcpCanned, MetadataTokenAndCrc32cChecks) {
    const std::string key = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
    KeyConfig c{"gcp", key, {{"metadata_host", "127.0.0.1:1"}}};
    SecureBytes kek = random_key(32);
    const std::string ct = "\x0a some ciphertext bytes";
    std::string answer;  // for the KMS call
    std::string auth, sent_body;
    const std::string token_url =
        "http://127.0.0.1:1/computeMetadata/v1/instance/service-accounts/default/token";
    auto p = gcp::make_gcp_provider(c, [&](const http::Request& r) {
        http::Response a;
        a.status = 200;
        if (r.url.rfind(token_url, 0) == 0) {
            a.body = "{\"access_token\":\"ya29.test\",\"expires_in\":3599,\"token_type\":\"Bearer\"}";
            return a;
        }
        for (const auto& h : r.headers)
            if (h.first == "Authorization") auth = h.second;
        sent_body = r.body;
        a.body = answer;
        return a;
    });
    const std::string crc_ct = std::to_string(crc32c(ct.data(), ct.size()));
    answer = "{\"name\":\"" + key + "/cryptoKeyVersions/3\",\"ciphertext\":\"" +
             base64_encode(ct.data(), ct.size()) + "\",\"ciphertextCrc32c\":\"" + crc_ct +
             "\",\"verifiedPlaintextCrc32c\":true,\"verifiedAdditionalAuthenticatedDataCrc32c\":true}";
    WrapResult w = p->wrap(kek);
    EXPECT_EQ(std::string(w.blob.begin(), w.blob.end()), ct);
    EXPECT_EQ(w.key_version, "3");
    EXPECT_EQ(auth, "Bearer ya29.test");
    EXPECT_NE(
        sent_body.find("\"plaintextCrc32c\":\"" + std::to_string(crc32c(kek.data(), kek.size())) + "\""),
        std::string::npos);
    // A ciphertext damaged in transit, or a request Cloud KMS did not verify: an outage.
    std::string bad = answer;
    bad.replace(bad.find(crc_ct), crc_ct.size(), std::to_string(crc32c(ct.data(), ct.size()) ^ 1));
    answer = bad;
    std::string m;
    EXPECT_EQ(kind_of([&] { p->wrap(kek); }, &m), KmsErrorKind::Unavailable);
    EXPECT_NE(m.find("CRC32C does not match"), std::string::npos) << m;
    answer = "{\"ciphertext\":\"" + base64_encode(ct.data(), ct.size()) + "\",\"ciphertextCrc32c\":\"" +
             crc_ct +
             "\",\"verifiedPlaintextCrc32c\":false,\"verifiedAdditionalAuthenticatedDataCrc32c\":true}";
    EXPECT_EQ(kind_of([&] { p->wrap(kek); }, &m), KmsErrorKind::Unavailable);
    EXPECT_NE(m.find("did not verify"), std::string::npos) << m;
    const std::string b64 = base64_encode(kek.data(), kek.size());
    const uint32_t crc_kek = crc32c(kek.data(), kek.size());
    answer = "{\"plaintext\":\"" + b64 + "\",\"plaintextCrc32c\":\"" + std::to_string(crc_kek) + "\"}";
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    answer = "{\"plaintext\":\"" + b64 + "\",\"plaintextCrc32c\":\"" + std::to_string(crc_kek ^ 1) + "\"}";
    EXPECT_EQ(unwrap_kind(*p, w.blob, &m), KmsErrorKind::Unavailable);
    EXPECT_NE(m.find("CRC32C does not match"), std::string::npos) << m;
    answer = "{\"name\":\"" + key + "\",\"purpose\":\"ENCRYPT_DECRYPT\",\"primary\":{\"name\":\"" + key +
             "/cryptoKeyVersions/3\",\"state\":\"DISABLED\"}}";
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_EQ(s.state, "DISABLED");
}

// ------------------------------------------------------------------ the provider kit
// The helpers every provider shares (kit.hpp): one rule, one message, tested once.

TEST(Kit, PlainHttpOnlyToLoopback) {
    for (const char* ok : {"https://kms.example.com", "http://127.0.0.1:8200", "http://127.0.0.1",
                           "http://localhost/v1", "http://[::1]:9", "http://127.0.0.2:1"})
        EXPECT_TRUE(kit::https_or_loopback(ok)) << ok;
    for (const char* bad : {"http://vault.example.com:8200", "http://localhost.example.com:8200",
                            "http://127.evil.example", "http://127.0.0.1:80@evil.example/",
                            "http://10.0.0.1", "http://[::2]", "ftp://127.0.0.1", "https://", ""})
        EXPECT_FALSE(kit::https_or_loopback(bad)) << bad;
    EXPECT_TRUE(kit::loopback_authority("localhost:4566"));
    EXPECT_FALSE(kit::loopback_authority("user@127.0.0.1"));
}

TEST(Kit, OptionsNameTheFieldAndTheRange) {
    KeyConfig c;
    c.options["timeout_ms"] = "50";
    std::string m;
    EXPECT_EQ(kind_of([&] { kit::int_option(c, "timeout_ms", 10, 100, 200, "milliseconds"); }, &m),
              KmsErrorKind::Config);
    EXPECT_EQ(m, "timeout_ms: \"50\" is not a number of milliseconds from 100 to 200");
    c.options["timeout_ms"] = "+150";  // digits only
    EXPECT_EQ(kind_of([&] { kit::int_option(c, "timeout_ms", 10, 100, 200); }), KmsErrorKind::Config);
    c.options["timeout_ms"] = "150";
    EXPECT_EQ(kit::int_option(c, "timeout_ms", 10, 100, 200), 150);
    EXPECT_EQ(kit::int_option(c, "retries", 3, 1, 10), 3);
    kit::Timing t = kit::read_timing(KeyConfig{});
    EXPECT_EQ(t.timeout_ms, kit::kTimeoutMs);
    EXPECT_EQ(t.connect_timeout_ms, kit::kConnectTimeoutMs);
    EXPECT_EQ(t.attempts, kit::kAttempts);
    c.options["colour"] = "blue";
    EXPECT_EQ(kind_of([&] { kit::require_known_options(c, "the test provider", {"timeout_ms", "mount"}); }, &m),
              KmsErrorKind::Config);
    EXPECT_EQ(m, "colour: unknown option of the test provider (known: timeout_ms, mount)");
}

TEST(Kit, SecretFilesMustBePrivateAndAreTrimmed) {
    cmk_test::TempDir d;
    std::string f = d.sub("token");
    cmk_test::spit(f, "s3cr3t-token\n");
    chmod(f.c_str(), 0644);
    std::string m;
    EXPECT_EQ(kind_of([&] { kit::read_secret_file("token_file", f); }, &m), KmsErrorKind::Config);
    EXPECT_NE(m.find("chmod 600"), std::string::npos) << m;
    EXPECT_EQ(m.find("s3cr3t"), std::string::npos) << m;
    chmod(f.c_str(), 0600);
    EXPECT_EQ(kit::read_secret_file("token_file", f).str(), "s3cr3t-token");
    KeyConfig c;
    c.options["token_file"] = f;
    EXPECT_EQ(kit::secret_from(c, "token_file", nullptr).str(), "s3cr3t-token");
    EXPECT_TRUE(kit::secret_from(KeyConfig{}, "token_file", nullptr).empty());
}

TEST(Kit, TokenCacheFetchesOnceWhileFresh) {
    kit::TokenCache cache(60);
    int fetches = 0;
    auto fetch = [&](long* life) {
        ++fetches;
        *life = 3600;
        return kit::Secret("token-" + std::to_string(fetches));
    };
    EXPECT_EQ(cache.get(false, fetch).str(), "token-1");
    EXPECT_EQ(cache.get(false, fetch).str(), "token-1");
    EXPECT_EQ(cache.get(true, fetch).str(), "token-2");  // refresh asked (a 401)
    cache.forget();
    EXPECT_EQ(cache.get(false, fetch).str(), "token-3");
    kit::TokenCache brief(60);
    auto expired = [&](long* life) {
        ++fetches;
        *life = 0;  // no life left: not kept
        return kit::Secret("t");
    };
    brief.get(false, expired);
    brief.get(false, expired);
    EXPECT_EQ(fetches, 5);
    // a peer announcing an absurd lifetime: bounded, still cached (no clock overflow
    // turning "kept for ever" into "already expired")
    kit::TokenCache absurd(60);
    auto forever = [&](long* life) {
        ++fetches;
        *life = std::numeric_limits<long>::max();
        return kit::Secret("f");
    };
    absurd.get(false, forever);
    absurd.get(false, forever);
    EXPECT_EQ(fetches, 6);
}

TEST(Kit, StatusFromErrorAndOneLine) {
    KeyStatus s = kit::status_from_error(kit::revoked("key gone"), "credentials refused");
    EXPECT_EQ(s.health, KeyHealth::Revoked);
    EXPECT_EQ(s.state, "credentials refused");
    EXPECT_EQ(s.detail, "key gone");
    s = kit::status_from_error(kit::unavailable("timeout"));
    EXPECT_EQ(s.health, KeyHealth::Unavailable);
    EXPECT_EQ(s.state, "unavailable");
    EXPECT_EQ(kind_of([] { kit::status_from_error(kit::config_error("addr: bad")); }), KmsErrorKind::Config);
    EXPECT_EQ(kit::one_line("a\nb\tc", 200), "a b c");
    EXPECT_EQ(kit::one_line(std::string(10, 'x'), 4), "xxxx...");
}

// ------------------------------------------------------------------ service-account impersonation (issue 19)

// The request as Google's IAM Credentials reference shows it (POST
// .../v1/projects/-/serviceAccounts/SA:generateAccessToken with delegates, scope and
// lifetime), and its example answer parsed (expireTime with fractional seconds).
TEST(GcpImpersonation, RequestAndAnswer) {
    gcp::IdentitySource src;
    src.impersonate = "priv-sa@my-project.iam.gserviceaccount.com";
    src.iam_endpoint = "https://iamcredentials.googleapis.com";
    src.lifetime_s = 300;
    EXPECT_EQ(gcp::generate_access_token_url(src),
              "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
              "priv-sa@my-project.iam.gserviceaccount.com:generateAccessToken");
    EXPECT_EQ(gcp::generate_access_token_body(src),
              "{\"scope\":[\"https://www.googleapis.com/auth/cloudkms\"],\"lifetime\":\"300s\"}");
    src.delegates = {"delegate-sa@my-project.iam.gserviceaccount.com"};
    EXPECT_EQ(gcp::generate_access_token_body(src),
              "{\"delegates\":[\"projects/-/serviceAccounts/delegate-sa@my-project.iam.gserviceaccount.com\"],"
              "\"scope\":[\"https://www.googleapis.com/auth/cloudkms\"],\"lifetime\":\"300s\"}");
    long life = 0;
    // 2014-10-02T15:01:23Z is 1412262083.
    kit::Secret t = gcp::parse_generate_access_token(
        "{\n  \"accessToken\": \"ya29.c.ElrWBuZ\",\n  \"expireTime\": \"2014-10-02T15:01:23.045123456Z\"\n}",
        1412262083 - 3000, &life, "test");
    EXPECT_EQ(t.str(), "ya29.c.ElrWBuZ");
    EXPECT_EQ(life, 3000);
    EXPECT_EQ(kind_of([&] { gcp::parse_generate_access_token("{\"expireTime\":\"x\"}", 0, &life, "t"); }),
              KmsErrorKind::Unavailable);
    EXPECT_EQ(kind_of([&] { gcp::parse_generate_access_token("{\"accessToken\":\"a\"}", 0, &life, "t"); }),
              KmsErrorKind::Unavailable);
    EXPECT_TRUE(gcp::valid_service_account_email("cmk-kms@customer-project.iam.gserviceaccount.com"));
    for (const char* bad : {"no-at", "a@b", "UPPER@p.iam.gserviceaccount.com", "a@@b.c", "a b@p.c", "@p.c"})
        EXPECT_FALSE(gcp::valid_service_account_email(bad)) << bad;
}

TEST(GcpImpersonation, ConfigErrorsNameTheField) {
    cmk_test::TempDir tmp;
    ::unsetenv("GOOGLE_APPLICATION_CREDENTIALS");
    const std::string key = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
    KeyConfig c{"gcp", key, {{"metadata_host", "127.0.0.1:1"}}};
    c.options["impersonate_service_account"] = "cmk-kms@customer.iam.gserviceaccount.com";
    EXPECT_NO_THROW(make_provider(c));
    EXPECT_EQ(make_provider(c)->identity(), "service account cmk-kms@customer.iam.gserviceaccount.com (impersonated)");
    auto field = [&](const char* k, const char* v, const std::string& want) {
        KeyConfig x = c;
        x.options[k] = v;
        std::string m = config_msg(x);
        EXPECT_EQ(m.rfind(want + ": ", 0), 0u) << m;
    };
    field("impersonate_service_account", "not-an-email", "impersonate_service_account");
    field("impersonation_delegates", "a@p.iam.gserviceaccount.com,bad", "impersonation_delegates");
    field("impersonation_lifetime", "60", "impersonation_lifetime");
    field("iam_credentials_endpoint", "http://iam.example.com", "iam_credentials_endpoint");
    KeyConfig plain{"gcp", key, {{"metadata_host", "127.0.0.1:1"}, {"impersonation_lifetime", "600"}}};
    EXPECT_EQ(config_msg(plain).rfind("impersonation_lifetime: given without impersonate_service_account", 0),
              0u);
}

// Against the loopback IAM Credentials endpoint: the KMS admits only the customer's
// account, so the calls prove the token was minted; the binding removed is a
// revocation at the next refresh; an outage of the endpoint is an outage.
TEST(GcpLoopback, ImpersonatedServiceAccount) {
    cmk_test::TempDir tmp;
    const std::string key = "projects/cmk-project/locations/global/keyRings/ring/cryptoKeys/k1";
    const std::string target = "cmk-kms@customer-project.iam.gserviceaccount.com";
    LoopbackServer srv("gcp_kms_server.py",
                       {"--write-credentials", tmp.sub("sa.json"), "--key", key, "--impersonate", target},
                       tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    KeyConfig base{"gcp",
                   key,
                   {{"endpoint", srv.url()}, {"credentials_file", tmp.sub("sa.json")}, {"timeout_ms", "1500"}}};
    // Without impersonation the key refuses the operator's own account.
    EXPECT_EQ(make_provider(base)->status().health, KeyHealth::Revoked);
    KeyConfig c = base;
    c.options["impersonate_service_account"] = target;
    c.options["iam_credentials_endpoint"] = srv.url();
    auto p = make_provider(c);
    SecureBytes kek = random_key(32);
    WrapResult w = p->wrap(kek);
    EXPECT_TRUE(same(p->unwrap(w.blob), kek));
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    std::string stats = srv.control("{\"action\":\"stats\"}");
    EXPECT_NE(stats.find("\"minted\": 1,"), std::string::npos) << stats;  // cached
    // Short-lived minted tokens: each call refreshes, and meets the removed binding.
    srv.control("{\"action\":\"impersonated_ttl\",\"value\":1}");
    srv.control("{\"action\":\"revoke_tokens\"}");
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    srv.control("{\"action\":\"token_creator\",\"value\":\"off\"}");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    KeyStatus s = p->status();
    EXPECT_EQ(s.health, KeyHealth::Revoked) << s.detail;
    EXPECT_NE(s.detail.find("iam.serviceAccounts.getAccessToken"), std::string::npos) << s.detail;
    EXPECT_NE(s.detail.find("roles/iam.serviceAccountTokenCreator"), std::string::npos) << s.detail;
    EXPECT_EQ(s.detail.find("ya29."), std::string::npos) << s.detail;
    srv.control("{\"action\":\"token_creator\",\"value\":\"on\"}");
    EXPECT_EQ(health(*p), KeyHealth::Ok);
    srv.control("{\"action\":\"mode\",\"value\":\"error500\"}");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    EXPECT_EQ(unwrap_kind(*p, w.blob), KmsErrorKind::Unavailable);
    srv.control("{\"action\":\"mode\",\"value\":\"normal\"}");
    EXPECT_TRUE(same(make_provider(c)->unwrap(w.blob), kek));
}

// ------------------------------------------------------------------ workload identity federation (issue 19)

namespace {

const char* const kAudience =
    "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/lakebase-pool/providers/"
    "k8s";

// An external_account file as `gcloud iam workload-identity-pools create-cred-config`
// writes it, with `extra` members spliced into the top level and `source` as the
// credential_source object.
std::string external_json(const std::string& extra,
                          const std::string& source = "{\"file\":\"/var/run/token\"}") {
    return std::string("{\"type\":\"external_account\",\"audience\":\"") + kAudience +
           "\",\"subject_token_type\":\"urn:ietf:params:oauth:token-type:jwt\","
           "\"token_url\":\"https://sts.googleapis.com/v1/token\",\"credential_source\":" +
           source + (extra.empty() ? "" : "," + extra) + "}";
}

}  // namespace

// Every field checked at configuration time; the error is one line that starts with
// credentials_file: and names the field; unsupported sources say "not supported".
TEST(GcpWorkloadIdentity, ConfigErrorsNameTheField) {
    cmk_test::TempDir tmp;
    ::unsetenv("GOOGLE_APPLICATION_CREDENTIALS");
    const std::string key = "projects/p/locations/global/keyRings/r/cryptoKeys/k";
    const std::string imp_url =
        "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
        "lakebase-cmk@customer.iam.gserviceaccount.com:generateAccessToken";
    int n = 0;
    auto cfg_for = [&](const std::string& json) {
        std::string path = tmp.sub("wif" + std::to_string(n++) + ".json");
        write_private(path, json);
        return KeyConfig{"gcp", key, {{"credentials_file", path}}};
    };
    // Accepted: direct access, and the file's own impersonation (the subject token file
    // need not exist yet: it is read at each exchange).
    EXPECT_EQ(make_provider(cfg_for(external_json("")))->identity(),
              std::string("federated principal of ") + kAudience);
    auto imp = make_provider(cfg_for(external_json("\"service_account_impersonation_url\":\"" + imp_url +
                                                   "\",\"service_account_impersonation\":{\"token_lifetime_"
                                                   "seconds\":600},\"universe_domain\":\"googleapis.com\"")));
    EXPECT_EQ(imp->identity(), std::string("service account lakebase-cmk@customer.iam.gserviceaccount.com "
                                           "(impersonated, federated from ") +
                                   kAudience + ")");
    EXPECT_NO_THROW(make_provider(cfg_for(external_json(
        "",
        "{\"url\":\"http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01\","
        "\"headers\":{\"Metadata\":\"True\"},\"format\":{\"type\":\"json\",\"subject_token_field_name\":"
        "\"access_token\"}}"))));
    // The option on top of the federated token: accepted, and it names the account.
    KeyConfig opt = cfg_for(external_json(""));
    opt.options["impersonate_service_account"] = "cmk-kms@customer.iam.gserviceaccount.com";
    EXPECT_EQ(make_provider(opt)->identity(),
              std::string(
                  "service account cmk-kms@customer.iam.gserviceaccount.com (impersonated, federated from ") +
                  kAudience + ")");

    auto fails = [&](const std::string& json, const std::string& field, const std::string& why) {
        std::string m = config_msg(cfg_for(json));
        EXPECT_EQ(m.rfind("credentials_file: " + field + " in \"", 0), 0u) << m;
        EXPECT_NE(m.find(why), std::string::npos) << m;
    };
    std::string no_aud = external_json("");
    no_aud.replace(no_aud.find("\"audience\""), std::string("\"audience\":\"").size() + strlen(kAudience) + 2,
                   "");
    fails(no_aud, "audience", "is missing");
    std::string workforce = external_json("");
    workforce.replace(workforce.find("workloadIdentityPools"), strlen("workloadIdentityPools"),
                      "workforcePools");
    fails(workforce, "audience", "workforce");
    std::string bad_aud = external_json("");
    bad_aud.replace(bad_aud.find("//iam.googleapis.com"), strlen("//iam.googleapis.com"),
                    "https://example.com");
    fails(bad_aud, "audience", "must be //iam.googleapis.com/projects/");
    std::string aws = external_json("");
    aws.replace(aws.find("urn:ietf:params:oauth:token-type:jwt"),
                strlen("urn:ietf:params:oauth:token-type:jwt"),
                "urn:ietf:params:aws:token-type:aws4_request");
    fails(aws, "subject_token_type", "not supported");
    std::string nott = external_json("");
    nott.replace(nott.find("\"subject_token_type\""),
                 strlen("\"subject_token_type\":\"urn:ietf:params:oauth:token-type:jwt\","), "");
    fails(nott, "subject_token_type", "is missing");
    std::string http_sts = external_json("");
    http_sts.replace(http_sts.find("https://sts.googleapis.com"), strlen("https://sts.googleapis.com"),
                     "http://sts.example.com");
    fails(http_sts, "token_url", "https://");
    fails(
        external_json("\"service_account_impersonation_url\":\"https://iamcredentials.googleapis.com/v1/x\""),
        "service_account_impersonation_url", "generateAccessToken");
    fails(external_json("\"service_account_impersonation_url\":\"" + imp_url +
                        "\",\"service_account_impersonation\":{\"token_lifetime_seconds\":60}"),
          "service_account_impersonation.token_lifetime_seconds", "from 600 to 43200");
    fails(external_json("\"service_account_impersonation\":{\"token_lifetime_seconds\":3600}"),
          "service_account_impersonation.token_lifetime_seconds",
          "without service_account_impersonation_url");
    fails(external_json("\"workforce_pool_user_project\":\"p\""), "workforce_pool_user_project",
          "not supported");
    fails(external_json("\"client_secret\":\"s3cr3t\""), "client_secret", "not supported");
    fails(external_json("\"universe_domain\":\"example.com\""), "universe_domain", "googleapis.com");
    fails(external_json("", "{\"executable\":{\"command\":\"/bin/token\"}}"), "credential_source.executable",
          "not supported");
    fails(external_json("", "{\"environment_id\":\"aws1\",\"region_url\":\"http://169.254.169.254/x\"}"),
          "credential_source.environment_id", "not supported by the gcp key provider (AWS-sourced");
    fails(external_json("", "{}"), "credential_source", "neither file nor url");
    fails(external_json("", "{\"file\":\"/t\",\"url\":\"https://x.example.com/t\"}"), "credential_source",
          "both file and url");
    fails(external_json("", "{\"file\":\"token\"}"), "credential_source.file", "absolute path");
    fails(external_json("", "{\"url\":\"http://token.example.com/t\"}"), "credential_source.url", "https://");
    fails(external_json("", "{\"file\":\"/t\",\"headers\":{\"a\":\"b\"}}"), "credential_source.headers",
          "without credential_source.url");
    fails(external_json("", "{\"file\":\"/t\",\"format\":{\"type\":\"json\"}}"),
          "credential_source.format.subject_token_field_name", "is missing");
    fails(external_json("", "{\"file\":\"/t\",\"format\":{\"type\":\"xml\"}}"),
          "credential_source.format.type", "text or json");
    std::string no_cs = external_json("");
    no_cs.replace(no_cs.find(",\"credential_source\""),
                  strlen(",\"credential_source\":{\"file\":\"/var/run/token\"}"), "");
    fails(no_cs, "credential_source", "is missing");
    // No secret from the file in a message.
    EXPECT_EQ(config_msg(cfg_for(external_json("\"client_secret\":\"s3cr3t\""))).find("s3cr3t"),
              std::string::npos);

    // The file's impersonation and the option together: refused, naming the option.
    KeyConfig both = cfg_for(external_json("\"service_account_impersonation_url\":\"" + imp_url + "\""));
    both.options["impersonate_service_account"] = "cmk-kms@customer.iam.gserviceaccount.com";
    std::string m = config_msg(both);
    EXPECT_EQ(m.rfind("impersonate_service_account: ", 0), 0u) << m;
    KeyConfig life = cfg_for(external_json("\"service_account_impersonation_url\":\"" + imp_url + "\""));
    life.options["impersonation_lifetime"] = "600";
    EXPECT_EQ(config_msg(life).rfind("impersonation_lifetime: ", 0), 0u);
}

// The STS request as Google's published STS v1 reference and its curl example give it
// (POST https://sts.googleapis.com/v1/token, no Authorization header, form fields
// grant_type, audience, scope, requested_token_type, subject_token, subject_token_type:
// the form names of grantType, audience, ... as Google's client libraries send them),
// and the reference answer {"access_token", "issued_token_type", "token_type",
// "expires_in"} parsed.
TEST(GcpWorkloadIdentity, UnverifiedExpiryOfASubjectToken) {
    int64_t exp = 0;
    // {"alg":"none"} . {"sub":"x","exp":1700000000} . sig
    EXPECT_TRUE(jwt::unverified_exp("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwiZXhwIjoxNzAwMDAwMDAwfQ.c2ln", &exp));
    EXPECT_EQ(exp, 1700000000);
    EXPECT_FALSE(jwt::unverified_exp("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", &exp));  // no exp
    EXPECT_FALSE(jwt::unverified_exp("opaque-token", &exp));
    EXPECT_FALSE(jwt::unverified_exp("a.b.c.d", &exp));
    EXPECT_FALSE(jwt::unverified_exp("a.!!!.c", &exp));
    EXPECT_FALSE(jwt::unverified_exp("a." + std::string(200, '[') + ".c", &exp));
}

TEST(GcpWorkloadIdentity, StsRequestAgainstThePublishedExample) {
    gcp::ExternalAccount x;
    x.audience = kAudience;
    x.subject_token_type = "urn:ietf:params:oauth:token-type:jwt";
    std::string body = gcp::sts_request_body(x, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln+/=");
    EXPECT_EQ(body,
              "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange"
              "&audience=%2F%2Fiam.googleapis.com%2Fprojects%2F123456789%2Flocations%2Fglobal%2F"
              "workloadIdentityPools%2Flakebase-pool%2Fproviders%2Fk8s"
              "&scope=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fcloud-platform"
              "&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token"
              "&subject_token=eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln%2B%2F%3D"
              "&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt");
    EXPECT_EQ(std::string(gcp::kStsTokenUrl), "https://sts.googleapis.com/v1/token");
    long life = 0;
    kit::Secret t = gcp::parse_sts_token(
        "{\n  \"access_token\": \"ya29.dr.AQ1\",\n  \"issued_token_type\": "
        "\"urn:ietf:params:oauth:token-type:access_token\",\n  \"token_type\": \"Bearer\",\n  "
        "\"expires_in\": 3599\n}",
        &life, "test");
    EXPECT_EQ(t.str(), "ya29.dr.AQ1");
    EXPECT_EQ(life, 3599);
    gcp::parse_sts_token("{\"access_token\":\"a\",\"expires_in\":99999999999}", &life, "t");
    EXPECT_EQ(life, kit::kMaxTokenLifeS);
    gcp::parse_sts_token("{\"access_token\":\"a\"}", &life, "t");
    EXPECT_EQ(life, 3600);
    EXPECT_EQ(kind_of([&] { gcp::parse_sts_token("{\"token_type\":\"Bearer\"}", &life, "t"); }),
              KmsErrorKind::Unavailable);
    EXPECT_EQ(kind_of([&] { gcp::parse_sts_token("not json", &life, "t"); }), KmsErrorKind::Unavailable);
    // Subject tokens: text trimmed, a JSON field, and none is an outage naming the source only.
    EXPECT_EQ(gcp::subject_token_from("eyJ.a.b\n", "", "f").str(), "eyJ.a.b");
    EXPECT_EQ(gcp::subject_token_from("{\"access_token\":\"eyJ.c.d\",\"x\":1}", "access_token", "f").str(),
              "eyJ.c.d");
    std::string msg;
    EXPECT_EQ(kind_of([&] { gcp::subject_token_from(" \n", "", "the subject token file"); }, &msg),
              KmsErrorKind::Unavailable);
    EXPECT_NE(msg.find("is empty"), std::string::npos) << msg;
    EXPECT_EQ(
        kind_of([&] { gcp::subject_token_from("{\"id_token\":\"secret.jwt\"}", "access_token", "u"); }, &msg),
        KmsErrorKind::Unavailable);
    EXPECT_EQ(msg.find("secret.jwt"), std::string::npos) << msg;
    EXPECT_EQ(
        gcp::impersonation_url_account("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                                       "sa-1@p.iam.gserviceaccount.com:generateAccessToken"),
        "sa-1@p.iam.gserviceaccount.com");
    EXPECT_EQ(
        gcp::impersonation_url_account("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/"
                                       "sa-1@p.iam.gserviceaccount.com:signJwt"),
        "");
}

// STS and generateAccessToken refusals after a token exchange: what the kill switch
// needs to see (Google's STS answers, as documented and observed: invalid_grant for a
// refused subject token, invalid_target for a disabled or deleted pool or provider).
TEST(GcpWorkloadIdentity, ErrorClassification) {
    auto token = [](long s, const char* body) {
        return gcp::classify(gcp::Op::Token, s, gcp::parse_error(body));
    };
    EXPECT_EQ(
        token(400,
              "{\"error\":\"invalid_grant\",\"error_description\":\"The given credential is rejected by "
              "the attribute condition.\"}"),
        KeyHealth::Revoked);
    EXPECT_EQ(
        token(400,
              "{\"error\":\"invalid_target\",\"error_description\":\"The target service indicated by the "
              "\\\"audience\\\" parameters is invalid. This might either be because the pool or provider "
              "is disabled or deleted or because it doesn't exist.\"}"),
        KeyHealth::Revoked);
    EXPECT_EQ(token(401, "{\"error\":{\"code\":401,\"status\":\"UNAUTHENTICATED\"}}"), KeyHealth::Revoked);
    EXPECT_EQ(token(403,
                    "{\"error\":{\"code\":403,\"message\":\"Permission 'iam.serviceAccounts.getAccessToken' "
                    "denied\",\"status\":\"PERMISSION_DENIED\"}}"),
              KeyHealth::Revoked);
    EXPECT_EQ(token(503, "{\"error\":\"temporarily_unavailable\"}"), KeyHealth::Unavailable);
    EXPECT_EQ(token(500, ""), KeyHealth::Unavailable);
    EXPECT_EQ(token(429, ""), KeyHealth::Unavailable);
}

// Against the loopback STS (test/kms/gcp_kms_server.py --pool-provider): a JWT of the
// peer's OIDC issuer in a file, read at each exchange; the federated token used
// directly and through the file's impersonation URL; the provider disabled is a
// revocation at the next exchange; an unreadable subject token file is an outage.
TEST(GcpLoopback, WorkloadIdentityFederation) {
    cmk_test::TempDir tmp;
    const std::string key = "projects/cmk-project/locations/global/keyRings/ring/cryptoKeys/k1";
    const std::string target = "cmk-kms@customer-project.iam.gserviceaccount.com";
    LoopbackServer srv("gcp_kms_server.py",
                       {"--write-credentials", tmp.sub("sa.json"), "--key", key, "--impersonate", target,
                        "--pool-provider", kAudience},
                       tmp.path());
    if (!srv.skip().empty()) GTEST_SKIP() << srv.skip();
    const std::string subject = tmp.sub("subject.jwt");
    srv.control("{\"action\":\"write_subject\",\"path\":\"" + subject + "\"}");
    auto cfg = [&](const std::string& name, const std::string& extra) {
        std::string json =
            std::string("{\"type\":\"external_account\",\"audience\":\"") + kAudience +
            "\",\"subject_token_type\":\"urn:ietf:params:oauth:token-type:jwt\",\"token_url\":\"" +
            srv.url() + "/v1/token\",\"credential_source\":{\"file\":\"" + subject + "\"}" + extra + "}";
        write_private(tmp.sub(name), json);
        return KeyConfig{
            "gcp",
            key,
            {{"endpoint", srv.url()}, {"credentials_file", tmp.sub(name)}, {"timeout_ms", "1500"}}};
    };
    auto direct = make_provider(cfg("direct.json", ""));
    SecureBytes kek = random_key(32);
    WrapResult w = direct->wrap(kek);
    EXPECT_TRUE(same(direct->unwrap(w.blob), kek));
    EXPECT_EQ(health(*direct), KeyHealth::Ok);
    auto imp = make_provider(cfg("imp.json", ",\"service_account_impersonation_url\":\"" + srv.url() +
                                                 "/v1/projects/-/serviceAccounts/" + target +
                                                 ":generateAccessToken\""));
    EXPECT_TRUE(same(imp->unwrap(w.blob), kek));
    std::string stats = srv.control("{\"action\":\"stats\"}");
    EXPECT_NE(stats.find("\"sts_exchanges\": 2,"), std::string::npos) << stats;  // one each, then cached
    EXPECT_NE(stats.find("\"minted\": 1,"), std::string::npos) << stats;
    // Short-lived federated tokens: the next call exchanges again and meets the disabled provider.
    srv.control("{\"action\":\"sts_ttl\",\"value\":1}");
    srv.control("{\"action\":\"impersonated_ttl\",\"value\":1}");
    srv.control("{\"action\":\"revoke_tokens\"}");
    EXPECT_EQ(health(*direct), KeyHealth::Ok);
    EXPECT_EQ(health(*imp), KeyHealth::Ok);
    srv.control("{\"action\":\"provider\",\"value\":\"off\"}");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    for (KeyProvider* p : {direct.get(), imp.get()}) {
        KeyStatus s = p->status();
        EXPECT_EQ(s.health, KeyHealth::Revoked) << s.detail;
        EXPECT_NE(s.detail.find("invalid_grant"), std::string::npos) << s.detail;
        EXPECT_NE(s.detail.find("workload identity pool or provider"), std::string::npos) << s.detail;
        EXPECT_EQ(s.detail.find("eyJ"), std::string::npos) << s.detail;
    }
    srv.control("{\"action\":\"provider\",\"value\":\"on\"}");
    EXPECT_EQ(health(*direct), KeyHealth::Ok);
    // The federated principal without roles/iam.workloadIdentityUser: revoked.
    srv.control("{\"action\":\"workload_identity_user\",\"value\":\"off\"}");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    EXPECT_EQ(health(*imp), KeyHealth::Revoked);
    srv.control("{\"action\":\"workload_identity_user\",\"value\":\"on\"}");
    EXPECT_EQ(health(*imp), KeyHealth::Ok);
    // A subject token the issuer did not sign: invalid_grant, revoked.
    std::string good = cmk_test::slurp(subject);
    cmk_test::spit(subject, "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln\n");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    EXPECT_EQ(health(*direct), KeyHealth::Revoked);
    // A subject token that expired (the workload's token refresher stopped): STS would
    // answer invalid_grant, but this is an outage, judged before the exchange.
    srv.control("{\"action\":\"write_subject\",\"path\":\"" + subject + "\",\"ttl\":-60}");
    {
        KeyStatus e = direct->status();
        EXPECT_EQ(e.health, KeyHealth::Unavailable) << e.detail;
        EXPECT_NE(e.detail.find("expired"), std::string::npos) << e.detail;
        EXPECT_EQ(e.detail.find("eyJ"), std::string::npos) << e.detail;
    }
    // No subject token file, or an empty one: an outage that names the file.
    ::unlink(subject.c_str());
    KeyStatus s = direct->status();
    EXPECT_EQ(s.health, KeyHealth::Unavailable) << s.detail;
    EXPECT_NE(s.detail.find(subject), std::string::npos) << s.detail;
    cmk_test::spit(subject, "\n");
    s = direct->status();
    EXPECT_EQ(s.health, KeyHealth::Unavailable) << s.detail;
    EXPECT_NE(s.detail.find("is empty"), std::string::npos) << s.detail;
    cmk_test::spit(subject, good);
    EXPECT_EQ(health(*direct), KeyHealth::Ok);
    // An STS outage is an outage.
    srv.control("{\"action\":\"mode\",\"value\":\"error500\"}");
    std::this_thread::sleep_for(std::chrono::milliseconds(1100));
    EXPECT_EQ(unwrap_kind(*direct, w.blob), KmsErrorKind::Unavailable);
    srv.control("{\"action\":\"mode\",\"value\":\"normal\"}");
    EXPECT_TRUE(same(direct->unwrap(w.blob), kek));
}
