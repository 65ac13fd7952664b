// The WAL key scheme's pure parts: key derivation, unit 0's marked plaintext header,
// and re-keying a whole segment file (walcipher.hpp).
#include "cmk_lakebase/base/walcipher.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "cmk_lakebase/base/sys.hpp"

namespace cmk {

SecureBytes wal_segment_key(const uint8_t* master, size_t n, const std::string& segment) {
    return hkdf_sha256(master, n, "cmk_lakebase wal v1 " + wal_key_id(segment), kXtsKeySize);
}

void wal_crypt_head(XtsCipher& c, bool enc, const uint8_t* p, uint8_t* q, size_t n) {
    const size_t h = kWalHead;
    if (enc) {
        if (p[3] & kWalMarkBit)  // PostgreSQL never sets it: the mark could not be told apart
            throw std::runtime_error("unit 0 of a WAL segment does not begin with a PostgreSQL page header "
                                     "(xlp_info bit 0x4000 is set)");
        c.encrypt(0, p + h, q + h, n - h);
        if (q != p) std::memcpy(q, p, h);
        q[3] |= kWalMarkBit;
        return;
    }
    if (!(p[3] & kWalMarkBit))
        throw std::runtime_error(
            "this WAL segment is not cmk_lakebase ciphertext (its page header has no mark): "
            "plaintext WAL, or WAL from a cluster without cmk_lakebase, is refused in an encrypted cluster");
    c.decrypt(0, p + h, q + h, n - h);
    if (q != p) std::memcpy(q, p, h);
    q[3] = uint8_t(q[3] & ~kWalMarkBit);
}

void wal_rekey_file(const std::string& path, const std::string& segment, const SecureBytes& from_master,
                    const SecureBytes& to_master) {
    SecureBytes kf = wal_segment_key(from_master.data(), from_master.size(), segment);
    SecureBytes kt = wal_segment_key(to_master.data(), to_master.size(), segment);
    XtsCipher from(kf.data()), to(kt.data());
    kf.wipe();
    kt.wipe();
    int fd = sys::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) throw std::runtime_error("cannot open \"" + path + "\": " + std::strerror(errno));
    SecureBytes buf(kUnitSize);
    try {
        for (uint64_t unit = 0;; unit++) {
            ssize_t n = sys::pread_full(fd, buf.data(), kUnitSize, off_t(unit * kUnitSize));
            if (n < 0) throw std::runtime_error("cannot read \"" + path + "\": " + std::strerror(errno));
            if (n == 0) break;
            bool zero = true;
            for (ssize_t i = 0; i < n && zero; i++) zero = buf.data()[i] == 0;
            if (!zero) {
                if (unit == 0 && size_t(n) >= kWalHead + 16) {
                    wal_crypt_head(from, false, buf.data(), buf.data(), size_t(n));
                    wal_crypt_head(to, true, buf.data(), buf.data(), size_t(n));
                } else {
                    from.decrypt(unit, buf.data(), buf.data(), size_t(n));
                    to.encrypt(unit, buf.data(), buf.data(), size_t(n));
                }
                if (sys::pwrite_full(fd, buf.data(), size_t(n), off_t(unit * kUnitSize)) != n)
                    throw std::runtime_error("cannot write \"" + path + "\": " + std::strerror(errno));
            }
            if (size_t(n) < kUnitSize) break;
        }
        if (::fsync(fd) != 0) throw std::runtime_error("cannot fsync \"" + path + "\": " + std::strerror(errno));
    } catch (...) {
        buf.wipe();
        sys::close(fd);
        throw;
    }
    buf.wipe();
    sys::close(fd);
}

}  // namespace cmk
