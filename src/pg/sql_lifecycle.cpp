// The key lifecycle's SQL surface (issue 5): rewrap(), rotate_kek(), bind_cluster(),
// bind_database() and unbind_database(); the separation of duties check (superuser or
// member of cmk_admin) every key function makes; the lifecycle's settings; and the
// refusal of connections to a database whose own key is revoked. The listing functions
// are in sql_keys.cpp. The C++ work enters through the wall (wall.hpp): results come
// back in plain buffers, failures are raised once no C++ object is left.
#include <cstring>

#include "cmk_lakebase/fs/key_admin.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "module.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "libpq/auth.h"
#include "libpq/libpq-be.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/relcache.h"

PG_FUNCTION_INFO_V1(cmk_rewrap);
PG_FUNCTION_INFO_V1(cmk_rotate_kek);
PG_FUNCTION_INFO_V1(cmk_bind_cluster);
PG_FUNCTION_INFO_V1(cmk_bind_database);
PG_FUNCTION_INFO_V1(cmk_unbind_database);
}

namespace {
bool enable_test_hooks = false;
ClientAuthentication_hook_type prev_client_auth_hook = NULL;
void refuse_locked_database(Port* port, int status);
char* test_crash_at = nullptr;
int audit_max_size_kb = 10240;
}  // namespace

// Separation of duties: key management is for superusers and members of cmk_admin
// (who need no privilege on any user data). Also refuses, with an audit line, callers
// that were granted EXECUTE some other way.
void require_key_admin(const char* fn) {
    Oid admin = get_role_oid("cmk_admin", true);
    if (superuser() || (OidIsValid(admin) && has_privs_of_role(GetUserId(), admin))) return;
    const char* user = GetUserNameFromId(GetUserId(), false);
    cmk::pg::quietly([&] {
        cmk::audit::Event e;
        e.actor = user;
        e.action = fn;
        e.outcome = "denied";
        e.detail = "not a superuser nor a member of cmk_admin";
        cmk::audit::record(e);
    });
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to manage the keys of cmk_lakebase (%s)", fn),
                    errdetail("Only superusers and members of role \"cmk_admin\" may call %s().", fn),
                    errhint("A superuser can run: GRANT cmk_admin TO %s;", quote_identifier(user))));
}

namespace {

struct OpRow {
    char action[32], config[128], provider[64], key_id[256], ver_before[64], ver[64], fp[80];
    int32 gen_before, gen;
    bool finished;
};

Datum op_row(FunctionCallInfo fcinfo, const OpRow& r) {
    TupleDesc tupdesc;
    if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("return type must be a row type")));
    Datum v[10];
    bool n[10] = {false};
    v[0] = CStringGetTextDatum(r.action);
    v[1] = CStringGetTextDatum(r.config);
    v[2] = CStringGetTextDatum(r.provider);
    v[3] = CStringGetTextDatum(r.key_id);
    if (r.ver_before[0])
        v[4] = CStringGetTextDatum(r.ver_before);
    else
        n[4] = true;
    if (r.ver[0])
        v[5] = CStringGetTextDatum(r.ver);
    else
        n[5] = true;
    v[6] = Int32GetDatum(r.gen_before);
    v[7] = Int32GetDatum(r.gen);
    v[8] = CStringGetTextDatum(r.fp);
    v[9] = BoolGetDatum(r.finished);
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, v, n)));
}

void fill_row(const cmk::fs::KeyOpResult& k, OpRow* r) {
    strlcpy(r->action, k.action.c_str(), sizeof r->action);
    strlcpy(r->config, k.config_name.c_str(), sizeof r->config);
    strlcpy(r->provider, k.provider.c_str(), sizeof r->provider);
    strlcpy(r->key_id, k.key_id.c_str(), sizeof r->key_id);
    strlcpy(r->ver_before, k.key_version_before.c_str(), sizeof r->ver_before);
    strlcpy(r->ver, k.key_version.c_str(), sizeof r->ver);
    strlcpy(r->fp, k.kek_fingerprint.c_str(), sizeof r->fp);
    r->gen_before = int32(k.kek_generation_before);
    r->gen = int32(k.kek_generation);
    r->finished = k.finished_interrupted;
}

// A key operation on the cluster: its row, or its failure worded by what it does.
template <typename F>
Datum key_op(FunctionCallInfo fcinfo, const char* fn, const char* what, F&& op) {
    require_key_admin(fn);
    const char* actor = GetUserNameFromId(GetUserId(), false);
    OpRow row{};
    cmk::pg::call_cpp(what, [&] {
        cmk::audit::ActorScope scope(actor);
        fill_row(op(), &row);
    });
    return op_row(fcinfo, row);
}

void test_crash_assign(const char* newval, void*) {
    // Honoured only when the server was started with cmk_lakebase.enable_test_hooks.
    cmk::pg::quietly([&] { cmk::lifecycle::set_crash_point(enable_test_hooks && newval ? newval : ""); });
}

void audit_size_assign(int newval, void*) {
    cmk::pg::quietly([&] { cmk::audit::set_max_bytes(uint64_t(newval) * 1024); });
}

}  // namespace

void cmk_lifecycle_init(void) {
    DefineCustomBoolVariable("cmk_lakebase.enable_test_hooks",
                             "Allows cmk_lakebase.test_crash_at (crash injection for tests only).", NULL,
                             &enable_test_hooks, false, PGC_POSTMASTER, GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE,
                             NULL, NULL, NULL);
    DefineCustomStringVariable("cmk_lakebase.test_crash_at",
                               "Key operation step at which the server process kills itself (tests only).",
                               "Ignored unless cmk_lakebase.enable_test_hooks is on.", &test_crash_at, "",
                               PGC_SUSET, GUC_NO_SHOW_ALL | GUC_NOT_IN_SAMPLE, NULL, test_crash_assign, NULL);
    DefineCustomIntVariable(
        "cmk_lakebase.audit_max_size",
        "Size at which cmk_lakebase/audit.log is rotated to audit.log.1 (two files are kept).", NULL,
        &audit_max_size_kb, 10240, 64, INT_MAX / 1024, PGC_SIGHUP, GUC_UNIT_KB, NULL, audit_size_assign,
        NULL);
    prev_client_auth_hook = ClientAuthentication_hook;
    ClientAuthentication_hook = refuse_locked_database;
}

extern "C" Datum cmk_rewrap(PG_FUNCTION_ARGS) {
    return key_op(fcinfo, "rewrap", "re-wrap the KEK", [] { return cmk::fs::rewrap_kek(); });
}

extern "C" Datum cmk_rotate_kek(PG_FUNCTION_ARGS) {
    return key_op(fcinfo, "rotate_kek", "rotate the KEK", [] { return cmk::fs::rotate_kek(); });
}

extern "C" Datum cmk_bind_cluster(PG_FUNCTION_ARGS) {
    const char* name = text_to_cstring(PG_GETARG_TEXT_PP(0));  // palloc'd: no destructor to skip
    return key_op(fcinfo, "bind_cluster", "bind the cluster to another key configuration",
                  [name] { return cmk::fs::bind_cluster(name); });
}

namespace {

struct DbRow {
    char action[32], config[128], provider[64], key_id[256], ver[64], fp[80];
    int64 deks;
};

// Replaces every `from` in the C string buf (of size bytes) by `to`.
void replace_all(char* buf, size_t size, const char* from, const char* to) {
    StringInfoData s;
    initStringInfo(&s);
    const char* p = buf;
    size_t n = strlen(from);
    for (const char* at; (at = strstr(p, from)) != NULL; p = at + n) {
        appendBinaryStringInfo(&s, p, int(at - p));
        appendStringInfoString(&s, to);
    }
    appendStringInfoString(&s, p);
    strlcpy(buf, s.data, size);
    pfree(s.data);
}

// A key operation on one database, named by its first argument.
template <typename F>
Datum db_op(FunctionCallInfo fcinfo, const char* fn, const char* what, F&& op) {
    require_key_admin(fn);
    Name dbname = PG_GETARG_NAME(0);
    Oid dboid = get_database_oid(NameStr(*dbname), false);  // ERROR: database "x" does not exist
    const char* actor = GetUserNameFromId(GetUserId(), false);
    DbRow row{};
    cmk::pg::Failure f;
    bool ok = cmk::pg::try_cpp(what, [&] {
        cmk::audit::ActorScope scope(actor);
        cmk::fs::DbOpResult r = op(uint32_t(dboid));
        strlcpy(row.action, r.action.c_str(), sizeof row.action);
        strlcpy(row.config, r.config_name.c_str(), sizeof row.config);
        strlcpy(row.provider, r.provider.c_str(), sizeof row.provider);
        strlcpy(row.key_id, r.key_id.c_str(), sizeof row.key_id);
        strlcpy(row.ver, r.key_version.c_str(), sizeof row.ver);
        strlcpy(row.fp, r.kek_fingerprint.c_str(), sizeof row.fp);
        row.deks = int64(r.dek_count);
    }, &f);
    if (!ok) {
        // The layer knows databases by oid; the caller named it.
        replace_all(f.message, sizeof f.message, psprintf("database %u ", dboid),
                    psprintf("database \"%s\" ", NameStr(*dbname)));
        cmk::pg::raise_failure(f);
    }
    TupleDesc tupdesc;
    if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("return type must be a row type")));
    Datum v[8];
    bool n[8] = {false};
    v[0] = CStringGetTextDatum(row.action);
    v[1] = NameGetDatum(dbname);
    v[2] = CStringGetTextDatum(row.config);
    v[3] = CStringGetTextDatum(row.provider);
    v[4] = CStringGetTextDatum(row.key_id);
    if (row.ver[0]) v[5] = CStringGetTextDatum(row.ver); else n[5] = true;
    if (row.fp[0]) v[6] = CStringGetTextDatum(row.fp); else n[6] = true;
    v[7] = Int64GetDatum(row.deks);
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, v, n)));
}

// The oid of a database by name, readable before a database is selected (as
// postinit.c's GetDatabaseTuple: the name index only once the shared relcache
// entries are built, else a heap scan). InvalidOid if there is none.
Oid database_oid_early(const char* name) {
    ScanKeyData key[1];
    ScanKeyInit(&key[0], Anum_pg_database_datname, BTEqualStrategyNumber, F_NAMEEQ, CStringGetDatum(name));
    Relation rel = table_open(DatabaseRelationId, AccessShareLock);
    SysScanDesc scan = systable_beginscan(rel, DatabaseNameIndexId, criticalSharedRelcachesBuilt, NULL, 1, key);
    HeapTuple tup = systable_getnext(scan);
    Oid oid = HeapTupleIsValid(tup) ? ((Form_pg_database)GETSTRUCT(tup))->oid : InvalidOid;
    systable_endscan(scan);
    table_close(rel, AccessShareLock);
    return oid;
}

// Connections to a database whose own key is revoked (or being revoked, or was not
// available at start) are refused here, after authentication, with the reason. The
// hook runs inside InitPostgres's start-up transaction, with the shared catalogs
// readable, so the database name can be resolved to its oid.
void refuse_locked_database(Port* port, int status) {
    if (prev_client_auth_hook) prev_client_auth_hook(port, status);
    if (status != STATUS_OK || !port->database_name) return;
    bool any = false;
    cmk::pg::quietly([&] { any = cmk::fs::any_database_refused(); });
    if (!any) return;
    Oid dboid = database_oid_early(port->database_name);
    bool refused = false;
    if (OidIsValid(dboid)) cmk::pg::quietly([&] { refused = cmk::fs::database_refused(uint32_t(dboid)); });
    if (!refused) return;
    char key_id[256] = "", provider[64] = "";
    cmk::pg::quietly([&] {
        for (const auto& d : cmk::fs::database_keys())
            if (d.oid == dboid) {
                strlcpy(key_id, d.key_id.c_str(), sizeof key_id);
                strlcpy(provider, d.provider.c_str(), sizeof provider);
            }
    });
    ereport(FATAL, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    errmsg("cmk_lakebase: database \"%s\" is unavailable: its key \"%s\" of provider \"%s\" is "
                           "revoked or not usable",
                           port->database_name, key_id, provider),
                    errdetail("The database is bound to a key configuration of its own; its data cannot be read "
                              "until that key is usable again. The rest of the cluster keeps serving."),
                    errhint("Restore the key (or this cluster's access to it) in the key provider; the watchdog "
                            "opens the database again at its next check.")));
}
}  // namespace

extern "C" Datum cmk_bind_database(PG_FUNCTION_ARGS) {
    const char* config = text_to_cstring(PG_GETARG_TEXT_PP(1));  // palloc'd: no destructor to skip
    return db_op(fcinfo, "bind_database", "bind the database to its own key configuration",
                 [config](uint32_t oid) { return cmk::fs::bind_database(oid, config); });
}

extern "C" Datum cmk_unbind_database(PG_FUNCTION_ARGS) {
    return db_op(fcinfo, "unbind_database", "unbind the database from its own key configuration",
                 [](uint32_t oid) { return cmk::fs::unbind_database(oid); });
}
