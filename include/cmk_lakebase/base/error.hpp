// One error base type for the whole project (issue 15): every failure that crosses a
// layer carries a category, a one-line message, and optionally a detail sentence and a
// hint. The category alone decides how the failure is reported everywhere it surfaces:
// the SQLSTATE a SQL function raises (src/pg's wall), the `pg_cmk` exit code, and the
// watchdog's reading of a failed probe. Pure C++: the SQLSTATE is carried as its five
// characters so that core needs no server header.
#pragma once

#include <stdexcept>
#include <string>

namespace cmk {

enum class ErrorCategory {
    Internal,        // a failure nobody foresaw (library error, bug)
    Invalid,         // bad argument or key configuration; the message names the field
    Usage,           // bad command line (pg_cmk only)
    NotFound,        // a named key configuration, database binding or file is not there
    Exists,          // it is there already
    Conflict,        // another operation holds it (concurrent change, still in use)
    State,           // not in the state the operation needs (layer off, keys wiped)
    KeyUnavailable,  // the key provider cannot answer now: timeouts, 5xx, throttling
    KeyRevoked,      // the key provider refuses: disabled, deleted, access denied
    Damaged,         // a key file or wrapped key fails to parse or to authenticate
    NotSupported,    // a route the product refuses on purpose
};

// How one category is reported; one row per category in error.cpp.
struct CategoryInfo {
    const char* name;      // "internal", "invalid", ... (logs, JSON)
    const char* sqlstate;  // five characters, e.g. "22023"
    int exit_code;         // pg_cmk: 0 is success; 1 runtime, 2 usage, 3 revoked, 4 unavailable
};
const CategoryInfo& category_info(ErrorCategory c);

struct Error : std::runtime_error {
    Error(ErrorCategory c, const std::string& msg, std::string d = "", std::string h = "")
        : std::runtime_error(msg), category(c), detail(std::move(d)), hint(std::move(h)) {}
    ErrorCategory category;
    std::string detail;  // a full sentence, or ""
    std::string hint;    // what to do next, or ""
};

// The category of any exception: Error's own, Internal for anything else.
ErrorCategory category_of(const std::exception& e);

// Text from files a user may have damaged (key ids, names) on its way into a message:
// true when it is valid UTF-8 without control characters; escape_text() writes every
// other byte as \xNN, so a message never carries raw invalid UTF-8 into a log.
bool printable_utf8(const std::string& s);
std::string escape_text(const std::string& s);

}  // namespace cmk
