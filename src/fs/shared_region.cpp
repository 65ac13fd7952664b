// The small shared region every process of a server inherits from the postmaster
// (anonymous, MAP_SHARED, locked, excluded from core dumps): the KEK of each live
// generation (so that a rotation reaches every process without a KMS call), one slot
// per database bound to a key of its own (its state and KEK), and the WAL readers'
// registry (wal_lock.cpp). Readers that do not hold the key map's writer lock retry
// torn reads by a sequence counter.
#include <sys/mman.h>

#include <openssl/crypto.h>

#include <atomic>
#include <cstring>
#include <new>
#include <optional>
#include <stdexcept>

#include "layer_internal.hpp"

namespace cmk::fs::detail {

SharedRegion* map_shared_region() {
    void* p = real().mmap(nullptr, kSharedRegionSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    (void)::madvise(p, kSharedRegionSize, MADV_DONTDUMP);
    (void)::mlock(p, kSharedRegionSize);
    std::memset(p, 0, kSharedRegionSize);
    return new (p) SharedRegion();
}

std::optional<SecureBytes> shared_kek(uint32_t gen) {
    SharedKeys* sh = st().shared;
    if (!sh || gen == 0) return std::nullopt;
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t a = sh->seq.load(std::memory_order_acquire);
        if (a & 1) continue;
        std::optional<SecureBytes> out;
        for (const auto& sl : sh->slot)
            if (sl.generation == gen) out = SecureBytes(sl.kek, kKekSize);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (sh->seq.load(std::memory_order_relaxed) == a) return out;
    }
    return std::nullopt;
}

// The highest generation published, with its KEK.
std::optional<std::pair<uint32_t, SecureBytes>> shared_newest() {
    SharedKeys* sh = st().shared;
    if (!sh) return std::nullopt;
    uint32_t best = 0;
    for (const auto& sl : sh->slot) best = std::max(best, sl.generation);
    if (!best) return std::nullopt;
    std::optional<SecureBytes> k = shared_kek(best);
    if (!k) return std::nullopt;
    return std::make_pair(best, std::move(*k));
}

void shared_write(uint32_t gen, const uint8_t* kek) {  // kek null: retire gen
    SharedKeys* sh = st().shared;
    if (!sh) return;
    sh->seq.fetch_add(1, std::memory_order_acq_rel);
    SharedKeys::Slot* target = nullptr;
    for (auto& sl : sh->slot)
        if (sl.generation == gen) target = &sl;
    if (!target && kek)
        for (auto& sl : sh->slot)
            if (sl.generation == 0 && !target) target = &sl;
    if (target) {
        if (kek) {
            std::memcpy(target->kek, kek, kKekSize);
            target->generation = gen;
        } else {
            OPENSSL_cleanse(target->kek, kKekSize);
            target->generation = 0;
        }
    }
    sh->seq.fetch_add(1, std::memory_order_acq_rel);
}

// ---- database slots ---------------------------------------------------------------------

DbSlot* db_slot(uint32_t oid) {
    DbShared* d = st().dbshared;
    if (!d || oid == 0 || d->in_use.load(std::memory_order_acquire) == 0) return nullptr;
    for (auto& sl : d->slot)
        if (sl.oid.load(std::memory_order_acquire) == oid && sl.state.load(std::memory_order_acquire) != kDbFree)
            return &sl;
    return nullptr;
}

// The database's KEK while it is open (or closing), torn reads retried.
std::optional<SecureBytes> slot_kek(DbSlot* sl) {
    for (int attempt = 0; attempt < 1000; attempt++) {
        uint32_t a = sl->seq.load(std::memory_order_acquire);
        if (a & 1) continue;
        int state = sl->state.load(std::memory_order_acquire);
        if (state != kDbOpen && state != kDbClosing) return std::nullopt;
        SecureBytes k(sl->kek, kKekSize);
        std::atomic_thread_fence(std::memory_order_acquire);
        if (sl->seq.load(std::memory_order_relaxed) == a) return k;
    }
    return std::nullopt;
}

// Sets a database's slot (kek null: wiped). Caller holds the cluster key map's writer
// lock (or is the postmaster at start, before any child exists).
void slot_set(uint32_t oid, const SecureBytes* kek, int state) {
    DbShared* d = st().dbshared;
    if (!d) return;
    DbSlot* sl = db_slot(oid);
    if (!sl && state == kDbFree) return;
    if (!sl) {
        for (auto& x : d->slot)
            if (x.state.load() == kDbFree) {
                sl = &x;
                break;
            }
        if (!sl) throw std::runtime_error("no free database key slot");
        sl->oid.store(oid);
        d->in_use.fetch_add(1);
    }
    sl->seq.fetch_add(1, std::memory_order_acq_rel);
    if (kek)
        std::memcpy(sl->kek, kek->data(), kKekSize);
    else
        OPENSSL_cleanse(sl->kek, kKekSize);
    sl->seq.fetch_add(1, std::memory_order_acq_rel);
    sl->state.store(state, std::memory_order_release);
    if (state == kDbFree) {
        sl->oid.store(0);
        d->in_use.fetch_sub(1);
    }
    d->epoch.fetch_add(1, std::memory_order_acq_rel);
}

bool db_usable(DbSlot* sl) {
    int state = sl->state.load(std::memory_order_acquire);
    return state == kDbOpen || state == kDbClosing;
}

// A file's database is locked (its key revoked). An unbound database's freed slot
// (or one reused by another database) no longer concerns the file.
bool file_db_locked(FileCtx* c) {
    if (c->db->oid.load(std::memory_order_acquire) != c->db_oid) {
        c->db = nullptr;
        return false;
    }
    return c->db->state.load(std::memory_order_acquire) == kDbLocked;
}

void slot_state(uint32_t oid, int state) {
    DbSlot* sl = db_slot(oid);
    if (!sl) return;
    sl->state.store(state, std::memory_order_release);
    st().dbshared->epoch.fetch_add(1, std::memory_order_acq_rel);
}

}  // namespace cmk::fs::detail
