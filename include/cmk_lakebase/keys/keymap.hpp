// The key map: the wrapped DEK of every durable encrypted file, keyed by the file's
// path relative to the data directory (its identity). Each DEK is sealed with the KEK
// (AES-256-GCM) with the identity as associated data, so an entry cannot be moved onto
// another file unnoticed.
//
// On disk (<keyring dir>/keymap): a header, then an append-only log of records
// (ADD identity -> wrapped DEK, DEL identity), each with its own CRC32C. A new DEK is
// appended and fsync()ed before the call that creates it returns, so no byte is ever
// encrypted under a key that is not durable. Writers serialize with flock() on a
// separate lock file (keymap.lock, never replaced); compaction rewrites live entries
// to a new file and renames it over the old one (write, fsync, rename, fsync dir).
// A removal appends a DEL record and overwrites the removed entry's sealed DEK in place
// with zeros, under one fsync, so a dropped file's key is not left decryptable. An ADD
// whose sealed DEK is zeros is a removal in itself (whichever of the two writes a crash
// keeps, the key is gone); one torn by a crash during the overwrite is accepted when a
// later record supersedes it or a run of zeros shows the shred.
// A torn last record (crash during an append) is ignored and cut off at the next
// append; a damaged record anywhere else, or a damaged header, is an error.
//
// Many processes may hold a KeyMap on the same directory: each reads new records when
// the file has grown or been replaced.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/fileclass.hpp"

namespace cmk {

struct KeyMapError : Error {
    explicit KeyMapError(const std::string& m) : Error(ErrorCategory::Damaged, m) {}
};

// Fault injection for crash tests: a step name at which the next mutation stops
// (throws KeyMapCrash) leaving the files as a crash there would.
struct KeyMapCrash : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class KeyMap {
public:
    // When the file on disk turns out to be sealed under another KEK generation (a
    // KEK rotation by another process), the resolver is asked for that generation's
    // KEK; without one (or if it answers nullopt) that is an error.
    using KekResolver = std::function<std::optional<SecureBytes>(uint32_t generation)>;

    // Opens <dir>/keymap. kek: the unwrapped KEK (copied into secure memory).
    // Throws KeyMapError if missing, damaged, of another cluster or of a KEK
    // generation other than kek_generation that the resolver does not know.
    KeyMap(std::string dir, const SecureBytes& kek, const std::string& cluster_id, uint32_t kek_generation,
           KekResolver resolver = nullptr);
    ~KeyMap();

    // Creates an empty key map (header only). Fails if one exists.
    static void create_empty(const std::string& dir, const std::string& cluster_id,
                             uint32_t kek_generation);

    // Reads records appended (or a replaced file) since the last look.
    void refresh();

    // A counter in memory shared by the processes of one server: every writer section
    // (LOCK_EX) of every KeyMap in this process adds one to it before its lock goes.
    // Null (the default): no counting. Set once, before the first fork.
    static void set_change_counter(std::atomic<uint64_t>* changes);
    // This instance's refresh() skips its look at the file (stat + fstat) while the
    // change counter has not moved since its last look. Only for a map that no process
    // outside those sharing the counter changes (a server's own key maps).
    void skip_unchanged(bool on);

    // The unwrapped DEK of a file, or nullopt if the map has none (after a refresh).
    // Throws KeyMapError if the entry does not authenticate (tampered / wrong KEK).
    std::optional<SecureBytes> get(const std::string& identity);
    // As get(); *tag receives the entry's tag: its sealed DEK and the KEK generation it
    // is sealed under. No secret. Equal tags of an identity mean the same DEK: a new
    // key, a move or a re-seal gives a new one (sealing draws a fresh nonce).
    std::optional<SecureBytes> get(const std::string& identity, std::vector<uint8_t>* tag);
    // The entry's tag after a refresh, without unwrapping; nullopt if there is none.
    std::optional<std::vector<uint8_t>> entry_tag(const std::string& identity);
    bool contains(const std::string& identity);

    // A new random 64-byte DEK for identity, durable before return. Replaces any entry.
    SecureBytes create(const std::string& identity, FileClass cls);
    // The DEK of identity's entry if it has one (checked under the writer lock), else a
    // new one as create(). Two processes that both find a file without a key and write
    // to it get one key: a second create() would strand the first one's bytes.
    SecureBytes create_absent(const std::string& identity, FileClass cls);

    // Gives `to` the DEK of `from` (re-sealed for the new identity), durably; then,
    // unless keep_from, removes `from`. Throws if `from` has no entry.
    void move(const std::string& from, const std::string& to, FileClass to_cls, bool keep_from);

    // Removes the entry (crypto-shredding the file's key): a DEL record appended and
    // the sealed DEK overwritten with zeros in place, durable at once (one fsync).
    // No-op if absent.
    void remove(const std::string& identity);

    // True if the log records that identity's key was removed (its file unlinked) and
    // not made again, since the map was last compacted.
    bool removed(const std::string& identity);
    // Removes every entry whose identity starts with prefix (a dropped directory).
    void remove_prefix(const std::string& prefix);
    // Removes every entry whose identity satisfies pred, in one durable append.
    // Returns how many were removed.
    size_t remove_if(const std::function<bool(const std::string&)>& pred);

    // Adds (or replaces) entries with the given DEKs, sealed under this map's KEK, in
    // one durable append (one fsync): how a database binding moves keys between maps.
    struct Import {
        std::string identity;
        FileClass cls;
        SecureBytes dek;
    };
    void put(const std::vector<Import>& entries);

    size_t size();                                  // live entries
    std::vector<std::string> identities();          // live entries, sorted
    std::optional<std::string> fingerprint(const std::string& identity);  // DEK fingerprint
    std::optional<FileClass> entry_class(const std::string& identity);

    // Rewrites the file with live entries only when dead records dominate.
    void maybe_compact();
    void compact();

    // Seam for KEK rotation: re-seals every DEK under new_kek/new_generation in a new
    // file swapped in atomically. No data file changes. before_rename (optional) runs
    // once the new file is written and fsync()ed, before it replaces the old one.
    void rewrap(const SecureBytes& new_kek, uint32_t new_generation,
                const std::function<void()>& before_rename = nullptr);

    uint32_t generation();  // the KEK generation this instance seals under now

    void set_kek_resolver(KekResolver r);

    // The KEK generation in the header of <dir>/keymap (no KEK needed). Throws.
    static uint32_t peek_generation(const std::string& dir);

    // Holds the writer lock (thread mutex + LOCK_EX on keymap.lock) across a change
    // of several files (KEK rotation, keyring rewrites); KeyMap calls on the same
    // instance made while it is held reuse it instead of locking again.
    class Exclusive {
    public:
        explicit Exclusive(KeyMap& km);
        ~Exclusive();
        Exclusive(const Exclusive&) = delete;
        Exclusive& operator=(const Exclusive&) = delete;

    private:
        KeyMap& km_;
        std::unique_lock<std::recursive_mutex> g_;
        int fd_ = -1;
    };

    // Crash-test hook: steps "append-write", "shred-write", "append-fsync",
    // "compact-write", "compact-fsync", "compact-rename". Empty string disables.
    static void set_crash_point(const std::string& step);

private:
    struct Entry {
        FileClass cls;
        std::vector<uint8_t> wrapped;
        uint64_t rec_off = 0;  // its ADD record in the current file (rec_len 0: already shredded)
        uint32_t rec_len = 0;
    };
    // A dead ADD record whose sealed DEK is still in the file.
    struct Pending {
        uint64_t off;
        uint32_t len;
        std::string identity;
    };
    SecureBytes unwrap_locked(const std::string& identity, const Entry& e);
    SecureBytes create_impl(const std::string& identity, FileClass cls, bool keep_existing);
    void load_locked(bool full, const std::vector<uint8_t>* appended = nullptr);
    void apply_locked(const uint8_t* data, size_t n, const std::string& path);
    void append_locked(const std::vector<uint8_t>& rec);
    void write_full_locked(const std::string& path, const SecureBytes& kek, uint32_t gen,
                           const std::unordered_map<std::string, Entry>& entries,
                           const std::function<void()>& before_rename = nullptr,
                           const std::unordered_set<std::string>* tombstones = nullptr);
    std::unordered_set<uint64_t> shred_locked(const std::vector<Pending>& todo);
    friend class Exclusive;
    friend class HeldLock;

    std::string dir_;
    SecureBytes kek_;
    std::string cluster_id_;
    uint32_t generation_;
    std::unordered_map<std::string, Entry> entries_;
    std::unordered_set<std::string> removed_;  // identities whose last record is a removal
    std::vector<Pending> pending_;             // dead ADDs to shred in the next append
    size_t dead_records_ = 0;
    uint64_t read_offset_ = 0;
    uint64_t file_size_ = 0;  // the file's size at the last load_locked (or own append)
    uint64_t file_ino_ = 0;
    int fd_ = -1;
    int lock_fd_ = -1;
    bool ex_held_ = false;  // an Exclusive section holds LOCK_EX
    bool skip_unchanged_ = false;  // skip_unchanged
    uint64_t seen_changes_ = 0;    // the change counter at the last look at the file
    bool seen_valid_ = false;
    bool clean_write_ = false;     // this writer section's append is applied in memory
    static uint64_t note_change();  // a writer section ends: the counter's new value (0: none)
    KekResolver resolver_;
    std::recursive_mutex mu_;
};

// The DEK sealing associated data for an identity (exposed for tests).
std::string dek_aad(const std::string& identity, uint32_t kek_generation);

}  // namespace cmk
