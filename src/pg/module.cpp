// The PostgreSQL module: _PG_init (postmaster) loads the keyring, unwraps the KEK and
// installs the encrypting file layer over the server's GOT before any child is
// forked; the SQL functions report key state. C++ never ereports across frames that
// own resources: the C++ work runs in try blocks that copy results into plain
// buffers, and ereport() is called only outside them (STYLE.md, pg_duckdb's wall).
#include <sys/prctl.h>
#include <sys/stat.h>

#include <cstring>
#include <exception>
#include <string>

#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/fs/layer.hpp"
#include "module.hpp"

extern "C" {
#include "postgres.h"

#include "access/relation.h"
#include "catalog/pg_class.h"
#include "common/relpath.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

PG_MODULE_MAGIC;

void _PG_init(void);
PG_FUNCTION_INFO_V1(cmk_status);
PG_FUNCTION_INFO_V1(cmk_relation_keys);
PG_FUNCTION_INFO_V1(cmk_relation_is_encrypted);
}

namespace {

bool allow_core_dumps = false;

// A C++ failure carried across the wall as plain text.
struct Failure {
    bool failed = false;
    char msg[512] = {0};
    char detail[1024] = {0};
    char hint[512] = {0};

    void set(const char* m, const char* d, const char* h) {
        failed = true;
        strlcpy(msg, m, sizeof msg);
        strlcpy(detail, d ? d : "", sizeof detail);
        strlcpy(hint, h ? h : "", sizeof hint);
    }
    void from(const std::exception& e) {
        if (auto* le = dynamic_cast<const cmk::fs::LayerError*>(&e))
            set(le->what(), le->detail.c_str(), le->hint.c_str());
        else
            set(e.what(), "", "");
    }
};

void raise(const Failure& f, int elevel) {
    ereport(elevel, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE), errmsg("%s", f.msg),
                     f.detail[0] ? errdetail("%s", f.detail) : 0, f.hint[0] ? errhint("%s", f.hint) : 0));
}

}  // namespace

void _PG_init(void) {
    if (!process_shared_preload_libraries_in_progress)
        ereport(ERROR,
                (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                 errmsg("cmk_lakebase must be loaded via shared_preload_libraries"),
                 errdetail("The encrypting file layer must be installed in the postmaster before any "
                           "server process starts."),
                 errhint("Create the cluster with \"pg_cmk initdb\", which adds cmk_lakebase to "
                         "shared_preload_libraries; a plaintext cluster cannot be encrypted in place.")));

    DefineCustomBoolVariable("cmk_lakebase.allow_core_dumps",
                             "Allows server processes to write core dumps (which may contain keys).",
                             "Off by default: key schedules live in process memory, so server processes "
                             "are made non-dumpable.",
                             &allow_core_dumps, false, PGC_POSTMASTER, 0, NULL, NULL, NULL);

    cmk_lifecycle_init();

    Failure f;
    try {
        cmk::audit::set_default_actor("postmaster");
        cmk::fs::start_server(DataDir);
    } catch (const std::exception& e) {
        f.from(e);
    }
    if (f.failed) raise(f, FATAL);

    cmk_watchdog_init();
    MarkGUCPrefixReserved("cmk_lakebase");

    // Keys (and the cipher contexts holding their schedules) must not reach a core
    // file; children inherit this across fork().
    if (!allow_core_dumps && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        ereport(WARNING, (errmsg("cmk_lakebase: could not disable core dumps: %m")));
}

// ---- SQL functions ----------------------------------------------------------------------

extern "C" Datum cmk_status(PG_FUNCTION_ARGS) {
    struct {
        char provider[64], key_id[256], key_state[64], kek_fp[80], cluster_id[80], mode[16], datadir[1024];
        int32 generation;
        bool per_boot;
        int64 deks;
    } out{};
    std::string actor = GetUserNameFromId(GetUserId(), false);
    Failure f;
    try {
        cmk::audit::ActorScope scope(actor);
        cmk::fs::LayerInfo i = cmk::fs::info();
        if (i.mode == cmk::fs::Mode::Off) {
            f.set("cmk_lakebase: the encrypting file layer is not active in this server",
                  "The library was not loaded through shared_preload_libraries.",
                  "Add cmk_lakebase to shared_preload_libraries and restart.");
        } else {
            cmk::KeyStatus ks = cmk::fs::provider_status();
            strlcpy(out.provider, i.provider.c_str(), sizeof out.provider);
            strlcpy(out.key_id, i.key_id.c_str(), sizeof out.key_id);
            strlcpy(out.key_state, i.keys_wiped ? "wiped" : cmk::key_health_name(ks.health), sizeof out.key_state);
            strlcpy(out.kek_fp, i.kek_fingerprint.c_str(), sizeof out.kek_fp);
            strlcpy(out.cluster_id, i.cluster_id.c_str(), sizeof out.cluster_id);
            strlcpy(out.mode, cmk::fs::mode_name(i.mode), sizeof out.mode);
            strlcpy(out.datadir, i.data_directory.c_str(), sizeof out.datadir);
            out.generation = int32(i.kek_generation);
            out.per_boot = i.per_boot_key_present;
            out.deks = int64(i.dek_count);
        }
    } catch (const std::exception& e) {
        f.from(e);
    }
    if (f.failed) raise(f, ERROR);

    TupleDesc tupdesc;
    if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("return type must be a row type")));
    Datum values[10];
    bool nulls[10] = {false};
    values[0] = CStringGetTextDatum(out.provider);
    values[1] = CStringGetTextDatum(out.key_id);
    values[2] = CStringGetTextDatum(out.key_state);
    values[3] = CStringGetTextDatum(out.kek_fp);
    values[4] = Int32GetDatum(out.generation);
    values[5] = BoolGetDatum(out.per_boot);
    values[6] = Int64GetDatum(out.deks);
    values[7] = CStringGetTextDatum(out.cluster_id);
    values[8] = CStringGetTextDatum(out.mode);
    values[9] = CStringGetTextDatum(out.datadir);
    PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

namespace {

struct SegmentInfo {
    bool exists;
    bool encrypted;
    char file_class[32];
    char key_kind[16];
    char fingerprint[80];
};

// C++ side of one segment lookup; failures come back as a Failure.
void describe_segment(const char* rel, SegmentInfo* out, Failure* f) {
    try {
        cmk::fs::FileKeyInfo fi = cmk::fs::describe_file(rel);
        out->exists = fi.exists;
        out->encrypted = fi.encrypted;
        strlcpy(out->file_class, cmk::file_class_name(fi.file_class), sizeof out->file_class);
        strlcpy(out->key_kind, fi.key_kind.c_str(), sizeof out->key_kind);
        strlcpy(out->fingerprint, fi.fingerprint.c_str(), sizeof out->fingerprint);
    } catch (const std::exception& e) {
        f->from(e);
    }
}

// Calls fn(fork name, segno, relative path, info) for every existing segment of every
// fork of the relation.
template <typename Fn>
void for_each_segment(Oid relid, Fn fn) {
    if (cmk::fs::info().mode == cmk::fs::Mode::Off)
        ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                        errmsg("cmk_lakebase: the encrypting file layer is not active in this server"),
                        errhint("Add cmk_lakebase to shared_preload_libraries and restart.")));
    Relation rel = try_relation_open(relid, AccessShareLock);
    if (!rel)
        ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE), errmsg("relation with OID %u does not exist", relid)));
    if (!RELKIND_HAS_STORAGE(rel->rd_rel->relkind)) {
        char* name = pstrdup(RelationGetRelationName(rel));
        relation_close(rel, AccessShareLock);
        ereport(ERROR, (errcode(ERRCODE_WRONG_OBJECT_TYPE),
                        errmsg("relation \"%s\" has no storage", name),
                        errdetail("Only tables, indexes, sequences and materialized views have files.")));
    }
    for (int fork = 0; fork <= MAX_FORKNUM; fork++) {
        char* base = relpathbackend(rel->rd_node, rel->rd_backend, (ForkNumber) fork);
        for (int segno = 0;; segno++) {
            char* path = segno == 0 ? pstrdup(base) : psprintf("%s.%d", base, segno);
            SegmentInfo si{};
            Failure f;
            describe_segment(path, &si, &f);
            if (f.failed) {
                relation_close(rel, AccessShareLock);
                raise(f, ERROR);
            }
            if (!si.exists) break;
            fn(forkNames[fork], segno, path, si);
        }
    }
    relation_close(rel, AccessShareLock);
}

}  // namespace

extern "C" Datum cmk_relation_keys(PG_FUNCTION_ARGS) {
    Oid relid = PG_GETARG_OID(0);
    ReturnSetInfo* rsinfo = (ReturnSetInfo*) fcinfo->resultinfo;
    InitMaterializedSRF(fcinfo, 0);
    for_each_segment(relid, [&](const char* fork, int segno, const char* path, const SegmentInfo& si) {
        Datum values[7];
        bool nulls[7] = {false};
        values[0] = CStringGetTextDatum(fork);
        values[1] = Int32GetDatum(segno);
        values[2] = CStringGetTextDatum(path);
        values[3] = CStringGetTextDatum(si.file_class);
        values[4] = BoolGetDatum(si.encrypted);
        values[5] = CStringGetTextDatum(si.key_kind);
        if (si.fingerprint[0])
            values[6] = CStringGetTextDatum(si.fingerprint);
        else
            nulls[6] = true;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    });
    return (Datum) 0;
}

extern "C" Datum cmk_relation_is_encrypted(PG_FUNCTION_ARGS) {
    Oid relid = PG_GETARG_OID(0);
    bool all = true;
    for_each_segment(relid, [&](const char*, int, const char*, const SegmentInfo& si) {
        if (!si.encrypted) all = false;
    });
    PG_RETURN_BOOL(all);
}
