// The watchdog's probe on a thread of its own (issue 18, item 4). A provider call that
// hangs (a local key store on a hung NFS mount, a KMS that accepts and never answers)
// must not hang the watchdog: it could then enforce neither the outage policy nor a
// revocation, and watchdog_status() would go on saying "ok". The watchdog starts a
// probe here and polls for its end; it judges a probe past its deadline itself
// (unavailable) and abandons it: the hung thread is left behind, and the next probe
// starts on a thread of its own, so a revocation the provider reports meanwhile is
// still seen. Abandoned probes still running are bounded (kMaxAbandoned); past that no
// new probe starts until one of them ends. A result of an abandoned probe is dropped,
// unless it is a revocation (acted on whenever it comes). Each thread runs only the
// layer's C++ (never PostgreSQL: no palloc, no ereport) and blocks every signal (they
// belong to the worker's main thread); probe_key() and probe_databases() hold no lock
// across a provider call, so a hung probe does not block the next one.
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cmk_lakebase/fs/key_admin.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace {

constexpr size_t kMaxAbandoned = 8;

struct ProbeSlot {
    std::mutex mu;
    bool finished = false;
    WatchdogProbe result;
};

// The worker's view of its probes; each thread holds its own reference to its slot,
// so a probe still hung when the process exits never sees its slot destroyed.
struct Probes {
    std::mutex mu;
    std::shared_ptr<ProbeSlot> current;                 // started, result not yet taken
    std::vector<std::shared_ptr<ProbeSlot>> abandoned;  // past their deadline
};

Probes& probes() {
    static Probes p;
    return p;
}

void run_probe(std::shared_ptr<ProbeSlot> s) {
    WatchdogProbe r;
    try {
        r.cluster = probe_key();
    } catch (const std::exception& e) {
        r.cluster.health = health_of(category_of(e));
        r.cluster.detail = e.what();
    } catch (...) {
        r.cluster.detail = "the probe failed";
    }
    if (r.cluster.health != KeyHealth::Revoked) {
        try {
            r.databases = probe_databases();
        } catch (const std::exception& e) {
            r.databases_error = e.what();
        } catch (...) {
            r.databases_error = "the probe of the database keys failed";
        }
    }
    try {
        LayerInfo i = info();  // the binding may have changed (bind_cluster)
        r.provider = i.provider;
        r.key_id = i.key_id;
    } catch (...) {
    }
    std::lock_guard<std::mutex> g(s->mu);
    s->result = std::move(r);
    s->finished = true;
}

bool finished(const std::shared_ptr<ProbeSlot>& s) {
    std::lock_guard<std::mutex> g(s->mu);
    return s->finished;
}

bool finished_revoked(const std::shared_ptr<ProbeSlot>& s) {
    std::lock_guard<std::mutex> g(s->mu);
    return s->finished && s->result.cluster.health == KeyHealth::Revoked;
}

// Drops abandoned probes that ended without a revocation. Caller holds Probes::mu.
void prune_locked(Probes& p) {
    p.abandoned.erase(std::remove_if(p.abandoned.begin(), p.abandoned.end(),
                                     [](const std::shared_ptr<ProbeSlot>& s) {
                                         return finished(s) && !finished_revoked(s);
                                     }),
                      p.abandoned.end());
}

}  // namespace

bool start_probe() {
    Probes& p = probes();
    std::lock_guard<std::mutex> g(p.mu);
    if (p.current) return false;  // one probe at a time is waited for
    prune_locked(p);
    if (p.abandoned.size() >= kMaxAbandoned) return false;
    auto s = std::make_shared<ProbeSlot>();
    // The new thread inherits the mask: no PostgreSQL signal handler ever runs on it.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
        std::thread(run_probe, s).detach();
    } catch (...) {
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        throw;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    p.current = std::move(s);
    return true;
}

void abandon_probe() {
    Probes& p = probes();
    std::lock_guard<std::mutex> g(p.mu);
    if (!p.current) return;
    if (!finished(p.current) || finished_revoked(p.current)) p.abandoned.push_back(std::move(p.current));
    p.current.reset();
}

size_t abandoned_probes() {
    Probes& p = probes();
    std::lock_guard<std::mutex> g(p.mu);
    prune_locked(p);
    return p.abandoned.size();
}

bool take_probe(WatchdogProbe* out) {
    Probes& p = probes();
    std::lock_guard<std::mutex> g(p.mu);
    std::shared_ptr<ProbeSlot> s;
    if (p.current && finished(p.current)) {
        s = std::move(p.current);
        p.current.reset();
    } else {
        // A revocation an abandoned probe brought back is acted on now; the probe
        // being waited for is abandoned in its turn.
        auto it = std::find_if(p.abandoned.begin(), p.abandoned.end(), finished_revoked);
        if (it == p.abandoned.end()) return false;
        s = std::move(*it);
        p.abandoned.erase(it);
        if (p.current) {
            p.abandoned.push_back(std::move(p.current));
            p.current.reset();
        }
    }
    std::lock_guard<std::mutex> gs(s->mu);
    *out = std::move(s->result);
    s->result = WatchdogProbe{};
    return true;
}

}  // namespace cmk::fs
