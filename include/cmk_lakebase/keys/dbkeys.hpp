// Database bindings (issue 5, docs/CONTRACTS.md "Database bindings"): a database bound
// to a key configuration of its own has its own KEK, wrapped by its own CMK, and its
// own key map holding the DEKs of its relation files. Both live in a database key
// directory, <keyring dir>/db/<oid>/, in the same formats as the cluster's:
//   keyring.json  the database's key configuration and KEK as its KMS returned it
//                 (Keyring; its cluster_id is the cluster's), MAC'd under the
//                 database KEK. Its presence is the binding's commit point.
//   keymap        the database's key map (KeyMap), sealed under the database KEK.
// A relation file base/<oid>/... or pg_tblspc/*/<ver>/<oid>/... of a bound database
// has its key in the database's key map, every other durable file in the cluster's.
// Unbound databases (the default, and every new database) use the cluster's.
//
// bind, step order (caller holds the cluster key map's writer lock throughout, so no
// process creates a key for a file of that database in between):
//   1. a new database KEK, wrapped by the database's provider and unwrap-checked
//                                                   [bind_database:after_wrap]
//   2. db/<oid>/keymap := the database's DEKs, copied from the cluster key map and
//      sealed under the new KEK, fsync                 [bind_database:after_keymap]
//   3. db/<oid>/keyring.json written and renamed into place: COMMITTED
//                                                   [bind_database:after_keyring]
//   4. publish(KEK): from here every process of the server routes the database's
//      files to its key map
//   5. the database's entries removed from the cluster key map.
// A crash before 3 leaves a key directory without keyring.json: remove_strays() removes
// it (the cluster key map still holds every key). After 3, settle() moves whatever of
// the database is still in the cluster key map into the database's (a key created
// between a crash restart and the next full start) and removes it from the cluster's.
// No data file is rewritten: the DEKs stay the same, only what wraps them changes.
// unbind is the reverse: DEKs copied back into the cluster map
// [unbind_database:after_keymap], keyring.json removed (the commit point)
// [unbind_database:after_keyring], then the directory.
// Pure C++, no PostgreSQL.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::dbkeys {

constexpr const char* kDbDirName = "db";  // inside the keyring directory
constexpr size_t kMaxBoundDatabases = 64;

std::string dir_for(const std::string& keyring_dir, uint32_t oid);  // <keyring dir>/db/<oid>
bool is_bound(const std::string& keyring_dir, uint32_t oid);        // db/<oid>/keyring.json exists
std::vector<uint32_t> bound_databases(const std::string& keyring_dir);  // sorted

// Repairs at start (see above). remove_strays: key directories without keyring.json,
// one log line each. settle: the database's entries left in the cluster key map moved
// into db (the database's key map, open with its KEK); returns how many were left.
std::vector<std::string> remove_strays(const std::string& keyring_dir);
size_t settle(KeyMap& cluster, KeyMap& db, uint32_t oid);

struct Binding {
    Keyring keyring;
    SecureBytes kek;
    size_t moved = 0;  // DEKs now in the database's key map
};

// Steps 1 to 5 above. cfg: the configuration bound (its name becomes the keyring's
// config_name). Throws KmsError, KeyMapError, KeyringError, lifecycle::LifecycleError.
Binding bind(const std::string& keyring_dir, KeyMap& cluster, const std::string& cluster_id, uint32_t oid,
             const NamedKeyConfig& cfg, KeyProvider& provider,
             const std::function<void(const SecureBytes&)>& publish);

// An already bound database to another configuration: its KEK (in hand, verified)
// wrapped by the new provider and unwrap-checked, then keyring.json replaced
// atomically [rebind_database:after_wrap]. Nothing else changes.
Keyring rebind(const std::string& keyring_dir, uint32_t oid, const Keyring& current, const SecureBytes& kek,
               const NamedKeyConfig& cfg, KeyProvider& provider);

// The reverse of bind. db: the database's key map, open with its KEK. Returns the
// number of DEKs moved back.
size_t unbind(const std::string& keyring_dir, KeyMap& cluster, KeyMap& db, uint32_t oid);

// Removes the key directory of a database that no longer exists (dropped: its files,
// and with them its DEKs, are gone): the database KEK's wrapped copy goes too.
void forget(const std::string& keyring_dir, uint32_t oid);

}  // namespace cmk::dbkeys
