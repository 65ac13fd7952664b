// Names the server's headers changed between the supported major versions (15, 17,
// 18, 19), mapped onto the newest spelling. Include after the PostgreSQL headers. The
// version differences that need code rather than a name live in server_version.cpp.
#pragma once

// 19 renamed CHECKPOINT_IMMEDIATE to CHECKPOINT_FAST (same flag).
#ifndef CHECKPOINT_FAST
#define CHECKPOINT_FAST CHECKPOINT_IMMEDIATE
#endif
