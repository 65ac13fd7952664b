// The local audit trail (audit.hpp). One JSON object per line, appended with a single
// write() on an O_APPEND descriptor opened per event (the file may have been rotated
// by another process since the last event). Rotation past the size limit happens
// under flock() on audit.lock so that two processes never rotate twice in a row.
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/keys/audit.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <map>
#include <mutex>

#include "cmk_lakebase/base/sys.hpp"

namespace cmk::audit {
namespace {

std::mutex g_mu;
std::string g_dir;
std::string g_default_actor = "unknown";
std::atomic<uint64_t> g_max{kDefaultMaxBytes};
std::atomic<bool> g_reported{false};
thread_local std::string tl_actor;

std::string now_ms() {
    struct timeval tv;
    gettimeofday(&tv, nullptr);
    std::tm tm{};
    time_t t = tv.tv_sec;
    gmtime_r(&t, &tm);
    char buf[48];
    size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    std::snprintf(buf + n, sizeof buf - n, ".%03dZ", static_cast<int>(tv.tv_usec / 1000));
    return buf;
}

std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    if (s.size() > 1000) s.resize(1000);
    return s;
}

void maybe_rotate(const std::string& dir, const std::string& path) {
    uint64_t max = g_max.load();
    struct stat st;
    if (::stat(path.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_size) < max) return;
    std::string lp = dir + "/audit.lock";
    int lfd = sys::open(lp.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (lfd < 0) return;
    while (::flock(lfd, LOCK_EX) != 0 && errno == EINTR) {
    }
    // Another process may have rotated while we waited.
    if (::stat(path.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) >= max) {
        std::string old = dir + "/" + kAuditFileOld;
        if (sys::rename(path.c_str(), old.c_str()) == 0) (void)sys::fsync_dir(dir.c_str());
    }
    sys::close(lfd);
}

void append_line(const std::string& dir, const std::string& line) {
    std::string path = dir + "/" + kAuditFile;
    maybe_rotate(dir, path);
    int fd = sys::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        throw std::runtime_error("could not open audit file \"" + path + "\": " + std::strerror(errno));
    ssize_t w = sys::write(fd, line.data(), line.size());  // one write: never interleaved
    int e = errno;
    sys::close(fd);
    if (w != static_cast<ssize_t>(line.size()))
        throw std::runtime_error("could not append to audit file \"" + path +
                                 "\": " + (w < 0 ? std::strerror(e) : "short write"));
}

void fill(Event& e) {
    if (e.time.empty()) e.time = now_ms();
    if (!e.pid) e.pid = ::getpid();
    if (e.actor.empty()) {
        if (!tl_actor.empty()) {
            e.actor = tl_actor;
        } else {
            std::lock_guard<std::mutex> g(g_mu);
            e.actor = g_default_actor;
        }
    }
    e.detail = one_line(e.detail);
    e.as = one_line(e.as);
}

}  // namespace

void set_directory(const std::string& keyring_dir) {
    std::lock_guard<std::mutex> g(g_mu);
    g_dir = keyring_dir;
}

std::string directory() {
    std::lock_guard<std::mutex> g(g_mu);
    return g_dir;
}

void set_default_actor(const std::string& actor) {
    std::lock_guard<std::mutex> g(g_mu);
    g_default_actor = actor;
}

void set_max_bytes(uint64_t n) {
    g_max.store(n ? n : kDefaultMaxBytes);
}

ActorScope::ActorScope(const std::string& actor) : saved_(tl_actor) {
    tl_actor = actor;
}
ActorScope::~ActorScope() {
    tl_actor = saved_;
}

std::string event_to_json(const Event& e) {
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    auto str = [&w](const char* k, const std::string& v) {
        w.Key(k);
        w.String(v.c_str(), static_cast<rapidjson::SizeType>(v.size()));
    };
    w.StartObject();
    str("time", e.time);
    w.Key("pid");
    w.Int64(e.pid);
    str("actor", e.actor);
    str("action", e.action);
    str("key_config", e.key_config);
    str("provider", e.provider);
    str("key_id", e.key_id);
    str("key_version", e.key_version);
    w.Key("kek_generation");
    w.Uint(e.kek_generation);
    str("request_id", e.request_id);
    str("outcome", e.outcome);
    str("detail", e.detail);
    if (!e.as.empty()) str("as", e.as);  // only when the provider says (older lines have none)
    w.Key("count");
    w.Uint64(e.count);
    w.EndObject();
    return std::string(sb.GetString(), sb.GetSize());
}

void record_to(const std::string& keyring_dir, Event e) {
    fill(e);
    append_line(keyring_dir, event_to_json(e) + "\n");
}

void record(Event e) {
    std::string dir = directory();
    if (dir.empty()) return;
    try {
        record_to(dir, std::move(e));
    } catch (const std::exception& ex) {
        if (!g_reported.exchange(true)) {
            std::string m = std::string("cmk_lakebase: audit trail: ") + ex.what() + "\n";
            (void)!sys::write(2, m.data(), m.size());
        }
    }
}

std::vector<Event> read_all(const std::string& keyring_dir) {
    std::vector<Event> out;
    for (const char* name : {kAuditFileOld, kAuditFile}) {
        std::string path = keyring_dir + "/" + name;
        struct stat st;
        if (::stat(path.c_str(), &st) != 0) continue;
        // The trail is bounded by its own rotation (audit_max_size), not by read_file's default.
        std::string text = sys::read_file(path.c_str(), size_t(-1));
        size_t pos = 0;
        while (pos < text.size()) {
            size_t nl = text.find('\n', pos);
            if (nl == std::string::npos) nl = text.size();
            std::string line = text.substr(pos, nl - pos);
            pos = nl + 1;
            if (line.empty()) continue;
            rapidjson::Document d;
            Event e;
            if (!parse_json_bounded(d, line, nullptr) || !d.IsObject()) {
                e.action = "unparsable";
                e.detail = one_line(line);
                out.push_back(std::move(e));
                continue;
            }
            auto s = [&d](const char* k) -> std::string {
                auto it = d.FindMember(k);
                return it != d.MemberEnd() && it->value.IsString()
                           ? std::string(it->value.GetString(), it->value.GetStringLength())
                           : std::string();
            };
            e.time = s("time");
            e.actor = s("actor");
            e.action = s("action");
            e.key_config = s("key_config");
            e.provider = s("provider");
            e.key_id = s("key_id");
            e.key_version = s("key_version");
            e.request_id = s("request_id");
            e.outcome = s("outcome");
            e.detail = s("detail");
            e.as = s("as");
            auto it = d.FindMember("pid");
            if (it != d.MemberEnd() && it->value.IsInt64()) e.pid = it->value.GetInt64();
            it = d.FindMember("kek_generation");
            if (it != d.MemberEnd() && it->value.IsUint()) e.kek_generation = it->value.GetUint();
            it = d.FindMember("count");
            if (it != d.MemberEnd() && it->value.IsUint64()) e.count = it->value.GetUint64();
            out.push_back(std::move(e));
        }
    }
    return out;
}

const char* kms_error_outcome(KmsErrorKind k) {
    switch (k) {
        case KmsErrorKind::Config:
            return "config_error";
        case KmsErrorKind::Unavailable:
            return "unavailable";
        case KmsErrorKind::Revoked:
            return "revoked";
    }
    return "error";
}

// ---------------------------------------------------------------- audited provider

namespace {

class AuditedProvider : public KeyProvider {
public:
    AuditedProvider(std::unique_ptr<KeyProvider> inner, std::string config_name, bool aggregate)
        : inner_(std::move(inner)), config_name_(std::move(config_name)), aggregate_(aggregate) {}

    std::string name() const override { return inner_->name(); }
    const KeyConfig& config() const override { return inner_->config(); }
    std::string last_request_id() const override { return inner_->last_request_id(); }
    std::string identity() const override { return inner_->identity(); }

    WrapResult wrap(const SecureBytes& kek) override {
        try {
            WrapResult r = inner_->wrap(kek);
            emit("wrap", "ok", r.key_version, r.request_id, "");
            return r;
        } catch (const KmsError& e) {
            emit("wrap", kms_error_outcome(e.kind), "", "", e.what());
            throw;
        }
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        try {
            SecureBytes k = inner_->unwrap(blob);
            emit("unwrap", "ok", "", inner_->last_request_id(), "");
            return k;
        } catch (const KmsError& e) {
            emit("unwrap", kms_error_outcome(e.kind), "", inner_->last_request_id(), e.what());
            throw;
        }
    }

    KeyStatus status() override {
        try {
            KeyStatus s = inner_->status();
            emit("status", key_health_name(s.health), "", s.request_id,
                 s.health == KeyHealth::Ok ? s.state : s.detail);
            return s;
        } catch (const KmsError& e) {
            emit("status", kms_error_outcome(e.kind), "", "", e.what());
            throw;
        }
    }

    void set_aggregate(bool on) { aggregate_ = on; }

private:
    struct Pending {
        std::string outcome;
        uint64_t suppressed = 0;
        std::chrono::steady_clock::time_point written{};
        Event last;
    };

    void emit(const char* action, const std::string& outcome, const std::string& version,
              const std::string& request_id, const std::string& detail) {
        Event e;
        e.action = action;
        e.key_config = config_name_;
        e.provider = inner_->config().provider;
        e.key_id = inner_->config().key_id;
        e.key_version = version;
        e.request_id = request_id;
        e.outcome = outcome;
        e.detail = detail;
        e.as = inner_->identity();
        bool probe = e.action == "status" || e.action == "unwrap";
        if (!aggregate_ || !probe) {
            record(std::move(e));
            return;
        }
        auto now = std::chrono::steady_clock::now();
        Pending& p = pending_[e.action];
        bool same = p.outcome == outcome && p.written.time_since_epoch().count() != 0;
        if (same && now - p.written < std::chrono::hours(1)) {
            p.suppressed++;
            p.last = e;
            return;
        }
        if (!same && p.suppressed) {
            // Close the run of identical answers before the different one.
            Event closing = p.last;
            closing.count = p.suppressed;
            closing.detail = "aggregated: " + std::to_string(p.suppressed) + " further identical answers";
            record(std::move(closing));
        } else if (same) {
            e.count = p.suppressed + 1;
        }
        p.outcome = outcome;
        p.suppressed = 0;
        p.written = now;
        record(std::move(e));
    }

    std::unique_ptr<KeyProvider> inner_;
    std::string config_name_;
    bool aggregate_;
    std::map<std::string, Pending> pending_;
};

}  // namespace

std::unique_ptr<KeyProvider> audited_provider(std::unique_ptr<KeyProvider> inner,
                                              const std::string& config_name, bool aggregate_probes) {
    return std::make_unique<AuditedProvider>(std::move(inner), config_name, aggregate_probes);
}

void set_aggregate_probes(KeyProvider& p, bool on) {
    if (auto* a = dynamic_cast<AuditedProvider*>(&p)) a->set_aggregate(on);
}

}  // namespace cmk::audit
