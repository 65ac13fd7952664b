// What the files of the PostgreSQL module share: each file's entry for _PG_init
// (module.cpp), which defines its settings and installs its hooks and workers.
#pragma once

void cmk_lifecycle_init(void);  // sql_lifecycle.cpp
void cmk_watchdog_init(void);   // watchdog.cpp
