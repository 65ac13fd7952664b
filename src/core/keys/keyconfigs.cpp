// Named key configurations (keyconfigs.hpp): configs.json, MAC'd under a key derived
// from the KEK of the generation the file names.
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"

#include <sys/stat.h>

#include <rapidjson/document.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

#include <cerrno>
#include <cstring>

#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk {
namespace {

std::string path_of(const std::string& dir) {
    return dir + "/" + kConfigsFile;
}

std::string canonical(const KeyConfigSet& s) {
    std::string out = "cmk_lakebase key configurations v1\n";
    auto field = [&out](const std::string& name, const std::string& value) {
        canonical_field(out, name, value);
    };
    field("kek_generation", std::to_string(s.kek_generation));
    field("count", std::to_string(s.configs.size()));
    for (const auto& [name, c] : s.configs) {
        field("name", name);
        field("provider", c.config.provider);
        field("key_id", c.config.key_id);
        field("created_at", c.created_at);
        field("options", std::to_string(c.config.options.size()));
        for (const auto& o : c.config.options) field("option." + o.first, o.second);
    }
    return out;
}

std::string mac_of(const KeyConfigSet& s, const SecureBytes& kek) {
    SecureBytes k = hkdf_sha256(kek.data(), kek.size(), "cmk_lakebase configs mac v1", 32);
    std::string c = canonical(s);
    auto m = hmac_sha256(k.data(), k.size(), c.data(), c.size());
    return hex_encode(m.data(), m.size());
}

KmsError config_error(const std::string& m) {
    return KmsError(KmsErrorKind::Config, m);
}

}  // namespace

bool key_configs_exist(const std::string& dir) {
    struct stat st;
    return ::stat(path_of(dir).c_str(), &st) == 0;
}

KeyConfigSet load_key_configs(const std::string& dir, const KekLookup& kek_of) {
    KeyConfigSet s;
    std::string path = path_of(dir);
    if (!key_configs_exist(dir)) return s;
    std::string text;
    try {
        text = sys::read_file(path.c_str());
    } catch (const std::runtime_error& e) {
        throw KeyringError(e.what());
    }
    auto bad = [&path](const std::string& what) {
        return KeyringError("key configuration file \"" + path + "\" is damaged: " + what);
    };
    rapidjson::Document d;
    std::string why;
    if (!parse_json_bounded(d, text, &why)) throw bad(why);
    if (!d.IsObject()) throw bad("not a JSON object");
    auto it = d.FindMember("kek_generation");
    if (it == d.MemberEnd() || !it->value.IsUint()) throw bad("field \"kek_generation\" is missing");
    s.kek_generation = it->value.GetUint();
    it = d.FindMember("configs");
    if (it == d.MemberEnd() || !it->value.IsObject()) throw bad("field \"configs\" is missing");
    for (const auto& m : it->value.GetObject()) {
        NamedKeyConfig c;
        c.name.assign(m.name.GetString(), m.name.GetStringLength());
        if (!m.value.IsObject()) throw bad("configuration \"" + c.name + "\" is not an object");
        auto str = [&](const char* k) -> std::string {
            auto f = m.value.FindMember(k);
            if (f == m.value.MemberEnd() || !f->value.IsString())
                throw bad("configuration \"" + c.name + "\" has no string \"" + k + "\"");
            return std::string(f->value.GetString(), f->value.GetStringLength());
        };
        c.config.provider = str("provider");
        c.config.key_id = str("key_id");
        c.created_at = str("created_at");
        auto o = m.value.FindMember("options");
        if (o != m.value.MemberEnd()) {
            if (!o->value.IsObject()) throw bad("configuration \"" + c.name + "\" options are not an object");
            for (const auto& om : o->value.GetObject()) {
                if (!om.value.IsString())
                    throw bad("configuration \"" + c.name + "\" option is not a string");
                c.config.options[std::string(om.name.GetString(), om.name.GetStringLength())] =
                    std::string(om.value.GetString(), om.value.GetStringLength());
            }
        }
        s.configs[c.name] = std::move(c);
    }
    it = d.FindMember("mac");
    if (it == d.MemberEnd() || !it->value.IsString()) throw bad("field \"mac\" is missing");
    std::string mac(it->value.GetString(), it->value.GetStringLength());
    std::optional<SecureBytes> kek = kek_of(s.kek_generation);
    if (!kek)
        throw KeyringError("key configuration file \"" + path + "\" is sealed under KEK generation " +
                           std::to_string(s.kek_generation) + ", which this cluster no longer has");
    std::string want = mac_of(s, *kek);
    if (want.size() != mac.size() || !ct_equal(want.data(), mac.data(), mac.size()))
        throw KeyringError("key configuration file \"" + path +
                           "\" has been modified (its MAC does not verify); restore it from a backup "
                           "of this cluster's cmk_lakebase/ directory");
    return s;
}

void save_key_configs(const std::string& dir, const KeyConfigSet& s, const SecureBytes& kek) {
    rapidjson::StringBuffer sb;
    rapidjson::PrettyWriter<rapidjson::StringBuffer> w(sb);
    auto str = [&w](const std::string& v) {
        w.String(v.c_str(), static_cast<rapidjson::SizeType>(v.size()));
    };
    w.StartObject();
    w.Key("format");
    w.Int(1);
    w.Key("kek_generation");
    w.Uint(s.kek_generation);
    w.Key("configs");
    w.StartObject();
    for (const auto& [name, c] : s.configs) {
        w.Key(name.c_str(), static_cast<rapidjson::SizeType>(name.size()));
        w.StartObject();
        w.Key("provider");
        str(c.config.provider);
        w.Key("key_id");
        str(c.config.key_id);
        w.Key("created_at");
        str(c.created_at);
        w.Key("options");
        w.StartObject();
        for (const auto& o : c.config.options) {
            w.Key(o.first.c_str(), static_cast<rapidjson::SizeType>(o.first.size()));
            str(o.second);
        }
        w.EndObject();
        w.EndObject();
    }
    w.EndObject();
    w.Key("mac");
    str(mac_of(s, kek));
    w.EndObject();
    std::string text(sb.GetString(), sb.GetSize());
    text.push_back('\n');
    try {
        sys::write_file_atomic(path_of(dir).c_str(), text.data(), text.size(), 0600);
    } catch (const std::runtime_error& e) {
        throw KeyringError(e.what());
    }
}

void validate_config_name(const std::string& name) {
    bool ok = !name.empty() && name.size() <= 63;
    for (size_t i = 0; ok && i < name.size(); i++) {
        char c = name[i];
        bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        ok = alnum || (i > 0 && (c == '_' || c == '-'));
    }
    if (!ok)
        throw config_error("invalid key configuration name \"" + name +
                           "\": use 1 to 63 of a-z 0-9 _ -, starting with a letter or digit");
}

void validate_key_config(const KeyConfig& cfg) {
    for (const auto& o : cfg.options) {
        std::string k = o.first;
        for (char& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        bool secretish = false;
        for (const char* w : {"secret", "password", "token", "private_key", "credential"})
            if (k.find(w) != std::string::npos) secretish = true;
        auto ends = [&k](const char* suf) {
            size_t n = std::strlen(suf);
            return k.size() >= n && k.compare(k.size() - n, n, suf) == 0;
        };
        if (secretish && !ends("_file") && !ends("_env"))
            throw config_error("option \"" + o.first +
                               "\" looks like a secret: key configurations hold credentials references only "
                               "(name a file with \"" +
                               o.first + "_file\" or an environment variable with \"" + o.first + "_env\")");
    }
    (void)make_provider(cfg);  // provider-specific field checks, no KMS call
}

}  // namespace cmk
