// The journal of `pg_cmk encrypt` (the offline conversion of a plaintext cluster,
// docs/encrypt.md): which files of the source are already complete in the staging
// directory, so that a run killed at any point resumes without copying them again.
//
// Text, one record per line, appended and fsync()ed after the file it names is
// fsync()ed:
//   pg_cmk-encrypt-journal 1 <sha256 hex of the source's pg_control>
//   <crc32c hex8> <size> <relative path>
// The CRC covers "<size> <relative path>". A last line without its newline (a crash
// during the append) is torn: ignored, and cut off before the next append. A damaged
// line anywhere else, or a header of another source, is an error (the journal does not
// describe this conversion). Pure parsing and formatting here; the file I/O is the
// caller's.
#pragma once

#include <cstdint>
#include <map>
#include <string>

#include "cmk_lakebase/base/error.hpp"

namespace cmk::encrypt_journal {

struct Parsed {
    std::string control_sha256;              // from the header
    std::map<std::string, uint64_t> done;    // relative path -> size written
    size_t valid_bytes = 0;                  // length of the complete lines (truncate to this)
    bool torn_tail = false;                  // bytes after valid_bytes were dropped
};

// The header line (with its newline).
std::string header(const std::string& control_sha256);
// One record (with its newline). Throws Error(invalid) for a path with a newline.
std::string record(const std::string& rel, uint64_t size);
// Parses a whole journal. Throws Error(damaged) naming the line for a bad header or a
// bad complete line.
Parsed parse(const std::string& text);

}  // namespace cmk::encrypt_journal
