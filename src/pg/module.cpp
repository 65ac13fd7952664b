// The PostgreSQL module's entry: _PG_init (postmaster) loads the keyring, unwraps the
// KEK and installs the encrypting file layer over the server's GOT before any child is
// forked, then lets each part define its settings (sql_lifecycle.cpp, watchdog.cpp).
// The module's own setting: whether server processes may dump core.
#include <sys/prctl.h>

#include "cmk_lakebase/fs/io.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "module.hpp"
#include "wall.hpp"

extern "C" {
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "utils/guc.h"

PG_MODULE_MAGIC;

void _PG_init(void);
}

namespace {

bool allow_core_dumps = false;

// An address inside this module, for cover_modules to leave the module alone. Not
// &_PG_init: that name resolves to the first loaded library defining it (a module
// listed before cmk_lakebase in shared_preload_libraries), not necessarily to ours.
const char module_anchor = 0;

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
    cmk_check_server_io();

    cmk::pg::call_cpp(
        nullptr,
        [] {
            cmk::audit::set_default_actor("postmaster");
            cmk::fs::start_server(DataDir);
            // pg_stat_statements and other modules do their own file I/O.
            // basic_archive copies WAL segments with PostgreSQL's copy_file, which reads
            // them through the layer: the archive would be plaintext (DESIGN §7: a
            // route that cannot keep ciphertext is refused).
            cmk::fs::cover_modules(
                pkglib_path, &module_anchor,
                {{"basic_archive",
                  "basic_archive copies WAL segments through the server, which decrypts them: the "
                  "archive would hold plaintext WAL.",
                  "Use archive_command (for example cp), which copies the ciphertext segments as "
                  "they lie in pg_wal (docs/backups.md)."}});
        },
        FATAL);

    cmk_watchdog_init();
    MarkGUCPrefixReserved("cmk_lakebase");

    // Keys (and the cipher contexts holding their schedules) must not reach a core
    // file; children inherit this across fork().
    if (!allow_core_dumps && prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        ereport(WARNING, (errmsg("cmk_lakebase: could not disable core dumps: %m")));
}
