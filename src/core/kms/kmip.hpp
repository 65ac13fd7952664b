// KMIP for the KMIP key provider (DESIGN §6): our own TTLV codec (KMIP 1.2 spec §9.1)
// and the few KMIP 1.2 tags, enumerations and message shapes the provider uses.
// Decoding is strict: every length is checked against the buffer, fixed-size types
// must have their fixed length, structures must be filled exactly by their members,
// nesting is bounded; anything else is a TtlvError, never a read out of bounds.
// Byte buffers are wiped when released (they carry the KEK in Encrypt/Decrypt).
// Pure C++; knows nothing of PostgreSQL. The network is kmip.cpp's.
#pragma once

#include <openssl/crypto.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::kmip {

// An allocator that wipes (OPENSSL_cleanse) memory before giving it back, so that
// every buffer of TTLV bytes, grown or released, leaves no key material behind.
template <class T>
struct WipingAllocator {
    using value_type = T;
    WipingAllocator() = default;
    template <class U>
    WipingAllocator(const WipingAllocator<U>&) {}
    T* allocate(size_t n) { return std::allocator<T>().allocate(n); }
    void deallocate(T* p, size_t n) {
        OPENSSL_cleanse(p, n * sizeof(T));
        std::allocator<T>().deallocate(p, n);
    }
    template <class U>
    bool operator==(const WipingAllocator<U>&) const {
        return true;
    }
    template <class U>
    bool operator!=(const WipingAllocator<U>&) const {
        return false;
    }
};
using Bytes = std::vector<uint8_t, WipingAllocator<uint8_t>>;

struct TtlvError : Error {
    explicit TtlvError(const std::string& m) : Error(ErrorCategory::Damaged, m) {}
};

enum class Type : uint8_t {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
};
const char* type_name(Type t);

// One TTLV item. `num` holds Integer (int32), LongInteger, Enumeration (uint32),
// Boolean (0/1), DateTime (seconds since the epoch) and Interval (uint32 seconds);
// `bytes` holds TextString, ByteString and BigInteger (two's complement, big-endian,
// a multiple of 8 bytes); `items` holds a Structure's members in order.
struct Item {
    uint32_t tag = 0;
    Type type = Type::Structure;
    int64_t num = 0;
    Bytes bytes;
    std::vector<Item> items;

    static Item structure(uint32_t tag, std::vector<Item> members = {});
    static Item integer(uint32_t tag, int32_t v);
    static Item long_integer(uint32_t tag, int64_t v);
    static Item big_integer(uint32_t tag, const uint8_t* p, size_t n);  // n % 8 == 0
    static Item enumeration(uint32_t tag, uint32_t v);
    static Item boolean(uint32_t tag, bool v);
    static Item text(uint32_t tag, const std::string& s);
    static Item byte_string(uint32_t tag, const uint8_t* p, size_t n);
    static Item date_time(uint32_t tag, int64_t seconds);
    static Item interval(uint32_t tag, uint32_t seconds);

    Item& add(Item member);  // appends to a Structure; returns *this

    // Members of a Structure: the first with `tag`, or nullptr.
    const Item* find(uint32_t tag) const;
    // Typed access; each throws TtlvError naming the tag if the type differs.
    int32_t as_integer() const;
    int64_t as_long_integer() const;
    uint32_t as_enumeration() const;
    bool as_boolean() const;
    std::string as_text() const;
    const Bytes& as_bytes() const;  // ByteString
    int64_t as_date_time() const;
};

// The whole encoding of one item (its value padded to a multiple of 8 bytes).
Bytes encode(const Item& item);
void encode_to(const Item& item, Bytes& out);

constexpr size_t kHeaderSize = 8;        // tag (3) + type (1) + length (4)
constexpr int kMaxDepth = 16;            // structures nested deeper are refused
constexpr size_t kMaxMessage = 1 << 20;  // a KMIP answer we need is far smaller

// Decodes exactly one item that fills [p, p+n). Throws TtlvError on anything
// malformed: truncation, trailing bytes, a bad type, a wrong fixed length, a member
// running past its structure, non-zero padding, nesting deeper than kMaxDepth.
Item decode(const uint8_t* p, size_t n);

// From the first 8 bytes of a message on a stream: the total size of the item
// (header + padded value). Throws TtlvError if the header is not a Structure or the
// size exceeds `max`.
size_t total_length(const uint8_t header[kHeaderSize], size_t max = kMaxMessage);

// KMIP 1.2 tags (spec §9.1.3.1) used by the provider.
namespace tag {
constexpr uint32_t Attribute = 0x420008;
constexpr uint32_t AttributeName = 0x42000A;
constexpr uint32_t AttributeValue = 0x42000B;
constexpr uint32_t BatchCount = 0x42000D;
constexpr uint32_t BatchItem = 0x42000F;
constexpr uint32_t BlockCipherMode = 0x420011;
constexpr uint32_t CryptographicAlgorithm = 0x420028;
constexpr uint32_t CryptographicLength = 0x42002A;
constexpr uint32_t CryptographicParameters = 0x42002B;
constexpr uint32_t IvCounterNonce = 0x42003D;
constexpr uint32_t MaximumResponseSize = 0x420050;
constexpr uint32_t Operation = 0x42005C;
constexpr uint32_t PaddingMethod = 0x42005F;
constexpr uint32_t ProtocolVersion = 0x420069;
constexpr uint32_t ProtocolVersionMajor = 0x42006A;
constexpr uint32_t ProtocolVersionMinor = 0x42006B;
constexpr uint32_t RequestHeader = 0x420077;
constexpr uint32_t RequestMessage = 0x420078;
constexpr uint32_t RequestPayload = 0x420079;
constexpr uint32_t ResponseHeader = 0x42007A;
constexpr uint32_t ResponseMessage = 0x42007B;
constexpr uint32_t ResponsePayload = 0x42007C;
constexpr uint32_t ResultMessage = 0x42007D;
constexpr uint32_t ResultReason = 0x42007E;
constexpr uint32_t ResultStatus = 0x42007F;
constexpr uint32_t State = 0x42008D;
constexpr uint32_t TimeStamp = 0x420092;
constexpr uint32_t UniqueIdentifier = 0x420094;
constexpr uint32_t Data = 0x4200C2;
}  // namespace tag

enum class Operation : uint32_t {
    Create = 0x01,
    Get = 0x0A,
    GetAttributes = 0x0B,
    Activate = 0x12,
    Revoke = 0x13,
    Destroy = 0x14,
    Query = 0x18,
    DiscoverVersions = 0x1E,
    Encrypt = 0x1F,
    Decrypt = 0x20,
};
const char* operation_name(Operation op);

enum class ResultStatus : uint32_t {
    Success = 0,
    OperationFailed = 1,
    OperationPending = 2,
    OperationUndone = 3
};

// KMIP 1.2 Result Reason (spec §9.1.3.2.29), plus the 1.4 values servers may send.
enum class ResultReason : uint32_t {
    None = 0,  // not in the answer
    ItemNotFound = 0x01,
    ResponseTooLarge = 0x02,
    AuthenticationNotSuccessful = 0x03,
    InvalidMessage = 0x04,
    OperationNotSupported = 0x05,
    MissingData = 0x06,
    InvalidField = 0x07,
    FeatureNotSupported = 0x08,
    OperationCanceledByRequester = 0x09,
    CryptographicFailure = 0x0A,
    IllegalOperation = 0x0B,
    PermissionDenied = 0x0C,
    ObjectArchived = 0x0D,
    IndexOutOfBounds = 0x0E,
    ApplicationNamespaceNotSupported = 0x0F,
    KeyFormatTypeNotSupported = 0x10,
    KeyCompressionTypeNotSupported = 0x11,
    EncodingOptionError = 0x12,
    KeyValueNotPresent = 0x13,
    AttestationRequired = 0x14,
    AttestationFailed = 0x15,
    Sensitive = 0x16,
    NotExtractable = 0x17,
    ObjectAlreadyExists = 0x18,
    GeneralFailure = 0x100,
};
std::string result_reason_name(uint32_t reason);  // "Item Not Found", "0x1f" if unknown

// State attribute (spec §9.1.3.2.17).
enum class State : uint32_t {
    PreActive = 1,
    Active = 2,
    Deactivated = 3,
    Compromised = 4,
    Destroyed = 5,
    DestroyedCompromised = 6,
};
std::string state_name(uint32_t state);  // "Active", ..., "0x7" if unknown

constexpr uint32_t kAlgorithmAes = 0x03;  // Cryptographic Algorithm
constexpr uint32_t kModeCbc = 0x01;       // Block Cipher Mode
constexpr uint32_t kPaddingPkcs5 = 0x03;  // Padding Method

// A KMIP 1.2 Request Message with one Batch Item (protocol version 1.2).
Item request_message(Operation op, Item payload, int32_t max_response_size = 64 * 1024);

// What one Batch Item of a Response Message says.
struct BatchResult {
    uint32_t operation = 0;  // 0 if the server left it out
    ResultStatus status = ResultStatus::OperationFailed;
    uint32_t reason = 0;            // ResultReason value, 0 if absent
    std::string message;            // Result Message, "" if absent (server's words: not ours)
    const Item* payload = nullptr;  // Response Payload (points into the decoded message)
};

// Checks the shape of a decoded Response Message (header with protocol version and
// batch count 1, one batch item with a result status) and returns its batch item.
// Throws TtlvError if the message is not a well-formed response.
BatchResult parse_response(const Item& response_message);

// What a failed operation means for the key (kmip.cpp; docs/providers/kmip.md):
// Revoked or Unavailable; *transient says whether a retry may help.
KmsErrorKind classify_failure(Operation op, ResultStatus status, uint32_t reason, bool* transient);
// What a State attribute means: Active is ok, every other state is revoked.
KeyHealth health_of_state(uint32_t state);

}  // namespace cmk::kmip
