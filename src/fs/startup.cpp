// Start-up of the layer, in the server (start_server, from _PG_init in the postmaster)
// and in tools (ensure_active, at the first touch of the data directory under
// LD_PRELOAD): load the keyring, unwrap the KEK through the provider, open the key map,
// finish a KEK rotation a crash interrupted, open the bound databases' keys, refuse a
// data file without a key, make the per-boot key. Also the layer's own status (info).
#include <dirent.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cmk_lakebase/base/key_arena.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/keys/open_keys.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace detail {
namespace {

std::string kms_hint(KmsErrorKind k, const KeyConfig& cfg) {
    switch (k) {
        case KmsErrorKind::Revoked:
            if (cfg.provider == "local") {
                std::string store = cfg.options.count("key_store") ? cfg.options.at("key_store") : "DIR";
                return "If the key was disabled, enable it (pg_cmk key enable " + cfg.key_id +
                       " --key-store " + store + "); if the key store holds other key material under "
                       "this id, restore the key file " + cfg.key_id + ".key from its backup.";
            }
            return "Restore the key (or this cluster's access to it) in the KMS, then start again.";
        case KmsErrorKind::Unavailable:
            return "Check that the key provider is reachable, then start again.";
        case KmsErrorKind::Config:
        default:
            return "Correct the key configuration in cmk_lakebase/keyring.json.";
    }
}

}  // namespace

std::string status_detail(const KeyStatus& ks) {
    return ks.state.empty() || ks.state == "unavailable" ? ks.detail : ks.state + ": " + ks.detail;
}

std::unique_ptr<KeyProvider> audited(const KeyConfig& cfg, const std::string& name) {
    return audit::audited_provider(make_provider(cfg), name, st().aggregate_probes);
}

void stamp_keyring(State& s) {
    if (::stat((s.keyring_dir + "/" + kKeyringFile).c_str(), &s.keyring_stamp) != 0) s.keyring_stamp = {};
}

namespace {

// Server start: the keys of databases bound to key configurations of their own. A
// database whose key cannot be unwrapped does not stop the cluster: it is locked (its
// sessions refused, its files unreadable) until its key is usable again.
void load_databases(State& s) {
    for (const std::string& line : dbkeys::remove_strays(s.keyring_dir)) log_line(line);
    for (uint32_t oid : dbkeys::bound_databases(s.keyring_dir)) {
        std::string dir = dbkeys::dir_for(s.keyring_dir, oid);
        State::DbProc& p = s.dbs[oid];
        std::string who = "database " + std::to_string(oid);
        try {
            p.keyring = load_keyring(dir);
            who += " (key \"" + p.keyring.config.key_id + "\" of provider \"" + p.keyring.config.provider + "\")";
            if (p.keyring.cluster_id != s.keyring.cluster_id)
                throw KeyringError("its keyring belongs to another cluster");
            p.provider = audited(p.keyring.config, p.keyring.bound_name());
            SecureBytes k = unlock_keyring(p.keyring, *p.provider);
            slot_set(oid, &k, kDbOpen);
            size_t n = dbkeys::settle(*s.keymap, db_keymap(oid, db_slot(oid)), oid);
            if (n)
                log_line(who + ": moved " + std::to_string(n) +
                         " keys left in the cluster key map by an interrupted binding");
        } catch (const std::exception& e) {
            slot_set(oid, nullptr, kDbLocked);
            log_line(who + ": its key is not available (" + e.what() +
                     "); the database is locked: its sessions are refused and its files unreadable until the "
                     "key is usable again (the watchdog retries)");
        }
    }
}

}  // namespace

// Loads keyring, unwraps the KEK, opens the key map; completes a KEK rotation a crash
// interrupted (keyring with a previous KEK). Throws LayerError.
void load_keys(State& s, const std::string& datadir, const std::string& keyring_dir) {
    s.datadir = normalize_path(datadir);
    s.datadir_real = real_path(s.datadir);
    s.keyring_dir = keyring_dir.empty() ? keyring_dir_for(s.datadir) : keyring_dir;
    audit::set_directory(s.keyring_dir);
    try {
        s.keyring = load_keyring(s.keyring_dir);
    } catch (const std::exception& e) {
        throw LayerError("cmk_lakebase: cannot load the keyring of data directory \"" + s.datadir + "\"",
                         e.what(),
                         "Create encrypted clusters with \"pg_cmk initdb\"; a plaintext cluster cannot "
                         "run with cmk_lakebase in shared_preload_libraries.");
    }
    stamp_keyring(s);
    const KeyConfig& cfg = s.keyring.config;
    std::string who = "key \"" + cfg.key_id + "\" of provider \"" + cfg.provider + "\"";
    ClusterKeys keys;
    try {
        s.provider = audited(cfg, s.keyring.bound_name());
        keys = unlock_cluster_keys(s.keyring_dir, s.keyring, *s.provider);
        s.kek = keys.kek.clone();
    } catch (const KmsError& e) {
        throw LayerError("cmk_lakebase: could not unwrap the key-encryption key with " + who,
                         std::string("The key provider said: ") + e.what(), kms_hint(e.kind, cfg));
    } catch (const std::exception& e) {
        throw LayerError("cmk_lakebase: could not unwrap the key-encryption key with " + who, e.what(),
                         "The keyring cmk_lakebase/keyring.json may have been modified, or belong to "
                         "another cluster.");
    }
    if (!s.shared) {
        if (SharedRegion* r = map_shared_region()) {
            s.shared = &r->keys;
            s.dbshared = &r->dbs;
            s.walshared = &r->wal;
            s.keymap_changes = &r->keymap_changes;
            KeyMap::set_change_counter(s.keymap_changes);
            set_cipher_count_totals(&r->cipher_encrypted, &r->cipher_decrypted);
        }
    }
    shared_write(s.keyring.kek_generation, s.kek.data());
    if (keys.map_generation != s.keyring.kek_generation) shared_write(keys.map_generation, keys.map_kek().data());
    try {
        s.keymap = open_cluster_keymap(s.keyring_dir, s.keyring, keys, shared_kek);
        s.keymap_pid = my_pid();
    } catch (const std::exception& e) {
        throw LayerError("cmk_lakebase: the key map of data directory \"" + s.datadir + "\" is unusable",
                         e.what(),
                         "Restore the data directory together with its cmk_lakebase/ directory from "
                         "the same backup.");
    }
    try {
        verify_key_configs(s.keyring_dir, s.keyring, keys);  // issue 18: found now, not at a key operation
    } catch (const std::exception& e) {
        throw LayerError("cmk_lakebase: the key configurations file \"" + s.keyring_dir + "/configs.json\" is damaged",
                         e.what(),
                         "Restore it together with the rest of cmk_lakebase/ from the same backup; or, if no "
                         "named key configuration is needed, move it away (the cluster's own configuration is "
                         "in keyring.json).");
    }
    keys = ClusterKeys{};  // wiped: this process keeps s.kek only
    if (s.keyring.previous) {
        try {
            lifecycle::Context ctx = make_context(s);
            bool done = false;
            try {
                done = lifecycle::finish_interrupted(ctx);
            } catch (...) {
                adopt_context(s, ctx);
                throw;
            }
            adopt_context(s, ctx);
            if (done)
                log_line(
                    "completed a KEK rotation that a crash had interrupted; the key map is sealed under KEK "
                    "generation " +
                    std::to_string(s.keyring.kek_generation));
        } catch (const std::exception& e) {
            throw LayerError(
                "cmk_lakebase: could not complete an interrupted KEK rotation", e.what(),
                "Check that the key provider is reachable and cmk_lakebase/ is writable, then start "
                "again.");
        }
    }
    load_databases(s);
    s.per_boot = random_key(32);
    // The keys just unwrapped made the first keyed contexts: the arena is installed,
    // or says why not (then key schedules are on the heap, as before issue 18).
    KeyArenaStats arena = key_arena_stats();
    if (!arena.active)
        log_line(std::string("warning: cipher contexts stay on the ordinary heap (") + arena.reason +
                 "): a core dump taken by root can hold key schedules");
}

// Preload mode: initialize on the first touch of the data directory.
bool ensure_active() {
    State& s = st();
    Mode m = s.mode.load(std::memory_order_acquire);
    if (m != Mode::Off) return true;
    if (tl_in_layer) return false;
    env_once();
    if (s.env_datadir.empty()) return false;
    std::lock_guard<std::mutex> g(s.init_mu);
    if (s.mode.load() != Mode::Off) return true;
    if (s.init_failed) return false;
    ReentryGuard guard;
    // A tool under the layer holds the KEK and DEKs (and their cipher schedules on the
    // heap): no core file, no ptrace by its own user, unless explicitly allowed
    // (pg_cmk exec --allow-core-dumps). execve() resets the flag, and every program the
    // tool runs sets it again on its own first touch.
    const char* allow = ::getenv("CMK_LAKEBASE_ALLOW_CORE_DUMPS");
    if (!(allow && std::strcmp(allow, "1") == 0)) (void)::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    try {
        audit::set_default_actor(std::string("tool ") + program_invocation_short_name);
        load_keys(s, s.env_datadir, s.env_keyring_dir);
    } catch (const LayerError& e) {
        s.init_failed = true;
        log_line(std::string(e.what()) + "\nDETAIL: " + e.detail + "\nHINT: " + e.hint);
        ::_exit(1);
    } catch (const std::exception& e) {
        s.init_failed = true;
        log_line(std::string("initialization failed: ") + e.what());
        ::_exit(1);
    }
    s.mode.store(Mode::Preload, std::memory_order_release);
    return true;
}

namespace {

// A first page in plaintext: PostgreSQL's page header as it writes it (8 KiB pages,
// layout version 4, known flag bits, pd_lower <= pd_upper <= pd_special <= 8192).
// Ciphertext passes with a probability below 2^-30.
bool plaintext_page_header(const uint8_t* p) {
    auto u16 = [&](size_t o) { return unsigned(p[o]) | unsigned(p[o + 1]) << 8; };
    unsigned flags = u16(10), lower = u16(12), upper = u16(14), special = u16(16), version = u16(18);
    return version == (8192 | 4) && (flags & ~7u) == 0 && lower >= 24 && lower <= upper &&
           upper <= special && special <= 8192;
}

// Whether a durable file that has a key holds plaintext instead: a relation file whose
// first page is a plaintext page, a WAL segment under a derived key whose first page
// holds data without the mark. Reads the first bytes of the file.
bool holds_plaintext(const std::string& abs, const std::string& rel, FileClass c) {
    bool wal = c == FileClass::Wal && !wal_segment_of(rel).empty();
    if (c != FileClass::Relation && !wal) return false;
    if (wal && lookup_key(rel)) return false;  // a segment from before the WAL key scheme
    int fd = sys::open(abs.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    uint8_t h[kWalHead];
    ssize_t n = sys::pread_full(fd, h, sizeof h, 0);
    sys::close(fd);
    if (n != ssize_t(sizeof h) || all_zero(h, sizeof h)) return false;
    return wal ? !(h[3] & kWalMarkBit) : plaintext_page_header(h);
}

// Refuses to start when a durable encrypted file with data (any byte not zero) has no key, or holds
// plaintext (a plaintext copy restored into an encrypted cluster is never half-served:
// every WAL segment and up to kPlaintextProbes relation files (a first page each) are looked at; a
// plaintext page elsewhere fails its checksum when read).
constexpr size_t kPlaintextProbes = 4096;
// A data file copied into an online backup before it was dropped, its key gone from
// the key map copied after the drop (pgBackRest and other tools copy in their own
// order). Started from that backup (backup_label present), WAL replay removes the file
// again; its contents were unreadable without their key anyway. Only a file whose key
// the key map records as removed qualifies: a file the map never knew still refuses.
bool dropped_during_backup(State& s, const std::string& rel) {
    struct stat sb;
    if (::stat((s.datadir + "/backup_label").c_str(), &sb) != 0) return false;
    try {
        return map_for(rel).removed(rel);
    } catch (const std::exception&) {
        return false;
    }
}

void check_every_file_has_key(State& s) {
    std::vector<std::string> missing, plain;
    size_t count = 0, plain_count = 0, probes = 0;
    const std::string major = sys::data_directory_major(s.datadir);
    std::vector<std::string> stack{""};
    while (!stack.empty()) {
        std::string rel = stack.back();
        stack.pop_back();
        std::string abs = rel.empty() ? s.datadir : s.datadir + "/" + rel;
        DIR* d = ::opendir(abs.c_str());
        if (!d) continue;
        while (struct dirent* e = ::readdir(d)) {
            std::string name = e->d_name;
            if (name == "." || name == "..") continue;
            std::string r = rel.empty() ? name : rel + "/" + name;
            if (r == kKeyringDirName) continue;
            if (other_version_tablespace_dir(r, major)) continue;  // another cluster's (pg_upgrade)
            struct stat sb;
            if (::stat((abs + "/" + name).c_str(), &sb) != 0) continue;  // follows pg_tblspc links
            if (S_ISDIR(sb.st_mode)) {
                stack.push_back(r);
            } else if (S_ISREG(sb.st_mode) && sb.st_size > 0) {
                FileClass c = classify_relative(r);
                if (is_durable(c) && !has_key(r) && !db_locked_file(r) && dropped_during_backup(s, r)) {
                    // Emptied, so nothing reads the undecryptable bytes before replay drops it.
                    if (::truncate((abs + "/" + name).c_str(), 0) != 0) {
                        count++;
                        if (missing.size() < 5) missing.push_back(r);
                    } else {
                        log_line("\"" + r + "\" was dropped while the backup was taken (the key map records "
                                 "its key as removed): emptied; WAL replay removes it");
                    }
                } else if (c == FileClass::ExtensionState && !has_key(r)) {
                    // pg_stat_statements' dump written before its class was encrypted
                    // (an earlier version of cmk_lakebase): statistics, lost as after a
                    // crash rather than read as ciphertext or refusing the start.
                    if (::unlink((abs + "/" + name).c_str()) == 0) {
                        log_line("\"" + r + "\" was written in plaintext before this file was encrypted: "
                                 "removed (pg_stat_statements starts with empty statistics)");
                    } else {
                        count++;
                        if (missing.size() < 5) missing.push_back(r);
                    }
                } else if (is_durable(c) && !has_key(r) && !db_locked_file(r) &&
                           sys::file_all_zero((abs + "/" + name).c_str()) != 1) {
                    // (Zeros only, extended and never written with data, need no key.)
                    count++;
                    if (missing.size() < 5) missing.push_back(r);
                } else if (is_durable(c) && (c == FileClass::Wal || probes++ < kPlaintextProbes) &&
                           holds_plaintext(abs + "/" + name, r, c)) {
                    plain_count++;
                    if (plain.size() < 5) plain.push_back(r);
                }
            }
        }
        ::closedir(d);
    }
    auto joined = [](const std::vector<std::string>& v) {
        std::string list;
        for (auto& m : v) list += (list.empty() ? "" : ", ") + m;
        return list;
    };
    if (count) {
        std::string list = joined(missing);
        throw LayerError("cmk_lakebase: " + std::to_string(count) +
                             " data file(s) have no data encryption key in the key map",
                         "First files without a key: " + list + ".",
                         "The key map cmk_lakebase/keymap is damaged or truncated, or files were copied "
                         "in from another cluster. Restore the data directory together with its "
                         "cmk_lakebase/ directory from the same backup.");
    }
    if (plain_count) {
        std::string list = joined(plain);
        throw LayerError("cmk_lakebase: " + std::to_string(plain_count) +
                             " data file(s) of this encrypted cluster hold plaintext",
                         "First plaintext files: " + list + ".",
                         "The data directory mixes plaintext and encrypted files (a plaintext copy, such "
                         "as one made by pg_basebackup, restored into an encrypted cluster?); it is refused "
                         "rather than half-served. Restore a ciphertext copy (docs/backups.md).");
    }
}

}  // namespace
}  // namespace detail

using namespace detail;

const char* mode_name(Mode m) {
    switch (m) {
        case Mode::Preload:
            return "preload";
        case Mode::Got:
            return "got";
        default:
            return "off";
    }
}

void start_server(const std::string& datadir) {
    State& s = st();
    std::string dd = normalize_path(datadir);
    if (s.mode.load() == Mode::Off) {
        // Preloaded but not yet touched the data directory? Initialize through it.
        env_once();
        if (!s.env_datadir.empty() && real_path(s.env_datadir) == real_path(dd)) ensure_active();
    }
    Mode m = s.mode.load();
    if (m == Mode::Preload) {
        if (real_path(s.datadir) != real_path(dd))
            throw LayerError("cmk_lakebase: the preloaded file layer serves another data directory",
                             "It serves \"" + s.datadir + "\", the server runs on \"" + dd + "\".",
                             "Start the server without LD_PRELOAD, or with CMK_LAKEBASE_PGDATA set to its "
                             "data directory.");
        return;  // tool-style preload already intercepts every call
    }
    if (m == Mode::Got) return;
    std::lock_guard<std::mutex> g(s.init_mu);
    {
        ReentryGuard guard;
        load_keys(s, dd, "");
        check_every_file_has_key(s);
        ensure_wal_master();  // made once per cluster, before any child needs it
    }
    detail::install_got();
    // Only this server's processes (which share keymap_changes) change its key maps
    // while it runs: from now on they look at a key map file only after one of them
    // changed it (KeyMap::skip_unchanged). Tools look every time.
    s.server_keymaps = s.keymap_changes != nullptr;
    s.mode.store(Mode::Got, std::memory_order_release);
    // From here the postmaster needs no KEK of its own: children take it from the
    // shared region, so a KEK rotation that retires a generation there leaves no
    // copy of the old KEK in any process started after it (the postmaster included).
    if (s.shared) {
        std::lock_guard<std::mutex> g2(s.keymap_mu);
        s.keymap.reset();
        s.keymap_pid = 0;
        s.kek.wipe();
        std::lock_guard<std::recursive_mutex> g3(s.db_mu);
        s.dbs.clear();
    }
}

LayerInfo info() {
    State& s = st();
    LayerInfo i;
    i.mode = s.mode.load();
    if (i.mode == Mode::Off) return i;
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    refresh_keyring_locked(s);
    i.config_name = s.keyring.bound_name();
    i.kek_version = s.keyring.kek_version;
    i.rotation_pending = s.keyring.previous.has_value();
    i.data_directory = s.datadir;
    i.provider = s.keyring.config.provider;
    i.key_id = s.keyring.config.key_id;
    i.kek_fingerprint = s.keyring.kek_fingerprint;
    i.kek_generation = s.keyring.kek_generation;
    i.cluster_id = s.keyring.cluster_id;
    i.keys_wiped = s.wiped.load();
    i.per_boot_key_present = !s.per_boot.empty() && !i.keys_wiped;
    try {
        KeyMap& km = keymap();
        km.refresh();
        i.dek_count = km.size();
    } catch (const std::exception&) {
        i.dek_count = 0;
    }
    for (uint32_t oid : dbkeys::bound_databases(s.keyring_dir)) {
        DbSlot* sl = db_slot(oid);
        if (!sl || !db_usable(sl)) continue;  // a locked database's DEKs are not countable
        try {
            KeyMap& dm = db_keymap(oid, sl);
            dm.refresh();
            i.dek_count += dm.size();
        } catch (const std::exception&) {
        }
    }
    return i;
}

}  // namespace cmk::fs
