// `pg_cmk bench-cipher`: throughput of the page cipher (AES-256-XTS over 8 KiB units,
// the cost the layer adds per page read or written), so a deployment can compare it
// with its storage. One line of output, for scripts.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cli.hpp"
#include "cmk_lakebase/base/crypto.hpp"

namespace cmk::cli {
namespace {

const char kBenchUsage[] =
    "pg_cmk bench-cipher measures the page cipher (AES-256-XTS, 8 KiB units) on this\n"
    "machine, encrypting then decrypting one 8 KiB unit in place for N seconds each\n"
    "(the tweak, the unit number, changes every call, as in the layer). One 8 KiB\n"
    "buffer, like \"openssl speed -evp aes-256-xts -bytes 8192\", so both measure the\n"
    "cipher on data in the L1 cache rather than memory bandwidth.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk bench-cipher [--seconds N] [--slru-tag]\n"
    "\n"
    "Options:\n"
    "  --seconds=N   seconds per direction (default 2)\n"
    "  --slru-tag    instead: nanoseconds per 8 KiB page of what an authenticated SLRU\n"
    "                page would add to its encryption (issue 18): XTS alone, XTS plus\n"
    "                an HMAC-SHA256 tag of the ciphertext, AES-256-GCM (encryption and\n"
    "                tag in one), XTS plus a CRC32C (detects damage, not tampering)\n"
    "  -?, --help    show this help, then exit\n"
    "\n"
    "Output: one line \"page_cipher_mb_per_s <encrypt> <decrypt>\" (MB = 10^6 bytes);\n"
    "with --slru-tag \"slru_page_ns xts <n> xts_hmac_sha256 <n> aes_gcm <n> xts_crc32c <n>\".\n";

constexpr size_t kBufferSize = kUnitSize;
constexpr uint64_t kCallsPerClockCheck = 256;

// Runs one direction over the buffer until `seconds` have passed; returns MB/s.
double run_direction(XtsCipher& cipher, std::vector<uint8_t>& buf, double seconds, bool encrypt) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    const auto limit = std::chrono::duration<double>(seconds);
    uint64_t bytes = 0, unit = 0;
    uint8_t* p = buf.data();
    std::chrono::duration<double> elapsed{};
    do {
        for (uint64_t i = 0; i < kCallsPerClockCheck; ++i, ++unit) {
            if (encrypt)
                cipher.encrypt(unit, p, p, kUnitSize);
            else
                cipher.decrypt(unit, p, p, kUnitSize);
        }
        bytes += kCallsPerClockCheck * kBufferSize;
        elapsed = Clock::now() - start;
    } while (elapsed < limit);
    return static_cast<double>(bytes) / 1e6 / elapsed.count();
}

// Nanoseconds per page of one page operation, run until `seconds` have passed.
template <typename F>
double ns_per_page(double seconds, F&& op) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    const auto limit = std::chrono::duration<double>(seconds);
    uint64_t pages = 0;
    std::chrono::duration<double> elapsed{};
    do {
        for (uint64_t i = 0; i < kCallsPerClockCheck; ++i) op(pages + i);
        pages += kCallsPerClockCheck;
        elapsed = Clock::now() - start;
    } while (elapsed < limit);
    return elapsed.count() * 1e9 / static_cast<double>(pages);
}

// What an authenticated SLRU page would cost on top of its encryption (issue 18: a
// flipped bit in pg_xact garbles 64 transaction statuses silently; a tag per page in a
// side file would turn that into a read error). The tag's write amplification is not
// measured here: 32 bytes (HMAC) or 16 (GCM) per 8 KiB page, ~0.2-0.4 %.
void bench_slru_tag(double seconds) {
    SecureBytes key = random_key(kXtsKeySize);
    SecureBytes mac_key = random_key(32);
    XtsCipher cipher(key.data());
    std::vector<uint8_t> buf = random_bytes(kBufferSize);
    uint8_t* p = buf.data();
    volatile uint8_t sink = 0;
    double xts = ns_per_page(seconds, [&](uint64_t unit) { cipher.encrypt(unit, p, p, kUnitSize); });
    double hmac = ns_per_page(seconds, [&](uint64_t unit) {
        cipher.encrypt(unit, p, p, kUnitSize);
        sink = sink ^ hmac_sha256(mac_key.data(), mac_key.size(), p, kUnitSize)[0];
    });
    const std::string aad = "pg_xact/0000";
    double gcm = ns_per_page(seconds, [&](uint64_t) {
        std::vector<uint8_t> sealed = aead_seal(mac_key.data(), p, kUnitSize, aad);
        sink = sink ^ sealed[0];
    });
    double crc = ns_per_page(seconds, [&](uint64_t unit) {
        cipher.encrypt(unit, p, p, kUnitSize);
        sink = sink ^ static_cast<uint8_t>(crc32c(p, kUnitSize));
    });
    (void)sink;
    std::printf("slru_page_ns xts %.0f xts_hmac_sha256 %.0f aes_gcm %.0f xts_crc32c %.0f\n", xts, hmac, gcm, crc);
}

}  // namespace

int cmd_bench_cipher(const std::vector<std::string>& args) {
    const std::string cmdname = "bench-cipher";
    ParsedArgs a = parse_args(cmdname, args, {{"seconds", 0, true}, {"slru-tag", 0, false}});
    if (a.has("help")) {
        std::fputs(kBenchUsage, stdout);
        return 0;
    }
    if (!a.positional.empty() || !a.rest.empty())
        throw UsageError(
            cmdname, "unexpected argument \"" + (a.positional.empty() ? a.rest[0] : a.positional[0]) + "\"");
    double seconds = 2;
    if (a.has("seconds")) {
        const std::string s = a.get("seconds");
        char* end = nullptr;
        seconds = std::strtod(s.c_str(), &end);
        if (s.empty() || *end != '\0' || !std::isfinite(seconds) || seconds <= 0 || seconds > 3600)
            throw UsageError(cmdname,
                             "invalid --seconds \"" + s + "\" (a number of seconds above 0, at most 3600)");
    }

    if (a.has("slru-tag")) {
        bench_slru_tag(seconds);
        return 0;
    }
    SecureBytes key = random_key(kXtsKeySize);
    XtsCipher cipher(key.data());
    std::vector<uint8_t> buf = random_bytes(kBufferSize);
    double enc = run_direction(cipher, buf, seconds, true);
    double dec = run_direction(cipher, buf, seconds, false);
    std::printf("page_cipher_mb_per_s %.1f %.1f\n", enc, dec);
    return 0;
}

}  // namespace cmk::cli
