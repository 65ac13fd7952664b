// AWS KMS provider units: SigV4 against the published test suite vectors
// (test/data/aws_sigv4_vectors.txt), and the provider's configuration checks
// (region, key id, endpoint, credentials chain) that need no server.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pthread.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <thread>

#include <ctime>
#include <map>
#include <sstream>

#include "core/kms/aws_sigv4.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "core/kms/http.hpp"
#include "core/kms/aws.hpp"
#include "core/kms/aws_credentials.hpp"
#include "core/kms/aws_process.hpp"
#include "core/kms/kit.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "test_helpers.hpp"

namespace {

using cmk::aws::SigV4Request;

struct Vector {
    std::string name, req, body, token, creq, sts, authz;
};

std::vector<Vector> load_vectors() {
    std::string text = cmk_test::slurp(cmk_test::data_dir() + "/aws_sigv4_vectors.txt");
    std::vector<Vector> out;
    std::istringstream in(text);
    std::string line, section;
    Vector cur;
    auto flush = [&] {
        if (!cur.name.empty()) out.push_back(cur);
        cur = Vector{};
    };
    auto add = [](std::string& f, const std::string& l) {
        if (!f.empty()) f.push_back('\n');
        f += l;
    };
    while (std::getline(in, line)) {
        if (line.rfind("#", 0) == 0 && section.empty()) continue;
        if (line.rfind("== ", 0) == 0) {
            flush();
            cur.name = line.substr(3);
            section.clear();
            if (cur.name == "end") cur.name.clear();
            continue;
        }
        if (line.rfind("-- ", 0) == 0) {
            section = line.substr(3);
            continue;
        }
        if (section == "req") add(cur.req, line);
        if (section == "body") add(cur.body, line);
        if (section == "token") add(cur.token, line);
        if (section == "creq") add(cur.creq, line);
        if (section == "sts") add(cur.sts, line);
        if (section == "authz") add(cur.authz, line);
    }
    flush();
    return out;
}

// "METHOD PATH?QUERY HTTP/1.1" then "Name:value" lines.
SigV4Request parse_req(const Vector& v) {
    SigV4Request r;
    std::istringstream in(v.req);
    std::string line;
    std::getline(in, line);
    size_t a = line.find(' '), b = line.rfind(' ');
    r.method = line.substr(0, a);
    std::string target = line.substr(a + 1, b - a - 1);
    size_t q = target.find('?');
    r.path = target.substr(0, q);
    if (q != std::string::npos) r.query = target.substr(q + 1);
    while (std::getline(in, line)) {
        size_t c = line.find(':');
        r.headers.emplace_back(line.substr(0, c), line.substr(c + 1));
    }
    r.body = v.body;
    return r;
}

std::string header(const SigV4Request& r, const std::string& name) {
    for (const auto& kv : r.headers)
        if (kv.first == name) return kv.second;
    return "";
}

const char kAkid[] = "AKIDEXAMPLE";
const char kSecret[] = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const std::time_t kSuiteTime = 1440938160;  // 2015-08-30T12:36:00Z

}  // namespace

TEST(SigV4, VectorsLoad) {
    auto v = load_vectors();
    ASSERT_GE(v.size(), 9u) << "test/data/aws_sigv4_vectors.txt missing or damaged";
    std::map<std::string, bool> names;
    for (const auto& x : v) names[x.name] = true;
    for (const char* n : {"get-vanilla", "post-vanilla", "post-x-www-form-urlencoded",
                          "get-vanilla-query-order-key-case", "get-vanilla-with-session-token"})
        EXPECT_TRUE(names[n]) << n;
    EXPECT_EQ(cmk::aws::amz_date(kSuiteTime), "20150830T123600Z");
}

TEST(SigV4, CanonicalRequestStringToSignSignatureOfEveryVector) {
    for (const auto& v : load_vectors()) {
        SCOPED_TRACE(v.name);
        SigV4Request r = parse_req(v);
        std::string payload = header(r, "X-Amz-Content-Sha256");
        if (payload.empty()) payload = cmk::aws::sha256_hex(r.body);
        std::string creq = cmk::aws::canonical_request(r, payload);
        EXPECT_EQ(creq, v.creq);
        std::string scope = cmk::aws::credential_scope("20150830", "us-east-1", "service");
        std::string sts = cmk::aws::string_to_sign("20150830T123600Z", scope, creq);
        EXPECT_EQ(sts, v.sts);
        std::string sig =
            cmk::aws::signature(cmk::http::Secret(kSecret), "20150830", "us-east-1", "service", sts);
        EXPECT_NE(v.authz.find("Signature=" + sig), std::string::npos) << sig;
    }
}

// sign() must add exactly what the suite expects: X-Amz-Date from the clock given, the
// session token header for temporary credentials, and the Authorization header.
TEST(SigV4, SignAddsDateTokenAndAuthorization) {
    for (const auto& v : load_vectors()) {
        SCOPED_TRACE(v.name);
        SigV4Request r = parse_req(v);
        std::vector<std::pair<std::string, std::string>> kept;
        for (const auto& kv : r.headers)
            if (kv.first != "X-Amz-Date" && kv.first != "X-Amz-Security-Token") kept.push_back(kv);
        r.headers = kept;
        cmk::aws::Credentials c;
        c.access_key_id = kAkid;
        c.secret_access_key = cmk::http::Secret(kSecret);
        if (!v.token.empty()) c.session_token = cmk::http::Secret(v.token);
        cmk::aws::sign(r, c, "us-east-1", "service", kSuiteTime);
        EXPECT_EQ(header(r, "Authorization"), v.authz);
        EXPECT_EQ(header(r, "X-Amz-Date"), "20150830T123600Z");
        EXPECT_EQ(header(r, "X-Amz-Security-Token"), v.token);
    }
}

TEST(SigV4, AnyChangeChangesTheSignature) {
    auto sign_with = [](const std::string& body, const std::string& target, const std::string& secret) {
        SigV4Request r;
        r.method = "POST";
        r.headers = {{"Host", "kms.us-east-1.amazonaws.com"},
                     {"Content-Type", "application/x-amz-json-1.1"},
                     {"X-Amz-Target", target}};
        r.body = body;
        cmk::aws::Credentials c;
        c.access_key_id = kAkid;
        c.secret_access_key = cmk::http::Secret(secret);
        cmk::aws::sign(r, c, "us-east-1", "kms", kSuiteTime);
        return header(r, "Authorization");
    };
    std::string base = sign_with("{\"KeyId\":\"k\"}", "TrentService.DescribeKey", kSecret);
    EXPECT_NE(base.find("SignedHeaders=content-type;host;x-amz-date;x-amz-target,"), std::string::npos)
        << base;
    EXPECT_NE(base, sign_with("{\"KeyId\":\"j\"}", "TrentService.DescribeKey", kSecret));
    EXPECT_NE(base, sign_with("{\"KeyId\":\"k\"}", "TrentService.Decrypt", kSecret));
    EXPECT_NE(base, sign_with("{\"KeyId\":\"k\"}", "TrentService.DescribeKey", "other"));
}

// ------------------------------------------------------------------ configuration

namespace {

using cmk_test::EnvGuard;

// An environment with no AWS credentials anywhere (no files, no IMDS).
void clean_aws_env(EnvGuard& g, const cmk_test::TempDir& d) {
    for (const char* n : {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                          "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN",
                          "AWS_EC2_METADATA_SERVICE_ENDPOINT"})
        g.unset(n);
    g.set("AWS_SHARED_CREDENTIALS_FILE", d.sub("no-credentials"));
    g.set("AWS_CONFIG_FILE", d.sub("no-config"));
    g.set("AWS_EC2_METADATA_DISABLED", "true");
}

cmk::KmsError config_error_of(const cmk::KeyConfig& cfg) {
    try {
        cmk::make_provider(cfg);
    } catch (const cmk::KmsError& e) {
        return e;
    }
    return cmk::KmsError(cmk::KmsErrorKind::Unavailable, "(no error)");
}

const char kKeyUuid[] = "1234abcd-12ab-34cd-56ef-1234567890ab";

// A clean environment whose only credentials are AWS_ACCESS_KEY_ID / _SECRET_ACCESS_KEY.
void env_with_keys(EnvGuard& g, const cmk_test::TempDir& d) {
    clean_aws_env(g, d);
    g.set("AWS_ACCESS_KEY_ID", "AKIDTEST");
    g.set("AWS_SECRET_ACCESS_KEY", "secret");
}

// A configuration error of one line that starts with the field's name.
void expect_config(const cmk::KmsError& e, const std::string& field) {
    EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(field + ":", 0), 0u) << e.what();
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
}

}  // namespace

TEST(AwsConfig, RegionAndKeyIdFormats) {
    for (const char* r : {"us-east-1", "eu-west-3", "ap-southeast-2", "us-gov-west-1", "cn-north-1",
                          "us-iso-east-1", "ca-central-1", "me-south-1"})
        EXPECT_TRUE(cmk::aws::valid_region(r)) << r;
    for (const char* r : {"", "us-east", "useast1", "US-EAST-1", "us-east-1a", "mars-east-1", "us-middle-1",
                          "us-east-100", "us_east_1"})
        EXPECT_FALSE(cmk::aws::valid_region(r)) << r;
    std::string region;
    EXPECT_TRUE(cmk::aws::valid_key_id(kKeyUuid));
    EXPECT_TRUE(cmk::aws::valid_key_id("mrk-1234abcd12ab34cd56ef1234567890ab"));
    EXPECT_TRUE(cmk::aws::valid_key_id("alias/cmk_lakebase-prod/db1"));
    EXPECT_TRUE(cmk::aws::valid_key_id("arn:aws:kms:eu-west-1:111122223333:alias/prod", &region));
    EXPECT_EQ(region, "eu-west-1");
    EXPECT_TRUE(cmk::aws::valid_key_id(
        std::string("arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/") + kKeyUuid, &region));
    EXPECT_EQ(region, "us-gov-west-1");
    for (const char* k : {"", "alias/", "alias/bad name", "1234", "arn:aws:kms:us-east-1:1111:key/x",
                          "arn:aws:s3:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                          "arn:aws:kms:us-east-1:111122223333:key/not-a-uuid", "mrk-123"})
        EXPECT_FALSE(cmk::aws::valid_key_id(k)) << k;
}

TEST(AwsConfig, IniAndErrorType) {
    auto ini = cmk::aws::parse_ini(
        "# comment\n[default]\naws_access_key_id = AKID1\n AWS_Secret_Access_Key=s1 \n; c\n"
        "[profile dev]\nregion = eu-west-1\nrole_arn=arn:aws:iam::1:role/r\n");
    EXPECT_EQ(ini["default"]["aws_access_key_id"], "AKID1");
    EXPECT_EQ(ini["default"]["aws_secret_access_key"], "s1");
    EXPECT_EQ(ini["profile dev"]["region"], "eu-west-1");
    EXPECT_EQ(cmk::aws::error_type("com.amazonaws.kms#NotFoundException"), "NotFoundException");
    EXPECT_EQ(cmk::aws::error_type("AccessDeniedException:http://internal.amazon.com/"),
              "AccessDeniedException");
    EXPECT_EQ(cmk::aws::error_type("ThrottlingException"), "ThrottlingException");
}

// Each bad configuration fails at configuration time with an error naming the field.
TEST(AwsConfig, BadConfigurationNamesTheField) {
    cmk_test::TempDir d;
    EnvGuard g;
    env_with_keys(g, d);
    auto cfg = [](std::map<std::string, std::string> o, std::string key = kKeyUuid) {
        return cmk::KeyConfig{"aws", key, std::move(o)};
    };
    EXPECT_NO_THROW(cmk::make_provider(cfg({{"region", "us-east-1"}})));
    expect_config(config_error_of(cfg({{"region", "us-east-one"}})), "region");
    expect_config(config_error_of(cfg({})), "region");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}}, "not/a key")), "key_id");
    expect_config(config_error_of(cfg({{"region", "eu-west-1"}},
                                      std::string("arn:aws:kms:us-east-1:111122223333:key/") + kKeyUuid)),
                  "region");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"ca_file", d.sub("missing.pem")}})),
                  "ca_file");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"endpoint", "http://kms.example.com"}})),
                  "endpoint");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"endpoint", "ftp://x"}})), "endpoint");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"regoin", "us-east-1"}})), "regoin");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"timeout_ms", "soon"}})), "timeout_ms");
    g.unset("AWS_SECRET_ACCESS_KEY");
    cmk::KmsError e = config_error_of(cfg({{"region", "us-east-1"}}));
    expect_config(e, "credentials");
    EXPECT_NE(std::string(e.what()).find("AWS_SECRET_ACCESS_KEY"), std::string::npos) << e.what();
    g.unset("AWS_ACCESS_KEY_ID");
    e = config_error_of(cfg({{"region", "us-east-1"}}));
    expect_config(e, "credentials");
    EXPECT_NE(std::string(e.what()).find("no AWS credentials found"), std::string::npos) << e.what();
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"profile", "prod"}})), "profile");
    expect_config(config_error_of(cfg({{"region", "us-east-1"}, {"web_identity_token_file", d.sub("nope")}})),
                  "web_identity_token_file");
    cmk_test::spit(d.sub("token"), "eyJ.test.token");
    expect_config(
        config_error_of(cfg({{"region", "us-east-1"}, {"web_identity_token_file", d.sub("token")}})),
        "role_arn");
}

TEST(AwsConfig, SharedCredentialsProfiles) {
    cmk_test::TempDir d;
    EnvGuard g;
    clean_aws_env(g, d);
    cmk_test::spit(d.sub("credentials"),
                   "[default]\naws_access_key_id=A1\naws_secret_access_key=S1\n"
                   "[half]\naws_access_key_id=A2\n");
    cmk_test::spit(d.sub("config"),
                   "[profile chained]\nrole_arn=arn:aws:iam::111122223333:role/r\nsource_profile=default\n"
                   "[profile cfgonly]\naws_access_key_id=A3\naws_secret_access_key=S3\n");
    g.set("AWS_SHARED_CREDENTIALS_FILE", d.sub("credentials"));
    g.set("AWS_CONFIG_FILE", d.sub("config"));
    cmk::KeyConfig c{"aws", kKeyUuid, {{"region", "us-east-1"}}};
    EXPECT_NO_THROW(cmk::make_provider(c));  // [default]
    c.options["profile"] = "cfgonly";
    EXPECT_NO_THROW(cmk::make_provider(c));
    c.options["profile"] = "half";
    cmk::KmsError e = config_error_of(c);
    EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config);
    EXPECT_NE(std::string(e.what()).find("no aws_secret_access_key"), std::string::npos) << e.what();
    c.options["profile"] = "chained";  // role_arn + source_profile: an AssumeRole chain
    EXPECT_NO_THROW(cmk::make_provider(c));
    c.options["profile"] = "absent";
    e = config_error_of(c);
    EXPECT_EQ(std::string(e.what()).rfind("profile: no credentials for profile \"absent\"", 0), 0u)
        << e.what();
}

// The factory's transport seam (what fuzz/fuzz_answers.cpp drives): signed JSON 1.1
// requests and the reading of KMS's answers, without a server.
TEST(AwsCanned, SignedRequestsAndAnswers) {
    cmk_test::TempDir d;
    EnvGuard g;
    env_with_keys(g, d);
    cmk::KeyConfig c{"aws", kKeyUuid, {{"region", "eu-west-3"}}};
    cmk::SecureBytes kek = cmk::random_key(32);
    std::string target, auth, host, body;
    long status = 200;
    std::string answer;
    auto p = cmk::aws::make_aws_provider(c, [&](const cmk::http::Request& r) {
        for (const auto& h : r.headers) {
            if (h.first == "X-Amz-Target") target = h.second;
            if (h.first == "Authorization") auth = h.second;
            if (h.first == "Host") host = h.second;
        }
        EXPECT_EQ(r.url, "https://kms.eu-west-3.amazonaws.com/");
        body = r.body;
        cmk::http::Response a;
        a.status = status;
        a.headers["x-amzn-requestid"] = "rid-1";
        a.body = answer;
        return a;
    });
    answer = "{\"CiphertextBlob\":\"QUJD\",\"KeyId\":\"arn:aws:kms:eu-west-3:111122223333:key/" +
             std::string(kKeyUuid) + "\"}";
    cmk::WrapResult w = p->wrap(kek);
    EXPECT_EQ(std::string(w.blob.begin(), w.blob.end()), "ABC");
    EXPECT_EQ(w.request_id, "rid-1");
    EXPECT_EQ(target, "TrentService.Encrypt");
    EXPECT_EQ(host, "kms.eu-west-3.amazonaws.com");
    EXPECT_EQ(auth.rfind("AWS4-HMAC-SHA256 Credential=AKIDTEST/", 0), 0u) << auth;
    EXPECT_NE(body.find("\"EncryptionContext\":{\"cmk_lakebase\":\"kek\"}"), std::string::npos) << body;
    answer = "{\"Plaintext\":\"" + cmk::base64_encode(kek.data(), kek.size()) + "\"}";
    cmk::SecureBytes out = p->unwrap(w.blob);
    EXPECT_EQ(target, "TrentService.Decrypt");
    EXPECT_TRUE(out.size() == kek.size() && cmk::ct_equal(out.data(), kek.data(), kek.size()));
    answer = "{\"KeyMetadata\":{\"KeyState\":\"Disabled\",\"KeyUsage\":\"ENCRYPT_DECRYPT\"}}";
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Revoked);
    EXPECT_EQ(target, "TrentService.DescribeKey");
    status = 400;
    answer = "{\"__type\":\"com.amazonaws.kms#NotFoundException\",\"message\":\"Key does not exist\"}";
    try {
        p->unwrap(w.blob);
        ADD_FAILURE() << "unwrap of a missing key succeeded";
    } catch (const cmk::KmsError& e) {
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Revoked);
        EXPECT_NE(
            std::string(e.what()).find("HTTP 400 NotFoundException: Key does not exist (request id rid-1)"),
            std::string::npos)
            << e.what();
    }
}

// ------------------------------------------------------------------ against the loopback server

namespace {

// test/kms/aws_kms_server.py started for one test (it verifies every signature with
// botocore); stops with us (parent-pid check) or after 120 s at the latest.
class AwsServer {
public:
    explicit AwsServer(const std::vector<std::string>& extra = {}) {
        std::string script = cmk_test::data_dir() + "/../kms/aws_kms_server.py";
        port_file_ = dir_.sub("port");
        std::vector<std::string> args = {"/usr/bin/python3", script,
                                         "--port-file",      port_file_,
                                         "--cred",           "AKIDTEST:secretTEST",
                                         "--parent-pid",     std::to_string(getpid()),
                                         "--lifetime",       "120"};
        args.insert(args.end(), extra.begin(), extra.end());
        pid_ = fork();
        if (pid_ == 0) {
            std::vector<char*> argv;
            for (auto& a : args) argv.push_back(&a[0]);
            argv.push_back(nullptr);
            int fd = ::open(dir_.sub("server.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd >= 0) {
                dup2(fd, 1);
                dup2(fd, 2);
            }
            execv(argv[0], argv.data());
            _exit(127);
        }
        for (int i = 0; i < 100 && port_.empty(); ++i) {
            std::string p = cmk_test::slurp(port_file_);
            if (!p.empty()) port_ = p.substr(0, p.find('\n'));
            if (port_.empty()) usleep(100000);
        }
    }
    ~AwsServer() {
        if (pid_ > 0) {
            kill(pid_, SIGTERM);
            waitpid(pid_, nullptr, 0);
        }
    }
    bool up() const { return !port_.empty(); }
    std::string log() const { return cmk_test::slurp(dir_.sub("server.log")); }
    std::string url() const { return "http://127.0.0.1:" + port_; }
    std::string control(const std::string& op, const std::string& json) const {
        cmk::http::Request r;
        r.url = url() + "/_test/" + op;
        r.method = op == "stats" ? "GET" : "POST";
        r.body = json;
        r.headers = {{"Content-Type", "application/json"}};
        cmk::http::Response resp = cmk::http::perform(r);
        EXPECT_EQ(resp.status, 200) << op << " " << resp.body;
        return resp.body;
    }
    std::string create_key(const std::string& alias) const {
        std::string out = control("create_key", "{\"alias\":\"" + alias + "\"}");
        size_t a = out.find("\"KeyId\": \"") + 10;
        return out.substr(a, 36);
    }

private:
    cmk_test::TempDir dir_;
    std::string port_file_, port_;
    pid_t pid_ = -1;
};

bool have_botocore() {
    return ::system("/usr/bin/python3 -c 'import botocore.auth, cryptography' >/dev/null 2>&1") == 0;
}

#define REQUIRE_SERVER(s)                                                                   \
    do {                                                                                    \
        if (!have_botocore()) {                                                             \
            if (std::getenv("CMK_REQUIRE_KMS_TESTS")) FAIL() << "python3-botocore missing"; \
            GTEST_SKIP() << "python3-botocore not installed";                               \
        }                                                                                   \
        ASSERT_TRUE((s).up()) << (s).log();                                                 \
    } while (0)

cmk::KmsErrorKind kind_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const cmk::KmsError& e) {
        return e.kind;
    }
    ADD_FAILURE() << "no KmsError thrown";
    return cmk::KmsErrorKind::Config;
}

cmk::SecureBytes test_kek() {
    std::vector<uint8_t> r = cmk::random_bytes(32);
    return cmk::SecureBytes(r.data(), r.size());
}

}  // namespace

class AwsServerTest : public ::testing::Test {
protected:
    void SetUp() override {
        clean_aws_env(env_, tmp_);
        env_.set("AWS_ACCESS_KEY_ID", "AKIDTEST");
        env_.set("AWS_SECRET_ACCESS_KEY", "secretTEST");
    }
    cmk::KeyConfig config(const AwsServer& s, const std::string& key,
                          std::map<std::string, std::string> extra = {}) {
        std::map<std::string, std::string> o = {
            {"region", "us-east-1"}, {"endpoint", s.url()}, {"timeout_ms", "1500"}, {"retries", "2"}};
        for (auto& kv : extra) o[kv.first] = kv.second;
        return cmk::KeyConfig{"aws", key, o};
    }
    cmk_test::TempDir tmp_;
    EnvGuard env_;
};

TEST_F(AwsServerTest, WrapUnwrapStatusAndEveryKeyState) {
    AwsServer s({"--stall-seconds", "4"});
    REQUIRE_SERVER(s);
    std::string kid = s.create_key("alias/unit");
    auto p = cmk::make_provider(config(s, "alias/unit"));
    cmk::SecureBytes kek = test_kek();
    cmk::WrapResult w = p->wrap(kek);
    EXPECT_GT(w.blob.size(), 32u);
    cmk::SecureBytes back = p->unwrap(w.blob);
    ASSERT_EQ(back.size(), kek.size());
    EXPECT_TRUE(cmk::ct_equal(back.data(), kek.data(), kek.size()));
    cmk::KeyStatus st = p->status();
    EXPECT_EQ(st.health, cmk::KeyHealth::Ok) << st.detail;
    EXPECT_EQ(st.state, "Enabled");
    EXPECT_FALSE(st.request_id.empty());

    // Another encryption context cannot unwrap: the context binds the blob.
    auto other = cmk::make_provider(config(s, "alias/unit", {{"encryption_context", "cluster=other"}}));
    EXPECT_EQ(kind_of([&] { other->unwrap(w.blob); }), cmk::KmsErrorKind::Revoked);

    for (const char* state : {"Disabled", "PendingDeletion", "PendingImport"}) {
        SCOPED_TRACE(state);
        s.control("set", "{\"key\":\"" + kid + "\",\"state\":\"" + state + "\"}");
        st = p->status();
        EXPECT_EQ(st.health, cmk::KeyHealth::Revoked) << st.detail;
        EXPECT_EQ(st.state, state);
        EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), cmk::KmsErrorKind::Revoked);
    }
    // DeletionDate is the peer's number: a date is named, one no integer holds is left out
    // (it once went through an out-of-range double conversion; fuzz_answers found it).
    s.control("set", "{\"key\":\"" + kid + "\",\"state\":\"PendingDeletion\",\"deletion\":1700604800.5}");
    st = p->status();
    EXPECT_EQ(st.health, cmk::KeyHealth::Revoked) << st.detail;
    EXPECT_NE(st.detail.find("(deletion scheduled for epoch 1700604800)"), std::string::npos) << st.detail;
    for (const char* when : {"1e300", "-1e300", "9.3e18"}) {
        SCOPED_TRACE(when);
        s.control("set", "{\"key\":\"" + kid + "\",\"deletion\":" + when + "}");
        st = p->status();
        EXPECT_EQ(st.health, cmk::KeyHealth::Revoked) << st.detail;
        EXPECT_EQ(st.detail.find("deletion scheduled"), std::string::npos) << st.detail;
    }
    s.control("set", "{\"key\":\"" + kid + "\",\"state\":\"Enabled\"}");
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);

    // A revoked grant/policy on Decrypt only: DescribeKey still says Enabled, the unwrap
    // probe catches it.
    s.control("set", "{\"key\":\"" + kid + "\",\"deny\":[\"Decrypt\"]}");
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), cmk::KmsErrorKind::Revoked);
    s.control("set", "{\"key\":\"" + kid + "\",\"deny\":[\"Decrypt\",\"DescribeKey\",\"Encrypt\"]}");
    EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Revoked);
    s.control("set", "{\"key\":\"" + kid + "\",\"deny\":[]}");

    for (const char* mode : {"500", "throttle", "unavailable", "stall"}) {
        SCOPED_TRACE(mode);
        s.control("fail", std::string("{\"mode\":\"") + mode + "\"}");
        EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Unavailable);
        EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), cmk::KmsErrorKind::Unavailable);
    }
    s.control("fail", "{\"mode\":\"none\"}");
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);

    std::string stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"bad_signatures\": 0,"), std::string::npos) << stats;
    EXPECT_EQ(stats.find("\"verified\": 0,"), std::string::npos) << stats;

    s.control("set", "{\"key\":\"" + kid + "\",\"destroy\":true}");
    EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Revoked);
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), cmk::KmsErrorKind::Revoked);
}

// A wrong secret makes the server's botocore check fail: the request is refused, the
// provider reports unavailable (not revoked: it is our signature, not the key), and
// the server counted the bad signature.
TEST_F(AwsServerTest, BadSignatureIsRefused) {
    AwsServer s;
    REQUIRE_SERVER(s);
    s.create_key("alias/sig");
    env_.set("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    auto p = cmk::make_provider(config(s, "alias/sig"));
    EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Unavailable);
    std::string stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"verified\": 0,"), std::string::npos) << stats;
    EXPECT_EQ(stats.find("\"bad_signatures\": 0,"), std::string::npos) << stats;
    EXPECT_NE(stats.find("InvalidSignatureException"), std::string::npos) << stats;
}

TEST_F(AwsServerTest, WebIdentityAndImdsCredentials) {
    AwsServer s({"--role-arn", "arn:aws:iam::111122223333:role/cmk", "--web-identity-token", "eyJ.jwt.sig",
                 "--imds-role", "cmk-instance"});
    REQUIRE_SERVER(s);
    s.create_key("alias/temp");
    env_.unset("AWS_ACCESS_KEY_ID");
    env_.unset("AWS_SECRET_ACCESS_KEY");
    cmk_test::spit(tmp_.sub("token"), "eyJ.jwt.sig\n");
    auto p = cmk::make_provider(config(s, "alias/temp",
                                       {{"web_identity_token_file", tmp_.sub("token")},
                                        {"role_arn", "arn:aws:iam::111122223333:role/cmk"},
                                        {"sts_endpoint", s.url()}}));
    cmk::SecureBytes kek = test_kek();
    cmk::WrapResult w = p->wrap(kek);
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    std::string stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"sts\": 1,"), std::string::npos) << stats;  // cached, asked once
    auto wrong_role = cmk::make_provider(config(s, "alias/temp",
                                                {{"web_identity_token_file", tmp_.sub("token")},
                                                 {"role_arn", "arn:aws:iam::111122223333:role/x"},
                                                 {"sts_endpoint", s.url()}}));
    EXPECT_EQ(kind_of([&] { wrong_role->status(); }), cmk::KmsErrorKind::Revoked);

    env_.unset("AWS_EC2_METADATA_DISABLED");
    env_.set("AWS_EC2_METADATA_SERVICE_ENDPOINT", s.url());
    auto imds = cmk::make_provider(config(s, "alias/temp"));
    cmk::SecureBytes back = imds->unwrap(w.blob);
    EXPECT_TRUE(cmk::ct_equal(back.data(), kek.data(), kek.size()));
    stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"imds\": 1"), std::string::npos) << stats;
    EXPECT_NE(stats.find("\"bad_signatures\": 0,"), std::string::npos) << stats;
}

// ------------------------------------------------------------------ STS AssumeRole (issue 19)

namespace {

// AWS's STS API reference example of AssumeRole: RoleArn .../role/demo, session testAR,
// 1800 s, ExternalId 123ABC.
cmk::aws::RoleHop reference_hop() {
    cmk::aws::RoleHop h;
    h.role_arn = "arn:aws:iam::123456789012:role/demo";
    h.session_name = "testAR";
    h.duration_s = 1800;
    h.external_id = "123ABC";
    return h;
}

}  // namespace

// The request body is what botocore's own STS serializer produces for the same
// parameters, and the SigV4 signature over it (service "sts") is botocore's
// (SigV4Auth, computed once with python3-botocore; see the values below).
TEST(AwsAssumeRole, RequestAndSignatureMatchBotocore) {
    cmk::aws::Endpoint sts{"https://sts.us-east-1.amazonaws.com/", "sts.us-east-1.amazonaws.com"};
    cmk::aws::SigV4Request r = cmk::aws::assume_role_request(sts, reference_hop());
    EXPECT_EQ(r.body,
              "Action=AssumeRole&Version=2011-06-15&RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fdemo"
              "&RoleSessionName=testAR&DurationSeconds=1800&ExternalId=123ABC");
    cmk::aws::Credentials c;
    c.access_key_id = kAkid;
    c.secret_access_key = cmk::http::Secret(kSecret);
    cmk::aws::SigV4Request plain = r;
    cmk::aws::sign(plain, c, "us-east-1", "sts", kSuiteTime);
    EXPECT_EQ(header(plain, "Authorization"),
              "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sts/aws4_request, "
              "SignedHeaders=content-type;host;x-amz-date, "
              "Signature=305186f28cd56dc776f03dd244ef40db91fb1c7e566bec86a05edcc9ebd250ce");
    // From temporary base credentials (IMDS, web identity, a chained role): the token is signed.
    c.access_key_id = "AKIDEXAMPLE";
    c.session_token = cmk::http::Secret("session-token-EXAMPLE");
    cmk::aws::sign(r, c, "us-east-1", "sts", kSuiteTime);
    EXPECT_EQ(header(r, "Authorization"),
              "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/sts/aws4_request, "
              "SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, "
              "Signature=50c768d811f6e0a05c17152ca87f3b3f4c769732c36654fb6f340070892cb089");
    // No ExternalId: the parameter is left out, not sent empty.
    cmk::aws::RoleHop h = reference_hop();
    h.external_id.clear();
    EXPECT_EQ(cmk::aws::assume_role_body(h).find("ExternalId"), std::string::npos);
}

// The answer in the shape of the API reference's example response (the session token
// wrapped over lines as printed there).
TEST(AwsAssumeRole, ParsesTheReferenceAnswer) {
    const std::string xml =
        "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n"
        "  <AssumeRoleResult>\n"
        "  <SourceIdentity>Alice</SourceIdentity>\n"
        "    <AssumedRoleUser>\n"
        "      <Arn>arn:aws:sts::123456789012:assumed-role/demo/TestAR</Arn>\n"
        "      <AssumedRoleId>ARO123EXAMPLE123:TestAR</AssumedRoleId>\n"
        "    </AssumedRoleUser>\n"
        "    <Credentials>\n"
        "      <AccessKeyId>ASIAIOSFODNN7EXAMPLE</AccessKeyId>\n"
        "      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>\n"
        "      <SessionToken>\n"
        "       AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQW\n"
        "      </SessionToken>\n"
        "      <Expiration>2019-11-09T13:34:41Z</Expiration>\n"
        "    </Credentials>\n"
        "    <PackedPolicySize>6</PackedPolicySize>\n"
        "  </AssumeRoleResult>\n"
        "  <ResponseMetadata>\n"
        "    <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>\n"
        "  </ResponseMetadata>\n"
        "</AssumeRoleResponse>\n";
    cmk::aws::AssumedRole a = cmk::aws::parse_assumed_role(xml, "test");
    EXPECT_EQ(a.creds.access_key_id, "ASIAIOSFODNN7EXAMPLE");
    EXPECT_EQ(a.creds.secret_access_key.str(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY");
    EXPECT_EQ(a.creds.session_token.str(), "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQW");
    EXPECT_EQ(a.creds.expiration, 1573306481);  // 2019-11-09T13:34:41Z
    EXPECT_EQ(a.assumed_role_arn, "arn:aws:sts::123456789012:assumed-role/demo/TestAR");
    EXPECT_EQ(a.request_id, "c6104cbe-af31-11e0-8154-cbc7ccf896c7");

    std::string no_creds = xml;
    no_creds.erase(no_creds.find("<SessionToken>"), no_creds.find("</SessionToken>") + 15 - no_creds.find("<SessionToken>"));
    EXPECT_EQ(kind_of([&] { cmk::aws::parse_assumed_role(no_creds, "test"); }),
              cmk::KmsErrorKind::Unavailable);
    std::string huge = xml + std::string(70000, ' ');
    EXPECT_EQ(kind_of([&] { cmk::aws::parse_assumed_role(huge, "test"); }), cmk::KmsErrorKind::Unavailable);
}

// STS's errors: a refused trust (AccessDenied) is a revocation, transport trouble is not.
TEST(AwsAssumeRole, ErrorMapping) {
    auto err = [](long status, const std::string& code) {
        return cmk::aws::sts_error(status,
                                   "<ErrorResponse><Error><Type>Sender</Type><Code>" + code +
                                       "</Code><Message>m</Message></Error><RequestId>r-1</RequestId>"
                                       "</ErrorResponse>",
                                   "STS AssumeRole", "assume_role_arn", "");
    };
    EXPECT_EQ(err(403, "AccessDenied").kind, cmk::KmsErrorKind::Revoked);
    EXPECT_NE(std::string(err(403, "AccessDenied").what()).find("(request id r-1)"), std::string::npos);
    EXPECT_EQ(err(403, "InvalidClientTokenId").kind, cmk::KmsErrorKind::Revoked);
    EXPECT_EQ(err(400, "ValidationError").kind, cmk::KmsErrorKind::Config);
    EXPECT_EQ(std::string(err(400, "ValidationError").what()).rfind("assume_role_arn:", 0), 0u);
    EXPECT_EQ(err(400, "Throttling").kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_EQ(err(403, "SignatureDoesNotMatch").kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_EQ(err(500, "InternalFailure").kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_EQ(err(503, "AccessDenied").kind, cmk::KmsErrorKind::Unavailable);
    EXPECT_EQ(cmk::aws::sts_error(502, "<html>bad gateway</html>", "STS", "f", "").kind,
              cmk::KmsErrorKind::Unavailable);
}

// Every option of the role is checked at configuration time: one line naming the field.
TEST(AwsAssumeRole, ConfigurationNamesTheField) {
    cmk_test::TempDir d;
    EnvGuard g;
    env_with_keys(g, d);
    auto cfg = [](std::map<std::string, std::string> o) {
        o["region"] = "us-east-1";
        return cmk::KeyConfig{"aws", kKeyUuid, std::move(o)};
    };
    const std::string arn = "arn:aws:iam::111122223333:role/customer-kms";
    EXPECT_NO_THROW(cmk::make_provider(cfg({{"assume_role_arn", arn}, {"external_id", "ext-1234"}})));
    EXPECT_NO_THROW(cmk::make_provider(cfg({{"assume_role_arn", "arn:aws-cn:iam::111122223333:role/a/b/c"},
                                            {"assume_role_session_name", "db-7@eu.west"},
                                            {"assume_role_duration", "43200"}})));
    auto expect_field = [&](std::map<std::string, std::string> o, const std::string& field) {
        expect_config(config_error_of(cfg(std::move(o))), field);
    };
    for (const char* bad : {"arn:aws:iam::1111:role/x", "arn:aws:iam::111122223333:user/x",
                            "arn:aws:sts::111122223333:role/x", "role/x", "arn:aws:iam::111122223333:role/"})
        expect_field({{"assume_role_arn", bad}}, "assume_role_arn");
    expect_field({{"assume_role_arn", arn}, {"external_id", "x"}}, "external_id");
    expect_field({{"assume_role_arn", arn}, {"external_id", "has space"}}, "external_id");
    expect_field({{"assume_role_arn", arn}, {"assume_role_session_name", "a"}}, "assume_role_session_name");
    expect_field({{"assume_role_arn", arn}, {"assume_role_session_name", "a/b"}}, "assume_role_session_name");
    expect_field({{"assume_role_arn", arn}, {"assume_role_duration", "899"}}, "assume_role_duration");
    expect_field({{"assume_role_arn", arn}, {"assume_role_duration", "1h"}}, "assume_role_duration");
    expect_field({{"external_id", "ext-1234"}}, "external_id");
    // role_arn is the web identity token's role: alone it would be silently unused.
    expect_field({{"role_arn", arn}}, "role_arn");

    // Profiles: role_arn chains and what is refused.
    cmk_test::spit(d.sub("credentials"), "[base]\naws_access_key_id=A1\naws_secret_access_key=S1\n");
    cmk_test::spit(d.sub("config"),
                   "[profile customer]\nrole_arn=" + arn + "\nsource_profile=middle\nexternal_id=ext-1234\n"
                   "[profile middle]\nrole_arn=arn:aws:iam::444455556666:role/hop\nsource_profile=base\n"
                   "[profile loop1]\nrole_arn=" + arn + "\nsource_profile=loop2\n"
                   "[profile loop2]\nrole_arn=" + arn + "\nsource_profile=loop1\n"
                   "[profile process]\ncredential_process=/usr/bin/get-creds\n"
                   "[profile viaproc]\nrole_arn=" + arn + "\nsource_profile=process\n"
                   "[profile ecs]\nrole_arn=" + arn + "\ncredential_source=EcsContainer\n"
                   "[profile envsrc]\nrole_arn=" + arn + "\ncredential_source=Environment\n"
                   "[profile badext]\nrole_arn=" + arn + "\nsource_profile=base\nexternal_id=x\n"
                   "[profile dangling]\nrole_arn=" + arn + "\nsource_profile=nobody\n");
    g.set("AWS_SHARED_CREDENTIALS_FILE", d.sub("credentials"));
    g.set("AWS_CONFIG_FILE", d.sub("config"));
    g.unset("AWS_ACCESS_KEY_ID");
    g.unset("AWS_SECRET_ACCESS_KEY");
    EXPECT_NO_THROW(cmk::make_provider(cfg({{"profile", "customer"}})));
    auto p = cmk::make_provider(cfg({{"profile", "customer"}}));
    EXPECT_EQ(p->identity(), "role " + arn);  // before any call: the role it will assume
    auto expect_profile = [&](const std::string& prof, const std::string& words) {
        cmk::KmsError e = config_error_of(cfg({{"profile", prof}}));
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config) << e.what();
        EXPECT_EQ(std::string(e.what()).rfind("profile: profile \"", 0), 0u) << e.what();
        EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    };
    expect_profile("loop1", "loop");
    // credential_process is checked at configuration time: the helper must exist.
    expect_profile("process", "credential_process: cannot use \"/usr/bin/get-creds\"");
    // Also as the source of a role chain: the error names the profile that has it.
    expect_profile("viaproc", "profile \"process\" credential_process");
    expect_profile("ecs", "EcsContainer");
    expect_profile("envsrc", "AWS_ACCESS_KEY_ID");
    expect_profile("badext", "external_id");
    expect_profile("dangling", "nobody");
}

// ---- credential_process ---------------------------------------------------------------

std::string write_helper(const cmk_test::TempDir& d, const std::string& name, const std::string& body) {
    std::string path = d.sub(name);
    cmk_test::spit(path, "#!/bin/sh\n" + body);
    ::chmod(path.c_str(), 0700);
    return path;
}

cmk::KmsError process_error(const std::vector<std::string>& argv, long timeout_ms = 3000) {
    try {
        std::string out = cmk::aws::run_credential_process(argv, timeout_ms, "credential_process of profile \"p\"");
        cmk::aws::parse_process_output(out, "credential_process of profile \"p\"");
    } catch (const cmk::KmsError& e) {
        return e;
    }
    ADD_FAILURE() << "no error";
    return cmk::KmsError(cmk::KmsErrorKind::Revoked, "no error");
}

// The one time parser of the providers (kit::parse_utc_time): STS, IMDS, a
// credential_process helper and Google's generateAccessToken write these forms.
TEST(KitTime, Rfc3339Forms) {
    std::time_t t = 0;
    ASSERT_TRUE(cmk::kit::parse_utc_time("2026-12-06T18:00:00Z", &t));
    EXPECT_EQ(t, 1796580000);
    ASSERT_TRUE(cmk::kit::parse_utc_time("2014-10-02T15:01:23.045123456Z", &t));
    EXPECT_EQ(t, 1412262083);
    ASSERT_TRUE(cmk::kit::parse_utc_time("2026-12-06T19:30:00+01:30", &t));
    EXPECT_EQ(t, 1796580000);
    ASSERT_TRUE(cmk::kit::parse_utc_time("2026-12-06T16:00:00-02:00", &t));
    EXPECT_EQ(t, 1796580000);
    for (const char* bad : {"", "soon", "2026-12-06T18:00:00", "2026-12-06T18:00:00Zx", "2026-12-06T18:00:00+1:00",
                            "2026-12-06 18:00:00Z", "2026-12-06T18:00:00+25:00"})
        EXPECT_FALSE(cmk::kit::parse_utc_time(bad, &t)) << bad;
}

// The command line is split as botocore's shlex.split does, without a shell.
TEST(AwsCredentialProcess, SplitsLikeShlexAndChecksTheExecutable) {
    using cmk::aws::split_process_command;
    std::vector<std::string> want = {"/opt/helper", "--a", "b c", "d \"e\"\\", "f g", "", "it's"};
    EXPECT_EQ(split_process_command("f", "  /opt/helper --a 'b c' \"d \\\"e\\\"\\\\\" f\\ g '' \"it's\" "), want);
    for (const char* bad : {"", "   ", "/opt/helper 'open", "/opt/helper \"open", "/opt/helper \\"}) {
        try {
            split_process_command("profile: profile \"p\" credential_process", bad);
            ADD_FAILURE() << "accepted: " << bad;
        } catch (const cmk::KmsError& e) {
            EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config);
            EXPECT_EQ(std::string(e.what()).rfind("profile: profile \"p\" credential_process: ", 0), 0u) << e.what();
        }
    }
    cmk_test::TempDir d;
    std::string plain = d.sub("plain");
    cmk_test::spit(plain, "x");
    ::chmod(plain.c_str(), 0600);
    for (const auto& [cmd, words] : std::vector<std::pair<std::string, std::string>>{
             {"get-creds --x", "not an absolute path"},
             {d.sub("missing"), "No such file"},
             {d.path(), "not a regular file"},
             {plain, "not executable"}}) {
        try {
            cmk::aws::check_process_executable("credential_process", split_process_command("credential_process", cmd));
            ADD_FAILURE() << "accepted: " << cmd;
        } catch (const cmk::KmsError& e) {
            EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config);
            EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
        }
    }
}

// Failures of the helper are outages (its credentials may come back), never a
// revocation, and say what happened without its standard error (it may echo secrets).
TEST(AwsCredentialProcess, FailuresAreBoundedOutages) {
    cmk_test::TempDir d;
    auto expect = [&](const std::string& body, const std::string& words, long timeout_ms = 3000) {
        std::string h = write_helper(d, "h", body);
        cmk::KmsError e = process_error({h}, timeout_ms);
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Unavailable) << e.what();
        EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
        EXPECT_EQ(std::string(e.what()).find("SECRETSTDERR"), std::string::npos) << e.what();
        return e;
    };
    expect("echo SECRETSTDERR >&2; exit 3\n", "exited with status 3");
    expect("echo SECRETSTDERR >&2; exit 3\n", "is not logged");
    expect("kill -KILL $$\n", "killed by signal 9");
    expect("echo not json\n", "not a JSON object");
    expect("echo '{\"Version\": 2, \"AccessKeyId\": \"AKID\", \"SecretAccessKey\": \"s\"}'\n", "\"Version\": 1");
    expect("echo '{\"Version\": 1, \"AccessKeyId\": \"AKID\"}'\n", "no AccessKeyId and SecretAccessKey");
    expect("echo '{\"Version\": 1, \"AccessKeyId\": \"AKID\", \"SecretAccessKey\": \"s\", \"Expiration\": \"soon\"}'\n",
           "Expiration");
    expect("head -c 70000 /dev/zero | tr '\\0' x\n", "more than 64 KiB");
    expect("printf '[%.0s' $(seq 1 5000)\n", "not a JSON object");  // nesting bound

    // At the deadline the helper's whole process group is killed, also what it left behind.
    std::string pidfile = d.sub("child.pid");
    auto t0 = std::chrono::steady_clock::now();
    expect("sleep 60 & echo $! > " + pidfile + "; wait\n", "did not finish within timeout_ms", 1200);
    double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    EXPECT_LT(took, 5.0);
    std::string child = cmk_test::slurp(pidfile);
    ASSERT_FALSE(child.empty());
    pid_t cpid = static_cast<pid_t>(std::stol(child));
    bool gone = false;
    for (int i = 0; i < 100 && !gone; ++i) {
        gone = ::kill(cpid, 0) != 0 || cmk_test::slurp("/proc/" + std::to_string(cpid) + "/stat").find(") Z") !=
                                           std::string::npos;
        if (!gone) usleep(20000);
    }
    EXPECT_TRUE(gone) << "the helper's child " << cpid << " still runs";
}

// The helper gets no descriptor of the caller (a server has its data files open), stdin
// /dev/null, default signal handling even from a thread that blocks every signal.
TEST(AwsCredentialProcess, RunsIsolated) {
    cmk_test::TempDir d;
    std::string report = d.sub("report");
    // The shell's signal masks first and with builtins only: dash blocks every signal
    // around each fork of a command, and a command that reads /proc/$$/status may see
    // the shell in that window (a CI run on 7 December did).
    std::string h = write_helper(d, "h",
                                 "while read -r l; do case $l in SigBlk*|SigIgn*) echo \"$l\";; esac; done"
                                 " < /proc/$$/status > " + report + ".sig\n"
                                 "ls /proc/$$/fd > " + report + ".fds\n"
                                 "cat > " + report + ".stdin\n"
                                 "echo '{\"Version\": 1, \"AccessKeyId\": \"AKIDPROC\", \"SecretAccessKey\": \"s\"}'\n");
    int fd = ::open("/dev/null", O_RDONLY);  // not close-on-exec
    ASSERT_GE(fd, 0);
    int high = ::dup2(fd, 77);
    ASSERT_EQ(high, 77);
    std::thread t([&] {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, nullptr);
        std::string out = cmk::aws::run_credential_process({h}, 3000, "w");
        cmk::aws::Credentials c = cmk::aws::parse_process_output(out, "w");
        EXPECT_EQ(c.access_key_id, "AKIDPROC");
        EXPECT_TRUE(out.empty()) << "the helper's output was not wiped";
    });
    t.join();
    ::close(77);
    ::close(fd);
    std::string fds = cmk_test::slurp(report + ".fds");
    EXPECT_EQ(fds.find("77"), std::string::npos) << fds;
    std::string sig = cmk_test::slurp(report + ".sig");
    EXPECT_NE(sig.find("SigBlk:\t0000000000000000"), std::string::npos) << sig;
    // Nothing ignored but glibc's own signals 32 and 33 (never a shell's or a helper's).
    size_t at = sig.find("SigIgn:\t");
    ASSERT_NE(at, std::string::npos) << sig;
    unsigned long long ign = std::stoull(sig.substr(at + 8, 16), nullptr, 16);
    EXPECT_EQ(ign & ~0x180000000ULL, 0ULL) << sig;
    EXPECT_EQ(cmk_test::slurp(report + ".stdin"), "");
}

// End to end: a profile's credential_process signs the KMS calls (the loopback server
// checks the signature with the helper's keys); its answer is cached until five minutes
// before its Expiration; an AssumeRole chain can start from it.
TEST_F(AwsServerTest, CredentialProcessSignsAndIsCached) {
    AwsServer s({"--cred", "AKIDPROC:secretPROC"});
    REQUIRE_SERVER(s);
    s.create_key("alias/proc");
    env_.unset("AWS_ACCESS_KEY_ID");
    env_.unset("AWS_SECRET_ACCESS_KEY");
    std::string count = tmp_.sub("runs");
    auto helper = [&](const std::string& expiration) {
        return write_helper(tmp_, "creds",
                            "echo x >> " + count + "\n"
                            "echo '{\"Version\": 1, \"AccessKeyId\": \"AKIDPROC\", \"SecretAccessKey\": "
                            "\"secretPROC\"" + expiration + "}'\n");
    };
    auto runs = [&] {
        std::string c = cmk_test::slurp(count);
        return static_cast<int>(std::count(c.begin(), c.end(), '\n'));
    };
    cmk_test::spit(tmp_.sub("config"), "[profile proc]\ncredential_process = \"" + tmp_.sub("creds") + "\" --profile x\n");
    env_.set("AWS_CONFIG_FILE", tmp_.sub("config"));
    env_.set("AWS_SHARED_CREDENTIALS_FILE", tmp_.sub("none"));

    helper("");  // no Expiration: long-term keys, run once
    auto p = cmk::make_provider(config(s, "alias/proc", {{"profile", "proc"}}));
    EXPECT_EQ(runs(), 0) << "run at configuration time";
    EXPECT_EQ(p->identity(), "credential_process of profile \"proc\"");
    cmk::SecureBytes kek = test_kek();
    cmk::WrapResult w = p->wrap(kek);
    cmk::SecureBytes back = p->unwrap(w.blob);
    EXPECT_TRUE(back.size() == kek.size() && cmk::ct_equal(back.data(), kek.data(), kek.size()));
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    EXPECT_EQ(runs(), 1);

    // Expiring within five minutes: run again for every call.
    std::time_t soon = std::time(nullptr) + 120;
    char iso[32];
    std::strftime(iso, sizeof iso, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&soon));
    helper(std::string(", \"Expiration\": \"") + iso + "\"");
    auto q = cmk::make_provider(config(s, "alias/proc", {{"profile", "proc"}}));
    int before = runs();
    cmk::KeyStatus qs = q->status();
    EXPECT_EQ(qs.health, cmk::KeyHealth::Ok) << qs.detail;
    qs = q->status();
    EXPECT_EQ(qs.health, cmk::KeyHealth::Ok) << qs.detail;
    EXPECT_EQ(runs() - before, 2);

    // Wrong keys from the helper: the KMS refuses them (not an outage of the helper).
    write_helper(tmp_, "creds", "echo '{\"Version\": 1, \"AccessKeyId\": \"AKIDOTHER\", \"SecretAccessKey\": \"x\"}'\n");
    auto r = cmk::make_provider(config(s, "alias/proc", {{"profile", "proc"}}));
    bool refused = false;
    try {
        refused = r->status().health != cmk::KeyHealth::Ok;
    } catch (const cmk::KmsError& e) {
        refused = std::string(e.what()).find("UnrecognizedClientException") != std::string::npos;
    }
    EXPECT_TRUE(refused);

    // A failing helper: unavailable.
    write_helper(tmp_, "creds", "exit 1\n");
    auto f = cmk::make_provider(config(s, "alias/proc", {{"profile", "proc"}}));
    try {
        f->wrap(kek);
        ADD_FAILURE() << "wrapped with a failing credential_process";
    } catch (const cmk::KmsError& e) {
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Unavailable) << e.what();
        EXPECT_NE(std::string(e.what()).find("credential_process of profile \"proc\""), std::string::npos) << e.what();
    }
}

class AwsAssumeRoleServer : public AwsServerTest {};

// End to end against the loopback STS: the server verifies the AssumeRole signature with
// botocore and checks the ExternalId; the KMS calls run as the assumed role's session;
// the credentials are cached; a withdrawn trust is a revocation at the next refresh,
// revoked sessions at the next KMS call; an STS outage is an outage.
TEST_F(AwsAssumeRoleServer, AssumedRoleRevocationAndOutage) {
    const std::string arn = "arn:aws:iam::111122223333:role/customer-kms";
    AwsServer s({"--assume-role", arn, "--external-id", "ext-1234"});
    REQUIRE_SERVER(s);
    s.create_key("alias/cust");
    auto role = [&](std::map<std::string, std::string> extra) {
        extra["assume_role_arn"] = arn;
        extra["sts_endpoint"] = s.url();
        return cmk::make_provider(config(s, "alias/cust", extra));
    };
    auto p = role({{"external_id", "ext-1234"}});
    cmk::SecureBytes kek = test_kek();
    cmk::WrapResult w = p->wrap(kek);
    cmk::SecureBytes back = p->unwrap(w.blob);
    EXPECT_TRUE(cmk::ct_equal(back.data(), kek.data(), kek.size()));
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    EXPECT_EQ(p->identity(), "arn:aws:sts::111122223333:assumed-role/customer-kms/cmk_lakebase");
    std::string stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"assume_role\": 1,"), std::string::npos) << stats;  // cached: asked once
    EXPECT_NE(stats.find("\"bad_signatures\": 0,"), std::string::npos) << stats;

    // The confused-deputy guard: a wrong or missing external id is refused by the trust policy.
    EXPECT_EQ(kind_of([&] { role({{"external_id", "ext-9999"}})->status(); }), cmk::KmsErrorKind::Revoked);
    EXPECT_EQ(kind_of([&] { role({})->status(); }), cmk::KmsErrorKind::Revoked);

    // STS down: an outage, not a revocation.
    s.control("fail", "{\"mode\":\"sts_500\"}");
    EXPECT_EQ(kind_of([&] { role({{"external_id", "ext-1234"}})->status(); }), cmk::KmsErrorKind::Unavailable);
    s.control("fail", "{\"mode\":\"none\"}");

    // Sessions revoked: the cached credentials fail at the next KMS call.
    s.control("role", "{\"revoke_sessions\":true}");
    EXPECT_EQ(kind_of([&] { p->unwrap(w.blob); }), cmk::KmsErrorKind::Revoked);
    // Trust withdrawn: a fresh AssumeRole is refused (revoked); restored: works again.
    s.control("role", "{\"trust\":false}");
    EXPECT_EQ(kind_of([&] { role({{"external_id", "ext-1234"}})->status(); }), cmk::KmsErrorKind::Revoked);
    s.control("role", "{\"trust\":true}");
    auto again = role({{"external_id", "ext-1234"}});
    back = again->unwrap(w.blob);
    EXPECT_TRUE(cmk::ct_equal(back.data(), kek.data(), kek.size()));
    stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"bad_signatures\": 0,"), std::string::npos) << stats;
}

// Sessions that live less than the refresh margin are fetched again at each call: the
// refresh itself meets the withdrawn trust (the watchdog's probe in a server).
TEST_F(AwsAssumeRoleServer, RefreshMeetsWithdrawnTrust) {
    const std::string arn = "arn:aws:iam::111122223333:role/customer-kms";
    AwsServer s({"--assume-role", arn, "--external-id", "ext-1234", "--sts-expiry", "200"});
    REQUIRE_SERVER(s);
    s.create_key("alias/short");
    auto p = cmk::make_provider(config(
        s, "alias/short", {{"assume_role_arn", arn}, {"external_id", "ext-1234"}, {"sts_endpoint", s.url()}}));
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    std::string stats = s.control("stats", "");
    EXPECT_NE(stats.find("\"assume_role\": 2,"), std::string::npos) << stats;  // refreshed
    s.control("role", "{\"trust\":false}");
    EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Revoked);
}

// A profile chain base -> role, with the external id in the config file, end to end.
TEST_F(AwsAssumeRoleServer, ProfileChain) {
    const std::string arn = "arn:aws:iam::111122223333:role/customer-kms";
    AwsServer s({"--assume-role", arn, "--external-id", "ext-1234"});
    REQUIRE_SERVER(s);
    s.create_key("alias/prof");
    env_.unset("AWS_ACCESS_KEY_ID");
    env_.unset("AWS_SECRET_ACCESS_KEY");
    cmk_test::spit(tmp_.sub("credentials"), "[base]\naws_access_key_id=AKIDTEST\naws_secret_access_key=secretTEST\n");
    cmk_test::spit(tmp_.sub("config"), "[profile customer]\nrole_arn=" + arn +
                                           "\nsource_profile=base\nexternal_id=ext-1234\nrole_session_name=db-1\n");
    env_.set("AWS_SHARED_CREDENTIALS_FILE", tmp_.sub("credentials"));
    env_.set("AWS_CONFIG_FILE", tmp_.sub("config"));
    auto p = cmk::make_provider(config(s, "alias/prof", {{"profile", "customer"}, {"sts_endpoint", s.url()}}));
    EXPECT_EQ(p->status().health, cmk::KeyHealth::Ok);
    EXPECT_EQ(p->identity(), "arn:aws:sts::111122223333:assumed-role/customer-kms/db-1");
}

// The audit trail says which identity each KMS call ran as: the assumed role's session.
TEST_F(AwsAssumeRoleServer, AuditRecordsTheAssumedRole) {
    const std::string arn = "arn:aws:iam::111122223333:role/customer-kms";
    AwsServer s({"--assume-role", arn, "--external-id", "ext-1234"});
    REQUIRE_SERVER(s);
    s.create_key("alias/audit");
    std::string dir = tmp_.sub("audit");
    ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
    std::string saved = cmk::audit::directory();
    cmk::audit::set_directory(dir);
    auto p = cmk::audit::audited_provider(
        cmk::make_provider(config(
            s, "alias/audit", {{"assume_role_arn", arn}, {"external_id", "ext-1234"}, {"sts_endpoint", s.url()}})),
        "default");
    cmk::SecureBytes kek = test_kek();
    cmk::WrapResult w = p->wrap(kek);
    p->unwrap(w.blob);
    s.control("role", "{\"revoke_sessions\":true}");
    EXPECT_EQ(kind_of([&] { p->status(); }), cmk::KmsErrorKind::Revoked);
    cmk::audit::set_directory(saved);
    std::vector<cmk::audit::Event> ev = cmk::audit::read_all(dir);
    ASSERT_EQ(ev.size(), 3u);
    const std::string session = "arn:aws:sts::111122223333:assumed-role/customer-kms/cmk_lakebase";
    for (const auto& e : ev) EXPECT_EQ(e.as, session) << e.action;
    EXPECT_EQ(ev[2].outcome, "revoked");
    std::string line = cmk_test::slurp(dir + "/audit.log");
    EXPECT_NE(line.find("\"as\":\"" + session + "\""), std::string::npos) << line;
    EXPECT_EQ(line.find("secretTEST"), std::string::npos);
}
