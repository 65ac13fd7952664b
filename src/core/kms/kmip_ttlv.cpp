// The TTLV codec of the KMIP key provider (kmip.hpp): KMIP 1.2 spec §9.1 encoding
// (big-endian; 3-byte tag, 1-byte type, 4-byte length, value padded with zeros to a
// multiple of 8), strict decoding, and the KMIP 1.2 request/response envelopes.
// Written from the specification; no third-party KMIP code.
#include "kmip.hpp"

#include <cstdio>

namespace cmk::kmip {
namespace {

[[noreturn]] void fail(const std::string& what) {
    throw TtlvError("malformed KMIP message: " + what);
}

std::string tag_hex(uint32_t tag) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%06X", tag & 0xFFFFFF);
    return buf;
}

void put_be(Bytes& out, uint64_t v, int nbytes) {
    for (int s = (nbytes - 1) * 8; s >= 0; s -= 8) out.push_back(static_cast<uint8_t>(v >> s));
}

uint64_t get_be(const uint8_t* p, int nbytes) {
    uint64_t v = 0;
    for (int i = 0; i < nbytes; i++) v = (v << 8) | p[i];
    return v;
}

size_t padded(size_t n) {
    return (n + 7) & ~size_t(7);
}

bool valid_type(uint8_t t) {
    return t >= 0x01 && t <= 0x0A;
}

// Decodes one item at p[0..n) (n = bytes available to it); returns bytes consumed.
size_t decode_one(const uint8_t* p, size_t n, int depth, Item& out) {
    if (n < kHeaderSize) fail("truncated item header (" + std::to_string(n) + " bytes left)");
    uint32_t tag = static_cast<uint32_t>(get_be(p, 3));
    uint8_t t = p[3];
    uint64_t len = get_be(p + 4, 4);
    if (!valid_type(t)) {
        char tb[8];
        std::snprintf(tb, sizeof tb, "0x%02X", t);
        fail("item " + tag_hex(tag) + " has unknown type " + tb);
    }
    Type type = static_cast<Type>(t);
    // Every value occupies its length rounded up to 8; a structure's length is the
    // sum of its members' encodings and is a multiple of 8 by construction.
    uint64_t span = (len + 7) & ~uint64_t(7);
    if (span > n - kHeaderSize)
        fail("item " + tag_hex(tag) + " claims " + std::to_string(len) + " bytes, only " +
             std::to_string(n - kHeaderSize) + " remain");
    const uint8_t* v = p + kHeaderSize;
    out.tag = tag;
    out.type = type;
    out.num = 0;
    out.bytes.clear();
    out.items.clear();
    auto need_len = [&](uint64_t want) {
        if (len != want)
            fail("item " + tag_hex(tag) + " of type " + type_name(type) + " has length " +
                 std::to_string(len) + ", expected " + std::to_string(want));
    };
    switch (type) {
        case Type::Structure: {
            if (depth >= kMaxDepth) fail("structures nested deeper than " + std::to_string(kMaxDepth));
            if (len % 8 != 0)
                fail("structure " + tag_hex(tag) + " length " + std::to_string(len) +
                     " is not a multiple of 8");
            size_t off = 0;
            while (off < len) {
                Item member;
                off += decode_one(v + off, static_cast<size_t>(len) - off, depth + 1, member);
                out.items.push_back(std::move(member));
            }
            break;
        }
        case Type::Integer:
            need_len(4);
            out.num = static_cast<int32_t>(static_cast<uint32_t>(get_be(v, 4)));
            break;
        case Type::Enumeration:
            need_len(4);
            out.num = static_cast<int64_t>(get_be(v, 4));
            break;
        case Type::Interval:
            need_len(4);
            out.num = static_cast<int64_t>(get_be(v, 4));
            break;
        case Type::LongInteger:
        case Type::DateTime:
            need_len(8);
            out.num = static_cast<int64_t>(get_be(v, 8));
            break;
        case Type::Boolean: {
            need_len(8);
            uint64_t b = get_be(v, 8);
            if (b > 1) fail("boolean " + tag_hex(tag) + " is neither 0 nor 1");
            out.num = static_cast<int64_t>(b);
            break;
        }
        case Type::BigInteger:
            if (len == 0 || len % 8 != 0)
                fail("big integer " + tag_hex(tag) + " length is not a positive multiple of 8");
            out.bytes.assign(v, v + len);
            break;
        case Type::TextString:
        case Type::ByteString:
            out.bytes.assign(v, v + len);
            break;
    }
    for (uint64_t i = len; i < span; i++)
        if (v[i] != 0) fail("item " + tag_hex(tag) + " has non-zero padding");
    return kHeaderSize + static_cast<size_t>(span);
}

Item make(uint32_t tag, Type type) {
    if (tag > 0xFFFFFF) throw TtlvError("KMIP tag " + tag_hex(tag) + " does not fit in 3 bytes");
    Item it;
    it.tag = tag;
    it.type = type;
    return it;
}

[[noreturn]] void wrong_type(const Item& it, Type want) {
    throw TtlvError("malformed KMIP message: item " + tag_hex(it.tag) + " is a " + type_name(it.type) +
                    ", expected a " + type_name(want));
}

}  // namespace

const char* type_name(Type t) {
    switch (t) {
        case Type::Structure:
            return "Structure";
        case Type::Integer:
            return "Integer";
        case Type::LongInteger:
            return "Long Integer";
        case Type::BigInteger:
            return "Big Integer";
        case Type::Enumeration:
            return "Enumeration";
        case Type::Boolean:
            return "Boolean";
        case Type::TextString:
            return "Text String";
        case Type::ByteString:
            return "Byte String";
        case Type::DateTime:
            return "Date-Time";
        case Type::Interval:
            return "Interval";
    }
    return "unknown type";
}

Item Item::structure(uint32_t tag, std::vector<Item> members) {
    Item it = make(tag, Type::Structure);
    it.items = std::move(members);
    return it;
}
Item Item::integer(uint32_t tag, int32_t v) {
    Item it = make(tag, Type::Integer);
    it.num = v;
    return it;
}
Item Item::long_integer(uint32_t tag, int64_t v) {
    Item it = make(tag, Type::LongInteger);
    it.num = v;
    return it;
}
Item Item::big_integer(uint32_t tag, const uint8_t* p, size_t n) {
    if (n == 0 || n % 8 != 0) throw TtlvError("a KMIP Big Integer must be a positive multiple of 8 bytes");
    Item it = make(tag, Type::BigInteger);
    it.bytes.assign(p, p + n);
    return it;
}
Item Item::enumeration(uint32_t tag, uint32_t v) {
    Item it = make(tag, Type::Enumeration);
    it.num = v;
    return it;
}
Item Item::boolean(uint32_t tag, bool v) {
    Item it = make(tag, Type::Boolean);
    it.num = v ? 1 : 0;
    return it;
}
Item Item::text(uint32_t tag, const std::string& s) {
    Item it = make(tag, Type::TextString);
    it.bytes.assign(s.begin(), s.end());
    return it;
}
Item Item::byte_string(uint32_t tag, const uint8_t* p, size_t n) {
    Item it = make(tag, Type::ByteString);
    if (n) it.bytes.assign(p, p + n);
    return it;
}
Item Item::date_time(uint32_t tag, int64_t seconds) {
    Item it = make(tag, Type::DateTime);
    it.num = seconds;
    return it;
}
Item Item::interval(uint32_t tag, uint32_t seconds) {
    Item it = make(tag, Type::Interval);
    it.num = seconds;
    return it;
}

Item& Item::add(Item member) {
    if (type != Type::Structure) wrong_type(*this, Type::Structure);
    items.push_back(std::move(member));
    return *this;
}

const Item* Item::find(uint32_t t) const {
    for (const auto& m : items)
        if (m.tag == t) return &m;
    return nullptr;
}

int32_t Item::as_integer() const {
    if (type != Type::Integer) wrong_type(*this, Type::Integer);
    return static_cast<int32_t>(num);
}
int64_t Item::as_long_integer() const {
    if (type != Type::LongInteger) wrong_type(*this, Type::LongInteger);
    return num;
}
uint32_t Item::as_enumeration() const {
    if (type != Type::Enumeration) wrong_type(*this, Type::Enumeration);
    return static_cast<uint32_t>(num);
}
bool Item::as_boolean() const {
    if (type != Type::Boolean) wrong_type(*this, Type::Boolean);
    return num != 0;
}
std::string Item::as_text() const {
    if (type != Type::TextString) wrong_type(*this, Type::TextString);
    return std::string(bytes.begin(), bytes.end());
}
const Bytes& Item::as_bytes() const {
    if (type != Type::ByteString) wrong_type(*this, Type::ByteString);
    return bytes;
}
int64_t Item::as_date_time() const {
    if (type != Type::DateTime) wrong_type(*this, Type::DateTime);
    return num;
}

void encode_to(const Item& it, Bytes& out) {
    put_be(out, it.tag & 0xFFFFFF, 3);
    out.push_back(static_cast<uint8_t>(it.type));
    size_t len_at = out.size();
    put_be(out, 0, 4);
    size_t start = out.size();
    switch (it.type) {
        case Type::Structure:
            for (const auto& m : it.items) encode_to(m, out);
            break;
        case Type::Integer:
        case Type::Enumeration:
        case Type::Interval:
            put_be(out, static_cast<uint32_t>(it.num), 4);
            break;
        case Type::LongInteger:
        case Type::DateTime:
        case Type::Boolean:
            put_be(out, static_cast<uint64_t>(it.num), 8);
            break;
        case Type::BigInteger:
        case Type::TextString:
        case Type::ByteString:
            out.insert(out.end(), it.bytes.begin(), it.bytes.end());
            break;
    }
    size_t len = out.size() - start;
    // Fixed-size 4-byte types have length 4 and 4 bytes of padding.
    if (len > 0xFFFFFFFFu) throw TtlvError("KMIP item too large to encode");
    for (int i = 0; i < 4; i++) out[len_at + i] = static_cast<uint8_t>(len >> (24 - 8 * i));
    out.resize(start + padded(len), 0);
}

Bytes encode(const Item& item) {
    Bytes out;
    encode_to(item, out);
    return out;
}

Item decode(const uint8_t* p, size_t n) {
    Item it;
    size_t used = decode_one(p, n, 0, it);
    if (used != n) fail(std::to_string(n - used) + " trailing bytes after the message");
    return it;
}

size_t total_length(const uint8_t h[kHeaderSize], size_t max) {
    uint64_t len = get_be(h + 4, 4);
    if (h[3] != static_cast<uint8_t>(Type::Structure)) fail("a message must be a Structure");
    if (len % 8 != 0) fail("message length " + std::to_string(len) + " is not a multiple of 8");
    if (len + kHeaderSize > max)
        fail("message of " + std::to_string(len + kHeaderSize) + " bytes exceeds the limit of " +
             std::to_string(max));
    return static_cast<size_t>(len) + kHeaderSize;
}

const char* operation_name(Operation op) {
    switch (op) {
        case Operation::Create:
            return "Create";
        case Operation::Get:
            return "Get";
        case Operation::GetAttributes:
            return "GetAttributes";
        case Operation::Activate:
            return "Activate";
        case Operation::Revoke:
            return "Revoke";
        case Operation::Destroy:
            return "Destroy";
        case Operation::Query:
            return "Query";
        case Operation::DiscoverVersions:
            return "DiscoverVersions";
        case Operation::Encrypt:
            return "Encrypt";
        case Operation::Decrypt:
            return "Decrypt";
    }
    return "operation";
}

std::string result_reason_name(uint32_t r) {
    switch (static_cast<ResultReason>(r)) {
        case ResultReason::None:
            return "none";
        case ResultReason::ItemNotFound:
            return "Item Not Found";
        case ResultReason::ResponseTooLarge:
            return "Response Too Large";
        case ResultReason::AuthenticationNotSuccessful:
            return "Authentication Not Successful";
        case ResultReason::InvalidMessage:
            return "Invalid Message";
        case ResultReason::OperationNotSupported:
            return "Operation Not Supported";
        case ResultReason::MissingData:
            return "Missing Data";
        case ResultReason::InvalidField:
            return "Invalid Field";
        case ResultReason::FeatureNotSupported:
            return "Feature Not Supported";
        case ResultReason::OperationCanceledByRequester:
            return "Operation Canceled By Requester";
        case ResultReason::CryptographicFailure:
            return "Cryptographic Failure";
        case ResultReason::IllegalOperation:
            return "Illegal Operation";
        case ResultReason::PermissionDenied:
            return "Permission Denied";
        case ResultReason::ObjectArchived:
            return "Object Archived";
        case ResultReason::IndexOutOfBounds:
            return "Index Out of Bounds";
        case ResultReason::ApplicationNamespaceNotSupported:
            return "Application Namespace Not Supported";
        case ResultReason::KeyFormatTypeNotSupported:
            return "Key Format Type Not Supported";
        case ResultReason::KeyCompressionTypeNotSupported:
            return "Key Compression Type Not Supported";
        case ResultReason::EncodingOptionError:
            return "Encoding Option Error";
        case ResultReason::KeyValueNotPresent:
            return "Key Value Not Present";
        case ResultReason::AttestationRequired:
            return "Attestation Required";
        case ResultReason::AttestationFailed:
            return "Attestation Failed";
        case ResultReason::Sensitive:
            return "Sensitive";
        case ResultReason::NotExtractable:
            return "Not Extractable";
        case ResultReason::ObjectAlreadyExists:
            return "Object Already Exists";
        case ResultReason::GeneralFailure:
            return "General Failure";
    }
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%x", r);
    return buf;
}

std::string state_name(uint32_t s) {
    switch (static_cast<State>(s)) {
        case State::PreActive:
            return "Pre-Active";
        case State::Active:
            return "Active";
        case State::Deactivated:
            return "Deactivated";
        case State::Compromised:
            return "Compromised";
        case State::Destroyed:
            return "Destroyed";
        case State::DestroyedCompromised:
            return "Destroyed Compromised";
    }
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%x", s);
    return buf;
}

Item request_message(Operation op, Item payload, int32_t max_response_size) {
    payload.tag = tag::RequestPayload;
    Item version = Item::structure(tag::ProtocolVersion, {Item::integer(tag::ProtocolVersionMajor, 1),
                                                          Item::integer(tag::ProtocolVersionMinor, 2)});
    Item header = Item::structure(tag::RequestHeader);
    header.add(std::move(version));
    header.add(Item::integer(tag::MaximumResponseSize, max_response_size));
    header.add(Item::integer(tag::BatchCount, 1));
    Item batch = Item::structure(tag::BatchItem);
    batch.add(Item::enumeration(tag::Operation, static_cast<uint32_t>(op)));
    batch.add(std::move(payload));
    Item msg = Item::structure(tag::RequestMessage);
    msg.add(std::move(header));
    msg.add(std::move(batch));
    return msg;
}

BatchResult parse_response(const Item& m) {
    if (m.tag != tag::ResponseMessage || m.type != Type::Structure) fail("not a Response Message");
    const Item* h = m.find(tag::ResponseHeader);
    if (!h || h->type != Type::Structure) fail("Response Message without a Response Header");
    const Item* pv = h->find(tag::ProtocolVersion);
    if (!pv || pv->type != Type::Structure || !pv->find(tag::ProtocolVersionMajor))
        fail("Response Header without a Protocol Version");
    const Item* bc = h->find(tag::BatchCount);
    if (!bc) fail("Response Header without a Batch Count");
    if (bc->as_integer() != 1) fail("Batch Count " + std::to_string(bc->as_integer()) + ", expected 1");
    const Item* bi = m.find(tag::BatchItem);
    if (!bi || bi->type != Type::Structure) fail("Response Message without a Batch Item");
    BatchResult r;
    if (const Item* op = bi->find(tag::Operation)) r.operation = op->as_enumeration();
    const Item* st = bi->find(tag::ResultStatus);
    if (!st) fail("Batch Item without a Result Status");
    uint32_t s = st->as_enumeration();
    if (s > 3) fail("unknown Result Status " + std::to_string(s));
    r.status = static_cast<ResultStatus>(s);
    if (const Item* rr = bi->find(tag::ResultReason)) r.reason = rr->as_enumeration();
    if (const Item* rm = bi->find(tag::ResultMessage)) r.message = rm->as_text();
    if (const Item* pl = bi->find(tag::ResponsePayload)) {
        if (pl->type != Type::Structure) fail("Response Payload is not a Structure");
        r.payload = pl;
    }
    return r;
}

}  // namespace cmk::kmip
