// Source directories: other encrypted data directories that a tool process reads from,
// read-only, while it writes the data directory it runs for (issue 17: incremental
// backups). pg_combinebackup reads a chain of backups (each made by `pg_cmk
// basebackup`, each with its own keyring, KEK and key map) and writes one combined data
// directory; `pg_cmk combinebackup` runs it with the layer pointed at the output as the
// data directory and at the inputs through CMK_LAKEBASE_SOURCE_DIRS (absolute paths,
// ':'-separated). A file under a source has the class its path there gives and the key
// the source's own key map holds (WAL segments: the key derived from the source's WAL
// master key). Nothing under a source may be written, created, renamed, linked,
// truncated or removed through the layer: such calls fail with EROFS, so no key-map
// entry of the data directory is ever touched for a path of another directory.
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

struct SourceDir {
    std::string dir;   // as given, normalized
    std::string real;  // realpath
    std::once_flag loaded;
    std::unique_ptr<KeyMap> map;  // null: could not be opened (error says why)
    SecureBytes wal_master;
    std::string error;
};

struct Sources {
    std::vector<std::unique_ptr<SourceDir>> dirs;
};

Sources& sources() {
    static Sources* s = [] {
        auto* out = new Sources;  // never destroyed: used from exit paths
        const char* v = ::getenv("CMK_LAKEBASE_SOURCE_DIRS");
        if (!v || !*v) return out;
        std::string all = v;
        size_t pos = 0;
        while (pos <= all.size()) {
            size_t end = all.find(':', pos);
            if (end == std::string::npos) end = all.size();
            std::string d = all.substr(pos, end - pos);
            pos = end + 1;
            if (d.empty() || d[0] != '/') continue;
            auto sd = std::make_unique<SourceDir>();
            sd->dir = normalize_path(d);
            sd->real = real_path(sd->dir);
            out->dirs.push_back(std::move(sd));
        }
        return out;
    }();
    return *s;
}

bool under(const std::string& abs, const std::string& dir) {
    return !dir.empty() && abs.size() > dir.size() && abs.compare(0, dir.size(), dir) == 0 &&
           abs[dir.size()] == '/';
}

// Opens a source's key map once, through the CMK its keyring names. Failures are kept
// (and logged once): every open of the source's files then fails with EIO.
SourceDir& load(int source) {
    SourceDir& sd = *sources().dirs.at(size_t(source - 1));
    std::call_once(sd.loaded, [&sd] {
        ReentryGuard rg;
        const std::string kdir = sd.dir + "/" + kKeyringDirName;
        try {
            Keyring kr = load_keyring(kdir);
            // Backups carry no database bindings (pg_cmk basebackup refuses a source
            // that has any); a directory that does is not one of them.
            if (DIR* d = ::opendir((kdir + "/" + dbkeys::kDbDirName).c_str())) {
                bool bound = false;
                while (struct dirent* e = ::readdir(d)) {
                    struct stat sb;
                    std::string k = kdir + "/" + dbkeys::kDbDirName + "/" + e->d_name + "/keyring.json";
                    if (e->d_name[0] != '.' && ::stat(k.c_str(), &sb) == 0) bound = true;
                }
                ::closedir(d);
                if (bound) throw std::runtime_error("it has databases bound to key configurations of their own");
            }
            std::unique_ptr<KeyProvider> provider = audited(kr.config, kr.bound_name());
            ClusterKeys keys = unlock_cluster_keys(kdir, kr, *provider);
            sd.map = open_cluster_keymap(kdir, kr, keys);
            std::optional<SecureBytes> m = sd.map->get(kWalMasterId);
            if (m) sd.wal_master = std::move(*m);
        } catch (const std::exception& e) {
            sd.map.reset();
            sd.error = e.what();
            log_line("cannot read the keys of source directory \"" + sd.dir + "\": " + sd.error);
        }
    });
    return sd;
}

}  // namespace

std::optional<Resolved> resolve_source(const std::string& abs) {
    Sources& s = sources();
    for (size_t i = 0; i < s.dirs.size(); i++) {
        const SourceDir& sd = *s.dirs[i];
        for (const std::string* d : {&sd.dir, &sd.real}) {
            if (!under(abs, *d)) continue;
            std::string rel = abs.substr(d->size() + 1);
            Resolved r{rel, classify_relative(rel)};
            r.source = int(i + 1);
            return r;
        }
    }
    return std::nullopt;
}

bool refuse_source_write(const std::optional<Resolved>& r, const char* what) {
    if (!r || r->source == 0) return false;
    log_line(std::string("refused to ") + what + " \"" + r->rel + "\" in source directory \"" +
             sources().dirs.at(size_t(r->source - 1))->dir + "\": source directories are read-only");
    errno = EROFS;
    return true;
}

std::shared_ptr<FileKey> source_file_key(int source, const std::string& rel, FileClass cls) {
    SourceDir& sd = load(source);
    if (!sd.map) throw LayerError("the keys of source directory \"" + sd.dir + "\" are not available", sd.error, "");
    if (is_ephemeral(cls))
        throw LayerError("\"" + rel + "\" of source directory \"" + sd.dir +
                             "\" is under that server's per-boot key, which no other process has",
                         "", "");
    if (cls == FileClass::Wal) {
        if (auto dek = sd.map->get(rel)) return std::make_shared<FileKey>(*dek);
        std::string seg = wal_segment_of(rel);
        if (seg.empty() || sd.wal_master.empty()) return nullptr;
        SecureBytes k = wal_segment_key(sd.wal_master.data(), sd.wal_master.size(), seg);
        return std::make_shared<FileKey>(k, kWalHead);
    }
    std::optional<SecureBytes> dek = sd.map->get(rel);
    if (!dek) return nullptr;
    return std::make_shared<FileKey>(*dek);
}

}  // namespace cmk::fs::detail
