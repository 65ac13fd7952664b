// The key map (keymap.hpp): an append-only, checksummed log of wrapped DEKs shared by
// every process that works on one data directory.
//
// File layout (all integers little-endian):
//   header, 96 bytes:
//     0  magic "CMKKMAP1"            8  u32 format version (1)
//     12 u32 KEK generation          16 u16 cluster id length
//     18 cluster id (64 bytes, NUL padded)   82 reserved (10 zero bytes)
//     92 u32 CRC32C of bytes 0..91
//   records, back to back:
//     u32 body length | u32 CRC32C(length bytes) ^ kLenSeal | body | u32 CRC32C(length bytes + body)
//     body: u8 type (1 ADD, 2 DEL) | u8 file class | u16 identity length | identity
//           | ADD only: u16 wrapped length | wrapped DEK (AES-256-GCM blob under the KEK,
//             aad = dek_aad(identity, generation))
// The length has its own check so that a damaged length in the middle of the log is
// reported as damage instead of looking like a torn tail (which would silently drop
// every later record). A record that runs past the end of the file, or an all-zero
// tail, is a torn append: ignored, and cut off by the next writer.
//
// Locking: a thread mutex, then flock() on keymap.lock (shared to read, exclusive to
// append or replace). The lock file is opened per operation rather than kept open: a
// descriptor inherited over fork() shares its lock with the parent, which would let
// the postmaster's children append concurrently. In a server, every writer section
// also counts on a counter its processes share (set_change_counter), and the server's
// own maps skip their look at the file while it has not moved (skip_unchanged).
//
// Longer than the house's 800-line limit on purpose: the record format, its torn-tail
// rules and the locking that makes appends safe (with the change counter that lets
// readers trust what they last read) are one argument, read together when the key
// map's durability is reviewed; split, each half would only be checkable with the
// other open.
#include "cmk_lakebase/keys/keymap.hpp"

#include <fcntl.h>
#include <openssl/crypto.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk {
namespace {

constexpr char kMagic[8] = {'C', 'M', 'K', 'K', 'M', 'A', 'P', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kHeaderSize = 96;
constexpr size_t kClusterIdMax = 64;
constexpr uint32_t kLenSeal = 0x4b4d5245;  // keeps a zero length from checking as valid
constexpr uint32_t kMaxBody = 1u << 20;
constexpr uint8_t kAdd = 1;
constexpr uint8_t kDel = 2;
constexpr size_t kDekSize = kXtsKeySize;

void put16(std::vector<uint8_t>& b, uint16_t v) {
    b.push_back(static_cast<uint8_t>(v));
    b.push_back(static_cast<uint8_t>(v >> 8));
}
void put32(std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; i++) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void set32(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint16_t get16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t get32(const uint8_t* p) {
    return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24);
}

std::string map_path(const std::string& dir) { return dir + "/" + kKeyMapFile; }
std::string lock_path(const std::string& dir) { return dir + "/" + kKeyMapLockFile; }

std::string errno_text() { return std::strerror(errno); }

// ---- crash injection (tests only)
std::mutex g_crash_mu;
std::string g_crash_step;

void crash_point(const char* step) {
    std::lock_guard<std::mutex> g(g_crash_mu);
    if (!g_crash_step.empty() && g_crash_step == step) {
        g_crash_step.clear();  // one shot
        throw KeyMapCrash(std::string("injected crash at ") + step);
    }
}

// ---- flock on keymap.lock, released by close
class FileLock {
public:
    FileLock(const std::string& dir, int op) {
        std::string p = lock_path(dir);
        fd_ = sys::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd_ < 0) throw KeyMapError("could not open key map lock \"" + p + "\": " + errno_text());
        while (::flock(fd_, op) != 0) {
            if (errno == EINTR) continue;
            std::string e = errno_text();
            sys::close(fd_);
            throw KeyMapError("could not lock key map lock \"" + p + "\": " + e);
        }
    }
    ~FileLock() {
        if (fd_ >= 0) sys::close(fd_);
    }
    FileLock(const FileLock&) = delete;
    FileLock& operator=(const FileLock&) = delete;

private:
    int fd_ = -1;
};

}  // namespace

// A FileLock unless the KeyMap already holds LOCK_EX through an Exclusive section. A
// writer section tells the change counter before its lock goes.
class HeldLock {
public:
    HeldLock(KeyMap& km, const std::string& dir, int op) : km_(km), exclusive_(op == LOCK_EX) {
        if (!km.ex_held_) lock_.emplace(dir, op);
        if (exclusive_) km_.clean_write_ = false;
    }
    ~HeldLock() {
        if (!lock_ || !exclusive_) return;
        uint64_t now = km_.note_change();
        // A writer section that ended with its own append applied (append_locked) has
        // everything the file holds in memory: every other writer of this file held
        // the lock before us and counted its change before letting it go. Its own
        // change need not make the next refresh() look at the file again.
        if (km_.clean_write_ && now != 0 && km_.skip_unchanged_) {
            km_.seen_changes_ = now;
            km_.seen_valid_ = true;
        }
    }
    HeldLock(const HeldLock&) = delete;
    HeldLock& operator=(const HeldLock&) = delete;

private:
    KeyMap& km_;
    bool exclusive_;
    std::optional<FileLock> lock_;
};

namespace {

std::vector<uint8_t> encode_header(const std::string& cluster_id, uint32_t gen) {
    if (cluster_id.empty() || cluster_id.size() > kClusterIdMax)
        throw KeyMapError("cluster id must be 1 to 64 bytes");
    std::vector<uint8_t> h(kHeaderSize, 0);
    std::memcpy(h.data(), kMagic, 8);
    set32(&h[8], kFormatVersion);
    set32(&h[12], gen);
    h[16] = static_cast<uint8_t>(cluster_id.size());
    h[17] = 0;
    std::memcpy(&h[18], cluster_id.data(), cluster_id.size());
    set32(&h[92], crc32c(h.data(), 92));
    return h;
}

struct Header {
    std::string cluster_id;
    uint32_t generation = 0;
};

Header parse_header(const uint8_t* h, size_t n, const std::string& path) {
    if (n < kHeaderSize)
        throw KeyMapError("key map \"" + path + "\" is damaged: the header is truncated (" +
                          std::to_string(n) + " of " + std::to_string(kHeaderSize) + " bytes)");
    if (std::memcmp(h, kMagic, 8) != 0)
        throw KeyMapError("key map \"" + path + "\" is damaged at offset 0: not a cmk_lakebase key map header");
    if (get32(h + 92) != crc32c(h, 92))
        throw KeyMapError("key map \"" + path + "\" is damaged at offset 0: header checksum mismatch");
    uint32_t ver = get32(h + 8);
    if (ver != kFormatVersion)
        throw KeyMapError("key map \"" + path + "\" has format version " + std::to_string(ver) +
                          ", which this version of cmk_lakebase does not know");
    size_t idlen = get16(h + 16);
    if (idlen == 0 || idlen > kClusterIdMax)
        throw KeyMapError("key map \"" + path + "\" is damaged at offset 16: bad cluster id length");
    Header hd;
    hd.generation = get32(h + 12);
    hd.cluster_id.assign(reinterpret_cast<const char*>(h + 18), idlen);
    return hd;
}

std::vector<uint8_t> frame(const std::vector<uint8_t>& body) {
    std::vector<uint8_t> r;
    r.reserve(body.size() + 12);
    put32(r, static_cast<uint32_t>(body.size()));
    put32(r, crc32c(r.data(), 4) ^ kLenSeal);
    r.insert(r.end(), body.begin(), body.end());
    uint32_t c = crc32c(r.data(), 4);
    c = crc32c(body.data(), body.size(), c);
    put32(r, c);
    return r;
}

void check_identity(const std::string& id) {
    if (id.empty() || id.size() > 4096) throw KeyMapError("invalid key map identity \"" + id + "\"");
}

std::vector<uint8_t> encode_add(const std::string& id, FileClass cls, const std::vector<uint8_t>& wrapped) {
    std::vector<uint8_t> b;
    b.push_back(kAdd);
    b.push_back(static_cast<uint8_t>(cls));
    put16(b, static_cast<uint16_t>(id.size()));
    b.insert(b.end(), id.begin(), id.end());
    put16(b, static_cast<uint16_t>(wrapped.size()));
    b.insert(b.end(), wrapped.begin(), wrapped.end());
    return frame(b);
}

std::vector<uint8_t> encode_del(const std::string& id) {
    std::vector<uint8_t> b;
    b.push_back(kDel);
    b.push_back(0);
    put16(b, static_cast<uint16_t>(id.size()));
    b.insert(b.end(), id.begin(), id.end());
    return frame(b);
}

struct Record {
    uint8_t type = 0;
    FileClass cls = FileClass::Plaintext;
    std::string identity;
    std::vector<uint8_t> wrapped;
    uint64_t off = 0;      // file offset of the record
    uint32_t len = 0;      // its body length
    bool suspect = false;  // an ADD whose checksum fails (a torn in-place shred?)
};

bool all_zero(const uint8_t* p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i]) return false;
    return true;
}

// Eight zero bytes in a row: part of a shred (a sealed DEK is random).
bool has_zero_run(const std::vector<uint8_t>& b) {
    size_t run = 0;
    for (uint8_t x : b) {
        run = x ? 0 : run + 1;
        if (run >= 8) return true;
    }
    return false;
}

// Parses records in data[0..n) (file offset base). Returns the number of bytes of
// complete, valid records; stops early at a torn tail. Throws KeyMapError on damage.
template <typename F>
size_t parse_records(const uint8_t* data, size_t n, uint64_t base, const std::string& path, F&& apply) {
    size_t pos = 0;
    while (pos < n) {
        size_t left = n - pos;
        const uint8_t* p = data + pos;
        auto damaged = [&](const std::string& what) {
            return KeyMapError("key map \"" + path + "\" is damaged at offset " + std::to_string(base + pos) +
                               ": " + what);
        };
        if (left < 8) break;  // torn inside the length words
        if (all_zero(p, left)) break;  // extended by a crash but never written
        uint32_t len = get32(p);
        if ((crc32c(p, 4) ^ kLenSeal) != get32(p + 4)) throw damaged("record length check mismatch");
        if (len > kMaxBody || len < 4) throw damaged("impossible record length " + std::to_string(len));
        if (static_cast<uint64_t>(len) + 12 > left) break;  // torn: runs past the end of the file
        uint32_t c = crc32c(p, 4);
        c = crc32c(p + 8, len, c);
        const bool crc_ok = c == get32(p + 8 + len);
        const uint8_t* b = p + 8;
        Record r;
        r.off = base + pos;
        r.len = len;
        r.type = b[0];
        // A bad checksum is damage, except on an ADD whose frame still holds: an
        // in-place shred (shred_locked) torn by a crash, which is harmless only if a
        // later record of the same identity supersedes it or a run of zeros shows the
        // shred. The caller checks that.
        if (!crc_ok && r.type != kAdd) throw damaged("record checksum mismatch");
        r.suspect = !crc_ok;
        if (b[1] > kLastFileClass) throw damaged(r.suspect ? "record checksum mismatch" : "unknown file class");
        r.cls = static_cast<FileClass>(b[1]);
        size_t idlen = get16(b + 2);
        if (4 + idlen > len) throw damaged(r.suspect ? "record checksum mismatch" : "identity runs past the record");
        r.identity.assign(reinterpret_cast<const char*>(b + 4), idlen);
        if (r.type == kAdd) {
            size_t off = 4 + idlen;
            if (off + 2 > len) throw damaged("truncated ADD record");
            size_t wl = get16(b + off);
            if (off + 2 + wl != len) throw damaged(r.suspect ? "record checksum mismatch" : "wrapped key length mismatch");
            r.wrapped.assign(b + off + 2, b + off + 2 + wl);
        } else if (r.type == kDel) {
            if (4 + idlen != len) throw damaged("DEL record length mismatch");
        } else {
            throw damaged("unknown record type " + std::to_string(r.type));
        }
        apply(r);
        pos += 12 + len;
    }
    return pos;
}

}  // namespace

std::string dek_aad(const std::string& identity, uint32_t kek_generation) {
    std::string a = "cmk_lakebase dek v1";
    a.push_back('\0');
    a += std::to_string(kek_generation);
    a.push_back('\0');
    a += identity;
    return a;
}

void KeyMap::set_crash_point(const std::string& step) {
    std::lock_guard<std::mutex> g(g_crash_mu);
    g_crash_step = step;
}

void KeyMap::create_empty(const std::string& dir, const std::string& cluster_id, uint32_t kek_generation) {
    if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
        throw KeyMapError("could not create directory \"" + dir + "\": " + errno_text());
    std::string path = map_path(dir);
    FileLock lock(dir, LOCK_EX);
    struct stat st;
    if (::stat(path.c_str(), &st) == 0) throw KeyMapError("key map \"" + path + "\" already exists");
    std::vector<uint8_t> h = encode_header(cluster_id, kek_generation);
    try {
        sys::write_file_atomic(path.c_str(), h.data(), h.size(), 0600);
    } catch (const std::runtime_error& e) {
        throw KeyMapError(e.what());
    }
}

KeyMap::KeyMap(std::string dir, const SecureBytes& kek, const std::string& cluster_id,
               uint32_t kek_generation, KekResolver resolver)
    : dir_(std::move(dir)),
      kek_(kek.clone()),
      cluster_id_(cluster_id),
      generation_(kek_generation),
      resolver_(std::move(resolver)) {
    if (kek_.size() != kKekSize && !resolver_) throw KeyMapError("the KEK must be 32 bytes");
    std::string path = map_path(dir_);
    fd_ = sys::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd_ < 0) {
        if (errno == ENOENT) throw KeyMapError("key map \"" + path + "\" is missing");
        throw KeyMapError("could not open key map \"" + path + "\": " + errno_text());
    }
    try {
        struct stat st;
        if (::fstat(fd_, &st) != 0) throw KeyMapError("could not stat key map \"" + path + "\": " + errno_text());
        file_ino_ = st.st_ino;
        HeldLock lock(*this, dir_, LOCK_SH);
        load_locked(true);
    } catch (...) {
        sys::close(fd_);
        fd_ = -1;
        throw;
    }
}

KeyMap::~KeyMap() {
    if (fd_ >= 0) sys::close(fd_);
    if (lock_fd_ >= 0) sys::close(lock_fd_);
}

// Caller holds mu_ and a flock. Switches to a replaced file (compaction/rewrap by
// any process), then reads the header (full) and every record not yet seen.
// appended: the caller's own append, durable, under LOCK_EX: the file is what was read
// before plus these bytes, applied without looking at the file again.
void KeyMap::load_locked(bool full, const std::vector<uint8_t>* appended) {
    std::string path = map_path(dir_);
    if (appended) {
        file_size_ = read_offset_ + appended->size();
        apply_locked(appended->data(), appended->size(), path);
        return;
    }
    struct stat ps;
    if (::stat(path.c_str(), &ps) != 0) throw KeyMapError("key map \"" + path + "\" is missing: " + errno_text());
    if (static_cast<uint64_t>(ps.st_ino) != file_ino_) {
        int nfd = sys::open(path.c_str(), O_RDWR | O_CLOEXEC);
        if (nfd < 0) throw KeyMapError("could not open key map \"" + path + "\": " + errno_text());
        struct stat ns;
        if (::fstat(nfd, &ns) != 0) {
            sys::close(nfd);
            throw KeyMapError("could not stat key map \"" + path + "\": " + errno_text());
        }
        sys::close(fd_);
        fd_ = nfd;
        file_ino_ = ns.st_ino;
        full = true;
    }
    struct stat st;
    if (::fstat(fd_, &st) != 0) throw KeyMapError("could not stat key map \"" + path + "\": " + errno_text());
    uint64_t size = static_cast<uint64_t>(st.st_size);
    file_size_ = size;
    if (full) {
        uint8_t h[kHeaderSize];
        ssize_t r = sys::pread_full(fd_, h, sizeof h, 0);
        if (r < 0) throw KeyMapError("could not read key map \"" + path + "\": " + errno_text());
        Header hd = parse_header(h, static_cast<size_t>(r), path);
        if (hd.cluster_id != cluster_id_)
            throw KeyMapError("key map \"" + path + "\" belongs to cluster " + hd.cluster_id +
                              ", not to this cluster (" + cluster_id_ + ")");
        if (hd.generation != generation_ && resolver_) {
            // Re-sealed by a KEK rotation in another process: adopt that generation's
            // KEK if the resolver knows it (the server publishes it to every process).
            if (std::optional<SecureBytes> k = resolver_(hd.generation)) {
                kek_ = std::move(*k);
                generation_ = hd.generation;
            }
        }
        if (hd.generation != generation_)
            throw KeyMapError("key map \"" + path + "\" is sealed under KEK generation " +
                              std::to_string(hd.generation) + ", but the keyring's KEK is generation " +
                              std::to_string(generation_));
        entries_.clear();
        removed_.clear();
        pending_.clear();
        dead_records_ = 0;
        read_offset_ = kHeaderSize;
    }
    if (size <= read_offset_) return;
    std::vector<uint8_t> buf(size - read_offset_);
    ssize_t r = sys::pread_full(fd_, buf.data(), buf.size(), static_cast<off_t>(read_offset_));
    if (r < 0) throw KeyMapError("could not read key map \"" + path + "\": " + errno_text());
    buf.resize(static_cast<size_t>(r));
    apply_locked(buf.data(), buf.size(), path);
}

// Caller holds mu_ and a flock: the n bytes of the file at read_offset_, parsed and
// applied to the in-memory map; read_offset_ moves past the records they hold.
void KeyMap::apply_locked(const uint8_t* data, size_t n, const std::string& path) {
    // Parse everything first so that damage leaves the in-memory map as it was.
    std::vector<Record> recs;
    size_t used = parse_records(data, n, read_offset_, path,
                                [&](Record& rec) { recs.push_back(std::move(rec)); });
    // An ADD superseded by a later record (a DEL, or an ADD replacing it) is dead; if
    // its sealed DEK is still in the file, it waits in pending_ for the in-place shred.
    // A suspect ADD (bad checksum, sound frame) must be superseded before the end of
    // what was read, or the file is damaged; until then it is no entry.
    std::unordered_map<std::string, uint64_t> suspects;
    auto supersede = [&](const std::string& id) {
        suspects.erase(id);
        auto it = entries_.find(id);
        if (it == entries_.end()) return false;
        if (it->second.rec_len) pending_.push_back(Pending{it->second.rec_off, it->second.rec_len, id});
        return true;
    };
    for (Record& rec : recs) {
        if (rec.type == kAdd) {
            // A shredded ADD (shred_locked): its sealed DEK all zeros, or, torn by a
            // crash, a run of zeros in it. Its key is gone: a removal in itself.
            const bool zero = all_zero(rec.wrapped.data(), rec.wrapped.size());
            if (zero || (rec.suspect && has_zero_run(rec.wrapped))) {
                if (supersede(rec.identity)) {
                    entries_.erase(rec.identity);
                    dead_records_++;
                }
                removed_.insert(rec.identity);
                dead_records_++;
                if (!zero) pending_.push_back(Pending{rec.off, rec.len, rec.identity});  // finish it
                continue;
            }
            if (supersede(rec.identity)) dead_records_++;
            removed_.erase(rec.identity);
            if (rec.suspect) {
                entries_.erase(rec.identity);
                suspects[rec.identity] = rec.off;
                // Shred it again (zeroes and a sound checksum) once it is superseded.
                pending_.push_back(Pending{rec.off, rec.len, rec.identity});
                continue;
            }
            entries_[rec.identity] = Entry{rec.cls, std::move(rec.wrapped), rec.off, rec.len};
        } else if (supersede(rec.identity)) {
            entries_.erase(rec.identity);
            removed_.insert(rec.identity);
            dead_records_ += 2;
        } else {
            // A tombstone (written by a rewrite), or the removal of a shredded ADD.
            removed_.insert(rec.identity);
            dead_records_ += 1;
        }
    }
    if (!suspects.empty()) {
        uint64_t off = suspects.begin()->second;
        for (const auto& sp : suspects) off = std::min(off, sp.second);
        pending_.clear();
        throw KeyMapError("key map \"" + path + "\" is damaged at offset " + std::to_string(off) +
                          ": record checksum mismatch");
    }
    read_offset_ += used;
}

// Caller holds mu_ and LOCK_EX and has called load_locked. Cuts a torn tail, then
// appends rec and makes it durable before applying it in memory.
void KeyMap::append_locked(const std::vector<uint8_t>& rec) {
    std::string path = map_path(dir_);
    // Every caller has just called load_locked under this LOCK_EX: file_size_ is the
    // file's size now, and no other writer can have moved it since.
    if (file_size_ > read_offset_) {
        // A torn record from a crashed writer: cut it so the log stays parseable.
        if (sys::ftruncate(fd_, static_cast<off_t>(read_offset_)) != 0 || ::fsync(fd_) != 0)
            throw KeyMapError("could not repair key map \"" + path + "\": " + errno_text());
        file_size_ = read_offset_;
    }
    {
        std::lock_guard<std::mutex> g(g_crash_mu);
        if (g_crash_step == "append-write") {
            g_crash_step.clear();
            size_t half = rec.size() / 2;
            (void)sys::pwrite_full(fd_, rec.data(), half, static_cast<off_t>(read_offset_));
            throw KeyMapCrash("injected crash at append-write");
        }
    }
    if (sys::pwrite_full(fd_, rec.data(), rec.size(), static_cast<off_t>(read_offset_)) < 0) {
        std::string e = errno_text();
        (void)sys::ftruncate(fd_, static_cast<off_t>(read_offset_));
        throw KeyMapError("could not append to key map \"" + path + "\": " + e);
    }
    // The sealed DEKs that this append removes or replaces, and any other dead ADD
    // still holding one, are overwritten in place under the same fsync.
    std::vector<Pending> todo;
    todo.swap(pending_);
    parse_records(rec.data(), rec.size(), read_offset_, path, [&](Record& r) {
        auto it = entries_.find(r.identity);
        if (it != entries_.end() && it->second.rec_len)
            todo.push_back(Pending{it->second.rec_off, it->second.rec_len, r.identity});
    });
    std::unordered_set<uint64_t> shredded = shred_locked(todo);
    crash_point("append-fsync");
    if (::fsync(fd_) != 0) {
        // After a failed fsync the page cache state is unknown: do not trust the record.
        std::string e = errno_text();
        (void)sys::ftruncate(fd_, static_cast<off_t>(read_offset_));
        throw KeyMapError("could not fsync key map \"" + path + "\": " + e);
    }
    load_locked(false, &rec);  // applies what we just wrote, through the same parser as everyone
    std::vector<Pending> left;
    for (Pending& pd : pending_)
        if (!shredded.count(pd.off)) left.push_back(std::move(pd));
    pending_.swap(left);
    clean_write_ = true;
}

// Caller holds mu_ and LOCK_EX, inside an append, before its fsync. Overwrites, in
// place, the sealed DEK of each given ADD record with zeros and gives the record a
// sound checksum again (issue 18: a removed file's key leaves the disk at once).
// Returns the offsets done. An ADD whose sealed DEK is all zeros is a removal to the
// loader, so the overwrite may reach the disk before or without the DEL appended with
// it: either way the key is gone. A crash in the middle of one leaves a torn ADD: one
// that is superseded is accepted, and one with a run of zeros is taken as shredded
// (a sealed DEK is random: eight zero bytes in a row do not happen); the next append
// redoes it. A rewrite of the whole file per removal did this at O(map size) and three
// fsyncs each (DROP DATABASE of a ~300-file database: ~20 times slower than plaintext).
std::unordered_set<uint64_t> KeyMap::shred_locked(const std::vector<Pending>& todo) {
    std::unordered_set<uint64_t> done;
    const std::string path = map_path(dir_);
    for (const Pending& pd : todo) {
        std::vector<uint8_t> r(12 + size_t(pd.len));
        if (pd.off + r.size() > read_offset_ ||
            sys::pread_full(fd_, r.data(), r.size(), static_cast<off_t>(pd.off)) != ssize_t(r.size()))
            continue;
        const uint8_t* b = r.data() + 8;
        if (get32(r.data()) != pd.len || b[0] != kAdd) continue;
        const size_t idlen = get16(b + 2);
        if (4 + idlen + 2 > pd.len || std::string(reinterpret_cast<const char*>(b + 4), idlen) != pd.identity)
            continue;
        const size_t woff = 8 + 4 + idlen + 2;
        const size_t wl = get16(b + 4 + idlen);
        if (woff + wl + 4 != r.size()) continue;
        const bool was_zero = all_zero(r.data() + woff, wl);
        const uint32_t old_crc = get32(r.data() + 8 + pd.len);
        std::fill(r.begin() + woff, r.begin() + woff + wl, 0);
        uint32_t c = crc32c(r.data(), 4);
        c = crc32c(r.data() + 8, pd.len, c);
        if (was_zero && old_crc == c) {  // done before (by another process, or already)
            done.insert(pd.off);
            continue;
        }
        set32(&r[8 + pd.len], c);
        {
            std::lock_guard<std::mutex> g(g_crash_mu);
            if (g_crash_step == "shred-write") {
                g_crash_step.clear();
                (void)sys::pwrite_full(fd_, r.data() + woff, wl / 2, static_cast<off_t>(pd.off + woff));
                throw KeyMapCrash("injected crash at shred-write");
            }
        }
        if (sys::pwrite_full(fd_, r.data() + woff, r.size() - woff, static_cast<off_t>(pd.off + woff)) < 0)
            throw KeyMapError("could not shred a removed key in key map \"" + path + "\": " + errno_text());
        done.insert(pd.off);
    }
    return done;
}

// Caller holds mu_ and LOCK_EX. Replaces the key map file atomically with a new one
// holding header(gen) and one ADD per entry, and switches fd_ to it.
void KeyMap::write_full_locked(const std::string& path, const SecureBytes& kek, uint32_t gen,
                               const std::unordered_map<std::string, Entry>& entries,
                               const std::function<void()>& before_rename,
                               const std::unordered_set<std::string>* tombstones) {
    (void)kek;  // entries are already sealed under it; kept for the signature's clarity
    std::vector<std::string> ids;
    ids.reserve(entries.size());
    for (const auto& e : entries) ids.push_back(e.first);
    std::sort(ids.begin(), ids.end());
    std::vector<uint8_t> data = encode_header(cluster_id_, gen);
    for (const auto& id : ids) {
        const Entry& e = entries.at(id);
        std::vector<uint8_t> r = encode_add(id, e.cls, e.wrapped);
        data.insert(data.end(), r.begin(), r.end());
    }
    if (tombstones) {
        std::vector<std::string> gone(tombstones->begin(), tombstones->end());
        std::sort(gone.begin(), gone.end());
        for (const auto& id : gone) {
            std::vector<uint8_t> r = encode_del(id);
            data.insert(data.end(), r.begin(), r.end());
        }
    }
    std::string tmp = path + ".tmp";
    int fd = sys::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) throw KeyMapError("could not create \"" + tmp + "\": " + errno_text());
    auto fail = [&](const std::string& what) {
        std::string e = errno_text();
        sys::close(fd);
        sys::unlink(tmp.c_str());
        return KeyMapError(what + " \"" + tmp + "\": " + e);
    };
    {
        std::unique_lock<std::mutex> g(g_crash_mu);
        if (g_crash_step == "compact-write") {
            g_crash_step.clear();
            g.unlock();
            (void)sys::write_full(fd, data.data(), data.size() / 2);
            sys::close(fd);
            throw KeyMapCrash("injected crash at compact-write");
        }
    }
    if (sys::write_full(fd, data.data(), data.size()) != 0) throw fail("could not write");
    {
        std::unique_lock<std::mutex> g(g_crash_mu);
        if (g_crash_step == "compact-fsync") {
            g_crash_step.clear();
            g.unlock();
            sys::close(fd);
            throw KeyMapCrash("injected crash at compact-fsync");
        }
    }
    if (::fsync(fd) != 0) throw fail("could not fsync");
    sys::close(fd);
    if (before_rename) before_rename();
    crash_point("compact-rename");
    if (sys::rename(tmp.c_str(), path.c_str()) != 0) {
        std::string e = errno_text();
        sys::unlink(tmp.c_str());
        throw KeyMapError("could not rename \"" + tmp + "\" into place: " + e);
    }
    if (sys::fsync_dir(dir_.c_str()) != 0) throw KeyMapError("could not fsync directory \"" + dir_ + "\": " + errno_text());
    int nfd = sys::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (nfd < 0) throw KeyMapError("could not reopen key map \"" + path + "\": " + errno_text());
    struct stat st;
    if (::fstat(nfd, &st) != 0) {
        sys::close(nfd);
        throw KeyMapError("could not stat key map \"" + path + "\": " + errno_text());
    }
    sys::close(fd_);
    fd_ = nfd;
    // The next look reads the new file from its start, so that every entry knows where
    // its ADD record now is (the in-place shred overwrites it there).
    file_ino_ = 0;
    read_offset_ = static_cast<uint64_t>(st.st_size);
}

namespace {
std::atomic<std::atomic<uint64_t>*> g_changes{nullptr};  // KeyMap::set_change_counter
}  // namespace

void KeyMap::set_change_counter(std::atomic<uint64_t>* changes) { g_changes.store(changes); }

void KeyMap::skip_unchanged(bool on) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    skip_unchanged_ = on;
    seen_valid_ = false;
}

// At the end of a writer section, before its lock goes: a reader that still finds the
// old count looked at the file before this section changed it (or finds the change
// complete), and one that finds the new count looks again, waiting for the lock if the
// change is still in flight.
uint64_t KeyMap::note_change() {
    if (std::atomic<uint64_t>* c = g_changes.load(std::memory_order_relaxed))
        return c->fetch_add(1, std::memory_order_acq_rel) + 1;
    return 0;
}

void KeyMap::refresh() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    // Cheapest check first: no writer section of this server ended since the last look.
    std::atomic<uint64_t>* changes = skip_unchanged_ ? g_changes.load(std::memory_order_relaxed) : nullptr;
    uint64_t count = 0;
    if (changes) {
        count = changes->load(std::memory_order_acquire);
        if (seen_valid_ && count == seen_changes_) return;
    }
    // Cheap check next: most calls find nothing new.
    struct stat ps, fs;
    if (!(::stat(map_path(dir_).c_str(), &ps) == 0 && ::fstat(fd_, &fs) == 0 &&
          static_cast<uint64_t>(ps.st_ino) == file_ino_ && static_cast<uint64_t>(fs.st_size) == read_offset_)) {
        HeldLock lock(*this, dir_, LOCK_SH);
        load_locked(false);
    }
    seen_changes_ = count;
    seen_valid_ = changes != nullptr;
}

namespace {
std::vector<uint8_t> tag_of(const std::vector<uint8_t>& wrapped, uint32_t generation) {
    std::vector<uint8_t> t(wrapped);
    for (int i = 0; i < 4; i++) t.push_back(uint8_t(generation >> (8 * i)));
    return t;
}
}  // namespace

std::optional<SecureBytes> KeyMap::get(const std::string& identity) { return get(identity, nullptr); }

std::optional<std::vector<uint8_t>> KeyMap::entry_tag(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    auto it = entries_.find(identity);
    if (it == entries_.end()) return std::nullopt;
    return tag_of(it->second.wrapped, generation_);
}

std::optional<SecureBytes> KeyMap::get(const std::string& identity, std::vector<uint8_t>* tag) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    // Always look for news: another process may have replaced this identity's key
    // (file unlinked and created again), and a stale DEK would decrypt to garbage.
    refresh();
    auto it = entries_.find(identity);
    if (it == entries_.end()) return std::nullopt;
    if (tag) *tag = tag_of(it->second.wrapped, generation_);
    return unwrap_locked(identity, it->second);
}

// Caller holds mu_. The DEK of an entry, unsealed under the current KEK.
SecureBytes KeyMap::unwrap_locked(const std::string& identity, const Entry& e) {
    try {
        return aead_open(kek_.data(), e.wrapped.data(), e.wrapped.size(), dek_aad(identity, generation_));
    } catch (const CryptoError&) {
        throw KeyMapError("key map entry for \"" + identity +
                          "\" does not authenticate: the key map was tampered with or the KEK is not this cluster's");
    }
}

bool KeyMap::contains(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    return entries_.count(identity) != 0;
}

SecureBytes KeyMap::create(const std::string& identity, FileClass cls) { return create_impl(identity, cls, false); }
SecureBytes KeyMap::create_absent(const std::string& identity, FileClass cls) {
    return create_impl(identity, cls, true);
}

SecureBytes KeyMap::create_impl(const std::string& identity, FileClass cls, bool keep_existing) {
    check_identity(identity);
    std::lock_guard<std::recursive_mutex> g(mu_);
    HeldLock lock(*this, dir_, LOCK_EX);
    load_locked(false);
    if (keep_existing) {
        auto it = entries_.find(identity);
        if (it != entries_.end()) return unwrap_locked(identity, it->second);
    }
    SecureBytes dek = random_key(kDekSize);
    // Sealed only now, under the lock and after load_locked: a KEK rotation by another
    // process may just have switched the generation.
    std::vector<uint8_t> wrapped =
        aead_seal(kek_.data(), dek.data(), dek.size(), dek_aad(identity, generation_));
    append_locked(encode_add(identity, cls, wrapped));
    return dek;
}

void KeyMap::move(const std::string& from, const std::string& to, FileClass to_cls, bool keep_from) {
    check_identity(to);
    std::lock_guard<std::recursive_mutex> g(mu_);
    HeldLock lock(*this, dir_, LOCK_EX);
    load_locked(false);
    auto it = entries_.find(from);
    if (it == entries_.end()) throw KeyMapError("key map has no entry for \"" + from + "\"");
    SecureBytes dek = unwrap_locked(from, it->second);
    std::vector<uint8_t> rec =
        encode_add(to, to_cls, aead_seal(kek_.data(), dek.data(), dek.size(), dek_aad(to, generation_)));
    if (!keep_from && from != to) {
        std::vector<uint8_t> del = encode_del(from);
        rec.insert(rec.end(), del.begin(), del.end());
    }
    append_locked(rec);
}

bool KeyMap::removed(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    return removed_.count(identity) != 0;
}

// The removed DEK's sealed bytes must not stay in the file until some later compaction
// (issue 18: "the key on disk is gone at once"): the DEL record is appended and the
// dead ADD's sealed DEK overwritten in place under the same fsync (append_locked ->
// shred_locked). removed() answers from either.
void KeyMap::remove(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    // No entry now: nothing to remove, and no writer lock to take (DROP DATABASE
    // removes hundreds of files that never had a key). An entry made after this look
    // would be for a file being removed, which PostgreSQL never writes; a later create
    // of the name drops such a stale entry (the layer's O_EXCL open).
    refresh();
    if (!entries_.count(identity)) return;
    {
        HeldLock lock(*this, dir_, LOCK_EX);
        load_locked(false);
        if (!entries_.count(identity)) return;
        append_locked(encode_del(identity));
    }
    maybe_compact();
}

void KeyMap::remove_prefix(const std::string& prefix) {
    if (prefix.empty()) throw KeyMapError("refusing to remove every key map entry (empty prefix)");
    remove_if([&prefix](const std::string& id) { return id.compare(0, prefix.size(), prefix) == 0; });
}

size_t KeyMap::remove_if(const std::function<bool(const std::string&)>& pred) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    size_t n = 0;
    {
        HeldLock lock(*this, dir_, LOCK_EX);
        load_locked(false);
        std::vector<uint8_t> recs;
        for (const auto& e : entries_) {
            if (pred(e.first)) {
                std::vector<uint8_t> d = encode_del(e.first);
                recs.insert(recs.end(), d.begin(), d.end());
                n++;
            }
        }
        if (recs.empty()) return 0;
        append_locked(recs);
    }
    maybe_compact();
    return n;
}

void KeyMap::put(const std::vector<Import>& entries) {
    if (entries.empty()) return;
    for (const auto& e : entries) {
        check_identity(e.identity);
        if (e.dek.size() != kDekSize) throw KeyMapError("DEK of \"" + e.identity + "\" has the wrong size");
    }
    std::lock_guard<std::recursive_mutex> g(mu_);
    HeldLock lock(*this, dir_, LOCK_EX);
    load_locked(false);
    std::vector<uint8_t> recs;
    for (const auto& e : entries) {
        std::vector<uint8_t> r = encode_add(
            e.identity, e.cls, aead_seal(kek_.data(), e.dek.data(), e.dek.size(), dek_aad(e.identity, generation_)));
        recs.insert(recs.end(), r.begin(), r.end());
    }
    append_locked(recs);
}

size_t KeyMap::size() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    return entries_.size();
}

std::vector<std::string> KeyMap::identities() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    std::vector<std::string> out;
    out.reserve(entries_.size());
    for (const auto& e : entries_) out.push_back(e.first);
    std::sort(out.begin(), out.end());
    return out;
}

std::optional<std::string> KeyMap::fingerprint(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    auto dek = get(identity);
    if (!dek) return std::nullopt;
    return key_fingerprint(dek->data(), dek->size());
}

std::optional<FileClass> KeyMap::entry_class(const std::string& identity) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    refresh();
    auto it = entries_.find(identity);
    if (it == entries_.end()) return std::nullopt;
    return it->second.cls;
}

void KeyMap::maybe_compact() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    if (dead_records_ > entries_.size() && dead_records_ > 1000) compact();
}

void KeyMap::compact() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    HeldLock lock(*this, dir_, LOCK_EX);
    load_locked(false);
    write_full_locked(map_path(dir_), kek_, generation_, entries_);
    dead_records_ = 0;
}

void KeyMap::rewrap(const SecureBytes& new_kek, uint32_t new_generation,
                    const std::function<void()>& before_rename) {
    if (new_kek.size() != kKekSize) throw KeyMapError("the new KEK must be 32 bytes");
    std::lock_guard<std::recursive_mutex> g(mu_);
    HeldLock lock(*this, dir_, LOCK_EX);
    load_locked(false);
    std::unordered_map<std::string, Entry> resealed;
    resealed.reserve(entries_.size());
    for (const auto& e : entries_) {
        SecureBytes dek;
        try {
            dek = aead_open(kek_.data(), e.second.wrapped.data(), e.second.wrapped.size(),
                            dek_aad(e.first, generation_));
        } catch (const CryptoError&) {
            throw KeyMapError("key map entry for \"" + e.first +
                              "\" does not authenticate: the key map was tampered with or the KEK is not this cluster's");
        }
        resealed[e.first] =
            Entry{e.second.cls, aead_seal(new_kek.data(), dek.data(), dek.size(), dek_aad(e.first, new_generation))};
    }
    write_full_locked(map_path(dir_), new_kek, new_generation, resealed, before_rename);
    kek_ = new_kek.clone();
    generation_ = new_generation;
    entries_ = std::move(resealed);
    dead_records_ = 0;
}

uint32_t KeyMap::generation() {
    std::lock_guard<std::recursive_mutex> g(mu_);
    return generation_;
}

void KeyMap::set_kek_resolver(KekResolver r) {
    std::lock_guard<std::recursive_mutex> g(mu_);
    resolver_ = std::move(r);
}

uint32_t KeyMap::peek_generation(const std::string& dir) {
    std::string path = map_path(dir);
    FileLock lock(dir, LOCK_SH);
    int fd = sys::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw KeyMapError("could not open key map \"" + path + "\": " + errno_text());
    uint8_t h[kHeaderSize];
    ssize_t r = sys::pread_full(fd, h, sizeof h, 0);
    int e = errno;
    sys::close(fd);
    if (r < 0) throw KeyMapError("could not read key map \"" + path + "\": " + std::strerror(e));
    return parse_header(h, static_cast<size_t>(r), path).generation;
}

KeyMap::Exclusive::Exclusive(KeyMap& km) : km_(km), g_(km.mu_) {
    if (km_.ex_held_) return;  // nested: the outer section holds the lock
    std::string p = lock_path(km_.dir_);
    fd_ = sys::open(p.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd_ < 0) throw KeyMapError("could not open key map lock \"" + p + "\": " + errno_text());
    while (::flock(fd_, LOCK_EX) != 0) {
        if (errno == EINTR) continue;
        std::string e = errno_text();
        sys::close(fd_);
        throw KeyMapError("could not lock key map lock \"" + p + "\": " + e);
    }
    km_.ex_held_ = true;
}

KeyMap::Exclusive::~Exclusive() {
    if (fd_ < 0) return;
    km_.note_change();
    km_.ex_held_ = false;
    sys::close(fd_);
}

}  // namespace cmk
