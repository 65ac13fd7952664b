// File classes (DESIGN §4): which files under a data directory are ciphertext at rest
// and under which kind of key. Classification is by the path relative to the data
// directory ("base/5/16384.1", "pg_tblspc/16390/PG_15_202209061/5/16391"); pure
// string logic, no I/O.
#pragma once

#include <cstdint>
#include <string>

namespace cmk {

enum class FileClass : uint8_t {
    Plaintext = 0,     // documented plaintext list (and anything outside the data directory)
    Relation = 1,      // base/*/*, global/*, tablespaces: DEK per segment
    Wal = 2,           // pg_wal segments, xlogtemp.*, .partial, RECOVERYXLOG: DEK per segment
    Slru = 3,          // pg_xact, pg_multixact/*, pg_subtrans, pg_commit_ts, pg_serial: DEK per file
    TwoPhase = 4,      // pg_twophase/*: DEK per file
    TempFile = 5,      // pgsql_tmp*: per-boot key
    TempRelation = 6,  // t<backend>_<relfilenode>*: per-boot key
    Spill = 7,         // pg_replslot/*/*.spill: per-boot key
    Notify = 8,        // pg_notify/*: per-boot key
    // Files other PostgreSQL modules keep under the data directory that hold statement
    // texts (docs/threat-model.md, "Files of other extensions"): pg_stat_statements'
    // dump file, kept across restarts (DEK per file) ...
    ExtensionState = 9,  // pg_stat/pg_stat_statements.stat[.tmp]
    // ... and its query-text file, rewritten at every start (per-boot key). Written by
    // several backends at once at unaligned offsets: I/O on it locks the whole file.
    ExtensionTemp = 10,  // pg_stat_tmp/pgss_query_texts.stat
};
constexpr uint8_t kLastFileClass = static_cast<uint8_t>(FileClass::ExtensionTemp);

const char* file_class_name(FileClass c);
// Durable classes have a DEK in the key map; ephemeral classes derive theirs from
// the per-boot key; plaintext has none.
bool is_encrypted(FileClass c);
bool is_durable(FileClass c);
bool is_ephemeral(FileClass c);
// Files that several processes write at unaligned offsets at the same time: every read
// and write takes a lock over the whole file (its last unit's length changes as it grows).
bool locks_whole_file(FileClass c);

// rel: path relative to the data directory, lexically normalized (no "." or ".."
// components, no leading or doubled '/'). Tablespace files must be given in their
// "pg_tblspc/<oid>/..." form.
FileClass classify_relative(const std::string& rel);

// A tablespace's per-version directory ("pg_tblspc/<oid>/PG_<major>_<catversion>") of
// a major version other than `major` ("17"): it belongs to another cluster. pg_upgrade
// puts the new cluster's directory beside the old one's in the same location, and the
// old one stays until the old cluster is deleted. Walks of a data directory skip it.
bool other_version_tablespace_dir(const std::string& rel, const std::string& major);

// The database a relation file belongs to: the <db> of base/<db>/<relfile> and of
// pg_tblspc/<oid>/PG_<ver>/<db>/<relfile>; 0 for anything else (shared catalogs in
// global/, WAL, SLRU, temp files). How the layer routes a file to its database's key
// map (a database bound to its own key configuration).
uint32_t database_of(const std::string& rel);

// Lexical normalization of a path (collapses "//", "/./", "dir/../"); keeps it
// absolute or relative as given. Returns "" for an empty path.
std::string normalize_path(const std::string& p);

}  // namespace cmk
