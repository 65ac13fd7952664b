// The keyring (keyring.hpp): <datadir>/cmk_lakebase/keyring.json, the cluster's key
// configuration and the KMS's ciphertext of the KEK. It holds no secret, but its
// fields decide which KMS key the cluster trusts, so a MAC keyed by the KEK covers
// every field: an edited key id or key store path is detected as soon as the KEK is
// unwrapped, before anything is decrypted with it.
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/keys/keyring.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>

#include <cerrno>
#include <cstring>
#include <ctime>

#include "cmk_lakebase/base/sys.hpp"

namespace cmk {
namespace {

std::string keyring_path(const std::string& dir) {
    return dir + "/" + kKeyringFile;
}

// Canonical, unambiguous serialization of every field except the MAC: each field as
// name NUL length ':' value LF, options in key order (std::map).
std::string canonical(const Keyring& kr) {
    std::string out = "cmk_lakebase keyring v1\n";
    auto field = [&out](const std::string& name, const std::string& value) {
        canonical_field(out, name, value);
    };
    field("format", std::to_string(kr.format));
    field("cluster_id", kr.cluster_id);
    field("config.provider", kr.config.provider);
    field("config.key_id", kr.config.key_id);
    field("config.options", std::to_string(kr.config.options.size()));
    for (const auto& o : kr.config.options) field("config.options." + o.first, o.second);
    field("wrapped_kek", base64_encode(kr.wrapped_kek.data(), kr.wrapped_kek.size()));
    field("kek_version", kr.kek_version);
    field("kek_fingerprint", kr.kek_fingerprint);
    field("kek_generation", std::to_string(kr.kek_generation));
    field("created_at", kr.created_at);
    // Fields added in 0.3.0 take part only when set, so that a keyring written by an
    // earlier version keeps its MAC.
    if (!kr.config_name.empty()) field("config_name", kr.config_name);
    if (!kr.rotated_at.empty()) field("rotated_at", kr.rotated_at);
    if (kr.previous) {
        field("previous.wrapped_kek",
              base64_encode(kr.previous->wrapped_kek.data(), kr.previous->wrapped_kek.size()));
        field("previous.kek_version", kr.previous->kek_version);
        field("previous.kek_fingerprint", kr.previous->kek_fingerprint);
        field("previous.kek_generation", std::to_string(kr.previous->kek_generation));
    }
    return out;
}

// An unkeyed checksum of the wrapped KEK (no secret; outside the MAC, which needs the
// KEK): a damaged wrapped KEK is told apart from a key the provider refuses before any
// KMS call (issue 18). Keyrings written before it have none and are not checked.
std::string wrapped_kek_check(const std::vector<uint8_t>& w) {
    static const char label[] = "cmk_lakebase wrapped_kek check v1";
    auto h = hmac_sha256(reinterpret_cast<const uint8_t*>(label), sizeof label - 1, w.data(), w.size());
    return hex_encode(h.data(), 16);
}

std::string compute_mac(const Keyring& kr, const SecureBytes& kek) {
    std::string c = canonical(kr);
    auto mac = hmac_sha256(kek.data(), kek.size(), c.data(), c.size());
    return hex_encode(mac.data(), mac.size());
}

}  // namespace

void canonical_field(std::string& out, const std::string& name, const std::string& value) {
    out += name;
    out.push_back('\0');
    out += std::to_string(value.size());
    out.push_back(':');
    out += value;
    out.push_back('\n');
}

const std::string& Keyring::bound_name() const {
    static const std::string def = kDefaultConfigName;
    return config_name.empty() ? def : config_name;
}

std::string keyring_dir_for(const std::string& datadir) {
    std::string d = datadir;
    while (d.size() > 1 && d.back() == '/') d.pop_back();
    return d + "/" + kKeyringDirName;
}

bool keyring_exists(const std::string& dir) {
    struct stat st;
    return ::stat(keyring_path(dir).c_str(), &st) == 0;
}

Keyring load_keyring(const std::string& dir) {
    std::string path = keyring_path(dir);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
        if (errno == ENOENT)
            throw KeyringError("data directory is not encrypted by cmk_lakebase: \"" + path +
                               "\" is missing");
        throw KeyringError("could not access keyring \"" + path + "\": " + std::strerror(errno));
    }
    std::string text;
    try {
        text = sys::read_file(path.c_str());
    } catch (const std::runtime_error& e) {
        throw KeyringError(e.what());
    }
    rapidjson::Document d;
    std::string why;
    if (!parse_json_bounded(d, text, &why)) throw KeyringError("keyring \"" + path + "\" is damaged: " + why);
    if (!d.IsObject()) throw KeyringError("keyring \"" + path + "\" is damaged: not a JSON object");
    auto bad = [&path](const std::string& field, const std::string& what) {
        return KeyringError("keyring \"" + path + "\" is damaged: field \"" + field + "\" " + what);
    };
    auto get_string = [&](const rapidjson::Value& o, const char* name, const std::string& full,
                          bool required) -> std::string {
        auto it = o.FindMember(name);
        if (it == o.MemberEnd()) {
            if (required) throw bad(full, "is missing");
            return "";
        }
        if (!it->value.IsString()) throw bad(full, "is not a string");
        return std::string(it->value.GetString(), it->value.GetStringLength());
    };

    Keyring kr;
    auto it = d.FindMember("format");
    if (it == d.MemberEnd()) throw bad("format", "is missing");
    if (!it->value.IsInt()) throw bad("format", "is not an integer");
    kr.format = it->value.GetInt();
    if (kr.format != 1)
        throw KeyringError("keyring \"" + path + "\" has format " + std::to_string(kr.format) +
                           ", which this version of cmk_lakebase does not know");
    kr.cluster_id = get_string(d, "cluster_id", "cluster_id", true);
    if (kr.cluster_id.empty()) throw bad("cluster_id", "is empty");

    it = d.FindMember("config");
    if (it == d.MemberEnd()) throw bad("config", "is missing");
    if (!it->value.IsObject()) throw bad("config", "is not an object");
    const rapidjson::Value& cfg = it->value;
    kr.config.provider = get_string(cfg, "provider", "config.provider", true);
    kr.config.key_id = get_string(cfg, "key_id", "config.key_id", true);
    auto oit = cfg.FindMember("options");
    if (oit != cfg.MemberEnd()) {
        if (!oit->value.IsObject()) throw bad("config.options", "is not an object");
        for (const auto& m : oit->value.GetObject()) {
            std::string k(m.name.GetString(), m.name.GetStringLength());
            if (!m.value.IsString()) throw bad("config.options." + k, "is not a string");
            kr.config.options[k] = std::string(m.value.GetString(), m.value.GetStringLength());
        }
    }

    std::string wk = get_string(d, "wrapped_kek", "wrapped_kek", true);
    try {
        kr.wrapped_kek = base64_decode(wk);
    } catch (const CryptoError&) {
        throw bad("wrapped_kek", "is not valid base64");
    }
    if (kr.wrapped_kek.empty()) throw bad("wrapped_kek", "is empty");
    std::string check = get_string(d, "wrapped_kek_check", "wrapped_kek_check", false);
    if (!check.empty() && check != wrapped_kek_check(kr.wrapped_kek))
        throw bad("wrapped_kek", "does not match its checksum (wrapped_kek_check): the wrapped key-encryption "
                                 "key is damaged");
    kr.kek_version = get_string(d, "kek_version", "kek_version", false);
    kr.kek_fingerprint = get_string(d, "kek_fingerprint", "kek_fingerprint", true);
    if (kr.kek_fingerprint.size() != 32) throw bad("kek_fingerprint", "is not a 32-digit hex fingerprint");
    it = d.FindMember("kek_generation");
    if (it == d.MemberEnd()) throw bad("kek_generation", "is missing");
    if (!it->value.IsUint() || it->value.GetUint() == 0)
        throw bad("kek_generation", "is not a positive integer");
    kr.kek_generation = it->value.GetUint();
    kr.created_at = get_string(d, "created_at", "created_at", false);
    kr.config_name = get_string(d, "config_name", "config_name", false);
    kr.rotated_at = get_string(d, "rotated_at", "rotated_at", false);
    it = d.FindMember("previous");
    if (it != d.MemberEnd() && !it->value.IsNull()) {
        if (!it->value.IsObject()) throw bad("previous", "is not an object");
        const rapidjson::Value& pv = it->value;
        PreviousKek p;
        try {
            p.wrapped_kek = base64_decode(get_string(pv, "wrapped_kek", "previous.wrapped_kek", true));
        } catch (const CryptoError&) {
            throw bad("previous.wrapped_kek", "is not valid base64");
        }
        p.kek_version = get_string(pv, "kek_version", "previous.kek_version", false);
        p.kek_fingerprint = get_string(pv, "kek_fingerprint", "previous.kek_fingerprint", true);
        auto git = pv.FindMember("kek_generation");
        if (git == pv.MemberEnd() || !git->value.IsUint() || git->value.GetUint() == 0)
            throw bad("previous.kek_generation", "is not a positive integer");
        p.kek_generation = git->value.GetUint();
        kr.previous = std::move(p);
    }
    kr.mac = get_string(d, "mac", "mac", true);
    if (kr.mac.size() != 64) throw bad("mac", "is not a 64-digit hex MAC");
    return kr;
}

void save_keyring(const std::string& dir, const Keyring& kr) {
    save_keyring(dir, kr, nullptr);
}

void save_keyring(const std::string& dir, const Keyring& kr, const std::function<void()>& before_rename) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
        throw KeyringError("could not create directory \"" + dir + "\": " + std::strerror(errno));
    rapidjson::StringBuffer sb;
    rapidjson::PrettyWriter<rapidjson::StringBuffer> w(sb);
    auto str = [&w](const std::string& s) {
        w.String(s.c_str(), static_cast<rapidjson::SizeType>(s.size()));
    };
    w.StartObject();
    w.Key("format");
    w.Int(kr.format);
    w.Key("cluster_id");
    str(kr.cluster_id);
    w.Key("config");
    w.StartObject();
    w.Key("provider");
    str(kr.config.provider);
    w.Key("key_id");
    str(kr.config.key_id);
    w.Key("options");
    w.StartObject();
    for (const auto& o : kr.config.options) {
        w.Key(o.first.c_str(), static_cast<rapidjson::SizeType>(o.first.size()));
        str(o.second);
    }
    w.EndObject();
    w.EndObject();
    w.Key("wrapped_kek");
    str(base64_encode(kr.wrapped_kek.data(), kr.wrapped_kek.size()));
    w.Key("wrapped_kek_check");
    str(wrapped_kek_check(kr.wrapped_kek));
    w.Key("kek_version");
    str(kr.kek_version);
    w.Key("kek_fingerprint");
    str(kr.kek_fingerprint);
    w.Key("kek_generation");
    w.Uint(kr.kek_generation);
    w.Key("created_at");
    str(kr.created_at);
    if (!kr.config_name.empty()) {
        w.Key("config_name");
        str(kr.config_name);
    }
    if (!kr.rotated_at.empty()) {
        w.Key("rotated_at");
        str(kr.rotated_at);
    }
    if (kr.previous) {
        w.Key("previous");
        w.StartObject();
        w.Key("wrapped_kek");
        str(base64_encode(kr.previous->wrapped_kek.data(), kr.previous->wrapped_kek.size()));
        w.Key("kek_version");
        str(kr.previous->kek_version);
        w.Key("kek_fingerprint");
        str(kr.previous->kek_fingerprint);
        w.Key("kek_generation");
        w.Uint(kr.previous->kek_generation);
        w.EndObject();
    }
    w.Key("mac");
    str(kr.mac);
    w.EndObject();
    std::string text(sb.GetString(), sb.GetSize());
    text.push_back('\n');
    if (!before_rename) {
        try {
            sys::write_file_atomic(keyring_path(dir).c_str(), text.data(), text.size(), 0600);
        } catch (const std::runtime_error& e) {
            throw KeyringError(e.what());
        }
        return;
    }
    // write, fsync, (hook), rename, fsync directory: a crash anywhere leaves the old
    // or the new keyring.json, never a mixture.
    std::string path = keyring_path(dir), tmp = path + ".tmp";
    int fd = sys::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) throw KeyringError("could not create \"" + tmp + "\": " + std::strerror(errno));
    if (sys::write_full(fd, text.data(), text.size()) != 0 || ::fsync(fd) != 0) {
        std::string e = std::strerror(errno);
        sys::close(fd);
        sys::unlink(tmp.c_str());
        throw KeyringError("could not write \"" + tmp + "\": " + e);
    }
    sys::close(fd);
    before_rename();
    if (sys::rename(tmp.c_str(), path.c_str()) != 0) {
        std::string e = std::strerror(errno);
        sys::unlink(tmp.c_str());
        throw KeyringError("could not rename \"" + tmp + "\" into place: " + e);
    }
    if (sys::fsync_dir(dir.c_str()) != 0)
        throw KeyringError("could not fsync directory \"" + dir + "\": " + std::strerror(errno));
}

void seal_keyring(Keyring& kr, const SecureBytes& kek) {
    kr.kek_fingerprint = key_fingerprint(kek.data(), kek.size());
    kr.mac = compute_mac(kr, kek);
}

Keyring create_keyring(KeyProvider& provider, SecureBytes& kek_out) {
    SecureBytes kek = random_key(kKekSize);
    WrapResult wr = provider.wrap(kek);
    Keyring kr;
    kr.format = 1;
    kr.cluster_id = random_id();
    kr.config = provider.config();
    kr.wrapped_kek = std::move(wr.blob);
    kr.kek_version = wr.key_version;
    kr.kek_generation = 1;
    kr.created_at = now_iso8601();
    seal_keyring(kr, kek);
    kek_out = std::move(kek);
    return kr;
}

void verify_keyring(const Keyring& kr, const SecureBytes& kek) {
    const char* tampered = "keyring has been modified or the key is not this cluster's";
    if (kek.size() != kKekSize) throw KeyringError(tampered);
    std::string fp = key_fingerprint(kek.data(), kek.size());
    std::string mac = compute_mac(kr, kek);
    bool ok =
        fp.size() == kr.kek_fingerprint.size() && ct_equal(fp.data(), kr.kek_fingerprint.data(), fp.size());
    ok = mac.size() == kr.mac.size() && ct_equal(mac.data(), kr.mac.data(), mac.size()) && ok;
    if (!ok) throw KeyringError(tampered);
}

SecureBytes unlock_keyring(const Keyring& kr, KeyProvider& provider) {
    SecureBytes kek = provider.unwrap(kr.wrapped_kek);
    verify_keyring(kr, kek);
    return kek;
}

SecureBytes unlock_previous_kek(const Keyring& kr, KeyProvider& provider) {
    if (!kr.previous) throw KeyringError("keyring has no previous KEK");
    SecureBytes kek = provider.unwrap(kr.previous->wrapped_kek);
    std::string fp = key_fingerprint(kek.data(), kek.size());
    if (kek.size() != kKekSize || fp.size() != kr.previous->kek_fingerprint.size() ||
        !ct_equal(fp.data(), kr.previous->kek_fingerprint.data(), fp.size()))
        throw KeyringError("the previous KEK recorded in the keyring does not match its fingerprint");
    return kek;
}

}  // namespace cmk
