// AWS KMS provider units: SigV4 against the published test suite vectors
// (test/data/aws_sigv4_vectors.txt), and the provider's configuration checks
// (region, key id, endpoint, credentials chain) that need no server.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <ctime>
#include <map>
#include <sstream>

#include "cmk_lakebase/aws_sigv4.hpp"
#include "cmk_lakebase/kms.hpp"
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
