// libFuzzer target: the KMIP TTLV decoder and the Response Message checks, i.e. every
// byte a KMIP server (or anyone on the path to it) sends back. A TtlvError or KmsError
// is a clean rejection.
#include <cstdint>
#include <exception>

#include "core/kms/kmip.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        cmk::kmip::Item msg = cmk::kmip::decode(data, size);
        try {
            cmk::kmip::parse_response(msg);
        } catch (const std::exception&) {
        }
        (void)cmk::kmip::encode(msg);  // what decoded must encode again
    } catch (const std::exception&) {
    }
    return 0;
}
