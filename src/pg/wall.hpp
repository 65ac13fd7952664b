// The wall between C++ and PostgreSQL (issue 15; STYLE.md, pg_duckdb's two guards).
// PostgreSQL reports an error with a longjmp, which skips C++ destructors; C++ throws,
// which no PostgreSQL frame can catch. So the two worlds meet only here:
//
//  - call_cpp() / try_cpp(): every SQL function, hook and worker enters C++ through
//    them. They catch every exception into a Failure (plain C: message, detail, hint,
//    SQLSTATE, worded from the error's category in wall.cpp); call_cpp() raises it only
//    once every C++ object of the call is gone.
//  - pg_call(): every PostgreSQL function C++ code calls that may ereport (palloc,
//    pstrdup, text and jsonb conversion) runs inside PG_TRY through it; an error comes
//    back as a PgError thrown outside PG_CATCH, carrying the PostgreSQL error as it was
//    (call_cpp raises it again unchanged). Nothing is ever thrown inside PG_TRY.
//
// What a lambda given to call_cpp or try_cpp captures must be trivially destructible
// (references, pointers, plain values): its closure is still alive when the failure is
// raised. Checked at compile time.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "cmk_lakebase/base/error.hpp"

extern "C" {
#include "postgres.h"
}

namespace cmk::pg {

// A C++ failure carried across the wall as plain data.
struct Failure {
    bool failed = false;
    cmk::ErrorCategory category = cmk::ErrorCategory::Internal;
    int sqlstate = 0;
    char message[1024] = {0};
    char detail[1024] = {0};
    char hint[512] = {0};
};

// Words an exception into f. `op` names the operation a SQL function performs ("rotate
// the KEK"): the message then says what could not be done and why, by category. With
// op == nullptr the error is reported as it is (message, detail, hint of the error).
void describe(const std::exception& e, const char* op, Failure* f) noexcept;
void describe_unknown(const char* op, Failure* f) noexcept;

// ereport(elevel) of a failure; elevel is ERROR or above.
[[noreturn]] void raise_failure(const Failure& f, int elevel = ERROR);

// Runs fn; false (and f filled) if it threw.
template <typename F>
bool try_cpp(const char* op, F&& fn, Failure* f) noexcept {
    static_assert(std::is_trivially_destructible_v<std::decay_t<F>>,
                  "capture only references and plain values across the wall");
    try {
        fn();
        return true;
    } catch (const std::exception& e) {
        describe(e, op, f);
    } catch (...) {
        describe_unknown(op, f);
    }
    return false;
}

// Runs fn; a failure is raised at elevel once fn's objects are gone.
template <typename F>
void call_cpp(const char* op, F&& fn, int elevel = ERROR) {
    Failure f;
    if (!try_cpp(op, std::forward<F>(fn), &f)) raise_failure(f, elevel);
}

// Runs fn where nothing may fail (GUC assign hooks, audit lines on the way to a
// refusal): a failure is dropped. False if fn threw.
template <typename F>
bool quietly(F&& fn) noexcept {
    Failure ignored;
    return try_cpp(nullptr, std::forward<F>(fn), &ignored);
}

// A PostgreSQL error met by C++ code, as PostgreSQL reported it.
struct PgError : cmk::Error {
    PgError(int code, const std::string& msg, std::string d, std::string h)
        : cmk::Error(cmk::ErrorCategory::Internal, msg, std::move(d), std::move(h)), sqlstate(code) {}
    int sqlstate;
};

// In PG_CATCH: the error, copied into ctx, with the error state flushed.
ErrorData* take_pg_error(MemoryContext ctx);
// Throws the error (take_pg_error's copy, freed here) as a PgError.
[[noreturn]] void throw_pg_error(ErrorData* edata);

// Calls the PostgreSQL function fn(args...) from C++ and returns its result. Arguments
// and result are plain values, so the longjmp skips no destructor.
template <typename R, typename... P, typename... A>
R pg_call(R (*fn)(P...), A... args) {
    static_assert(std::is_trivially_copyable_v<R> && (std::is_trivially_copyable_v<A> && ...),
                  "plain arguments and results only");
    MemoryContext ctx = CurrentMemoryContext;
    ErrorData* volatile edata = nullptr;
    R volatile result{};
    PG_TRY();
    { result = fn(args...); }
    PG_CATCH();
    { edata = take_pg_error(ctx); }
    PG_END_TRY();
    if (edata) throw_pg_error(edata);
    return result;
}

}  // namespace cmk::pg
