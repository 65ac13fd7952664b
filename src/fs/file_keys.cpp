// File keys: how a descriptor gets the key of its file. A durable file's DEK lives in
// the cluster's key map (or, for a database bound to a key of its own, in that
// database's key map), unwrapped into a FileKey (a keyed XTS cipher) that the process
// keeps while the key-map entry is unchanged; an ephemeral file's key is derived from
// the per-boot key and the inode. Here too the key moves that follow a file's rename,
// link and unlink, and describe_file() for cmk_lakebase.relation_keys.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cmk_lakebase/keys/dbkeys.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace detail {

KeyMap& keymap() {
    State& s = st();
    // flock() locks belong to the open file description: a forked child must not share
    // its parent's, or the two would not exclude each other. Reopen after fork.
    pid_t me = my_pid();
    if (s.keymap_pid != me) {
        std::lock_guard<std::mutex> g(s.keymap_mu);
        if (s.keymap_pid != me) {
            // The generation this process last knew; if the key map was re-sealed
            // since (a KEK rotation), the resolver finds the new KEK in shared memory.
            uint32_t gen = s.keyring.kek_generation;
            std::optional<SecureBytes> k = shared_kek(gen);
            if (!k && s.kek.empty()) {
                // That generation was retired by a rotation since this process's
                // state was forked: start from the newest one published.
                if (auto newest = shared_newest()) {
                    gen = newest->first;
                    k = std::move(newest->second);
                }
            }
            s.keymap.reset(new KeyMap(s.keyring_dir, k ? *k : s.kek, s.keyring.cluster_id, gen, shared_kek));
            s.keymap->skip_unchanged(s.server_keymaps);
            s.keymap_pid = me;
        }
    }
    return *s.keymap;
}

// ---- file keys kept by a process ---------------------------------------------------------
//
// PostgreSQL opens and closes an SLRU segment (pg_xact, pg_subtrans, pg_multixact, ...)
// for every page it reads or writes, and each open unwrapped the DEK (AES-GCM) and keyed
// three cipher contexts anew. A process keeps the FileKey of the files it opened, each
// with the tag of the key-map entry it came from (KeyMap::entry_tag: the sealed DEK and
// its KEK generation), and uses it only while the key map, looked at first as before,
// holds that very entry. A file unlinked and created again, a key moved between maps, a
// KEK rotation: each gives the entry a new tag, so no key the map no longer holds is
// served. Bounded: past kKeyCacheMax entries, one goes for each new one (emptying the
// whole cache made CREATE DATABASE of a ~290-file template unwrap every key again on
// each copy, with 256); about what PostgreSQL's own file cache keeps open
// (max_files_per_process, 1000 by default). Emptied when this process wipes
// its keys or drops a database's key map; an entry goes when this process removes or
// moves the file's key. A key kept here lives as long as it would under a descriptor
// that stayed open, as PostgreSQL's own file cache keeps them.
namespace {

constexpr size_t kKeyCacheMax = 1024;
struct KeptKey {
    std::vector<uint8_t> tag;
    std::shared_ptr<FileKey> key;
};
std::mutex& kept_mu() {
    static std::mutex* m = new std::mutex;  // never destroyed: used from exit paths
    return *m;
}
std::unordered_map<std::string, KeptKey>& kept() {
    static auto* m = new std::unordered_map<std::string, KeptKey>;
    return *m;
}
}  // namespace

namespace {
// Derived WAL keys kept by this process, and the WAL master key they come from.
struct WalKept {
    SecureBytes master;
    std::unordered_map<std::string, std::shared_ptr<FileKey>> keys;
};
WalKept& wal_kept() {
    static auto* w = new WalKept;  // under kept_mu(); never destroyed (exit paths)
    return *w;
}
}  // namespace

void forget_kept_keys() {
    std::lock_guard<std::mutex> g(kept_mu());
    kept().clear();
    wal_kept().keys.clear();
    wal_kept().master.wipe();
}
void forget_kept_key(const std::string& rel) {
    std::lock_guard<std::mutex> g(kept_mu());
    kept().erase(rel);
}

namespace {

// The FileKey of rel's entry in km, kept or unwrapped; null if km has no entry.
std::shared_ptr<FileKey> key_from(KeyMap& km, const std::string& rel) {
    std::optional<std::vector<uint8_t>> tag = km.entry_tag(rel);
    if (!tag) return nullptr;
    {
        std::lock_guard<std::mutex> g(kept_mu());
        auto it = kept().find(rel);
        if (it != kept().end() && it->second.tag == *tag) return it->second.key;
    }
    std::vector<uint8_t> t;
    std::optional<SecureBytes> dek = km.get(rel, &t);
    if (!dek) return nullptr;
    auto key = std::make_shared<FileKey>(*dek);
    std::lock_guard<std::mutex> g(kept_mu());
    if (kept().size() >= kKeyCacheMax && !kept().count(rel)) kept().erase(kept().begin());
    kept()[rel] = KeptKey{std::move(t), key};
    return key;
}
}  // namespace

// ---- database key maps ------------------------------------------------------------------

// After a database was locked (any state change, in fact): drop this process's key map
// of it, and with it the copy of its KEK.
void db_sweep() {
    State& s = st();
    DbShared* d = s.dbshared;
    if (!d) return;
    uint64_t e = d->epoch.load(std::memory_order_acquire);
    if (e == s.db_epoch_seen.load(std::memory_order_relaxed)) return;
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    for (auto& [oid, p] : s.dbs) {
        DbSlot* sl = db_slot(oid);
        if (!sl || !db_usable(sl)) {
            if (p.map) forget_kept_keys();
            p.map.reset();
            p.map_pid = 0;
        }
    }
    s.db_epoch_seen.store(e, std::memory_order_relaxed);
}

// The key map of a bound database, opened in this process with the KEK from its slot.
KeyMap& db_keymap(uint32_t oid, DbSlot* sl) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    State::DbProc& p = s.dbs[oid];
    if (!db_usable(sl)) {
        if (p.map) forget_kept_keys();
        p.map.reset();
        throw DbUnavailable(oid);
    }
    pid_t me = my_pid();
    if (!p.map || p.map_pid != me) {
        p.map.reset();
        std::optional<SecureBytes> k = slot_kek(sl);
        if (!k) throw DbUnavailable(oid);
        p.map.reset(new KeyMap(dbkeys::dir_for(s.keyring_dir, oid), *k, s.keyring.cluster_id, 1));
        p.map->skip_unchanged(s.server_keymaps);
        p.map_pid = me;
    }
    return *p.map;
}

// The key map that holds (or will hold) rel's key: its database's when the database is
// bound, else the cluster's. *slot receives the database's slot (null: cluster).
// Throws DbUnavailable when the database's key is not available.
KeyMap& map_for(const std::string& rel, DbSlot** slot) {
    db_sweep();
    if (slot) *slot = nullptr;
    DbShared* d = st().dbshared;
    uint32_t oid = d && d->in_use.load(std::memory_order_acquire) ? database_of(rel) : 0;
    DbSlot* sl = oid ? db_slot(oid) : nullptr;
    if (!sl) return keymap();
    if (slot) *slot = sl;
    return db_keymap(oid, sl);
}

// Looks a durable file's key up where it lives: look(map) answers from one key map,
// empty when that map has no entry. A binding or unbinding may move keys between maps
// while we look: the route is taken again once on a miss, and a miss in a database's
// map falls back to the cluster's (remains of an interrupted bind).
template <class T, class Look>
T on_key_route(const std::string& rel, DbSlot** slot, Look look) {
    for (int attempt = 0; attempt < 2; attempt++) {
        DbSlot* sl = nullptr;
        KeyMap& km = map_for(rel, &sl);
        if (slot) *slot = sl;
        if (T k = look(km)) return k;
        if (sl)
            if (T k = look(keymap())) return k;
    }
    return T{};
}

// The DEK of a durable file (KeyMap::get refreshes the map first).
std::optional<SecureBytes> lookup_key(const std::string& rel, DbSlot** slot) {
    return on_key_route<std::optional<SecureBytes>>(rel, slot, [&](KeyMap& km) { return km.get(rel); });
}

// The same, as a FileKey: kept by this process while its entry is unchanged.
// A WAL file without an entry (every segment since the WAL key scheme; entries remain
// for xlogtemp.N and for segments written before it) has its derived key.
std::shared_ptr<FileKey> lookup_file_key(const std::string& rel, DbSlot** slot) {
    auto k = on_key_route<std::shared_ptr<FileKey>>(rel, slot, [&](KeyMap& km) { return key_from(km, rel); });
    if (!k && rel.compare(0, 7, "pg_wal/") == 0) k = wal_derived_key(rel);
    return k;
}

// A new DEK for a durable file, in the map its route names at this moment. Files of a
// database take the cluster map's writer lock first: a binding holds it while it moves
// the database's keys, so no key lands in the map being left.
SecureBytes create_key(const std::string& rel, FileClass cls, bool keep_existing) {
    db_sweep();
    auto make = [&](KeyMap& km) { return keep_existing ? km.create_absent(rel, cls) : km.create(rel, cls); };
    if (database_of(rel) == 0) return make(keymap());
    KeyMap& cm = keymap();
    KeyMap::Exclusive lock(cm);
    return make(map_for(rel));
}

bool has_entry(const std::string& rel) {
    return on_key_route<bool>(rel, nullptr, [&](KeyMap& km) { return km.contains(rel); });
}

void remove_key(const std::string& rel) {
    forget_kept_key(rel);
    DbSlot* sl = nullptr;
    KeyMap* km = nullptr;
    try {
        km = &map_for(rel, &sl);
    } catch (const DbUnavailable&) {
        km = nullptr;  // a locked database: its key map goes when its binding is forgotten
    }
    if (km) km->remove(rel);
    if (sl) keymap().remove(rel);  // remains of an interrupted bind, if any
}

// Gives `to` the DEK of `from`, across maps when the two lie in different ones.
void move_key(const std::string& from, const std::string& to, FileClass to_cls, bool keep_from) {
    if (!keep_from) forget_kept_key(from);
    forget_kept_key(to);
    DbSlot *sf = nullptr, *stt = nullptr;
    KeyMap& mf = map_for(from, &sf);
    KeyMap& mt = map_for(to, &stt);
    if (&mf == &mt) {
        mf.move(from, to, to_cls, keep_from);
        return;
    }
    std::optional<SecureBytes> k = lookup_key(from);
    if (!k) throw KeyMapError("key map has no entry for \"" + from + "\"");
    std::vector<KeyMap::Import> one;
    one.push_back(KeyMap::Import{to, to_cls, std::move(*k)});
    mt.put(one);
    if (!keep_from) remove_key(from);
}

bool has_key(const std::string& rel) {
    try {
        return lookup_key(rel).has_value() || (rel.compare(0, 7, "pg_wal/") == 0 && wal_derived_key(rel));
    } catch (const DbUnavailable&) {
        return false;
    }
}

// A file of a bound database whose key is not available now.
bool db_locked_file(const std::string& rel) {
    DbSlot* sl = db_slot(database_of(rel));
    return sl && !db_usable(sl);
}

// ---- WAL segment keys -------------------------------------------------------------------
//
// docs/backups.md ("The WAL key scheme") has the decision and its security argument.
// key(segment) = HKDF-SHA256(WAL master key, "cmk_lakebase wal v1 " + segment name),
// 64 bytes of AES-256-XTS key. The master key is random, made once per cluster (the
// first process that needs it, under the key map's writer lock, so two processes never
// make two), sealed in the key map like a DEK (so KEK and CMK rotations re-wrap it and
// every copy of the key map carries it), and never changed: a segment archived years
// ago is readable with the key map of any later backup of the same cluster.

std::string wal_segment_of(const std::string& rel) {
    if (rel.size() < 7 + 24 || rel.compare(0, 7, "pg_wal/") != 0) return "";
    std::string f = rel.substr(7);
    if (f.size() != 24 && !(f.size() == 32 && f.compare(24, 8, ".partial") == 0)) return "";
    std::string seg = f.substr(0, 24);
    for (char& ch : seg) {
        if (ch >= 'a' && ch <= 'f') ch = char(ch - 'a' + 'A');
        if (!((ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'F'))) return "";
    }
    return seg;
}

std::string wal_identity_of_header(const uint8_t* h, size_t n) {
    if (n < kWalHead) return "";
    auto u16 = [&](size_t o) { return uint32_t(h[o]) | uint32_t(h[o + 1]) << 8; };
    auto u32 = [&](size_t o) { return u16(o) | u16(o + 2) << 16; };
    uint32_t info = u16(2) & ~(uint32_t(kWalMarkBit) << 8);
    uint32_t tli = u32(4);
    uint64_t addr = uint64_t(u32(8)) | uint64_t(u32(12)) << 32;
    uint32_t segsize = u32(32);
    // XLP_LONG_HEADER; a segment size PostgreSQL allows (a power of two, 1 MiB to 1 GiB).
    if (!(info & 0x0002) || tli == 0) return "";
    if (segsize < (1u << 20) || segsize > (1u << 30) || (segsize & (segsize - 1)) != 0) return "";
    if (addr % segsize != 0) return "";
    uint64_t segno = addr / segsize;
    uint64_t per_id = (uint64_t(1) << 32) / segsize;
    char name[25];
    std::snprintf(name, sizeof name, "%08X%08X%08X", tli, uint32_t(segno / per_id), uint32_t(segno % per_id));
    return name;
}

namespace {

// The WAL master key: from the key map, or made there once. Called without kept_mu()
// held (the key map takes its own locks; kept_mu() is taken inside them elsewhere).
SecureBytes wal_master_from_map() {
    KeyMap& km = keymap();
    std::optional<SecureBytes> k = km.get(kWalMasterId);
    if (!k) {
        KeyMap::Exclusive lock(km);
        km.refresh();
        k = km.get(kWalMasterId);
        if (!k) k = km.create(kWalMasterId, FileClass::Wal);
    }
    return std::move(*k);
}

}  // namespace

void ensure_wal_master() { wal_master_from_map().wipe(); }

std::shared_ptr<FileKey> wal_key(const std::string& segment) {
    SecureBytes m;
    {
        std::lock_guard<std::mutex> g(kept_mu());
        WalKept& w = wal_kept();
        auto it = w.keys.find(wal_key_id(segment));
        if (it != w.keys.end()) return it->second;
        if (!w.master.empty()) m = w.master.clone();
    }
    if (m.empty()) m = wal_master_from_map();
    SecureBytes k = wal_segment_key(m.data(), m.size(), segment);
    auto key = std::make_shared<FileKey>(k, kWalHead);
    std::lock_guard<std::mutex> g(kept_mu());
    WalKept& w = wal_kept();
    if (w.master.empty()) w.master = std::move(m);
    if (w.keys.size() >= 64) w.keys.clear();
    w.keys[wal_key_id(segment)] = key;
    return key;
}

std::string wal_identity(const std::string& rel) {
    std::string seg = wal_segment_of(rel);
    if (!seg.empty() || rel != "pg_wal/RECOVERYXLOG") return seg;
    // A segment restore_command fetched back: its header says which one it is.
    std::string abs = st().datadir + "/" + rel;
    int fd = sys::open(abs.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return "";
    uint8_t h[kWalHead];
    ssize_t n = sys::pread_full(fd, h, sizeof h, 0);
    sys::close(fd);
    if (n == ssize_t(sizeof h) && (h[3] & kWalMarkBit)) seg = wal_identity_of_header(h, sizeof h);
    if (seg.empty() && n > 0)
        log_line("\"" + rel + "\" is not a WAL segment written by cmk_lakebase (no marked long page "
                 "header): restore_command must fetch the archived file unchanged");
    return seg;
}

std::shared_ptr<FileKey> wal_derived_key(const std::string& rel) {
    std::string seg = wal_identity(rel);
    if (seg.empty()) return nullptr;
    return wal_key(seg);
}

SecureBytes ephemeral_key_bytes(dev_t dev, ino_t ino) {
    State& s = st();
    std::string info = "cmk_lakebase ephemeral v1 " + std::to_string((unsigned long long)dev) +
                       " " + std::to_string((unsigned long long)ino);
    return hkdf_sha256(s.per_boot.data(), s.per_boot.size(), info, kXtsKeySize);
}
std::shared_ptr<FileKey> ephemeral_key(dev_t dev, ino_t ino) {
    return std::make_shared<FileKey>(ephemeral_key_bytes(dev, ino));
}

// The key of a context, finding or (for_write) making it. null with errno on failure.
std::shared_ptr<FileKey> ensure_key(FileCtx* c, bool for_write) {
    std::lock_guard<std::mutex> g(c->key_mu);
    if (st().wiped.load()) {
        errno = EIO;
        return nullptr;
    }
    if (c->db && file_db_locked(c)) {
        c->key.reset();  // the database's key was revoked: this process's copy goes now
        errno = EIO;
        return nullptr;
    }
    if (c->key) return c->key;
    if (c->source) {  // bound at open; a source's file without one is empty, and read-only
        errno = for_write ? EROFS : 0;
        return nullptr;
    }
    try {
        // Looked up even for a file this process created: its stale entry went at the
        // create (op_openat), and another process may have given it its key since (the
        // first non-zero write makes it; zeros need none, see enc_pwrite).
        if (auto k = lookup_file_key(c->rel, &c->db)) {
            c->db_oid = database_of(c->rel);
            c->key = std::move(k);
            return c->key;
        }
        if (auto k = wal_derived_key(c->rel)) {  // a segment created under its own name
            c->key = std::move(k);
            return c->key;
        }
        if (!for_write) {
            errno = 0;  // no key yet: only a file of zeros is consistent with that
            return nullptr;
        }
        SecureBytes k = create_key(c->rel, c->cls, true);
        c->db_oid = database_of(c->rel);
        c->db = db_slot(c->db_oid);
        c->key = std::make_shared<FileKey>(k);
        return c->key;
    } catch (const DbUnavailable& e) {
        log_line("\"" + c->rel + "\": " + e.what());
        errno = EIO;
        return nullptr;
    } catch (const std::exception& e) {
        log_line(std::string("key lookup failed for \"") + c->rel + "\": " + e.what());
        errno = EIO;
        return nullptr;
    }
}

}  // namespace detail

using namespace detail;

FileKeyInfo describe_file(const std::string& relpath) {
    State& s = st();
    FileKeyInfo fi;
    fi.file_class = classify_relative(relpath);
    struct stat sb;
    std::string abs = s.datadir + "/" + relpath;
    fi.exists = ::stat(abs.c_str(), &sb) == 0;
    fi.encrypted = is_encrypted(fi.file_class) && s.mode.load() != Mode::Off;
    fi.key_kind = "none";
    if (!fi.encrypted || !fi.exists) return fi;
    if (is_ephemeral(fi.file_class)) {
        fi.key_kind = "per-boot";
        if (!s.wiped.load()) {
            SecureBytes k = ephemeral_key_bytes(sb.st_dev, sb.st_ino);
            fi.fingerprint = key_fingerprint(k.data(), k.size());
        }
        return fi;
    }
    std::optional<std::string> fp;
    try {
        DbSlot* sl = nullptr;
        KeyMap& km = map_for(relpath, &sl);
        km.refresh();
        fp = km.fingerprint(relpath);
        if (!fp && sl) fp = keymap().fingerprint(relpath);
    } catch (const DbUnavailable&) {
        fi.key_kind = "dek";
        fi.fingerprint = "(database key not available)";
        return fi;
    }
    if (fp) {
        fi.key_kind = "dek";
        fi.fingerprint = *fp;
    } else if (sb.st_size > 0 && sys::file_all_zero(abs.c_str()) != 1) {
        fi.encrypted = false;  // data without a key: unreadable, report it
    } else {
        fi.key_kind = "dek";  // empty, or zeros only: its key comes with its first write of data
    }
    return fi;
}

}  // namespace cmk::fs
