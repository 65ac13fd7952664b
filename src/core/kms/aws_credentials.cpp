// The AWS credential chain (aws_credentials.hpp) and the INI files it reads. Every
// secret (secret access keys, session tokens, the web identity token, the whole text of
// a credentials file) is held in kit::Secret or wiped with kit::wipe on every path; a
// message names the file, profile or endpoint, never a secret.
#include "aws_credentials.hpp"

#include <openssl/crypto.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <mutex>
#include <set>
#include <tuple>

#include "aws.hpp"
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::aws {

using kit::config_error;
using kit::env;
using kit::home_dir;
using kit::revoked;
using kit::Secret;
using kit::trim;
using kit::truthy;
using kit::unavailable;
using kit::wipe;

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

namespace {

// Wipes every string of an IniFile (credentials files hold secret keys).
struct IniScrub {
    IniFile& ini;
    ~IniScrub() {
        for (auto& sec : ini)
            for (auto& kv : sec.second) wipe(kv.second);
    }
};

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

enum class CredSource { Environment, WebIdentity, SharedFile, ConfigFile, Imds };

const char* source_name(CredSource s) {  // in the order of CredSource
    static const char* const kNames[] = {
        "environment (AWS_ACCESS_KEY_ID)", "web identity token (STS AssumeRoleWithWebIdentity)",
        "shared credentials file", "config file", "EC2 instance metadata (IMDSv2)"};
    return kNames[static_cast<int>(s)];
}

}  // namespace

// TLS is never switched off for a remote endpoint by a configuration typo.
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
    if (!https && !kit::loopback_authority(host))
        throw config_error(field + ": \"" + url +
                           "\" uses plain http to a non-loopback host; use https:// (TLS is required)");
    return Endpoint{(https ? "https://" : "http://") + host + "/", host};
}

struct CredentialChain::Impl {
    Impl(const KeyConfig& cfg, Endpoint sts, ChainTransport transport)
        : cfg_(cfg), sts_endpoint_(std::move(sts)), transport_(std::move(transport)) {
        retry_.attempts = transport_.timing.attempts;
        plan_credentials();
    }

    std::string profile_name() const {
        std::string p = kit::option(cfg_, "profile");
        if (p.empty()) p = env("AWS_PROFILE");
        return p.empty() ? "default" : p;
    }
    bool profile_explicit() const {
        return !kit::option(cfg_, "profile").empty() || !env("AWS_PROFILE").empty();
    }
    std::string shared_file() const {
        std::string f = kit::option(cfg_, "shared_credentials_file");
        if (f.empty()) f = env("AWS_SHARED_CREDENTIALS_FILE");
        if (f.empty()) f = home_dir() + "/.aws/credentials";
        return f;
    }
    std::string config_file() const {
        std::string f = kit::option(cfg_, "config_file");
        if (f.empty()) f = env("AWS_CONFIG_FILE");
        if (f.empty()) f = home_dir() + "/.aws/config";
        return f;
    }

    // A file of the chain: absent is fine (returns empty), unreadable is not.
    static IniFile load_ini(const std::string& field, const std::string& path, bool must_exist) {
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
        IniFile ini = parse_ini(text);
        wipe(text);
        return ini;
    }

    // The profile's section in the config file: "[profile NAME]", or "[default]".
    static const std::map<std::string, std::string>* config_section(const IniFile& ini,
                                                                    const std::string& p) {
        auto it = ini.find("profile " + p);
        if (it == ini.end() && p == "default") it = ini.find("default");
        return it == ini.end() ? nullptr : &it->second;
    }

    static std::string value(const std::map<std::string, std::string>* sec, const std::string& k) {
        if (!sec) return "";
        auto it = sec->find(k);
        return it == sec->end() ? "" : it->second;
    }

    // Decides the source of credentials now, without a network call: the first of the
    // chain that is configured. Throws Config naming what is missing.
    void plan_credentials() {
        const std::string want = kit::option(cfg_, "credentials", "auto");
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
        IniFile conf =
            load_ini("config_file", config_file(), !kit::option(cfg_, "config_file").empty());
        IniScrub conf_scrub{conf};
        const auto* csec = config_section(conf, profile);

        if (any || want == "web_identity") {
            token_file_ = kit::option(cfg_, "web_identity_token_file");
            if (token_file_.empty()) token_file_ = env("AWS_WEB_IDENTITY_TOKEN_FILE");
            if (token_file_.empty()) token_file_ = value(csec, "web_identity_token_file");
            role_arn_ = kit::option(cfg_, "role_arn");
            if (role_arn_.empty()) role_arn_ = env("AWS_ROLE_ARN");
            if (role_arn_.empty()) role_arn_ = value(csec, "role_arn");
            session_name_ = kit::option(cfg_, "role_session_name");
            if (session_name_.empty()) session_name_ = env("AWS_ROLE_SESSION_NAME");
            if (session_name_.empty()) session_name_ = "cmk_lakebase";
            if (!token_file_.empty()) {
                kit::require_readable_file("web_identity_token_file", token_file_);
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
            IniFile shared = load_ini("shared_credentials_file", sf,
                                           !kit::option(cfg_, "shared_credentials_file").empty());
            IniScrub shared_scrub{shared};
            auto it = shared.find(profile);
            const std::map<std::string, std::string>* ssec = it == shared.end() ? nullptr : &it->second;
            for (const auto& [sec, where, src] :
                 {std::make_tuple(ssec, sf, CredSource::SharedFile),
                  std::make_tuple(csec, config_file(), CredSource::ConfigFile)}) {
                if (!sec) continue;
                bool ak = !value(sec, "aws_access_key_id").empty(),
                     sk = !value(sec, "aws_secret_access_key").empty();
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
                    if (!value(sec, k).empty())
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
                std::string ep = kit::option(cfg_, "imds_endpoint");
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
    Credentials current() {
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
                IniFile ini = load_ini(shared ? "shared_credentials_file" : "config_file", path, true);
                IniScrub scrub{ini};
                const std::map<std::string, std::string>* sec = nullptr;
                if (shared) {
                    auto it = ini.find(profile_name());
                    if (it != ini.end()) sec = &it->second;
                } else {
                    sec = config_section(ini, profile_name());
                }
                c.access_key_id = value(sec, "aws_access_key_id");
                c.secret_access_key = Secret(value(sec, "aws_secret_access_key"));
                c.session_token = Secret(value(sec, "aws_session_token"));
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
        return http::request("POST", url, transport_.timing, transport_.ca_file);
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
                            (code.empty() ? "" : " " + code) +
                            (msg.empty() ? "" : ": " + kit::one_line(msg, 240)) +
                            kit::request_id_note(resp.header("x-amzn-requestid"));
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
        put.connect_timeout_ms = std::min(transport_.timing.connect_timeout_ms, 1000L);
        put.timeout_ms = std::min(transport_.timing.timeout_ms, 2000L);
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
        parse_json_bounded_insitu(d, cr.body, nullptr);
        Credentials c;
        auto str = [&](const char* k) -> std::string {
            const rapidjson::Value* v = kit::member(d, k);
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

    KeyConfig cfg_;
    Endpoint sts_endpoint_;
    ChainTransport transport_;
    http::RetryPolicy retry_;
    CredSource source_ = CredSource::Environment;
    std::string token_file_, role_arn_, session_name_, imds_;
    std::mutex mu_;
    Credentials cached_;
};

CredentialChain::CredentialChain(const KeyConfig& cfg, Endpoint sts, ChainTransport transport)
    : impl_(std::make_unique<Impl>(cfg, std::move(sts), std::move(transport))) {}

CredentialChain::~CredentialChain() = default;

Credentials CredentialChain::get() {
    return impl_->current();
}

bool CredentialChain::temporary() const {
    return impl_->source_ == CredSource::WebIdentity || impl_->source_ == CredSource::Imds;
}

void CredentialChain::forget() {
    impl_->forget_cached_credentials();
}

}  // namespace cmk::aws
