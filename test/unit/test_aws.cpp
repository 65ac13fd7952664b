// AWS KMS provider units: SigV4 against the published test suite vectors
// (test/data/aws_sigv4_vectors.txt), and the provider's configuration checks
// (region, key id, endpoint, credentials chain) that need no server.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <functional>

#include <ctime>
#include <map>
#include <sstream>

#include "core/kms/aws_sigv4.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "core/kms/http.hpp"
#include "core/kms/aws.hpp"
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

// Sets environment variables for one test and restores them after.
class EnvGuard {
public:
    void set(const char* name, const std::string& value) {
        save(name);
        ::setenv(name, value.c_str(), 1);
    }
    void unset(const char* name) {
        save(name);
        ::unsetenv(name);
    }
    ~EnvGuard() {
        for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
            if (it->second.first)
                ::setenv(it->first.c_str(), it->second.second.c_str(), 1);
            else
                ::unsetenv(it->first.c_str());
        }
    }

private:
    void save(const char* name) {
        const char* v = std::getenv(name);
        saved_.emplace_back(name, std::make_pair(v != nullptr, v ? std::string(v) : std::string()));
    }
    std::vector<std::pair<std::string, std::pair<bool, std::string>>> saved_;
};

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
    clean_aws_env(g, d);
    g.set("AWS_ACCESS_KEY_ID", "AKIDTEST");
    g.set("AWS_SECRET_ACCESS_KEY", "secret");
    auto cfg = [](std::map<std::string, std::string> o, std::string key = kKeyUuid) {
        return cmk::KeyConfig{"aws", key, std::move(o)};
    };
    auto expect_config = [](const cmk::KmsError& e, const std::string& field) {
        EXPECT_EQ(e.kind, cmk::KmsErrorKind::Config) << e.what();
        EXPECT_EQ(std::string(e.what()).rfind(field + ":", 0), 0u) << e.what();
        EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
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
                   "[profile chained]\nrole_arn=arn:aws:iam::1:role/r\nsource_profile=default\n"
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
    c.options["profile"] = "chained";
    e = config_error_of(c);
    EXPECT_NE(std::string(e.what()).find("source_profile"), std::string::npos) << e.what();
    c.options["profile"] = "absent";
    e = config_error_of(c);
    EXPECT_EQ(std::string(e.what()).rfind("profile: no credentials for profile \"absent\"", 0), 0u)
        << e.what();
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
