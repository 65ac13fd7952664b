// The local key provider: CMKs kept as files in a key store directory outside the
// data directory (CONTRACTS.md, "Local provider key store"). It stands in for a cloud
// KMS on one machine and in tests, with the same semantics the watchdog relies on:
// disabling a key revokes it (reversibly), deleting destroys its material (for ever),
// and an unmounted key store is "unavailable", not "revoked".
//
// Key file (<key_id>.key, mode 0600, replaced atomically):
//   {"format":1,"key_id":"...","state":"enabled","created_at":"...",
//    "versions":[{"version":1,"material":"<base64 of 32 bytes>"}],"primary_version":1}
// Wrapped KEK: 1 byte format (1) || 4-byte CMK version (big-endian) || AES-256-GCM
// blob of the KEK under that version's material, aad "cmk_lakebase local wrap v1\0"+key_id.
#include <dirent.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <signal.h>
#include <sys/single_threaded.h>
#include <sys/stat.h>
#include <unistd.h>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cmk_lakebase/base/child.hpp"
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/sys.hpp"  // now_iso8601
#include "cmk_lakebase/kms/provider.hpp"
#include "kit.hpp"

namespace cmk {
namespace {

constexpr uint8_t kWrapFormat = 1;

std::string mode_str(mode_t m) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(m & 07777));
    return buf;
}

std::string wrap_aad(const std::string& key_id) {
    std::string a = "cmk_lakebase local wrap v1";
    a.push_back('\0');
    a += key_id;
    return a;
}

// Wipes a heap buffer that held key material (base64 in JSON text) before release.
struct Scrub {
    std::string& s;
    ~Scrub() {
        if (!s.empty()) OPENSSL_cleanse(&s[0], s.size());
    }
};

struct KeyVersion {
    uint32_t version = 0;
    SecureBytes material;
};

struct KeyFile {
    std::string key_id;
    std::string state;
    std::string created_at;
    uint32_t primary = 0;
    std::vector<KeyVersion> versions;
};

KmsError config_error(const std::string& m) { return KmsError(KmsErrorKind::Config, m); }
KmsError revoked(const std::string& m) { return KmsError(KmsErrorKind::Revoked, m); }
KmsError unavailable(const std::string& m) { return KmsError(KmsErrorKind::Unavailable, m); }

}  // namespace

// ---------------------------------------------------------------- LocalKeyStore

LocalKeyStore::LocalKeyStore(std::string dir, long timeout_ms) : dir_(std::move(dir)), timeout_ms_(timeout_ms) {
    while (dir_.size() > 1 && dir_.back() == '/') dir_.pop_back();
}

bool LocalKeyStore::valid_key_id(const std::string& id) {
    if (id.empty() || id.size() > 128 || id == "." || id == "..") return false;
    for (char c : id) {
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}

std::string LocalKeyStore::key_path(const std::string& key_id) const {
    return dir_ + "/" + key_id + ".key";
}

void LocalKeyStore::ensure_dir() {
    if (dir_.empty()) throw config_error("key_store: empty key store path");
    std::string cur;
    size_t i = 0;
    while (i <= dir_.size()) {
        size_t j = dir_.find('/', i);
        if (j == std::string::npos) j = dir_.size();
        cur = dir_.substr(0, j);
        if (!cur.empty() && ::mkdir(cur.c_str(), 0700) != 0 && errno != EEXIST)
            throw config_error("could not create key store directory \"" + cur +
                               "\": " + std::strerror(errno));
        i = j + 1;
    }
    struct stat st;
    if (::stat(dir_.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw config_error("key store \"" + dir_ + "\" is not a directory");
}

namespace {

// The key store directory must exist, be a directory, and be private to its owner.
void check_store_dir(const std::string& dir) {
    struct stat st;
    if (::stat(dir.c_str(), &st) != 0)
        throw unavailable("local key store \"" + dir + "\" is not available (missing or not mounted): " +
                          std::strerror(errno));
    if (!S_ISDIR(st.st_mode)) throw unavailable("local key store \"" + dir + "\" is not a directory");
    if (st.st_mode & 077)
        throw config_error("local key store \"" + dir + "\" is accessible by group or others (mode " +
                           mode_str(st.st_mode) + "); run: chmod 700 " + dir);
}

const rapidjson::Value* member(const rapidjson::Value& o, const char* name) {
    auto it = o.FindMember(name);
    return it == o.MemberEnd() ? nullptr : &it->value;
}

KeyFile parse_key_file(std::string& text, const std::string& path) {
    auto damaged = [&](const std::string& what) {
        return config_error("key file \"" + path + "\" is damaged: " + what);
    };
    rapidjson::Document d;
    parse_json_bounded_insitu(d, text, nullptr);  // strings stay in `text`, which the caller scrubs
    if (d.HasParseError() || !d.IsObject()) throw damaged("not a JSON object");
    KeyFile kf;
    const rapidjson::Value* v = member(d, "format");
    if (!v || !v->IsInt() || v->GetInt() != 1) throw damaged("field \"format\" must be 1");
    v = member(d, "key_id");
    if (!v || !v->IsString()) throw damaged("field \"key_id\" is missing");
    kf.key_id = v->GetString();
    v = member(d, "state");
    if (!v || !v->IsString()) throw damaged("field \"state\" is missing");
    kf.state = v->GetString();
    if (kf.state != "enabled" && kf.state != "disabled" && kf.state != "deleted")
        throw damaged("field \"state\" has unknown value \"" + kf.state + "\"");
    v = member(d, "created_at");
    if (v && v->IsString()) kf.created_at = v->GetString();
    v = member(d, "primary_version");
    if (!v || !v->IsUint()) throw damaged("field \"primary_version\" is missing");
    kf.primary = v->GetUint();
    v = member(d, "versions");
    if (!v || !v->IsArray()) throw damaged("field \"versions\" is missing");
    for (const auto& e : v->GetArray()) {
        const rapidjson::Value* ver = e.IsObject() ? member(e, "version") : nullptr;
        const rapidjson::Value* mat = e.IsObject() ? member(e, "material") : nullptr;
        if (!ver || !ver->IsUint() || !mat || !mat->IsString())
            throw damaged("field \"versions\" has an invalid entry");
        std::vector<uint8_t> raw;
        std::string b64(mat->GetString(), mat->GetStringLength());
        Scrub b64_scrub{b64};  // the key, base64-encoded
        try {
            raw = base64_decode(b64);
        } catch (const CryptoError&) {
            throw damaged("field \"versions[].material\" is not base64");
        }
        if (raw.size() != 32) {
            OPENSSL_cleanse(raw.data(), raw.size());
            throw damaged("field \"versions[].material\" is not 32 bytes");
        }
        KeyVersion kv;
        kv.version = ver->GetUint();
        kv.material = SecureBytes(raw.data(), raw.size());
        OPENSSL_cleanse(raw.data(), raw.size());
        kf.versions.push_back(std::move(kv));
    }
    return kf;
}

std::string serialize_key_file(const KeyFile& kf) {
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    w.StartObject();
    w.Key("format");
    w.Int(1);
    w.Key("key_id");
    w.String(kf.key_id.c_str());
    w.Key("state");
    w.String(kf.state.c_str());
    w.Key("created_at");
    w.String(kf.created_at.c_str());
    w.Key("versions");
    w.StartArray();
    for (const auto& v : kf.versions) {
        std::string b64 = base64_encode(v.material.data(), v.material.size());
        Scrub scrub{b64};
        w.StartObject();
        w.Key("version");
        w.Uint(v.version);
        w.Key("material");
        w.String(b64.c_str(), static_cast<rapidjson::SizeType>(b64.size()));
        w.EndObject();
    }
    w.EndArray();
    w.Key("primary_version");
    w.Uint(kf.primary);
    w.EndObject();
    std::string out(sb.GetString(), sb.GetSize());
    OPENSSL_cleanse(const_cast<char*>(sb.GetString()), sb.GetSize());
    out.push_back('\n');
    return out;
}

// Reads <dir>/<id>.key into `text` (the caller scrubs it) with the checks every use
// needs: a private key store and a private key file. Errors are classified for the
// watchdog: missing store = Unavailable, missing key = Revoked, bad permissions or
// size = Config. Only file bytes pass through here (base64, never the raw key: this
// runs on load_key's reader thread, whose stack and heap nobody overwrites after it, or
// in its reader process).
void read_key_text(const LocalKeyStore& ks, const std::string& key_id, std::string& text) {
    check_store_dir(ks.dir());
    std::string path = ks.key_path(key_id);
    // O_NONBLOCK: a FIFO put in the key file's place must not block the open (it is
    // refused below as not a regular file); regular files ignore the flag.
    int fd = sys::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT)
            throw revoked("key " + key_id + " not found in the local key store \"" + ks.dir() + "\"");
        throw unavailable("could not open key file \"" + path + "\": " + std::strerror(errno));
    }
    struct stat st;
    if (::fstat(fd, &st) != 0) {
        int e = errno;
        sys::close(fd);
        throw unavailable("could not stat key file \"" + path + "\": " + std::strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        sys::close(fd);
        throw config_error("key file \"" + path + "\" is not a regular file (a FIFO, device or directory, or a "
                           "symbolic link to one): refused");
    }
    if (st.st_mode & 077) {
        sys::close(fd);
        throw config_error("key file \"" + path + "\" is accessible by group or others (mode " +
                           mode_str(st.st_mode) + "); run: chmod 600 " + path);
    }
    // Room for the whole file at once: a string that grows leaves copies behind.
    text.reserve(static_cast<size_t>(std::min<off_t>(std::max<off_t>(st.st_size, 0), 1 << 20)) + 4096);
    char buf[4096];
    for (;;) {
        ssize_t r = sys::read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int e = errno;
            OPENSSL_cleanse(buf, sizeof buf);
            sys::close(fd);
            throw unavailable("could not read key file \"" + path + "\": " + std::strerror(e));
        }
        if (r == 0) break;
        if (text.size() + static_cast<size_t>(r) > (1 << 20)) {
            OPENSSL_cleanse(buf, sizeof buf);
            sys::close(fd);
            throw config_error("key file \"" + path + "\" is damaged: too large");
        }
        text.append(buf, static_cast<size_t>(r));
    }
    OPENSSL_cleanse(buf, sizeof buf);
    sys::close(fd);
}

// Reads (read_key_text) with the store's deadline, then parses (issue 18); in a process
// with one thread the read runs in a process instead (read_key_text_in_process). A key
// store on a hung mount (an NFS server gone, a FUSE daemon that stopped answering)
// blocks stat, open and read for as long as it hangs: in pg_cmk status, in a tool
// under pg_cmk exec, in the postmaster at start, where nothing else would ever end the
// wait. The read runs on a thread of its own with every signal blocked (in a server
// process they belong to its main thread; the new thread inherits the mask); past
// timeout_ms the caller gets Unavailable and the thread is left behind: it holds its
// own references to what it needs, and the file text it may still read is wiped when
// its slot goes. The parse (where the raw key appears, on its way into SecureBytes)
// stays on the caller's thread: TAP 052 found the raw CMK left on the stack of a
// reader thread that parsed (glibc keeps a finished thread's stack as it was). Threads
// left behind are bounded per process (kMaxStuckReaders): past that a read fails at
// once, so a store hung for days under a watchdog that retries every few seconds
// cannot pile up threads (RLIMIT_NPROC counts them against the cluster's OS user, and
// the postmaster forks under the same limit).
constexpr int kMaxStuckReaders = 4;
std::atomic<int> g_stuck_readers{0};
int stuck_readers() { return g_stuck_readers.load() + sys::children_left_behind(); }

KmsError late(const LocalKeyStore& ks, const std::string& key_id) {
    return unavailable("the local key store \"" + ks.dir() + "\" did not answer within " +
                       std::to_string(ks.timeout_ms()) + " ms (option timeout_ms) reading key " + key_id +
                       ": a hung mount?");
}

// A process that has only one thread reads in a process instead (sys::run_in_child):
// a reader thread would mark it multi-threaded for good, and the postmaster forks every
// server process (child.hpp). The reader sends 'K' and the file's bytes, or 'E', the
// error's kind and its message; past the deadline it is killed (a killable wait, as NFS
// and FUSE have, ends) and counts against kMaxStuckReaders until it is reaped.
void read_key_text_in_process(const LocalKeyStore& ks, const std::string& key_id, std::string& text) {
    auto work = [&ks, &key_id](int fd) {
        std::string t;
        Scrub scrub{t};
        std::string msg;
        char tag = 'K';
        try {
            read_key_text(ks, key_id, t);
        } catch (const KmsError& e) {
            tag = 'E';
            msg = std::string(1, static_cast<char>(e.kind)) + e.what();
        } catch (const std::exception& e) {
            tag = 'E';
            msg = std::string(1, static_cast<char>(KmsErrorKind::Unavailable)) + e.what();
        }
        const std::string& body = tag == 'K' ? t : msg;
        return sys::write_full(fd, &tag, 1) != 0 || sys::write_full(fd, body.data(), body.size()) != 0 ? 1 : 0;
    };
    // Everything the reader sends, bounded: a tag, at most a whole key file.
    constexpr size_t kMax = 1 + (size_t(1) << 20);
    std::string got;
    Scrub scrub{got};
    const sys::ChildRun run = sys::run_in_child(work, ks.timeout_ms(), kMax, got);
    switch (run.outcome) {
        case sys::ChildRun::Outcome::NotStarted:
            throw unavailable("could not start a process to read the local key store \"" + ks.dir() +
                              "\": " + std::strerror(run.error));
        case sys::ChildRun::Outcome::TimedOut:
            throw late(ks, key_id);
        case sys::ChildRun::Outcome::Failed:
            throw unavailable("reading the local key store \"" + ks.dir() + "\" failed in its reader process");
        case sys::ChildRun::Outcome::Done:
            break;
    }
    if (!got.empty() && got[0] == 'K') {
        text.reserve(got.size());
        text.assign(got, 1, std::string::npos);
        return;
    }
    if (got.size() < 2 || got[0] != 'E')
        throw unavailable("reading the local key store \"" + ks.dir() + "\" failed in its reader process");
    const auto kind = static_cast<KmsErrorKind>(got[1]);
    std::string msg = got.substr(2);
    switch (kind) {
        case KmsErrorKind::Config:
        case KmsErrorKind::Revoked:
        case KmsErrorKind::Unavailable:
            throw KmsError(kind, msg);
        default:
            throw unavailable(msg);
    }
}

KeyFile load_key(const LocalKeyStore& ks, const std::string& key_id) {
    if (!LocalKeyStore::valid_key_id(key_id)) throw config_error("key_id: invalid key id \"" + key_id + "\"");
    if (stuck_readers() >= kMaxStuckReaders)
        throw unavailable("the local key store \"" + ks.dir() + "\" has not answered " +
                          std::to_string(kMaxStuckReaders) + " earlier reads, still waiting: a hung mount?");
    if (__libc_single_threaded) {
        std::string text;
        Scrub scrub{text};
        read_key_text_in_process(ks, key_id, text);
        std::string path = ks.key_path(key_id);
        KeyFile kf = parse_key_file(text, path);
        if (kf.key_id != key_id)
            throw config_error("key file \"" + path + "\" is damaged: it holds key \"" + kf.key_id + "\"");
        return kf;
    }
    struct Slot {
        std::mutex mu;
        std::condition_variable cv;
        bool done = false;
        bool abandoned = false;
        std::string text;
        Scrub scrub{text};  // the file's text, wiped with the slot
        std::exception_ptr err;
    };
    auto slot = std::make_shared<Slot>();
    auto store = std::make_shared<const LocalKeyStore>(ks);
    auto run = [slot, store, key_id] {
        std::string text;
        Scrub scrub{text};
        std::exception_ptr err;
        try {
            read_key_text(*store, key_id, text);
        } catch (...) {
            err = std::current_exception();
        }
        std::lock_guard<std::mutex> g(slot->mu);
        if (slot->abandoned) {
            g_stuck_readers.fetch_sub(1);
            return;  // the text is scrubbed with this frame
        }
        slot->text.swap(text);  // no copy: the buffer changes hands
        slot->err = err;
        slot->done = true;
        slot->cv.notify_all();
    };
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    std::thread reader;
    try {
        reader = std::thread(run);
    } catch (const std::system_error& e) {
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        throw unavailable("could not start a thread to read the local key store \"" + ks.dir() + "\": " + e.what());
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    std::unique_lock<std::mutex> l(slot->mu);
    if (!slot->cv.wait_for(l, std::chrono::milliseconds(ks.timeout_ms()), [&] { return slot->done; })) {
        slot->abandoned = true;
        g_stuck_readers.fetch_add(1);
        l.unlock();
        reader.detach();
        throw late(ks, key_id);
    }
    l.unlock();
    reader.join();
    if (slot->err) std::rethrow_exception(slot->err);
    std::string path = ks.key_path(key_id);
    KeyFile kf = parse_key_file(slot->text, path);  // the slot scrubs the text
    if (kf.key_id != key_id)
        throw config_error("key file \"" + path + "\" is damaged: it holds key \"" + kf.key_id + "\"");
    return kf;
}

void store_key(const LocalKeyStore& ks, const KeyFile& kf) {
    std::string text = serialize_key_file(kf);
    Scrub scrub{text};
    try {
        sys::write_file_atomic(ks.key_path(kf.key_id).c_str(), text.data(), text.size(), 0600);
    } catch (const std::runtime_error& e) {
        throw unavailable(std::string("could not write key file: ") + e.what());
    }
}

}  // namespace

void LocalKeyStore::create(const std::string& key_id) {
    if (!valid_key_id(key_id))
        throw config_error("key_id: invalid key id \"" + key_id +
                           "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
    check_store_dir(dir_);
    if (exists(key_id))
        throw config_error("key " + key_id + " already exists in the local key store \"" + dir_ + "\"");
    KeyFile kf;
    kf.key_id = key_id;
    kf.state = "enabled";
    kf.created_at = now_iso8601();
    kf.primary = 1;
    KeyVersion v;
    v.version = 1;
    v.material = random_key(32);
    kf.versions.push_back(std::move(v));
    store_key(*this, kf);
}

bool LocalKeyStore::exists(const std::string& key_id) const {
    if (!valid_key_id(key_id)) return false;
    struct stat st;
    return ::stat(key_path(key_id).c_str(), &st) == 0;
}

std::string LocalKeyStore::state(const std::string& key_id) const { return load_key(*this, key_id).state; }

void LocalKeyStore::set_state(const std::string& key_id, const std::string& state) {
    if (state != "enabled" && state != "disabled" && state != "deleted")
        throw config_error("state: unknown key state \"" + state + "\" (enabled, disabled, deleted)");
    KeyFile kf = load_key(*this, key_id);
    if (kf.state == "deleted" && state != "deleted")
        throw config_error("key " + key_id + " has been deleted from the local key store \"" + dir_ +
                           "\"; deletion destroyed its material and cannot be undone");
    kf.state = state;
    if (state == "deleted") kf.versions.clear();  // crypto-shred the CMK itself
    store_key(*this, kf);
}

uint32_t LocalKeyStore::rotate(const std::string& key_id) {
    KeyFile kf = load_key(*this, key_id);
    if (kf.state == "deleted")
        throw config_error("key " + key_id + " has been deleted from the local key store \"" + dir_ +
                           "\" and cannot be rotated");
    uint32_t next = 0;
    for (const auto& v : kf.versions) next = std::max(next, v.version);
    next++;
    KeyVersion v;
    v.version = next;
    v.material = random_key(32);
    kf.versions.push_back(std::move(v));
    kf.primary = next;
    store_key(*this, kf);
    return next;
}

uint32_t LocalKeyStore::primary_version(const std::string& key_id) const {
    return load_key(*this, key_id).primary;
}

std::vector<std::string> LocalKeyStore::list() const {
    check_store_dir(dir_);
    std::vector<std::string> out;
    DIR* d = ::opendir(dir_.c_str());
    if (!d) throw unavailable("could not list local key store \"" + dir_ + "\": " + std::strerror(errno));
    while (struct dirent* e = ::readdir(d)) {
        std::string name = e->d_name;
        if (name.size() > 4 && name.compare(name.size() - 4, 4, ".key") == 0) {
            std::string id = name.substr(0, name.size() - 4);
            if (valid_key_id(id)) out.push_back(id);
        }
    }
    ::closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

// ---------------------------------------------------------------- LocalProvider

namespace {

class LocalProvider : public KeyProvider {
public:
    LocalProvider(KeyConfig cfg, long timeout_ms)
        : cfg_(std::move(cfg)), store_(cfg_.options.at("key_store"), timeout_ms) {}

    std::string name() const override { return "local"; }
    const KeyConfig& config() const override { return cfg_; }

    WrapResult wrap(const SecureBytes& kek) override {
        KeyFile kf = load_usable();
        const KeyVersion* v = find_version(kf, kf.primary);
        if (!v) throw revoked("key " + cfg_.key_id + " has no primary version in the local key store \"" +
                              store_.dir() + "\"");
        std::vector<uint8_t> sealed = aead_seal(v->material.data(), kek.data(), kek.size(), wrap_aad(cfg_.key_id));
        WrapResult r;
        r.blob.reserve(5 + sealed.size());
        r.blob.push_back(kWrapFormat);
        for (int s = 24; s >= 0; s -= 8) r.blob.push_back(static_cast<uint8_t>(v->version >> s));
        r.blob.insert(r.blob.end(), sealed.begin(), sealed.end());
        r.key_version = std::to_string(v->version);
        r.request_id = random_id();
        return r;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        last_request_id_ = random_id();  // this store's own correlation id, as for wrap and status
        KeyFile kf = load_usable();
        if (blob.size() < 5 || blob[0] != kWrapFormat)
            throw revoked("the wrapped KEK is not a local provider blob for key " + cfg_.key_id +
                          " (wrong key material)");
        uint32_t ver = (uint32_t(blob[1]) << 24) | (uint32_t(blob[2]) << 16) | (uint32_t(blob[3]) << 8) | blob[4];
        const KeyVersion* v = find_version(kf, ver);
        if (!v)
            throw revoked("key " + cfg_.key_id + " has no version " + std::to_string(ver) +
                          " in the local key store \"" + store_.dir() + "\" (wrong key material)");
        try {
            return aead_open(v->material.data(), blob.data() + 5, blob.size() - 5, wrap_aad(cfg_.key_id));
        } catch (const CryptoError&) {
            throw revoked("key " + cfg_.key_id + " in the local key store \"" + store_.dir() +
                          "\" cannot unwrap this KEK: wrong key material");
        }
    }

    KeyStatus status() override {
        KeyStatus s;
        s.request_id = random_id();
        try {
            KeyFile kf = load_key(store_, cfg_.key_id);
            s.state = kf.state;
            if (kf.state == "enabled") {
                s.health = KeyHealth::Ok;
                s.detail = "key " + cfg_.key_id + " is enabled in the local key store \"" + store_.dir() + "\"";
            } else {
                s.health = KeyHealth::Revoked;
                s.detail = "key " + cfg_.key_id + " is " + kf.state + " in the local key store \"" +
                           store_.dir() + "\"";
            }
        } catch (const KmsError& e) {
            s.detail = e.what();
            if (e.kind == KmsErrorKind::Revoked) {
                s.health = KeyHealth::Revoked;
                s.state = "not found";
            } else {
                // An unmounted store or a permission slip is not a revocation: the
                // watchdog keeps the cluster up on its cached KEK within the grace.
                s.health = KeyHealth::Unavailable;
                s.state = "unavailable";
            }
        }
        return s;
    }

private:
    KeyFile load_usable() {
        KeyFile kf = load_key(store_, cfg_.key_id);
        if (kf.state == "disabled")
            throw revoked("key " + cfg_.key_id + " is disabled in the local key store \"" + store_.dir() + "\"");
        if (kf.state == "deleted")
            throw revoked("key " + cfg_.key_id + " has been deleted from the local key store \"" +
                          store_.dir() + "\"");
        return kf;
    }

    static const KeyVersion* find_version(const KeyFile& kf, uint32_t ver) {
        for (const auto& v : kf.versions)
            if (v.version == ver) return &v;
        return nullptr;
    }

    KeyConfig cfg_;
    LocalKeyStore store_;
};

}  // namespace

std::unique_ptr<KeyProvider> make_local_provider(const KeyConfig& cfg) {
    auto it = cfg.options.find("key_store");
    if (it == cfg.options.end() || it->second.empty())
        throw config_error("key_store: the local key provider needs option key_store (an absolute directory path)");
    if (it->second[0] != '/')
        throw config_error("key_store: must be an absolute path, got \"" + it->second + "\"");
    if (!LocalKeyStore::valid_key_id(cfg.key_id))
        throw config_error("key_id: invalid key id \"" + cfg.key_id + "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
    // Other options are ignored, as they always were for this provider (a configuration
    // an earlier version accepted must still start).
    long timeout_ms = kit::int_option(cfg, "timeout_ms", LocalKeyStore::kLocalTimeoutMs, 100, 600000, "milliseconds");
    return std::make_unique<LocalProvider>(cfg, timeout_ms);
}

}  // namespace cmk
