// libFuzzer target: the parsers of what key providers and identity endpoints answer
// over the network, plus the bounded JSON reader they share. The first byte chooses
// the parser (modulo the number of cases), the rest is the answer; cases 18-20 run the
// Azure provider itself over a canned transport (its key answers are parsed inside it).
// A KmsError (or any other std::exception of the project) is a clean rejection.
#include <cstdint>
#include <ctime>
#include <exception>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <rapidjson/document.h>

#include "cmk_lakebase/base/json.hpp"
#include "core/kms/aws.hpp"
#include "core/kms/aws_credentials.hpp"
#include "core/kms/aws_process.hpp"
#include "core/kms/azure.hpp"
#include "core/kms/gcp.hpp"
#include "core/kms/google_identity.hpp"
#include "core/kms/http.hpp"
#include "core/kms/jwt.hpp"
#include "core/kms/kit.hpp"
#include "core/kms/vault.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "fuzz_common.hpp"

namespace {

// A throwaway RSA public key, made once: verify_rs256 must take any token apart
// without crashing; the signature never verifies.
const std::string& public_pem() {
    static const std::string pem = [] {
        std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> k(EVP_RSA_gen(2048), EVP_PKEY_free);
        std::unique_ptr<BIO, decltype(&BIO_free)> b(BIO_new(BIO_s_mem()), BIO_free);
        if (!k || !b || PEM_write_bio_PUBKEY(b.get(), k.get()) != 1) std::abort();
        char* p = nullptr;
        long n = BIO_get_mem_data(b.get(), &p);
        return std::string(p, size_t(n));
    }();
    return pem;
}

// The Azure provider over a canned transport: Entra ID answers with a valid token, the
// key vault with the input (status 200): its unwrap, wrap and key GET answers.
void azure_key_answer(int op, const std::string& body) {
    static const std::string secret_file = [] {
        std::string f = cmk_fuzz::scratch_dir() + "/client_secret";
        const char s[] = "s3cret\n";
        cmk_fuzz::write_file(f, reinterpret_cast<const uint8_t*>(s), sizeof s - 1);
        return f;
    }();
    cmk::KeyConfig cfg;
    cfg.provider = "azure";
    cfg.key_id = "https://myvault.vault.azure.net/keys/cmk/0123456789abcdef0123456789abcdef";
    cfg.options = {{"tenant_id", "72f988bf-86f1-41af-91ab-2d7cd011db47"},
                   {"client_id", "11111111-2222-3333-4444-555555555555"},
                   {"client_secret_file", secret_file}};
    auto p = cmk::azure::make_azure_provider(cfg, [&](const cmk::http::Request& r) {
        cmk::http::Response a;
        a.status = 200;
        if (r.url.find("/oauth2/") != std::string::npos)
            a.body = "{\"token_type\":\"Bearer\",\"expires_in\":3599,\"access_token\":\"t\"}";
        else
            a.body = body;
        return a;
    });
    if (op == 0) {
        (void)p->unwrap(std::vector<uint8_t>(256, 0x42));
    } else if (op == 1) {
        uint8_t k[cmk::kKekSize] = {1};
        (void)p->wrap(cmk::SecureBytes(k, sizeof k));
    } else {
        (void)p->status();
    }
}

void one(uint8_t which, const std::string& s) {
    switch (which % 23) {
    case 0: {
        rapidjson::Document d;
        std::string why;
        (void)cmk::json_bounds_error(s.data(), s.size());
        (void)cmk::parse_json_bounded(d, s, &why);
        std::string copy = s;
        rapidjson::Document d2;
        (void)cmk::parse_json_bounded_insitu(d2, copy, &why);
        break;
    }
    case 1: {  // Entra ID token endpoint
        cmk::http::Response r;
        r.status = 200;
        r.body = s;
        (void)cmk::azure::parse_token_response(r, std::time(nullptr), "fuzz", false);
        break;
    }
    case 2: {  // Azure instance metadata (IMDS) token
        cmk::http::Response r;
        r.status = 200;
        r.body = s;
        (void)cmk::azure::parse_token_response(r, std::time(nullptr), "fuzz", true);
        break;
    }
    case 3:
        (void)cmk::azure::parse_key_id(s, "");
        break;
    case 4:
        (void)cmk::gcp::parse_error(s);
        break;
    case 5: {
        long life = 0;
        (void)cmk::gcp::parse_sts_token(s, &life, "fuzz");
        break;
    }
    case 6: {
        long life = 0;
        (void)cmk::gcp::parse_generate_access_token(s, std::time(nullptr), &life, "fuzz");
        break;
    }
    case 7: {
        cmk::gcp::IdentitySource src;
        cmk::gcp::parse_external_account(s, "credentials_file", "/fuzz.json", &src);
        break;
    }
    case 8:
        (void)cmk::gcp::subject_token_from(s, "id_token", "fuzz");
        break;
    case 9:
        (void)cmk::vault::error_message(s);
        break;
    case 10:
        (void)cmk::vault::ciphertext_version(s);
        break;
    case 11:
        (void)cmk::aws::parse_ini(s);
        break;
    case 12:
        (void)cmk::aws::error_type(s);
        break;
    case 13:
        (void)cmk::aws::parse_assumed_role(s, "fuzz");
        break;
    case 14:
        (void)cmk::aws::sts_error(400, s, "STS", "role_arn", "");
        break;
    case 15: {
        std::string header, claims;
        (void)cmk::jwt::verify_rs256(s, public_pem(), &header, &claims);
        break;
    }
    case 16:
        (void)cmk::kit::decode_secret(s.data(), s.size(), false);
        break;
    case 17:
        (void)cmk::kit::decode_secret(s.data(), s.size(), true);
        break;
    case 18:
    case 19:
    case 20:
        azure_key_answer(which % 23 - 18, s);
        break;
    case 21: {  // an AWS credential_process helper's answer
        std::string t = s;
        (void)cmk::aws::parse_process_output(t, "fuzz");
        break;
    }
    case 22:  // a profile's credential_process command line
        (void)cmk::aws::split_process_command("credential_process", s);
        break;
    }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    try {
        one(data[0], std::string(reinterpret_cast<const char*>(data + 1), size - 1));
    } catch (const std::exception&) {
    }
    return 0;
}
