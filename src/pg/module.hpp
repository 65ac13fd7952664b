// What the files of the PostgreSQL module share: each part's entry for _PG_init
// (module.cpp), which defines its settings and installs its hooks and workers, and the
// check every key-management SQL function makes first.
#pragma once

void cmk_lifecycle_init(void);  // sql_lifecycle.cpp
void cmk_watchdog_init(void);   // watchdog.cpp

// Separation of duties (sql_lifecycle.cpp): raises unless the caller is a superuser or
// a member of cmk_admin; `fn` names the SQL function for the message and the audit line.
void require_key_admin(const char* fn);
