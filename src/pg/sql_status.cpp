// The SQL functions that report key state: status() (the layer and its key),
// relation_keys() / relation_is_encrypted() (each file segment of a relation, its
// class and its key), and cipher_stats() (how much the page cipher has done). They
// read; they never change a key.
#include <cstring>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/fs/key_admin.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "module.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "access/htup_details.h"
#include "access/relation.h"
#include "catalog/pg_class.h"
#include "common/relpath.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/rel.h"
#include "utils/tuplestore.h"

PG_FUNCTION_INFO_V1(cmk_status);
PG_FUNCTION_INFO_V1(cmk_relation_keys);
PG_FUNCTION_INFO_V1(cmk_relation_is_encrypted);
PG_FUNCTION_INFO_V1(cmk_cipher_stats);
}

namespace {

[[noreturn]] void layer_not_active(bool with_detail) {
    ereport(ERROR, (errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
                    errmsg("cmk_lakebase: the encrypting file layer is not active in this server"),
                    with_detail ? errdetail("The library was not loaded through shared_preload_libraries.") : 0,
                    errhint("Add cmk_lakebase to shared_preload_libraries and restart.")));
    pg_unreachable();
}

}  // namespace

extern "C" Datum cmk_status(PG_FUNCTION_ARGS) {
    struct {
        char provider[64], key_id[256], key_state[64], kek_fp[80], cluster_id[80], mode[16], datadir[1024];
        int32 generation;
        bool per_boot;
        int64 deks;
    } out{};
    bool off = false;
    const char* actor = GetUserNameFromId(GetUserId(), false);
    cmk::pg::call_cpp(nullptr, [&] {
        cmk::audit::ActorScope scope(actor);
        cmk::fs::LayerInfo i = cmk::fs::info();
        if (i.mode == cmk::fs::Mode::Off) {
            off = true;
            return;
        }
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
    });
    if (off) layer_not_active(true);

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

// cipher_stats(): the bytes this server's processes have enciphered and deciphered
// since it started (each process adds its count every cmk::kCipherCountBatch bytes).
extern "C" Datum cmk_cipher_stats(PG_FUNCTION_ARGS) {
    bool off = false;
    cmk::CipherCounts c;
    cmk::pg::call_cpp(nullptr, [&] {
        if (cmk::fs::info().mode == cmk::fs::Mode::Off) {
            off = true;
            return;
        }
        c = cmk::cipher_counts();
    });
    if (off) layer_not_active(true);

    TupleDesc tupdesc;
    if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
        ereport(ERROR, (errcode(ERRCODE_FEATURE_NOT_SUPPORTED), errmsg("return type must be a row type")));
    Datum values[2];
    bool nulls[2] = {false};
    // bigint holds 8 EiB: the counts wrap only after that much cipher work.
    values[0] = Int64GetDatum(int64(c.encrypted & INT64_MAX));
    values[1] = Int64GetDatum(int64(c.decrypted & INT64_MAX));
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

// Calls fn(fork name, segno, relative path, info) for every existing segment of every
// fork of the relation.
template <typename Fn>
void for_each_segment(Oid relid, Fn fn) {
    bool off = false;
    cmk::pg::call_cpp(nullptr, [&] { off = cmk::fs::info().mode == cmk::fs::Mode::Off; });
    if (off) layer_not_active(false);
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
        char* base = cmk_relation_path(rel, fork);
        for (int segno = 0;; segno++) {
            char* path = segno == 0 ? pstrdup(base) : psprintf("%s.%d", base, segno);
            SegmentInfo si{};
            cmk::pg::Failure f;
            if (!cmk::pg::try_cpp(nullptr, [&] {
                    cmk::fs::FileKeyInfo fi = cmk::fs::describe_file(path);
                    si.exists = fi.exists;
                    si.encrypted = fi.encrypted;
                    strlcpy(si.file_class, cmk::file_class_name(fi.file_class), sizeof si.file_class);
                    strlcpy(si.key_kind, fi.key_kind.c_str(), sizeof si.key_kind);
                    strlcpy(si.fingerprint, fi.fingerprint.c_str(), sizeof si.fingerprint);
                }, &f)) {
                relation_close(rel, AccessShareLock);
                cmk::pg::raise_failure(f);
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
