// The wall's C++ half (wall.hpp): how a failure is worded for the SQL functions, from
// the one category table (src/core/base/error.cpp) that also gives pg_cmk's exit
// codes and the watchdog's reading of a failed probe. The SQLSTATE is the category's;
// the message, detail and hint take one of a few forms, by category. The texts are the
// ones users and tests have always seen.
#include <cstring>
#include <exception>
#include <string>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/fs/io.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "utils/elog.h"
}

namespace cmk::pg {

namespace {

void put(char* dst, size_t size, const std::string& s) {
    strlcpy(dst, s.c_str(), size);
}

int sqlstate_of(ErrorCategory c) {
    const char* s = category_info(c).sqlstate;
    return MAKE_SQLSTATE(s[0], s[1], s[2], s[3], s[4]);
}

// "key "K" of provider "P"", from the layer's view, for failures that name no key.
std::string current_key() {
    std::string key, provider;
    try {
        cmk::fs::LayerInfo i = cmk::fs::info();
        key = i.key_id;
        provider = i.provider;
    } catch (const std::exception&) {
    }
    return "key \"" + key + "\" of provider \"" + provider + "\"";
}

void describe_op(const std::exception& e, const char* op, Failure* f) {
    const auto* ce = dynamic_cast<const Error*>(&e);
    std::string detail = ce ? ce->detail : "", hint = ce ? ce->hint : "";
    std::string could_not = std::string("cmk_lakebase: could not ") + op;
    ErrorCategory c = f->category;
    // Damaged covers the crypto and KMIP codec errors too (pg_cmk exits 1 for them
    // either way); in a SQL function only a damaged key file is reported as such.
    if (c == ErrorCategory::Damaged && !dynamic_cast<const KeyringError*>(&e) &&
        !dynamic_cast<const KeyMapError*>(&e))
        c = ErrorCategory::Internal;
    f->sqlstate = sqlstate_of(c);
    switch (c) {
        case ErrorCategory::State:  // the layer's own words
            put(f->message, sizeof f->message, e.what());
            put(f->detail, sizeof f->detail, detail);
            put(f->hint, sizeof f->hint, hint);
            return;
        case ErrorCategory::Invalid:
        case ErrorCategory::NotFound:
        case ErrorCategory::Exists:
        case ErrorCategory::Conflict:  // the message names the field or the object
            if (hint.empty() && dynamic_cast<const KmsError*>(&e))
                hint = "Correct the key configuration; nothing was changed.";
            put(f->message, sizeof f->message, std::string("cmk_lakebase: ") + e.what());
            put(f->detail, sizeof f->detail, detail);
            put(f->hint, sizeof f->hint, hint);
            return;
        case ErrorCategory::KeyUnavailable:
            put(f->message, sizeof f->message, could_not + ": the key provider is unavailable");
            put(f->detail, sizeof f->detail, std::string("The key provider said: ") + e.what());
            put(f->hint, sizeof f->hint,
                "Nothing was changed; the cluster keeps running on its current keys. Try again once the key "
                "provider is reachable.");
            return;
        case ErrorCategory::KeyRevoked:
            put(f->message, sizeof f->message, could_not + ": the key provider refused");
            put(f->detail, sizeof f->detail, std::string("The key provider said: ") + e.what());
            put(f->hint, sizeof f->hint,
                "Nothing was changed. Check that the key is enabled and this cluster may use it.");
            return;
        case ErrorCategory::Damaged:
            put(f->message, sizeof f->message, could_not + " with " + current_key());
            put(f->detail, sizeof f->detail, e.what());
            put(f->hint, sizeof f->hint, "Restore cmk_lakebase/ from a backup taken together with the data directory.");
            return;
        default:  // Internal, and what no SQL function meets (Usage, NotSupported)
            put(f->message, sizeof f->message, could_not + " with " + current_key());
            put(f->detail, sizeof f->detail, e.what());
            f->hint[0] = 0;
            return;
    }
}

}  // namespace

void describe(const std::exception& e, const char* op, Failure* f) noexcept {
    f->failed = true;
    f->category = category_of(e);
    f->message[0] = f->detail[0] = f->hint[0] = 0;
    try {
        if (auto* pe = dynamic_cast<const PgError*>(&e)) {  // back out as it came in
            f->sqlstate = pe->sqlstate;
            put(f->message, sizeof f->message, pe->what());
            put(f->detail, sizeof f->detail, pe->detail);
            put(f->hint, sizeof f->hint, pe->hint);
        } else if (!op) {
            // _PG_init, the status functions and the watchdog: the error's own words,
            // under 55000 as these functions have always reported every failure.
            const auto* ce = dynamic_cast<const Error*>(&e);
            f->sqlstate = ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
            put(f->message, sizeof f->message, e.what());
            if (ce) {
                put(f->detail, sizeof f->detail, ce->detail);
                put(f->hint, sizeof f->hint, ce->hint);
            }
        } else {
            describe_op(e, op, f);
        }
    } catch (...) {  // no memory to word it: the bare message
        f->sqlstate = ERRCODE_INTERNAL_ERROR;
        strlcpy(f->message, e.what(), sizeof f->message);
        f->detail[0] = f->hint[0] = 0;
    }
}

void describe_unknown(const char* op, Failure* f) noexcept {
    f->failed = true;
    f->category = ErrorCategory::Internal;
    f->sqlstate = ERRCODE_INTERNAL_ERROR;
    snprintf(f->message, sizeof f->message, "cmk_lakebase: could not %s: unknown C++ exception",
             op ? op : "complete the call");
    f->detail[0] = f->hint[0] = 0;
}

void raise_failure(const Failure& f, int elevel) {
    ereport(elevel, (errcode(f.sqlstate), errmsg("%s", f.message), f.detail[0] ? errdetail("%s", f.detail) : 0,
                     f.hint[0] ? errhint("%s", f.hint) : 0));
    pg_unreachable();
}

ErrorData* take_pg_error(MemoryContext ctx) {
    MemoryContextSwitchTo(ctx);
    ErrorData* edata = CopyErrorData();
    FlushErrorState();
    return edata;
}

void throw_pg_error(ErrorData* edata) {
    int code = edata->sqlerrcode;
    std::string msg = edata->message ? edata->message : "", detail = edata->detail ? edata->detail : "",
                hint = edata->hint ? edata->hint : "";
    FreeErrorData(edata);
    throw PgError(code, msg, std::move(detail), std::move(hint));
}

}  // namespace cmk::pg
