// The encrypting file layer (DESIGN §3, §4): classifies each path under the data
// directory, keeps per-descriptor cipher state, encrypts on write and decrypts on read
// with a length-preserving cipher, and carries a file's key through rename, link and
// unlink. Shared by both installations: LD_PRELOAD (tools) and GOT hooks (server).
//
// Unit layout: a file is a sequence of 8 KiB units; unit i covers
// [i*8K, min((i+1)*8K, size)). Each unit is AES-256-XTS encrypted with the unit number
// as tweak, over its current length (the last unit of an odd-length file is shorter,
// and is re-encrypted when the file grows or shrinks). A unit whose bytes on disk are
// all zero reads as zeros (holes, never-written pages); a unit of zeros is written as
// zeros (it reveals only what a hole already would).
#include <dirent.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/dbkeys.hpp"
#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/fs/layer.hpp"
#include "cmk_lakebase/base/sys.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace detail {

const Real& real() {
    static const Real r = [] {
        void* h = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
        if (!h) h = dlopen("libc.so.6", RTLD_LAZY);
        auto sym = [h](const char* name) -> void* {
            void* p = h ? dlsym(h, name) : nullptr;
            if (!p) {
                const char msg[] = "cmk_lakebase: cannot resolve the C library's file functions\n";
                (void)!::syscall(1 /* SYS_write */, 2, msg, sizeof msg - 1);
                std::abort();
            }
            return p;
        };
        Real x{};
#define CMK_RESOLVE(field, name) x.field = reinterpret_cast<decltype(x.field)>(sym(name))
        CMK_RESOLVE(open, "open");
        CMK_RESOLVE(openat, "openat");
        CMK_RESOLVE(close, "close");
        CMK_RESOLVE(read, "read");
        CMK_RESOLVE(write, "write");
        CMK_RESOLVE(pread, "pread");
        CMK_RESOLVE(pwrite, "pwrite");
        CMK_RESOLVE(readv, "readv");
        CMK_RESOLVE(writev, "writev");
        CMK_RESOLVE(preadv, "preadv");
        CMK_RESOLVE(pwritev, "pwritev");
        CMK_RESOLVE(preadv2, "preadv2");
        CMK_RESOLVE(pwritev2, "pwritev2");
        CMK_RESOLVE(renameat2, "renameat2");
        CMK_RESOLVE(rename, "rename");
        CMK_RESOLVE(linkat, "linkat");
        CMK_RESOLVE(unlinkat, "unlinkat");
        CMK_RESOLVE(unlink, "unlink");
        CMK_RESOLVE(truncate, "truncate");
        CMK_RESOLVE(ftruncate, "ftruncate");
        CMK_RESOLVE(fallocate, "fallocate");
        CMK_RESOLVE(posix_fallocate, "posix_fallocate");
        CMK_RESOLVE(dup, "dup");
        CMK_RESOLVE(dup2, "dup2");
        CMK_RESOLVE(dup3, "dup3");
        CMK_RESOLVE(fcntl, "fcntl");
        CMK_RESOLVE(mmap, "mmap");
        CMK_RESOLVE(copy_file_range, "copy_file_range");
        CMK_RESOLVE(lseek, "lseek");
#undef CMK_RESOLVE
        return x;
    }();
    return r;
}

void log_line(const std::string& msg) {
    static const std::string prefix = "cmk_lakebase: ";
    std::string line = (msg.compare(0, prefix.size(), prefix) == 0 ? "" : prefix) + msg + "\n";
    (void)!real().write(2, line.data(), line.size());
}

}  // namespace detail

using detail::real;
using detail::log_line;

namespace {

constexpr size_t U = kUnitSize;
constexpr size_t kChunk = 1 << 20;  // largest span encrypted per system call

// One file's data key, shared by every descriptor open on it in this process. No
// fingerprint here: an HMAC per open was a third of what opening a file cost (SLRU
// segments are opened for every page read); describe_file computes it when asked.
struct FileKey {
    explicit FileKey(const SecureBytes& k) : cipher(k.data()) {}
    std::mutex mu;
    XtsCipher cipher;
};

struct FileCtx {
    FileClass cls = FileClass::Plaintext;
    std::string rel;
    std::mutex key_mu;
    std::shared_ptr<FileKey> key;  // null: durable file opened empty, key looked up or made at first use
    struct DbSlot* db = nullptr;   // the file's database, when bound to its own key (checked per I/O)
    uint32_t db_oid = 0;           // ... and its oid (a slot freed by an unbind may be reused)
    bool fresh = false;            // created by this open (O_EXCL): make a new key, never reuse
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
    ~FileCtx();
};

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
};
constexpr size_t kSharedRegionSize = (sizeof(SharedRegion) + 4095) & ~size_t(4095);

SharedRegion* map_shared_region() {
    void* p = real().mmap(nullptr, kSharedRegionSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    (void)::madvise(p, kSharedRegionSize, MADV_DONTDUMP);
    (void)::mlock(p, kSharedRegionSize);
    std::memset(p, 0, kSharedRegionSize);
    return new (p) SharedRegion();
}

// ---- the process-wide state -------------------------------------------------------

struct State {
    std::atomic<Mode> mode{Mode::Off};
    std::atomic<bool> wiped{false};
    std::once_flag env_once;
    std::string env_datadir;  // CMK_LAKEBASE_PGDATA (preload mode)
    std::string env_keyring_dir;
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

State& st() {
    static State* s = new State();  // never destroyed: interposers run during exit
    return *s;
}

thread_local int tl_in_layer = 0;  // re-entry guard (our own libc use during init)

struct ReentryGuard {
    ReentryGuard() { ++tl_in_layer; }
    ~ReentryGuard() { --tl_in_layer; }
};

// ---- descriptor table ---------------------------------------------------------------

constexpr int kTableSize = 1 << 16;
std::atomic<FileCtx*>* fd_table() {
    static std::atomic<FileCtx*>* t = [] {
        void* p = std::calloc(kTableSize, sizeof(std::atomic<FileCtx*>));
        if (!p) std::abort();
        return static_cast<std::atomic<FileCtx*>*>(p);
    }();
    return t;
}
std::mutex& big_fd_mu() {
    static std::mutex* m = new std::mutex();
    return *m;
}
std::unordered_map<int, FileCtx*>& big_fds() {
    static auto* m = new std::unordered_map<int, FileCtx*>();
    return *m;
}

FileCtx* ctx_get(int fd) {
    if (fd < 0) return nullptr;
    if (fd < kTableSize) return fd_table()[fd].load(std::memory_order_acquire);
    std::lock_guard<std::mutex> g(big_fd_mu());
    auto it = big_fds().find(fd);
    return it == big_fds().end() ? nullptr : it->second;
}

void ctx_release(FileCtx* c) {
    if (c && c->refs.fetch_sub(1) == 1) delete c;
}

// Installs c for fd (taking one reference) and drops whatever was there.
void ctx_set(int fd, FileCtx* c) {
    FileCtx* old;
    if (fd < kTableSize) {
        old = fd_table()[fd].exchange(c, std::memory_order_acq_rel);
    } else {
        std::lock_guard<std::mutex> g(big_fd_mu());
        auto& m = big_fds();
        auto it = m.find(fd);
        old = it == m.end() ? nullptr : it->second;
        if (c)
            m[fd] = c;
        else if (it != m.end())
            m.erase(it);
    }
    ctx_release(old);
}

// ---- bounce buffers -----------------------------------------------------------------

struct Bounce {
    uint8_t* p = nullptr;
    size_t cap = 0;
    ~Bounce() { std::free(p); }
    uint8_t* get(size_t n) {
        if (n > cap) {
            std::free(p);
            p = nullptr;
            cap = 0;
            size_t want = (n + 4095) & ~size_t(4095);
            void* q = nullptr;
            if (posix_memalign(&q, 4096, want) != 0) return nullptr;
            p = static_cast<uint8_t*>(q);
            cap = want;
        }
        return p;
    }
};
thread_local Bounce tl_bounce;
thread_local Bounce tl_bounce2;

bool all_zero(const uint8_t* p, size_t n) {
    // Pages with data almost always differ from zero in their first bytes.
    size_t head = std::min<size_t>(n, 16);
    for (size_t i = 0; i < head; i++)
        if (p[i]) return false;
    if (n <= 16) return true;
    return p[0] == 0 && std::memcmp(p, p + 1, n - 1) == 0;
}

// ---- paths --------------------------------------------------------------------------

bool starts_with_dir(const std::string& s, const std::string& dir) {
    return !dir.empty() && s.size() > dir.size() && s.compare(0, dir.size(), dir) == 0 &&
           s[dir.size()] == '/';
}

std::string real_path(const std::string& p) {
    char buf[PATH_MAX];
    if (::realpath(p.c_str(), buf)) return buf;
    return "";
}

void env_once() {
    State& s = st();
    std::call_once(s.env_once, [&s] {
        const char* d = ::getenv("CMK_LAKEBASE_PGDATA");
        if (d && *d == '/') s.env_datadir = normalize_path(d);
        const char* k = ::getenv("CMK_LAKEBASE_KEYRING_DIR");
        if (k && *k) s.env_keyring_dir = k;
    });
}

// The data directory paths are compared against, in any mode ("" if none).
const std::string& datadir_for_resolve() {
    State& s = st();
    if (s.mode.load(std::memory_order_acquire) != Mode::Off) return s.datadir;
    env_once();
    return s.env_datadir;
}

void refresh_tablespaces(const std::string& datadir) {
    State& s = st();
    std::string dir = datadir + "/pg_tblspc";
    struct stat sb;
    if (::stat(dir.c_str(), &sb) != 0) return;
    std::lock_guard<std::mutex> g(s.ts_mu);
    if (sb.st_mtim.tv_sec == s.ts_mtime.tv_sec && sb.st_mtim.tv_nsec == s.ts_mtime.tv_nsec &&
        !s.tablespaces.empty())
        return;
    s.ts_mtime = sb.st_mtim;
    s.tablespaces.clear();
    DIR* d = ::opendir(dir.c_str());
    if (!d) return;
    while (struct dirent* e = ::readdir(d)) {
        std::string name = e->d_name;
        if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
        std::string target = real_path(dir + "/" + name);
        if (!target.empty()) s.tablespaces.emplace_back(target, name);
    }
    ::closedir(d);
}

struct Resolved {
    std::string rel;
    FileClass cls = FileClass::Plaintext;
};

std::string absolute_of(int dirfd, const char* path) {
    if (path[0] == '/') return normalize_path(path);
    std::string base;
    if (dirfd == AT_FDCWD) {
        char buf[PATH_MAX];
        if (!::getcwd(buf, sizeof buf)) return "";
        base = buf;
    } else {
        char link[64], buf[PATH_MAX];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = ::readlink(link, buf, sizeof buf - 1);
        if (n <= 0) return "";
        buf[n] = 0;
        base = buf;
    }
    return normalize_path(base + "/" + path);
}

// Where a path lies relative to the data directory, and its class. nullopt: outside.
std::optional<Resolved> resolve(int dirfd, const char* path) {
    if (!path || !*path) return std::nullopt;
    const std::string& dd = datadir_for_resolve();
    if (dd.empty()) return std::nullopt;
    std::string abs = absolute_of(dirfd, path);
    if (abs.empty()) return std::nullopt;
    State& s = st();
    std::string rel;
    if (starts_with_dir(abs, dd)) {
        rel = abs.substr(dd.size() + 1);
    } else {
        if (s.datadir_real.empty() && s.mode.load() != Mode::Off) s.datadir_real = real_path(dd);
        const std::string& ddr = s.datadir_real;
        if (starts_with_dir(abs, ddr)) {
            rel = abs.substr(ddr.size() + 1);
        } else {
            // A tablespace reached by its own path (tools); the server itself always
            // goes through pg_tblspc/<oid>.
            for (int pass = 0; pass < 2 && rel.empty(); pass++) {
                if (pass == 1) refresh_tablespaces(dd);
                std::lock_guard<std::mutex> g(s.ts_mu);
                for (auto& [target, oid] : s.tablespaces)
                    if (starts_with_dir(abs, target)) {
                        rel = "pg_tblspc/" + oid + abs.substr(target.size());
                        break;
                    }
            }
            if (rel.empty()) return std::nullopt;
        }
    }
    return Resolved{rel, classify_relative(rel)};
}

// ---- keys -----------------------------------------------------------------------------

std::optional<SecureBytes> shared_kek(uint32_t gen) {
    SharedKeys* sh = st().shared;
    if (!sh || gen == 0) return std::nullopt;
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t a = sh->seq.load(std::memory_order_acquire);
        if (a & 1) continue;
        std::optional<SecureBytes> out;
        for (const auto& sl : sh->slot)
            if (sl.generation == gen) out = SecureBytes(sl.kek, kKekSize);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (sh->seq.load(std::memory_order_relaxed) == a) return out;
    }
    return std::nullopt;
}

// The highest generation published, with its KEK.
std::optional<std::pair<uint32_t, SecureBytes>> shared_newest() {
    SharedKeys* sh = st().shared;
    if (!sh) return std::nullopt;
    uint32_t best = 0;
    for (const auto& sl : sh->slot) best = std::max(best, sl.generation);
    if (!best) return std::nullopt;
    std::optional<SecureBytes> k = shared_kek(best);
    if (!k) return std::nullopt;
    return std::make_pair(best, std::move(*k));
}

void shared_write(uint32_t gen, const uint8_t* kek) {  // kek null: retire gen
    SharedKeys* sh = st().shared;
    if (!sh) return;
    sh->seq.fetch_add(1, std::memory_order_acq_rel);
    SharedKeys::Slot* target = nullptr;
    for (auto& sl : sh->slot)
        if (sl.generation == gen) target = &sl;
    if (!target && kek)
        for (auto& sl : sh->slot)
            if (sl.generation == 0 && !target) target = &sl;
    if (target) {
        if (kek) {
            std::memcpy(target->kek, kek, kKekSize);
            target->generation = gen;
        } else {
            OPENSSL_cleanse(target->kek, kKekSize);
            target->generation = 0;
        }
    }
    sh->seq.fetch_add(1, std::memory_order_acq_rel);
}

KeyMap& keymap() {
    State& s = st();
    // flock() locks belong to the open file description: a forked child must not share
    // its parent's, or the two would not exclude each other. Reopen after fork.
    pid_t me = ::getpid();
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
// served. Bounded (emptied past kKeyCacheMax entries); emptied when this process wipes
// its keys or drops a database's key map; an entry goes when this process removes or
// moves the file's key. A key kept here lives as long as it would under a descriptor
// that stayed open, as PostgreSQL's own file cache keeps them.
constexpr size_t kKeyCacheMax = 256;
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
void forget_kept_keys() {
    std::lock_guard<std::mutex> g(kept_mu());
    kept().clear();
}
void forget_kept_key(const std::string& rel) {
    std::lock_guard<std::mutex> g(kept_mu());
    kept().erase(rel);
}

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
    if (kept().size() >= kKeyCacheMax) kept().clear();
    kept()[rel] = KeptKey{std::move(t), key};
    return key;
}

// ---- database key maps ------------------------------------------------------------------

// A file of a bound database whose key is not available (revoked, locked).
struct DbUnavailable : std::runtime_error {
    DbUnavailable(uint32_t o)
        : std::runtime_error("the key of database " + std::to_string(o) +
                             " is not available (revoked or unreachable at start); its files cannot be read"),
          oid(o) {}
    uint32_t oid;
};

DbSlot* db_slot(uint32_t oid) {
    DbShared* d = st().dbshared;
    if (!d || oid == 0 || d->in_use.load(std::memory_order_acquire) == 0) return nullptr;
    for (auto& sl : d->slot)
        if (sl.oid.load(std::memory_order_acquire) == oid && sl.state.load(std::memory_order_acquire) != kDbFree)
            return &sl;
    return nullptr;
}

// The database's KEK while it is open (or closing), torn reads retried.
std::optional<SecureBytes> slot_kek(DbSlot* sl) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t a = sl->seq.load(std::memory_order_acquire);
        if (a & 1) continue;
        int state = sl->state.load(std::memory_order_acquire);
        if (state != kDbOpen && state != kDbClosing) return std::nullopt;
        SecureBytes k(sl->kek, kKekSize);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (sl->seq.load(std::memory_order_relaxed) == a) return k;
    }
    return std::nullopt;
}

// Sets a database's slot (kek null: wiped). Caller holds the cluster key map's writer
// lock (or is the postmaster at start, before any child exists).
void slot_set(uint32_t oid, const SecureBytes* kek, int state) {
    DbShared* d = st().dbshared;
    if (!d) return;
    DbSlot* sl = db_slot(oid);
    if (!sl && state == kDbFree) return;
    if (!sl) {
        for (auto& x : d->slot)
            if (x.state.load() == kDbFree) {
                sl = &x;
                break;
            }
        if (!sl) throw std::runtime_error("no free database key slot");
        sl->oid.store(oid);
        d->in_use.fetch_add(1);
    }
    sl->seq.fetch_add(1, std::memory_order_acq_rel);
    if (kek)
        std::memcpy(sl->kek, kek->data(), kKekSize);
    else
        OPENSSL_cleanse(sl->kek, kKekSize);
    sl->seq.fetch_add(1, std::memory_order_acq_rel);
    sl->state.store(state, std::memory_order_release);
    if (state == kDbFree) {
        sl->oid.store(0);
        d->in_use.fetch_sub(1);
    }
    d->epoch.fetch_add(1, std::memory_order_acq_rel);
}

bool db_usable(DbSlot* sl) {
    int state = sl->state.load(std::memory_order_acquire);
    return state == kDbOpen || state == kDbClosing;
}

// A file's database is locked (its key revoked). An unbound database's freed slot
// (or one reused by another database) no longer concerns the file.
bool file_db_locked(FileCtx* c) {
    if (c->db->oid.load(std::memory_order_acquire) != c->db_oid) {
        c->db = nullptr;
        return false;
    }
    return c->db->state.load(std::memory_order_acquire) == kDbLocked;
}

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
    pid_t me = ::getpid();
    if (!p.map || p.map_pid != me) {
        p.map.reset();
        std::optional<SecureBytes> k = slot_kek(sl);
        if (!k) throw DbUnavailable(oid);
        p.map.reset(new KeyMap(dbkeys::dir_for(s.keyring_dir, oid), *k, s.keyring.cluster_id, 1));
        p.map_pid = me;
    }
    return *p.map;
}

// The key map that holds (or will hold) rel's key: its database's when the database is
// bound, else the cluster's. *slot receives the database's slot (null: cluster).
// Throws DbUnavailable when the database's key is not available.
KeyMap& map_for(const std::string& rel, DbSlot** slot = nullptr) {
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
std::optional<SecureBytes> lookup_key(const std::string& rel, DbSlot** slot = nullptr) {
    return on_key_route<std::optional<SecureBytes>>(rel, slot, [&](KeyMap& km) { return km.get(rel); });
}

// The same, as a FileKey: kept by this process while its entry is unchanged.
std::shared_ptr<FileKey> lookup_file_key(const std::string& rel, DbSlot** slot) {
    return on_key_route<std::shared_ptr<FileKey>>(rel, slot, [&](KeyMap& km) { return key_from(km, rel); });
}

// A new DEK for a durable file, in the map its route names at this moment. Files of a
// database take the cluster map's writer lock first: a binding holds it while it moves
// the database's keys, so no key lands in the map being left.
SecureBytes create_key(const std::string& rel, FileClass cls) {
    db_sweep();
    if (database_of(rel) == 0) return keymap().create(rel, cls);
    KeyMap& cm = keymap();
    KeyMap::Exclusive lock(cm);
    return map_for(rel).create(rel, cls);
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
        return lookup_key(rel).has_value();
    } catch (const DbUnavailable&) {
        return false;
    }
}

// A file of a bound database whose key is not available now.
bool db_locked_file(const std::string& rel) {
    DbSlot* sl = db_slot(database_of(rel));
    return sl && !db_usable(sl);
}

void slot_state(uint32_t oid, int state) {
    DbSlot* sl = db_slot(oid);
    if (!sl) return;
    sl->state.store(state, std::memory_order_release);
    st().dbshared->epoch.fetch_add(1, std::memory_order_acq_rel);
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
    try {
        if (!c->fresh) {
            if (auto k = lookup_file_key(c->rel, &c->db)) {
                c->db_oid = database_of(c->rel);
                c->key = std::move(k);
                return c->key;
            }
        }
        if (!for_write) {
            errno = 0;  // no key yet: only an empty file is consistent with that
            return nullptr;
        }
        SecureBytes k = create_key(c->rel, c->cls);
        c->db_oid = database_of(c->rel);
        c->db = db_slot(c->db_oid);
        c->fresh = false;
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

// Encrypts or decrypts len bytes of units from src into dst (which may be src). A unit
// of zeros stays zeros.
void crypt_units(FileKey& k, bool enc, const uint8_t* src, uint8_t* dst, uint64_t first_unit, size_t len) {
    std::lock_guard<std::mutex> g(k.mu);
    for (size_t pos = 0; pos < len; pos += U) {
        size_t n = std::min(U, len - pos);
        const uint8_t* p = src + pos;
        uint8_t* q = dst + pos;
        if (all_zero(p, n)) {
            if (q != p) std::memset(q, 0, n);
        } else if (enc) {
            k.cipher.encrypt(first_unit + pos / U, p, q, n);
        } else {
            k.cipher.decrypt(first_unit + pos / U, p, q, n);
        }
    }
}
void crypt_units(FileKey& k, bool enc, uint8_t* buf, uint64_t first_unit, size_t len) {
    crypt_units(k, enc, buf, buf, first_unit, len);
}

// WAL pages are rewritten while other processes (walsender, logical decoding, a
// standby's startup process) read them. XTS enciphers each 16-byte block on its own, so
// a read that sees part of a unit old and part new decrypts to the same mix of old and
// new plaintext that PostgreSQL would see unencrypted, except inside the one 16-byte
// block where appended bytes meet bytes already flushed: that block's ciphertext changes
// as a whole, and a copy torn inside it would turn up to 15 flushed bytes into garbage.
// So WAL reads and writes take an open-file-description lock over the units they touch.
//
// The lock costs a pair of fcntl calls per WAL write, about 4 us per transaction inside
// PostgreSQL's WALWriteLock in TPC-B, and most servers have no WAL reader at all while
// they write (no replication, no logical decoding). So a process registers in the
// shared region the first time it reads WAL, and a write of whole units skips the lock
// while no reader is registered. The two sides are ordered like Dekker's algorithm: the
// writer marks its write in flight, then looks for readers; the reader registers, then
// waits for every write in flight to end. Either the writer sees the reader (and locks)
// or the reader sees the write (and waits for it). Slots of processes that died are
// cleared: reader slots by writers that lock (at most once a second), writer slots by a
// reader that waits on one. Processes outside the server (tools under "pg_cmk exec")
// have a region of their own, so a tool reading a live cluster's WAL is not seen by
// the server's writers: it may, rarely, find the last flushed bytes damaged, as it may
// find the last record incomplete without encryption.

std::atomic<pid_t> g_pid{0};  // this process's pid, reset in a forked child
pid_t my_pid() {
    static const bool hooked = (::pthread_atfork(nullptr, nullptr, [] { g_pid.store(0); }) == 0);
    (void)hooked;
    pid_t p = g_pid.load(std::memory_order_relaxed);
    if (p == 0) {
        p = ::getpid();
        g_pid.store(p, std::memory_order_relaxed);
    }
    return p;
}
std::atomic<pid_t> g_wal_reader{0};        // pid under which this process registered
std::atomic<int> g_unlocked_writes{0};     // this process's unlocked WAL writes in flight

int64_t mono_ns() {
    struct timespec t;
    ::clock_gettime(CLOCK_MONOTONIC, &t);
    return int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
}

void wal_sweep_readers(WalShared* w, bool now) {
    int64_t t = mono_ns();
    int64_t last = w->last_sweep_ns.load();
    if (!now && (t - last < 1000000000 || !w->last_sweep_ns.compare_exchange_strong(last, t))) return;
    for (auto& slot : w->reader_pid) {
        int32_t p = slot.load();
        if (p != 0 && !sys::process_exists(p) && slot.compare_exchange_strong(p, 0)) w->readers.fetch_sub(1);
    }
}

void wal_register_reader() {
    WalShared* w = st().walshared;
    pid_t me = my_pid();
    if (!w || g_wal_reader.load(std::memory_order_acquire) == me) return;
    static std::mutex mu;  // this process's threads
    std::lock_guard<std::mutex> g(mu);
    if (g_wal_reader.load() == me) return;
    int saved = errno;
    bool placed = false;
    for (int pass = 0; pass < 2 && !placed; pass++) {
        if (pass == 1) wal_sweep_readers(w, true);
        for (auto& slot : w->reader_pid) {
            int32_t z = 0;
            if (slot.compare_exchange_strong(z, me)) {
                placed = true;
                break;
            }
        }
    }
    // Without a free slot the count stays raised for good: writers lock from then on.
    w->readers.fetch_add(1);
    for (auto& slot : w->writer_pid) {
        for (uint32_t spins = 1;; spins++) {
            int32_t p = slot.load();
            if (p == 0) break;
            // Left behind by a writer that died mid-write (or by a dead process whose pid
            // this one now has): cleared; a live writer ends its write within microseconds.
            bool stale = p == me ? g_unlocked_writes.load() == 0 : (spins % 256 == 0 && !sys::process_exists(p));
            if (stale) {
                slot.compare_exchange_strong(p, 0);
                break;
            }
            if (spins < 64)
                ::sched_yield();
            else
                ::usleep(50);  // a writer stalled in the kernel (dirty-page throttling)
        }
    }
    g_wal_reader.store(me, std::memory_order_release);
    errno = saved;
}

// A slot index if this whole-unit write may go without the lock (no WAL reader), or -1.
int wal_unlocked_begin() {
    WalShared* w = st().walshared;
    if (!w || w->readers.load(std::memory_order_relaxed) != 0) return -1;
    pid_t me = my_pid();
    int i = int(uint32_t(me) % kWalSlots);
    g_unlocked_writes.fetch_add(1);
    int32_t z = 0;
    if (w->writer_pid[i].compare_exchange_strong(z, me)) {
        if (w->readers.load() == 0) return i;
        w->writer_pid[i].store(0);
    }
    g_unlocked_writes.fetch_sub(1);
    return -1;
}
void wal_unlocked_end(int i) {
    st().walshared->writer_pid[i].store(0, std::memory_order_release);
    g_unlocked_writes.fetch_sub(1);
}

// whole: the write covers whole units (no read-modify-write), so it may go unlocked.
struct UnitLock {
    UnitLock(int fd, FileClass cls, off_t start, off_t len, bool write, bool whole = false) : fd_(fd) {
        if (cls != FileClass::Wal) return;
        if (!write) {
            wal_register_reader();
        } else if (whole && (unlocked_slot_ = wal_unlocked_begin()) >= 0) {
            return;
        } else if (WalShared* w = st().walshared) {
            wal_sweep_readers(w, false);
        }
        struct flock fl {};
        fl.l_type = write ? F_WRLCK : F_RDLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = start;
        fl.l_len = len;
        while (real().fcntl(fd, F_OFD_SETLKW, &fl) != 0) {
            if (errno != EINTR) return;  // e.g. write lock on a read-only fd: go unlocked
        }
        start_ = start;
        len_ = len;
        locked_ = true;
    }
    ~UnitLock() {
        if (unlocked_slot_ >= 0) wal_unlocked_end(unlocked_slot_);
        if (!locked_) return;
        int saved = errno;
        struct flock fl {};
        fl.l_type = F_UNLCK;
        fl.l_whence = SEEK_SET;
        fl.l_start = start_;
        fl.l_len = len_;
        real().fcntl(fd_, F_OFD_SETLK, &fl);
        errno = saved;
    }
    int fd_;
    off_t start_ = 0, len_ = 0;
    bool locked_ = false;
    int unlocked_slot_ = -1;
};

// ---- reads from the page cache ----------------------------------------------------------
//
// A relation page that misses shared_buffers costs a pread (system call, page-cache
// lookup, copy into the buffer) and then the decryption. Reading the ciphertext
// straight from a read-only MAP_SHARED mapping of the segment and decrypting it out of
// place into the caller's buffer costs the decryption alone once the page is mapped:
// select-only pgbench went from ~0.86 to ~0.91-0.94 of plaintext (bench/README.md).
// The mapping is the page cache itself, so writes through any descriptor are seen.
//
// A mapped page beyond the end of the file raises SIGBUS on access, and another
// process may truncate the file at any time (vacuum, while a pg_basebackup walsender
// reads it). So every access to a mapping runs under a SIGBUS guard: the handler
// (installed on the first mapping of a process, chaining to the previous disposition
// for faults that are not ours) jumps back, and the read is served by pread, which
// returns the short read PostgreSQL expects.
//
// Bounds: a mapping spans a whole 1 GiB segment's addresses from the start, so a file
// that grows after it was first read stays readable through the same mapping and is
// never remapped (addresses past the end of the file cost nothing until touched, and
// are never touched: reads stop at map_valid). Page tables grow with the pages a
// process touches (8 bytes per 4 KiB), so the budget counts bytes made readable, not
// addresses: a process reads at most map_budget() bytes in all through its mappings
// (page tables of at most 8 MiB, as for 4 GiB of shared_buffers); past that, reads use
// pread, as before. Reserving addresses this way needs a 64-bit address space without
// an RLIMIT_AS; where there is a limit, mapped reads are off (a mapping would use up
// the address space PostgreSQL allocates memory from). CMK_LAKEBASE_MAP_READS=off
// turns them off.

constexpr int64_t kMapMax = int64_t(1) << 30;  // PostgreSQL's RELSEG_SIZE x BLCKSZ

// CMK_LAKEBASE_MAP_BUDGET_MB overrides the budget (MiB, 1 to 1048576; default 4096).
int64_t map_budget() {
    static const int64_t b = [] {
        const char* v = std::getenv("CMK_LAKEBASE_MAP_BUDGET_MB");
        if (!v || !*v) return int64_t(4) << 30;
        char* e = nullptr;
        long long mb = std::strtoll(v, &e, 10);
        if (*e || mb < 1 || mb > (1ll << 20)) {
            log_line(std::string("CMK_LAKEBASE_MAP_BUDGET_MB=\"") + v + "\" is not a number of MiB from 1 to 1048576: using 4096");
            return int64_t(4) << 30;
        }
        return int64_t(mb) << 20;
    }();
    return b;
}
constexpr int64_t kSlowMappedReadNs = 20000;  // a warm 8 KiB read takes ~1-3 us
constexpr uint32_t kReadsAfterSlow = 64;
thread_local long tl_majflt = -1;  // this thread's major faults at its last slow mapped read
std::atomic<int64_t> g_mapped{0};

FileCtx::~FileCtx() {
    if (const uint8_t* m = map.load()) ::munmap(const_cast<uint8_t*>(m), size_t(kMapMax));
    g_mapped.fetch_sub(map_charged);
}

bool map_reads_enabled() {
    static const bool on = [] {
        const char* v = std::getenv("CMK_LAKEBASE_MAP_READS");
        if (v && (std::strcmp(v, "off") == 0 || std::strcmp(v, "0") == 0)) return false;
        struct rlimit rl {};
        return sizeof(void*) >= 8 && ::getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur == RLIM_INFINITY;
    }();
    return on;
}

struct BusGuard {
    sigjmp_buf jb;
    const uint8_t* lo;
    const uint8_t* hi;
};
thread_local BusGuard* tl_bus = nullptr;  // initial-exec, as all TLS here (Makefile)
struct sigaction g_prev_bus;

void bus_handler(int sig, siginfo_t* si, void* uc) {
    BusGuard* g = tl_bus;
    auto* a = static_cast<const uint8_t*>(si->si_addr);
    if (g && a >= g->lo && a < g->hi) siglongjmp(g->jb, 1);
    // Not a read of a mapping of ours: whatever was there before.
    if (g_prev_bus.sa_flags & SA_SIGINFO) {
        if (g_prev_bus.sa_sigaction) return g_prev_bus.sa_sigaction(sig, si, uc);
    } else if (g_prev_bus.sa_handler != SIG_DFL && g_prev_bus.sa_handler != SIG_IGN) {
        return g_prev_bus.sa_handler(sig);
    }
    ::signal(SIGBUS, SIG_DFL);  // the default action, for a fault as for a kill
    ::raise(SIGBUS);
}

// True if SIGBUS is (still) handled by bus_handler in this process.
bool bus_guard_ready() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = bus_handler;
        sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (::sigaction(SIGBUS, &sa, &g_prev_bus) != 0) log_line("cannot handle SIGBUS: reads use pread");
    });
    struct sigaction cur {};
    return ::sigaction(SIGBUS, nullptr, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) &&
           cur.sa_sigaction == bus_handler;
}

// Decrypts len bytes (whole units) of the mapping at src into dst. False if the access
// faulted (the file was truncated under the mapping); dst is then partly written.
// No object with a destructor lives between sigsetjmp and the accesses it guards.
bool map_decrypt(FileKey& k, const uint8_t* src, uint8_t* dst, uint64_t unit0, size_t len) {
    BusGuard g;
    g.lo = src;
    g.hi = src + len;
    k.mu.lock();
    if (sigsetjmp(g.jb, 0) != 0) {
        tl_bus = nullptr;
        k.mu.unlock();
        return false;
    }
    tl_bus = &g;
    std::atomic_signal_fence(std::memory_order_seq_cst);
    try {
        for (size_t pos = 0; pos < len; pos += U) {
            const uint8_t* p = src + pos;
            // A page read from the OS page cache is cold: ask for all of its cache lines
            // (and both 4 KiB pages' translations) at once, so their misses overlap
            // instead of stalling the cipher one after the other. Prefetches never
            // fault, also past the end of a truncated file. ~6 % of a mapped read.
            for (size_t o = 0; o < U; o += 64) __builtin_prefetch(p + o);
            if (all_zero(p, U))
                std::memset(dst + pos, 0, U);
            else
                k.cipher.decrypt(unit0 + pos / U, p, dst + pos, U);
        }
    } catch (...) {
        tl_bus = nullptr;
        k.mu.unlock();
        throw;
    }
    std::atomic_signal_fence(std::memory_order_seq_cst);
    tl_bus = nullptr;
    k.mu.unlock();
    return true;
}

// Makes [0, end) of the file readable through the mapping if it exists. False: use pread.
bool map_prepare(FileCtx* c, int fd, uint64_t end) {
    std::lock_guard<std::mutex> g(c->map_mu);
    if (!c->map_ok.load() || int64_t(end) > kMapMax) return false;
    if (c->map_capped && int64_t(end) > c->map_charged) return false;
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return false;
    int64_t valid = std::min<int64_t>(sb.st_size - sb.st_size % int64_t(U), kMapMax);
    if (int64_t(end) > valid) return false;  // past the end of the file: pread says so
    if (valid > c->map_charged) {
        int64_t more = valid - c->map_charged;
        if (g_mapped.fetch_add(more) + more > map_budget()) {
            g_mapped.fetch_sub(more);  // over the budget: what is charged stays mapped
            c->map_capped = true;
            valid = c->map_charged;
            if (int64_t(end) > valid) return false;
        } else {
            c->map_charged = valid;
        }
    }
    if (!c->map.load()) {
        void* m = bus_guard_ready() ? real().mmap(nullptr, size_t(kMapMax), PROT_READ, MAP_SHARED, fd, 0) : MAP_FAILED;
        if (m == MAP_FAILED) {
            g_mapped.fetch_sub(c->map_charged);
            c->map_charged = 0;
            c->map_ok.store(false);
            return false;
        }
        (void)::madvise(m, size_t(kMapMax), MADV_RANDOM);
        (void)::madvise(m, size_t(kMapMax), MADV_DONTDUMP);
        c->map.store(static_cast<const uint8_t*>(m), std::memory_order_release);
    }
    c->map_valid.store(valid, std::memory_order_release);
    return true;
}

// A read served from the mapping: len, or -1 if the caller must use pread.
ssize_t map_read(FileCtx* c, FileKey& key, int fd, uint8_t* buf, size_t len, off_t off) {
    uint64_t end = uint64_t(off) + len;
    uint32_t skip = c->map_skip.load(std::memory_order_relaxed);
    if (skip > 0) {  // backing off after a slow read (below): pread, without an fstat first
        c->map_skip.store(skip - 1, std::memory_order_relaxed);
        return -1;
    }
    if (!c->map.load(std::memory_order_acquire) ||
        int64_t(end) > c->map_valid.load(std::memory_order_acquire)) {
        if (!map_prepare(c, fd, end)) return -1;
    }
    if (st().wiped.load()) return -1;
    const uint8_t* m = c->map.load(std::memory_order_acquire);
    // A page that is not in the page cache faults in from disk one 4 KiB page at a time
    // (the mapping is MADV_RANDOM), where pread reads the whole request in one I/O; and
    // asking first (mincore) costs a system call, which is what the mapping saves. So
    // the mapping is used optimistically and timed (vDSO clock, no system call): a read
    // slower than kSlowMappedReadNs may have taken a disk fault, and if this thread's count
    // of major faults (getrusage, asked only after a slow read) grew since the last
    // slow one, the next kReadsAfterSlow reads of this descriptor go to pread. A
    // workload of cold reads then pays for one extra 4 KiB I/O in every
    // kReadsAfterSlow + 1 reads; a warm one never leaves the mapping, also when the
    // host preempts this VM in the middle of a read (slow, but no fault: on a shared
    // host that happened often enough to send a share of warm reads to pread).
    int64_t t0 = mono_ns();
    bool ok = map_decrypt(key, m + off, buf, uint64_t(off) / U, len);
    int64_t ns = mono_ns() - t0;
    if (ns > kSlowMappedReadNs) {
        struct rusage ru {};
        if (::getrusage(RUSAGE_THREAD, &ru) != 0 || ru.ru_majflt != tl_majflt) {
            tl_majflt = ru.ru_majflt;
            c->map_skip.store(kReadsAfterSlow, std::memory_order_relaxed);
        }
    }
    if (!ok) {
        // Truncated under us: forget what we knew of its size and let pread tell.
        c->map_valid.store(0, std::memory_order_release);
        return -1;
    }
    return ssize_t(len);
}

// ---- read ---------------------------------------------------------------------------------

ssize_t enc_pread(FileCtx* c, int fd, uint8_t* buf, size_t len, off_t off) {
    if (len == 0) return real().pread(fd, buf, 0, off);
    std::shared_ptr<FileKey> key = ensure_key(c, false);
    if (!key) {
        if (errno != 0) return -1;
        // No key: the file must be empty (nothing was ever written through a key).
        ssize_t r = real().pread(fd, buf, std::min<size_t>(len, 1), off);
        if (r > 0) {
            log_line("no data encryption key for non-empty file \"" + c->rel + "\"");
            errno = EIO;
            return -1;
        }
        return r;
    }
    if (c->map_ok.load(std::memory_order_relaxed) && off % U == 0 && len % U == 0 && len <= kChunk) {
        try {
            ssize_t r = map_read(c, *key, fd, buf, len, off);
            if (r >= 0) return r;
        } catch (const std::exception& e) {
            log_line(std::string("decrypt failed: ") + e.what());
            errno = EIO;
            return -1;
        }
    }
    size_t total = 0;
    while (total < len) {
        off_t o = off + total;
        size_t want = std::min(len - total, kChunk);
        off_t span_start = o - (o % U);
        size_t span_len = ((o + want + U - 1) / U) * U - span_start;
        bool direct = (o % U == 0) && (want % U == 0);
        uint8_t* b = direct ? buf + total : tl_bounce.get(span_len);
        if (!b) {
            errno = ENOMEM;
            return total ? ssize_t(total) : -1;
        }
        ssize_t n;
        {
            UnitLock lk(fd, c->cls, span_start, span_len, false);
            n = sys::pread_full(fd, b, span_len, span_start);
        }
        if (n < 0) return total ? ssize_t(total) : -1;
        if (st().wiped.load()) {
            errno = EIO;
            return -1;
        }
        try {
            crypt_units(*key, false, b, span_start / U, size_t(n));
        } catch (const std::exception& e) {
            log_line(std::string("decrypt failed: ") + e.what());
            errno = EIO;
            return -1;
        }
        size_t avail = size_t(n) > size_t(o - span_start) ? size_t(n) - size_t(o - span_start) : 0;
        size_t got = std::min(avail, want);
        if (!direct && got) std::memcpy(buf + total, b + (o - span_start), got);
        total += got;
        if (got < want) break;  // end of file
    }
    return ssize_t(total);
}

// ---- write --------------------------------------------------------------------------------

// Re-encrypts unit u of a file whose size changes from old_size to new_size (the unit
// holds the end of the file in at least one of them). Extends with zeros.
int reshape_unit(FileCtx* c, FileKey& key, int fd, uint64_t u, int64_t old_size, int64_t new_size) {
    int64_t start = int64_t(u) * U;
    size_t old_len = old_size > start ? size_t(std::min<int64_t>(U, old_size - start)) : 0;
    size_t new_len = new_size > start ? size_t(std::min<int64_t>(U, new_size - start)) : 0;
    if (old_len == new_len || new_len == 0) return 0;
    uint8_t* b = tl_bounce2.get(U);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    std::memset(b, 0, U);
    UnitLock lk(fd, c->cls, start, U, true);
    if (old_len) {
        ssize_t n = sys::pread_full(fd, b, old_len, start);
        if (n < 0) return -1;
        if (size_t(n) < old_len) std::memset(b + n, 0, old_len - n);
        crypt_units(key, false, b, u, old_len);
    }
    crypt_units(key, true, b, u, new_len);
    if (sys::pwrite_full(fd, b, new_len, start) < 0) return -1;
    return 0;
}

int64_t file_size(int fd) {
    struct stat sb;
    if (::fstat(fd, &sb) != 0) return -1;
    return sb.st_size;
}

ssize_t enc_pwrite_chunk(FileCtx* c, FileKey& key, int fd, const uint8_t* buf, size_t len, off_t off) {
    int64_t end = off + int64_t(len);
    int64_t size = c->known_size.load(std::memory_order_relaxed);
    bool extends = end > size;
    if (extends || size % U) {
        size = file_size(fd);
        if (size < 0) return -1;
        extends = end > size;
    }
    uint64_t u0 = uint64_t(off) / U;
    uint64_t u1 = uint64_t(end - 1) / U;
    int64_t new_size = std::max<int64_t>(size, end);
    // The old last unit, if partial and before the span, grows: re-encrypt it first.
    if (extends && size % U && uint64_t(size) / U < u0) {
        if (reshape_unit(c, key, fd, uint64_t(size) / U, size, new_size) != 0) return -1;
    }
    int64_t span_start = int64_t(u0) * U;
    int64_t span_end = std::min<int64_t>(int64_t(u1 + 1) * U, new_size);
    size_t span_len = size_t(span_end - span_start);
    uint8_t* b = tl_bounce.get(span_len);
    if (!b) {
        errno = ENOMEM;
        return -1;
    }
    UnitLock lk(fd, c->cls, span_start, span_end - span_start, true, off % U == 0 && end % U == 0);
    // Old contents are needed only in the first and last unit, where the write leaves
    // part of the unit as it was; they are decrypted over their old lengths.
    bool keep_head = off > span_start && size > span_start;
    bool keep_tail = size > end && end < span_end;
    if (off > span_start || end < span_end) std::memset(b, 0, span_len);
    auto load_unit = [&](uint64_t u) -> bool {
        int64_t us = int64_t(u) * U;
        size_t ol = size_t(std::min<int64_t>(U, size - us));
        ssize_t n = sys::pread_full(fd, b + (us - span_start), ol, us);
        if (n < 0) return false;
        crypt_units(key, false, b + (us - span_start), u, size_t(n));
        return true;
    };
    if (keep_head && !load_unit(u0)) return -1;
    if (keep_tail && !(keep_head && u1 == u0) && !load_unit(u1)) return -1;
    if (off == span_start && end == span_end) {  // whole units (pages, WAL): no copy first
        crypt_units(key, true, buf, b, u0, span_len);
    } else {
        std::memcpy(b + (off - span_start), buf, len);
        crypt_units(key, true, b, u0, span_len);
    }
    if (st().wiped.load()) {
        errno = EIO;
        return -1;
    }
    ssize_t w = sys::pwrite_full(fd, b, span_len, span_start);
    if (w < 0) return -1;
    int64_t cur = c->known_size.load(std::memory_order_relaxed);
    while (new_size > cur && !c->known_size.compare_exchange_weak(cur, new_size)) {
    }
    return ssize_t(len);
}

ssize_t enc_pwrite(FileCtx* c, int fd, const uint8_t* buf, size_t len, off_t off) {
    if (len == 0) return real().pwrite(fd, buf, 0, off);
    std::shared_ptr<FileKey> key = ensure_key(c, true);
    if (!key) {
        if (errno == 0) errno = EIO;
        return -1;
    }
    size_t total = 0;
    try {
        while (total < len) {
            size_t n = std::min(len - total, kChunk);
            ssize_t w = enc_pwrite_chunk(c, *key, fd, buf + total, n, off + total);
            if (w < 0) return total ? ssize_t(total) : -1;
            total += size_t(w);
        }
    } catch (const std::exception& e) {
        log_line(std::string("encrypt failed: ") + e.what());
        errno = EIO;
        return total ? ssize_t(total) : -1;
    }
    return ssize_t(total);
}

// Size change of an encrypted file: fix the unit that holds the (old or new) end.
int enc_resize(FileCtx* c, int fd, int64_t new_size) {
    int64_t size = file_size(fd);
    if (size < 0) return -1;
    if (size == new_size) return 0;
    if (new_size < size) {  // this descriptor's mapping must not read past the new end
        int64_t v = c->map_valid.load();
        int64_t nv = new_size - new_size % int64_t(U);
        while (v > nv && !c->map_valid.compare_exchange_weak(v, nv)) {
        }
    }
    std::shared_ptr<FileKey> key = ensure_key(c, false);
    if (!key) {
        if (errno != 0) return -1;
        if (size == 0) return 0;
        errno = EIO;
        return -1;
    }
    try {
        if (new_size < size && new_size % U) {
            if (reshape_unit(c, *key, fd, uint64_t(new_size) / U, size, new_size) != 0) return -1;
        } else if (new_size > size && size % U) {
            if (reshape_unit(c, *key, fd, uint64_t(size) / U, size, new_size) != 0) return -1;
        }
    } catch (const std::exception& e) {
        log_line(std::string("resize failed: ") + e.what());
        errno = EIO;
        return -1;
    }
    c->known_size.store(new_size);
    return 0;
}

// ---- initialization -------------------------------------------------------------------

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

std::unique_ptr<KeyProvider> audited(const KeyConfig& cfg, const std::string& name) {
    return audit::audited_provider(make_provider(cfg), name, st().aggregate_probes);
}

void stamp_keyring(State& s) {
    if (::stat((s.keyring_dir + "/" + kKeyringFile).c_str(), &s.keyring_stamp) != 0) s.keyring_stamp = {};
}

lifecycle::Context make_context(State& s);
void adopt_context(State& s, lifecycle::Context& ctx);

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
    SecureBytes map_kek;
    uint32_t map_gen = s.keyring.kek_generation;
    try {
        s.provider = audited(cfg, s.keyring.bound_name());
        s.kek = unlock_keyring(s.keyring, *s.provider);
        if (s.keyring.previous) {
            // Interrupted KEK rotation: the key map may still be sealed under the
            // previous generation.
            try {
                map_gen = KeyMap::peek_generation(s.keyring_dir);
            } catch (const std::exception&) {
                map_gen = s.keyring.kek_generation;  // reported by the KeyMap below
            }
            if (map_gen == s.keyring.previous->kek_generation)
                map_kek = unlock_previous_kek(s.keyring, *s.provider);
        }
        if (map_kek.empty()) {
            map_kek = s.kek.clone();
            map_gen = s.keyring.kek_generation;
        }
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
        }
    }
    shared_write(s.keyring.kek_generation, s.kek.data());
    if (map_gen != s.keyring.kek_generation) shared_write(map_gen, map_kek.data());
    try {
        s.keymap.reset(new KeyMap(s.keyring_dir, map_kek, s.keyring.cluster_id, map_gen, shared_kek));
        s.keymap_pid = ::getpid();
    } catch (const std::exception& e) {
        throw LayerError("cmk_lakebase: the key map of data directory \"" + s.datadir + "\" is unusable",
                         e.what(),
                         "Restore the data directory together with its cmk_lakebase/ directory from "
                         "the same backup.");
    }
    map_kek.wipe();
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
}

// Picks up a keyring.json another process rewrote (rewrap, new binding, KEK rotation):
// verified with the KEK of its generation, known here or from shared memory, without a
// KMS call. A keyring that does not verify is reported and ignored. Caller holds
// keyring_mu.
void refresh_keyring_locked(State& s) {
    struct stat sb;
    std::string path = s.keyring_dir + "/" + kKeyringFile;
    if (::stat(path.c_str(), &sb) != 0) return;
    bool same = sb.st_ino == s.keyring_stamp.st_ino && sb.st_size == s.keyring_stamp.st_size &&
                sb.st_mtim.tv_sec == s.keyring_stamp.st_mtim.tv_sec &&
                sb.st_mtim.tv_nsec == s.keyring_stamp.st_mtim.tv_nsec;
    if (same && !s.kek.empty()) return;
    try {
        Keyring kr = same ? s.keyring : load_keyring(s.keyring_dir);
        std::optional<SecureBytes> k;
        if (kr.kek_generation == s.keyring.kek_generation && !s.kek.empty())
            k = s.kek.clone();
        else
            k = shared_kek(kr.kek_generation);
        if (!k) {
            log_line("keyring.json was changed to KEK generation " + std::to_string(kr.kek_generation) +
                     ", which this process does not know; keeping generation " +
                     std::to_string(s.keyring.kek_generation));
            s.keyring_stamp = sb;
            return;
        }
        verify_keyring(kr, *k);
        bool new_provider = !s.provider || kr.config.provider != s.keyring.config.provider ||
                            kr.config.key_id != s.keyring.config.key_id ||
                            kr.config.options != s.keyring.config.options;
        if (new_provider) s.provider = audited(kr.config, kr.bound_name());
        s.keyring = std::move(kr);
        s.kek = std::move(*k);
        s.keyring_stamp = sb;
    } catch (const std::exception& e) {
        log_line(std::string("ignoring a keyring.json that does not verify: ") + e.what());
        s.keyring_stamp = sb;
    }
}

lifecycle::Context make_context(State& s) {
    lifecycle::Context ctx;
    ctx.dir = s.keyring_dir;
    ctx.keymap = &keymap();
    ctx.keyring = s.keyring;
    ctx.kek = s.kek.clone();
    ctx.provider = std::move(s.provider);
    ctx.kek_of = shared_kek;
    ctx.publish = [](uint32_t g, const SecureBytes& k) { shared_write(g, k.data()); };
    ctx.retire = [](uint32_t g) { shared_write(g, nullptr); };
    ctx.make_provider = audited;
    return ctx;
}

void adopt_context(State& s, lifecycle::Context& ctx) {
    s.keyring = ctx.keyring;
    if (!ctx.kek.empty()) s.kek = std::move(ctx.kek);
    if (ctx.provider) s.provider = std::move(ctx.provider);
    stamp_keyring(s);
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

// Refuses to start when a durable encrypted file with data has no key.
void check_every_file_has_key(State& s) {
    std::vector<std::string> missing;
    size_t count = 0;
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
            struct stat sb;
            if (::stat((abs + "/" + name).c_str(), &sb) != 0) continue;  // follows pg_tblspc links
            if (S_ISDIR(sb.st_mode)) {
                stack.push_back(r);
            } else if (S_ISREG(sb.st_mode) && sb.st_size > 0) {
                FileClass c = classify_relative(r);
                if (is_durable(c) && !has_key(r) && !db_locked_file(r)) {
                    count++;
                    if (missing.size() < 5) missing.push_back(r);
                }
            }
        }
        ::closedir(d);
    }
    if (count) {
        std::string list;
        for (auto& m : missing) list += (list.empty() ? "" : ", ") + m;
        throw LayerError("cmk_lakebase: " + std::to_string(count) +
                             " data file(s) have no data encryption key in the key map",
                         "First files without a key: " + list + ".",
                         "The key map cmk_lakebase/keymap is damaged or truncated, or files were copied "
                         "in from another cluster. Restore the data directory together with its "
                         "cmk_lakebase/ directory from the same backup.");
    }
}

// Rewrites a whole file from one encoding to another in place (class change on
// rename). A null key means plaintext.
int transcode(const std::string& abs, const std::shared_ptr<FileKey>& from,
              const std::shared_ptr<FileKey>& to) {
    int fd = sys::open(abs.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return -1;
    int64_t size = file_size(fd);
    std::vector<uint8_t> b(U);
    int rc = 0;
    for (int64_t pos = 0; pos < size && rc == 0; pos += U) {
        size_t n = size_t(std::min<int64_t>(U, size - pos));
        if (sys::pread_full(fd, b.data(), n, pos) != ssize_t(n)) {
            rc = -1;
            break;
        }
        if (from) crypt_units(*from, false, b.data(), uint64_t(pos) / U, n);
        if (to) crypt_units(*to, true, b.data(), uint64_t(pos) / U, n);
        if (sys::pwrite_full(fd, b.data(), n, pos) < 0) rc = -1;
    }
    std::fill(b.begin(), b.end(), 0);
    if (rc == 0 && ::fsync(fd) != 0) rc = -1;
    int saved = errno;
    sys::close(fd);
    errno = saved;
    return rc;
}

}  // namespace

// ===== operations =============================================================================

namespace detail {

int op_openat(int dirfd, const char* path, int flags, mode_t mode) {
    std::optional<Resolved> r;
    if (!tl_in_layer && !(flags & O_PATH)) r = resolve(dirfd, path);
    if (!r || !is_encrypted(r->cls) || !ensure_active()) return real().openat(dirfd, path, flags, mode);
    State& s = st();
    int rflags = flags;
    bool append = flags & O_APPEND;
    rflags &= ~O_APPEND;  // pwrite() on an O_APPEND descriptor ignores its offset
    if ((rflags & O_ACCMODE) == O_WRONLY) rflags = (rflags & ~O_ACCMODE) | O_RDWR;  // for read-modify-write
    int fd = real().openat(dirfd, path, rflags, mode);
    bool readable = true;
    if (fd < 0 && (flags & O_ACCMODE) == O_WRONLY && errno == EACCES) {
        fd = real().openat(dirfd, path, flags & ~O_APPEND, mode);
        readable = false;
    }
    if (fd < 0) return fd;
    struct stat sb;
    if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) return fd;
    if (s.wiped.load()) {
        real().close(fd);
        errno = EIO;
        return -1;
    }
    auto* c = new FileCtx();
    c->cls = r->cls;
    c->rel = r->rel;
    c->append = append;
    c->known_size.store(sb.st_size);
    c->map_ok.store(r->cls == FileClass::Relation && readable && !(flags & O_DIRECT) && map_reads_enabled());
    try {
        if (is_ephemeral(r->cls)) {
            c->key = ephemeral_key(sb.st_dev, sb.st_ino);
        } else if ((flags & O_CREAT) && (flags & O_EXCL)) {
            c->fresh = true;  // a new file: a new key at its first write
            c->db_oid = database_of(r->rel);
            c->db = db_slot(c->db_oid);
            if (c->db && !db_usable(c->db)) throw DbUnavailable(c->db_oid);
        } else {
            // Bind the key at open: the descriptor keeps it even if the name moves on
            // (a recycled WAL segment read by a walsender, for instance).
            if (auto k = lookup_file_key(r->rel, &c->db)) {
                c->db_oid = database_of(r->rel);
                c->key = std::move(k);
            } else if (sb.st_size > 0) {
                log_line("no data encryption key for non-empty file \"" + r->rel +
                         "\" (key map damaged or truncated, or a file from elsewhere)");
                delete c;
                real().close(fd);
                errno = EIO;
                return -1;
            }
        }
    } catch (const DbUnavailable& e) {
        log_line("cannot open \"" + r->rel + "\": " + e.what());
        delete c;
        real().close(fd);
        errno = EIO;
        return -1;
    } catch (const std::exception& e) {
        log_line(std::string("cannot open \"") + r->rel + "\": " + e.what());
        delete c;
        real().close(fd);
        errno = EIO;
        return -1;
    }
    ctx_set(fd, c);
    return fd;
}

int op_close(int fd) {
    if (ctx_get(fd)) {
        ctx_set(fd, nullptr);
        // A database locked since: the closes its revocation makes every process do
        // (SMGRRELEASE) also drop this process's key map of it. One atomic load.
        db_sweep();
    }
    return real().close(fd);
}

bool op_is_encrypted_fd(int fd) { return ctx_get(fd) != nullptr; }

void op_dup(int oldfd, int newfd) {
    if (newfd < 0 || oldfd == newfd) return;
    FileCtx* c = ctx_get(oldfd);
    if (c) c->refs.fetch_add(1);
    ctx_set(newfd, c);
}

ssize_t op_pread(int fd, void* buf, size_t n, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().pread(fd, buf, n, off);
    return enc_pread(c, fd, static_cast<uint8_t*>(buf), n, off);
}

ssize_t op_pwrite(int fd, const void* buf, size_t n, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().pwrite(fd, buf, n, off);
    return enc_pwrite(c, fd, static_cast<const uint8_t*>(buf), n, off);
}

ssize_t op_read(int fd, void* buf, size_t n) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().read(fd, buf, n);
    off_t cur = real().lseek(fd, 0, SEEK_CUR);
    if (cur < 0) return -1;
    ssize_t r = enc_pread(c, fd, static_cast<uint8_t*>(buf), n, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

ssize_t op_write(int fd, const void* buf, size_t n) {
    FileCtx* c = ctx_get(fd);
    if (!c) return real().write(fd, buf, n);
    off_t cur = c->append ? off_t(file_size(fd)) : real().lseek(fd, 0, SEEK_CUR);
    if (cur < 0) return -1;
    ssize_t r = enc_pwrite(c, fd, static_cast<const uint8_t*>(buf), n, cur);
    if (r > 0) real().lseek(fd, cur + r, SEEK_SET);
    return r;
}

namespace {
size_t iov_total(const struct iovec* iov, int cnt) {
    size_t t = 0;
    for (int i = 0; i < cnt; i++) t += iov[i].iov_len;
    return t;
}
}  // namespace

ssize_t op_preadv(int fd, const struct iovec* iov, int cnt, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return off < 0 ? real().readv(fd, iov, cnt) : real().preadv(fd, iov, cnt, off);
    size_t total = iov_total(iov, cnt);
    std::vector<uint8_t> tmp(total);
    ssize_t r = off < 0 ? op_read(fd, tmp.data(), total) : enc_pread(c, fd, tmp.data(), total, off);
    if (r <= 0) return r;
    size_t pos = 0;
    for (int i = 0; i < cnt && pos < size_t(r); i++) {
        size_t k = std::min(iov[i].iov_len, size_t(r) - pos);
        std::memcpy(iov[i].iov_base, tmp.data() + pos, k);
        pos += k;
    }
    std::fill(tmp.begin(), tmp.end(), 0);
    return r;
}

ssize_t op_pwritev(int fd, const struct iovec* iov, int cnt, off_t off) {
    FileCtx* c = ctx_get(fd);
    if (!c) return off < 0 ? real().writev(fd, iov, cnt) : real().pwritev(fd, iov, cnt, off);
    size_t total = iov_total(iov, cnt);
    std::vector<uint8_t> tmp(total);
    size_t pos = 0;
    for (int i = 0; i < cnt; i++) {
        std::memcpy(tmp.data() + pos, iov[i].iov_base, iov[i].iov_len);
        pos += iov[i].iov_len;
    }
    ssize_t r = off < 0 ? op_write(fd, tmp.data(), total) : enc_pwrite(c, fd, tmp.data(), total, off);
    std::fill(tmp.begin(), tmp.end(), 0);
    return r;
}

int op_ftruncate(int fd, off_t len) {
    FileCtx* c = ctx_get(fd);
    if (c && enc_resize(c, fd, len) != 0) return -1;
    return real().ftruncate(fd, len);
}

int op_truncate(const char* path, off_t len) {
    std::optional<Resolved> r = tl_in_layer ? std::nullopt : resolve(AT_FDCWD, path);
    if (!r || !is_encrypted(r->cls) || !ensure_active()) return real().truncate(path, len);
    if (len == 0) return real().truncate(path, 0);  // nothing of the old content remains
    int fd = op_openat(AT_FDCWD, path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) return -1;
    int rc = op_ftruncate(fd, len);
    int saved = errno;
    op_close(fd);
    errno = saved;
    return rc;
}

int op_fallocate(int fd, int mode, off_t off, off_t len, bool posix) {
    FileCtx* c = ctx_get(fd);
    if (c && (posix || mode == 0)) {
        int64_t size = file_size(fd);
        if (size >= 0 && off + len > size && enc_resize(c, fd, off + len) != 0)
            return posix ? errno : -1;
    }
    return posix ? real().posix_fallocate(fd, off, len) : real().fallocate(fd, mode, off, len);
}

ssize_t op_copy_file_range(int fdin, off_t* offin, int fdout, off_t* offout, size_t len, unsigned flags) {
    if (!ctx_get(fdin) && !ctx_get(fdout))
        return real().copy_file_range(fdin, offin, fdout, offout, len, flags);
    // Each side has its own key: copy through the layer (decrypt, re-encrypt).
    std::vector<uint8_t> b(std::min<size_t>(len, kChunk));
    size_t done = 0;
    while (done < len) {
        size_t want = std::min(len - done, b.size());
        ssize_t r = offin ? op_pread(fdin, b.data(), want, *offin) : op_read(fdin, b.data(), want);
        if (r < 0) return done ? ssize_t(done) : -1;
        if (r == 0) break;
        ssize_t w = offout ? op_pwrite(fdout, b.data(), size_t(r), *offout) : op_write(fdout, b.data(), size_t(r));
        if (w < 0) return done ? ssize_t(done) : -1;
        if (offin) *offin += r;
        if (offout) *offout += w;
        done += size_t(w);
        if (w < r) break;
    }
    std::fill(b.begin(), b.end(), 0);
    return ssize_t(done);
}

int op_unlinkat(int dirfd, const char* path, int flags) {
    std::optional<Resolved> r;
    if (!tl_in_layer && !(flags & AT_REMOVEDIR)) r = resolve(dirfd, path);
    int rc = real().unlinkat(dirfd, path, flags);
    if (rc != 0 || !r || !is_durable(r->cls) || !ensure_active()) return rc;
    int saved = errno;
    try {
        remove_key(r->rel);  // crypto-shredding: the segment's key is gone
    } catch (const std::exception& e) {
        log_line("could not remove the key of \"" + r->rel + "\": " + e.what());
    }
    errno = saved;
    return rc;
}

namespace {
// The key a file at `rel` (class cls, inode of sb) is encrypted under now.
std::shared_ptr<FileKey> current_key(const Resolved& r, const struct stat& sb, bool* missing) {
    *missing = false;
    if (is_ephemeral(r.cls)) return ephemeral_key(sb.st_dev, sb.st_ino);
    if (auto k = lookup_file_key(r.rel, nullptr)) return k;
    *missing = sb.st_size > 0;
    return nullptr;
}
}  // namespace

int op_renameat2(int olddirfd, const char* from, int newdirfd, const char* to, unsigned flags) {
    auto do_rename = [&] { return real().renameat2(olddirfd, from, newdirfd, to, flags); };
    if (tl_in_layer) return do_rename();
    std::optional<Resolved> rf = resolve(olddirfd, from), rt = resolve(newdirfd, to);
    FileClass cf = rf ? rf->cls : FileClass::Plaintext;
    FileClass ct = rt ? rt->cls : FileClass::Plaintext;
    struct stat sb;
    bool have = ::fstatat(olddirfd, from, &sb, AT_SYMLINK_NOFOLLOW) == 0;
    bool is_dir = have && S_ISDIR(sb.st_mode);
    if ((!is_encrypted(cf) && !is_encrypted(ct) && !is_dir) || !have || !(rf || rt) || !ensure_active())
        return do_rename();
    try {
        KeyMap& km = keymap();
        if (is_dir) {
            // Durable keys below a renamed directory follow it.
            int rc = do_rename();
            if (rc != 0 || !rf || !rt) return rc;
            int saved = errno;
            km.refresh();
            std::string pf = rf->rel + "/";
            for (const std::string& id : km.identities())
                if (id.compare(0, pf.size(), pf) == 0) {
                    std::string nid = rt->rel + "/" + id.substr(pf.size());
                    move_key(id, nid, classify_relative(nid), false);
                }
            errno = saved;
            return 0;
        }
        if (!S_ISREG(sb.st_mode)) return do_rename();
        if (is_durable(cf) && is_durable(ct)) {
            if (!has_key(rf->rel)) {
                int rc = do_rename();
                if (rc == 0) remove_key(rt->rel);  // the new file has no key: drop any stale one
                return rc;
            }
            move_key(rf->rel, rt->rel, ct, true);
            int rc = do_rename();
            int saved = errno;
            if (rc == 0) remove_key(rf->rel);
            errno = saved;
            return rc;
        }
        if (is_ephemeral(cf) && is_ephemeral(ct)) return do_rename();  // key follows the inode
        // The class changes (e.g. pg_wal/xlogtemp.N -> 00000002.history, read by
        // PostgreSQL through stdio): rewrite the contents in the new encoding first.
        bool missing = false;
        std::shared_ptr<FileKey> src;
        if (is_encrypted(cf)) {
            src = current_key(*rf, sb, &missing);
            if (missing) {
                log_line("no data encryption key for \"" + rf->rel + "\"");
                errno = EIO;
                return -1;
            }
        }
        std::shared_ptr<FileKey> dst;
        if (is_durable(ct)) {
            dst = std::make_shared<FileKey>(create_key(rt->rel, ct));
        } else if (is_ephemeral(ct)) {
            dst = ephemeral_key(sb.st_dev, sb.st_ino);
        }
        std::string abs = absolute_of(olddirfd, from);
        if ((src || dst) && transcode(abs, src, dst) != 0) return -1;
        int rc = do_rename();
        int saved = errno;
        if (rc == 0) {
            if (is_durable(cf)) remove_key(rf->rel);
            if (!is_durable(ct) && rt) remove_key(rt->rel);
        }
        errno = saved;
        return rc;
    } catch (const std::exception& e) {
        log_line(std::string("rename of \"") + from + "\" failed: " + e.what());
        errno = EIO;
        return -1;
    }
}

int op_linkat(int olddirfd, const char* from, int newdirfd, const char* to, int flags) {
    if (tl_in_layer) return real().linkat(olddirfd, from, newdirfd, to, flags);
    std::optional<Resolved> rf = resolve(olddirfd, from), rt = resolve(newdirfd, to);
    FileClass cf = rf ? rf->cls : FileClass::Plaintext;
    FileClass ct = rt ? rt->cls : FileClass::Plaintext;
    if ((!is_encrypted(cf) && !is_encrypted(ct)) || !ensure_active())
        return real().linkat(olddirfd, from, newdirfd, to, flags);
    if (is_ephemeral(cf) && is_ephemeral(ct)) return real().linkat(olddirfd, from, newdirfd, to, flags);
    if (!(is_durable(cf) && is_durable(ct))) {
        errno = EXDEV;  // one inode cannot hold two encodings; callers fall back to copying
        return -1;
    }
    try {
        if (!has_key(rf->rel)) return real().linkat(olddirfd, from, newdirfd, to, flags);
        move_key(rf->rel, rt->rel, ct, true);
        int rc = real().linkat(olddirfd, from, newdirfd, to, flags);
        int saved = errno;
        if (rc != 0) remove_key(rt->rel);
        errno = saved;
        return rc;
    } catch (const std::exception& e) {
        log_line(std::string("link of \"") + from + "\" failed: " + e.what());
        errno = EIO;
        return -1;
    }
}

}  // namespace detail

// ===== public API =============================================================================

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
    }
    detail::install_got();
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
    } else if (sb.st_size > 0) {
        fi.encrypted = false;  // a keyless non-empty file: unreadable, report it
    } else {
        fi.key_kind = "dek";  // empty: its key is made at the first write
    }
    return fi;
}

KeyStatus provider_status() {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    if (s.mode.load() != Mode::Off) refresh_keyring_locked(s);
    if (s.mode.load() == Mode::Off || !s.provider) {
        KeyStatus ks;
        ks.health = KeyHealth::Unavailable;
        ks.state = "unknown";
        ks.detail = "the encrypting file layer is not active";
        return ks;
    }
    try {
        return s.provider->status();
    } catch (const KmsError& e) {
        KeyStatus ks;
        ks.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
        ks.state = "error";
        ks.detail = e.what();
        return ks;
    }
}

ProbeResult probe_key() {
    State& s = st();
    ProbeResult r;
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    if (s.mode.load() != Mode::Off && !s.wiped.load()) refresh_keyring_locked(s);
    if (s.mode.load() == Mode::Off || !s.provider) {
        r.detail = "the encrypting file layer is not active";
        return r;
    }
    if (s.wiped.load()) {
        r.health = KeyHealth::Revoked;
        r.detail = "keys have been wiped in this server";
        return r;
    }
    if (s.kek.empty()) {
        // Not a revocation: this process does not hold the KEK to compare with.
        r.detail =
            "this process does not know the KEK of generation " + std::to_string(s.keyring.kek_generation);
        return r;
    }
    try {
        KeyStatus ks = s.provider->status();
        r.request_id = ks.request_id;
        if (ks.health != KeyHealth::Ok) {
            r.health = ks.health;
            r.detail = ks.state.empty() ? ks.detail : ks.state + ": " + ks.detail;
            return r;
        }
        SecureBytes k = s.provider->unwrap(s.keyring.wrapped_kek);
        if (k.size() != s.kek.size() || !ct_equal(k.data(), s.kek.data(), k.size())) {
            r.health = KeyHealth::Revoked;
            r.detail = "the key provider unwrapped the key-encryption key to a different key (the CMK was replaced)";
            return r;
        }
        r.health = KeyHealth::Ok;
        r.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state) + "; unwrap probe matched";
    } catch (const KmsError& e) {
        r.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
        r.detail = e.what();
    } catch (const std::exception& e) {
        r.health = KeyHealth::Unavailable;
        r.detail = e.what();
    }
    return r;
}

void wipe_keys() {
    State& s = st();
    s.wiped.store(true);
    s.kek.wipe();
    s.per_boot.wipe();
    forget_kept_keys();
    // Every process's KEK source: from now on no process can open the key map.
    if (SharedKeys* sh = s.shared) {
        sh->seq.fetch_add(1);
        OPENSSL_cleanse(sh->slot, sizeof sh->slot);
        sh->seq.fetch_add(1);
    }
    if (DbShared* d = s.dbshared)
        for (auto& sl : d->slot)
            if (sl.state.load() != kDbFree) slot_set(sl.oid.load(), nullptr, kDbLocked);
    // Open descriptors keep their FileKey objects; they refuse to work from now on
    // (checked on every read and write) and are destroyed as descriptors close.
}

// ---- key lifecycle (online) --------------------------------------------------------------

namespace {

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

KeyOpResult to_result(const lifecycle::Result& r) {
    KeyOpResult o;
    o.action = r.action;
    o.config_name = r.config_name;
    o.provider = r.provider;
    o.key_id = r.key_id;
    o.key_version_before = r.key_version_before;
    o.key_version = r.key_version;
    o.kek_generation_before = r.kek_generation_before;
    o.kek_generation = r.kek_generation;
    o.kek_fingerprint = r.kek_fingerprint;
    o.finished_interrupted = r.finished_interrupted;
    return o;
}

}  // namespace

KeyOpResult rewrap_kek() {
    return with_context([](lifecycle::Context& c) { return to_result(lifecycle::rewrap(c)); });
}

KeyOpResult rotate_kek() {
    return with_context([](lifecycle::Context& c) { return to_result(lifecycle::rotate_kek(c)); });
}

KeyOpResult bind_cluster(const std::string& config_name) {
    return with_context(
        [&](lifecycle::Context& c) { return to_result(lifecycle::bind_cluster(c, config_name)); });
}

std::vector<KeyConfigInfo> key_configs() {
    return with_context([](lifecycle::Context& c) {
        std::vector<KeyConfigInfo> out;
        for (const auto& row : lifecycle::list_configs(c)) {
            KeyConfigInfo k;
            k.name = row.named.name;
            k.provider = row.named.config.provider;
            k.key_id = row.named.config.key_id;
            k.options = row.named.config.options;
            k.created_at = row.named.created_at;
            k.bound = row.bound;
            out.push_back(std::move(k));
        }
        return out;
    });
}

void create_key_config(const std::string& name, const KeyConfig& cfg) {
    with_context([&](lifecycle::Context& c) {
        lifecycle::create_config(c, NamedKeyConfig{name, cfg, ""});
        return 0;
    });
}

void drop_key_config(const std::string& name) {
    with_context([&](lifecycle::Context& c) {
        lifecycle::drop_config(c, name);
        return 0;
    });
}

// ---- databases bound to key configurations of their own ------------------------------------

namespace {

const char* db_state_name(int state) {
    switch (state) {
        case kDbOpen: return "open";
        case kDbClosing: return "closing";
        case kDbLocked: return "locked";
        default: return "unbound";
    }
}

// This process's keyring and provider of a bound database, re-read when keyring.json
// changed (verified with the database KEK when it is available). Caller holds db_mu.
State::DbProc& db_proc(uint32_t oid) {
    State& s = st();
    std::string dir = dbkeys::dir_for(s.keyring_dir, oid);
    struct stat sb;
    if (::stat((dir + "/" + kKeyringFile).c_str(), &sb) != 0)
        throw lifecycle::LifecycleError("database " + std::to_string(oid) +
                                            " is not bound to a key configuration of its own",
                                        lifecycle::LifecycleError::NotFound);
    State::DbProc& p = s.dbs[oid];
    bool same = p.provider && sb.st_ino == p.stamp.st_ino && sb.st_size == p.stamp.st_size &&
                sb.st_mtim.tv_sec == p.stamp.st_mtim.tv_sec && sb.st_mtim.tv_nsec == p.stamp.st_mtim.tv_nsec;
    if (!same) {
        Keyring kr = load_keyring(dir);
        if (DbSlot* sl = db_slot(oid))
            if (auto k = slot_kek(sl)) verify_keyring(kr, *k);
        bool new_provider = !p.provider || kr.config.provider != p.keyring.config.provider ||
                            kr.config.key_id != p.keyring.config.key_id ||
                            kr.config.options != p.keyring.config.options;
        if (new_provider) p.provider = audited(kr.config, kr.bound_name());
        p.keyring = std::move(kr);
        p.stamp = sb;
    }
    return p;
}

void db_stamp(State::DbProc& p, uint32_t oid) {
    std::string path = dbkeys::dir_for(st().keyring_dir, oid) + "/" + kKeyringFile;
    if (::stat(path.c_str(), &p.stamp) != 0) p.stamp = {};
}

audit::Event db_event(const std::string& action, uint32_t oid, const std::string& config, const KeyConfig& cfg) {
    audit::Event e;
    e.action = action;
    e.key_config = config;
    e.provider = cfg.provider;
    e.key_id = cfg.key_id;
    e.detail = "database " + std::to_string(oid);
    return e;
}

std::optional<SecureBytes> cluster_kek_of(lifecycle::Context& c, uint32_t gen) {
    if (gen == c.keyring.kek_generation && !c.kek.empty()) return c.kek.clone();
    if (c.kek_of) return c.kek_of(gen);
    return std::nullopt;
}

}  // namespace

DbOpResult bind_database(uint32_t oid, const std::string& config_name) {
    return with_context([&](lifecycle::Context& c) {
        State& s = st();
        validate_config_name(config_name);
        struct stat sb;
        if (oid == 0 || ::stat((s.datadir + "/base/" + std::to_string(oid)).c_str(), &sb) != 0)
            throw lifecycle::LifecycleError("database " + std::to_string(oid) + " does not exist",
                                            lifecycle::LifecycleError::NotFound);
        KeyConfigSet set = load_key_configs(c.dir, [&c](uint32_t g) { return cluster_kek_of(c, g); });
        // The cluster's own configuration is a valid choice too (a database KEK of its
        // own under the same CMK), even before configs.json records it.
        if (!set.configs.count(config_name) && config_name == c.keyring.bound_name())
            set.configs[config_name] = NamedKeyConfig{config_name, c.keyring.config, c.keyring.created_at};
        auto it = set.configs.find(config_name);
        if (it == set.configs.end())
            throw lifecycle::LifecycleError("key configuration \"" + config_name +
                                                "\" does not exist; list them with key_configs() or create it "
                                                "with create_key_config()",
                                            lifecycle::LifecycleError::NotFound);
        const NamedKeyConfig target = it->second;
        DbOpResult r;
        r.oid = oid;
        std::lock_guard<std::recursive_mutex> g(s.db_mu);
        bool rebind = dbkeys::is_bound(c.dir, oid);
        r.action = rebind ? "rebind_database" : "bind_database";
        audit::Event e = db_event(r.action, oid, config_name, target.config);
        try {
            std::unique_ptr<KeyProvider> np = audited(target.config, config_name);
            if (rebind) {
                DbSlot* sl = db_slot(oid);
                std::optional<SecureBytes> k = sl ? slot_kek(sl) : std::nullopt;
                if (!k)
                    throw LayerError("cmk_lakebase: the key of database " + std::to_string(oid) +
                                         " is not available, so it cannot be re-wrapped",
                                     "", "Restore access to the database's current key first.");
                State::DbProc& p = db_proc(oid);
                if (p.keyring.bound_name() == config_name)
                    throw lifecycle::LifecycleError("database " + std::to_string(oid) +
                                                    " is already bound to key configuration \"" + config_name + "\"");
                e.detail += ", from key configuration \"" + p.keyring.bound_name() + "\"";
                KeyMap::Exclusive lock(*c.keymap);
                Keyring nk = dbkeys::rebind(c.dir, oid, p.keyring, *k, target, *np);
                p.keyring = std::move(nk);
                p.provider = std::move(np);
                db_stamp(p, oid);
                r.dek_count = db_keymap(oid, sl).size();
            } else {
                KeyMap::Exclusive lock(*c.keymap);
                dbkeys::Binding b = dbkeys::bind(c.dir, *c.keymap, c.keyring.cluster_id, oid, target, *np,
                                                 [oid](const SecureBytes& k) { slot_set(oid, &k, kDbOpen); });
                State::DbProc& p = s.dbs[oid];
                p.keyring = b.keyring;
                p.provider = std::move(np);
                db_stamp(p, oid);
                r.dek_count = b.moved;
            }
        } catch (const std::exception& ex) {
            e.outcome = "error";
            if (auto* k = dynamic_cast<const KmsError*>(&ex)) e.outcome = audit::kms_error_outcome(k->kind);
            e.detail += ": " + std::string(ex.what());
            audit::record(e);
            throw;
        }
        const Keyring& kr = s.dbs[oid].keyring;
        r.config_name = config_name;
        r.provider = kr.config.provider;
        r.key_id = kr.config.key_id;
        r.key_version = kr.kek_version;
        r.kek_fingerprint = kr.kek_fingerprint;
        e.key_version = kr.kek_version;
        e.outcome = "ok";
        e.detail += ", " + std::to_string(r.dek_count) + " DEKs under the database's own KEK";
        audit::record(e);
        return r;
    });
}

DbOpResult unbind_database(uint32_t oid) {
    return with_context([&](lifecycle::Context& c) {
        State& s = st();
        std::lock_guard<std::recursive_mutex> g(s.db_mu);
        State::DbProc& p = db_proc(oid);
        DbOpResult r;
        r.action = "unbind_database";
        r.oid = oid;
        r.config_name = p.keyring.bound_name();
        r.provider = p.keyring.config.provider;
        r.key_id = p.keyring.config.key_id;
        audit::Event e = db_event(r.action, oid, r.config_name, p.keyring.config);
        try {
            DbSlot* sl = db_slot(oid);
            if (!sl || !db_usable(sl))
                throw LayerError("cmk_lakebase: the key of database " + std::to_string(oid) +
                                     " is not available, so its keys cannot be moved back",
                                 "", "Restore access to the database's key first.");
            KeyMap::Exclusive lock(*c.keymap);
            r.dek_count = dbkeys::unbind(c.dir, *c.keymap, db_keymap(oid, sl), oid);
            slot_set(oid, nullptr, kDbFree);
            s.dbs.erase(oid);
        } catch (const std::exception& ex) {
            e.outcome = "error";
            e.detail += ": " + std::string(ex.what());
            audit::record(e);
            throw;
        }
        e.outcome = "ok";
        e.detail += ", " + std::to_string(r.dek_count) + " DEKs back under the cluster KEK";
        audit::record(e);
        return r;
    });
}

std::vector<DatabaseKeyInfo> database_keys() {
    State& s = st();
    std::vector<DatabaseKeyInfo> out;
    if (s.mode.load() == Mode::Off) return out;
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    for (uint32_t oid : dbkeys::bound_databases(s.keyring_dir)) {
        DatabaseKeyInfo i;
        i.oid = oid;
        DbSlot* sl = db_slot(oid);
        i.state = sl ? db_state_name(sl->state.load()) : "locked";
        try {
            State::DbProc& p = db_proc(oid);
            i.config_name = p.keyring.bound_name();
            i.provider = p.keyring.config.provider;
            i.key_id = p.keyring.config.key_id;
            i.key_version = p.keyring.kek_version;
            i.kek_fingerprint = p.keyring.kek_fingerprint;
            i.bound_at = p.keyring.created_at;
            i.rotated_at = p.keyring.rotated_at;
            if (sl && db_usable(sl)) {
                KeyMap& dm = db_keymap(oid, sl);
                dm.refresh();
                i.dek_count = dm.size();
            }
        } catch (const std::exception& e) {
            i.state = "locked";
            log_line("database " + std::to_string(oid) + ": " + e.what());
        }
        out.push_back(std::move(i));
    }
    return out;
}

bool database_refused(uint32_t oid) {
    DbSlot* sl = db_slot(oid);
    if (!sl) return false;
    int state = sl->state.load(std::memory_order_acquire);
    return state == kDbClosing || state == kDbLocked;
}

bool any_database_refused() {
    DbShared* d = st().dbshared;
    if (!d || d->in_use.load(std::memory_order_acquire) == 0) return false;
    for (auto& sl : d->slot) {
        int state = sl.state.load(std::memory_order_acquire);
        if (state == kDbClosing || state == kDbLocked) return true;
    }
    return false;
}

std::vector<DbProbe> probe_databases() {
    State& s = st();
    std::vector<DbProbe> out;
    if (s.mode.load() == Mode::Off || s.wiped.load()) return out;
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    for (uint32_t oid : dbkeys::bound_databases(s.keyring_dir)) {
        DbProbe pr;
        pr.oid = oid;
        DbSlot* sl = db_slot(oid);
        int state = sl ? sl->state.load() : kDbLocked;
        pr.state = db_state_name(state);
        struct stat sb;
        if (::stat((s.datadir + "/base/" + std::to_string(oid)).c_str(), &sb) != 0 && errno == ENOENT) {
            pr.dropped = true;
            pr.detail = "the database no longer exists";
            out.push_back(std::move(pr));
            continue;
        }
        try {
            State::DbProc& p = db_proc(oid);
            pr.config_name = p.keyring.bound_name();
            pr.provider = p.keyring.config.provider;
            pr.key_id = p.keyring.config.key_id;
            KeyStatus ks = p.provider->status();
            pr.request_id = ks.request_id;
            if (ks.health != KeyHealth::Ok) {
                pr.health = ks.health;
                pr.detail = ks.state.empty() ? ks.detail : ks.state + ": " + ks.detail;
            } else if (std::optional<SecureBytes> k = sl ? slot_kek(sl) : std::nullopt) {
                SecureBytes u = p.provider->unwrap(p.keyring.wrapped_kek);
                if (u.size() != k->size() || !ct_equal(u.data(), k->data(), u.size())) {
                    pr.health = KeyHealth::Revoked;
                    pr.detail = "the key provider unwrapped the database's KEK to a different key (the CMK was "
                                "replaced)";
                } else {
                    pr.health = KeyHealth::Ok;
                    pr.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state) +
                                "; unwrap probe matched";
                }
            } else {
                pr.health = KeyHealth::Ok;  // locked, and the key says usable again
                pr.detail = "key " + (ks.state.empty() ? std::string("usable") : ks.state);
            }
        } catch (const KmsError& e) {
            pr.health = e.kind == KmsErrorKind::Revoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
            pr.detail = e.what();
        } catch (const std::exception& e) {
            pr.health = KeyHealth::Unavailable;
            pr.detail = e.what();
        }
        out.push_back(std::move(pr));
    }
    return out;
}

void begin_database_revocation(uint32_t oid) {
    KeyMap::Exclusive lock(keymap());
    DbSlot* sl = db_slot(oid);
    if (sl && sl->state.load() == kDbOpen) slot_state(oid, kDbClosing);
}

void lock_database(uint32_t oid) {
    State& s = st();
    KeyMap::Exclusive lock(keymap());
    if (db_slot(oid)) slot_set(oid, nullptr, kDbLocked);
    forget_kept_keys();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    auto it = s.dbs.find(oid);
    if (it != s.dbs.end()) {
        it->second.map.reset();
        it->second.map_pid = 0;
    }
}

void unlock_database(uint32_t oid) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    State::DbProc& p = db_proc(oid);
    SecureBytes k = unlock_keyring(p.keyring, *p.provider);
    KeyMap::Exclusive lock(keymap());
    slot_set(oid, &k, kDbOpen);
    KeyMap& dm = db_keymap(oid, db_slot(oid));
    size_t n = dbkeys::settle(keymap(), dm, oid);
    if (n) log_line("database " + std::to_string(oid) + ": moved " + std::to_string(n) +
                    " keys left in the cluster key map by an interrupted binding");
}

void forget_database(uint32_t oid) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.db_mu);
    KeyMap::Exclusive lock(keymap());
    dbkeys::forget(s.keyring_dir, oid);
    slot_set(oid, nullptr, kDbFree);
    s.dbs.erase(oid);
    forget_kept_keys();
}

std::string keyring_directory() {
    return st().keyring_dir;
}

void set_probe_audit_aggregation(bool on) {
    State& s = st();
    std::lock_guard<std::recursive_mutex> g(s.keyring_mu);
    s.aggregate_probes = on;
    if (s.provider) audit::set_aggregate_probes(*s.provider, on);
}

}  // namespace cmk::fs
