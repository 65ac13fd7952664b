// The PostgreSQL glue for the server versions the module supports (15, 17, 18, 19):
// what differs between them and matters to the encrypting file layer is checked here,
// at run time in the postmaster, rather than by #if through the code.
//
// The one I/O path the layer cannot see is PostgreSQL 18's io_method = io_uring: the
// kernel reads relation pages into shared buffers and writes them from there without
// a C library call, so no GOT slot is passed and ciphertext would be read as pages (and
// pages written in the clear). It is refused before the layer is installed. The other
// methods are seen: "worker" (18's default) runs the reads in I/O workers, which are
// postmaster children and inherit the patched GOT; "sync" reads in the backend itself.
// Older servers have no io_method setting at all.
//
// What changed in the server's C API between the versions is bridged here too, behind
// plain functions, so that the other files compile unchanged against every version.
#include <cstring>

#include "module.hpp"

extern "C" {
#include "postgres.h"

#include "common/relpath.h"
#include "utils/guc.h"
#include "utils/rel.h"
}

char* cmk_relation_path(struct RelationData* rel, int fork) {
#if PG_VERSION_NUM >= 180000
    // 18: relpathbackend() returns the path in a struct (RelPathStr), not palloc'd.
    return pstrdup(relpathbackend(rel->rd_locator, rel->rd_backend, (ForkNumber) fork).str);
#elif PG_VERSION_NUM >= 160000
    // 16: RelFileNode became RelFileLocator (rd_node -> rd_locator).
    return relpathbackend(rel->rd_locator, rel->rd_backend, (ForkNumber) fork);
#else
    return relpathbackend(rel->rd_node, rel->rd_backend, (ForkNumber) fork);
#endif
}

void cmk_check_server_io(void) {
    // missing_ok: servers before 18 have no such setting. The value is final here:
    // io_method can only be set at server start, and postgresql.conf (with
    // postgresql.auto.conf and the command line) is read before _PG_init.
    const char* io_method = GetConfigOption("io_method", true, false);
    if (io_method != NULL && strcmp(io_method, "io_uring") == 0)
        ereport(FATAL,
                (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
                 errmsg("cmk_lakebase: io_method = io_uring is not supported"),
                 errdetail("With io_uring the kernel reads and writes data files without a C library call, "
                           "so the encrypting file layer cannot encrypt or decrypt them."),
                 errhint("Set io_method = worker (the default) or io_method = sync in postgresql.conf.")));
}
