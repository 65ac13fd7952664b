// The journal of `pg_cmk encrypt` (encrypt_journal.hpp): formatting and parsing of its
// lines. No I/O, so that the unit tests pin torn and damaged journals exactly.
#include "cmk_lakebase/keys/encrypt_journal.hpp"

#include <cstdio>
#include <cstdlib>

#include "cmk_lakebase/base/crypto.hpp"

namespace cmk::encrypt_journal {

namespace {

const char kMagic[] = "pg_cmk-encrypt-journal 1 ";

std::string crc_hex(const std::string& s) {
    char buf[9];
    std::snprintf(buf, sizeof buf, "%08x", crc32c(s.data(), s.size()));
    return buf;
}

[[noreturn]] void damaged(size_t line, const std::string& why) {
    throw Error(ErrorCategory::Damaged, "the pg_cmk encrypt journal is damaged at line " + std::to_string(line) +
                                            " (" + why + ")");
}

}  // namespace

std::string header(const std::string& control_sha256) { return kMagic + control_sha256 + "\n"; }

std::string record(const std::string& rel, uint64_t size) {
    if (rel.empty() || rel.find('\n') != std::string::npos || rel.find('\0') != std::string::npos)
        throw Error(ErrorCategory::Invalid, "cannot journal the path \"" + rel + "\" (empty, or a newline in it)");
    std::string body = std::to_string(size) + " " + rel;
    return crc_hex(body) + " " + body + "\n";
}

Parsed parse(const std::string& text) {
    Parsed p;
    size_t pos = 0, line = 0;
    while (pos < text.size()) {
        size_t nl = text.find('\n', pos);
        if (nl == std::string::npos) {  // torn last line
            p.torn_tail = true;
            break;
        }
        ++line;
        std::string l = text.substr(pos, nl - pos);
        if (line == 1) {
            const size_t m = sizeof kMagic - 1;
            if (l.compare(0, m, kMagic) != 0 || l.size() != m + 64) damaged(line, "not a journal header");
            p.control_sha256 = l.substr(m);
        } else {
            // <crc8> <size> <rel>
            if (l.size() < 12 || l[8] != ' ') damaged(line, "malformed record");
            std::string crc = l.substr(0, 8), body = l.substr(9);
            if (crc_hex(body) != crc) damaged(line, "checksum mismatch");
            size_t sp = body.find(' ');
            if (sp == std::string::npos || sp == 0 || sp + 1 >= body.size()) damaged(line, "malformed record");
            uint64_t size = 0;
            for (size_t i = 0; i < sp; i++) {
                char c = body[i];
                if (c < '0' || c > '9' || size > (UINT64_MAX - 9) / 10) damaged(line, "bad size");
                size = size * 10 + uint64_t(c - '0');
            }
            p.done[body.substr(sp + 1)] = size;
        }
        pos = nl + 1;
        p.valid_bytes = pos;
    }
    if (line == 0 && !p.torn_tail && text.empty()) return p;
    if (p.control_sha256.empty()) damaged(1, "no complete header");
    return p;
}

}  // namespace cmk::encrypt_journal
