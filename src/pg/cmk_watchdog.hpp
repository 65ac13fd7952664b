// The revocation watchdog's entry for _PG_init (cmk_watchdog.cpp): defines its
// settings, requests its shared memory and registers its background worker.
#pragma once

void cmk_watchdog_init(void);
