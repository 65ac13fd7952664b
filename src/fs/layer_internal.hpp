// The file layer's one internal header (issue 15: the layer in rooms, around one
// header, as pgvector's HNSW is split by phase). Not installed; used only by src/fs.
//
// A page write, as a reader follows it through the files:
//   entry point (interpose.cpp: pwrite; got.cpp installs the same in the server)
//   -> descriptor (file_ops.cpp: op_pwrite; descriptors.cpp: ctx_get -> FileCtx)
//   -> cipher I/O (cipher_io.cpp: enc_pwrite -> enc_pwrite_chunk; wal_lock.cpp for WAL)
//   -> file key (file_keys.cpp: ensure_key -> lookup_file_key / create_key)
//   -> key map (keys/keymap.hpp, opened by file_keys.cpp: keymap(), map_for)
//   -> cipher (crypt_units -> XtsCipher, base/crypto.hpp).
// A page read is the same, through map_read (mapped_reads.cpp) where it can.
//
// The other rooms: paths.cpp (path -> file class), state.cpp (the process-wide State,
// libc's own functions, the log line), shared_region.cpp (KEKs and database slots
// shared by every process of a server), startup.cpp (start_server, ensure_active,
// info, wipe_keys), cluster_keys.cpp and database_keys.cpp (key administration).
//
// Everything declared here is hidden: the library exports only the public API
// (fs/io.hpp, fs/key_admin.hpp) and the libc names of interpose.cpp.
#pragma once

#include <stdio.h>
#include <fcntl.h>
#include <link.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/base/walcipher.hpp"
#include "cmk_lakebase/fs/io.hpp"
#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/kms/provider.hpp"

#pragma GCC visibility push(hidden)

namespace cmk::fs::detail {

// ---- the C library, the log (state.cpp) ------------------------------------------------

// The C library's functions, resolved in libc itself (never in ourselves).
struct Real {
    int (*open)(const char*, int, ...);
    int (*openat)(int, const char*, int, ...);
    int (*close)(int);
    ssize_t (*read)(int, void*, size_t);
    ssize_t (*write)(int, const void*, size_t);
    ssize_t (*pread)(int, void*, size_t, off_t);
    ssize_t (*pwrite)(int, const void*, size_t, off_t);
    ssize_t (*readv)(int, const struct iovec*, int);
    ssize_t (*writev)(int, const struct iovec*, int);
    ssize_t (*preadv)(int, const struct iovec*, int, off_t);
    ssize_t (*pwritev)(int, const struct iovec*, int, off_t);
    ssize_t (*preadv2)(int, const struct iovec*, int, off_t, int);
    ssize_t (*pwritev2)(int, const struct iovec*, int, off_t, int);
    int (*renameat2)(int, const char*, int, const char*, unsigned);
    int (*rename)(const char*, const char*);
    int (*linkat)(int, const char*, int, const char*, int);
    int (*unlinkat)(int, const char*, int);
    int (*unlink)(const char*);
    int (*truncate)(const char*, off_t);
    int (*ftruncate)(int, off_t);
    int (*fallocate)(int, int, off_t, off_t);
    int (*posix_fallocate)(int, off_t, off_t);
    int (*dup)(int);
    int (*dup2)(int, int);
    int (*dup3)(int, int, int);
    int (*fcntl)(int, int, ...);
    void* (*mmap)(void*, size_t, int, int, int, off_t);
    ssize_t (*copy_file_range)(int, off_t*, int, off_t*, size_t, unsigned);
    off_t (*lseek)(int, off_t, int);
    int (*chdir)(const char*);
    int (*fchdir)(int);
};
const Real& real();

// One line to stderr, prefixed "cmk_lakebase: " (reaches the server log).
void log_line(const std::string& msg);

// ---- the layer's operations (file_ops.cpp) ---------------------------------------------

// The layer's operations. Each behaves like the libc call it replaces (return value,
// errno) and never throws.
int op_openat(int dirfd, const char* path, int flags, mode_t mode);
int op_close(int fd);
ssize_t op_read(int fd, void* buf, size_t n);
ssize_t op_write(int fd, const void* buf, size_t n);
ssize_t op_pread(int fd, void* buf, size_t n, off_t off);
ssize_t op_pwrite(int fd, const void* buf, size_t n, off_t off);
// off < 0: at (and advancing) the file offset, as readv/writev.
ssize_t op_preadv(int fd, const struct iovec* iov, int cnt, off_t off);
ssize_t op_pwritev(int fd, const struct iovec* iov, int cnt, off_t off);
int op_renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned flags);
int op_linkat(int olddirfd, const char* from, int newdirfd, const char* to, int flags);
int op_unlinkat(int dirfd, const char* path, int flags);
int op_truncate(const char* path, off_t len);
int op_ftruncate(int fd, off_t len);
// posix: returns an error number like posix_fallocate(); else -1/errno like fallocate().
int op_fallocate(int fd, int mode, off_t off, off_t len, bool posix);
void op_dup(int oldfd, int newfd);  // after a successful dup*/F_DUPFD: share the state
bool op_is_encrypted_fd(int fd);
// fopen of an encrypted file: a stdio stream over op_pread/op_pwrite (stdio.cpp).
FILE* op_fopen(const char* path, const char* mode);
// fileno(): the descriptor under a stream of op_fopen, else the C library's answer.
int op_fileno(FILE* f);
ssize_t op_copy_file_range(int fdin, off_t* offin, int fdout, off_t* offout, size_t len,
                           unsigned flags);

// Installs the hooks over the main executable's GOT (got.cpp). Throws LayerError.
void install_got();

// One loaded object's dynamic-linker slots (JUMP_SLOT and GLOB_DAT relocations) by
// symbol name, and its RELRO range (got.cpp).
struct ObjectSlots {
    std::string what;  // for messages: "the server executable", "module \"...\""
    std::map<std::string, std::vector<void**>> slots;
    uintptr_t relro_start = 0, relro_end = 0;
};
ObjectSlots read_object_slots(ElfW(Addr) base, const ElfW(Phdr)* phdr, ElfW(Half) phnum, const std::string& what);
// Points each slot of the named calls at the given function. Refuses (LayerError) a slot
// that points neither into the C library nor at the replacement already.
void write_slots(const ObjectSlots& o, const std::vector<std::pair<std::string, void*>>& hooks);
// The layer's entry points (interpose.cpp) for the file calls o has slots for;
// check_required: throw if o lacks one PostgreSQL's data I/O needs.
std::vector<std::pair<std::string, void*>> layer_hooks(const ObjectSlots& o, bool check_required);
// This library's own definition of a C library name (interpose.cpp).
void* self_sym(const char* name);

// ---- files, descriptors ------------------------------------------------------------------

constexpr size_t U = kUnitSize;
constexpr size_t kChunk = 1 << 20;  // largest span encrypted per system call

// One file's data key, shared by every descriptor open on it in this process. No
// fingerprint here: an HMAC per open was a third of what opening a file cost (SLRU
// segments are opened for every page read); describe_file computes it when asked.
struct FileKey {
    explicit FileKey(const SecureBytes& k, size_t head = 0)
        : wal_head(head), serial(next_serial()), cipher(k.data(), head != 0) {}
    // WAL segments under a derived key (file_keys.cpp, "WAL segment keys"): the first
    // wal_head bytes of unit 0 (PostgreSQL's long page header) stay plaintext, marked.
    // Their cipher is seekable: a rewritten last page is encrypted from its first
    // changed block (crypt_wal_units).
    const size_t wal_head;
    const uint64_t serial;  // unique in the process: names this key in caches
    std::mutex mu;
    XtsCipher cipher;

private:
    static uint64_t next_serial() {
        static std::atomic<uint64_t> n{0};
        return ++n;
    }
};

// The caches of a spill file's descriptor (spill_io.cpp).
struct SpillCache;
struct SpillCacheDeleter {
    void operator()(SpillCache* s) const;
};

struct FileCtx {
    FileClass cls = FileClass::Plaintext;
    std::string rel;
    std::mutex key_mu;
    std::shared_ptr<FileKey> key;  // null: durable file opened empty, key looked up or made at first use
    struct DbSlot* db = nullptr;   // the file's database, when bound to its own key (checked per I/O)
    uint32_t db_oid = 0;           // ... and its oid (a slot freed by an unbind may be reused)
    int source = 0;                // > 0: a read-only file of a source directory (key bound at open)
    bool append = false;           // caller asked for O_APPEND (emulated: we need pwrite)
    std::atomic<int64_t> known_size{0};
    std::atomic<int> refs{1};
    // Decrypting reads from a read-only mapping of the segment (see "reads from the
    // page cache" below). map_ok: this descriptor may be mapped (a relation file,
    // readable, not O_DIRECT). map_valid: bytes known to exist, whole units.
    std::atomic<bool> map_ok{false};
    std::mutex map_mu;
    std::atomic<const uint8_t*> map{nullptr};  // kMapMax bytes of addresses
    int64_t map_charged = 0;  // bytes of map_budget() this descriptor holds (under map_mu)
    bool map_capped = false;  // the budget ran out: no reads past map_charged (under map_mu)
    std::atomic<int64_t> map_valid{0};
    std::atomic<uint32_t> map_skip{0};  // reads to serve by pread after a slow mapped one
    std::unique_ptr<SpillCache, SpillCacheDeleter> spill;  // FileClass::Spill only (under key_mu)
    ~FileCtx();
};

// Spill files (spill_io.cpp): appends collect in the plaintext of the last unit, reads
// decrypt each unit once. spill_append/spill_read return false when the generic path
// must do it, else set *out (a result or -1/errno). spill_flush writes the tail of one
// descriptor (forget: the size will change otherwise, drop the caches); it runs on
// close, ftruncate and fallocate; spill_flush_all before any spill read of the process.
bool spill_append(FileCtx* c, FileKey& key, int fd, const uint8_t* buf, size_t len, off_t off, ssize_t* out);
bool spill_read(FileCtx* c, FileKey& key, int fd, uint8_t* buf, size_t len, off_t off, ssize_t* out);
int spill_flush(FileCtx* c, bool forget);
void spill_flush_all();
void spill_forget(FileCtx* c);

// The descriptor table (descriptors.cpp).
FileCtx* ctx_get(int fd);
void ctx_release(FileCtx* c);
// Installs c for fd (taking one reference) and drops whatever was there.
void ctx_set(int fd, FileCtx* c);

// ---- the shared region (shared_region.cpp) -----------------------------------------------

// ---- KEKs shared by every process of the server --------------------------------------
//
// A KEK rotation in one backend must reach every other process of the running server
// without a KMS call each and without dropping connections. The postmaster maps this
// small region (anonymous, MAP_SHARED, locked, excluded from core dumps) before it
// forks anything, so every child inherits it, across crash restarts too. It holds the
// KEK of the current generation and, during a rotation, of the next/previous one.
// Writers hold the key map's writer lock (one rotation at a time, cluster-wide); the
// sequence counter lets readers that do not hold it retry a torn read. A process
// whose key map turns out to be sealed under another generation (KeyMap's resolver)
// or whose keyring.json changed (refresh_keyring) takes the KEK from here; the
// rotating process retires the old generation from here once nothing refers to it.

struct SharedKeys {
    std::atomic<uint32_t> seq;
    struct Slot {
        uint32_t generation;
        uint8_t kek[kKekSize];
    } slot[4];
};

// ---- databases bound to key configurations of their own (dbkeys.hpp) -----------------
//
// One slot per bound database in the same shared region: its state, which every
// process checks (on open, and on every read and write of a file of that database),
// and its KEK while the database is open. State changes happen under the cluster key
// map's writer lock; the epoch counts them, so that each process notices and drops its
// own copies (key maps, file keys) of a database that was locked.
enum DbState : int {
    kDbFree = 0,
    kDbOpen = 1,     // KEK present: I/O and connections allowed
    kDbClosing = 2,  // revocation under way: connections refused, I/O still allowed
                     // (sessions are being terminated, dirty pages written out)
    kDbLocked = 3,   // KEK wiped: every read and write fails, connections refused
};
struct DbSlot {
    std::atomic<uint32_t> oid;
    std::atomic<int> state;
    std::atomic<uint32_t> seq;  // odd while kek is being written
    uint8_t kek[kKekSize];
};
struct DbShared {
    std::atomic<uint64_t> epoch;
    std::atomic<uint32_t> in_use;  // slots not free (fast path: 0 means no bound database)
    DbSlot slot[dbkeys::kMaxBoundDatabases];
};
// ---- who reads WAL (the WAL unit lock below) --------------------------------------------
//
// A process that reads a WAL file registers its pid in a reader slot, once; a process
// that writes whole WAL units while no reader is registered marks the write in flight
// in the writer slot of its pid instead of taking the lock. See UnitLock.
constexpr int kWalSlots = 64;
struct WalShared {
    std::atomic<uint32_t> readers;              // reader slots in use, plus overflow
    std::atomic<int32_t> reader_pid[kWalSlots];
    std::atomic<int32_t> writer_pid[kWalSlots];  // unlocked whole-unit writes in flight
    std::atomic<int64_t> last_sweep_ns;
};

struct SharedRegion {
    SharedKeys keys;
    DbShared dbs;
    WalShared wal;
    // Writer sections of this server's key maps (KeyMap::set_change_counter): a
    // process looks at a key map file only when another changed one since.
    std::atomic<uint64_t> keymap_changes{0};
    // Bytes the server's processes put through the page cipher (cmk::cipher_counts).
    std::atomic<uint64_t> cipher_encrypted{0};
    std::atomic<uint64_t> cipher_decrypted{0};
};
constexpr size_t kSharedRegionSize = (sizeof(SharedRegion) + 4095) & ~size_t(4095);

SharedRegion* map_shared_region();
std::optional<SecureBytes> shared_kek(uint32_t gen);
// The highest generation published, with its KEK.
std::optional<std::pair<uint32_t, SecureBytes>> shared_newest();
void shared_write(uint32_t gen, const uint8_t* kek);  // kek null: retire gen

// A file of a bound database whose key is not available (revoked, locked).
struct DbUnavailable : std::runtime_error {
    DbUnavailable(uint32_t o)
        : std::runtime_error("the key of database " + std::to_string(o) +
                             " is not available (revoked or unreachable at start); its files cannot be read"),
          oid(o) {}
    uint32_t oid;
};

DbSlot* db_slot(uint32_t oid);
// The database's KEK while it is open (or closing), torn reads retried.
std::optional<SecureBytes> slot_kek(DbSlot* sl);
// Sets a database's slot (kek null: wiped). Caller holds the cluster key map's writer
// lock (or is the postmaster at start, before any child exists).
void slot_set(uint32_t oid, const SecureBytes* kek, int state);
bool db_usable(DbSlot* sl);
// A file's database is locked (its key revoked); forgets a slot freed or reused since.
bool file_db_locked(FileCtx* c);
void slot_state(uint32_t oid, int state);

// ---- the process-wide state (state.cpp) ----------------------------------------------

struct State {
    std::atomic<Mode> mode{Mode::Off};
    std::atomic<bool> wiped{false};
    std::once_flag env_once;
    std::string env_datadir;  // CMK_LAKEBASE_PGDATA (preload mode)
    std::string env_keyring_dir;
    // CMK_LAKEBASE_WAL_TARGET (pg_cmk exec -- pg_receivewal): a directory outside the
    // data directory whose segment files are this cluster's WAL, under derived keys.
    std::string env_wal_target;
    std::string env_wal_target_real;
    std::mutex init_mu;
    bool init_failed = false;

    std::string datadir;       // absolute, lexically normalized
    std::string datadir_real;  // realpath (may appear later, while initdb creates it)
    std::string keyring_dir;
    Keyring keyring;
    std::unique_ptr<KeyProvider> provider;
    SecureBytes kek;
    SecureBytes per_boot;
    std::unique_ptr<KeyMap> keymap;
    pid_t keymap_pid = 0;
    std::mutex keymap_mu;

    SharedKeys* shared = nullptr;
    DbShared* dbshared = nullptr;
    WalShared* walshared = nullptr;
    std::atomic<uint64_t>* keymap_changes = nullptr;  // SharedRegion::keymap_changes
    bool server_keymaps = false;  // a server's processes: key maps trust keymap_changes
    // This process's view of bound databases: key maps opened with the KEK from the
    // shared slot, and (watchdog) keyring and provider for probes.
    struct DbProc {
        std::unique_ptr<KeyMap> map;
        pid_t map_pid = 0;
        Keyring keyring;
        std::unique_ptr<KeyProvider> provider;
        struct stat stamp {};
    };
    std::recursive_mutex db_mu;
    std::map<uint32_t, DbProc> dbs;
    std::atomic<uint64_t> db_epoch_seen{0};
    // Guards keyring, provider and kek against the process's other threads; key
    // operations hold it throughout (recursive: they reach keymap() and refresh).
    std::recursive_mutex keyring_mu;
    struct stat keyring_stamp {};
    bool aggregate_probes = false;

    std::mutex ts_mu;
    std::vector<std::pair<std::string, std::string>> tablespaces;  // real target -> oid
    struct timespec ts_mtime {};
};

State& st();

// Re-entry guard: the layer's own libc use during initialization passes through.
extern thread_local int tl_in_layer;
struct ReentryGuard {
    ReentryGuard() { ++tl_in_layer; }
    ~ReentryGuard() { --tl_in_layer; }
};

// ---- paths (paths.cpp) -----------------------------------------------------------------

struct Resolved {
    std::string rel;
    FileClass cls = FileClass::Plaintext;
    bool wal_target = false;  // a segment in pg_receivewal's directory: derived key only, no key-map entry
    int source = 0;           // > 0: a file of source directory number `source` (source_dirs.cpp)
};

std::string real_path(const std::string& p);  // realpath(), "" if it fails
void env_once();                              // reads CMK_LAKEBASE_PGDATA / _KEYRING_DIR once
std::string absolute_of(int dirfd, const char* path);
// A chdir()/fchdir() went through the layer: the kept working directory is stale.
void note_cwd_change();
// Where a path lies relative to the data directory (or a source directory), and its
// class. nullopt: outside.
std::optional<Resolved> resolve(int dirfd, const char* path);

// ---- source directories (source_dirs.cpp) ------------------------------------------------
//
// Other encrypted data directories a tool reads, read-only (CMK_LAKEBASE_SOURCE_DIRS:
// pg_combinebackup's input backups under `pg_cmk combinebackup`).
std::optional<Resolved> resolve_source(const std::string& abs);
// r lies in a source directory: logs, sets errno to EROFS and returns true.
bool refuse_source_write(const std::optional<Resolved>& r, const char* what);
// The key of a source's file, from that source's own key map (WAL: derived from its WAL
// master key). null: no key (only an empty file is consistent with that). Throws
// LayerError when the source's keys cannot be had.
std::shared_ptr<FileKey> source_file_key(int source, const std::string& rel, FileClass cls);

// ---- file keys (file_keys.cpp) --------------------------------------------------------------

KeyMap& keymap();  // the cluster's key map, opened in this process (again after fork)
void forget_kept_keys();
void forget_kept_key(const std::string& rel);
// After a database was locked: drop this process's key map of it.
void db_sweep();
// The key map of a bound database, opened in this process with the KEK from its slot.
KeyMap& db_keymap(uint32_t oid, DbSlot* sl);
// The key map that holds (or will hold) rel's key; *slot: its database's slot (null:
// cluster). Throws DbUnavailable when the database's key is not available.
KeyMap& map_for(const std::string& rel, DbSlot** slot = nullptr);
std::optional<SecureBytes> lookup_key(const std::string& rel, DbSlot** slot = nullptr);
std::shared_ptr<FileKey> lookup_file_key(const std::string& rel, DbSlot** slot);
// keep_existing: the entry the map holds now, if any, instead of a new key.
SecureBytes create_key(const std::string& rel, FileClass cls, bool keep_existing = false);
// Whether rel has a key-map entry (no unwrap).
bool has_entry(const std::string& rel);
void remove_key(const std::string& rel);
// Gives `to` the DEK of `from`, across maps when the two lie in different ones.
void move_key(const std::string& from, const std::string& to, FileClass to_cls, bool keep_from);
bool has_key(const std::string& rel);
bool db_locked_file(const std::string& rel);  // a file of a bound database whose key is unavailable
SecureBytes ephemeral_key_bytes(dev_t dev, ino_t ino);

// ---- WAL segment keys (file_keys.cpp; docs/backups.md, "The WAL key scheme") ------------
//
// A WAL segment's key is derived from the cluster's WAL master key (one random key per
// cluster, sealed in the key map under kWalMasterId) and the segment's name, so an
// archived copy of the segment needs nothing but the key map of any backup of the
// cluster. Unit 0 keeps PostgreSQL's long page header (kWalHead bytes: magic,
// timeline, address, system identifier, sizes) in plaintext, marked with kWalMark in
// xlp_info, so a segment fetched back under another name (RECOVERYXLOG) says which
// segment it is, and a plaintext segment is told from ours.
// kWalMasterId, kWalHead, kWalMarkBit, wal_key_id: base/walcipher.hpp.
// "pg_wal/<24 hex>[.partial]" -> "<24 hex>" (upper case); "" for any other path.
std::string wal_segment_of(const std::string& rel);
// The segment a WAL file's plaintext long header names, "" if it names none.
std::string wal_identity_of_header(const uint8_t* head, size_t n);
// The segment a WAL file is: by its name, or (RECOVERYXLOG) by its header; "" if none.
std::string wal_identity(const std::string& rel);
// The derived key of a segment (kept by this process; dropped by forget_kept_keys).
std::shared_ptr<FileKey> wal_key(const std::string& segment);
// The key a WAL file at rel has without a key-map entry: by its name, or (RECOVERYXLOG)
// by its header. null: none (errno 0), or the master key could not be had (throws).
std::shared_ptr<FileKey> wal_derived_key(const std::string& rel);
// Makes the WAL master key exist (postmaster at start, before any child).
void ensure_wal_master();
std::shared_ptr<FileKey> ephemeral_key(dev_t dev, ino_t ino);
// The key of a context, finding or (for_write) making it. null with errno on failure.
std::shared_ptr<FileKey> ensure_key(FileCtx* c, bool for_write);

// ---- cipher I/O (cipher_io.cpp) -------------------------------------------------------------

// Pages with data almost always differ from zero in their first bytes.
inline bool all_zero(const uint8_t* p, size_t n) {
    size_t head = n < 16 ? n : 16;
    for (size_t i = 0; i < head; i++)
        if (p[i]) return false;
    if (n <= 16) return true;
    return p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}
// Encrypts or decrypts len bytes of units from src into dst (which may be src). A unit
// of zeros stays zeros.
void crypt_units(FileKey& k, bool enc, const uint8_t* src, uint8_t* dst, uint64_t first_unit, size_t len);
void crypt_units(FileKey& k, bool enc, uint8_t* buf, uint64_t first_unit, size_t len);
// Encryption of whole units of a WAL segment (a FileKey with wal_head), src != dst: the
// unchanged blocks of the page this thread wrote last keep their ciphertext.
void crypt_wal_units(FileKey& k, const uint8_t* src, uint8_t* dst, uint64_t first_unit, size_t len);
ssize_t enc_pread(FileCtx* c, int fd, uint8_t* buf, size_t len, off_t off);
ssize_t enc_pwrite(FileCtx* c, int fd, const uint8_t* buf, size_t len, off_t off);
// Vectored reads and writes at off >= 0: whole units straight from and into the
// caller's buffers, anything else through one temporary buffer.
ssize_t enc_preadv(FileCtx* c, int fd, const struct iovec* iov, int cnt, off_t off);
ssize_t enc_pwritev(FileCtx* c, int fd, const struct iovec* iov, int cnt, off_t off);
// Size change of an encrypted file: fix the unit that holds the (old or new) end.
int enc_resize(FileCtx* c, int fd, int64_t new_size);
int64_t file_size(int fd);
// Rewrites a whole file from one encoding to another in place (class change on
// rename). A null key means plaintext.
int transcode(const std::string& abs, const std::shared_ptr<FileKey>& from, const std::shared_ptr<FileKey>& to);

// ---- the WAL unit lock (wal_lock.cpp) --------------------------------------------------------

// This process's pid without a system call per ask (getpid is one since glibc 2.25):
// cached, and forgotten in a forked child (pthread_atfork). wal_lock.cpp.
pid_t my_pid();

inline int64_t mono_ns() {
    struct timespec t;
    ::clock_gettime(CLOCK_MONOTONIC, &t);
    return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
}

// Locks the units [start, start+len) of a WAL file for a read or a write (nothing for
// other classes). whole: the write covers whole units (no read-modify-write), so it may
// go unlocked while no process reads WAL.
struct UnitLock {
    UnitLock(int fd, FileClass cls, off_t start, off_t len, bool write, bool whole = false) : fd_(fd) {
        if (cls == FileClass::Wal) lock_wal(start, len, write, whole);
    }
    ~UnitLock() {
        if (locked_ || unlocked_slot_ >= 0) release();
    }
    UnitLock(const UnitLock&) = delete;
    UnitLock& operator=(const UnitLock&) = delete;

    void lock_wal(off_t start, off_t len, bool write, bool whole);
    void release();
    int fd_;
    off_t start_ = 0, len_ = 0;
    bool locked_ = false;
    int unlocked_slot_ = -1;
};

// Locks a whole file of a class that locks_whole_file() (fileclass.hpp) for one read,
// write or resize (nothing for other classes). pg_stat_statements' backends append
// query texts to one file at unaligned offsets, each into space it reserved, without a
// lock of their own, while others read it: the read-modify-write of a shared unit, and
// the re-encryption of the last unit when the file grows, must not interleave. An
// open-file-description lock (F_OFD_SETLKW) over the whole file serializes them
// across processes (cipher_io.cpp).
struct FileLock {
    FileLock(int fd, FileClass cls, bool write) : fd_(fd) {
        if (locks_whole_file(cls)) lock(write);
    }
    ~FileLock() {
        if (locked_) unlock();
    }
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;

    void lock(bool write);
    void unlock();
    int fd_;
    bool locked_ = false;
};

// ---- mapped reads (mapped_reads.cpp) ---------------------------------------------------------

constexpr int64_t kMapMax = int64_t(1) << 30;  // PostgreSQL's RELSEG_SIZE x BLCKSZ
bool map_reads_enabled();
// A read served from the mapping: len, or -1 if the caller must use pread.
ssize_t map_read(FileCtx* c, FileKey& key, int fd, uint8_t* buf, size_t len, off_t off);

// ---- start-up and key administration (startup.cpp, cluster_keys.cpp) --------------------------

std::unique_ptr<KeyProvider> audited(const KeyConfig& cfg, const std::string& name);
// What a provider's status that is not ok says: "state: detail", or the detail alone
// when the state only repeats the health ("unavailable") or is empty.
std::string status_detail(const KeyStatus& ks);
void stamp_keyring(State& s);
// Loads keyring, unwraps the KEK, opens the key map. Throws LayerError.
void load_keys(State& s, const std::string& datadir, const std::string& keyring_dir);
// Preload mode: initialize on the first touch of the data directory.
bool ensure_active();
// Picks up a keyring.json another process rewrote. Caller holds keyring_mu.
void refresh_keyring_locked(State& s);
lifecycle::Context make_context(State& s);
void adopt_context(State& s, lifecycle::Context& ctx);

// Runs a key operation fn(lifecycle::Context&) in a running server with this process's
// keyring, KEK and provider, and adopts what it changed, also when it throws.
template <typename F>
auto with_context(F&& fn) {
    State& s = st();
    if (s.mode.load() == Mode::Off)
        throw LayerError(
            "cmk_lakebase: the encrypting file layer is not active in this process",
            "Key operations run in a server started with cmk_lakebase in shared_preload_libraries.",
            "Use pg_cmk on a cluster that is not running.");
    if (s.wiped.load())
        throw LayerError("cmk_lakebase: the keys of this server have been wiped (the CMK was revoked)", "",
                         "Restore the key in the key provider and start the server again.");
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    refresh_keyring_locked(s);
    if (s.kek.empty())
        throw LayerError("cmk_lakebase: this process does not know the current KEK (generation " +
                             std::to_string(s.keyring.kek_generation) + ")",
                         "", "Reconnect and try again.");
    lifecycle::Context ctx = make_context(s);
    try {
        auto r = fn(ctx);
        adopt_context(s, ctx);
        return r;
    } catch (...) {
        adopt_context(s, ctx);
        throw;
    }
}

}  // namespace cmk::fs::detail

#pragma GCC visibility pop
