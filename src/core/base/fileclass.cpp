// File classes (fileclass.hpp, DESIGN §4): pure string rules deciding, from a path
// relative to the data directory, whether a file is ciphertext at rest and under which
// kind of key. Anything not recognised is plaintext; the plaintext list is part of the
// threat model (docs/threat-model.md), so a new PostgreSQL file that holds user data must be added
// here explicitly.
#include "cmk_lakebase/base/fileclass.hpp"

#include <vector>

namespace cmk {

const char* file_class_name(FileClass c) {
    switch (c) {
        case FileClass::Plaintext: return "plaintext";
        case FileClass::Relation: return "relation";
        case FileClass::Wal: return "wal";
        case FileClass::Slru: return "slru";
        case FileClass::TwoPhase: return "twophase";
        case FileClass::TempFile: return "temp_file";
        case FileClass::TempRelation: return "temp_relation";
        case FileClass::Spill: return "spill";
        case FileClass::Notify: return "notify";
        case FileClass::ExtensionState: return "extension_state";
        case FileClass::ExtensionTemp: return "extension_temp";
    }
    return "unknown";
}

bool is_encrypted(FileClass c) { return c != FileClass::Plaintext; }

bool is_durable(FileClass c) {
    return c == FileClass::Relation || c == FileClass::Wal || c == FileClass::Slru ||
           c == FileClass::TwoPhase || c == FileClass::ExtensionState;
}

bool is_ephemeral(FileClass c) {
    return c == FileClass::TempFile || c == FileClass::TempRelation || c == FileClass::Spill ||
           c == FileClass::Notify || c == FileClass::ExtensionTemp;
}

bool locks_whole_file(FileClass c) { return c == FileClass::ExtensionState || c == FileClass::ExtensionTemp; }

namespace {

std::vector<std::string> split(const std::string& p) {
    std::vector<std::string> out;
    size_t i = 0;
    while (i <= p.size()) {
        size_t j = p.find('/', i);
        if (j == std::string::npos) j = p.size();
        if (j > i) out.push_back(p.substr(i, j - i));
        i = j + 1;
    }
    return out;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }
bool is_hex(char c) {
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

bool all_digits(const std::string& s, size_t from = 0, size_t to = std::string::npos) {
    if (to == std::string::npos) to = s.size();
    if (from >= to) return false;
    for (size_t i = from; i < to; i++)
        if (!is_digit(s[i])) return false;
    return true;
}

bool all_hex(const std::string& s) {
    if (s.empty()) return false;
    for (char c : s)
        if (!is_hex(c)) return false;
    return true;
}

bool starts_with(const std::string& s, const char* prefix) {
    return s.compare(0, std::char_traits<char>::length(prefix), prefix) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// <digits>[_fsm|_vm|_init][.<digits>] starting at position pos of s.
bool relfile_tail(const std::string& s, size_t pos) {
    size_t i = pos;
    while (i < s.size() && is_digit(s[i])) i++;
    if (i == pos) return false;
    for (const char* fork : {"_fsm", "_vm", "_init"}) {
        if (s.compare(i, std::char_traits<char>::length(fork), fork) == 0) {
            i += std::char_traits<char>::length(fork);
            break;
        }
    }
    if (i == s.size()) return true;
    if (s[i] != '.') return false;
    return all_digits(s, i + 1);
}

bool is_relfile(const std::string& s) { return relfile_tail(s, 0); }

// t<backend>_<relfilenode>[fork][.seg]
bool is_temp_relfile(const std::string& s) {
    if (s.size() < 4 || s[0] != 't') return false;
    size_t i = 1;
    while (i < s.size() && is_digit(s[i])) i++;
    if (i == 1 || i >= s.size() || s[i] != '_') return false;
    return relfile_tail(s, i + 1);
}

// PG_<major>_<catversion>, the per-version directory inside a tablespace.
bool is_tblspc_version_dir(const std::string& s) {
    if (!starts_with(s, "PG_")) return false;
    size_t us = s.find('_', 3);
    if (us == std::string::npos) return false;
    return all_digits(s, 3, us) && all_digits(s, us + 1);
}

// Files inside a database directory (base/<db>/x or pg_tblspc/<oid>/<ver>/<db>/x).
FileClass classify_db_file(const std::string& f) {
    if (is_relfile(f)) return FileClass::Relation;
    // 17+: a relation file of an incremental backup (pg_basebackup --incremental): a
    // header of block numbers, then the blocks changed since the prior backup.
    if (starts_with(f, "INCREMENTAL.") && relfile_tail(f, 12)) return FileClass::Relation;
    if (is_temp_relfile(f)) return FileClass::TempRelation;
    return FileClass::Plaintext;  // PG_VERSION, pg_filenode.map, pg_internal.init
}

bool is_wal_segment_name(const std::string& f) {
    if (f.size() == 24) return all_hex(f);
    if (f.size() == 24 + 8 && ends_with(f, ".partial")) return all_hex(f.substr(0, 24));
    return false;
}

bool has_pgsql_tmp(const std::vector<std::string>& c, size_t from) {
    for (size_t i = from; i < c.size(); i++)
        if (starts_with(c[i], "pgsql_tmp")) return true;
    return false;
}

}  // namespace

FileClass classify_relative(const std::string& rel) {
    std::vector<std::string> c = split(rel);
    if (c.empty()) return FileClass::Plaintext;
    const std::string& top = c[0];
    size_t n = c.size();

    if (top == "base") {
        // base/pgsql_tmp/... (temp files and shared fileset directories)
        if (has_pgsql_tmp(c, 1)) return FileClass::TempFile;
        if (n == 3 && all_digits(c[1])) return classify_db_file(c[2]);
        return FileClass::Plaintext;
    }
    if (top == "global") {
        if (n == 2) return classify_db_file(c[1]);  // pg_control, pg_filenode.map: plaintext
        return FileClass::Plaintext;
    }
    if (top == "pg_tblspc") {
        // pg_tblspc/<oid>/PG_15_<cat>/<db>/<relfile>, .../PG_15_<cat>/pgsql_tmp/...
        if (n >= 4 && all_digits(c[1]) && is_tblspc_version_dir(c[2])) {
            if (has_pgsql_tmp(c, 3)) return FileClass::TempFile;
            if (n == 5 && all_digits(c[3])) return classify_db_file(c[4]);
        }
        return FileClass::Plaintext;
    }
    if (top == "pg_wal") {
        // archive_status/*; 17+: summaries/*.summary (WAL summaries: the relation file
        // numbers and block numbers a range of WAL changed, no row data)
        if (n != 2) return FileClass::Plaintext;
        const std::string& f = c[1];
        if (is_wal_segment_name(f)) return FileClass::Wal;
        if (starts_with(f, "xlogtemp.") && all_digits(f, 9)) return FileClass::Wal;
        if (f == "RECOVERYXLOG") return FileClass::Wal;
        return FileClass::Plaintext;  // *.history, *.backup, RECOVERYHISTORY
    }
    if (top == "pg_xact" || top == "pg_subtrans" || top == "pg_commit_ts" || top == "pg_serial")
        return n == 2 ? FileClass::Slru : FileClass::Plaintext;
    if (top == "pg_multixact") {
        if (n == 3 && (c[1] == "offsets" || c[1] == "members")) return FileClass::Slru;
        return FileClass::Plaintext;
    }
    if (top == "pg_notify") return n == 2 ? FileClass::Notify : FileClass::Plaintext;
    if (top == "pg_replslot") {
        if (n == 3 && ends_with(c[2], ".spill")) return FileClass::Spill;
        return FileClass::Plaintext;  // state, directories
    }
    if (top == "pg_twophase") {
        if (n == 2 && all_hex(c[1])) return FileClass::TwoPhase;
        return FileClass::Plaintext;
    }
    // pg_stat_statements (contrib): statement texts, with the literals of utility
    // statements. Its dump file is written as .tmp and renamed; PostgreSQL's own
    // statistics files beside them (pgstat.stat: counters keyed by OID, replication
    // slot names) stay plaintext.
    if (top == "pg_stat" && n == 2 &&
        (c[1] == "pg_stat_statements.stat" || c[1] == "pg_stat_statements.stat.tmp"))
        return FileClass::ExtensionState;
    if (top == "pg_stat_tmp" && n == 2 && c[1] == "pgss_query_texts.stat") return FileClass::ExtensionTemp;
    return FileClass::Plaintext;
}

bool other_version_tablespace_dir(const std::string& rel, const std::string& major) {
    std::vector<std::string> c = split(rel);
    if (c.size() != 3 || c[0] != "pg_tblspc" || !all_digits(c[1]) || !is_tblspc_version_dir(c[2])) return false;
    return !major.empty() && c[2].compare(0, 4 + major.size(), "PG_" + major + "_") != 0;
}

uint32_t database_of(const std::string& rel) {
    if (classify_relative(rel) != FileClass::Relation) return 0;
    std::vector<std::string> c = split(rel);
    // Shapes checked by classify_relative; global/<relfile> (shared catalogs) is no database's.
    if (c[0] != "base" && c[0] != "pg_tblspc") return 0;
    const std::string& db = c[0] == "base" ? c[1] : c[3];
    if (db.size() > 10) return 0;
    unsigned long long v = std::stoull(db);
    return v <= 0xffffffffULL ? uint32_t(v) : 0;
}

std::string normalize_path(const std::string& p) {
    if (p.empty()) return "";
    bool absolute = p[0] == '/';
    std::vector<std::string> out;
    for (std::string& comp : split(p)) {
        if (comp == ".") continue;
        if (comp == "..") {
            if (!out.empty() && out.back() != "..") {
                out.pop_back();
            } else if (!absolute) {
                out.push_back("..");
            }
            // "/.." is "/"
            continue;
        }
        out.push_back(std::move(comp));
    }
    std::string r = absolute ? "/" : "";
    for (size_t i = 0; i < out.size(); i++) {
        if (i) r += '/';
        r += out[i];
    }
    if (r.empty()) r = ".";
    return r;
}

}  // namespace cmk
