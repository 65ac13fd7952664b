// The AWS KMS key provider: wraps the KEK with TrentService.Encrypt, unwraps it with
// TrentService.Decrypt (same KeyId and EncryptionContext), and asks
// TrentService.DescribeKey for KeyMetadata.KeyState. AWS JSON 1.1 protocol over
// cmk::http, signed with our own SigV4 (aws_sigv4.cpp). Credentials come from the usual
// chain (environment, web identity token -> STS AssumeRoleWithWebIdentity, shared
// credentials/config files with profiles, EC2 IMDSv2); the chain's choice is made at
// configuration time without a network call, so a missing credential is a one-line
// configuration error naming what is missing. Secrets are held in http::Secret (wiped)
// and never appear in messages. The answer -> ok/unavailable/revoked mapping is in
// classify_error() and key_state_health(), and documented in the README.
#include "aws.hpp"

#include <openssl/crypto.h>
#include <pwd.h>
#include <unistd.h>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>
#include <set>
#include <tuple>

#include "aws_sigv4.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "http.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk {
namespace aws {
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

bool valid_uuid(const std::string& s) {
    if (s.size() != 36) return false;
    for (size_t i = 0; i < 36; ++i) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;
        if (dash ? s[i] != '-' : !std::isxdigit(static_cast<unsigned char>(s[i]))) return false;
    }
    return true;
}

bool valid_bare_key_id(const std::string& s) {
    if (valid_uuid(s)) return true;
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

std::string trim(const std::string& s) {
    size_t a = s.find_first_not_of(" \t\r\n");
    if (a == std::string::npos) return "";
    size_t b = s.find_last_not_of(" \t\r\n");
    return s.substr(a, b - a + 1);
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

IniFile parse_ini(const std::string& text) {
    IniFile out;
    std::string section;
    bool in_section = false;
    size_t i = 0;
    while (i < text.size()) {
        size_t j = text.find('\n', i);
        if (j == std::string::npos) j = text.size();
        std::string line = trim(text.substr(i, j - i));
        i = j + 1;
        if (line.empty() || line[0] == '#' || line[0] == ';') continue;
        if (line.front() == '[' && line.back() == ']') {
            section = trim(line.substr(1, line.size() - 2));
            in_section = true;
            out[section];
            continue;
        }
        size_t eq = line.find('=');
        if (!in_section || eq == std::string::npos) continue;
        std::string k = trim(line.substr(0, eq));
        for (char& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        std::string v = trim(line.substr(eq + 1));
        std::string& slot = out[section][k];
        if (!slot.empty()) OPENSSL_cleanse(&slot[0], slot.size());
        slot = v;
        OPENSSL_cleanse(&line[0], line.size());
        OPENSSL_cleanse(&v[0], v.size());
    }
    return out;
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
using aws::trim;
using http::Secret;

KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}
KmsError unavailable(const std::string& m) {
    return KmsError(KmsErrorKind::Unavailable, m);
}
KmsError revoked(const std::string& m) {
    return KmsError(KmsErrorKind::Revoked, m);
}

void wipe(std::string& s) {
    if (!s.empty()) OPENSSL_cleanse(&s[0], s.size());
    s.clear();
}

// Wipes every string of an IniFile (credentials files hold secret keys).
struct IniScrub {
    aws::IniFile& ini;
    ~IniScrub() {
        for (auto& sec : ini)
            for (auto& kv : sec.second) wipe(kv.second);
    }
};

bool truthy(const std::string& v) {
    return v == "1" || v == "true" || v == "yes" || v == "on";
}

std::string env(const char* name) {
    const char* v = std::getenv(name);
    return v ? v : "";
}

std::string home_dir() {
    std::string h = env("HOME");
    if (h.empty()) {
        struct passwd* pw = getpwuid(getuid());
        if (pw && pw->pw_dir) h = pw->pw_dir;
    }
    return h;
}

// One line, bounded, for messages quoting a server's answer.
std::string one_line(std::string s, size_t max = 240) {
    for (char& c : s)
        if (c == '\n' || c == '\r' || c == '\t') c = ' ';
    if (s.size() > max) s = s.substr(0, max) + "...";
    return s;
}

std::time_t parse_iso8601(const std::string& s) {
    std::tm tm{};
    if (s.size() < 19 || !strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm)) return 0;
    return timegm(&tm);
}

// The text between <tag> and </tag> (first occurrence), XML entities for & < > " '.
std::string xml_text(const std::string& xml, const std::string& tag) {
    std::string open = "<" + tag + ">", close = "</" + tag + ">";
    size_t a = xml.find(open);
    if (a == std::string::npos) return "";
    a += open.size();
    size_t b = xml.find(close, a);
    if (b == std::string::npos) return "";
    std::string raw = xml.substr(a, b - a), out;
    for (size_t i = 0; i < raw.size(); ++i) {
        static const std::pair<const char*, char> kEnt[] = {
            {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
        bool done = false;
        for (const auto& e : kEnt) {
            size_t n = std::strlen(e.first);
            if (raw.compare(i, n, e.first) == 0) {
                out.push_back(e.second);
                i += n - 1;
                done = true;
                break;
            }
        }
        if (!done) out.push_back(raw[i]);
    }
    wipe(raw);
    return out;
}

struct Endpoint {
    std::string url;   // scheme://host[:port]/
    std::string host;  // host[:port] as sent in the Host header
};

bool loopback_host(const std::string& host) {
    std::string h = host;
    if (!h.empty() && h[0] == '[') {
        size_t e = h.find(']');
        h = h.substr(1, e == std::string::npos ? std::string::npos : e - 1);
    } else {
        size_t c = h.find(':');
        if (c != std::string::npos) h = h.substr(0, c);
    }
    return h == "localhost" || h == "::1" || h.compare(0, 4, "127.") == 0;
}

// https://host[:port][/] or, to a loopback address only, http://... (tests, local
// proxies): TLS is never switched off for a remote endpoint by a configuration typo.
Endpoint parse_endpoint(const std::string& field, const std::string& url) {
    std::string rest;
    bool https = url.compare(0, 8, "https://") == 0;
    if (https)
        rest = url.substr(8);
    else if (url.compare(0, 7, "http://") == 0)
        rest = url.substr(7);
    else
        throw config_error(field + ": \"" + url + "\" is not an https:// URL");
    size_t slash = rest.find('/');
    std::string host = rest.substr(0, slash);
    std::string path = slash == std::string::npos ? "/" : rest.substr(slash);
    if (host.empty() || host.find_first_of("@?# ") != std::string::npos)
        throw config_error(field + ": \"" + url + "\" has no valid host");
    if (path != "/")
        throw config_error(field + ": \"" + url +
                           "\" must not have a path (AWS JSON and query APIs post to /)");
    if (!https && !loopback_host(host))
        throw config_error(field + ": \"" + url +
                           "\" uses plain http to a non-loopback host; use https:// (TLS is required)");
    return Endpoint{(https ? "https://" : "http://") + host + "/", host};
}

const std::set<std::string>& known_options() {
    static const std::set<std::string> k = {"region",
                                            "endpoint",
                                            "fips",
                                            "ca_file",
                                            "profile",
                                            "credentials",
                                            "shared_credentials_file",
                                            "config_file",
                                            "web_identity_token_file",
                                            "role_arn",
                                            "role_session_name",
                                            "sts_endpoint",
                                            "imds_endpoint",
                                            "encryption_context",
                                            "timeout_ms",
                                            "connect_timeout_ms",
                                            "retries"};
    return k;
}

long int_option(const KeyConfig& cfg, const std::string& name, long def, long lo, long hi) {
    std::string v = http::option(cfg, name);
    if (v.empty()) return def;
    char* end = nullptr;
    errno = 0;
    long n = std::strtol(v.c_str(), &end, 10);
    if (errno || !end || *end || n < lo || n > hi)
        throw config_error(name + ": \"" + v + "\" is not a number from " + std::to_string(lo) + " to " +
                           std::to_string(hi));
    return n;
}

enum class CredSource { Environment, WebIdentity, SharedFile, ConfigFile, Imds };

const char* source_name(CredSource s) {
    switch (s) {
        case CredSource::Environment:
            return "environment (AWS_ACCESS_KEY_ID)";
        case CredSource::WebIdentity:
            return "web identity token (STS AssumeRoleWithWebIdentity)";
        case CredSource::SharedFile:
            return "shared credentials file";
        case CredSource::ConfigFile:
            return "config file";
        case CredSource::Imds:
            return "EC2 instance metadata (IMDSv2)";
    }
    return "?";
}

class AwsKmsProvider : public KeyProvider {
public:
    explicit AwsKmsProvider(KeyConfig cfg) : cfg_(std::move(cfg)) {
        for (const auto& kv : cfg_.options)
            if (!known_options().count(kv.first))
                throw config_error(kv.first +
                                   ": unknown option of the aws key provider (known: region, endpoint, "
                                   "fips, ca_file, profile, credentials, shared_credentials_file, "
                                   "config_file, web_identity_token_file, role_arn, role_session_name, "
                                   "sts_endpoint, imds_endpoint, encryption_context, timeout_ms, "
                                   "connect_timeout_ms, retries)");
        std::string arn_region;
        if (cfg_.key_id.empty()) throw config_error("key_id: no AWS KMS key given (--key-id)");
        if (!aws::valid_key_id(cfg_.key_id, &arn_region))
            throw config_error("key_id: \"" + cfg_.key_id +
                               "\" is not an AWS KMS key ARN, alias ARN, alias/NAME or key id");
        // Region: the option, else the key ARN's, else AWS_REGION / AWS_DEFAULT_REGION.
        region_ = http::option(cfg_, "region");
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
        std::string ep = http::option(cfg_, "endpoint");
        bool fips = truthy(http::option(cfg_, "fips"));
        if (ep.empty()) ep = std::string("https://kms") + (fips ? "-fips." : ".") + region_ + dns;
        endpoint_ = parse_endpoint("endpoint", ep);
        std::string sts = http::option(cfg_, "sts_endpoint");
        if (sts.empty()) sts = std::string("https://sts") + (fips ? "-fips." : ".") + region_ + dns;
        sts_endpoint_ = parse_endpoint("sts_endpoint", sts);
        ca_file_ = http::option(cfg_, "ca_file");
        if (!ca_file_.empty()) http::require_readable_file("ca_file", ca_file_);
        timeout_ms_ = int_option(cfg_, "timeout_ms", 5000, 100, 120000);
        connect_timeout_ms_ = int_option(cfg_, "connect_timeout_ms", 3000, 100, 60000);
        retry_.attempts = static_cast<int>(int_option(cfg_, "retries", 3, 1, 10));
        parse_context(http::option(cfg_, "encryption_context"));
        plan_credentials();
    }

    std::string name() const override { return "aws"; }
    const KeyConfig& config() const override { return cfg_; }

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
        const rapidjson::Value* pt = member(a.doc, "Plaintext");
        if (!pt || !pt->IsString())
            throw unavailable(where("Decrypt") + ": the answer has no Plaintext" + rid(a.request_id));
        std::vector<uint8_t> raw;
        try {
            raw = base64_decode(std::string(pt->GetString(), pt->GetStringLength()));
        } catch (const CryptoError&) {
            throw unavailable(where("Decrypt") + ": Plaintext is not base64" + rid(a.request_id));
        }
        SecureBytes k(raw.data(), raw.size());
        OPENSSL_cleanse(raw.data(), raw.size());
        return k;
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
        if (const rapidjson::Value* v = member(*md, "DeletionDate"); v && v->IsNumber())
            s.detail += " (deletion scheduled for epoch " +
                        std::to_string(static_cast<long long>(v->GetDouble())) + ")";
        return s;
    }

    // KeyState -> health (README table). Unknown states are not a revocation.
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

    static const rapidjson::Value* member(const rapidjson::Value& o, const char* name) {
        if (!o.IsObject()) return nullptr;
        auto it = o.FindMember(name);
        return it == o.MemberEnd() ? nullptr : &it->value;
    }

    static std::string rid(const std::string& id) { return id.empty() ? "" : " (request id " + id + ")"; }

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

    // ---------------------------------------------------------------- credentials

    std::string profile_name() const {
        std::string p = http::option(cfg_, "profile");
        if (p.empty()) p = env("AWS_PROFILE");
        return p.empty() ? "default" : p;
    }
    bool profile_explicit() const {
        return !http::option(cfg_, "profile").empty() || !env("AWS_PROFILE").empty();
    }
    std::string shared_file() const {
        std::string f = http::option(cfg_, "shared_credentials_file");
        if (f.empty()) f = env("AWS_SHARED_CREDENTIALS_FILE");
        if (f.empty()) f = home_dir() + "/.aws/credentials";
        return f;
    }
    std::string config_file() const {
        std::string f = http::option(cfg_, "config_file");
        if (f.empty()) f = env("AWS_CONFIG_FILE");
        if (f.empty()) f = home_dir() + "/.aws/config";
        return f;
    }

    // A file of the chain: absent is fine (returns empty), unreadable is not.
    static aws::IniFile load_ini(const std::string& field, const std::string& path, bool must_exist) {
        if (::access(path.c_str(), F_OK) != 0) {
            if (must_exist)
                throw config_error(field + ": cannot read \"" + path + "\": " + std::strerror(errno));
            return {};
        }
        std::string text;
        try {
            text = sys::read_file(path.c_str());
        } catch (const std::exception& e) {
            throw config_error(field + ": " + e.what());
        }
        aws::IniFile ini = aws::parse_ini(text);
        wipe(text);
        return ini;
    }

    // The profile's section in the config file: "[profile NAME]", or "[default]".
    static const std::map<std::string, std::string>* config_section(const aws::IniFile& ini,
                                                                    const std::string& p) {
        auto it = ini.find("profile " + p);
        if (it == ini.end() && p == "default") it = ini.find("default");
        return it == ini.end() ? nullptr : &it->second;
    }

    static std::string get(const std::map<std::string, std::string>* sec, const std::string& k) {
        if (!sec) return "";
        auto it = sec->find(k);
        return it == sec->end() ? "" : it->second;
    }

    // Decides the source of credentials now, without a network call: the first of the
    // chain that is configured. Throws Config naming what is missing.
    void plan_credentials() {
        const std::string want = http::option(cfg_, "credentials", "auto");
        static const std::set<std::string> kSources = {"auto", "env", "web_identity", "profile", "imds"};
        if (!kSources.count(want))
            throw config_error("credentials: \"" + want +
                               "\" is not one of auto, env, web_identity, profile, imds");
        const bool any = want == "auto";
        std::vector<std::string> looked;

        if (any || want == "env") {
            bool ak = !env("AWS_ACCESS_KEY_ID").empty(), sk = !env("AWS_SECRET_ACCESS_KEY").empty();
            if (ak != sk)
                throw config_error(std::string("credentials: ") +
                                   (ak ? "AWS_SECRET_ACCESS_KEY" : "AWS_ACCESS_KEY_ID") + " is not set but " +
                                   (ak ? "AWS_ACCESS_KEY_ID" : "AWS_SECRET_ACCESS_KEY") +
                                   " is; set both (or neither)");
            if (ak) {
                source_ = CredSource::Environment;
                return;
            }
            if (!any)
                throw config_error("credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set");
            looked.push_back("AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY not set");
        }

        const std::string profile = profile_name();
        aws::IniFile conf =
            load_ini("config_file", config_file(), !http::option(cfg_, "config_file").empty());
        IniScrub conf_scrub{conf};
        const auto* csec = config_section(conf, profile);

        if (any || want == "web_identity") {
            token_file_ = http::option(cfg_, "web_identity_token_file");
            if (token_file_.empty()) token_file_ = env("AWS_WEB_IDENTITY_TOKEN_FILE");
            if (token_file_.empty()) token_file_ = get(csec, "web_identity_token_file");
            role_arn_ = http::option(cfg_, "role_arn");
            if (role_arn_.empty()) role_arn_ = env("AWS_ROLE_ARN");
            if (role_arn_.empty()) role_arn_ = get(csec, "role_arn");
            session_name_ = http::option(cfg_, "role_session_name");
            if (session_name_.empty()) session_name_ = env("AWS_ROLE_SESSION_NAME");
            if (session_name_.empty()) session_name_ = "cmk_lakebase";
            if (!token_file_.empty()) {
                http::require_readable_file("web_identity_token_file", token_file_);
                if (role_arn_.empty())
                    throw config_error(
                        "role_arn: a web identity token file is configured but no role ARN "
                        "(AWS_ROLE_ARN or --kms-option role_arn=arn:aws:iam::ACCOUNT:role/NAME)");
                if (role_arn_.compare(0, 4, "arn:") != 0 || role_arn_.find(":role/") == std::string::npos)
                    throw config_error("role_arn: \"" + role_arn_ + "\" is not an IAM role ARN");
                source_ = CredSource::WebIdentity;
                return;
            }
            if (!any)
                throw config_error(
                    "web_identity_token_file: no web identity token file configured "
                    "(AWS_WEB_IDENTITY_TOKEN_FILE or --kms-option web_identity_token_file=...)");
            looked.push_back("no web identity token file");
        }

        if (any || want == "profile") {
            const std::string sf = shared_file();
            aws::IniFile shared = load_ini("shared_credentials_file", sf,
                                           !http::option(cfg_, "shared_credentials_file").empty());
            IniScrub shared_scrub{shared};
            auto it = shared.find(profile);
            const std::map<std::string, std::string>* ssec = it == shared.end() ? nullptr : &it->second;
            for (const auto& [sec, where, src] :
                 {std::make_tuple(ssec, sf, CredSource::SharedFile),
                  std::make_tuple(csec, config_file(), CredSource::ConfigFile)}) {
                if (!sec) continue;
                bool ak = !get(sec, "aws_access_key_id").empty(),
                     sk = !get(sec, "aws_secret_access_key").empty();
                if (ak && sk) {
                    source_ = src;
                    return;
                }
                if (ak || sk)
                    throw config_error(std::string("profile: profile \"") + profile + "\" in " + where +
                                       " has " +
                                       (ak ? "aws_access_key_id but no aws_secret_access_key"
                                           : "aws_secret_access_key but no aws_access_key_id"));
                for (const char* k : {"source_profile", "credential_process", "sso_start_url", "sso_session"})
                    if (!get(sec, k).empty())
                        throw config_error(std::string("profile: profile \"") + profile + "\" in " + where +
                                           " uses " + k +
                                           ", which the aws key provider does not support; give static keys, "
                                           "a web identity token file, or use IMDS");
            }
            if (profile_explicit() || !any)
                throw config_error("profile: no credentials for profile \"" + profile + "\" in " + sf +
                                   " or " + config_file());
            looked.push_back("no profile \"" + profile + "\" in " + sf + " or " + config_file());
        }

        if (any || want == "imds") {
            if (truthy(env("AWS_EC2_METADATA_DISABLED"))) {
                if (!any)
                    throw config_error("credentials: imds requested but AWS_EC2_METADATA_DISABLED is set");
                looked.push_back("IMDS disabled (AWS_EC2_METADATA_DISABLED)");
            } else {
                std::string ep = http::option(cfg_, "imds_endpoint");
                if (ep.empty()) ep = env("AWS_EC2_METADATA_SERVICE_ENDPOINT");
                if (ep.empty()) ep = "http://169.254.169.254";
                while (!ep.empty() && ep.back() == '/') ep.pop_back();
                if (ep.compare(0, 7, "http://") != 0 && ep.compare(0, 8, "https://") != 0)
                    throw config_error("imds_endpoint: \"" + ep + "\" is not an http:// URL");
                imds_ = ep;
                source_ = CredSource::Imds;
                return;
            }
        }
        std::string why;
        for (const auto& l : looked) why += (why.empty() ? "" : "; ") + l;
        throw config_error("credentials: no AWS credentials found (" + why + ")");
    }

    // Current credentials: static sources are read on each use (rotation of a
    // credentials file needs no restart); STS and IMDS answers are cached until five
    // minutes before they expire.
    Credentials credentials() {
        Credentials c;
        switch (source_) {
            case CredSource::Environment:
                c.access_key_id = env("AWS_ACCESS_KEY_ID");
                c.secret_access_key = Secret(env("AWS_SECRET_ACCESS_KEY"));
                c.session_token = Secret(env("AWS_SESSION_TOKEN"));
                if (c.access_key_id.empty() || c.secret_access_key.empty())
                    throw config_error(
                        "credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are no longer set");
                break;
            case CredSource::SharedFile:
            case CredSource::ConfigFile: {
                bool shared = source_ == CredSource::SharedFile;
                const std::string path = shared ? shared_file() : config_file();
                aws::IniFile ini = load_ini(shared ? "shared_credentials_file" : "config_file", path, true);
                IniScrub scrub{ini};
                const std::map<std::string, std::string>* sec = nullptr;
                if (shared) {
                    auto it = ini.find(profile_name());
                    if (it != ini.end()) sec = &it->second;
                } else {
                    sec = config_section(ini, profile_name());
                }
                c.access_key_id = get(sec, "aws_access_key_id");
                c.secret_access_key = Secret(get(sec, "aws_secret_access_key"));
                c.session_token = Secret(get(sec, "aws_session_token"));
                if (c.access_key_id.empty() || c.secret_access_key.empty())
                    throw config_error("profile: no credentials for profile \"" + profile_name() + "\" in " +
                                       path);
                break;
            }
            case CredSource::WebIdentity:
            case CredSource::Imds: {
                std::lock_guard<std::mutex> g(mu_);
                std::time_t now = std::time(nullptr);
                if (cached_.access_key_id.empty() || (cached_.expiration && cached_.expiration - 300 <= now))
                    cached_ =
                        source_ == CredSource::WebIdentity ? assume_role_with_web_identity() : from_imds();
                c.access_key_id = cached_.access_key_id;
                c.secret_access_key = Secret(cached_.secret_access_key.str());
                c.session_token = Secret(cached_.session_token.str());
                c.expiration = cached_.expiration;
                break;
            }
        }
        c.source = source_name(source_);
        return c;
    }

    void forget_cached_credentials() {
        std::lock_guard<std::mutex> g(mu_);
        cached_ = Credentials{};
    }

    http::Request base_request(const std::string& url) const {
        http::Request r;
        r.url = url;
        r.ca_file = ca_file_;
        r.timeout_ms = timeout_ms_;
        r.connect_timeout_ms = connect_timeout_ms_;
        return r;
    }

    Credentials assume_role_with_web_identity() {
        Secret token;
        try {
            token = Secret(sys::read_file(token_file_.c_str()));
        } catch (const std::exception& e) {
            throw unavailable(std::string("web_identity_token_file: ") + e.what());
        }
        std::string t = trim(token.str());
        http::Request req = base_request(sts_endpoint_.url);
        req.headers = {{"Content-Type", "application/x-www-form-urlencoded; charset=utf-8"},
                       {"Accept", "text/xml"}};
        req.body = "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&DurationSeconds=3600&RoleArn=" +
                   http::url_encode(role_arn_) + "&RoleSessionName=" + http::url_encode(session_name_) +
                   "&WebIdentityToken=" + http::url_encode(t);
        wipe(t);
        http::Response resp;
        try {
            resp = http::perform_with_retry(req, retry_);
        } catch (...) {
            wipe(req.body);
            throw;
        }
        wipe(req.body);
        const std::string what =
            "STS AssumeRoleWithWebIdentity for role " + role_arn_ + " at " + sts_endpoint_.host;
        if (resp.status != 200) {
            std::string code = xml_text(resp.body, "Code"), msg = xml_text(resp.body, "Message");
            std::string m = what + " failed: HTTP " + std::to_string(resp.status) +
                            (code.empty() ? "" : " " + code) + (msg.empty() ? "" : ": " + one_line(msg)) +
                            rid(resp.header("x-amzn-requestid"));
            wipe(resp.body);
            if (code == "AccessDenied")
                throw revoked(m + "; the role's trust policy no longer admits this identity");
            throw unavailable(m);
        }
        Credentials c;
        c.access_key_id = xml_text(resp.body, "AccessKeyId");
        c.secret_access_key = Secret(xml_text(resp.body, "SecretAccessKey"));
        c.session_token = Secret(xml_text(resp.body, "SessionToken"));
        c.expiration = parse_iso8601(xml_text(resp.body, "Expiration"));
        wipe(resp.body);
        if (c.access_key_id.empty() || c.secret_access_key.empty() || c.session_token.empty())
            throw unavailable(what + ": the answer has no credentials");
        return c;
    }

    Credentials from_imds() {
        const std::string what = "EC2 instance metadata service at " + imds_;
        http::Request put = base_request(imds_ + "/latest/api/token");
        put.method = "PUT";
        put.connect_timeout_ms = std::min(connect_timeout_ms_, 1000L);
        put.timeout_ms = std::min(timeout_ms_, 2000L);
        put.headers = {{"X-aws-ec2-metadata-token-ttl-seconds", "21600"}};
        http::Response t = http::perform_with_retry(put, retry_);
        if (t.status != 200)
            throw unavailable(what + ": token request answered HTTP " + std::to_string(t.status));
        Secret token(trim(t.body));
        wipe(t.body);
        http::Request get = put;
        get.method = "GET";
        get.headers = {{"X-aws-ec2-metadata-token", token.str()}};
        get.url = imds_ + "/latest/meta-data/iam/security-credentials/";
        http::Response role = http::perform_with_retry(get, retry_);
        if (role.status == 404)
            throw config_error("credentials: " + what + " has no IAM role attached to this instance");
        if (role.status != 200)
            throw unavailable(what + ": role request answered HTTP " + std::to_string(role.status));
        std::string name = trim(role.body.substr(0, role.body.find('\n')));
        if (name.empty() || name.find_first_of("/?#") != std::string::npos)
            throw unavailable(what + ": no usable role name in the answer");
        get.url += name;
        http::Response cr = http::perform_with_retry(get, retry_);
        if (cr.status != 200)
            throw unavailable(what + ": credentials request answered HTTP " + std::to_string(cr.status));
        rapidjson::Document d;
        d.ParseInsitu(&cr.body[0]);
        Credentials c;
        auto str = [&](const char* k) -> std::string {
            const rapidjson::Value* v = member(d, k);
            return v && v->IsString() ? std::string(v->GetString(), v->GetStringLength()) : "";
        };
        if (!d.HasParseError()) {
            c.access_key_id = str("AccessKeyId");
            std::string sk = str("SecretAccessKey"), tk = str("Token");
            c.secret_access_key = Secret(sk);
            c.session_token = Secret(tk);
            wipe(sk);
            wipe(tk);
            c.expiration = parse_iso8601(str("Expiration"));
        }
        wipe(cr.body);
        if (c.access_key_id.empty() || c.secret_access_key.empty())
            throw unavailable(what + ": the answer for role " + name + " has no credentials");
        return c;
    }

    // ---------------------------------------------------------------- calls

    // A non-200 answer -> the KmsError it means (README table).
    [[noreturn]] void classify_error(const std::string& op, const http::Response& r, const std::string& type,
                                     const std::string& message, const std::string& request_id) {
        std::string m = where(op) + " failed: HTTP " + std::to_string(r.status) +
                        (type.empty() ? "" : " " + type) + (message.empty() ? "" : ": " + one_line(message)) +
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
        d.ParseInsitu(&copy[0]);
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
        struct BodyScrub {
            std::string& b;
            ~BodyScrub() { wipe(b); }
        } scrub{body};
        for (int attempt = 0;; ++attempt) {
            Credentials creds = credentials();
            aws::SigV4Request sr;
            sr.method = "POST";
            sr.headers = {{"Host", endpoint_.host},
                          {"Content-Type", "application/x-amz-json-1.1"},
                          {"X-Amz-Target", "TrentService." + op}};
            sr.body.swap(body);
            aws::sign(sr, creds, region_, "kms", std::time(nullptr));
            http::Request req = base_request(endpoint_.url);
            req.headers = sr.headers;
            req.body.swap(sr.body);
            for (auto& h : sr.headers) wipe(h.second);
            http::Response r;
            try {
                r = http::perform_with_retry(req, retry_, [](const http::Response& x) {
                    return http::transient_status(x.status) ||
                           (x.status == 400 && transient_type(type_of(x)));
                });
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
                a.doc.ParseInsitu(&a.text[0]);
                if (a.doc.HasParseError() || !a.doc.IsObject())
                    throw unavailable(where(op) + ": the answer is not a JSON object" + rid(a.request_id));
                return;
            }
            std::string type, message;
            {
                r.body = a.text;
                type = type_of(r);
                rapidjson::Document d;
                d.ParseInsitu(&r.body[0]);
                if (!d.HasParseError() && d.IsObject())
                    for (const char* k : {"message", "Message"})
                        if (const rapidjson::Value* v = member(d, k); v && v->IsString())
                            message = v->GetString();
                wipe(r.body);
            }
            // Temporary credentials that expired early: fetch new ones once.
            if (attempt == 0 && (type == "ExpiredTokenException") &&
                (source_ == CredSource::WebIdentity || source_ == CredSource::Imds)) {
                forget_cached_credentials();
                continue;
            }
            classify_error(op, r, type, message, a.request_id);
        }
    }

    KeyConfig cfg_;
    std::string region_;
    Endpoint endpoint_, sts_endpoint_;
    std::string ca_file_;
    long timeout_ms_ = 5000, connect_timeout_ms_ = 3000;
    http::RetryPolicy retry_;
    std::vector<std::pair<std::string, std::string>> context_;
    CredSource source_ = CredSource::Environment;
    std::string token_file_, role_arn_, session_name_, imds_;
    std::mutex mu_;
    Credentials cached_;
};

}  // namespace

std::unique_ptr<KeyProvider> make_aws_provider(const KeyConfig& cfg) {
    return std::make_unique<AwsKmsProvider>(cfg);
}

}  // namespace cmk
