// The encrypting file layer's public face for key administration: what the watchdog
// and the key-management SQL functions call in a running server. Probes of the CMK,
// the kill switch, online rotation and re-binding, key configurations and databases
// bound to keys of their own. The I/O face (start-up, status) is io.hpp.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "cmk_lakebase/fs/io.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::fs {

// The CMK's state as the provider reports it now (one KMS call).
KeyStatus provider_status();

// The watchdog's probe (DESIGN §5): asks the provider for the CMK's state and, if it
// says enabled, unwraps the wrapped KEK and compares it (constant time) with the KEK
// in memory: a different key means the CMK was replaced, which is a revocation.
struct ProbeResult {
    KeyHealth health = KeyHealth::Unavailable;
    std::string detail;      // one line, no key material
    std::string request_id;  // the provider's, where it has one
};
ProbeResult probe_key();

// Kill switch seam: destroys every key the layer holds (KEK, DEKs in use, per-boot
// key); from then on every encrypted read or write fails with EIO.
void wipe_keys();

// ---- key lifecycle, online (issue 5; lifecycle.hpp has the step order) -----------------
// Each runs in the calling process of a running server, holds the key map's writer lock
// for its file switches, and makes the result known to every other process (shared
// memory for a new KEK; keyring.json re-read and verified on their next key use). No
// data file is rewritten and no connection is dropped. Throw LayerError (layer not
// active, keys wiped), lifecycle::LifecycleError, KmsError, KeyringError, KeyMapError.
using KeyOpResult = lifecycle::Result;  // what the step order reports, as it reports it
KeyOpResult rewrap_kek();
KeyOpResult rotate_kek();
KeyOpResult bind_cluster(const std::string& config_name);

struct KeyConfigInfo {
    std::string name;
    std::string provider;
    std::string key_id;
    std::map<std::string, std::string> options;
    std::string created_at;
    bool bound = false;
};
std::vector<KeyConfigInfo> key_configs();
void create_key_config(const std::string& name, const KeyConfig& cfg);
void drop_key_config(const std::string& name);

// ---- databases bound to key configurations of their own (dbkeys.hpp) ------------------
// bind_database: a new database KEK wrapped by the configuration's CMK, the database's
// DEKs moved into its own key map (no data file rewritten), online; for a database
// already bound, re-wraps its KEK under the new configuration (action
// "rebind_database"). unbind_database: the DEKs back under the cluster KEK. Both hold
// the cluster key map's writer lock and record an audit event. Throw LayerError,
// lifecycle::LifecycleError, KmsError, KeyMapError, KeyringError.
struct DbOpResult {
    std::string action;  // bind_database, rebind_database, unbind_database
    uint32_t oid = 0;
    std::string config_name;
    std::string provider;
    std::string key_id;
    std::string key_version;
    std::string kek_fingerprint;
    uint64_t dek_count = 0;  // DEKs moved
};
DbOpResult bind_database(uint32_t oid, const std::string& config_name);
DbOpResult unbind_database(uint32_t oid);

struct DatabaseKeyInfo {
    uint32_t oid = 0;
    std::string state;  // open, closing, locked
    std::string config_name;
    std::string provider;
    std::string key_id;
    std::string key_version;
    std::string kek_fingerprint;
    std::string bound_at;
    std::string rotated_at;
    uint64_t dek_count = 0;  // 0 when locked (unknown)
};
std::vector<DatabaseKeyInfo> database_keys();

// Connection gate: true while connections to the database must be refused (its key
// is being revoked or is not available). Cheap, no KMS call, no lock.
bool database_refused(uint32_t oid);
bool any_database_refused();

// The watchdog's probe of each bound database's CMK (as probe_key()); dropped: the
// database's directory is gone (DROP DATABASE), its binding should be forgotten.
struct DbProbe {
    uint32_t oid = 0;
    std::string state;  // open, closing, locked
    KeyHealth health = KeyHealth::Unavailable;
    std::string detail;
    std::string request_id;
    std::string config_name;
    std::string provider;
    std::string key_id;
    bool dropped = false;
};
std::vector<DbProbe> probe_databases();
// Revocation of one database, in this order (the caller terminates the sessions and
// writes out the dirty pages in between): closing (new connections refused, I/O still
// allowed), then locked (KEK wiped in shared memory; every process drops its copies
// at its next file operation, every read and write of the database's files fails).
void begin_database_revocation(uint32_t oid);
void lock_database(uint32_t oid);
// A locked database whose key is usable again: unwrapped through its provider,
// verified, open again. Throws KmsError, KeyringError.
void unlock_database(uint32_t oid);
// Forgets the binding of a dropped database (its key directory removed).
void forget_database(uint32_t oid);

// The watchdog's probe on a thread of its own (probe_thread.cpp): probe_key(), then
// (unless revoked) probe_databases(), then the configuration's names. start_probe()
// starts one unless one is still waited for, or too many abandoned ones still run
// (false); take_probe() returns the finished one's result once, or a revocation an
// abandoned probe brought back. abandon_probe(): the caller gave up on the probe past
// its deadline (its thread is left to end; the next start_probe() may start another);
// abandoned_probes() counts those still running. The thread calls nothing of
// PostgreSQL; the caller decides when a probe still running is past its deadline.
struct WatchdogProbe {
    ProbeResult cluster;
    std::vector<DbProbe> databases;
    std::string databases_error;  // probe_databases() failed: its message
    std::string provider;
    std::string key_id;
};
bool start_probe();
bool take_probe(WatchdogProbe* out);
void abandon_probe();
size_t abandoned_probes();

std::string keyring_directory();  // <datadir>/cmk_lakebase, "" when not active
// The watchdog's repeated status/unwrap answers are aggregated in the audit trail.
void set_probe_audit_aggregation(bool on);

}  // namespace cmk::fs
