// Tests of the encrypting file layer as a process sees it: the binary re-executes
// itself with the layer preloaded (LD_PRELOAD) on a scratch data directory, then does
// ordinary libc file calls and checks (a) that every call behaves exactly like a plain
// file (against an in-memory model, random offsets and lengths, truncation, append,
// sequential I/O), and (b) what is on disk, read with raw system calls that bypass the
// layer: ciphertext for encrypted classes, plaintext for the documented plaintext
// list, zeros for zero pages, keys created, moved and destroyed with their files.
//
// One file past the house's ~700 lines on purpose: every test shares the re-exec
// harness and the raw-syscall readers at its top, and a test of the layer is read
// next to the model it is checked against.
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <limits.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace {

std::string g_data;  // the scratch data directory

std::string P(const std::string& rel) { return g_data + "/" + rel; }

// Raw access, bypassing the layer.
std::vector<uint8_t> raw_read(const std::string& path) {
    int fd = int(syscall(SYS_openat, AT_FDCWD, path.c_str(), O_RDONLY));
    std::vector<uint8_t> out;
    if (fd < 0) return out;
    uint8_t buf[65536];
    for (;;) {
        long n = syscall(SYS_read, fd, buf, sizeof buf);
        if (n <= 0) break;
        out.insert(out.end(), buf, buf + n);
    }
    syscall(SYS_close, fd);
    return out;
}

void raw_write(const std::string& path, const std::vector<uint8_t>& data) {
    int fd = int(syscall(SYS_openat, AT_FDCWD, path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600));
    ASSERT_GE(fd, 0);
    ASSERT_EQ(syscall(SYS_write, fd, data.data(), data.size()), long(data.size()));
    syscall(SYS_close, fd);
}

cmk::KeyMap open_keymap() {
    std::string kdir = cmk::keyring_dir_for(g_data);
    cmk::Keyring kr = cmk::load_keyring(kdir);
    auto prov = cmk::make_provider(kr.config);
    cmk::SecureBytes kek = cmk::unlock_keyring(kr, *prov);
    return cmk::KeyMap(kdir, kek, kr.cluster_id, kr.kek_generation);
}

bool keymap_has(const std::string& rel) {
    cmk::KeyMap km = open_keymap();
    return km.contains(rel);
}

std::vector<uint8_t> random_bytes(std::mt19937& rng, size_t n) {
    std::vector<uint8_t> v(n);
    for (auto& b : v) b = uint8_t(rng() % 255 + 1);  // never zero: zero units are special
    return v;
}

// True if any 32-byte window of the plaintext with non-zero data appears in raw.
bool leaks(const std::vector<uint8_t>& raw, const std::vector<uint8_t>& plain) {
    if (raw.size() != plain.size()) return false;
    for (size_t i = 0; i + 32 <= plain.size(); i += 512) {
        bool zero = true;
        for (size_t j = 0; j < 32; j++) zero &= plain[i + j] == 0;
        if (!zero && std::memcmp(raw.data() + i, plain.data() + i, 32) == 0) return true;
    }
    return false;
}

void mkdirs(const std::string& rel) {
    std::string acc = g_data;
    size_t pos = 0;
    while ((pos = rel.find('/', pos)) != std::string::npos) {
        ::mkdir((g_data + "/" + rel.substr(0, pos)).c_str(), 0700);
        pos++;
    }
}

// Splits [0, len) into 1-6 pieces for preadv/pwritev: whole 8 KiB units when units
// (PostgreSQL 17+'s vectored page I/O), anywhere otherwise (a piece may be empty).
std::vector<std::pair<size_t, size_t>> pieces(std::mt19937& rng, size_t len, bool units) {
    std::vector<size_t> cuts = {0, len};
    int n = int(rng() % 6);
    for (int i = 0; i < n; i++) {
        size_t at = len ? rng() % (len + 1) : 0;
        if (units) at -= at % 8192;
        cuts.push_back(at);
    }
    std::sort(cuts.begin(), cuts.end());
    std::vector<std::pair<size_t, size_t>> out;
    for (size_t i = 0; i + 1 < cuts.size(); i++) out.push_back({cuts[i], cuts[i + 1] - cuts[i]});
    return out;
}

std::vector<struct iovec> iovecs(std::vector<std::vector<uint8_t>>& bufs) {
    std::vector<struct iovec> iov;
    for (auto& b : bufs) iov.push_back({b.data(), b.size()});
    return iov;
}

// Random operations against an in-memory model.
// keep_head: the file's first keep_head bytes are only ever written as zeros (a WAL
// segment's long page header is PostgreSQL's, not random bytes, and stays plaintext).
void model_test(const std::string& rel, unsigned seed, int ops, size_t keep_head = 0) {
    std::mt19937 rng(seed);
    mkdirs(rel);
    std::string path = P(rel);
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<uint8_t> model;
    for (int i = 0; i < ops; i++) {
        int op = int(rng() % 12);
        if (op <= 3) {  // pwrite at a random (often unaligned) place
            size_t off = rng() % 70000, len = 1 + rng() % 20000;
            if (rng() % 3 == 0) off = (off / 8192) * 8192, len = 8192 * (1 + rng() % 3);
            auto d = random_bytes(rng, len);
            for (size_t p = off; p < keep_head && p < off + len; p++) d[p - off] = 0;
            ASSERT_EQ(::pwrite(fd, d.data(), len, off), ssize_t(len)) << strerror(errno);
            if (model.size() < off + len) model.resize(off + len, 0);
            std::memcpy(model.data() + off, d.data(), len);
        } else if (op <= 5) {  // pread anywhere, possibly past the end
            size_t off = rng() % 80000, len = 1 + rng() % 20000;
            std::vector<uint8_t> got(len);
            ssize_t n = ::pread(fd, got.data(), len, off);
            size_t expect = off >= model.size() ? 0 : std::min(len, model.size() - off);
            ASSERT_EQ(n, ssize_t(expect)) << "op " << i;
            ASSERT_EQ(0, std::memcmp(got.data(), model.data() + off, expect)) << "op " << i << " off " << off;
        } else if (op == 6) {  // truncate (shrink or grow)
            size_t len = rng() % 60000;
            ASSERT_EQ(::ftruncate(fd, len), 0) << strerror(errno);
            model.resize(len, 0);
        } else if (op == 7) {  // sequential write()
            size_t off = rng() % 50000, len = 1 + rng() % 3000;
            auto d = random_bytes(rng, len);
            for (size_t p = off; p < keep_head && p < off + len; p++) d[p - off] = 0;
            ASSERT_EQ(::lseek(fd, off, SEEK_SET), off_t(off));
            ASSERT_EQ(::write(fd, d.data(), len), ssize_t(len));
            ASSERT_EQ(::lseek(fd, 0, SEEK_CUR), off_t(off + len));
            if (model.size() < off + len) model.resize(off + len, 0);
            std::memcpy(model.data() + off, d.data(), len);
        } else if (op == 8) {  // sequential read()
            size_t off = rng() % 50000, len = 1 + rng() % 3000;
            ASSERT_EQ(::lseek(fd, off, SEEK_SET), off_t(off));
            std::vector<uint8_t> got(len);
            ssize_t n = ::read(fd, got.data(), len);
            size_t expect = off >= model.size() ? 0 : std::min(len, model.size() - off);
            ASSERT_EQ(n, ssize_t(expect));
            ASSERT_EQ(0, std::memcmp(got.data(), model.data() + off, expect));
        } else if (op == 10) {  // pwritev from separate buffers (pwritev2 or writev at times)
            bool units = rng() % 2;
            size_t off = rng() % 70000, len = 1 + rng() % 40000;
            if (units) off -= off % 8192, len = 8192 * (1 + rng() % 5);
            auto d = random_bytes(rng, len);
            for (size_t p = off; p < keep_head && p < off + len; p++) d[p - off] = 0;
            auto ps = pieces(rng, len, units);
            std::vector<std::vector<uint8_t>> bufs;
            for (auto& [at, n] : ps) bufs.emplace_back(d.begin() + at, d.begin() + at + n);
            std::vector<struct iovec> iov = iovecs(bufs);
            int how = int(rng() % 3);
            ssize_t w;
            if (how == 2) {
                ASSERT_EQ(::lseek(fd, off, SEEK_SET), off_t(off));
                w = ::writev(fd, iov.data(), int(iov.size()));
                ASSERT_EQ(::lseek(fd, 0, SEEK_CUR), off_t(off + len));
            } else {
                w = how ? ::pwritev2(fd, iov.data(), int(iov.size()), off, 0) : ::pwritev(fd, iov.data(), int(iov.size()), off);
            }
            ASSERT_EQ(w, ssize_t(len)) << "op " << i << " " << strerror(errno);
            if (model.size() < off + len) model.resize(off + len, 0);
            std::memcpy(model.data() + off, d.data(), len);
        } else if (op == 11) {  // preadv into separate buffers, possibly past the end
            bool units = rng() % 2;
            size_t off = rng() % 80000, len = 1 + rng() % 40000;
            if (units) off -= off % 8192, len = 8192 * (1 + rng() % 5);
            auto ps = pieces(rng, len, units);
            std::vector<std::vector<uint8_t>> bufs;
            for (auto& [at, n] : ps) bufs.emplace_back(n, uint8_t(0xEE));
            std::vector<struct iovec> iov = iovecs(bufs);
            int how = int(rng() % 3);
            ssize_t n;
            if (how == 2) {
                ASSERT_EQ(::lseek(fd, off, SEEK_SET), off_t(off));
                n = ::readv(fd, iov.data(), int(iov.size()));
            } else {
                n = how ? ::preadv2(fd, iov.data(), int(iov.size()), off, 0) : ::preadv(fd, iov.data(), int(iov.size()), off);
            }
            size_t expect = off >= model.size() ? 0 : std::min(len, model.size() - off);
            ASSERT_EQ(n, ssize_t(expect)) << "op " << i;
            if (how == 2) {
                ASSERT_EQ(::lseek(fd, 0, SEEK_CUR), off_t(off + expect));
            }
            std::vector<uint8_t> got;
            for (auto& b : bufs) got.insert(got.end(), b.begin(), b.end());
            ASSERT_EQ(0, std::memcmp(got.data(), model.data() + off, expect)) << "op " << i << " off " << off;
            for (size_t p = expect; p < len; p++) ASSERT_EQ(got[p], 0xEE) << "past the end, op " << i;
        } else {  // reopen: state must come from the key map / inode, not the descriptor
            ASSERT_EQ(::close(fd), 0);
            fd = ::open(path.c_str(), O_RDWR);
            ASSERT_GE(fd, 0) << strerror(errno);
        }
        struct stat sb;
        ASSERT_EQ(::fstat(fd, &sb), 0);
        ASSERT_EQ(size_t(sb.st_size), model.size()) << "size differs after op " << i;
    }
    ::close(fd);
    std::vector<uint8_t> raw = raw_read(path);
    ASSERT_EQ(raw.size(), model.size());
    EXPECT_FALSE(leaks(raw, model)) << "plaintext found on disk for " << rel;
    // Read it all back through a fresh descriptor.
    fd = ::open(path.c_str(), O_RDONLY);
    std::vector<uint8_t> all(model.size() + 10);
    ASSERT_EQ(::pread(fd, all.data(), all.size(), 0), ssize_t(model.size()));
    EXPECT_EQ(0, std::memcmp(all.data(), model.data(), model.size()));
    ::close(fd);
}

TEST(Layer, RelationRandomAccess) { model_test("base/1/16384", 1, 400); }
TEST(Layer, RelationSecondSegment) { model_test("base/1/16384.1", 2, 200); }
TEST(Layer, TablespaceRelation) { model_test("pg_tblspc/16390/PG_15_202209061/1/16391", 3, 150); }
TEST(Layer, TempFileRandomAccess) { model_test("base/pgsql_tmp/pgsql_tmp4242.0", 4, 300); }
TEST(Layer, TempRelation) { model_test("base/1/t3_16400", 5, 150); }
TEST(Layer, TwoPhaseOddLengths) { model_test("pg_twophase/000001F4", 6, 200); }
TEST(Layer, SpillFile) { model_test("pg_replslot/s1/xid-600-lsn-0-1000000.spill", 7, 150); }
TEST(Layer, SlruAndNotify) {
    model_test("pg_xact/0000", 8, 100);
    model_test("pg_notify/0000", 9, 100);
}
TEST(Layer, WalSegment) { model_test("pg_wal/000000010000000000000001", 10, 150, 40); }

// A WAL segment's key is derived from its place in the WAL (src/fs/file_keys.cpp, "WAL
// segment keys"): no key-map entry, the long page header in clear with the mark, the
// same file fetched back as RECOVERYXLOG readable through its header, a recycled name
// reading garbage, a segment without the mark refused.
std::vector<uint8_t> wal_unit0(uint32_t tli, uint64_t segno) {
    std::vector<uint8_t> u(8192, 'q');
    auto put = [&](size_t o, uint64_t v, int n) {
        for (int i = 0; i < n; i++) u[o + i] = uint8_t(v >> (8 * i));
    };
    put(0, 0xD110, 2);             // xlp_magic (PostgreSQL 15)
    put(2, 0x0002, 2);             // xlp_info: XLP_LONG_HEADER
    put(4, tli, 4);                // xlp_tli
    put(8, segno << 24, 8);        // xlp_pageaddr (16 MiB segments)
    put(16, 0, 8);                 // xlp_rem_len, padding
    put(24, 0x1234567890ULL, 8);   // xlp_sysid
    put(32, 16u << 20, 4);         // xlp_seg_size
    put(36, 8192, 4);              // xlp_xlog_blcksz
    return u;
}

TEST(Layer, WalSegmentKeysFollowTheirPlace) {
    mkdirs("pg_wal/x");
    std::string rel = "pg_wal/000000010000000000000005", path = P(rel);
    ::unlink(path.c_str());
    std::vector<uint8_t> plain = wal_unit0(1, 5);
    std::vector<uint8_t> unit1(8192, 'r');
    plain.insert(plain.end(), unit1.begin(), unit1.end());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, plain.data(), plain.size(), 0), ssize_t(plain.size()));
    ::close(fd);
    EXPECT_FALSE(keymap_has(rel)) << "a WAL segment's key is derived, not stored";
    std::vector<uint8_t> raw = raw_read(path);
    ASSERT_EQ(raw.size(), plain.size());
    EXPECT_EQ(raw[3], 0x40) << "the mark in xlp_info";
    EXPECT_EQ(0, std::memcmp(raw.data() + 4, plain.data() + 4, 36)) << "the long page header stays plaintext";
    EXPECT_NE(0, std::memcmp(raw.data() + 40, plain.data() + 40, 64)) << "the rest of unit 0 is ciphertext";
    EXPECT_FALSE(leaks(std::vector<uint8_t>(raw.begin() + 8192, raw.end()),
                       std::vector<uint8_t>(plain.begin() + 8192, plain.end())));

    // Fetched back unchanged under another name (restore_command): read through its header.
    std::string rec = P("pg_wal/RECOVERYXLOG");
    raw_write(rec, raw);
    fd = ::open(rec.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<uint8_t> got(plain.size());
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    ::close(fd);
    EXPECT_EQ(got, plain) << "RECOVERYXLOG decrypts with the key its header names";
    // ... and kept under its name on another timeline (same place): the same bytes.
    std::string tl2 = P("pg_wal/000000020000000000000005");
    ASSERT_EQ(::rename(rec.c_str(), tl2.c_str()), 0);
    EXPECT_EQ(raw_read(tl2), raw) << "a rename to the same place rewrites nothing";
    fd = ::open(tl2.c_str(), O_RDONLY);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    ::close(fd);
    EXPECT_EQ(got, plain);

    // Recycled to another place: the stale bytes are garbage under the new key.
    std::string later = P("pg_wal/000000010000000000000009");
    ASSERT_EQ(::rename(path.c_str(), later.c_str()), 0);
    fd = ::open(later.c_str(), O_RDONLY);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    ::close(fd);
    EXPECT_NE(0, std::memcmp(got.data() + 8192, plain.data() + 8192, 8192)) << "a recycled segment reads garbage";

    // A segment without the mark (plaintext WAL) is refused, not served.
    std::string foreign = P("pg_wal/00000001000000000000000A");
    raw_write(foreign, wal_unit0(1, 10));
    fd = ::open(foreign.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    errno = 0;
    EXPECT_EQ(::pread(fd, got.data(), 8192, 0), -1) << "plaintext WAL was served";
    EXPECT_EQ(errno, EIO);
    ::close(fd);
    for (const std::string& f : {tl2, later, foreign}) ::unlink(f.c_str());
}

// What the preloaded layer has enciphered so far (its own cmk::cipher_counts, not the
// copy of the core this binary links).
cmk::CipherCounts layer_cipher_counts() {
    static auto fn = [] {
        void* h = dlopen(std::getenv("LD_PRELOAD"), RTLD_NOW | RTLD_NOLOAD);
        return h ? reinterpret_cast<cmk::CipherCounts (*)()>(dlsym(h, "_ZN3cmk13cipher_countsEv")) : nullptr;
    }();
    return fn ? fn() : cmk::CipherCounts{};
}

// PostgreSQL writes the WAL's partly filled last page again at every flush, each time
// with more records after the same prefix. Each write leaves on disk the page's XTS
// ciphertext (read back through a fresh descriptor: decryption of the whole unit) and
// only the page from its first changed block goes through the cipher; a page written
// after another segment's partly filled page of the same number (another key) is
// enciphered whole, one after a change inside the prefix from that change on.
TEST(Layer, WalPageWrittenAgainEnciphersOnlyWhatChanged) {
    ASSERT_NE(dlopen(std::getenv("LD_PRELOAD"), RTLD_NOW | RTLD_NOLOAD), nullptr);
    mkdirs("pg_wal/x");
    std::string s6 = P("pg_wal/000000010000000000000016"), s7 = P("pg_wal/000000010000000000000017");
    int fd6 = ::open(s6.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600), fd7 = ::open(s7.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd6, 0);
    ASSERT_GE(fd7, 0);
    ASSERT_EQ(::pwrite(fd6, wal_unit0(1, 0x16).data(), 8192, 0), 8192);
    ASSERT_EQ(::pwrite(fd7, wal_unit0(1, 0x17).data(), 8192, 0), 8192);
    std::mt19937 rng(20);
    std::vector<uint8_t> page(8192, 0), other(8192, 0);
    std::fill(other.begin(), other.begin() + 4000, 'o');  // partly filled, as a WAL page
    for (size_t i = 0; i < 24; i++) page[i] = uint8_t(1 + rng() % 255);
    size_t fill = 24, prev_fill = 0;
    bool fresh = true;  // the next write is enciphered whole
    int partial = 0;
    for (int i = 0; i < 80 && fill < 8192; i++) {
        size_t n = std::min<size_t>(8192 - fill, 16 + rng() % 300);
        for (size_t j = fill; j < fill + n; j++) page[j] = uint8_t(rng());
        prev_fill = fill;
        fill += n;
        size_t first_change = prev_fill;
        if (i % 10 == 9) {  // a byte inside what was written before changes
            first_change = rng() % prev_fill;
            page[first_change] ^= 0x5a;
        }
        uint64_t before = layer_cipher_counts().encrypted;
        ASSERT_EQ(::pwrite(fd6, page.data(), 8192, 3 * 8192), 8192) << strerror(errno);
        uint64_t enciphered = layer_cipher_counts().encrypted - before;
        if (fresh) {
            EXPECT_EQ(enciphered, 8192u) << "write " << i;
        } else {
            EXPECT_LE(enciphered, 8192 - 16 * (first_change / 16)) << "write " << i;
            partial += enciphered < 8192;
        }
        fresh = false;
        if (i % 7 == 6) {  // the same page number in another segment: another key
            other[100 + i] ^= 1;
            ASSERT_EQ(::pwrite(fd7, other.data(), 8192, 3 * 8192), 8192);
            fresh = true;
        }
        int rfd = ::open(s6.c_str(), O_RDONLY);
        std::vector<uint8_t> got(8192);
        ASSERT_EQ(::pread(rfd, got.data(), 8192, 3 * 8192), 8192);
        ::close(rfd);
        ASSERT_EQ(got, page) << "write " << i;
    }
    EXPECT_GT(partial, 20) << "the rewritten page was enciphered whole every time";
    std::vector<uint8_t> raw = raw_read(s6), got(8192);
    EXPECT_FALSE(leaks(std::vector<uint8_t>(raw.begin() + 3 * 8192, raw.begin() + 4 * 8192), page));
    ASSERT_EQ(::pread(fd7, got.data(), 8192, 3 * 8192), 8192);
    EXPECT_EQ(got, other);
    ::close(fd6);
    ::close(fd7);
    ::unlink(s6.c_str());
    ::unlink(s7.c_str());
}

// PostgreSQL's WAL buffer goes on filling past the flush point while the page is
// written: the page changes under the layer. Whatever it read, the copy it keeps must
// be a plaintext and the ciphertext of that plaintext, or a later write that compares
// equal to the copy would go out with ciphertext of other bytes. Here a thread changes
// the tail of the page for as long as each write runs; then the page, still, is
// written again and must read back exactly.
TEST(Layer, WalPageChangingWhileWrittenStillReadsBackExactly) {
    mkdirs("pg_wal/x");
    std::string seg = P("pg_wal/000000010000000000000018");
    int fd = ::open(seg.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, wal_unit0(1, 0x18).data(), 8192, 0), 8192);
    std::vector<uint8_t> page(8192, 0);
    std::mt19937 rng(21);
    for (size_t i = 0; i < 64; i++) page[i] = uint8_t(1 + rng() % 255);
    std::atomic<int> phase{0};  // 1: change the page, 0: leave it, 2: end
    std::atomic<bool> idle{true};
    std::thread writer_of_records([&] {
        uint32_t x = 12345u;
        for (int ph; (ph = phase.load()) != 2;) {
            if (ph == 0) {
                idle = true;
                continue;
            }
            idle = false;
            x = x * 1103515245u + 12345u;
            __atomic_store_n(&page[64 + (x >> 8) % 4000], uint8_t(x >> 24 | 1), __ATOMIC_RELAXED);
        }
    });
    std::vector<uint8_t> got(8192);
    for (int i = 0; i < 400; i++) {
        phase = 1;
        ASSERT_EQ(::pwrite(fd, page.data(), 8192, 2 * 8192), 8192);
        phase = 0;
        while (!idle.load()) {
        }
        ASSERT_EQ(::pwrite(fd, page.data(), 8192, 2 * 8192), 8192);
        ASSERT_EQ(::pread(fd, got.data(), 8192, 2 * 8192), 8192);
        ASSERT_EQ(got, page) << "write " << i;
    }
    phase = 2;
    writer_of_records.join();
    ::close(fd);
    ::unlink(seg.c_str());
}

TEST(Layer, DurableFilesGetKeysThatDieWithThem) {
    mkdirs("base/1/x");
    std::string rel = "base/1/20000";
    int fd = ::open(P(rel).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    EXPECT_FALSE(keymap_has(rel)) << "a key is made at the first write, not before";
    std::vector<uint8_t> page(8192, 'x');
    ASSERT_EQ(::pwrite(fd, page.data(), page.size(), 0), 8192);
    ::close(fd);
    EXPECT_TRUE(keymap_has(rel));
    ASSERT_EQ(::unlink(P(rel).c_str()), 0);
    EXPECT_FALSE(keymap_has(rel)) << "unlink must destroy the segment's key";
}

TEST(Layer, AppendMode) {
    mkdirs("pg_replslot/s2/x");
    std::string path = P("pg_replslot/s2/xid-1-lsn-0-1.spill");
    std::string expect;
    int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_APPEND, 0600);
    ASSERT_GE(fd, 0);
    for (int i = 0; i < 50; i++) {
        std::string rec = "change " + std::to_string(i) + std::string(size_t(i * 37 % 500), 'a' + i % 26) + ";";
        ::lseek(fd, 0, SEEK_SET);  // O_APPEND ignores the offset
        ASSERT_EQ(::write(fd, rec.data(), rec.size()), ssize_t(rec.size()));
        expect += rec;
    }
    ::close(fd);
    fd = ::open(path.c_str(), O_RDONLY);
    std::string got(expect.size(), '\0');
    ASSERT_EQ(::read(fd, &got[0], got.size()), ssize_t(got.size()));
    ::close(fd);
    EXPECT_EQ(got, expect);
    auto raw = raw_read(path);
    EXPECT_EQ(std::string(raw.begin(), raw.end()).find("change 1"), std::string::npos);
}

// Spill files keep their last partial unit in memory while appending (spill_io.cpp):
// every read (through any descriptor of the process) sees every append, the file on
// disk is complete once closed, and nothing of it is plaintext; reopening to append
// continues from the unit on disk; truncation and writes elsewhere drop the caches.
TEST(Layer, SpillAppendsAndReadsLikeAPlainFile) {
    mkdirs("pg_replslot/s3/x");
    std::string path = P("pg_replslot/s3/xid-7-lsn-0-2000000.spill");
    std::mt19937 rng(11);
    std::vector<uint8_t> model;
    int held_back = 0;  // times the file on disk lagged the appends (the fast path ran)
    auto read_all = [&](std::vector<uint8_t>& out) {
        int r = ::open(path.c_str(), O_RDONLY);
        ASSERT_GE(r, 0);
        out.clear();
        uint8_t hdr[24], body[30000];
        for (;;) {  // the decoder's pattern: a small header, then the rest
            ssize_t n = ::read(r, hdr, sizeof hdr);
            ASSERT_GE(n, 0);
            if (n == 0) break;
            out.insert(out.end(), hdr, hdr + n);
            size_t want = 1 + rng() % 700;
            n = ::read(r, body, want);
            ASSERT_GE(n, 0);
            out.insert(out.end(), body, body + n);
        }
        ::close(r);
    };
    for (int round = 0; round < 3; round++) {
        int fd = ::open(path.c_str(), O_CREAT | O_WRONLY | O_APPEND, 0600);
        ASSERT_GE(fd, 0);
        for (int i = 0; i < 400; i++) {
            size_t len = rng() % 40 == 0 ? 20000 : 1 + rng() % 700;
            auto d = random_bytes(rng, len);
            ASSERT_EQ(::write(fd, d.data(), len), ssize_t(len)) << strerror(errno);
            model.insert(model.end(), d.begin(), d.end());
            if (i % 97 == 0) {
                std::vector<uint8_t> got;
                read_all(got);
                ASSERT_EQ(got, model) << "round " << round << " append " << i;
                struct stat sb;
                ASSERT_EQ(::fstat(fd, &sb), 0);
                EXPECT_LE(size_t(sb.st_size), model.size());
                held_back += size_t(sb.st_size) < model.size();
                EXPECT_GT(size_t(sb.st_size) + 8192, model.size()) << "more than a unit held back";
            }
        }
        // The appends since the last read are in memory until the close.
        struct stat sb;
        ASSERT_EQ(::fstat(fd, &sb), 0);
        held_back += size_t(sb.st_size) < model.size();
        ASSERT_EQ(::close(fd), 0);
        EXPECT_EQ(raw_read(path).size(), model.size()) << "complete on disk once closed";
    }
    EXPECT_GT(held_back, 0) << "the last unit was never held in memory";
    // A write elsewhere and a truncation through a read-write descriptor.
    int fd = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    auto d = random_bytes(rng, 3000);
    ASSERT_EQ(::pwrite(fd, d.data(), d.size(), model.size()), ssize_t(d.size()));
    model.insert(model.end(), d.begin(), d.end());
    ASSERT_EQ(::pwrite(fd, d.data(), 100, 5000), 100);
    std::memcpy(model.data() + 5000, d.data(), 100);
    ASSERT_EQ(::ftruncate(fd, off_t(model.size() - 1234)), 0);
    model.resize(model.size() - 1234);
    ASSERT_EQ(::pwrite(fd, d.data(), 777, model.size()), 777);
    model.insert(model.end(), d.begin(), d.begin() + 777);
    std::vector<uint8_t> got(model.size() + 100);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(model.size()));
    got.resize(model.size());
    EXPECT_EQ(got, model);
    ASSERT_EQ(::close(fd), 0);
    read_all(got);
    EXPECT_EQ(got, model);
    std::vector<uint8_t> raw = raw_read(path);
    ASSERT_EQ(raw.size(), model.size());
    EXPECT_FALSE(leaks(raw, model));
}

TEST(Layer, ZeroPagesStayZeroAndHolesReadAsZero) {
    std::string path = P("base/1/20001");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> zero(8192, 0), data(8192, 7);
    ASSERT_EQ(::pwrite(fd, data.data(), 8192, 0), 8192);
    ASSERT_EQ(::pwrite(fd, zero.data(), 8192, 8192 * 2), 8192);  // block 1 is a hole
    ASSERT_EQ(::pwrite(fd, data.data(), 8192, 8192 * 3), 8192);
    std::vector<uint8_t> got(8192 * 4);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    ::close(fd);
    for (size_t i = 8192; i < 8192 * 3; i++) ASSERT_EQ(got[i], 0) << i;
    auto raw = raw_read(path);
    ASSERT_EQ(raw.size(), 8192u * 4);
    for (size_t i = 8192; i < 8192 * 3; i++) ASSERT_EQ(raw[i], 0) << "zero unit written as zeros";
    EXPECT_NE(0, std::memcmp(raw.data(), data.data(), 8192));
}

// PostgreSQL 16+ extends a relation by posix_fallocate, from an empty file on. Growing a
// file without a key keeps it all zeros, so it needs none (before, it had to get its key
// there: the file held blocks and no key, and the next open or extension failed with
// EIO). The key comes with the first write of data; the fallocated blocks read as
// zeros before and after, later writes are ciphertext, and the file stays readable
// after a reopen.
TEST(Layer, FallocateFromEmptyStaysKeylessUntilData) {
    std::string rel = "base/1/20010";
    int fd = ::open(P(rel).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::posix_fallocate(fd, 0, 8192 * 4), 0);
    EXPECT_FALSE(keymap_has(rel)) << "zeros need no key";
    ::close(fd);
    fd = ::open(P(rel).c_str(), O_RDWR);
    ASSERT_GE(fd, 0) << "reopen of a fallocated relation file failed: errno " << errno;
    std::vector<uint8_t> got(8192 * 4, 0xff);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    for (size_t i = 0; i < got.size(); i++) ASSERT_EQ(got[i], 0) << i;
    std::vector<uint8_t> data(8192, 'f');
    ASSERT_EQ(::pwrite(fd, data.data(), 8192, 8192 * 2), 8192);
    EXPECT_TRUE(keymap_has(rel)) << "the first write of data makes the key";
    ASSERT_EQ(::posix_fallocate(fd, 8192 * 4, 8192 * 4), 0);  // a second extension
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    for (size_t i = 0; i < 8192 * 2; i++) ASSERT_EQ(got[i], 0) << i;
    EXPECT_EQ(0, std::memcmp(got.data() + 8192 * 2, data.data(), 8192));
    ::close(fd);
    auto raw = raw_read(P(rel));
    ASSERT_EQ(raw.size(), 8192u * 8);
    EXPECT_NE(0, std::memcmp(raw.data() + 8192 * 2, data.data(), 8192)) << "block 2 is plaintext on disk";
    ASSERT_EQ(::unlink(P(rel).c_str()), 0);
}

// CREATE DATABASE (WAL_LOG) and every relation extension write zero pages first. A
// file written with zeros only gets no key (no key-map append, no fsync); it reads as
// zeros through any descriptor. The first write of data, through any descriptor, makes
// the one key every descriptor then uses: here the creating descriptor writes data
// after another one keyed the file, and both blocks must read back (before, the
// creating descriptor never looked its file up and would have replaced the key,
// leaving the other block undecryptable).
TEST(Layer, ZeroWritesNeedNoKeyAndTheFirstDataWriteMakesOne) {
    std::string rel = "base/1/20011";
    std::vector<uint8_t> zero(8192, 0), a(8192, 'a'), b(8192, 'b');
    int fd1 = ::open(P(rel).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd1, 0);
    ASSERT_EQ(::pwrite(fd1, zero.data(), 8192, 8192 * 5), 8192);  // extend to 6 blocks
    EXPECT_FALSE(keymap_has(rel)) << "a zero page must not make a key";
    auto raw = raw_read(P(rel));
    ASSERT_EQ(raw.size(), 8192u * 6);
    for (uint8_t x : raw) ASSERT_EQ(x, 0);
    int fd2 = ::open(P(rel).c_str(), O_RDWR);
    ASSERT_GE(fd2, 0) << "a keyless file of zeros must open: errno " << errno;
    std::vector<uint8_t> got(8192 * 6, 0xff);
    ASSERT_EQ(::pread(fd2, got.data(), got.size(), 0), ssize_t(got.size()));
    for (uint8_t x : got) ASSERT_EQ(x, 0);
    ASSERT_EQ(::pwrite(fd2, a.data(), 8192, 8192 * 1), 8192);
    EXPECT_TRUE(keymap_has(rel));
    ASSERT_EQ(::pwrite(fd1, b.data(), 8192, 8192 * 3), 8192);
    ::close(fd1);
    ::close(fd2);
    int fd3 = ::open(P(rel).c_str(), O_RDONLY);
    ASSERT_GE(fd3, 0);
    ASSERT_EQ(::pread(fd3, got.data(), got.size(), 0), ssize_t(got.size()));
    ::close(fd3);
    EXPECT_EQ(0, std::memcmp(got.data() + 8192, a.data(), 8192)) << "the other descriptor's block";
    EXPECT_EQ(0, std::memcmp(got.data() + 8192 * 3, b.data(), 8192)) << "the creating descriptor's block";
    for (size_t i : {0, 2, 4, 5})
        for (size_t j = 0; j < 8192; j++) ASSERT_EQ(got[i * 8192 + j], 0) << i;
    raw = raw_read(P(rel));
    EXPECT_NE(0, std::memcmp(raw.data() + 8192, a.data(), 8192));
    EXPECT_NE(0, std::memcmp(raw.data() + 8192 * 3, b.data(), 8192));
    ASSERT_EQ(::unlink(P(rel).c_str()), 0);
}

// A key-map entry whose file went without it (removed behind the layer's back, as a
// crash between the unlink and the key's removal leaves it) must never serve a new file
// of the same name: the create drops it, and the new file's data gets a new key.
TEST(Layer, CreateDropsAStaleKeyOfItsName) {
    std::string rel = "base/1/20012";
    std::vector<uint8_t> a(8192, 'a');
    int fd = ::open(P(rel).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pwrite(fd, a.data(), 8192, 0), 8192);
    ::close(fd);
    std::optional<std::string> before = open_keymap().fingerprint(rel);
    ASSERT_TRUE(before.has_value());
    ASSERT_EQ(::syscall(SYS_unlink, P(rel).c_str()), 0);  // behind the layer
    ASSERT_TRUE(keymap_has(rel));
    fd = ::open(P(rel).c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    EXPECT_FALSE(keymap_has(rel)) << "the stale entry must go at the create";
    ASSERT_EQ(::pwrite(fd, a.data(), 8192, 0), 8192);
    ::close(fd);
    std::optional<std::string> after = open_keymap().fingerprint(rel);
    ASSERT_TRUE(after.has_value());
    EXPECT_NE(*before, *after) << "a new file must not reuse the old file's key";
    ASSERT_EQ(::unlink(P(rel).c_str()), 0);
}

// A file without a key may hold zeros only: a byte of data past its first unit is
// refused when that unit is read (the open looks at the first unit only).
TEST(Layer, KeylessFileWithDataPastItsFirstUnitIsRefusedWhenRead) {
    std::vector<uint8_t> f(8192 * 3, 0);
    f[8192 * 2 + 100] = 'x';
    raw_write(P("base/1/20013"), f);
    int fd = ::open(P("base/1/20013").c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> got(8192, 0xff);
    EXPECT_EQ(::pread(fd, got.data(), 8192, 0), 8192);
    for (uint8_t x : got) ASSERT_EQ(x, 0);
    errno = 0;
    EXPECT_EQ(::pread(fd, got.data(), 8192, 8192 * 2), -1);
    EXPECT_EQ(errno, EIO);
    for (uint8_t x : got) ASSERT_EQ(x, 0) << "nothing of the damaged unit is handed out";
    ::close(fd);
    ASSERT_EQ(::syscall(SYS_unlink, P("base/1/20013").c_str()), 0);
}

TEST(Layer, RenameCarriesTheKey) {
    mkdirs("pg_wal/x");
    std::string tmp = P("pg_wal/xlogtemp.777"), seg = P("pg_wal/000000010000000000000002");
    ::unlink(tmp.c_str());
    int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> page(8192, 'w');
    std::vector<uint8_t> first = wal_unit0(1, 2);
    ASSERT_EQ(::pwrite(fd, first.data(), 8192, 0), 8192);
    for (int i = 1; i < 4; i++) ASSERT_EQ(::pwrite(fd, page.data(), 8192, i * 8192), 8192);
    ::close(fd);
    ASSERT_EQ(::rename(tmp.c_str(), seg.c_str()), 0);
    EXPECT_FALSE(keymap_has("pg_wal/xlogtemp.777"));
    // A segment name takes its derived key: the file was rewritten under it.
    EXPECT_FALSE(keymap_has("pg_wal/000000010000000000000002"));
    fd = ::open(seg.c_str(), O_RDONLY);
    std::vector<uint8_t> got(8192);
    ASSERT_EQ(::pread(fd, got.data(), 8192, 3 * 8192), 8192);
    EXPECT_EQ(got, page);
    ASSERT_EQ(::pread(fd, got.data(), 8192, 0), 8192);
    EXPECT_EQ(got, first);
    ::close(fd);
}

TEST(Layer, RenameToPlaintextClassDecrypts) {
    // PostgreSQL writes timeline history files as pg_wal/xlogtemp.N, renames them to
    // NNNNNNNN.history and reads them through stdio: they must end up plaintext.
    std::string tmp = P("pg_wal/xlogtemp.778"), hist = P("pg_wal/00000002.history");
    ::unlink(tmp.c_str());
    int fd = ::open(tmp.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    std::string text = "1\t0/3000000\tno recovery target specified\n";
    ASSERT_EQ(::write(fd, text.data(), text.size()), ssize_t(text.size()));
    ::close(fd);
    auto enc = raw_read(tmp);
    EXPECT_NE(std::string(enc.begin(), enc.end()), text);
    ASSERT_EQ(::rename(tmp.c_str(), hist.c_str()), 0);
    auto raw = raw_read(hist);
    EXPECT_EQ(std::string(raw.begin(), raw.end()), text);
    EXPECT_FALSE(keymap_has("pg_wal/xlogtemp.778"));
}

TEST(Layer, PlaintextClassIsUntouched) {
    std::string path = P("PG_VERSION");
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ASSERT_EQ(::write(fd, "15\n", 3), 3);
    ::close(fd);
    auto raw = raw_read(path);
    EXPECT_EQ(std::string(raw.begin(), raw.end()), "15\n");
}

TEST(Layer, KeylessDataFileIsRefused) {
    std::vector<uint8_t> junk(8192, 'j');
    raw_write(P("base/1/20002"), junk);
    errno = 0;
    int fd = ::open(P("base/1/20002").c_str(), O_RDONLY);
    EXPECT_EQ(fd, -1);
    EXPECT_EQ(errno, EIO);
}

TEST(Layer, DupSharesTheCipherState) {
    std::string path = P("base/1/20003");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    int fd2 = ::dup(fd);
    ::close(fd);
    std::vector<uint8_t> page(8192, 'd');
    ASSERT_EQ(::pwrite(fd2, page.data(), 8192, 0), 8192);
    ::close(fd2);
    auto raw = raw_read(path);
    EXPECT_NE(raw, page);
    fd = ::open(path.c_str(), O_RDONLY);
    std::vector<uint8_t> got(8192);
    ASSERT_EQ(::read(fd, got.data(), 8192), 8192);
    ::close(fd);
    EXPECT_EQ(got, page);
}

bool mapped_in_this_process(const std::string& path) {
    std::FILE* f = std::fopen("/proc/self/maps", "r");
    if (!f) return false;
    char line[4096];
    bool found = false;
    while (std::fgets(line, sizeof line, f)) {
        std::string l(line);
        if (l.size() > path.size() && l.compare(l.size() - path.size() - 1, path.size(), path) == 0)
            found = true;
    }
    std::fclose(f);
    return found;
}

// Whole-page reads of relation files are decrypted straight from a mapping of the page
// cache; what other descriptors write is seen at once, and a file truncated by another
// descriptor under the mapping reads as a short read (the SIGBUS guard), not a crash.
TEST(Layer, RelationReadsThroughTheMapping) {
    const size_t U = 8192;
    mkdirs("base/1/x");
    std::string path = P("base/1/16500");
    ::unlink(path.c_str());
    std::mt19937 rng(77);
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0) << strerror(errno);
    auto d = random_bytes(rng, 4 * U);
    ASSERT_EQ(::pwrite(fd, d.data(), d.size(), 0), ssize_t(d.size()));
    ASSERT_FALSE(mapped_in_this_process(path));
    std::vector<uint8_t> got(U);
    ASSERT_EQ(::pread(fd, got.data(), U, U), ssize_t(U));
    EXPECT_EQ(0, std::memcmp(got.data(), d.data() + U, U));
    ASSERT_TRUE(mapped_in_this_process(path)) << "an aligned page read did not map the segment";
    auto wide = std::vector<uint8_t>(2 * U);
    ASSERT_EQ(::pread(fd, wide.data(), 2 * U, 2 * U), ssize_t(2 * U));
    EXPECT_EQ(0, std::memcmp(wide.data(), d.data() + 2 * U, 2 * U));
    EXPECT_FALSE(leaks(raw_read(path), d));

    // Another descriptor rewrites page 0: the mapping is the page cache, so it is seen.
    int fd2 = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd2, 0);
    auto d0 = random_bytes(rng, U);
    ASSERT_EQ(::pwrite(fd2, d0.data(), U, 0), ssize_t(U));
    ASSERT_EQ(::pread(fd, got.data(), U, 0), ssize_t(U));
    EXPECT_EQ(0, std::memcmp(got.data(), d0.data(), U));

    // ... truncates the file to one page: reading page 2 through the stale mapping
    // faults, and the read falls back to pread and reports the end of the file.
    ASSERT_EQ(::ftruncate(fd2, U), 0);
    EXPECT_EQ(::pread(fd, got.data(), U, 2 * U), 0);
    EXPECT_EQ(::pread(fd, wide.data(), 2 * U, 0), ssize_t(U));
    EXPECT_EQ(0, std::memcmp(wide.data(), d0.data(), U));

    // ... and extends it again, with a hole: new pages and zero pages read right.
    auto d5 = random_bytes(rng, U);
    ASSERT_EQ(::pwrite(fd2, d5.data(), U, 5 * U), ssize_t(U));
    ASSERT_EQ(::pread(fd, got.data(), U, 5 * U), ssize_t(U));
    EXPECT_EQ(0, std::memcmp(got.data(), d5.data(), U));
    ASSERT_EQ(::pread(fd, got.data(), U, 3 * U), ssize_t(U));
    EXPECT_EQ(std::vector<uint8_t>(U, 0), got);

    // The same descriptor's own truncation lowers what it reads through the mapping.
    ASSERT_EQ(::ftruncate(fd, 2 * U), 0);
    EXPECT_EQ(::pread(fd, got.data(), U, 5 * U), 0);
    ::close(fd2);
    ::close(fd);
    EXPECT_FALSE(mapped_in_this_process(path)) << "close did not unmap";
}

// A process keeps the keys of files it has closed (SLRU segments are reopened for every
// page). Another process unlinking the file and creating it again gives it a new key:
// reopened here, it must be read with that key, not the kept one.
TEST(Layer, KeptKeyIsNotUsedForAFileRecreatedElsewhere) {
    const size_t U = 8192;
    std::mt19937 rng(82);
    std::string path = P("pg_xact/0001");
    ::mkdir(P("pg_xact").c_str(), 0700);
    ::unlink(path.c_str());
    auto d1 = random_bytes(rng, 4 * U), d2 = random_bytes(rng, 4 * U);
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0) << strerror(errno);
    ASSERT_EQ(::pwrite(fd, d1.data(), d1.size(), 0), ssize_t(d1.size()));
    ::close(fd);
    std::vector<uint8_t> got(4 * U);
    for (int i = 0; i < 2; i++) {  // opened and closed as PostgreSQL's SLRU code does
        fd = ::open(path.c_str(), O_RDWR);
        ASSERT_GE(fd, 0);
        ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
        ::close(fd);
        ASSERT_EQ(got, d1);
    }
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        ::unlink(path.c_str());
        int f = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
        if (f < 0 || ::pwrite(f, d2.data(), d2.size(), 0) != ssize_t(d2.size())) _exit(1);
        ::close(f);
        _exit(0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    fd = ::open(path.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    EXPECT_EQ(got, d2) << "the file was read with the key of the file it replaced";
    // And this process's own rewrite of it is read back with the same key.
    ASSERT_EQ(::pwrite(fd, d1.data(), U, 0), ssize_t(U));
    ::close(fd);
    fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::pread(fd, got.data(), U, 0), ssize_t(U));
    EXPECT_EQ(0, std::memcmp(got.data(), d1.data(), U));
    ::close(fd);
    ::unlink(path.c_str());
}

long minor_faults() {
    struct rusage ru {};
    ::getrusage(RUSAGE_SELF, &ru);
    return ru.ru_minflt;
}

// Reads buf.size() bytes at off into buf; true if it was served through the mapping, which
// touches a page of the mapping not yet in this process's page tables (a minor fault)
// where pread into an already touched buffer takes none.
bool read_was_mapped(int fd, std::vector<uint8_t>& buf, off_t off) {
    long before = minor_faults();
    EXPECT_EQ(::pread(fd, buf.data(), buf.size(), off), ssize_t(buf.size()));
    return minor_faults() > before;
}

// A segment that grows after its first read stays readable through its mapping; the
// per-process budget (64 MiB in this test binary: reexec) counts bytes made readable:
// a descriptor over it reads with pread, and once other descriptors close and give
// their share back, a new descriptor of the same file is mapped.
TEST(Layer, MappingFollowsGrowthWithinTheBudget) {
    const size_t U = 8192;
    const off_t MiB = 1 << 20;
    std::mt19937 rng(78);
    std::string a = P("base/1/16502"), b = P("base/1/16503");
    ::unlink(a.c_str());
    ::unlink(b.c_str());
    int fa = ::open(a.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fa, 0) << strerror(errno);
    auto p0 = random_bytes(rng, U);
    ASSERT_EQ(::pwrite(fa, p0.data(), U, 0), ssize_t(U));
    std::vector<uint8_t> got(U);
    std::fill(got.begin(), got.end(), 1);  // touched: pread into it takes no fault
    ASSERT_TRUE(read_was_mapped(fa, got, 0));
    EXPECT_EQ(got, p0);
    // Another descriptor grows the file to 40 MiB, far past what it was when mapped.
    int fa2 = ::open(a.c_str(), O_RDWR);
    ASSERT_GE(fa2, 0);
    auto p1 = random_bytes(rng, U);
    ASSERT_EQ(::pwrite(fa2, p1.data(), U, 40 * MiB - U), ssize_t(U));
    ::close(fa2);
    EXPECT_TRUE(read_was_mapped(fa, got, 40 * MiB - U)) << "a grown segment was read with pread";
    EXPECT_EQ(got, p1);
    EXPECT_FALSE(read_was_mapped(fa, got, 40 * MiB - U)) << "a second read of a mapped page faulted";

    // b (32 MiB) does not fit beside a's 40 MiB: its reads use pread, and are right.
    int fb = ::open(b.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fb, 0);
    auto p2 = random_bytes(rng, U);
    ASSERT_EQ(::pwrite(fb, p2.data(), U, 32 * MiB - U), ssize_t(U));
    EXPECT_FALSE(read_was_mapped(fb, got, 32 * MiB - U)) << "the budget was not applied";
    EXPECT_EQ(got, p2);
    ASSERT_EQ(::pread(fb, got.data(), U, 0), ssize_t(U));
    EXPECT_EQ(got, std::vector<uint8_t>(U, 0));
    ::close(fb);
    // Closing a gives its share back: a new descriptor of b is mapped.
    ::close(fa);
    fb = ::open(b.c_str(), O_RDONLY);
    ASSERT_GE(fb, 0);
    std::fill(got.begin(), got.end(), 1);
    EXPECT_TRUE(read_was_mapped(fb, got, 32 * MiB - U)) << "closing did not return the budget";
    EXPECT_EQ(got, p2);
    ::close(fb);
    ::unlink(a.c_str());
    ::unlink(b.c_str());
}

// Run in a child by MappedReadsOffUnderAnAddressSpaceLimit (CMK_LAYER_TEST_CHILD=as):
// a process with a finite RLIMIT_AS (inherited over exec, as from a ulimit -v in a
// server's start script) must not map segments, one without must. The layer decides
// once per process, so the check needs a process of its own.
// Writes four random units to a new relation file, reads each back (checked), and
// says whether this process then has the file mapped.
bool write_read_back_mapped(const char* rel, unsigned seed) {
    const size_t U = 8192;
    std::mt19937 rng(seed);
    std::string path = P(rel);
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    EXPECT_GE(fd, 0) << strerror(errno);
    if (fd < 0) return false;
    auto d = random_bytes(rng, 4 * U);
    EXPECT_EQ(::pwrite(fd, d.data(), d.size(), 0), ssize_t(d.size()));
    std::vector<uint8_t> got(U, 1);
    for (int i = 0; i < 4; i++) {
        EXPECT_EQ(::pread(fd, got.data(), U, off_t(i) * U), ssize_t(U));
        EXPECT_EQ(0, std::memcmp(got.data(), d.data() + size_t(i) * U, U)) << "unit " << i;
    }
    bool mapped = mapped_in_this_process(path);
    ::close(fd);
    ::unlink(path.c_str());
    return mapped;
}

TEST(LayerChild, MappingFollowsTheAddressSpaceLimit) {
    const char* child = std::getenv("CMK_LAYER_TEST_CHILD");
    if (!child || std::strcmp(child, "as") != 0) GTEST_SKIP() << "run by Layer.MappedReadsOffUnderAnAddressSpaceLimit";
    struct rlimit rl {};
    ASSERT_EQ(::getrlimit(RLIMIT_AS, &rl), 0);
    const bool limited = rl.rlim_cur != RLIM_INFINITY;
    EXPECT_EQ(write_read_back_mapped(limited ? "base/1/16505" : "base/1/16506", limited ? 80 : 81), !limited)
        << (limited ? "mapped a segment under a finite RLIMIT_AS" : "did not map a segment without a limit");
}

// Mapped reads are off unless CMK_LAKEBASE_MAP_READS=on (mapped_reads.cpp: they cost
// a read-write load more than they save); any other value keeps them off.
TEST(LayerChild, ReadsWithoutMappingByDefault) {
    const char* child = std::getenv("CMK_LAYER_TEST_CHILD");
    if (!child || std::strcmp(child, "nomap") != 0) GTEST_SKIP() << "run by Layer.MappedReadsAreOffUnlessTurnedOn";
    EXPECT_FALSE(write_read_back_mapped("base/1/16507", 82))
        << "mapped a segment although mapped reads were not turned on";
}

// Runs LayerChild.<test> in a fresh process of this binary (the layer still preloaded,
// the same scratch data directory, a shared region of its own) after pre() in the
// forked child; its exit status, or -1.
template <typename Pre>
int run_layer_child(const char* tag, const char* test, Pre pre) {
    pid_t pid = ::fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        pre();
        ::setenv("CMK_LAYER_TEST_CHILD", tag, 1);
        std::string filter = std::string("--gtest_filter=LayerChild.") + test;
        char self[] = "cmk_layer_tests";
        char* argv[] = {self, filter.data(), nullptr};
        ::execv("/proc/self/exe", argv);
        _exit(4);
    }
    int status = 0;
    if (::waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(Layer, MappedReadsAreOffUnlessTurnedOn) {
    for (const char* v : {static_cast<const char*>(nullptr), "off", "yes"}) {
        int rc = run_layer_child("nomap", "ReadsWithoutMappingByDefault", [v] {
            if (v)
                ::setenv("CMK_LAKEBASE_MAP_READS", v, 1);
            else
                ::unsetenv("CMK_LAKEBASE_MAP_READS");
        });
        EXPECT_EQ(rc, 0) << "CMK_LAKEBASE_MAP_READS=" << (v ? v : "(unset)");
    }
}

// Runs LayerChild.MappingFollowsTheAddressSpaceLimit with and without a 4 GiB
// RLIMIT_AS; both must pass.
TEST(Layer, MappedReadsOffUnderAnAddressSpaceLimit) {
    for (bool limit : {true, false}) {
        int rc = run_layer_child("as", "MappingFollowsTheAddressSpaceLimit", [limit] {
            if (!limit) return;
            struct rlimit rl {};
            rl.rlim_cur = rl.rlim_max = rlim_t(4) << 30;
            if (::setrlimit(RLIMIT_AS, &rl) != 0) _exit(3);
        });
        EXPECT_EQ(rc, 0) << (limit ? "with" : "without") << " RLIMIT_AS";
    }
}

// Whether a pwrite through the layer ends within wait_ms while another open file
// description holds a read lock over the units of [off, off + len) (raw fcntl): kEnded
// or kWaited; the lock is released afterwards either way and the write waited for.
// kFailed if the lock could not be taken or the write did not write it all.
enum class UnderLock { kEnded, kWaited, kFailed };
UnderLock write_under_read_lock(int fd, const std::string& path, const uint8_t* d, size_t len, off_t off, int wait_ms) {
    int rfd = int(syscall(SYS_openat, AT_FDCWD, path.c_str(), O_RDONLY));
    if (rfd < 0) return UnderLock::kFailed;
    struct flock fl {};
    fl.l_type = F_RDLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = off - off % 8192;
    fl.l_len = off_t(len) + off % 8192;
    if (syscall(SYS_fcntl, rfd, F_OFD_SETLK, &fl) != 0) {
        syscall(SYS_close, rfd);
        return UnderLock::kFailed;
    }
    std::atomic<bool> done{false};
    std::atomic<ssize_t> wrote{-2};
    std::thread t([&] {
        wrote = ::pwrite(fd, d, len, off);
        done = true;
    });
    for (int i = 0; i < wait_ms && !done; i++) ::usleep(1000);
    bool ended = done;
    fl.l_type = F_UNLCK;
    syscall(SYS_fcntl, rfd, F_OFD_SETLK, &fl);
    t.join();
    syscall(SYS_close, rfd);
    if (wrote != ssize_t(len)) return UnderLock::kFailed;
    return ended ? UnderLock::kEnded : UnderLock::kWaited;
}

// Run in a child by WalWritesLockOnlyWhileWalIsRead (CMK_LAYER_TEST_CHILD=wal), a
// process whose shared region no WAL reader has registered in yet.
TEST(LayerChild, WalLockFollowsReaders) {
    const char* child = std::getenv("CMK_LAYER_TEST_CHILD");
    if (!child || std::strcmp(child, "wal") != 0) GTEST_SKIP() << "run by Layer.WalWritesLockOnlyWhileWalIsRead";
    const size_t U = 8192;
    std::mt19937 rng(82);
    std::string path = P("pg_wal/000000010000000000000007");
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0) << strerror(errno);
    std::vector<uint8_t> model = random_bytes(rng, 2 * U);
    std::memset(model.data(), 0, 40);  // where PostgreSQL's long page header goes
    ASSERT_EQ(::pwrite(fd, model.data(), model.size(), 0), ssize_t(model.size()));
    auto rewrite_unit = [&](size_t u, int wait_ms) {
        auto d = random_bytes(rng, U);
        if (u == 0) std::memset(d.data(), 0, 40);
        std::memcpy(model.data() + u * U, d.data(), U);
        return write_under_read_lock(fd, path, d.data(), U, off_t(u * U), wait_ms);
    };
    // No process has read WAL: a whole-unit write does not take the lock.
    EXPECT_EQ(rewrite_unit(0, 5000), UnderLock::kEnded) << "a whole-unit WAL write waited for the lock with no WAL reader";
    // A write of part of a unit (read-modify-write) always does.
    {
        auto d = random_bytes(rng, 100);
        std::memcpy(model.data() + U + 10, d.data(), d.size());
        EXPECT_EQ(write_under_read_lock(fd, path, d.data(), d.size(), off_t(U + 10), 300), UnderLock::kWaited)
            << "a partial-unit WAL write did not wait for the lock";
    }
    // A reader that has exited: the next write locks (and clears its slot); the one
    // after it goes unlocked again.
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
        int rfd = ::open(path.c_str(), O_RDONLY);
        uint8_t b[8192];
        _exit(rfd >= 0 && ::pread(rfd, b, U, 0) == ssize_t(U) ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    EXPECT_EQ(rewrite_unit(1, 300), UnderLock::kWaited) << "a WAL write right after a reader registered did not lock";
    UnderLock r = UnderLock::kWaited;  // dead readers are looked for at most once a second
    for (int i = 0; i < 40 && r == UnderLock::kWaited; i++) r = rewrite_unit(1, 100);
    EXPECT_EQ(r, UnderLock::kEnded) << "the slot of a reader that exited was not cleared";
    // This process reads WAL from now on: every WAL write locks.
    std::vector<uint8_t> got(2 * U);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    EXPECT_EQ(got, model);
    EXPECT_EQ(rewrite_unit(0, 300), UnderLock::kWaited) << "a WAL write did not lock while a reader was registered";
    EXPECT_EQ(rewrite_unit(1, 300), UnderLock::kWaited) << "a WAL write did not lock while a reader was registered";
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), ssize_t(got.size()));
    EXPECT_EQ(got, model);
    ::close(fd);
    ::unlink(path.c_str());
}

// WAL writes skip the unit lock while no process of the server reads WAL, and take it
// once one does (src/fs/wal_lock.cpp, "WAL pages are rewritten ...").
TEST(Layer, WalWritesLockOnlyWhileWalIsRead) {
    EXPECT_EQ(run_layer_child("wal", "WalLockFollowsReaders", [] {}), 0);
}

long major_faults() {
    struct rusage ru {};
    ::getrusage(RUSAGE_SELF, &ru);
    return ru.ru_majflt;
}

// A mapped read that waited for the disk (a major fault: a page faults in 4 KiB at a
// time) sends the descriptor's next reads to pread, which reads a page in one I/O.
TEST(Layer, ColdMappedReadBacksOffToPread) {
    const size_t U = 8192;
    std::mt19937 rng(79);
    std::string path = P("base/1/16504");
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0) << strerror(errno);
    auto d = random_bytes(rng, 64 * U);
    ASSERT_EQ(::pwrite(fd, d.data(), d.size(), 0), ssize_t(d.size()));
    ASSERT_EQ(::fsync(fd), 0);
    ::close(fd);
    fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> got(U, 1);
    // Clean pages not mapped into a process leave the page cache.
    ASSERT_EQ(::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
    long maj = major_faults();
    struct timespec t0, t1;
    ::clock_gettime(CLOCK_MONOTONIC, &t0);
    ASSERT_EQ(::pread(fd, got.data(), U, 10 * U), ssize_t(U));
    ::clock_gettime(CLOCK_MONOTONIC, &t1);
    EXPECT_EQ(0, std::memcmp(got.data(), d.data() + 10 * U, U));
    long us = (t1.tv_sec - t0.tv_sec) * 1000000L + (t1.tv_nsec - t0.tv_nsec) / 1000;
    if (major_faults() == maj || us < 60) {  // well above the 20 us the layer times
        ::close(fd);
        GTEST_SKIP() << "the page did not come from the disk slowly (" << us << " us, "
                     << major_faults() - maj << " major faults): nothing to back off from";
    }
    // Page 20 is cold too: read through the mapping it would fault; with pread it does not.
    maj = major_faults();
    long minor = minor_faults();
    ASSERT_EQ(::pread(fd, got.data(), U, 20 * U), ssize_t(U));
    EXPECT_EQ(major_faults(), maj) << "the read after a disk fault went through the mapping";
    EXPECT_EQ(minor_faults(), minor);
    EXPECT_EQ(0, std::memcmp(got.data(), d.data() + 20 * U, U));
    ::close(fd);
    ::unlink(path.c_str());
}

// A SIGBUS that is not a read of ours (a fault in some other mapping, a kill) still
// gets the default action once the layer's handler is installed.
void foreign_sigbus_child(bool fault) {
    const size_t U = 8192;
    std::string path = P("base/1/16501");
    ::unlink(path.c_str());
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    std::vector<uint8_t> page(U, 7);
    if (fd < 0 || ::pwrite(fd, page.data(), U, 0) != ssize_t(U) ||
        ::pread(fd, page.data(), U, 0) != ssize_t(U) || !mapped_in_this_process(path))
        ::_exit(3);  // the handler is installed with the first mapping
    if (!fault) ::raise(SIGBUS);
    std::string other = g_data + "/../sigbus_other";
    int ofd = ::open(other.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (ofd < 0 || ::ftruncate(ofd, 2 * U) != 0) ::_exit(4);
    auto* m = static_cast<volatile uint8_t*>(::mmap(nullptr, 2 * U, PROT_READ, MAP_SHARED, ofd, 0));
    if (m == MAP_FAILED || ::ftruncate(ofd, 0) != 0) ::_exit(5);
    (void)m[U];  // beyond the end of the file now
    ::_exit(0);
}

TEST(Layer, ForeignSigbusIsNotSwallowed) {
    for (bool fault : {false, true}) {
        pid_t pid = ::fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) foreign_sigbus_child(fault);
        int status = 0;
        ASSERT_EQ(::waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFSIGNALED(status))
            << (fault ? "fault: " : "kill: ") << "exited with " << WEXITSTATUS(status);
        EXPECT_EQ(WTERMSIG(status), SIGBUS);
    }
}

TEST(Layer, DirectIo) {
    std::string path = P("base/1/20004");
    int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_DIRECT, 0600);
    if (fd < 0 && errno == EINVAL) GTEST_SKIP() << "filesystem without O_DIRECT";
    ASSERT_GE(fd, 0);
    void* buf = nullptr;
    ASSERT_EQ(posix_memalign(&buf, 4096, 16384), 0);
    std::memset(buf, 'o', 16384);
    ASSERT_EQ(::pwrite(fd, buf, 16384, 0), 16384) << strerror(errno);
    std::memset(buf, 0, 16384);
    ASSERT_EQ(::pread(fd, buf, 16384, 0), 16384) << strerror(errno);
    for (int i = 0; i < 16384; i++) ASSERT_EQ(static_cast<char*>(buf)[i], 'o');
    std::free(buf);
    ::close(fd);
}

TEST(Layer, ManyProcessesCreateSegmentsAtOnce) {
    std::vector<pid_t> kids;
    for (int k = 0; k < 4; k++) {
        pid_t pid = fork();
        if (pid == 0) {
            std::vector<uint8_t> page(8192, char('A' + k));
            for (int i = 0; i < 25; i++) {
                std::string p = P("base/1/" + std::to_string(30000 + k * 100 + i));
                int fd = ::open(p.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
                if (fd < 0 || ::pwrite(fd, page.data(), 8192, 0) != 8192) _exit(1);
                ::close(fd);
            }
            _exit(0);
        }
        kids.push_back(pid);
    }
    for (pid_t p : kids) {
        int status = 0;
        waitpid(p, &status, 0);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 25; i++) {
            std::string p = P("base/1/" + std::to_string(30000 + k * 100 + i));
            int fd = ::open(p.c_str(), O_RDONLY);
            ASSERT_GE(fd, 0) << p << ": " << strerror(errno);
            std::vector<uint8_t> got(8192);
            ASSERT_EQ(::pread(fd, got.data(), 8192, 0), 8192);
            ::close(fd);
            ASSERT_EQ(got, std::vector<uint8_t>(8192, char('A' + k))) << p;
        }
}

// pg_stat_statements' files (issue 18): the dump and the query-text file behave as
// files and are ciphertext on disk.
TEST(Layer, ExtensionStateAndTemp) {
    model_test("pg_stat/pg_stat_statements.stat", 11, 150);
    model_test("pg_stat_tmp/pgss_query_texts.stat", 12, 150);
}

// As pg_stat_statements appends query texts: each process writes records into space
// it reserved, at unaligned offsets, opening the file for each write, while the
// others do the same. Units shared by two records and the growing last unit are
// read, modified and re-encrypted by two processes at once unless the layer
// serializes them (FileLock): without it records come back garbled.
TEST(Layer, ConcurrentUnalignedAppendsToQueryTexts) {
    const std::string path = P("pg_stat_tmp/pgss_query_texts.stat");
    const int kProcs = 4, kRecords = 400;
    std::vector<size_t> off(kRecords + 1, 0);
    std::vector<std::vector<uint8_t>> rec(kRecords);
    std::mt19937 rng(13);
    for (int j = 0; j < kRecords; j++) {
        rec[j] = random_bytes(rng, 20 + rng() % 300);
        off[j + 1] = off[j] + rec[j].size();
    }
    int fd0 = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
    ASSERT_GE(fd0, 0) << strerror(errno);
    ::close(fd0);
    std::vector<pid_t> kids;
    for (int k = 0; k < kProcs; k++) {
        pid_t pid = fork();
        if (pid == 0) {
            for (int j = k; j < kRecords; j += kProcs) {
                int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0600);
                if (fd < 0 || ::pwrite(fd, rec[j].data(), rec[j].size(), off[j]) != ssize_t(rec[j].size()))
                    _exit(1);
                ::close(fd);
            }
            _exit(0);
        }
        kids.push_back(pid);
    }
    for (pid_t p : kids) {
        int status = 0;
        waitpid(p, &status, 0);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    int fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    std::vector<uint8_t> all(off[kRecords] + 1);
    ASSERT_EQ(::read(fd, all.data(), all.size()), ssize_t(off[kRecords]));
    ::close(fd);
    for (int j = 0; j < kRecords; j++)
        ASSERT_EQ(0, std::memcmp(all.data() + off[j], rec[j].data(), rec[j].size())) << "record " << j;
    std::vector<uint8_t> plain(all.begin(), all.begin() + off[kRecords]);
    EXPECT_FALSE(leaks(raw_read(path), plain));
}

// AllocateFile streams: fopen of an encrypted path gives a stream over the layer whose
// fileno() is a real descriptor (pg_stat_statements ftruncates through it); other
// paths get the C library's own stream.
TEST(Layer, StdioStreamOfAnEncryptedFile) {
    const std::string path = P("pg_stat/pg_stat_statements.stat");
    std::mt19937 rng(14);
    std::vector<uint8_t> data = random_bytes(rng, 30000);
    std::FILE* f = std::fopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr) << strerror(errno);
    ASSERT_EQ(std::fwrite(data.data(), 1, data.size(), f), data.size());
    int fd = fileno(f);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(std::fflush(f), 0);
    ASSERT_EQ(::ftruncate(fd, 20000), 0) << strerror(errno);
    ASSERT_EQ(std::fclose(f), 0);
    data.resize(20000);
    std::vector<uint8_t> raw = raw_read(path);
    ASSERT_EQ(raw.size(), data.size());
    EXPECT_FALSE(leaks(raw, data));
    f = std::fopen(path.c_str(), "rb");
    ASSERT_NE(f, nullptr);
    std::vector<uint8_t> got(data.size() + 10);
    EXPECT_EQ(std::fread(got.data(), 1, got.size(), f), data.size());
    std::fclose(f);
    got.resize(data.size());
    EXPECT_EQ(got, data);

    const std::string plain_path = P("pg_stat/pgstat.stat");
    f = std::fopen(plain_path.c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(std::fwrite(data.data(), 1, 100, f), 100u);
    std::fclose(f);
    EXPECT_EQ(raw_read(plain_path), std::vector<uint8_t>(data.begin(), data.begin() + 100));
}

// A source directory (pg_cmk combinebackup's inputs): read under its own key map,
// nothing in it written, created, removed, renamed, linked or truncated through the
// layer, a keyless non-empty file refused; a copy into the data directory gets a key of
// the data directory's own.
TEST(Layer, SourceDirectoryReadUnderItsOwnKeysAndReadOnly) {
    const std::string src = std::string(std::getenv("CMK_LAYER_TEST_ROOT")) + "/src";
    const std::string f = src + "/base/1/16384";
    std::vector<uint8_t> want(8192);
    for (size_t i = 0; i < want.size(); i++) want[i] = uint8_t(i * 7 + 1);

    int fd = ::open(f.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0) << std::strerror(errno);
    std::vector<uint8_t> got(8192);
    ASSERT_EQ(::pread(fd, got.data(), got.size(), 0), 8192);
    ::close(fd);
    EXPECT_EQ(got, want) << "decrypted under the source's own DEK";
    std::vector<uint8_t> raw = raw_read(f);
    EXPECT_NE(raw, want) << "on disk it is ciphertext";

    errno = 0;
    EXPECT_EQ(::open(f.c_str(), O_RDWR), -1);
    EXPECT_EQ(errno, EROFS);
    errno = 0;
    EXPECT_EQ(::open((src + "/base/1/99999").c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600), -1);
    EXPECT_EQ(errno, EROFS);
    EXPECT_NE(::access((src + "/base/1/99999").c_str(), F_OK), 0) << "nothing created in the source";
    errno = 0;
    EXPECT_EQ(::open((src + "/backup_label").c_str(), O_WRONLY | O_TRUNC), -1) << "plaintext-class files too";
    EXPECT_EQ(errno, EROFS);
    errno = 0;
    EXPECT_EQ(::unlink(f.c_str()), -1);
    EXPECT_EQ(errno, EROFS);
    errno = 0;
    EXPECT_EQ(::rename(f.c_str(), P("base/1/77001").c_str()), -1);
    EXPECT_EQ(errno, EROFS);
    errno = 0;
    EXPECT_EQ(::link(f.c_str(), P("base/1/77002").c_str()), -1);
    EXPECT_EQ(errno, EROFS);
    errno = 0;
    EXPECT_EQ(::truncate(f.c_str(), 100), -1);
    EXPECT_EQ(errno, EROFS);
    EXPECT_EQ(raw_read(f), raw) << "the source file is unchanged";

    fd = ::open((src + "/backup_label").c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    char lbl[64] = {};
    EXPECT_GT(::read(fd, lbl, sizeof lbl - 1), 0);
    ::close(fd);
    EXPECT_EQ(std::string(lbl).rfind("START WAL LOCATION", 0), 0u) << "plaintext-class files read as they are";

    errno = 0;
    EXPECT_EQ(::open((src + "/base/1/16385").c_str(), O_RDONLY), -1) << "a non-empty file without a key";
    EXPECT_EQ(errno, EIO);

    // Copied into the data directory: under a key of the data directory's own.
    fd = ::open(P("base/1/77003").c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, got.data(), got.size()), 8192);
    ::close(fd);
    std::vector<uint8_t> copy_raw = raw_read(P("base/1/77003"));
    EXPECT_NE(copy_raw, want);
    EXPECT_NE(copy_raw, raw) << "not the source's ciphertext: another key";
    EXPECT_TRUE(keymap_has("base/1/77003"));
    fd = ::open(P("base/1/77003").c_str(), O_RDONLY);
    std::vector<uint8_t> back(8192);
    ASSERT_EQ(::pread(fd, back.data(), back.size(), 0), 8192);
    ::close(fd);
    EXPECT_EQ(back, want);
}

// Re-executes this binary with the layer preloaded on a fresh scratch data directory.
int reexec(int argc, char** argv) {
    const char* layer = std::getenv("CMK_LAKEBASE_LAYER");
    if (!layer) layer = "build/libcmk_lakebase_fs.so";
    char tmpl[] = "/tmp/cmk_layer_test.XXXXXX";
    if (!mkdtemp(tmpl)) return 2;
    std::string root = tmpl;
    std::string data = root + "/data", keys = root + "/keys";
    ::mkdir(data.c_str(), 0700);
    for (const char* d : {"base", "base/1", "pg_wal", "pg_tblspc", "pg_stat", "pg_stat_tmp"})
        ::mkdir((data + "/" + d).c_str(), 0700);
    cmk::LocalKeyStore store(keys);
    store.ensure_dir();
    store.create("test-key");
    auto prov = cmk::make_provider(cmk::KeyConfig{"local", "test-key", {{"key_store", keys}}});
    cmk::SecureBytes kek;
    cmk::Keyring kr = cmk::create_keyring(*prov, kek);
    std::string kdir = cmk::keyring_dir_for(data);
    ::mkdir(kdir.c_str(), 0700);
    cmk::save_keyring(kdir, kr);
    cmk::KeyMap::create_empty(kdir, kr.cluster_id, kr.kek_generation);
    // A tablespace outside the data directory, linked as PostgreSQL does.
    std::string ts = root + "/ts";
    ::mkdir(ts.c_str(), 0700);
    if (::symlink(ts.c_str(), (data + "/pg_tblspc/16390").c_str()) != 0) return 2;
    // A source directory (source_dirs.cpp): another encrypted data directory with its
    // own keyring and key map, one relation file under its DEK, one non-empty file
    // without a key, one plaintext-class file.
    {
        std::string src = root + "/src", skdir = cmk::keyring_dir_for(src);
        for (const std::string& d : {src, src + "/base", src + "/base/1", skdir}) ::mkdir(d.c_str(), 0700);
        cmk::SecureBytes skek;
        cmk::Keyring skr = cmk::create_keyring(*prov, skek);
        cmk::save_keyring(skdir, skr);
        cmk::KeyMap::create_empty(skdir, skr.cluster_id, skr.kek_generation);
        cmk::KeyMap skm(skdir, skek, skr.cluster_id, skr.kek_generation);
        cmk::SecureBytes dek = skm.create("base/1/16384", cmk::FileClass::Relation);
        std::vector<uint8_t> page(8192);
        for (size_t i = 0; i < page.size(); i++) page[i] = uint8_t(i * 7 + 1);
        cmk::XtsCipher(dek.data()).encrypt(0, page.data(), page.data(), page.size());
        std::string keyless(8192, 'k');
        for (auto [rel, bytes] : {std::pair<std::string, std::string>{"base/1/16384", std::string(page.begin(), page.end())},
                                  {"base/1/16385", keyless},
                                  {"backup_label", "START WAL LOCATION: 0/2000028\n"}}) {
            FILE* f = std::fopen((src + "/" + rel).c_str(), "wb");
            if (!f || std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size() || std::fclose(f) != 0) return 2;
        }
        setenv("CMK_LAKEBASE_SOURCE_DIRS", src.c_str(), 1);
    }
    char real_layer[PATH_MAX];
    if (!realpath(layer, real_layer)) {
        fprintf(stderr, "layer %s not found (build it first)\n", layer);
        return 2;
    }
    setenv("LD_PRELOAD", real_layer, 1);
    setenv("CMK_LAKEBASE_PGDATA", data.c_str(), 1);
    setenv("CMK_LAYER_TEST_ROOT", root.c_str(), 1);
    setenv("CMK_LAKEBASE_MAP_BUDGET_MB", "64", 0);  // MappingFollowsGrowthWithinTheBudget
    setenv("CMK_LAKEBASE_MAP_READS", "on", 0);       // off by default; the mapping tests need it
    execv("/proc/self/exe", argv);
    (void)argc;
    return 2;
}

}  // namespace

int main(int argc, char** argv) {
    if (!std::getenv("CMK_LAKEBASE_PGDATA")) return reexec(argc, argv);
    g_data = std::getenv("CMK_LAKEBASE_PGDATA");
    ::testing::InitGoogleTest(&argc, argv);
    // LayerChild tests run only in the processes their parent tests start.
    if (!std::getenv("CMK_LAYER_TEST_CHILD") && ::testing::GTEST_FLAG(filter) == "*")
        ::testing::GTEST_FLAG(filter) = "*-LayerChild.*";
    int rc = RUN_ALL_TESTS();
    std::string root = std::getenv("CMK_LAYER_TEST_ROOT");
    unsetenv("LD_PRELOAD");  // the cleanup is not a test of the layer
    // A child run (CMK_LAYER_TEST_CHILD) shares its parent's root and leaves it be.
    if (rc == 0 && !std::getenv("CMK_LAYER_TEST_CHILD")) std::system(("rm -rf '" + root + "'").c_str());
    return rc;
}
