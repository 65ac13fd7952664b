// The local audit trail of key events (DESIGN §5, docs/CONTRACTS.md "Audit trail"):
// every wrap, unwrap and status call to a key provider, every rotation, key
// configuration change and kill-switch action, as one JSON line each in
// <datadir>/cmk_lakebase/audit.log. Append-only (O_APPEND, one write() per line, so
// lines from concurrent processes never interleave), bounded (rotated to audit.log.1
// past a size limit; two files kept), written through cmk::sys (never through the
// encrypting layer), and never holding key material. Pure C++.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::audit {

constexpr const char* kAuditFile = "audit.log";
constexpr const char* kAuditFileOld = "audit.log.1";
constexpr uint64_t kDefaultMaxBytes = 10ull << 20;  // per file; two files kept

struct Event {
    std::string time;        // ISO 8601 UTC with milliseconds; set by record() if empty
    int64_t pid = 0;         // set by record()
    std::string actor;       // database role, "watchdog", "postmaster", "pg_cmk"; "" = the process default
    std::string action;      // wrap, unwrap, status, rewrap, rotate_kek, bind_cluster, ...
    std::string key_config;  // named key configuration ("" if none)
    std::string provider;
    std::string key_id;
    std::string key_version;
    uint32_t kek_generation = 0;
    std::string request_id;  // the KMS's, where it returns one
    std::string outcome;     // ok, revoked, unavailable, config_error, error, denied
    std::string detail;      // one line, never key material
    std::string as;          // identity the provider call ran as (assumed role, ...); "" = not said
    uint64_t count = 1;      // > 1: this many identical answers aggregated (watchdog probes)
};

// Process-wide sink: the keyring directory whose audit.log events go to. Until set,
// record() drops events.
void set_directory(const std::string& keyring_dir);
std::string directory();
void set_default_actor(const std::string& actor);
void set_max_bytes(uint64_t n);  // 0 = default

// Actor for the events recorded on this thread while the scope lives.
class ActorScope {
public:
    explicit ActorScope(const std::string& actor);
    ~ActorScope();
    ActorScope(const ActorScope&) = delete;
    ActorScope& operator=(const ActorScope&) = delete;

private:
    std::string saved_;
};

// Appends one line. Never throws; a failure is reported once on stderr.
void record(Event e);
// Same, to an explicit keyring directory (pg_cmk on an offline cluster). Throws
// std::runtime_error when the line cannot be written.
void record_to(const std::string& keyring_dir, Event e);

// Every line of audit.log.1 then audit.log, parsed; damaged lines come back with
// action "unparsable" and the text in detail.
std::vector<Event> read_all(const std::string& keyring_dir);

std::string event_to_json(const Event& e);

// A provider whose every wrap / unwrap / status call is recorded. With
// aggregate_probes (the watchdog), a status or unwrap answer equal to the previous
// one of the same kind is counted instead of written, and the count is written with
// the next line that differs or at the latest after an hour.
std::unique_ptr<KeyProvider> audited_provider(std::unique_ptr<KeyProvider> inner,
                                              const std::string& config_name, bool aggregate_probes = false);
// Turns aggregation on or off for a provider made by audited_provider (no-op otherwise).
void set_aggregate_probes(KeyProvider& p, bool on);

const char* kms_error_outcome(KmsErrorKind k);  // "config_error", "unavailable", "revoked"

}  // namespace cmk::audit
