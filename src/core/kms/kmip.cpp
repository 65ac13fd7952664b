// The KMIP key provider: the CMK is an AES-256 symmetric key held by a KMIP server
// (key_id = its Unique Identifier); the KEK is wrapped with the server's Encrypt and
// unwrapped with Decrypt, and the key's health is its State attribute (GetAttributes).
// KMIP 1.2 in TTLV (kmip_ttlv.cpp) over mutual TLS (TLS 1.2 or later, OpenSSL):
// the server certificate is verified against ca_file and the host name (or IP
// address), the client authenticates with client_cert/client_key.
//
// Wrap cipher: AES-256-CBC with PKCS#5 padding and a random 16-byte IV chosen here.
// KMIP 1.2 defines no authenticated-encryption fields (GCM's tag and associated data
// arrive in KMIP 1.4), and CBC is what every KMIP 1.2 server, PyKMIP 0.10 included,
// implements. CBC has no integrity of its own: a modified blob decrypts to another
// key (or fails padding), and the keyring MAC, keyed by the KEK, refuses it.
//
// Wrapped KEK (blob) format 1:
//   byte 0 = 1 (format), byte 1 = 1 (AES-256-CBC-PKCS5), byte 2 = IV length (16),
//   IV, ciphertext (48 bytes for a 32-byte KEK).
//
// Network: one TLS connection per operation, non-blocking socket driven by poll()
// with a deadline (connect_timeout_ms for the TCP connect, timeout_ms for the whole
// exchange), TLS through a memory BIO pair so that no call can block past the
// deadline and no write can raise SIGPIPE. Transient failures (refused, reset,
// timeout, General Failure, Operation Pending) are retried with exponential backoff.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sys/single_threaded.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "kit.hpp"
#include "kmip.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk {
namespace {

using kmip::Bytes;
using kmip::Item;
using Clock = std::chrono::steady_clock;

constexpr uint8_t kBlobFormat = 1;
constexpr uint8_t kBlobAesCbcPkcs5 = 1;
constexpr size_t kIvSize = 16;

using kit::config_error;

// A failure of one attempt; `transient` says whether another attempt may succeed.
struct AttemptError {
    KmsErrorKind kind;
    std::string msg;
    bool transient;
};

using kit::BioPtr;
using kit::SslCtxPtr;
using kit::SslPtr;

struct Fd {
    int fd = -1;
    Fd() = default;
    Fd(const Fd&) = delete;
    Fd& operator=(const Fd&) = delete;
    ~Fd() {
        if (fd >= 0) sys::close(fd);
    }
};

// The last OpenSSL error as one line (the queue is cleared).
std::string openssl_reason() {
    unsigned long e, last = 0;
    while ((e = ERR_get_error()) != 0) last = e;
    if (!last) return "unknown TLS error";
    char buf[256];
    ERR_error_string_n(last, buf, sizeof buf);
    return buf;
}

bool is_ip_literal(const std::string& h) {
    unsigned char buf[sizeof(struct in6_addr)];
    return inet_pton(AF_INET, h.c_str(), buf) == 1 || inet_pton(AF_INET6, h.c_str(), buf) == 1;
}

struct Settings {
    std::string host;
    std::string port;
    std::string server_name;  // what the server certificate must name
    std::string ca_file, client_cert, client_key;
    // The kit's timing; the option for the tries is "attempts" here (documented
    // before the kit's "retries"), with the same default.
    kit::Timing timing;
};

Settings read_settings(const KeyConfig& cfg) {
    kit::require_known_options(cfg, "the kmip provider",
                               {"host", "port", "ca_file", "client_cert", "client_key", "server_name",
                                "timeout_ms", "connect_timeout_ms", "attempts"});
    Settings s;
    s.host = kit::option(cfg, "host");
    if (s.host.empty())
        throw config_error("host: the kmip provider needs option host (the KMIP server's name or address)");
    s.port = std::to_string(kit::int_option(cfg, "port", 5696, 1, 65535));
    s.server_name = kit::option(cfg, "server_name", s.host);
    s.ca_file = kit::option(cfg, "ca_file");
    if (s.ca_file.empty())
        throw config_error(
            "ca_file: the kmip provider needs option ca_file (PEM CA bundle that signed the KMIP "
            "server's certificate)");
    kit::require_readable_file("ca_file", s.ca_file);
    s.client_cert = kit::option(cfg, "client_cert");
    if (s.client_cert.empty())
        throw config_error(
            "client_cert: the kmip provider needs option client_cert (PEM client certificate for "
            "mutual TLS)");
    kit::require_readable_file("client_cert", s.client_cert);
    s.client_key = kit::option(cfg, "client_key");
    if (s.client_key.empty())
        throw config_error(
            "client_key: the kmip provider needs option client_key (PEM private key of client_cert)");
    kit::require_private_file("client_key", s.client_key);
    s.timing.connect_timeout_ms =
        kit::int_option(cfg, "connect_timeout_ms", kit::kConnectTimeoutMs, 100, 600000);
    s.timing.timeout_ms = kit::int_option(cfg, "timeout_ms", kit::kTimeoutMs, 100, 600000);
    s.timing.attempts = static_cast<int>(kit::int_option(cfg, "attempts", kit::kAttempts, 1, 10));
    if (cfg.key_id.empty() || cfg.key_id.size() > 256)
        throw config_error("key_id: the KMIP Unique Identifier of the key must be 1 to 256 characters");
    for (unsigned char c : cfg.key_id)
        if (c < 0x20 || c == 0x7F)
            throw config_error("key_id: the KMIP Unique Identifier contains a control character");
    return s;
}

// The TLS client context: TLS 1.2+, server verified against ca_file, our certificate
// and key loaded. Throws KmsError Config naming the field at fault.
SslCtxPtr make_ctx(const Settings& s) {
    ERR_clear_error();
    SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
    if (!ctx) throw config_error("kmip: cannot create a TLS context: " + openssl_reason());
    SSL_CTX_set_min_proto_version(ctx.get(), TLS1_2_VERSION);
    SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
    SSL_CTX_set_mode(ctx.get(), SSL_MODE_AUTO_RETRY);
    if (SSL_CTX_load_verify_locations(ctx.get(), s.ca_file.c_str(), nullptr) != 1)
        throw config_error("ca_file: cannot load CA certificates from \"" + s.ca_file +
                           "\": " + openssl_reason());
    if (SSL_CTX_use_certificate_chain_file(ctx.get(), s.client_cert.c_str()) != 1)
        throw config_error("client_cert: cannot load the client certificate \"" + s.client_cert +
                           "\": " + openssl_reason());
    if (SSL_CTX_use_PrivateKey_file(ctx.get(), s.client_key.c_str(), SSL_FILETYPE_PEM) != 1)
        throw config_error("client_key: cannot load the private key \"" + s.client_key +
                           "\": " + openssl_reason());
    if (SSL_CTX_check_private_key(ctx.get()) != 1)
        throw config_error("client_key: \"" + s.client_key + "\" is not the key of client_cert \"" +
                           s.client_cert + "\"");
    return ctx;
}

// One TLS connection to the KMIP server, bounded by a deadline.
class Connection {
public:
    Connection(const Settings& s, SSL_CTX* ctx) : s_(s), ctx_(ctx) {}

    Bytes exchange(const Bytes& request) {
        deadline_ = Clock::now() + std::chrono::milliseconds(s_.timing.timeout_ms);
        connect_tcp();
        start_tls();
        write_all(request.data(), request.size());
        uint8_t header[kmip::kHeaderSize];
        read_exact(header, sizeof header);
        size_t total;
        try {
            total = kmip::total_length(header);
        } catch (const kmip::TtlvError& e) {
            throw AttemptError{KmsErrorKind::Unavailable, where() + ": " + e.what(), false};
        }
        Bytes resp(total);
        std::memcpy(resp.data(), header, sizeof header);
        read_exact(resp.data() + sizeof header, total - sizeof header);
        ERR_clear_error();
        SSL_shutdown(ssl_.get());  // best effort close_notify
        flush_out(false);
        return resp;
    }

private:
    std::string where() const { return "KMIP server " + s_.host + ":" + s_.port; }

    [[noreturn]] void fail(const std::string& what, bool transient) {
        throw AttemptError{KmsErrorKind::Unavailable, where() + ": " + what, transient};
    }

    int remaining_ms(Clock::time_point until) const {
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - Clock::now()).count();
        return left < 0 ? 0 : static_cast<int>(left);
    }

    // poll() for `events` until `until`; EINTR (our signal handlers) just polls again.
    bool wait_for(short events, Clock::time_point until) {
        for (;;) {
            struct pollfd p = {fd_.fd, events, 0};
            int ms = remaining_ms(until);
            int r = ::poll(&p, 1, ms);
            if (r > 0) return true;
            if (r == 0) return false;
            if (errno != EINTR) fail(std::string("poll failed: ") + std::strerror(errno), true);
        }
    }

    // The addresses to try. In a process with one thread a host name is resolved in a
    // child process within the connect timeout (kit::resolve_in_child): a DNS server that
    // does not answer cannot hold the postmaster's start or pg_cmk past it. Elsewhere
    // (the watchdog's probe threads) the system resolver answers in its own time.
    std::vector<std::string> addresses(Clock::time_point until) {
        if (!__libc_single_threaded || kit::numeric_host(s_.host)) return {s_.host};
        try {
            std::vector<std::string> out = kit::resolve_in_child(s_.host, s_.port, std::max(1, remaining_ms(until)));
            for (std::string& a : out)
                if (a.front() == '[') a = a.substr(1, a.size() - 2);
            return out;
        } catch (const KmsError& e) {
            fail(e.what(), true);
        }
    }

    void connect_tcp() {
        Clock::time_point until = Clock::now() + std::chrono::milliseconds(s_.timing.connect_timeout_ms);
        if (until > deadline_) until = deadline_;
        std::vector<std::unique_ptr<struct addrinfo, void (*)(struct addrinfo*)>> lists;
        for (const std::string& host : addresses(until)) {
            struct addrinfo hints {};
            hints.ai_family = AF_UNSPEC;
            hints.ai_socktype = SOCK_STREAM;
            hints.ai_flags = AI_NUMERICSERV | (host == s_.host ? 0 : AI_NUMERICHOST);
            struct addrinfo* res = nullptr;
            int g = ::getaddrinfo(host.c_str(), s_.port.c_str(), &hints, &res);
            if (g != 0) fail(std::string("cannot resolve host: ") + gai_strerror(g), true);
            lists.emplace_back(res, ::freeaddrinfo);
        }
        std::string last = "no address";
        for (const auto& list : lists) {
            for (struct addrinfo* ai = list.get(); ai; ai = ai->ai_next) {
                Fd fd;
                fd.fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
                if (fd.fd < 0) {
                    last = std::string("socket: ") + std::strerror(errno);
                    continue;
                }
                int r = ::connect(fd.fd, ai->ai_addr, ai->ai_addrlen);
                if (r != 0 && errno != EINPROGRESS) {
                    last = std::string("connect: ") + std::strerror(errno);
                    continue;
                }
                if (r != 0) {
                    std::swap(fd_.fd, fd.fd);
                    bool ready = wait_for(POLLOUT, until);
                    std::swap(fd_.fd, fd.fd);
                    if (!ready) {
                        last = "connect timed out after " + std::to_string(s_.timing.connect_timeout_ms) + " ms";
                        continue;
                    }
                    int err = 0;
                    socklen_t len = sizeof err;
                    ::getsockopt(fd.fd, SOL_SOCKET, SO_ERROR, &err, &len);
                    if (err != 0) {
                        last = std::string("connect: ") + std::strerror(err);
                        continue;
                    }
                }
                int one = 1;
                ::setsockopt(fd.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                std::swap(fd_.fd, fd.fd);
                return;
            }
        }
        fail(last, true);
    }

    void start_tls() {
        ERR_clear_error();
        ssl_.reset(SSL_new(ctx_));
        if (!ssl_) fail("cannot create a TLS session: " + openssl_reason(), false);
        BIO* inner = nullptr;
        BIO* net = nullptr;
        if (BIO_new_bio_pair(&inner, 0, &net, 0) != 1)
            fail("cannot create TLS buffers: " + openssl_reason(), false);
        net_.reset(net);
        SSL_set_bio(ssl_.get(), inner, inner);  // the session owns `inner`
        X509_VERIFY_PARAM* vp = SSL_get0_param(ssl_.get());
        if (is_ip_literal(s_.server_name)) {
            if (X509_VERIFY_PARAM_set1_ip_asc(vp, s_.server_name.c_str()) != 1)
                fail("cannot set the expected server address", false);
        } else {
            X509_VERIFY_PARAM_set_hostflags(vp, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
            if (X509_VERIFY_PARAM_set1_host(vp, s_.server_name.c_str(), 0) != 1)
                fail("cannot set the expected server name", false);
            SSL_set_tlsext_host_name(ssl_.get(), s_.server_name.c_str());
        }
        tls_call([&] { return SSL_connect(ssl_.get()); }, "TLS handshake");
    }

    // Runs one SSL_* call to completion, moving bytes between the BIO pair and the
    // socket as the session asks.
    template <class F>
    int tls_call(F f, const char* what) {
        for (;;) {
            ERR_clear_error();
            int r = f();
            flush_out(true);
            if (r > 0) return r;
            int e = SSL_get_error(ssl_.get(), r);
            if (e == SSL_ERROR_WANT_READ) {
                read_in(what);
                continue;
            }
            if (e == SSL_ERROR_WANT_WRITE) continue;
            long vr = SSL_get_verify_result(ssl_.get());
            if (vr != X509_V_OK)
                fail(std::string("server certificate not trusted: ") + X509_verify_cert_error_string(vr) +
                         " (check ca_file and server_name)",
                     false);
            if (e == SSL_ERROR_ZERO_RETURN)
                fail(std::string(what) + ": the server closed the TLS session", true);
            fail(std::string(what) + " failed: " + openssl_reason(), false);
        }
    }

    void flush_out(bool must) {
        uint8_t buf[16384];
        while (BIO_ctrl_pending(net_.get()) > 0) {
            int n = BIO_read(net_.get(), buf, sizeof buf);
            if (n <= 0) break;
            size_t off = 0;
            while (off < static_cast<size_t>(n)) {
                ssize_t w = ::send(fd_.fd, buf + off, static_cast<size_t>(n) - off, MSG_NOSIGNAL);
                if (w > 0) {
                    off += static_cast<size_t>(w);
                    continue;
                }
                if (w < 0 && errno == EINTR) continue;
                if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
                    if (wait_for(POLLOUT, deadline_)) continue;
                    OPENSSL_cleanse(buf, sizeof buf);
                    if (!must) return;
                    fail("timed out after " + std::to_string(s_.timing.timeout_ms) + " ms sending", true);
                }
                OPENSSL_cleanse(buf, sizeof buf);
                if (!must) return;
                fail(std::string("send failed: ") + std::strerror(errno), true);
            }
        }
        OPENSSL_cleanse(buf, sizeof buf);
    }

    void read_in(const char* what) {
        uint8_t buf[16384];
        size_t room = BIO_ctrl_get_write_guarantee(net_.get());
        if (room == 0) fail("TLS buffer full", false);
        if (room > sizeof buf) room = sizeof buf;
        for (;;) {
            ssize_t n = ::recv(fd_.fd, buf, room, 0);
            if (n > 0) {
                BIO_write(net_.get(), buf, static_cast<int>(n));
                OPENSSL_cleanse(buf, static_cast<size_t>(n));
                return;
            }
            if (n == 0) fail(std::string(what) + ": the server closed the connection", true);
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (wait_for(POLLIN, deadline_)) continue;
                fail(std::string(what) + ": no answer within " + std::to_string(s_.timing.timeout_ms) + " ms",
                     true);
            }
            fail(std::string(what) + ": recv failed: " + std::strerror(errno), true);
        }
    }

    void write_all(const uint8_t* p, size_t n) {
        while (n > 0) {
            int chunk = n > 16384 ? 16384 : static_cast<int>(n);
            int w = tls_call([&] { return SSL_write(ssl_.get(), p, chunk); }, "sending the request");
            p += w;
            n -= static_cast<size_t>(w);
        }
    }

    void read_exact(uint8_t* p, size_t n) {
        while (n > 0) {
            int chunk = n > 16384 ? 16384 : static_cast<int>(n);
            int r = tls_call([&] { return SSL_read(ssl_.get(), p, chunk); }, "reading the answer");
            p += r;
            n -= static_cast<size_t>(r);
        }
    }

    const Settings& s_;
    SSL_CTX* ctx_;
    Fd fd_;
    SslPtr ssl_;
    BioPtr net_;
    Clock::time_point deadline_;
};

class KmipProvider : public KeyProvider {
public:
    KmipProvider(KeyConfig cfg, Settings s) : cfg_(std::move(cfg)), s_(std::move(s)) {}

    std::string name() const override { return "kmip"; }
    const KeyConfig& config() const override { return cfg_; }

    WrapResult wrap(const SecureBytes& kek) override {
        if (kek.size() != kKekSize)
            throw config_error("kmip provider: the KEK to wrap must be " + std::to_string(kKekSize) +
                               " bytes");
        uint8_t iv[kIvSize];
        random_fill(iv, sizeof iv);
        Item p = Item::structure(kmip::tag::RequestPayload);
        p.add(Item::text(kmip::tag::UniqueIdentifier, cfg_.key_id));
        p.add(crypto_params());
        p.add(Item::byte_string(kmip::tag::Data, kek.data(), kek.size()));
        p.add(Item::byte_string(kmip::tag::IvCounterNonce, iv, sizeof iv));
        Answer a = call(kmip::Operation::Encrypt, std::move(p));
        const Item* data = a.payload().find(kmip::tag::Data);
        if (!data || data->type != kmip::Type::ByteString)
            throw unavailable("the Encrypt answer for key " + cfg_.key_id + " carries no Data");
        const Bytes& ct = data->bytes;
        // AES-CBC with PKCS#5 padding of 32 bytes: exactly three blocks.
        if (ct.size() != kKekSize + 16)
            throw unavailable("the Encrypt answer for key " + cfg_.key_id + " has " +
                              std::to_string(ct.size()) + " bytes of ciphertext, expected " +
                              std::to_string(kKekSize + 16) +
                              " (is the key AES-256 and does the server honour CBC/PKCS5?)");
        if (const Item* riv = a.payload().find(kmip::tag::IvCounterNonce)) {
            if (riv->type != kmip::Type::ByteString || riv->bytes.size() != kIvSize ||
                std::memcmp(riv->bytes.data(), iv, kIvSize) != 0)
                throw unavailable("the Encrypt answer for key " + cfg_.key_id +
                                  " used an IV other than ours");
        }
        WrapResult r;
        r.blob.push_back(kBlobFormat);
        r.blob.push_back(kBlobAesCbcPkcs5);
        r.blob.push_back(static_cast<uint8_t>(kIvSize));
        r.blob.insert(r.blob.end(), iv, iv + kIvSize);
        r.blob.insert(r.blob.end(), ct.begin(), ct.end());
        return r;
    }

    SecureBytes unwrap(const std::vector<uint8_t>& blob) override {
        if (blob.size() < 3 + kIvSize + 16 || blob[0] != kBlobFormat || blob[1] != kBlobAesCbcPkcs5 ||
            blob[2] != kIvSize || (blob.size() - 3 - kIvSize) % 16 != 0)
            throw KmsError(KmsErrorKind::Revoked, "the wrapped KEK is not a kmip provider blob for key " +
                                                      cfg_.key_id + " (wrong key material)");
        Item p = Item::structure(kmip::tag::RequestPayload);
        p.add(Item::text(kmip::tag::UniqueIdentifier, cfg_.key_id));
        p.add(crypto_params());
        p.add(Item::byte_string(kmip::tag::Data, blob.data() + 3 + kIvSize, blob.size() - 3 - kIvSize));
        p.add(Item::byte_string(kmip::tag::IvCounterNonce, blob.data() + 3, kIvSize));
        Answer a = call(kmip::Operation::Decrypt, std::move(p));
        const Item* data = a.payload().find(kmip::tag::Data);
        if (!data || data->type != kmip::Type::ByteString)
            throw unavailable("the Decrypt answer for key " + cfg_.key_id + " carries no Data");
        if (data->bytes.size() != kKekSize)
            throw KmsError(KmsErrorKind::Revoked,
                           "key " + cfg_.key_id + " at " + where() + " decrypted the wrapped KEK to " +
                               std::to_string(data->bytes.size()) + " bytes, not a KEK (wrong key material)");
        return SecureBytes(data->bytes.data(), data->bytes.size());
    }

    KeyStatus status() override {
        KeyStatus st;
        try {
            Item p = Item::structure(kmip::tag::RequestPayload);
            p.add(Item::text(kmip::tag::UniqueIdentifier, cfg_.key_id));
            p.add(Item::text(kmip::tag::AttributeName, "State"));
            Answer a = call(kmip::Operation::GetAttributes, std::move(p));
            const Item* value = nullptr;
            for (const auto& m : a.payload().items) {
                if (m.tag != kmip::tag::Attribute || m.type != kmip::Type::Structure) continue;
                const Item* n = m.find(kmip::tag::AttributeName);
                if (n && n->type == kmip::Type::TextString && n->as_text() == "State")
                    value = m.find(kmip::tag::AttributeValue);
            }
            if (!value || value->type != kmip::Type::Enumeration)
                throw unavailable("the GetAttributes answer for key " + cfg_.key_id + " has no State");
            uint32_t state = value->as_enumeration();
            st.state = kmip::state_name(state);
            if (kmip::health_of_state(state) == KeyHealth::Ok) {
                st.health = KeyHealth::Ok;
                st.detail = "key " + cfg_.key_id + " is Active at " + where();
            } else {
                st.health = KeyHealth::Revoked;
                st.detail = "key " + cfg_.key_id + " is " + st.state + " at " + where() +
                            " (only an Active key can encrypt and decrypt)";
            }
        } catch (const KmsError& e) {
            st.detail = e.what();
            if (e.kind == KmsErrorKind::Revoked) {
                st.health = KeyHealth::Revoked;
                st.state = last_reason_ == static_cast<uint32_t>(kmip::ResultReason::ItemNotFound)
                               ? "not found"
                               : kmip::result_reason_name(last_reason_);
            } else {
                st.health = KeyHealth::Unavailable;
                st.state = "unavailable";
            }
        }
        return st;
    }

private:
    // A decoded Response Message and its batch item (which points into it).
    struct Answer {
        Item message;
        kmip::BatchResult result;
        const Item& payload() const {
            static const Item empty = Item::structure(kmip::tag::ResponsePayload);
            return result.payload ? *result.payload : empty;
        }
    };

    std::string where() const { return "KMIP server " + s_.host + ":" + s_.port; }

    KmsError unavailable(const std::string& m) const {
        return KmsError(KmsErrorKind::Unavailable, "kmip provider: " + m);
    }

    static Item crypto_params() {
        Item cp = Item::structure(kmip::tag::CryptographicParameters);
        cp.add(Item::enumeration(kmip::tag::BlockCipherMode, kmip::kModeCbc));
        cp.add(Item::enumeration(kmip::tag::PaddingMethod, kmip::kPaddingPkcs5));
        cp.add(Item::enumeration(kmip::tag::CryptographicAlgorithm, kmip::kAlgorithmAes));
        return cp;
    }

    // One operation with retries for transient failures; throws KmsError.
    Answer call(kmip::Operation op, Item payload) {
        last_reason_ = 0;
        Bytes request = kmip::encode(kmip::request_message(op, std::move(payload)));
        std::string what = std::string(kmip::operation_name(op)) + " of key " + cfg_.key_id;
        kit::Backoff backoff;
        for (int attempt = 1;; attempt++) {
            try {
                return attempt_once(op, request, what);
            } catch (const AttemptError& e) {
                if (!e.transient || attempt >= s_.timing.attempts)
                    throw KmsError(e.kind, "kmip provider: " + e.msg +
                                               (e.kind == KmsErrorKind::Unavailable && attempt > 1
                                                    ? " (after " + std::to_string(attempt) + " attempts)"
                                                    : std::string()));
            }
            backoff.pause();
        }
    }

    Answer attempt_once(kmip::Operation op, const Bytes& request, const std::string& what) {
        SslCtxPtr ctx;
        try {
            ctx = make_ctx(s_);  // per connection: renewed certificate files are picked up
        } catch (const KmsError& e) {
            // The files were checked at configuration time; failing now is an outage
            // of the credentials, not a revocation of the key.
            throw AttemptError{KmsErrorKind::Unavailable, e.what(), false};
        }
        Connection conn(s_, ctx.get());
        Bytes raw = conn.exchange(request);
        Answer a;
        try {
            a.message = kmip::decode(raw.data(), raw.size());
            a.result = kmip::parse_response(a.message);
        } catch (const kmip::TtlvError& e) {
            throw AttemptError{KmsErrorKind::Unavailable, where() + ": " + what + ": " + e.what(), false};
        }
        const kmip::BatchResult& r = a.result;
        if (r.operation != 0 && r.operation != static_cast<uint32_t>(op))
            throw AttemptError{KmsErrorKind::Unavailable,
                               where() + ": " + what + ": the answer is for another operation", false};
        if (r.status == kmip::ResultStatus::Success) {
            if (!r.payload)
                throw AttemptError{KmsErrorKind::Unavailable,
                                   where() + ": " + what + ": the answer has no payload", false};
            return a;
        }
        bool transient = false;
        KmsErrorKind kind = kmip::classify_failure(op, r.status, r.reason, &transient);
        last_reason_ = r.reason;
        std::string msg = where() + " refused " + what + ": " + kmip::result_reason_name(r.reason);
        if (!r.message.empty()) {
            std::string m = r.message.substr(0, 200);
            for (char& c : m)
                if (c == '\n' || c == '\r') c = ' ';
            msg += " (\"" + m + "\")";
        }
        if (kind == KmsErrorKind::Revoked)
            msg +=
                "; the key is revoked, deactivated, destroyed or no longer ours: restore it (or its access) "
                "at "
                "the KMIP server";
        throw AttemptError{kind, msg, transient};
    }

    KeyConfig cfg_;
    Settings s_;
    uint32_t last_reason_ = 0;
};

}  // namespace

namespace kmip {

// What a failed KMIP operation means (docs/providers/kmip.md).
KmsErrorKind classify_failure(Operation op, ResultStatus st, uint32_t reason, bool* transient) {
    *transient = false;
    if (st == ResultStatus::OperationPending || st == ResultStatus::OperationUndone) {
        *transient = true;
        return KmsErrorKind::Unavailable;
    }
    switch (static_cast<ResultReason>(reason)) {
        case ResultReason::ItemNotFound:                 // destroyed, or never ours
        case ResultReason::PermissionDenied:             // not Active, or access revoked
        case ResultReason::AuthenticationNotSuccessful:  // our identity was refused
        case ResultReason::ObjectArchived:               // taken offline by the KMS admin
        case ResultReason::KeyValueNotPresent:           // material gone
            return KmsErrorKind::Revoked;
        case ResultReason::CryptographicFailure:
            // Decrypt failing under the right key id means the key no longer is the
            // one that wrapped our KEK (wrong key material); Encrypt failing is not.
            return op == Operation::Decrypt ? KmsErrorKind::Revoked : KmsErrorKind::Unavailable;
        case ResultReason::GeneralFailure:
            *transient = true;
            return KmsErrorKind::Unavailable;
        default:
            // Protocol-level refusals (Invalid Message, Operation Not Supported, ...)
            // say nothing about the key: an outage to fix, never a revocation.
            return KmsErrorKind::Unavailable;
    }
}

KeyHealth health_of_state(uint32_t state) {
    return state == static_cast<uint32_t>(State::Active) ? KeyHealth::Ok : KeyHealth::Revoked;
}

}  // namespace kmip

std::unique_ptr<KeyProvider> make_kmip_provider(const KeyConfig& cfg) {
    Settings s = read_settings(cfg);
    make_ctx(s);  // certificate, key and CA parse now, before any network call
    return std::make_unique<KmipProvider>(cfg, std::move(s));
}

}  // namespace cmk
