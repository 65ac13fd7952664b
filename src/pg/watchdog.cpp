// The revocation watchdog (DESIGN §5, issue 4): a background worker that, every
// cmk_lakebase.check_interval, asks the key provider for the CMK's state and probes an
// unwrap of the wrapped KEK. ok: nothing to do. revoked (disabled, deleted, wrong or
// replaced key material, access denied): wipe keys, immediate shutdown of the cluster.
// unavailable (timeouts, unreachable store): keep serving on the cached KEK, retrying
// with backoff; after cmk_lakebase.kms_outage_grace act per cmk_lakebase.on_kms_outage.
// What it sees lives in a small shared-memory block read by watchdog_status().
// The probe runs on a thread of the worker (cmk::fs::start_probe, issue 18): a provider
// that never answers leaves the worker free to judge it unavailable once
// cmk_lakebase.probe_timeout has passed, and to apply the outage policy.
#include <csignal>
#include <cstring>

#include "cmk_lakebase/fs/key_admin.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "module.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "access/htup_details.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/bgwriter.h"
#include "access/xlog.h"
#include "storage/bufmgr.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "storage/procsignal.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "storage/spin.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/timestamp.h"

#include "pg_compat.h"

PGDLLEXPORT void cmk_watchdog_main(Datum arg);
PG_FUNCTION_INFO_V1(cmk_watchdog_status);
PG_FUNCTION_INFO_V1(cmk_check_key_now);
}

namespace {

enum WatchState { WS_STARTING = 0, WS_OK, WS_UNAVAILABLE, WS_REVOKED };
WatchState watch_state(cmk::KeyHealth h) {
    return h == cmk::KeyHealth::Ok ? WS_OK : h == cmk::KeyHealth::Revoked ? WS_REVOKED : WS_UNAVAILABLE;
}
const char* state_name(int s) {
    switch (s) {
        case WS_OK: return "ok";
        case WS_UNAVAILABLE: return "unavailable";
        case WS_REVOKED: return "revoked";
        default: return "starting";
    }
}

enum OutagePolicy { OUTAGE_CONTINUE = 0, OUTAGE_SHUTDOWN = 1 };
const struct config_enum_entry outage_options[] = {
    {"continue", OUTAGE_CONTINUE, false},
    {"shutdown", OUTAGE_SHUTDOWN, false},
    {NULL, 0, false},
};

int check_interval_s = 10;
int kms_outage_grace_s = 3600;
int on_kms_outage = OUTAGE_CONTINUE;
int probe_timeout_s = 60;

struct WatchdogShared {
    slock_t mutex;
    int state;
    TimestampTz started;
    TimestampTz last_check;
    TimestampTz last_ok;
    TimestampTz next_check;
    int consecutive_failures;
    int64 checks;
    int64 requested;  // check_key_now() requests, numbered
    int64 completed;  // highest request number a finished check started after
    char last_result[512];
    char request_id[128];
    bool probe_in_flight;       // a probe started and has not answered yet
    TimestampTz probe_started;  // when it started
    pid_t worker_pid;
    Latch* worker_latch;
};

WatchdogShared* shared = nullptr;
shmem_request_hook_type prev_shmem_request_hook = nullptr;
shmem_startup_hook_type prev_shmem_startup_hook = nullptr;

void watchdog_shmem_request(void) {
    if (prev_shmem_request_hook) prev_shmem_request_hook();
    RequestAddinShmemSpace(MAXALIGN(sizeof(WatchdogShared)));
}

void watchdog_shmem_startup(void) {
    if (prev_shmem_startup_hook) prev_shmem_startup_hook();
    LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
    bool found;
    shared = (WatchdogShared*) ShmemInitStruct("cmk_lakebase watchdog", sizeof(WatchdogShared), &found);
    if (!found) {
        memset(shared, 0, sizeof(WatchdogShared));
        SpinLockInit(&shared->mutex);
        shared->state = WS_STARTING;
        // The postmaster unwrapped the KEK through the provider moments ago.
        shared->started = shared->last_ok = GetCurrentTimestamp();
    }
    LWLockRelease(AddinShmemInitLock);
}

// The probe's result, across the C++ wall: plain buffers.
struct Probe {
    int health;  // WatchState
    char detail[512];
    char request_id[128];
};
struct KeyNames {
    char provider[64];
    char key_id[256];
};

KeyNames key_names() {
    KeyNames k{};
    cmk::pg::quietly([&] {
        cmk::fs::LayerInfo i = cmk::fs::info();
        strlcpy(k.provider, i.provider.c_str(), sizeof k.provider);
        strlcpy(k.key_id, i.key_id.c_str(), sizeof k.key_id);
    });
    return k;
}

// A kill-switch or outage action in the audit trail (never throws).
void audit_action(const char* action, const KeyNames& names, const char* outcome, const char* detail) {
    cmk::pg::quietly([&] {
        cmk::audit::Event e;
        e.action = action;
        e.provider = names.provider;
        e.key_id = names.key_id;
        e.outcome = outcome;
        e.detail = detail;
        cmk::audit::record(e);
    });
}

void audit_as_watchdog() {
    cmk::pg::quietly([] {
        cmk::audit::set_default_actor("watchdog");
        // One line per change of answer (and at least hourly), not one per check.
        cmk::fs::set_probe_audit_aggregation(true);
    });
}

// ---- databases bound to key configurations of their own ----------------------------------

// Runs a layer call through the wall: a failure becomes its message in err, which the
// worker logs (it never raises).
template <typename F>
bool layer_call(F&& fn, char* err, size_t errlen) {
    cmk::pg::Failure f;
    bool ok = cmk::pg::try_cpp(nullptr, std::forward<F>(fn), &f);
    strlcpy(err, ok ? "" : f.message, errlen);
    return ok;
}

struct DbCheck {
    uint32 oid;
    int health;  // WatchState
    bool dropped;
    char state[16];
    char detail[512];
    char request_id[128];
    char config[128];
    KeyNames names;
};

// The database probes of a finished probe, copied into plain buffers.
int copy_database_probes(const cmk::fs::WatchdogProbe& r, DbCheck* out, int max) {
    int n = 0;
    for (const auto& d : r.databases) {
        if (n >= max) break;
        DbCheck& c = out[n++];
        memset(&c, 0, sizeof c);
        c.oid = d.oid;
        c.health = watch_state(d.health);
        c.dropped = d.dropped;
        strlcpy(c.state, d.state.c_str(), sizeof c.state);
        strlcpy(c.detail, d.detail.c_str(), sizeof c.detail);
        strlcpy(c.request_id, d.request_id.c_str(), sizeof c.request_id);
        strlcpy(c.config, d.config_name.c_str(), sizeof c.config);
        strlcpy(c.names.provider, d.provider.c_str(), sizeof c.names.provider);
        strlcpy(c.names.key_id, d.key_id.c_str(), sizeof c.names.key_id);
    }
    return n;
}

// SIGTERM (what pg_terminate_backend sends) to every process connected to the
// database, until none is left or 10 seconds have passed. PGPROCs on the free lists
// keep the pid and database of their last user: each candidate is confirmed live in
// the proc array (BackendPidGetProc) before it is signalled.
void terminate_database_sessions(Oid dboid) {
    for (int round = 0; round < 100; round++) {
        int pids[256];
        int n = 0;
        for (uint32 i = 0; i < ProcGlobal->allProcCount && n < 256; i++) {
            PGPROC* proc = &ProcGlobal->allProcs[i];
            if (proc->pid != 0 && proc != MyProc && proc->databaseId == dboid) pids[n++] = proc->pid;
        }
        int live = 0;
        for (int i = 0; i < n; i++) {
            PGPROC* proc = BackendPidGetProc(pids[i]);
            if (!proc || proc->databaseId != dboid) continue;
            live++;
            (void) kill(pids[i], SIGTERM);
        }
        if (live == 0) return;
        CHECK_FOR_INTERRUPTS();
        (void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100, PG_WAIT_EXTENSION);
        ResetLatch(MyLatch);
    }
    ereport(LOG, (errmsg("cmk_lakebase: sessions of database %u did not exit within 10 seconds; their file "
                         "access fails from now on",
                         dboid)));
}

// The per-database kill switch: the database's CMK is revoked while the cluster's is
// fine. Nothing committed is lost: its dirty pages are written (with its DEKs, still
// in memory) before its KEK is wiped; then its pages leave shared buffers and every
// process closes its files.
void revoke_database(const DbCheck& c) {
    ereport(LOG, (errmsg("cmk_lakebase: key \"%s\" of provider \"%s\" of database %u is revoked: %s; closing "
                         "that database (the rest of the cluster keeps serving)",
                         c.names.key_id, c.names.provider, c.oid, c.detail)));
    char err[512];
    if (!layer_call([&] { cmk::fs::begin_database_revocation(c.oid); }, err, sizeof err))
        ereport(LOG, (errmsg("cmk_lakebase: %s", err)));
    char detail[640];
    snprintf(detail, sizeof detail, "database %u: %s", c.oid, c.detail);
    audit_action("db_kill_switch", c.names, "revoked", detail);
    terminate_database_sessions(c.oid);
    RequestCheckpoint(CHECKPOINT_FAST | CHECKPOINT_FORCE | CHECKPOINT_WAIT);
    DropDatabaseBuffers(c.oid);
    if (!layer_call([&] { cmk::fs::lock_database(c.oid); }, err, sizeof err))
        ereport(LOG, (errmsg("cmk_lakebase: %s", err)));
    // Every process closes its relation files (and with them the file keys).
    (void) EmitProcSignalBarrier(PROCSIGNAL_BARRIER_SMGRRELEASE);
    ereport(LOG, (errmsg("cmk_lakebase: database %u is locked: its sessions were terminated, new ones are "
                         "refused, its keys are wiped",
                         c.oid)));
}

void check_databases(const DbCheck* checks, int n) {
    static struct {
        uint32 oid;
        int health;
        bool unlock_failed;  // logged once, not at every check
    } last[64];
    for (int i = 0; i < n; i++) {
        const DbCheck& c = checks[i];
        int prev = -1;
        int slot = -1;
        for (int j = 0; j < 64; j++)
            if (last[j].oid == c.oid) slot = j;
        if (slot < 0)
            for (int j = 0; j < 64 && slot < 0; j++)
                if (last[j].oid == 0) slot = j;
        if (slot >= 0) {
            if (last[slot].oid == c.oid)
                prev = last[slot].health;
            else
                last[slot].unlock_failed = false;
            last[slot].oid = c.oid;
            last[slot].health = c.health;
        }
        if (c.dropped) {
            char err[512];
            if (layer_call([&] { cmk::fs::forget_database(c.oid); }, err, sizeof err)) {
                char detail[128];
                snprintf(detail, sizeof detail, "database %u was dropped; its key binding is removed", c.oid);
                audit_action("db_forget", c.names, "ok", detail);
                ereport(LOG, (errmsg("cmk_lakebase: %s", detail)));
            } else {
                ereport(LOG, (errmsg("cmk_lakebase: could not forget dropped database %u: %s", c.oid, err)));
            }
            if (slot >= 0) last[slot].oid = 0;
            continue;
        }
        bool locked = strcmp(c.state, "locked") == 0;
        if (c.health == WS_REVOKED && !locked) {
            revoke_database(c);
        } else if (c.health == WS_OK && locked) {
            char err[512];
            bool ok = layer_call([&] { cmk::fs::unlock_database(c.oid); }, err, sizeof err);
            bool repeated = !ok && slot >= 0 && last[slot].unlock_failed;
            if (slot >= 0) last[slot].unlock_failed = !ok;
            if (!repeated) {
                char detail[640];
                snprintf(detail, sizeof detail, "database %u: %s", c.oid,
                         ok ? "key usable again; database open" : err);
                audit_action("db_unlock", c.names, ok ? "ok" : "error", detail);
                ereport(LOG, (errmsg("cmk_lakebase: %s", detail)));
            }
        } else if (c.health == WS_UNAVAILABLE && prev != WS_UNAVAILABLE) {
            ereport(LOG, (errmsg("cmk_lakebase: key provider \"%s\" unavailable for key \"%s\" of database %u: "
                                 "%s; %s",
                                 c.names.provider, c.names.key_id, c.oid, c.detail,
                                 locked ? "the database stays locked" : "serving on the cached key")));
        }
    }
}

void wipe_keys_quietly() {
    cmk::pg::quietly([] { cmk::fs::wipe_keys(); });
}

}  // namespace

void cmk_watchdog_init(void) {
    DefineCustomIntVariable("cmk_lakebase.check_interval",
                            "How often the watchdog asks the key provider whether the CMK is usable.",
                            "A revoked key shuts the cluster down within about this long.",
                            &check_interval_s, 10, 1, 3600, PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);
    DefineCustomIntVariable("cmk_lakebase.kms_outage_grace",
                            "How long the server keeps serving on its cached key while the key provider "
                            "is unavailable before on_kms_outage applies.",
                            NULL, &kms_outage_grace_s, 3600, 0, INT_MAX / 1000, PGC_SIGHUP, GUC_UNIT_S, NULL,
                            NULL, NULL);
    DefineCustomEnumVariable("cmk_lakebase.on_kms_outage",
                             "What to do when the key provider has been unavailable for longer than "
                             "kms_outage_grace: continue, or shutdown (a fast, clean shutdown).",
                             NULL, &on_kms_outage, OUTAGE_CONTINUE, outage_options, PGC_SIGHUP, 0, NULL, NULL,
                             NULL);

    DefineCustomIntVariable("cmk_lakebase.probe_timeout",
                            "How long the watchdog waits for one probe of the key provider before it "
                            "judges the provider unavailable.",
                            "A probe that hangs (a hung key store, a KMS that never answers) counts as an "
                            "outage: kms_outage_grace, then on_kms_outage.",
                            &probe_timeout_s, 60, 1, 3600, PGC_SIGHUP, GUC_UNIT_S, NULL, NULL, NULL);

    prev_shmem_request_hook = shmem_request_hook;
    shmem_request_hook = watchdog_shmem_request;
    prev_shmem_startup_hook = shmem_startup_hook;
    shmem_startup_hook = watchdog_shmem_startup;

    BackgroundWorker worker;
    memset(&worker, 0, sizeof worker);
    worker.bgw_flags = BGWORKER_SHMEM_ACCESS;
    worker.bgw_start_time = BgWorkerStart_PostmasterStart;
    worker.bgw_restart_time = 1;
    strlcpy(worker.bgw_library_name, "cmk_lakebase", BGW_MAXLEN);
    strlcpy(worker.bgw_function_name, "cmk_watchdog_main", BGW_MAXLEN);
    strlcpy(worker.bgw_name, "cmk_lakebase watchdog", BGW_MAXLEN);
    strlcpy(worker.bgw_type, "cmk_lakebase watchdog", BGW_MAXLEN);
    RegisterBackgroundWorker(&worker);
}

namespace {

// What the worker keeps between wake-ups.
struct Loop {
    KeyNames names;
    int backoff_ms = 1000;
    bool outage_shutdown_sent = false;
    bool in_flight = false;  // a probe is waited for (l.started)
    bool hung = false;       // probes past probe_timeout were abandoned and may still run
    TimestampTz started = 0;
    TimestampTz next_due = 0;
    int64 serving = 0;  // check_key_now() requests the probe in flight answers
};

// Unavailable for longer than kms_outage_grace with on_kms_outage = shutdown: a fast
// shutdown (the key is still valid), once.
void enforce_outage_policy(Loop& l, TimestampTz now, const char* detail) {
    SpinLockAcquire(&shared->mutex);
    TimestampTz last_ok = shared->last_ok;
    SpinLockRelease(&shared->mutex);
    long secs;
    int usecs;
    TimestampDifference(last_ok, now, &secs, &usecs);
    if (on_kms_outage != OUTAGE_SHUTDOWN || secs < kms_outage_grace_s || l.outage_shutdown_sent) return;
    ereport(LOG, (errmsg("cmk_lakebase: key provider unavailable for longer than kms_outage_grace "
                         "(%d s) for key \"%s\"; shutting the cluster down",
                         kms_outage_grace_s, l.names.key_id),
                  errdetail("Last answer: %s", detail)));
    audit_action("outage_shutdown", l.names, "unavailable", detail);
    kill(PostmasterPid, SIGINT);
    l.outage_shutdown_sent = true;
}

// Records one judgement of the key (a probe's answer, or a probe past its deadline)
// and acts on it.
void judge(Loop& l, const Probe& p, TimestampTz now) {
    SpinLockAcquire(&shared->mutex);
    int previous = shared->state;
    shared->state = p.health;
    shared->last_check = now;
    shared->checks++;
    strlcpy(shared->last_result, p.detail, sizeof shared->last_result);
    strlcpy(shared->request_id, p.request_id, sizeof shared->request_id);
    if (p.health == WS_OK) {
        shared->last_ok = now;
        shared->consecutive_failures = 0;
    } else {
        shared->consecutive_failures++;
    }
    SpinLockRelease(&shared->mutex);

    if (p.health == WS_REVOKED) {
        ereport(LOG, (errmsg("cmk_lakebase: key \"%s\" of provider \"%s\" is revoked: %s; shutting the "
                             "cluster down",
                             l.names.key_id, l.names.provider, p.detail),
                      errhint("Data cannot be read until the key is restored in the key provider; then "
                              "start the server again.")));
        audit_action("kill_switch", l.names, "revoked", p.detail);
        wipe_keys_quietly();
        // Immediate shutdown: no checkpoint, nothing that needs a key.
        kill(PostmasterPid, SIGQUIT);
    } else if (p.health == WS_UNAVAILABLE) {
        if (previous != WS_UNAVAILABLE)
            ereport(LOG, (errmsg("cmk_lakebase: key provider \"%s\" unavailable for key \"%s\": %s; serving "
                                 "on the cached key",
                                 l.names.provider, l.names.key_id, p.detail)));
        enforce_outage_policy(l, now, p.detail);
    } else if (p.health == WS_OK && previous == WS_UNAVAILABLE) {
        ereport(LOG, (errmsg("cmk_lakebase: key provider \"%s\" reachable again; key \"%s\" ok",
                             l.names.provider, l.names.key_id)));
    }
}

// A finished probe, copied out of C++ into plain buffers (no C++ object outlives the
// copy: the worker then calls PostgreSQL functions that may longjmp).
struct Finished {
    Probe p;
    int n;  // entries of db_checks
    char dberr[512];
    KeyNames names;  // empty provider: unknown
};
DbCheck db_checks[64];

bool take_finished(Finished* out) {
    bool done = false;
    out->n = 0;
    out->dberr[0] = 0;
    out->names = KeyNames{};
    bool ok = cmk::pg::quietly([&] {
        cmk::fs::WatchdogProbe r;
        done = cmk::fs::take_probe(&r);
        if (!done) return;
        out->p.health = watch_state(r.cluster.health);
        strlcpy(out->p.detail, r.cluster.detail.c_str(), sizeof out->p.detail);
        strlcpy(out->p.request_id, r.cluster.request_id.c_str(), sizeof out->p.request_id);
        strlcpy(out->names.provider, r.provider.c_str(), sizeof out->names.provider);
        strlcpy(out->names.key_id, r.key_id.c_str(), sizeof out->names.key_id);
        out->n = copy_database_probes(r, db_checks, 64);
        strlcpy(out->dberr, r.databases_error.c_str(), sizeof out->dberr);
    });
    if (!ok && done) {
        out->p.health = WS_UNAVAILABLE;
        strlcpy(out->p.detail, "could not read the probe's result", sizeof out->p.detail);
        out->p.request_id[0] = 0;
        out->n = 0;
    }
    return done;
}

// Whether abandoned probes still run: watchdog_status() shows a probe in flight, since
// the oldest unanswered one started, until every one has ended or a probe answered.
void note_hung_probes(Loop& l) {
    size_t n = 0;
    if (l.hung && !cmk::pg::quietly([&] { n = cmk::fs::abandoned_probes(); })) n = 1;
    l.hung = n > 0;
    SpinLockAcquire(&shared->mutex);
    shared->probe_in_flight = l.in_flight || l.hung;
    SpinLockRelease(&shared->mutex);
}

// A probe has answered: judge it, check the databases it probed, plan the next one.
void finish_probe(Loop& l, const Finished& fin, TimestampTz now) {
    const Probe& p = fin.p;
    if (fin.names.provider[0]) l.names = fin.names;
    judge(l, p, now);
    if (fin.dberr[0]) ereport(LOG, (errmsg("cmk_lakebase: could not probe the database keys: %s", fin.dberr)));
    if (p.health != WS_REVOKED) check_databases(db_checks, fin.n);

    // Retry an unavailable provider sooner, backing off to the interval.
    int wait_ms = check_interval_s * 1000;
    if (p.health == WS_UNAVAILABLE) {
        wait_ms = Min(l.backoff_ms, wait_ms);
        l.backoff_ms = Min(l.backoff_ms * 2, check_interval_s * 1000);
    } else {
        l.backoff_ms = 1000;
    }
    l.in_flight = false;
    l.next_due = TimestampTzPlusMilliseconds(now, wait_ms);
    note_hung_probes(l);
    SpinLockAcquire(&shared->mutex);
    shared->completed = Max(shared->completed, l.serving);
    shared->next_check = l.next_due;
    SpinLockRelease(&shared->mutex);
}

// A probe still running past probe_timeout: the provider is unavailable (never ok),
// the outage policy applies. The probe is abandoned (its thread left to end), and the
// next one starts on schedule on a thread of its own: a revocation the provider reports
// meanwhile is still enforced (issue 18). The first of a hang is logged.
void probe_overdue(Loop& l, TimestampTz now) {
    Probe p;
    snprintf(p.detail, sizeof p.detail,
             "no answer from the key provider within probe_timeout (%d s); the probe is still waiting",
             probe_timeout_s);
    p.request_id[0] = 0;
    p.health = WS_UNAVAILABLE;
    if (!l.hung)
        ereport(LOG, (errmsg("cmk_lakebase: the probe of key \"%s\" of provider \"%s\" has not answered "
                             "within probe_timeout (%d s); treating the provider as unavailable",
                             l.names.key_id, l.names.provider, probe_timeout_s)));
    judge(l, p, now);
    cmk::pg::quietly([] { cmk::fs::abandon_probe(); });
    l.in_flight = false;
    l.hung = true;
    int wait_ms = Min(l.backoff_ms, check_interval_s * 1000);
    l.backoff_ms = Min(l.backoff_ms * 2, check_interval_s * 1000);
    l.next_due = TimestampTzPlusMilliseconds(now, wait_ms);
    // check_key_now() callers get the judgement instead of waiting for the hung probe.
    SpinLockAcquire(&shared->mutex);
    shared->completed = shared->requested;
    shared->next_check = l.next_due;
    SpinLockRelease(&shared->mutex);
}

void start_one_probe(Loop& l, TimestampTz now) {
    SpinLockAcquire(&shared->mutex);
    l.serving = shared->requested;
    SpinLockRelease(&shared->mutex);
    Probe fail;
    fail.request_id[0] = 0;
    cmk::pg::Failure f;
    bool started = false;
    bool ok = cmk::pg::try_cpp(nullptr, [&] { started = cmk::fs::start_probe(); }, &f);
    if (!ok || !started) {
        // No thread (out of resources), or too many abandoned probes still hang.
        fail.health = WS_UNAVAILABLE;
        if (ok)
            snprintf(fail.detail, sizeof fail.detail,
                     "earlier probes of the key provider are still waiting for an answer (past probe_timeout, "
                     "%d s); no new probe starts until one of them ends",
                     probe_timeout_s);
        else
            strlcpy(fail.detail, f.message, sizeof fail.detail);
        judge(l, fail, now);
        l.next_due = TimestampTzPlusMilliseconds(now, 1000);
        SpinLockAcquire(&shared->mutex);
        shared->completed = Max(shared->completed, l.serving);
        SpinLockRelease(&shared->mutex);
        return;
    }
    l.in_flight = true;
    l.started = now;
    SpinLockAcquire(&shared->mutex);
    if (!shared->probe_in_flight) shared->probe_started = now;  // since the oldest unanswered
    shared->probe_in_flight = true;
    SpinLockRelease(&shared->mutex);
}

}  // namespace

void cmk_watchdog_main(Datum) {
    // SIGTERM (every shutdown, smart, fast or immediate's first step) ends the loop
    // quietly: no FATAL line in a clean shutdown (issue 18).
    pqsignal(SIGHUP, SignalHandlerForConfigReload);
    pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
    BackgroundWorkerUnblockSignals();

    SpinLockAcquire(&shared->mutex);
    shared->worker_pid = MyProcPid;
    shared->worker_latch = MyLatch;
    SpinLockRelease(&shared->mutex);

    audit_as_watchdog();
    Loop l;
    l.names = key_names();
    l.next_due = GetCurrentTimestamp();
    for (;;) {
        CHECK_FOR_INTERRUPTS();
        // Exit code 1: the postmaster restarts a worker it did not stop itself (someone
        // ran pg_terminate_backend on it); in a shutdown it just notes the exit.
        if (ShutdownRequestPending) proc_exit(1);
        if (ConfigReloadPending) {
            ConfigReloadPending = false;
            ProcessConfigFile(PGC_SIGHUP);
        }

        TimestampTz now = GetCurrentTimestamp();
        SpinLockAcquire(&shared->mutex);
        bool requested = shared->requested > shared->completed;
        SpinLockRelease(&shared->mutex);
        if (!l.in_flight && (now >= l.next_due || requested)) start_one_probe(l, now);

        long wait_ms;
        if (l.in_flight || l.hung) {
            // Poll the probe, and abandoned ones for a revocation: the threads call
            // nothing of PostgreSQL, not even SetLatch.
            Finished fin;
            bool done = take_finished(&fin);
            now = GetCurrentTimestamp();
            if (done) {
                finish_probe(l, fin, now);
                continue;  // a check_key_now() may have arrived meanwhile
            }
            if (l.in_flight) {
                if (now >= TimestampTzPlusMilliseconds(l.started, (int64) probe_timeout_s * 1000))
                    probe_overdue(l, now);
            } else {
                // Between probes of a hang: the outage policy's grace runs out on time.
                note_hung_probes(l);
                char detail[512];
                SpinLockAcquire(&shared->mutex);
                bool unavailable = shared->state == WS_UNAVAILABLE;
                strlcpy(detail, shared->last_result, sizeof detail);
                SpinLockRelease(&shared->mutex);
                if (unavailable) enforce_outage_policy(l, now, detail);
            }
            wait_ms = 100;
        } else {
            long secs;
            int usecs;
            TimestampDifference(now, l.next_due, &secs, &usecs);
            wait_ms = Max(1L, Min(secs * 1000 + usecs / 1000, (long) check_interval_s * 1000));
        }
        (void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, wait_ms, PG_WAIT_EXTENSION);
        ResetLatch(MyLatch);
    }
}

// ---- SQL ----------------------------------------------------------------------------------

namespace {
void require_shared(void) {
    if (!shared)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("cmk_lakebase: the watchdog is not running in this server"),
                        errhint("Add cmk_lakebase to shared_preload_libraries and restart.")));
}
}  // namespace

extern "C" Datum cmk_watchdog_status(PG_FUNCTION_ARGS) {
    require_shared();
    WatchdogShared snap;
    SpinLockAcquire(&shared->mutex);
    memcpy(&snap, shared, sizeof snap);
    SpinLockRelease(&shared->mutex);
    KeyNames names = key_names();

    TupleDesc tupdesc;
    if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("return type must be a row type")));
    Datum values[14];
    bool nulls[14] = {false};
    TimestampTz now = GetCurrentTimestamp();
    values[0] = CStringGetTextDatum(state_name(snap.state));
    values[1] = CStringGetTextDatum(names.provider);
    values[2] = CStringGetTextDatum(names.key_id);
    if (snap.checks) values[3] = TimestampTzGetDatum(snap.last_check); else nulls[3] = true;
    values[4] = CStringGetTextDatum(snap.last_result);
    values[5] = Int32GetDatum(snap.consecutive_failures);
    values[6] = TimestampTzGetDatum(snap.last_ok);
    Interval* since = (Interval*) palloc0(sizeof(Interval));
    since->time = now - snap.last_ok;
    values[7] = IntervalPGetDatum(since);
    if (snap.checks) values[8] = TimestampTzGetDatum(snap.next_check); else nulls[8] = true;
    const char* action;
    char buf[128];
    if (snap.state == WS_REVOKED)
        action = "immediate shutdown";
    else if (snap.state == WS_UNAVAILABLE && on_kms_outage == OUTAGE_SHUTDOWN) {
        snprintf(buf, sizeof buf, "shutdown at %s",
                 timestamptz_to_str(TimestampTzPlusMilliseconds(snap.last_ok, (int64) kms_outage_grace_s * 1000)));
        action = buf;
    } else if (snap.state == WS_UNAVAILABLE)
        action = "continue (on_kms_outage = continue)";
    else
        action = "none";
    values[9] = CStringGetTextDatum(action);
    if (snap.worker_pid) values[10] = Int32GetDatum(snap.worker_pid); else nulls[10] = true;
    values[11] = Int64GetDatum(snap.checks);
    values[12] = BoolGetDatum(snap.probe_in_flight);
    if (snap.probe_in_flight) values[13] = TimestampTzGetDatum(snap.probe_started); else nulls[13] = true;
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

extern "C" Datum cmk_check_key_now(PG_FUNCTION_ARGS) {
    require_shared();
    SpinLockAcquire(&shared->mutex);
    int64 mine = ++shared->requested;
    Latch* latch = shared->worker_latch;
    SpinLockRelease(&shared->mutex);
    if (latch) SetLatch(latch);
    for (int i = 0; i < 300; i++) {
        SpinLockAcquire(&shared->mutex);
        bool done = shared->completed >= mine;
        int state = shared->state;
        latch = shared->worker_latch;
        SpinLockRelease(&shared->mutex);
        if (done) PG_RETURN_TEXT_P(cstring_to_text(state_name(state)));
        if (latch && i % 20 == 19) SetLatch(latch);  // a restarted worker has a new latch
        CHECK_FOR_INTERRUPTS();
        (void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 100, PG_WAIT_EXTENSION);
        ResetLatch(MyLatch);
    }
    ereport(ERROR, (errcode(ERRCODE_QUERY_CANCELED),
                    errmsg("cmk_lakebase: the watchdog did not complete a check within 30 seconds"),
                    errhint("See watchdog_status() and the server log.")));
    PG_RETURN_NULL();
}
