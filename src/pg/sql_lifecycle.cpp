// The key lifecycle's SQL surface (issue 5): rewrap(), rotate_kek(), bind_cluster(),
// named key configurations, the audit_log view's reader, and the separation of
// duties check (superuser or member of cmk_admin). The C++ work (src/core/lifecycle,
// through the file layer) runs inside try blocks that copy results into plain or
// palloc'd buffers; ereport() is called only outside them (STYLE.md's wall).
#include <map>
#include <string>
#include <vector>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/fs/layer.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "module.hpp"

extern "C" {
#include "postgres.h"

#include "catalog/pg_authid.h"
#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/pg_database.h"
#include "commands/dbcommands.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "libpq/auth.h"
#include "libpq/libpq-be.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(cmk_rewrap);
PG_FUNCTION_INFO_V1(cmk_rotate_kek);
PG_FUNCTION_INFO_V1(cmk_bind_cluster);
PG_FUNCTION_INFO_V1(cmk_bind_database);
PG_FUNCTION_INFO_V1(cmk_unbind_database);
PG_FUNCTION_INFO_V1(cmk_database_keys);
PG_FUNCTION_INFO_V1(cmk_key_configs);
PG_FUNCTION_INFO_V1(cmk_create_key_config);
PG_FUNCTION_INFO_V1(cmk_drop_key_config);
PG_FUNCTION_INFO_V1(cmk_audit_log);
}

namespace {

bool enable_test_hooks = false;
ClientAuthentication_hook_type prev_client_auth_hook = NULL;
void refuse_locked_database(Port* port, int status);
char* test_crash_at = nullptr;
int audit_max_size_kb = 10240;

// A C++ failure carried across the wall as plain text and an SQLSTATE.
struct Failure {
    bool failed = false;
    int sqlstate = ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE;
    char msg[1024] = {0};
    char detail[1024] = {0};
    char hint[512] = {0};

    void set(int code, const std::string& m, const std::string& d, const std::string& h) {
        failed = true;
        sqlstate = code;
        strlcpy(msg, m.c_str(), sizeof msg);
        strlcpy(detail, d.c_str(), sizeof detail);
        strlcpy(hint, h.c_str(), sizeof hint);
    }
};

[[noreturn]] void raise(const Failure& f) {
    ereport(ERROR, (errcode(f.sqlstate), errmsg("%s", f.msg), f.detail[0] ? errdetail("%s", f.detail) : 0,
                    f.hint[0] ? errhint("%s", f.hint) : 0));
    pg_unreachable();
}

// Classifies an exception from a key operation. `what` names the operation for the
// message ("rotate the KEK"); key and provider come from the layer's view.
void classify(const std::exception& e, const char* what, Failure* f) {
    std::string key, provider;
    try {
        cmk::fs::LayerInfo i = cmk::fs::info();
        key = i.key_id;
        provider = i.provider;
    } catch (const std::exception&) {
    }
    std::string who = "key \"" + key + "\" of provider \"" + provider + "\"";
    if (auto* le = dynamic_cast<const cmk::fs::LayerError*>(&e)) {
        f->set(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, le->what(), le->detail, le->hint);
    } else if (auto* lc = dynamic_cast<const cmk::lifecycle::LifecycleError*>(&e)) {
        int code = ERRCODE_INVALID_PARAMETER_VALUE;
        if (lc->kind == cmk::lifecycle::LifecycleError::NotFound) code = ERRCODE_UNDEFINED_OBJECT;
        if (lc->kind == cmk::lifecycle::LifecycleError::Exists) code = ERRCODE_DUPLICATE_OBJECT;
        if (lc->kind == cmk::lifecycle::LifecycleError::Conflict) code = ERRCODE_OBJECT_IN_USE;
        f->set(code, std::string("cmk_lakebase: ") + lc->what(), "", "");
    } else if (auto* ke = dynamic_cast<const cmk::KmsError*>(&e)) {
        switch (ke->kind) {
            case cmk::KmsErrorKind::Config:
                f->set(ERRCODE_INVALID_PARAMETER_VALUE, std::string("cmk_lakebase: ") + ke->what(), "",
                       "Correct the key configuration; nothing was changed.");
                break;
            case cmk::KmsErrorKind::Unavailable:
                f->set(ERRCODE_CONNECTION_FAILURE,
                       std::string("cmk_lakebase: could not ") + what + ": the key provider is unavailable",
                       std::string("The key provider said: ") + ke->what(),
                       "Nothing was changed; the cluster keeps running on its current keys. Try again once "
                       "the key provider is reachable.");
                break;
            case cmk::KmsErrorKind::Revoked:
                f->set(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                       std::string("cmk_lakebase: could not ") + what + ": the key provider refused",
                       std::string("The key provider said: ") + ke->what(),
                       "Nothing was changed. Check that the key is enabled and this cluster may use it.");
                break;
        }
    } else if (dynamic_cast<const cmk::KeyringError*>(&e) || dynamic_cast<const cmk::KeyMapError*>(&e)) {
        f->set(ERRCODE_DATA_CORRUPTED, std::string("cmk_lakebase: could not ") + what + " with " + who,
               e.what(), "Restore cmk_lakebase/ from a backup taken together with the data directory.");
    } else {
        f->set(ERRCODE_INTERNAL_ERROR, std::string("cmk_lakebase: could not ") + what + " with " + who,
               e.what(), "");
    }
}

// Separation of duties: key management is for superusers and members of cmk_admin
// (who need no privilege on any user data). Also refuses, with an audit line, callers
// that were granted EXECUTE some other way.
void require_key_admin(const char* fn) {
    Oid admin = get_role_oid("cmk_admin", true);
    if (superuser() || (OidIsValid(admin) && has_privs_of_role(GetUserId(), admin))) return;
    const char* user = GetUserNameFromId(GetUserId(), false);
    try {
        cmk::audit::Event e;
        e.actor = user;
        e.action = fn;
        e.outcome = "denied";
        e.detail = "not a superuser nor a member of cmk_admin";
        cmk::audit::record(e);
    } catch (const std::exception&) {
    }
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to manage the keys of cmk_lakebase (%s)", fn),
                    errdetail("Only superusers and members of role \"cmk_admin\" may call %s().", fn),
                    errhint("A superuser can run: GRANT cmk_admin TO %s;", quote_identifier(user))));
}

std::string current_actor() {
    return GetUserNameFromId(GetUserId(), false);
}

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

template <typename F>
Datum key_op(FunctionCallInfo fcinfo, const char* fn, const char* what, F&& op) {
    require_key_admin(fn);
    OpRow row{};
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        std::string actor = current_actor();
        try {
            cmk::audit::ActorScope scope(actor);
            fill_row(op(), &row);
        } catch (const std::exception& e) {
            classify(e, what, &f);
        }
    }
    if (f.failed) raise(f);
    return op_row(fcinfo, row);
}

void test_crash_assign(const char* newval, void*) {
    // Honoured only when the server was started with cmk_lakebase.enable_test_hooks.
    try {
        cmk::lifecycle::set_crash_point(enable_test_hooks && newval ? newval : "");
    } catch (const std::exception&) {
    }
}

void audit_size_assign(int newval, void*) {
    cmk::audit::set_max_bytes(uint64_t(newval) * 1024);
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
// Strings copied out of C++ objects into palloc'd memory, so that building tuples
// (which may ereport) never unwinds past a C++ destructor.
char* pstr(const std::string& s) {
    return pstrdup(s.c_str());
}

struct DbRow {
    char action[32], config[128], provider[64], key_id[256], ver[64], fp[80];
    int64 deks;
};

template <typename F>
Datum db_op(FunctionCallInfo fcinfo, const char* fn, const char* what, F&& op) {
    require_key_admin(fn);
    Name dbname = PG_GETARG_NAME(0);
    Oid dboid = get_database_oid(NameStr(*dbname), false);  // ERROR: database "x" does not exist
    DbRow row{};
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        std::string actor = current_actor();
        try {
            cmk::audit::ActorScope scope(actor);
            cmk::fs::DbOpResult r = op(uint32_t(dboid));
            strlcpy(row.action, r.action.c_str(), sizeof row.action);
            strlcpy(row.config, r.config_name.c_str(), sizeof row.config);
            strlcpy(row.provider, r.provider.c_str(), sizeof row.provider);
            strlcpy(row.key_id, r.key_id.c_str(), sizeof row.key_id);
            strlcpy(row.ver, r.key_version.c_str(), sizeof row.ver);
            strlcpy(row.fp, r.kek_fingerprint.c_str(), sizeof row.fp);
            row.deks = int64(r.dek_count);
        } catch (const std::exception& e) {
            classify(e, what, &f);
            // The layer knows databases by oid; the caller named it.
            std::string m = f.msg, from = "database " + std::to_string(dboid) + " ",
                        to = std::string("database \"") + NameStr(*dbname) + "\" ";
            for (size_t at = m.find(from); at != std::string::npos; at = m.find(from, at + to.size()))
                m.replace(at, from.size(), to);
            strlcpy(f.msg, m.c_str(), sizeof f.msg);
        }
    }
    if (f.failed) raise(f);
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

Datum text_or_null(const char* s, bool* isnull) {
    *isnull = !s[0];
    return s[0] ? CStringGetTextDatum(s) : (Datum)0;
}

Datum ts_or_null(const char* s, bool* isnull) {
    *isnull = !s[0];
    return s[0] ? DirectFunctionCall3(timestamptz_in, CStringGetDatum(s), ObjectIdGetDatum(InvalidOid),
                                      Int32GetDatum(-1))
                : (Datum)0;
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
    if (status != STATUS_OK || !port->database_name || !cmk::fs::any_database_refused()) return;
    Oid dboid = database_oid_early(port->database_name);
    if (!OidIsValid(dboid) || !cmk::fs::database_refused(uint32_t(dboid))) return;
    char key_id[256] = "", provider[64] = "";
    try {
        for (const auto& d : cmk::fs::database_keys())
            if (d.oid == dboid) {
                strlcpy(key_id, d.key_id.c_str(), sizeof key_id);
                strlcpy(provider, d.provider.c_str(), sizeof provider);
            }
    } catch (const std::exception&) {
    }
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

extern "C" Datum cmk_database_keys(PG_FUNCTION_ARGS) {
    require_key_admin("database_keys");
    ReturnSetInfo* rsinfo = (ReturnSetInfo*)fcinfo->resultinfo;
    InitMaterializedSRF(fcinfo, 0);
    struct Row {
        Oid oid;
        char *state, *config, *provider, *key_id, *ver, *fp, *bound_at, *rotated_at;
        int64 deks;
    };
    Row* rows = NULL;
    int nrows = 0;
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        try {
            std::vector<cmk::fs::DatabaseKeyInfo> list = cmk::fs::database_keys();
            rows = (Row*)palloc0(sizeof(Row) * (list.size() + 1));
            for (const auto& d : list) {
                Row& r = rows[nrows++];
                r.oid = d.oid;
                r.state = pstr(d.state);
                r.config = pstr(d.config_name);
                r.provider = pstr(d.provider);
                r.key_id = pstr(d.key_id);
                r.ver = pstr(d.key_version);
                r.fp = pstr(d.kek_fingerprint);
                r.bound_at = pstr(d.bound_at);
                r.rotated_at = pstr(d.rotated_at);
                r.deks = int64(d.dek_count);
            }
        } catch (const std::exception& e) {
            classify(e, "list the database bindings", &f);
        }
    }
    if (f.failed) raise(f);
    for (int i = 0; i < nrows; i++) {
        Datum v[11];
        bool n[11] = {false};
        char* name = get_database_name(rows[i].oid);
        n[0] = !name;
        if (name) v[0] = DirectFunctionCall1(namein, CStringGetDatum(name));
        v[1] = ObjectIdGetDatum(rows[i].oid);
        v[2] = CStringGetTextDatum(rows[i].state);
        v[3] = text_or_null(rows[i].config, &n[3]);
        v[4] = text_or_null(rows[i].provider, &n[4]);
        v[5] = text_or_null(rows[i].key_id, &n[5]);
        v[6] = text_or_null(rows[i].ver, &n[6]);
        v[7] = text_or_null(rows[i].fp, &n[7]);
        v[8] = Int64GetDatum(rows[i].deks);
        v[9] = ts_or_null(rows[i].bound_at, &n[9]);
        v[10] = ts_or_null(rows[i].rotated_at, &n[10]);
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
    }
    return (Datum)0;
}

extern "C" Datum cmk_create_key_config(PG_FUNCTION_ARGS) {
    require_key_admin("create_key_config");
    if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
        ereport(ERROR, (errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
                        errmsg("name, provider and key_id of a key configuration must not be null")));
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        std::string name = text_to_cstring(PG_GETARG_TEXT_PP(0));
        cmk::KeyConfig cfg;
        cfg.provider = text_to_cstring(PG_GETARG_TEXT_PP(1));
        cfg.key_id = text_to_cstring(PG_GETARG_TEXT_PP(2));
        std::string opts = "{}";
        if (!PG_ARGISNULL(3)) {
            Jsonb* jb = PG_GETARG_JSONB_P(3);
            opts = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
        }
        std::string actor = current_actor();
        try {
            rapidjson::Document d;
            d.Parse(opts.c_str(), opts.size());
            if (d.HasParseError() || !d.IsObject())
                throw cmk::lifecycle::LifecycleError("options must be a JSON object of strings");
            for (const auto& m : d.GetObject()) {
                std::string k(m.name.GetString(), m.name.GetStringLength());
                if (!m.value.IsString())
                    throw cmk::lifecycle::LifecycleError("option \"" + k + "\" must be a string");
                cfg.options[k] = std::string(m.value.GetString(), m.value.GetStringLength());
            }
            cmk::audit::ActorScope scope(actor);
            cmk::fs::create_key_config(name, cfg);
        } catch (const std::exception& e) {
            classify(e, "create the key configuration", &f);
        }
    }
    if (f.failed) raise(f);
    PG_RETURN_VOID();
}

extern "C" Datum cmk_drop_key_config(PG_FUNCTION_ARGS) {
    require_key_admin("drop_key_config");
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        std::string name = text_to_cstring(PG_GETARG_TEXT_PP(0));
        std::string actor = current_actor();
        try {
            cmk::audit::ActorScope scope(actor);
            cmk::fs::drop_key_config(name);
        } catch (const std::exception& e) {
            classify(e, "drop the key configuration", &f);
        }
    }
    if (f.failed) raise(f);
    PG_RETURN_VOID();
}

extern "C" Datum cmk_key_configs(PG_FUNCTION_ARGS) {
    require_key_admin("key_configs");
    ReturnSetInfo* rsinfo = (ReturnSetInfo*)fcinfo->resultinfo;
    InitMaterializedSRF(fcinfo, 0);
    struct Row {
        char *name, *provider, *key_id, *options, *created;
        bool bound;
    };
    Row* rows = NULL;
    int nrows = 0;
    Failure f;
    {  // C++ objects end here, before raise() may longjmp past this frame
        std::string actor = current_actor();
        try {
            cmk::audit::ActorScope scope(actor);
            std::vector<cmk::fs::KeyConfigInfo> list = cmk::fs::key_configs();
            rows = (Row*)palloc0(sizeof(Row) * (list.size() + 1));
            for (const auto& k : list) {
                rapidjson::StringBuffer sb;
                rapidjson::Writer<rapidjson::StringBuffer> w(sb);
                w.StartObject();
                for (const auto& o : k.options) {
                    w.Key(o.first.c_str(), static_cast<rapidjson::SizeType>(o.first.size()));
                    w.String(o.second.c_str(), static_cast<rapidjson::SizeType>(o.second.size()));
                }
                w.EndObject();
                Row& r = rows[nrows++];
                r.name = pstr(k.name);
                r.provider = pstr(k.provider);
                r.key_id = pstr(k.key_id);
                r.options = pstr(std::string(sb.GetString(), sb.GetSize()));
                r.created = pstr(k.created_at);
                r.bound = k.bound;
            }
        } catch (const std::exception& e) {
            classify(e, "list the key configurations", &f);
        }
    }
    if (f.failed) raise(f);
    for (int i = 0; i < nrows; i++) {
        Datum v[6];
        bool n[6] = {false};
        v[0] = CStringGetTextDatum(rows[i].name);
        v[1] = CStringGetTextDatum(rows[i].provider);
        v[2] = CStringGetTextDatum(rows[i].key_id);
        v[3] = DirectFunctionCall1(jsonb_in, CStringGetDatum(rows[i].options));
        v[4] = BoolGetDatum(rows[i].bound);
        if (rows[i].created[0])
            v[5] = DirectFunctionCall3(timestamptz_in, CStringGetDatum(rows[i].created),
                                       ObjectIdGetDatum(InvalidOid), Int32GetDatum(-1));
        else
            n[5] = true;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
    }
    return (Datum)0;
}

extern "C" Datum cmk_audit_log(PG_FUNCTION_ARGS) {
    require_key_admin("audit_log");
    ReturnSetInfo* rsinfo = (ReturnSetInfo*)fcinfo->resultinfo;
    InitMaterializedSRF(fcinfo, 0);
    constexpr int N = 13;
    struct Row {
        char* s[N];
        int64 pid, count;
        int32 gen;
    };
    Row* rows = NULL;
    size_t nrows = 0;
    Failure f;
    try {
        std::string dir = cmk::fs::keyring_directory();
        if (dir.empty())
            throw cmk::fs::LayerError("cmk_lakebase: the encrypting file layer is not active", "", "");
        std::vector<cmk::audit::Event> evs = cmk::audit::read_all(dir);
        rows = (Row*)palloc0(sizeof(Row) * (evs.size() + 1));
        for (const auto& e : evs) {
            Row& r = rows[nrows++];
            const std::string* fields[] = {&e.time,     &e.actor,  &e.action,      &e.key_config,
                                           &e.provider, &e.key_id, &e.key_version, &e.request_id,
                                           &e.outcome,  &e.detail};
            for (int i = 0; i < 10; i++) r.s[i] = pstr(*fields[i]);
            r.pid = e.pid;
            r.count = int64(e.count);
            r.gen = int32(e.kek_generation);
        }
    } catch (const std::exception& e) {
        classify(e, "read the audit trail", &f);
    }
    if (f.failed) raise(f);
    for (size_t i = 0; i < nrows; i++) {
        const Row& r = rows[i];
        Datum v[N];
        bool n[N] = {false};
        // time, pid, actor, action, key_config, provider, key_id, key_version,
        // kek_generation, request_id, outcome, detail, count
        if (r.s[0][0])
            v[0] = DirectFunctionCall3(timestamptz_in, CStringGetDatum(r.s[0]), ObjectIdGetDatum(InvalidOid),
                                       Int32GetDatum(-1));
        else
            n[0] = true;
        v[1] = Int32GetDatum(int32(r.pid));
        for (int k = 1; k <= 6; k++) {
            if (r.s[k][0])
                v[k + 1] = CStringGetTextDatum(r.s[k]);
            else
                n[k + 1] = true;
        }
        if (r.gen)
            v[8] = Int32GetDatum(r.gen);
        else
            n[8] = true;
        if (r.s[7][0])
            v[9] = CStringGetTextDatum(r.s[7]);
        else
            n[9] = true;
        v[10] = CStringGetTextDatum(r.s[8]);
        if (r.s[9][0])
            v[11] = CStringGetTextDatum(r.s[9]);
        else
            n[11] = true;
        v[12] = Int64GetDatum(r.count);
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, v, n);
    }
    return (Datum)0;
}
