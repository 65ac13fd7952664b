// Database bindings (dbkeys.hpp has the step order and the crash argument).
#include "cmk_lakebase/keys/dbkeys.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::dbkeys {
namespace {

std::string db_root(const std::string& keyring_dir) { return keyring_dir + "/" + kDbDirName; }

bool exists(const std::string& path) {
    struct stat sb;
    return ::stat(path.c_str(), &sb) == 0;
}

// Removes a key directory and everything in it (flat: keymap, keymap.lock,
// keyring.json, temporaries), then makes the removal durable.
void remove_dir(const std::string& dir) {
    if (DIR* d = ::opendir(dir.c_str())) {
        while (struct dirent* e = ::readdir(d)) {
            std::string n = e->d_name;
            if (n == "." || n == "..") continue;
            if (::unlink((dir + "/" + n).c_str()) != 0 && errno != ENOENT)
                throw KeyMapError("could not remove \"" + dir + "/" + n + "\": " + std::strerror(errno));
        }
        ::closedir(d);
    }
    if (::rmdir(dir.c_str()) != 0 && errno != ENOENT)
        throw KeyMapError("could not remove \"" + dir + "\": " + std::strerror(errno));
    std::string parent = dir.substr(0, dir.rfind('/'));
    (void)sys::fsync_dir(parent.c_str());
}

std::vector<KeyMap::Import> export_database(KeyMap& from, uint32_t oid) {
    std::vector<KeyMap::Import> out;
    from.refresh();
    for (const std::string& id : from.identities()) {
        if (database_of(id) != oid) continue;
        std::optional<SecureBytes> dek = from.get(id);
        std::optional<FileClass> cls = from.entry_class(id);
        if (!dek || !cls) continue;
        out.push_back(KeyMap::Import{id, *cls, std::move(*dek)});
    }
    return out;
}

}  // namespace

std::string dir_for(const std::string& keyring_dir, uint32_t oid) {
    return db_root(keyring_dir) + "/" + std::to_string(oid);
}

bool is_bound(const std::string& keyring_dir, uint32_t oid) {
    return oid != 0 && exists(dir_for(keyring_dir, oid) + "/" + kKeyringFile);
}

std::vector<uint32_t> bound_databases(const std::string& keyring_dir) {
    std::vector<uint32_t> out;
    DIR* d = ::opendir(db_root(keyring_dir).c_str());
    if (!d) return out;
    while (struct dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n.empty() || n.size() > 10 || n.find_first_not_of("0123456789") != std::string::npos) continue;
        unsigned long long v = std::stoull(n);
        if (v == 0 || v > 0xffffffffULL) continue;
        if (is_bound(keyring_dir, uint32_t(v))) out.push_back(uint32_t(v));
    }
    ::closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

std::vector<std::string> remove_strays(const std::string& keyring_dir) {
    std::vector<std::string> log;
    DIR* d = ::opendir(db_root(keyring_dir).c_str());
    if (!d) return log;
    std::vector<std::string> names;
    while (struct dirent* e = ::readdir(d)) {
        std::string n = e->d_name;
        if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
    for (const std::string& n : names) {
        std::string dir = db_root(keyring_dir) + "/" + n;
        if (exists(dir + "/" + kKeyringFile)) continue;
        remove_dir(dir);
        log.push_back("removed database key directory \"" + dir +
                      "\" left by an interrupted bind or unbind (the cluster key map holds its keys)");
    }
    return log;
}

size_t settle(KeyMap& cluster, KeyMap& db, uint32_t oid) {
    KeyMap::Exclusive lock(cluster);
    std::vector<KeyMap::Import> left = export_database(cluster, oid);
    if (left.empty()) return 0;
    db.refresh();
    std::vector<KeyMap::Import> missing;
    for (auto& k : left)
        if (!db.contains(k.identity)) missing.push_back(std::move(k));
    db.put(missing);
    cluster.remove_if([oid](const std::string& id) { return database_of(id) == oid; });
    return left.size();
}

Binding bind(const std::string& keyring_dir, KeyMap& cluster, const std::string& cluster_id, uint32_t oid,
             const NamedKeyConfig& cfg, KeyProvider& provider,
             const std::function<void(const SecureBytes&)>& publish) {
    if (oid == 0) throw lifecycle::LifecycleError("invalid database oid 0");
    if (is_bound(keyring_dir, oid))
        throw lifecycle::LifecycleError("database " + std::to_string(oid) + " is already bound",
                                        lifecycle::LifecycleError::Exists);
    if (bound_databases(keyring_dir).size() >= kMaxBoundDatabases)
        throw lifecycle::LifecycleError("at most " + std::to_string(kMaxBoundDatabases) +
                                        " databases can be bound to key configurations of their own");
    Binding b;
    b.kek = random_key(kKekSize);
    WrapResult wr = lifecycle::wrap_checked(provider, b.kek);
    lifecycle::crash_point("bind_database:after_wrap");

    std::string dir = dir_for(keyring_dir, oid);
    if (exists(dir)) remove_dir(dir);  // remains of an interrupted attempt
    if (::mkdir(db_root(keyring_dir).c_str(), 0700) != 0 && errno != EEXIST)
        throw KeyMapError("could not create \"" + db_root(keyring_dir) + "\": " + std::strerror(errno));
    KeyMap::create_empty(dir, cluster_id, 1);
    (void)sys::fsync_dir(db_root(keyring_dir).c_str());
    {
        KeyMap db(dir, b.kek, cluster_id, 1);
        std::vector<KeyMap::Import> keys = export_database(cluster, oid);
        db.put(keys);
        b.moved = keys.size();
    }
    lifecycle::crash_point("bind_database:after_keymap");

    Keyring& kr = b.keyring;
    kr.cluster_id = cluster_id;
    kr.config = cfg.config;
    kr.config_name = cfg.name;
    kr.wrapped_kek = wr.blob;
    kr.kek_version = wr.key_version;
    kr.kek_generation = 1;
    kr.created_at = now_iso8601();
    seal_keyring(kr, b.kek);
    save_keyring(dir, kr);
    lifecycle::crash_point("bind_database:after_keyring");
    if (publish) publish(b.kek);

    cluster.remove_if([oid](const std::string& id) { return database_of(id) == oid; });
    return b;
}

Keyring rebind(const std::string& keyring_dir, uint32_t oid, const Keyring& current, const SecureBytes& kek,
               const NamedKeyConfig& cfg, KeyProvider& provider) {
    WrapResult wr = lifecycle::wrap_checked(provider, kek);
    lifecycle::crash_point("rebind_database:after_wrap");
    Keyring kr = current;
    kr.config = cfg.config;
    kr.config_name = cfg.name;
    kr.wrapped_kek = wr.blob;
    kr.kek_version = wr.key_version;
    kr.rotated_at = now_iso8601();
    seal_keyring(kr, kek);
    save_keyring(dir_for(keyring_dir, oid), kr);
    return kr;
}

size_t unbind(const std::string& keyring_dir, KeyMap& cluster, KeyMap& db, uint32_t oid) {
    std::vector<KeyMap::Import> keys = export_database(db, oid);
    cluster.put(keys);
    lifecycle::crash_point("unbind_database:after_keymap");
    std::string dir = dir_for(keyring_dir, oid);
    if (::unlink((dir + "/" + kKeyringFile).c_str()) != 0)
        throw KeyMapError("could not remove \"" + dir + "/" + kKeyringFile + "\": " + std::strerror(errno));
    (void)sys::fsync_dir(dir.c_str());
    lifecycle::crash_point("unbind_database:after_keyring");
    remove_dir(dir);
    return keys.size();
}

void forget(const std::string& keyring_dir, uint32_t oid) {
    std::string dir = dir_for(keyring_dir, oid);
    if (!exists(dir)) return;
    // keyring.json first: from then on the directory is "unbound remains".
    if (::unlink((dir + "/" + kKeyringFile).c_str()) != 0 && errno != ENOENT)
        throw KeyMapError("could not remove \"" + dir + "/" + kKeyringFile + "\": " + std::strerror(errno));
    (void)sys::fsync_dir(dir.c_str());
    remove_dir(dir);
}

}  // namespace cmk::dbkeys
