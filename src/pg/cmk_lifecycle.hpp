// The key lifecycle's SQL surface (cmk_lifecycle.cpp): defines its settings.
#pragma once

void cmk_lifecycle_init(void);
