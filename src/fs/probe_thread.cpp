// The watchdog's probe on a thread of its own (issue 18, item 4). A provider call that
// hangs (a local key store on a hung NFS mount, a KMS that accepts and never answers)
// must not hang the watchdog: it could then enforce neither the outage policy nor a
// revocation, and watchdog_status() would go on saying "ok". The watchdog starts a
// probe here and polls for its end; it judges a probe past its deadline itself
// (unavailable). The thread runs only the layer's C++ (never PostgreSQL: no palloc,
// no ereport), blocks every signal (they belong to the worker's main thread) and is
// detached: a hung probe is left behind, and no second one starts while it hangs.
#include <pthread.h>
#include <signal.h>

#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "cmk_lakebase/fs/key_admin.hpp"
#include "layer_internal.hpp"

namespace cmk::fs {
namespace {

struct ProbeSlot {
    std::mutex mu;
    bool running = false;
    bool finished = false;
    WatchdogProbe result;
};

// Shared with the thread, which holds its own reference: a probe still hung when the
// process exits never sees its slot destroyed under it.
std::shared_ptr<ProbeSlot>& slot() {
    static std::shared_ptr<ProbeSlot> s = std::make_shared<ProbeSlot>();
    return s;
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
    s->running = false;
}

}  // namespace

bool start_probe() {
    std::shared_ptr<ProbeSlot> s = slot();
    {
        std::lock_guard<std::mutex> g(s->mu);
        if (s->running) return false;
        s->running = true;
        s->finished = false;
    }
    // The new thread inherits the mask: no PostgreSQL signal handler ever runs on it.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    try {
        std::thread(run_probe, s).detach();
    } catch (...) {
        pthread_sigmask(SIG_SETMASK, &old, nullptr);
        std::lock_guard<std::mutex> g(s->mu);
        s->running = false;
        throw;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return true;
}

bool take_probe(WatchdogProbe* out) {
    std::shared_ptr<ProbeSlot> s = slot();
    std::lock_guard<std::mutex> g(s->mu);
    if (!s->finished) return false;
    *out = std::move(s->result);
    s->result = WatchdogProbe{};
    s->finished = false;
    return true;
}

}  // namespace cmk::fs
