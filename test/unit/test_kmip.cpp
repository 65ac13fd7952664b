// Units for the KMIP TTLV codec and the KMIP provider's configuration checks:
// the KMIP 1.2 specification's own encoding examples (test/data/kmip_ttlv_spec_examples.txt),
// byte-identity with messages written by PyKMIP's independent encoder
// (test/data/kmip_pykmip_messages.txt), round trips, and rejection of malformed input
// (every truncation, bad lengths, bad padding, deep nesting, random corruption).
#include <netinet/in.h>
#include <sys/socket.h>

#include <chrono>
#include <map>
#include <random>

#include "core/kms/kmip.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "test_helpers.hpp"

using namespace cmk;
using cmk::kmip::Bytes;
using cmk::kmip::Item;
using cmk::kmip::TtlvError;
using cmk::kmip::Type;
using cmk_test::unhex;

namespace {

Bytes to_bytes(const std::vector<uint8_t>& v) {
    return Bytes(v.begin(), v.end());
}

std::string strip_hex(const std::string& s) {
    std::string h;
    for (char c : s)
        if (std::isxdigit(static_cast<unsigned char>(c))) h.push_back(c);
    return h;
}

struct SpecExample {
    std::string kind, value;
    std::vector<uint8_t> bytes;
};

std::vector<SpecExample> spec_examples() {
    std::string text = cmk_test::slurp(cmk_test::data_dir() + "/kmip_ttlv_spec_examples.txt");
    std::vector<SpecExample> out;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        size_t sp = line.find(' ');
        size_t bar = line.find(" | ");
        SpecExample e;
        e.kind = line.substr(0, sp);
        e.value = line.substr(sp + 1, bar - sp - 1);
        e.bytes = unhex(strip_hex(line.substr(bar + 3)));
        out.push_back(e);
    }
    return out;
}

std::map<std::string, std::vector<uint8_t>> pykmip_messages() {
    std::string text = cmk_test::slurp(cmk_test::data_dir() + "/kmip_pykmip_messages.txt");
    std::map<std::string, std::vector<uint8_t>> out;
    std::istringstream in(text);
    std::string line;
    while (std::getline(in, line)) {
        if (line.empty() || line[0] == '#') continue;
        size_t sp = line.find(' ');
        out[line.substr(0, sp)] = unhex(line.substr(sp + 1));
    }
    return out;
}

Item decode(const std::vector<uint8_t>& v) {
    return kmip::decode(v.data(), v.size());
}

// A message using every type, nesting and string lengths around the padding edges.
Item everything() {
    Item inner = Item::structure(0x420002);
    inner.add(Item::integer(0x420003, -1));
    inner.add(Item::text(0x420004, ""));
    inner.add(Item::text(0x420005, "1234567"));
    inner.add(Item::text(0x420006, "12345678"));
    inner.add(Item::text(0x420007, "123456789"));
    uint8_t raw[17];
    for (int i = 0; i < 17; i++) raw[i] = static_cast<uint8_t>(0xF0 + i);
    inner.add(Item::byte_string(0x420008, raw, 17));
    inner.add(Item::byte_string(0x420009, raw, 0));
    Item outer = Item::structure(0x420001);
    outer.add(Item::long_integer(0x42000A, INT64_MIN));
    outer.add(Item::enumeration(0x42000B, 0xFFFFFFFFu));
    outer.add(Item::boolean(0x42000C, false));
    outer.add(Item::date_time(0x42000D, -5));
    outer.add(Item::interval(0x42000E, 4000000000u));
    uint8_t big[8] = {0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE};
    outer.add(Item::big_integer(0x42000F, big, 8));
    outer.add(std::move(inner));
    outer.add(Item::structure(0x420010));  // empty structure
    return outer;
}

bool same(const Item& a, const Item& b) {
    if (a.tag != b.tag || a.type != b.type || a.num != b.num || a.bytes != b.bytes ||
        a.items.size() != b.items.size())
        return false;
    for (size_t i = 0; i < a.items.size(); i++)
        if (!same(a.items[i], b.items[i])) return false;
    return true;
}

}  // namespace

TEST(KmipTtlv, SpecExamplesEncodeAndDecode) {
    auto ex = spec_examples();
    ASSERT_EQ(ex.size(), 10u) << "test/data/kmip_ttlv_spec_examples.txt not found or incomplete";
    for (const auto& e : ex) {
        SCOPED_TRACE(e.kind);
        Item built;
        if (e.kind == "integer")
            built = Item::integer(0x420020, std::stoi(e.value));
        else if (e.kind == "long_integer")
            built = Item::long_integer(0x420020, std::stoll(e.value));
        else if (e.kind == "big_integer") {
            auto b = unhex(e.value);
            built = Item::big_integer(0x420020, b.data(), b.size());
        } else if (e.kind == "enumeration")
            built = Item::enumeration(0x420020, std::stoul(e.value));
        else if (e.kind == "boolean")
            built = Item::boolean(0x420020, e.value == "1");
        else if (e.kind == "text_string")
            built = Item::text(0x420020, e.value);
        else if (e.kind == "byte_string") {
            auto b = unhex(e.value);
            built = Item::byte_string(0x420020, b.data(), b.size());
        } else if (e.kind == "date_time")
            built = Item::date_time(0x420020, std::stoll(e.value));
        else if (e.kind == "interval")
            built = Item::interval(0x420020, std::stoul(e.value));
        else if (e.kind == "structure")
            built =
                Item::structure(0x420020, {Item::enumeration(0x420004, 254), Item::integer(0x420005, 255)});
        else
            FAIL() << "unknown kind " << e.kind;
        EXPECT_EQ(kmip::encode(built), to_bytes(e.bytes));
        Item d = decode(e.bytes);
        EXPECT_TRUE(same(d, built));
        EXPECT_EQ(d.tag, 0x420020u);
    }
    // Typed access reads the spec's values back.
    auto ex2 = spec_examples();
    EXPECT_EQ(decode(ex2[0].bytes).as_integer(), 8);
    EXPECT_EQ(decode(ex2[1].bytes).as_long_integer(), 123456789000000000LL);
    EXPECT_EQ(decode(ex2[3].bytes).as_enumeration(), 255u);
    EXPECT_TRUE(decode(ex2[4].bytes).as_boolean());
    EXPECT_EQ(decode(ex2[5].bytes).as_text(), "Hello World");
    EXPECT_EQ(decode(ex2[6].bytes).as_bytes(), to_bytes({1, 2, 3}));
    EXPECT_EQ(decode(ex2[7].bytes).as_date_time(), 1205495800);
    EXPECT_EQ(decode(ex2[8].bytes).num, 864000);
}

TEST(KmipTtlv, RequestIsByteIdenticalToPyKmipEncoder) {
    auto m = pykmip_messages();
    ASSERT_EQ(m.count("request"), 1u) << "test/data/kmip_pykmip_messages.txt not found";
    Item p = Item::structure(kmip::tag::RequestPayload);
    p.add(Item::text(kmip::tag::UniqueIdentifier, "1"));
    p.add(Item::text(kmip::tag::AttributeName, "State"));
    Bytes ours = kmip::encode(kmip::request_message(kmip::Operation::GetAttributes, std::move(p), 65536));
    EXPECT_EQ(cmk::hex_encode(ours.data(), ours.size()),
              cmk::hex_encode(m["request"].data(), m["request"].size()));
}

TEST(KmipTtlv, ParsesPyKmipResponses) {
    auto m = pykmip_messages();
    Item ok = decode(m["response_state"]);
    kmip::BatchResult r = kmip::parse_response(ok);
    EXPECT_EQ(r.status, kmip::ResultStatus::Success);
    EXPECT_EQ(r.operation, static_cast<uint32_t>(kmip::Operation::GetAttributes));
    ASSERT_NE(r.payload, nullptr);
    EXPECT_EQ(r.payload->find(kmip::tag::UniqueIdentifier)->as_text(), "1");
    const Item* attr = r.payload->find(kmip::tag::Attribute);
    ASSERT_NE(attr, nullptr);
    EXPECT_EQ(attr->find(kmip::tag::AttributeName)->as_text(), "State");
    EXPECT_EQ(attr->find(kmip::tag::AttributeValue)->as_enumeration(),
              static_cast<uint32_t>(kmip::State::Deactivated));
    EXPECT_EQ(ok.find(kmip::tag::ResponseHeader)->find(kmip::tag::TimeStamp)->as_date_time(), 1205495800);

    Item bad = decode(m["response_failure"]);
    r = kmip::parse_response(bad);
    EXPECT_EQ(r.status, kmip::ResultStatus::OperationFailed);
    EXPECT_EQ(r.reason, static_cast<uint32_t>(kmip::ResultReason::ItemNotFound));
    EXPECT_EQ(r.message, "Could not locate object: 7");
    EXPECT_EQ(r.payload, nullptr);
    EXPECT_EQ(kmip::result_reason_name(r.reason), "Item Not Found");
}

TEST(KmipTtlv, RoundTripEveryType) {
    Item m = everything();
    Bytes enc = kmip::encode(m);
    EXPECT_EQ(enc.size() % 8, 0u);
    Item d = kmip::decode(enc.data(), enc.size());
    EXPECT_TRUE(same(m, d));
    EXPECT_EQ(kmip::encode(d), enc);
    EXPECT_EQ(d.find(0x42000A)->as_long_integer(), INT64_MIN);
    EXPECT_EQ(d.find(0x420002)->find(0x420003)->as_integer(), -1);
    EXPECT_EQ(d.find(0x420002)->find(0x420007)->as_text(), "123456789");
    EXPECT_EQ(d.find(0x42000E)->num, 4000000000LL);
    EXPECT_EQ(d.find(0x420099), nullptr);
    EXPECT_EQ(kmip::total_length(enc.data()), enc.size());
}

TEST(KmipTtlv, WrongTypeAccessThrows) {
    Item i = Item::integer(0x420020, 1);
    EXPECT_THROW(i.as_text(), TtlvError);
    EXPECT_THROW(i.as_enumeration(), TtlvError);
    EXPECT_THROW(i.add(Item::integer(0x420021, 2)), TtlvError);
    EXPECT_THROW(Item::integer(0x1000000, 1), TtlvError);  // tag wider than 3 bytes
    uint8_t b[3] = {1, 2, 3};
    EXPECT_THROW(Item::big_integer(0x420020, b, 3), TtlvError);
}

TEST(KmipTtlv, EveryTruncationIsRejected) {
    Bytes enc = kmip::encode(everything());
    for (size_t n = 0; n < enc.size(); n++) {
        SCOPED_TRACE(n);
        EXPECT_THROW(kmip::decode(enc.data(), n), TtlvError);
    }
    // And a message followed by anything is not one message.
    Bytes longer = enc;
    longer.resize(enc.size() + 8, 0);
    EXPECT_THROW(kmip::decode(longer.data(), longer.size()), TtlvError);
}

TEST(KmipTtlv, MalformedItemsAreRejected) {
    auto rej = [](const std::string& hex) {
        auto b = unhex(strip_hex(hex));
        EXPECT_THROW(kmip::decode(b.data(), b.size()), TtlvError) << hex;
    };
    rej("42 00 20 | 00 | 00 00 00 04 | 00 00 00 08 00 00 00 00");  // type 0
    rej("42 00 20 | 0B | 00 00 00 04 | 00 00 00 08 00 00 00 00");  // type 0x0B
    rej("42 00 20 | 02 | 00 00 00 08 | 00 00 00 00 00 00 00 08");  // integer of 8 bytes
    rej("42 00 20 | 03 | 00 00 00 04 | 00 00 00 08 00 00 00 00");  // long integer of 4
    rej("42 00 20 | 05 | 00 00 00 05 | 00 00 00 08 01 00 00 00");  // enumeration of 5
    rej("42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 02");  // boolean 2
    rej("42 00 20 | 09 | 00 00 00 04 | 00 00 00 00 00 00 00 00");  // date-time of 4
    rej("42 00 20 | 04 | 00 00 00 04 | 00 00 00 01 00 00 00 00");  // big integer of 4
    rej("42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 01");  // non-zero padding
    rej("42 00 20 | 07 | 00 00 00 03 | 41 42 43 44 00 00 00 00");  // padding in text
    rej("42 00 20 | 07 | FF FF FF FF | 41 42 43 00 00 00 00 00");  // length past the end
    rej("42 00 20 | 08 | 00 00 00 09 | 01 02 03 04 05 06 07 08");  // 9 bytes in 8
    rej("42 00 20 | 01 | 00 00 00 04 | 00 00 00 00 00 00 00 00");  // structure length 4
    // A structure whose member claims more than the structure holds.
    rej("42 00 20 | 01 | 00 00 00 10 | 42 00 04 | 07 | 00 00 00 10 | 41 42 43 44 45 46 47 48 "
        "41 42 43 44 45 46 47 48");
    // A structure whose length leaves half a member.
    rej("42 00 20 | 01 | 00 00 00 08 | 42 00 04 | 02 | 00 00 00 04 | 00 00 00 01 00 00 00 00");
}

TEST(KmipTtlv, NestingIsBounded) {
    auto nest = [](int depth) {
        Item it = Item::integer(0x420001, 7);
        for (int i = 0; i < depth; i++) it = Item::structure(0x420002, {std::move(it)});
        return kmip::encode(it);
    };
    Bytes ok = nest(kmip::kMaxDepth);
    EXPECT_NO_THROW(kmip::decode(ok.data(), ok.size()));
    Bytes deep = nest(kmip::kMaxDepth + 1);
    EXPECT_THROW(kmip::decode(deep.data(), deep.size()), TtlvError);
    // 100000 nested empty headers: refused at the depth limit, no stack overflow.
    Bytes bomb;
    for (int i = 0; i < 100000; i++) {
        uint32_t len = static_cast<uint32_t>((100000 - i - 1) * 8);
        uint8_t h[8] = {
            0x42, 0x00, 0x02, 0x01, uint8_t(len >> 24), uint8_t(len >> 16), uint8_t(len >> 8), uint8_t(len)};
        bomb.insert(bomb.end(), h, h + 8);
    }
    EXPECT_THROW(kmip::decode(bomb.data(), bomb.size()), TtlvError);
}

TEST(KmipTtlv, TotalLengthChecksTheHeader) {
    uint8_t h[8] = {0x42, 0x00, 0x7B, 0x01, 0x00, 0x00, 0x00, 0x10};
    EXPECT_EQ(kmip::total_length(h), 24u);
    h[3] = 0x02;
    EXPECT_THROW(kmip::total_length(h), TtlvError);  // a message is a structure
    h[3] = 0x01;
    h[7] = 0x11;
    EXPECT_THROW(kmip::total_length(h), TtlvError);  // not a multiple of 8
    h[4] = 0x7F;
    h[7] = 0x10;
    EXPECT_THROW(kmip::total_length(h), TtlvError);  // over the limit
}

TEST(KmipTtlv, RandomCorruptionNeverCrashes) {
    auto m = pykmip_messages();
    std::vector<std::vector<uint8_t>> seeds = {m["response_state"], m["response_failure"], m["request"]};
    Bytes ev = kmip::encode(everything());
    seeds.emplace_back(ev.begin(), ev.end());
    std::mt19937 rng(12345);
    int decoded = 0, rejected = 0;
    for (int round = 0; round < 20000; round++) {
        std::vector<uint8_t> b = seeds[round % seeds.size()];
        int flips = 1 + static_cast<int>(rng() % 4);
        for (int f = 0; f < flips; f++) b[rng() % b.size()] = static_cast<uint8_t>(rng());
        if (rng() % 4 == 0) b.resize(rng() % b.size());
        try {
            Item it = kmip::decode(b.data(), b.size());
            decoded++;
            try {
                kmip::parse_response(it);
            } catch (const TtlvError&) {
            }
        } catch (const TtlvError&) {
            rejected++;
        }
    }
    EXPECT_GT(rejected, 0);
    EXPECT_EQ(decoded + rejected, 20000);
}

TEST(KmipTtlv, ParseResponseRejectsBadShapes) {
    auto m = pykmip_messages();
    Item ok = decode(m["response_state"]);
    Item not_response = ok;
    not_response.tag = kmip::tag::RequestMessage;
    EXPECT_THROW(kmip::parse_response(not_response), TtlvError);
    Item no_header = ok;
    no_header.items.erase(no_header.items.begin());
    EXPECT_THROW(kmip::parse_response(no_header), TtlvError);
    Item two = ok;
    for (auto& f : two.items[0].items)
        if (f.tag == kmip::tag::BatchCount) f.num = 2;
    EXPECT_THROW(kmip::parse_response(two), TtlvError);
    Item no_status = ok;
    auto& bi = no_status.items[1].items;
    for (size_t i = 0; i < bi.size(); i++)
        if (bi[i].tag == kmip::tag::ResultStatus) bi.erase(bi.begin() + static_cast<long>(i));
    EXPECT_THROW(kmip::parse_response(no_status), TtlvError);
    Item status_text = ok;
    for (auto& f : status_text.items[1].items)
        if (f.tag == kmip::tag::ResultStatus) f = Item::text(kmip::tag::ResultStatus, "ok");
    EXPECT_THROW(kmip::parse_response(status_text), TtlvError);
}

// ---------------------------------------------------------------- provider configuration

namespace {

// Throwaway CA, server and client certificates made by test/kms/kmip_certs.sh.
class KmipCerts : public ::testing::Test {
protected:
    // Made once for the suite: RSA key generation is the slow part.
    static void SetUpTestSuite() {
        holder = new cmk_test::TempDir();
        std::string script = cmk_test::data_dir() + "/../kms/kmip_certs.sh";
        std::string cmd = "bash '" + script + "' '" + holder->path() + "' >/dev/null 2>&1";
        made = std::system(cmd.c_str()) == 0;
    }
    static void TearDownTestSuite() {
        delete holder;
        holder = nullptr;
    }
    void SetUp() override { ASSERT_TRUE(made) << "could not make certificates with test/kms/kmip_certs.sh"; }
    KeyConfig cfg(int port = 5696) const {
        return KeyConfig{"kmip",
                         "1",
                         {{"host", "127.0.0.1"},
                          {"port", std::to_string(port)},
                          {"ca_file", dir.sub("ca.pem")},
                          {"client_cert", dir.sub("client.pem")},
                          {"client_key", dir.sub("client.key")},
                          {"timeout_ms", "2000"},
                          {"attempts", "2"}}};
    }
    std::string config_error(const KeyConfig& c) const {
        try {
            make_provider(c);
        } catch (const KmsError& e) {
            EXPECT_EQ(e.kind, KmsErrorKind::Config) << e.what();
            return e.what();
        }
        ADD_FAILURE() << "no configuration error";
        return "";
    }
    static cmk_test::TempDir* holder;
    static bool made;
    const cmk_test::TempDir& dir = *holder;
};
cmk_test::TempDir* KmipCerts::holder = nullptr;
bool KmipCerts::made = false;

}  // namespace

TEST_F(KmipCerts, ConfigErrorsNameTheField) {
    EXPECT_NO_THROW(make_provider(cfg()));
    auto starts = [](const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; };
    KeyConfig c = cfg();
    c.options.erase("host");
    EXPECT_TRUE(starts(config_error(c), "host:"));
    c = cfg();
    c.options.erase("ca_file");
    EXPECT_TRUE(starts(config_error(c), "ca_file:"));
    c = cfg();
    c.options["ca_file"] = dir.sub("missing.pem");
    std::string e = config_error(c);
    EXPECT_TRUE(starts(e, "ca_file:")) << e;
    EXPECT_NE(e.find("missing.pem"), std::string::npos) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos);
    c = cfg();
    c.options["ca_file"] = dir.sub("client.key");  // not a certificate
    EXPECT_TRUE(starts(config_error(c), "ca_file:"));
    c = cfg();
    c.options.erase("client_cert");
    EXPECT_TRUE(starts(config_error(c), "client_cert:"));
    c = cfg();
    c.options["client_key"] = dir.sub("server.key");  // the wrong key for the certificate
    EXPECT_TRUE(starts(config_error(c), "client_key:"));
    c = cfg();
    chmod(dir.sub("client.key").c_str(), 0644);
    e = config_error(c);
    EXPECT_TRUE(starts(e, "client_key:")) << e;
    EXPECT_NE(e.find("chmod 600"), std::string::npos) << e;
    chmod(dir.sub("client.key").c_str(), 0600);
    c = cfg();
    c.options["port"] = "70000";
    EXPECT_TRUE(starts(config_error(c), "port:"));
    c = cfg();
    c.options["timeout_ms"] = "soon";
    EXPECT_TRUE(starts(config_error(c), "timeout_ms:"));
    c = cfg();
    c.options["hots"] = "x";
    EXPECT_TRUE(starts(config_error(c), "hots:"));
    c = cfg();
    c.key_id = "";
    EXPECT_TRUE(starts(config_error(c), "key_id:"));
}

TEST_F(KmipCerts, NoServerIsUnavailableNotRevoked) {
    // A port nobody listens on (bound, then closed).
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    socklen_t len = sizeof a;
    getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    int port = ntohs(a.sin_port);
    close(s);
    auto p = make_provider(cfg(port));
    KeyStatus st = p->status();
    EXPECT_EQ(st.health, KeyHealth::Unavailable) << st.detail;
    EXPECT_NE(st.detail.find("127.0.0.1:" + std::to_string(port)), std::string::npos) << st.detail;
    try {
        std::vector<uint8_t> blob(3 + 16 + 48, 0x5A);
        blob[0] = 1;  // format 1, AES-256-CBC-PKCS5, 16-byte IV
        blob[1] = 1;
        blob[2] = 16;
        p->unwrap(blob);
        FAIL() << "unwrap without a server succeeded";
    } catch (const KmsError& e) {
        EXPECT_EQ(e.kind, KmsErrorKind::Unavailable) << e.what();
    }
    // A blob of another format is wrong key material, decided before any call.
    try {
        p->unwrap(std::vector<uint8_t>{9, 9, 9});
        FAIL();
    } catch (const KmsError& e) {
        EXPECT_EQ(e.kind, KmsErrorKind::Revoked) << e.what();
    }
}

TEST_F(KmipCerts, SilentServerTimesOut) {
    // Listens but never answers the TLS handshake: bounded by timeout_ms, unavailable.
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    ASSERT_EQ(listen(s, 4), 0);
    socklen_t len = sizeof a;
    getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
    KeyConfig c = cfg(ntohs(a.sin_port));
    c.options["timeout_ms"] = "300";
    c.options["attempts"] = "1";
    auto p = make_provider(c);
    auto t0 = std::chrono::steady_clock::now();
    KeyStatus st = p->status();
    auto ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
    close(s);
    EXPECT_EQ(st.health, KeyHealth::Unavailable) << st.detail;
    EXPECT_LT(ms, 2000) << st.detail;
    EXPECT_GE(ms, 250) << st.detail;
    EXPECT_NE(st.detail.find("no answer within 300 ms"), std::string::npos) << st.detail;
}

TEST(KmipMapping, ResultReasonsAndStatesFollowTheReadmeTable) {
    using kmip::Operation;
    using kmip::ResultReason;
    using kmip::ResultStatus;
    auto kind = [](Operation op, ResultStatus st, ResultReason r, bool* tr) {
        return kmip::classify_failure(op, st, static_cast<uint32_t>(r), tr);
    };
    bool tr = true;
    for (Operation op : {Operation::Encrypt, Operation::Decrypt, Operation::GetAttributes}) {
        for (ResultReason r : {ResultReason::ItemNotFound, ResultReason::PermissionDenied,
                               ResultReason::AuthenticationNotSuccessful, ResultReason::ObjectArchived,
                               ResultReason::KeyValueNotPresent}) {
            EXPECT_EQ(kind(op, ResultStatus::OperationFailed, r, &tr), KmsErrorKind::Revoked)
                << kmip::result_reason_name(static_cast<uint32_t>(r));
            EXPECT_FALSE(tr);
        }
        for (ResultReason r :
             {ResultReason::InvalidMessage, ResultReason::OperationNotSupported, ResultReason::InvalidField,
              ResultReason::ResponseTooLarge, ResultReason::IllegalOperation, ResultReason::None}) {
            EXPECT_EQ(kind(op, ResultStatus::OperationFailed, r, &tr), KmsErrorKind::Unavailable);
            EXPECT_FALSE(tr) << "a protocol refusal is not retried";
        }
        EXPECT_EQ(kind(op, ResultStatus::OperationFailed, ResultReason::GeneralFailure, &tr),
                  KmsErrorKind::Unavailable);
        EXPECT_TRUE(tr);
        EXPECT_EQ(kind(op, ResultStatus::OperationPending, ResultReason::None, &tr),
                  KmsErrorKind::Unavailable);
        EXPECT_TRUE(tr);
        EXPECT_EQ(kind(op, ResultStatus::OperationUndone, ResultReason::PermissionDenied, &tr),
                  KmsErrorKind::Unavailable);
    }
    EXPECT_EQ(
        kind(Operation::Decrypt, ResultStatus::OperationFailed, ResultReason::CryptographicFailure, &tr),
        KmsErrorKind::Revoked);
    EXPECT_EQ(
        kind(Operation::Encrypt, ResultStatus::OperationFailed, ResultReason::CryptographicFailure, &tr),
        KmsErrorKind::Unavailable);

    EXPECT_EQ(kmip::health_of_state(2), KeyHealth::Ok);
    for (uint32_t s : {1u, 3u, 4u, 5u, 6u, 99u}) EXPECT_EQ(kmip::health_of_state(s), KeyHealth::Revoked) << s;
    EXPECT_EQ(kmip::state_name(3), "Deactivated");
    EXPECT_EQ(kmip::state_name(1), "Pre-Active");
}
