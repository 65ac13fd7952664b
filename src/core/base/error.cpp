// The one table that maps an error category to how it is reported (error.hpp): the
// SQLSTATE a SQL function raises, the pg_cmk exit code. Keeping it in one place is the
// point: a new category is one row here, never a new switch in each caller.
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

}  // namespace cmk
