// The AWS credential chain (aws_credentials.hpp) and the INI files it reads (parsed by
// aws_ini.cpp; a profile's credential_process runs in aws_process.cpp). Every
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
#include <vector>

#include "aws.hpp"
#include "aws_process.hpp"
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

namespace {

// Wipes every string of an IniFile (credentials files hold secret keys).
struct IniScrub {
    IniFile& ini;
    ~IniScrub() {
        for (auto& sec : ini)
            for (auto& kv : sec.second) wipe(kv.second);
    }
};

// 0 (does not expire) when absent or not a time; a time without a zone is UTC.
std::time_t parse_iso8601(const std::string& s) {
    std::time_t t = 0;
    return kit::parse_utc_time(s, &t) || kit::parse_utc_time(s + "Z", &t) ? t : 0;
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

enum class CredSource { Environment, WebIdentity, SharedFile, ConfigFile, Imds, Process };

const char* source_name(CredSource s) {  // in the order of CredSource
    static const char* const kNames[] = {
        "environment (AWS_ACCESS_KEY_ID)", "web identity token (STS AssumeRoleWithWebIdentity)",
        "shared credentials file", "config file", "EC2 instance metadata (IMDSv2)", "credential_process"};
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

namespace {

bool chars_in(const std::string& s, const char* extra) {
    for (char c : s)
        if (!std::isalnum(static_cast<unsigned char>(c)) && !std::strchr(extra, c)) return false;
    return true;
}

}  // namespace

void validate_role_hop(const RoleHop& hop, const std::string& arn_field, const std::string& external_id_field,
                       const std::string& session_field, const std::string& duration_field) {
    // arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME
    const std::string& a = hop.role_arn;
    std::vector<std::string> f;
    size_t i = 0;
    for (int n = 0; n < 5 && i != std::string::npos; ++n) {
        size_t j = a.find(':', i);
        f.push_back(a.substr(i, j == std::string::npos ? std::string::npos : j - i));
        i = j == std::string::npos ? j : j + 1;
    }
    std::string res = i == std::string::npos ? "" : a.substr(i);
    bool ok = f.size() == 5 && f[0] == "arn" && f[1].compare(0, 3, "aws") == 0 && f[2] == "iam" && f[3].empty() &&
              f[4].size() == 12 && std::all_of(f[4].begin(), f[4].end(), ::isdigit) &&
              res.compare(0, 5, "role/") == 0 && res.size() > 5 && res.back() != '/' && res.size() <= 512 &&
              chars_in(res, "_+=,.@-/");
    if (!ok)
        throw config_error(arn_field + ": \"" + kit::one_line(a, 120) +
                           "\" is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)");
    const std::string& x = hop.external_id;
    if (!x.empty() && (x.size() < 2 || x.size() > 1224 || !chars_in(x, "_+=,.@:/-")))
        throw config_error(external_id_field +
                           ": must be 2 to 1224 characters of letters, digits and _+=,.@:/- (as STS accepts)");
    const std::string& sn = hop.session_name;
    if (sn.size() < 2 || sn.size() > 64 || !chars_in(sn, "_+=,.@-"))
        throw config_error(session_field + ": \"" + kit::one_line(sn, 80) +
                           "\" must be 2 to 64 characters of letters, digits and _+=,.@-");
    if (hop.duration_s < 900 || hop.duration_s > 43200)
        throw config_error(duration_field + ": " + std::to_string(hop.duration_s) +
                           " is not a number of seconds from 900 to 43200");
}

std::string assume_role_body(const RoleHop& hop) {
    std::string b = "Action=AssumeRole&Version=2011-06-15&RoleArn=" + http::url_encode(hop.role_arn) +
                    "&RoleSessionName=" + http::url_encode(hop.session_name) +
                    "&DurationSeconds=" + std::to_string(hop.duration_s);
    if (!hop.external_id.empty()) b += "&ExternalId=" + http::url_encode(hop.external_id);
    return b;
}

SigV4Request assume_role_request(const Endpoint& sts, const RoleHop& hop) {
    SigV4Request r;
    r.method = "POST";
    r.headers = {{"Host", sts.host}, {"Content-Type", "application/x-www-form-urlencoded; charset=utf-8"}};
    r.body = assume_role_body(hop);
    return r;
}

AssumedRole parse_assumed_role(const std::string& xml, const std::string& what) {
    if (xml.size() > (64u << 10)) throw unavailable(what + ": the answer is larger than 64 KiB");
    AssumedRole a;
    a.creds.access_key_id = trim(xml_text(xml, "AccessKeyId"));
    std::string sk = xml_text(xml, "SecretAccessKey"), tk = xml_text(xml, "SessionToken");
    a.creds.secret_access_key = Secret(trim(sk));
    a.creds.session_token = Secret(trim(tk));
    wipe(sk);
    wipe(tk);
    a.creds.expiration = parse_iso8601(trim(xml_text(xml, "Expiration")));
    // AssumedRoleUser holds the only <Arn> of the answer.
    a.assumed_role_arn = trim(xml_text(xml, "Arn"));
    a.request_id = trim(xml_text(xml, "RequestId"));
    if (a.creds.access_key_id.empty() || a.creds.secret_access_key.empty() || a.creds.session_token.empty())
        throw unavailable(what + ": the answer has no credentials" + kit::request_id_note(a.request_id));
    return a;
}

KmsError sts_error(long status, const std::string& xml, const std::string& what, const std::string& arn_field,
                   const std::string& request_id) {
    std::string bounded = xml.size() > (64u << 10) ? std::string() : xml;
    std::string code = trim(xml_text(bounded, "Code")), msg = xml_text(bounded, "Message");
    std::string rid = request_id.empty() ? trim(xml_text(bounded, "RequestId")) : request_id;
    std::string m = what + " failed: HTTP " + std::to_string(status) + (code.empty() ? "" : " " + code) +
                    (msg.empty() ? "" : ": " + kit::one_line(msg, 240)) + kit::request_id_note(rid);
    if (status < 500 && code == "AccessDenied")
        return revoked(m + "; the role's trust policy no longer admits this identity (role deleted, trust "
                           "changed or external id rotated)");
    if (status < 500 && code == "InvalidClientTokenId")
        return revoked(m + "; the base credentials are not recognised");
    if (status < 500 && (code == "ValidationError" || code == "MalformedPolicyDocument"))
        return config_error(arn_field + ": " + m);
    return unavailable(m);  // 5xx, throttling, signature or clock trouble, region disabled, unknown
}

struct CredentialChain::Impl {
    Impl(const KeyConfig& cfg, Endpoint sts, ChainTransport transport)
        : cfg_(cfg), sts_endpoint_(std::move(sts)), transport_(std::move(transport)) {
        retry_.attempts = transport_.timing.attempts;
        plan_credentials();
        plan_option_role();
    }

    // The customer's role named by the key configuration: one AssumeRole on top of
    // whatever the chain's base (or profile) credentials are.
    void plan_option_role() {
        RoleHop hop;
        hop.role_arn = kit::option(cfg_, "assume_role_arn");
        hop.external_id = kit::option(cfg_, "external_id");
        hop.session_name = kit::option(cfg_, "assume_role_session_name", "cmk_lakebase");
        if (hop.role_arn.empty()) {
            for (const char* k : {"external_id", "assume_role_session_name", "assume_role_duration"})
                if (!kit::option(cfg_, k).empty())
                    throw config_error(std::string(k) + ": given without assume_role_arn (the role to assume)");
            return;
        }
        hop.duration_s = kit::int_option(cfg_, "assume_role_duration", 3600, 900, 43200, "seconds");
        hop.where = "assume_role_arn";
        validate_role_hop(hop, "assume_role_arn", "external_id", "assume_role_session_name",
                          "assume_role_duration");
        hops_.push_back(std::move(hop));
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

    // A profile's credential_process: split and checked now (a one-line configuration
    // error naming the profile), run when credentials are needed.
    void plan_process(const std::string& profile, const std::string& command) {
        const std::string field = "profile: profile \"" + profile + "\" credential_process";
        process_argv_ = split_process_command(field, command);
        check_process_executable(field, process_argv_);
        base_profile_ = profile;
        source_ = CredSource::Process;
    }

    // The helper's credentials (cached by the caller until five minutes before their
    // Expiration; without one, for the provider's life, as the AWS SDKs do). A helper
    // that fails is an outage: its credentials may come back.
    Credentials from_process() {
        const std::string what = "credential_process of profile \"" + base_profile_ + "\"";
        std::string out = run_credential_process(process_argv_, transport_.timing.timeout_ms, what);
        return parse_process_output(out, what);
    }

    std::string source_label() const {
        if (source_ == CredSource::Process) return "credential_process of profile \"" + base_profile_ + "\"";
        return source_name(source_);
    }

    void plan_imds() {
        std::string ep = kit::option(cfg_, "imds_endpoint");
        if (ep.empty()) ep = env("AWS_EC2_METADATA_SERVICE_ENDPOINT");
        if (ep.empty()) ep = "http://169.254.169.254";
        while (!ep.empty() && ep.back() == '/') ep.pop_back();
        if (ep.compare(0, 7, "http://") != 0 && ep.compare(0, 8, "https://") != 0)
            throw config_error("imds_endpoint: \"" + ep + "\" is not an http:// URL");
        imds_ = ep;
        source_ = CredSource::Imds;
    }

    // A profile's credentials: static keys (credentials file first, then config file),
    // or a role_arn assumed from its source_profile (itself resolved the same way, at
    // most 5 deep) or from its credential_source (Environment, Ec2InstanceMetadata).
    // Sets source_/base_profile_ and puts the role hops before those already planned.
    // False when the profile has nothing; throws Config for what cannot work.
    bool resolve_profile(const std::string& name, const IniFile& conf, const IniFile& shared,
                         std::set<std::string>& seen) {
        const std::string where_c = config_file(), where_s = shared_file();
        auto fail = [&](const std::string& why) -> KmsError {
            return config_error("profile: profile \"" + name + "\" " + why);
        };
        if (!seen.insert(name).second) throw fail("is part of a source_profile loop");
        if (seen.size() > 5) throw fail("is more than 5 source_profile steps deep");
        auto it = shared.find(name);
        const std::map<std::string, std::string>* ssec = it == shared.end() ? nullptr : &it->second;
        const auto* csec = config_section(conf, name);
        if (!ssec && !csec) return false;
        auto get = [&](const char* k) {
            std::string v = value(csec, k);
            return v.empty() ? value(ssec, k) : v;
        };
        auto static_keys = [&]() -> bool {
            for (const auto& [sec, where, src] : {std::make_tuple(ssec, where_s, CredSource::SharedFile),
                                                  std::make_tuple(csec, where_c, CredSource::ConfigFile)}) {
                if (!sec) continue;
                bool ak = !value(sec, "aws_access_key_id").empty(),
                     sk = !value(sec, "aws_secret_access_key").empty();
                if (ak && sk) {
                    source_ = src;
                    base_profile_ = name;
                    return true;
                }
                if (ak || sk)
                    throw fail("in " + where + " has " +
                               (ak ? "aws_access_key_id but no aws_secret_access_key"
                                   : "aws_secret_access_key but no aws_access_key_id"));
            }
            return false;
        };
        const std::string role = get("role_arn");
        if (role.empty()) {
            if (static_keys()) return true;
            const std::string proc = get("credential_process");
            if (!proc.empty()) {
                plan_process(name, proc);
                return true;
            }
            for (const char* k : {"sso_start_url", "sso_session", "source_profile"})
                if (!get(k).empty())
                    throw fail(std::string("uses ") + k +
                               (std::string(k) == "source_profile"
                                    ? " without role_arn"
                                    : ", which the aws key provider does not support; give static keys, a "
                                      "role_arn with source_profile or credential_source, a credential_process, a "
                                      "web identity token file, or use IMDS"));
            return false;
        }
        RoleHop hop;
        hop.role_arn = role;
        hop.external_id = get("external_id");
        hop.session_name = get("role_session_name");
        if (hop.session_name.empty()) hop.session_name = "cmk_lakebase";
        std::string dur = get("duration_seconds");
        if (!dur.empty()) {
            if (dur.size() > 6 || !std::all_of(dur.begin(), dur.end(), ::isdigit))
                throw fail("duration_seconds \"" + dur + "\" is not a number of seconds from 900 to 43200");
            hop.duration_s = std::stol(dur);
        }
        hop.where = "profile";
        try {
            validate_role_hop(hop, "role_arn", "external_id", "role_session_name", "duration_seconds");
        } catch (const KmsError& e) {
            throw fail(std::string("in ") + where_c + ": " + e.what());
        }
        hops_.insert(hops_.begin(), std::move(hop));
        const std::string src = get("source_profile"), cs = get("credential_source");
        if (!src.empty() && !cs.empty()) throw fail("has both source_profile and credential_source");
        if (!cs.empty()) {
            if (cs == "Environment") {
                if (env("AWS_ACCESS_KEY_ID").empty() || env("AWS_SECRET_ACCESS_KEY").empty())
                    throw fail("has credential_source Environment but AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                               "are not set");
                source_ = CredSource::Environment;
                return true;
            }
            if (cs == "Ec2InstanceMetadata") {
                plan_imds();
                return true;
            }
            throw fail("has credential_source \"" + cs +
                       "\", which the aws key provider does not support (Environment, Ec2InstanceMetadata)");
        }
        if (src.empty()) throw fail("has role_arn but neither source_profile nor credential_source");
        if (src == name) {
            if (static_keys()) return true;
            throw fail("is its own source_profile but has no static keys");
        }
        if (!resolve_profile(src, conf, shared, seen))
            throw fail("has source_profile \"" + src + "\", which has no credentials in " + where_s + " or " +
                       where_c);
        return true;
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
        // role_arn is the web identity token's role; alone it would go unused, silently.
        if (!kit::option(cfg_, "role_arn").empty() && kit::option(cfg_, "web_identity_token_file").empty() &&
            env("AWS_WEB_IDENTITY_TOKEN_FILE").empty())
            throw config_error(
                "role_arn: names the role of a web identity token, but no web identity token file is "
                "configured; to assume the customer's role from the base credentials use assume_role_arn "
                "(with external_id)");

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
            std::set<std::string> seen;
            if (resolve_profile(profile, conf, shared, seen)) return;
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
                plan_imds();
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
    Credentials current_base() {
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
                    auto it = ini.find(base_profile_);
                    if (it != ini.end()) sec = &it->second;
                } else {
                    sec = config_section(ini, base_profile_);
                }
                c.access_key_id = value(sec, "aws_access_key_id");
                c.secret_access_key = Secret(value(sec, "aws_secret_access_key"));
                c.session_token = Secret(value(sec, "aws_session_token"));
                if (c.access_key_id.empty() || c.secret_access_key.empty())
                    throw config_error("profile: no credentials for profile \"" + base_profile_ + "\" in " +
                                       path);
                break;
            }
            case CredSource::WebIdentity:
            case CredSource::Imds:
            case CredSource::Process: {
                std::lock_guard<std::mutex> g(mu_);
                std::time_t now = std::time(nullptr);
                if (cached_.access_key_id.empty() || (cached_.expiration && cached_.expiration - 300 <= now))
                    cached_ = source_ == CredSource::WebIdentity ? assume_role_with_web_identity()
                              : source_ == CredSource::Imds      ? from_imds()
                                                                 : from_process();
                c.access_key_id = cached_.access_key_id;
                c.secret_access_key = Secret(cached_.secret_access_key.str());
                c.session_token = Secret(cached_.session_token.str());
                c.expiration = cached_.expiration;
                break;
            }
        }
        c.source = source_label();
        return c;
    }

    static Credentials copy_of(const Credentials& x) {
        Credentials c;
        c.access_key_id = x.access_key_id;
        c.secret_access_key = x.secret_access_key.copy();
        c.session_token = x.session_token.copy();
        c.expiration = x.expiration;
        c.source = x.source;
        return c;
    }

    // The credentials the KMS calls are signed with: the base's, or those of the last
    // role of the chain, kept until five minutes before they expire. The refresh
    // happens in whichever call finds them stale: in a running server that is the
    // watchdog's probe (nothing else calls the KMS between start and a key operation).
    Credentials current() {
        if (hops_.empty()) return current_base();
        std::lock_guard<std::mutex> g(assume_mu_);
        std::time_t now = std::time(nullptr);
        if (!assumed_.access_key_id.empty() && !(assumed_.expiration && assumed_.expiration - 300 <= now))
            return copy_of(assumed_);
        Credentials c = current_base();
        std::string from = c.source;
        for (const RoleHop& hop : hops_) {
            AssumedRole a = assume_role(c, hop);
            c = std::move(a.creds);
            assumed_arn_ = a.assumed_role_arn.empty() ? "role " + hop.role_arn : a.assumed_role_arn;
        }
        c.source = "STS AssumeRole of " + hops_.back().role_arn + " from " + from;
        assumed_ = copy_of(c);
        return c;
    }

    AssumedRole assume_role(const Credentials& base, const RoleHop& hop) {
        const std::string what = "STS AssumeRole of " + hop.role_arn + " at " + sts_endpoint_.host;
        SigV4Request sr = assume_role_request(sts_endpoint_, hop);
        aws::sign(sr, base, transport_.region, "sts", std::time(nullptr));
        http::Request req = base_request(sts_endpoint_.url);
        req.headers.swap(sr.headers);
        req.body.swap(sr.body);
        http::Response resp = http::send_wiped(req, what, retry_);
        kit::WipeOnExit scrub{resp.body};
        const std::string rid = resp.header("x-amzn-requestid");
        if (resp.status != 200) throw sts_error(resp.status, resp.body, what, hop.where, rid);
        AssumedRole a = parse_assumed_role(resp.body, what);
        if (a.request_id.empty()) a.request_id = rid;
        return a;
    }

    std::string identity() const {
        if (!hops_.empty()) {
            std::lock_guard<std::mutex> g(assume_mu_);
            return assumed_arn_.empty() ? "role " + hops_.back().role_arn : assumed_arn_;
        }
        if (source_ == CredSource::WebIdentity) {
            std::lock_guard<std::mutex> g(mu_);
            return web_arn_.empty() ? "role " + role_arn_ : web_arn_;
        }
        return source_label();
    }

    void forget_cached_credentials() {
        {
            std::lock_guard<std::mutex> g(mu_);
            cached_ = Credentials{};
        }
        std::lock_guard<std::mutex> g(assume_mu_);
        assumed_ = Credentials{};
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
        kit::WipeOnExit scrub{resp.body};
        const std::string rid = resp.header("x-amzn-requestid");
        if (resp.status != 200) throw sts_error(resp.status, resp.body, what, "role_arn", rid);
        AssumedRole a = parse_assumed_role(resp.body, what);
        web_arn_ = a.assumed_role_arn;  // under mu_ (current() holds it)
        return std::move(a.creds);
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
    std::string base_profile_;  // the profile whose static keys (or credential_process) are the base
    std::vector<std::string> process_argv_;
    mutable std::mutex mu_;
    Credentials cached_;
    std::string web_arn_;
    std::vector<RoleHop> hops_;  // AssumeRole steps from the base to the customer's role
    mutable std::mutex assume_mu_;
    Credentials assumed_;
    std::string assumed_arn_;
};

CredentialChain::CredentialChain(const KeyConfig& cfg, Endpoint sts, ChainTransport transport)
    : impl_(std::make_unique<Impl>(cfg, std::move(sts), std::move(transport))) {}

CredentialChain::~CredentialChain() = default;

Credentials CredentialChain::get() {
    return impl_->current();
}

bool CredentialChain::temporary() const {
    return !impl_->hops_.empty() || impl_->source_ == CredSource::WebIdentity ||
           impl_->source_ == CredSource::Imds || impl_->source_ == CredSource::Process;
}

std::string CredentialChain::identity() const {
    return impl_->identity();
}

void CredentialChain::forget() {
    impl_->forget_cached_credentials();
}

}  // namespace cmk::aws
