// The key arena: where OpenSSL's cipher contexts (the AES key schedules, which begin
// with the raw key) are allocated, instead of on the ordinary heap. The arena's pages
// are excluded from core dumps (MADV_DONTDUMP), locked (mlock, where RLIMIT_MEMLOCK
// allows) and wiped block by block when OpenSSL frees them. Pure C++, no PostgreSQL.
//
// How allocations get there: OpenSSL 3 allocates through CRYPTO_malloc, which calls
// libc's malloc through libcrypto's own dynamic-linker slots (GOT). The first
// KeyArenaScope redirects libcrypto's malloc, calloc, realloc and free slots (not
// anyone else's) to the arena's functions; while a scope is alive on a thread,
// libcrypto allocations made by that thread come from the arena, all others go to
// the previous functions unchanged. free() recognises arena blocks by address range,
// from any thread and at any later time. CRYPTO_set_mem_functions cannot do this:
// OpenSSL refuses it once anything has been allocated, and the server has used OpenSSL
// before the library loads.
#pragma once

#include <cstddef>

namespace cmk {

// Allocations OpenSSL makes on this thread while the scope lives go to the key arena.
// Scopes nest; one thread at a time holds them (others wait), so keep them short:
// around EVP_CIPHER_CTX_new and the keyed EVP_*Init calls.
class KeyArenaScope {
public:
    KeyArenaScope();
    ~KeyArenaScope();
    KeyArenaScope(const KeyArenaScope&) = delete;
    KeyArenaScope& operator=(const KeyArenaScope&) = delete;
};

struct KeyArenaStats {
    bool active = false;      // libcrypto's slots redirected (false: contexts stay on the heap)
    const char* reason = "";  // why not active ("" when active)
    size_t committed = 0;     // bytes of arena pages in use (mapped read-write)
    size_t in_use = 0;        // bytes of live blocks (headers included)
    size_t blocks = 0;        // live blocks
    size_t fallbacks = 0;     // scoped allocations the arena could not serve (went to the heap)
    bool lock_failed = false; // mlock of arena pages failed at least once (RLIMIT_MEMLOCK)
};

// Installs the redirection if not yet done (as the first scope would) and reports.
KeyArenaStats key_arena_stats();

// True if p lies in the key arena (tests).
bool key_arena_contains(const void* p);

}  // namespace cmk
