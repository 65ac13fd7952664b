// The WAL key scheme's pure parts (docs/backups.md, "The WAL key scheme"), shared by the
// file layer (src/fs) and pg_cmk (src/cli: a base backup re-keys the WAL it streamed).
// A segment's key is derived from the cluster's WAL master key and the segment's place
// in the WAL; unit 0 keeps PostgreSQL's long page header (kWalHead bytes) in plaintext,
// marked with kWalMarkBit in xlp_info, the rest of every unit is AES-256-XTS.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "cmk_lakebase/base/crypto.hpp"

namespace cmk {

constexpr const char* kWalMasterId = "cmk_lakebase/wal-master";
constexpr size_t kWalHead = 40;        // SizeOfXLogLongPHD on every 64-bit platform
constexpr uint8_t kWalMarkBit = 0x40;  // byte 3 of unit 0: xlp_info bit 0x4000, unused by PostgreSQL

// What a segment's key is derived from: its place in the WAL (the last 16 hex digits of
// its name), not its timeline. The first segment of a new timeline begins with a copy
// of the old timeline's segment, whose page headers keep the old timeline, so the
// header of a restored file names the place reliably and the timeline not.
inline std::string wal_key_id(const std::string& segment) { return segment.size() == 24 ? segment.substr(8) : segment; }

// The 64-byte XTS key of a segment (24 hex digits) under a WAL master key.
SecureBytes wal_segment_key(const uint8_t* master, size_t n, const std::string& segment);

// Unit 0 of a segment, n bytes (kWalHead + 16 <= n <= kUnitSize): the header copied
// with the mark set (enc) or cleared, the rest XTS with tweak 0. Throws
// std::runtime_error when encrypting a unit that already carries the mark or
// decrypting one that does not (plaintext WAL in an encrypted cluster).
void wal_crypt_head(XtsCipher& c, bool enc, const uint8_t* p, uint8_t* q, size_t n);

// Re-encrypts a WAL segment file in place from one master key to another (the
// segment's key under each), unit by unit; units of zeros stay zeros. fsyncs it.
// Throws std::runtime_error naming the file.
void wal_rekey_file(const std::string& path, const std::string& segment, const SecureBytes& from_master,
                    const SecureBytes& to_master);

}  // namespace cmk
