// The descriptor table: which open file descriptors the layer serves, each with its
// FileCtx (class, path, key, mapping). A flat array for the descriptors PostgreSQL uses
// (below 65536), a locked map above. A FileCtx is shared by dup'ed descriptors and
// freed with its last one.
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "layer_internal.hpp"

namespace cmk::fs::detail {
namespace {

constexpr int kTableSize = 1 << 16;
std::atomic<FileCtx*>* fd_table() {
    static std::atomic<FileCtx*>* t = [] {
        void* p = std::calloc(kTableSize, sizeof(std::atomic<FileCtx*>));
        if (!p) std::abort();
        return static_cast<std::atomic<FileCtx*>*>(p);
    }();
    return t;
}
std::mutex& big_fd_mu() {
    static std::mutex* m = new std::mutex();
    return *m;
}
std::unordered_map<int, FileCtx*>& big_fds() {
    static auto* m = new std::unordered_map<int, FileCtx*>();
    return *m;
}

}  // namespace

FileCtx* ctx_get(int fd) {
    if (fd < 0) return nullptr;
    if (fd < kTableSize) return fd_table()[fd].load(std::memory_order_acquire);
    std::lock_guard<std::mutex> g(big_fd_mu());
    auto it = big_fds().find(fd);
    return it == big_fds().end() ? nullptr : it->second;
}

void ctx_release(FileCtx* c) {
    if (c && c->refs.fetch_sub(1) == 1) delete c;
}

// Installs c for fd (taking one reference) and drops whatever was there.
void ctx_set(int fd, FileCtx* c) {
    FileCtx* old;
    if (fd < kTableSize) {
        old = fd_table()[fd].exchange(c, std::memory_order_acq_rel);
    } else {
        std::lock_guard<std::mutex> g(big_fd_mu());
        auto& m = big_fds();
        auto it = m.find(fd);
        old = it == m.end() ? nullptr : it->second;
        if (c)
            m[fd] = c;
        else if (it != m.end())
            m.erase(it);
    }
    ctx_release(old);
}

}  // namespace cmk::fs::detail
