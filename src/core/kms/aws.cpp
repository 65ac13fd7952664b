// The AWS KMS key provider: wraps the KEK with TrentService.Encrypt, unwraps it with
// TrentService.Decrypt (same KeyId and EncryptionContext), and asks
// TrentService.DescribeKey for KeyMetadata.KeyState. AWS JSON 1.1 protocol over
// cmk::http, signed with our own SigV4 (aws_sigv4.cpp); credentials from the usual
// chain (aws_credentials.cpp). Options, secrets and timing are the kit's (kit.hpp).
// Secrets are wiped and never appear in messages. The answer -> ok/unavailable/revoked
// mapping is in classify_error() and key_state_health(), and documented in docs/providers/aws.md.
#include "aws.hpp"

#include <openssl/crypto.h>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <cctype>
#include <ctime>
#include <memory>
#include <set>

#include "aws_credentials.hpp"
#include "aws_sigv4.hpp"
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "http.hpp"
#include "kit.hpp"

namespace cmk {
namespace aws {
using kit::trim;
namespace {

bool all_of(const std::string& s, size_t a, size_t b, int (*pred)(int)) {
    if (a > b || b > s.size()) return false;
    for (size_t i = a; i < b; ++i)
        if (!pred(static_cast<unsigned char>(s[i]))) return false;
    return true;
}
int is_lower_hex(int c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}
int is_lower(int c) {
    return c >= 'a' && c <= 'z';
}
int is_digit(int c) {
    return c >= '0' && c <= '9';
}

bool valid_bare_key_id(const std::string& s) {
    if (kit::is_uuid(s)) return true;
    return s.size() == 36 && s.compare(0, 4, "mrk-") == 0 && all_of(s, 4, 36, is_lower_hex);
}

bool valid_alias_name(const std::string& s) {  // "alias/NAME"
    if (s.compare(0, 6, "alias/") != 0 || s.size() == 6 || s.size() > 256) return false;
    for (size_t i = 6; i < s.size(); ++i) {
        char c = s[i];
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '/' || c == '_' || c == '-')) return false;
    }
    return true;
}

}  // namespace

bool valid_region(const std::string& r) {
    // partition prefix (2 letters), optional isolated-partition word, area word, number
    if (r.size() < 9 || r.size() > 32) return false;
    std::vector<std::string> parts;
    size_t i = 0;
    while (true) {
        size_t j = r.find('-', i);
        parts.push_back(r.substr(i, j == std::string::npos ? std::string::npos : j - i));
        if (j == std::string::npos) break;
        i = j + 1;
    }
    if (parts.size() != 3 && parts.size() != 4) return false;
    if (parts[0].size() != 2 || !all_of(parts[0], 0, 2, is_lower)) return false;
    if (parts.size() == 4) {
        static const std::set<std::string> kMid = {"gov", "iso", "isob", "isoe", "isof"};
        if (!kMid.count(parts[1])) return false;
    }
    const std::string& area = parts[parts.size() - 2];
    const std::string& num = parts.back();
    static const std::set<std::string> kAreas = {"east",      "west",      "north",     "south",    "central",
                                                 "northeast", "northwest", "southeast", "southwest"};
    if (!kAreas.count(area)) return false;
    return !num.empty() && num.size() <= 2 && all_of(num, 0, num.size(), is_digit);
}

bool valid_key_id(const std::string& id, std::string* arn_region) {
    if (arn_region) arn_region->clear();
    if (id.compare(0, 4, "arn:") == 0) {
        // arn:PARTITION:kms:REGION:ACCOUNT:key/ID | alias/NAME
        std::vector<std::string> f;
        size_t i = 0;
        for (int n = 0; n < 5; ++n) {
            size_t j = id.find(':', i);
            if (j == std::string::npos) return false;
            f.push_back(id.substr(i, j - i));
            i = j + 1;
        }
        std::string resource = id.substr(i);
        static const std::set<std::string> kPartitions = {"aws",       "aws-cn",    "aws-us-gov", "aws-iso",
                                                          "aws-iso-b", "aws-iso-e", "aws-iso-f"};
        if (!kPartitions.count(f[1]) || f[2] != "kms" || !valid_region(f[3])) return false;
        if (f[4].size() != 12 || !all_of(f[4], 0, 12, is_digit)) return false;
        bool ok = (resource.compare(0, 4, "key/") == 0 && valid_bare_key_id(resource.substr(4))) ||
                  valid_alias_name(resource);
        if (ok && arn_region) *arn_region = f[3];
        return ok;
    }
    return valid_bare_key_id(id) || valid_alias_name(id);
}

std::string error_type(const std::string& raw) {
    std::string t = raw;
    size_t hash = t.rfind('#');
    if (hash != std::string::npos) t = t.substr(hash + 1);
    size_t colon = t.find(':');
    if (colon != std::string::npos) t = t.substr(0, colon);
    return trim(t);
}

}  // namespace aws

namespace {

using aws::Credentials;
using kit::config_error;
using kit::env;
using kit::member;
using kit::revoked;
using kit::trim;
using kit::unavailable;
using kit::wipe;

class AwsKmsProvider : public KeyProvider {
public:
    AwsKmsProvider(KeyConfig cfg, http::Transport transport)
        : cfg_(std::move(cfg)), transport_(std::move(transport)) {
        kit::require_known_options(
            cfg_, "the aws key provider",
            {"region", "endpoint", "fips", "ca_file", "profile", "credentials", "shared_credentials_file",
             "config_file", "web_identity_token_file", "role_arn", "role_session_name", "sts_endpoint",
             "assume_role_arn", "external_id", "assume_role_session_name", "assume_role_duration", "imds_endpoint", "encryption_context", "timeout_ms", "connect_timeout_ms", "retries"});
        std::string arn_region;
        if (cfg_.key_id.empty()) throw config_error("key_id: no AWS KMS key given (--key-id)");
        if (!aws::valid_key_id(cfg_.key_id, &arn_region))
            throw config_error("key_id: \"" + cfg_.key_id +
                               "\" is not an AWS KMS key ARN, alias ARN, alias/NAME or key id");
        // Region: the option, else the key ARN's, else AWS_REGION / AWS_DEFAULT_REGION.
        region_ = kit::option(cfg_, "region");
        if (region_.empty()) region_ = arn_region;
        if (region_.empty()) region_ = env("AWS_REGION");
        if (region_.empty()) region_ = env("AWS_DEFAULT_REGION");
        if (region_.empty())
            throw config_error("region: no AWS region given (--kms-option region=us-east-1, or a key ARN)");
        if (!aws::valid_region(region_))
            throw config_error("region: \"" + region_ + "\" is not an AWS region name (e.g. us-east-1)");
        if (!arn_region.empty() && arn_region != region_)
            throw config_error("region: \"" + region_ + "\" differs from the region of key ARN " +
                               cfg_.key_id);
        const std::string dns = region_.compare(0, 3, "cn-") == 0 ? ".amazonaws.com.cn" : ".amazonaws.com";
        std::string ep = kit::option(cfg_, "endpoint");
        bool fips = kit::truthy(kit::option(cfg_, "fips"));
        if (ep.empty()) ep = std::string("https://kms") + (fips ? "-fips." : ".") + region_ + dns;
        endpoint_ = aws::parse_endpoint("endpoint", ep);
        std::string sts = kit::option(cfg_, "sts_endpoint");
        if (sts.empty()) sts = std::string("https://sts") + (fips ? "-fips." : ".") + region_ + dns;
        aws::Endpoint sts_endpoint = aws::parse_endpoint("sts_endpoint", sts);
        ca_file_ = kit::option(cfg_, "ca_file");
        if (!ca_file_.empty()) kit::require_readable_file("ca_file", ca_file_);
        // The kit's names; the whole-request default is 5 s here (documented before
        // the kit), as a KMS call is small and the chain falls back quickly.
        timing_.timeout_ms = kit::int_option(cfg_, "timeout_ms", 5000, 100, 120000);
        timing_.connect_timeout_ms =
            kit::int_option(cfg_, "connect_timeout_ms", kit::kConnectTimeoutMs, 100, 60000);
        timing_.attempts = static_cast<int>(kit::int_option(cfg_, "retries", kit::kAttempts, 1, 10));
        retry_.attempts = timing_.attempts;
        if (!transport_)  // the network: transient statuses and KMS error types are retried
            transport_ = [retry = retry_](const http::Request& req) {
                return http::perform_with_retry(req, retry, [](const http::Response& x) {
                    return http::transient_status(x.status) ||
                           (x.status == 400 && transient_type(type_of(x)));
                });
            };
        parse_context(kit::option(cfg_, "encryption_context"));
        chain_ = std::make_unique<aws::CredentialChain>(cfg_, std::move(sts_endpoint),
                                                        aws::ChainTransport{timing_, ca_file_, region_});
    }

    std::string name() const override { return "aws"; }
    const KeyConfig& config() const override { return cfg_; }
    std::string identity() const override { return chain_->identity(); }

    WrapResult wrap(const SecureBytes& kek) override {
        std::string b64 = base64_encode(kek.data(), kek.size());
        std::string body = json_request(true, &b64, nullptr);
        wipe(b64);
        Answer a;
        call("Encrypt", body, a);
        WrapResult r;
        r.request_id = a.request_id;
        const rapidjson::Value* blob = member(a.doc, "CiphertextBlob");
        if (!blob || !blob->IsString())
            throw unavailable(where("Encrypt") + ": the answer has no CiphertextBlob" + rid(a.request_id));
        try {
            r.blob = base64_decode(blob->GetString());
        } catch (const CryptoError&) {
            throw unavailable(where("Encrypt") + ": CiphertextBlob is not base64" + rid(a.request_id));
        }
        return r;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        std::string b64 = base64_encode(blob.data(), blob.size());
        std::string body = json_request(true, nullptr, &b64);
        Answer a;
        last_request_id_.clear();
        call("Decrypt", body, a);
        last_request_id_ = a.request_id;
        return kit::decode_secret(
            member(a.doc, "Plaintext"),
            unavailable(where("Decrypt") + ": the answer has no Plaintext" + rid(a.request_id)),
            unavailable(where("Decrypt") + ": Plaintext is not base64" + rid(a.request_id)));
    }

    KeyStatus status() override {
        std::string body = json_request(false, nullptr, nullptr);
        Answer a;
        call("DescribeKey", body, a);
        KeyStatus s;
        s.request_id = a.request_id;
        const rapidjson::Value* md = member(a.doc, "KeyMetadata");
        const rapidjson::Value* st = md && md->IsObject() ? member(*md, "KeyState") : nullptr;
        if (!st || !st->IsString())
            throw unavailable(where("DescribeKey") + ": the answer has no KeyMetadata.KeyState" +
                              rid(a.request_id));
        s.state = st->GetString();
        std::string arn;
        if (const rapidjson::Value* v = member(*md, "Arn"); v && v->IsString()) arn = v->GetString();
        std::string usage;
        if (const rapidjson::Value* v = member(*md, "KeyUsage"); v && v->IsString()) usage = v->GetString();
        s.health = key_state_health(s.state);
        std::string name = arn.empty() ? cfg_.key_id : arn;
        if (s.health == KeyHealth::Ok && !usage.empty() && usage != "ENCRYPT_DECRYPT") {
            s.health = KeyHealth::Revoked;
            s.detail = "AWS KMS key " + name + " has KeyUsage " + usage + ", not ENCRYPT_DECRYPT";
            return s;
        }
        switch (s.health) {
            case KeyHealth::Ok:
                s.detail = "AWS KMS key " + name + " is Enabled";
                break;
            case KeyHealth::Revoked:
                s.detail = "AWS KMS key " + name + " is " + s.state +
                           "; re-enable it (or cancel its deletion) "
                           "in AWS KMS to restore access";
                break;
            case KeyHealth::Unavailable:
                s.detail = "AWS KMS key " + name + " is " + s.state + " (transient); retrying";
                break;
        }
        // A peer's number: kit::int_member refuses what no long long holds (converting an
        // out-of-range double is undefined behaviour; found by fuzz_answers).
        if (long long when = 0; kit::int_member(*md, "DeletionDate", &when))
            s.detail += " (deletion scheduled for epoch " + std::to_string(when) + ")";
        return s;
    }

    // KeyState -> health (docs/providers/aws.md). Unknown states are not a revocation.
    static KeyHealth key_state_health(const std::string& st) {
        if (st == "Enabled") return KeyHealth::Ok;
        if (st == "Disabled" || st == "PendingDeletion" || st == "PendingReplicaDeletion" ||
            st == "PendingImport")
            return KeyHealth::Revoked;
        return KeyHealth::Unavailable;  // Creating, Updating, Unavailable (custom key store disconnected),
                                        // new
    }

private:
    struct Answer {
        rapidjson::Document doc;
        std::string text;  // owns the strings of doc (parsed in situ); wiped
        std::string request_id;
        Answer() = default;
        Answer(const Answer&) = delete;
        Answer& operator=(const Answer&) = delete;
        ~Answer() { wipe(text); }
    };

    static std::string rid(const std::string& id) { return kit::request_id_note(id); }

    std::string where(const std::string& op) const {
        return "AWS KMS " + op + " with key " + cfg_.key_id + " at " + endpoint_.host;
    }

    void parse_context(const std::string& spec) {
        context_.emplace_back("cmk_lakebase", "kek");
        size_t i = 0;
        while (i < spec.size()) {
            size_t j = spec.find(',', i);
            if (j == std::string::npos) j = spec.size();
            std::string pair = spec.substr(i, j - i);
            i = j + 1;
            size_t eq = pair.find('=');
            if (eq == std::string::npos || eq == 0 || trim(pair.substr(0, eq)) == "cmk_lakebase")
                throw config_error(
                    "encryption_context: \"" + spec +
                    "\" must be NAME=VALUE pairs separated by commas (\"cmk_lakebase\" is ours)");
            context_.emplace_back(trim(pair.substr(0, eq)), trim(pair.substr(eq + 1)));
        }
    }

    // The JSON 1.1 request body. Plaintext / CiphertextBlob given as base64 (wiped by
    // the caller); the buffer that held them is wiped here.
    std::string json_request(bool with_context, const std::string* plaintext_b64,
                             const std::string* blob_b64) {
        rapidjson::StringBuffer sb;
        rapidjson::Writer<rapidjson::StringBuffer> w(sb);
        w.StartObject();
        w.Key("KeyId");
        w.String(cfg_.key_id.c_str());
        if (plaintext_b64) {
            w.Key("Plaintext");
            w.String(plaintext_b64->c_str(), static_cast<rapidjson::SizeType>(plaintext_b64->size()));
        }
        if (blob_b64) {
            w.Key("CiphertextBlob");
            w.String(blob_b64->c_str(), static_cast<rapidjson::SizeType>(blob_b64->size()));
        }
        if (with_context) {
            w.Key("EncryptionContext");
            w.StartObject();
            for (const auto& kv : context_) {
                w.Key(kv.first.c_str());
                w.String(kv.second.c_str());
            }
            w.EndObject();
        }
        w.EndObject();
        std::string out(sb.GetString(), sb.GetSize());
        OPENSSL_cleanse(const_cast<char*>(sb.GetString()), sb.GetSize());
        return out;
    }

    // ---------------------------------------------------------------- calls

    // A non-200 answer -> the KmsError it means (docs/providers/aws.md).
    [[noreturn]] void classify_error(const std::string& op, const http::Response& r, const std::string& type,
                                     const std::string& message, const std::string& request_id) {
        std::string m = where(op) + " failed: HTTP " + std::to_string(r.status) +
                        (type.empty() ? "" : " " + type) +
                        (message.empty() ? "" : ": " + kit::one_line(message, 240)) +
                        rid(request_id);
        static const std::set<std::string> kRevoked = {
            "NotFoundException",        "AccessDeniedException",      "DisabledException",
            "KMSInvalidStateException", "InvalidCiphertextException", "IncorrectKeyException",
            "InvalidKeyUsageException", "UnrecognizedClientException"};
        static const std::set<std::string> kConfig = {"ValidationException", "InvalidArnException",
                                                      "SerializationException", "UnknownOperationException"};
        if (r.status < 500 && kRevoked.count(type)) {
            if (type == "AccessDeniedException" || type == "UnrecognizedClientException")
                throw revoked(m + "; the key policy, a grant or the IAM identity no longer allows this");
            throw revoked(m);
        }
        if (r.status < 500 && kConfig.count(type)) throw config_error("key_id: " + m);
        throw unavailable(m);  // 5xx, throttling, KeyUnavailable, signature/clock trouble, anything unknown
    }

    static bool transient_type(const std::string& t) {
        return t == "ThrottlingException" || t == "KMSInternalException" ||
               t == "DependencyTimeoutException" || t == "KeyUnavailableException";
    }

    static std::string type_of(const http::Response& r) {
        std::string t = aws::error_type(r.header("x-amzn-errortype"));
        if (!t.empty()) return t;
        rapidjson::Document d;
        std::string copy = r.body;
        parse_json_bounded_insitu(d, copy, nullptr);
        if (!d.HasParseError() && d.IsObject()) {
            auto it = d.FindMember("__type");
            if (it != d.MemberEnd() && it->value.IsString()) t = aws::error_type(it->value.GetString());
        }
        wipe(copy);
        return t;
    }

    // Signs and sends one KMS call; the body (holding key material for Encrypt) is
    // wiped on every path. Fills `a` with the parsed 200 answer (the document points
    // into a.text, so it is filled in place), throws KmsError otherwise.
    void call(const std::string& op, std::string& body, Answer& a) {
        kit::WipeOnExit scrub{body};
        for (int attempt = 0;; ++attempt) {
            Credentials creds = chain_->get();
            aws::SigV4Request sr;
            sr.method = "POST";
            sr.headers = {{"Host", endpoint_.host},
                          {"Content-Type", "application/x-amz-json-1.1"},
                          {"X-Amz-Target", "TrentService." + op}};
            sr.body.swap(body);
            aws::sign(sr, creds, region_, "kms", std::time(nullptr));
            http::Request req = http::request("POST", endpoint_.url, timing_, ca_file_);
            req.headers = sr.headers;
            req.body.swap(sr.body);
            for (auto& h : sr.headers) wipe(h.second);
            http::Response r;
            try {
                r = transport_(req);
            } catch (...) {
                body.swap(req.body);
                for (auto& h : req.headers) wipe(h.second);
                throw;
            }
            body.swap(req.body);
            for (auto& h : req.headers) wipe(h.second);
            wipe(a.text);
            a.request_id = r.header("x-amzn-requestid");
            a.text.swap(r.body);
            if (r.status == 200) {
                parse_json_bounded_insitu(a.doc, a.text, nullptr);
                if (a.doc.HasParseError() || !a.doc.IsObject())
                    throw unavailable(where(op) + ": the answer is not a JSON object" + rid(a.request_id));
                return;
            }
            std::string type, message;
            {
                r.body = a.text;
                type = type_of(r);
                rapidjson::Document d;
                parse_json_bounded_insitu(d, r.body, nullptr);
                if (!d.HasParseError() && d.IsObject())
                    for (const char* k : {"message", "Message"})
                        if (const rapidjson::Value* v = member(d, k); v && v->IsString())
                            message = v->GetString();
                wipe(r.body);
            }
            // Temporary credentials that expired early: fetch new ones once.
            if (attempt == 0 && (type == "ExpiredTokenException") &&
                chain_->temporary()) {
                chain_->forget();
                continue;
            }
            classify_error(op, r, type, message, a.request_id);
        }
    }

    KeyConfig cfg_;
    http::Transport transport_;  // KMS calls; the network unless a test or fuzz target gives one
    std::string region_;
    aws::Endpoint endpoint_;
    std::string ca_file_;
    kit::Timing timing_;
    http::RetryPolicy retry_;
    std::vector<std::pair<std::string, std::string>> context_;
    std::unique_ptr<aws::CredentialChain> chain_;
};

}  // namespace

namespace aws {

std::unique_ptr<KeyProvider> make_aws_provider(const KeyConfig& cfg, http::Transport transport) {
    return std::make_unique<AwsKmsProvider>(cfg, std::move(transport));
}

}  // namespace aws

}  // namespace cmk
