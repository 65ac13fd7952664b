// The key administration's listing and configuration functions: database_keys(),
// key_configs(), create_key_config(), drop_key_config() and audit_log(). The C++ work
// enters through the wall (wall.hpp); the strings it hands back are palloc'd through
// pg_call, so that building the result rows never unwinds past a C++ destructor.
#include <cstring>
#include <string>
#include <vector>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/fs/key_admin.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/lifecycle.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "module.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"  // get_database_name() since 19 (commands/dbcommands.h before)
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(cmk_database_keys);
PG_FUNCTION_INFO_V1(cmk_key_configs);
PG_FUNCTION_INFO_V1(cmk_create_key_config);
PG_FUNCTION_INFO_V1(cmk_drop_key_config);
PG_FUNCTION_INFO_V1(cmk_audit_log);
}

namespace {

// A C++ string copied into palloc'd memory (from C++: through the guard).
char* pstr(const std::string& s) {
    return cmk::pg::pg_call(pstrdup, s.c_str());
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

}  // namespace

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
    cmk::pg::call_cpp("list the database bindings", [&] {
        std::vector<cmk::fs::DatabaseKeyInfo> list = cmk::fs::database_keys();
        rows = (Row*) cmk::pg::pg_call(palloc0, sizeof(Row) * (list.size() + 1));
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
    });
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
    // The arguments become C strings on this side of the wall (detoasting and the
    // text and jsonb conversions may raise), before any C++ object exists.
    const char* name = text_to_cstring(PG_GETARG_TEXT_PP(0));
    const char* provider = text_to_cstring(PG_GETARG_TEXT_PP(1));
    const char* key_id = text_to_cstring(PG_GETARG_TEXT_PP(2));
    const char* opts = "{}";
    if (!PG_ARGISNULL(3)) {
        Jsonb* jb = PG_GETARG_JSONB_P(3);
        opts = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
    }
    const char* actor = GetUserNameFromId(GetUserId(), false);
    cmk::pg::call_cpp("create the key configuration", [&] {
        cmk::KeyConfig cfg;
        cfg.provider = provider;
        cfg.key_id = key_id;
        rapidjson::Document d;
        if (!cmk::parse_json_bounded(d, opts, nullptr) || !d.IsObject())
            throw cmk::lifecycle::LifecycleError("options must be a JSON object of strings");
        for (const auto& m : d.GetObject()) {
            std::string k(m.name.GetString(), m.name.GetStringLength());
            if (!m.value.IsString()) throw cmk::lifecycle::LifecycleError("option \"" + k + "\" must be a string");
            cfg.options[k] = std::string(m.value.GetString(), m.value.GetStringLength());
        }
        cmk::audit::ActorScope scope(actor);
        cmk::fs::create_key_config(name, cfg);
    });
    PG_RETURN_VOID();
}

extern "C" Datum cmk_drop_key_config(PG_FUNCTION_ARGS) {
    require_key_admin("drop_key_config");
    const char* name = text_to_cstring(PG_GETARG_TEXT_PP(0));
    const char* actor = GetUserNameFromId(GetUserId(), false);
    cmk::pg::call_cpp("drop the key configuration", [&] {
        cmk::audit::ActorScope scope(actor);
        cmk::fs::drop_key_config(name);
    });
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
    const char* actor = GetUserNameFromId(GetUserId(), false);
    cmk::pg::call_cpp("list the key configurations", [&] {
        cmk::audit::ActorScope scope(actor);
        std::vector<cmk::fs::KeyConfigInfo> list = cmk::fs::key_configs();
        rows = (Row*) cmk::pg::pg_call(palloc0, sizeof(Row) * (list.size() + 1));
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
    });
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
    cmk::pg::call_cpp("read the audit trail", [&] {
        std::string dir = cmk::fs::keyring_directory();
        if (dir.empty())
            throw cmk::fs::LayerError("cmk_lakebase: the encrypting file layer is not active", "", "");
        std::vector<cmk::audit::Event> evs = cmk::audit::read_all(dir);
        rows = (Row*) cmk::pg::pg_call(palloc0, sizeof(Row) * (evs.size() + 1));
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
    });
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
