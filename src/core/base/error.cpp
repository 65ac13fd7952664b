// The one table that maps an error category to how it is reported (error.hpp): the
// SQLSTATE a SQL function raises, the pg_cmk exit code. Keeping it in one place is the
// point: a new category is one row here, never a new switch in each caller.
#include <cstdio>
#include "cmk_lakebase/base/error.hpp"

namespace cmk {

const CategoryInfo& category_info(ErrorCategory c) {
    // SQLSTATEs as PostgreSQL names them: XX000 internal_error, 22023
    // invalid_parameter_value, 42704 undefined_object, 42710 duplicate_object, 55006
    // object_in_use, 55000 object_not_in_prerequisite_state, 08006 connection_failure,
    // XX001 data_corrupted, 0A000 feature_not_supported.
    static const CategoryInfo table[] = {
        {"internal", "XX000", 1},        {"invalid", "22023", 1},
        {"usage", "22023", 2},           {"not_found", "42704", 1},
        {"exists", "42710", 1},          {"conflict", "55006", 1},
        {"state", "55000", 1},           {"key_unavailable", "08006", 4},
        {"key_revoked", "55000", 3},     {"damaged", "XX001", 1},
        {"not_supported", "0A000", 1},
    };
    static_assert(sizeof table / sizeof table[0] == size_t(ErrorCategory::NotSupported) + 1,
                  "one row per category");
    return table[size_t(c)];
}

ErrorCategory category_of(const std::exception& e) {
    if (auto* ce = dynamic_cast<const Error*>(&e)) return ce->category;
    return ErrorCategory::Internal;
}

namespace {
// Length of the valid UTF-8 sequence (no overlongs, no surrogates, <= U+10FFFF) at
// s[i], or 0; a control character (C0, DEL, C1) is 0 too.
size_t utf8_len(const std::string& s, size_t i) {
    auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
    unsigned char c = b(i);
    if (c >= 0x20 && c < 0x7f) return 1;
    if (c < 0x80) return 0;
    size_t n = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 ? 2 : 0;
    if (n == 0 || c > 0xf4 || i + n > s.size()) return 0;
    for (size_t k = 1; k < n; k++)
        if ((b(i + k) & 0xc0) != 0x80) return 0;
    if (n == 3 && c == 0xe0 && b(i + 1) < 0xa0) return 0;  // overlong
    if (n == 3 && c == 0xed && b(i + 1) >= 0xa0) return 0;  // surrogate
    if (n == 4 && c == 0xf0 && b(i + 1) < 0x90) return 0;  // overlong
    if (n == 4 && c == 0xf4 && b(i + 1) >= 0x90) return 0;  // > U+10FFFF
    if (n == 2 && c == 0xc2 && b(i + 1) < 0xa0) return 0;  // C1 control
    return n;
}
}  // namespace

bool printable_utf8(const std::string& s) {
    for (size_t i = 0; i < s.size();) {
        size_t n = utf8_len(s, i);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

std::string escape_text(const std::string& s) {
    std::string out;
    for (size_t i = 0; i < s.size();) {
        size_t n = utf8_len(s, i);
        if (n == 0) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned char>(s[i]));
            out += buf;
            i++;
        } else {
            out.append(s, i, n);
            i += n;
        }
    }
    return out;
}

}  // namespace cmk
