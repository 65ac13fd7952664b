// What the files of the PostgreSQL module share: each part's entry for _PG_init
// (module.cpp), which defines its settings and installs its hooks and workers, and the
// check every key-management SQL function makes first.
#pragma once

void cmk_lifecycle_init(void);  // sql_lifecycle.cpp
void cmk_watchdog_init(void);   // watchdog.cpp

// server_version.cpp: refuses (FATAL) a server set up for I/O the layer cannot see
// (PostgreSQL 18's io_method = io_uring). Called in the postmaster before the layer.
void cmk_check_server_io(void);
// server_version.cpp: the palloc'd path, relative to the data directory, of a fork's
// first segment ("base/5/16384_fsm"): relpathbackend() changed shape in 16 and in 18.
struct RelationData;
char* cmk_relation_path(struct RelationData* rel, int fork);

// Separation of duties (sql_lifecycle.cpp): raises unless the caller is a superuser or
// a member of cmk_admin; `fn` names the SQL function for the message and the audit line.
void require_key_admin(const char* fn);
