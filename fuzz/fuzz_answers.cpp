// libFuzzer target: the parsers of what key providers and identity endpoints answer
// over the network, plus the bounded JSON reader they share. The first byte chooses
// the parser (modulo kCases), the rest is the answer; cases 18-20 and 23-34 run the
// Azure, AWS KMS, Vault Transit and Cloud KMS providers themselves over a canned
// transport (their key answers are parsed inside them). A case keeps its number once
// seeds use it: new cases go at the end. A KmsError (or any other std::exception of
// the project) is a clean rejection.
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

constexpr int kCases = 35;

// The key operations a provider case runs over its canned transport: unwrap (op 0, and
// op 3 that answers with an error status), wrap (1), status (2).
void run_key_op(cmk::KeyProvider& p, int op, const std::vector<uint8_t>& blob) {
    if (op == 1) {
        uint8_t k[cmk::kKekSize] = {1};
        (void)p.wrap(cmk::SecureBytes(k, sizeof k));
    } else if (op == 2) {
        (void)p.status();
    } else {
        (void)p.unwrap(blob);
    }
}

// A secret file under the scratch directory (0600, as the loaders want it).
std::string scratch_secret(const std::string& name, const std::string& text) {
    std::string f = cmk_fuzz::scratch_dir() + "/" + name;
    cmk_fuzz::write_file(f, reinterpret_cast<const uint8_t*>(text.data()), text.size());
    return f;
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
    run_key_op(*p, op, std::vector<uint8_t>(256, 0x42));
}

// The AWS KMS provider over a canned transport, with static credentials from the
// environment (no STS or IMDS call): KMS answers Decrypt, Encrypt or DescribeKey with
// the input (status 200), or Decrypt with the input as an error body (op 3, HTTP 400).
void aws_key_answer(int op, const std::string& body) {
    static const bool env = [] {
        ::setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE", 1);
        ::setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", 1);
        ::unsetenv("AWS_SESSION_TOKEN");
        return true;
    }();
    (void)env;
    cmk::KeyConfig cfg;
    cfg.provider = "aws";
    cfg.key_id = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    cfg.options = {{"credentials", "env"}, {"retries", "1"}};
    auto p = cmk::aws::make_aws_provider(cfg, [&](const cmk::http::Request&) {
        cmk::http::Response a;
        a.status = op == 3 ? 400 : 200;
        a.headers["x-amzn-requestid"] = "c6104cbe-af31-11e0-8154-cbc7ccf896c7";
        a.body = body;
        return a;
    });
    run_key_op(*p, op, std::vector<uint8_t>(64, 0x42));
}

// The Vault Transit provider over a canned transport, with a token file: Vault answers
// decrypt, encrypt (after a canned key read, as wrap reads the key first) or the key
// read with the input (status 200), or decrypt with the input as an error body (op 3,
// HTTP 400).
void vault_key_answer(int op, const std::string& body) {
    static const std::string token_file = scratch_secret("vault_token", "hvs.CAESIFuzz\n");
    cmk::KeyConfig cfg;
    cfg.provider = "vault";
    cfg.key_id = "cmk";
    cfg.options = {{"addr", "https://vault.example.com:8200"}, {"token_file", token_file}};
    const char* target = op == 1 ? "/transit/encrypt/" : op == 2 ? "/transit/keys/" : "/transit/decrypt/";
    auto p = cmk::vault::make_vault_provider(cfg, [&](const cmk::http::Request& r) {
        cmk::http::Response a;
        a.status = 200;
        if (r.url.find(target) == std::string::npos) {
            a.body = "{\"request_id\":\"r\",\"data\":{\"type\":\"aes256-gcm96\",\"latest_version\":1,"
                     "\"min_decryption_version\":1,\"supports_decryption\":true}}";
            return a;
        }
        if (op == 3) a.status = 400;
        a.body = body;
        return a;
    });
    const std::string ct = "vault:v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v";
    run_key_op(*p, op, std::vector<uint8_t>(ct.begin(), ct.end()));
}

// The Cloud KMS provider over a canned transport, with a token from the metadata server
// (answered with a valid token): Cloud KMS answers decrypt, encrypt or the CryptoKey
// GET with the input (status 200, CRC32C fields checked), or decrypt with the input as
// an error body (op 3, HTTP 400).
void gcp_key_answer(int op, const std::string& body) {
    cmk::KeyConfig cfg;
    cfg.provider = "gcp";
    cfg.key_id = "projects/my-project/locations/global/keyRings/ring/cryptoKeys/cmk";
    cfg.options = {{"metadata_host", "127.0.0.1:8080"}};
    auto p = cmk::gcp::make_gcp_provider(cfg, [&](const cmk::http::Request& r) {
        cmk::http::Response a;
        a.status = 200;
        if (r.url.find("/computeMetadata/") != std::string::npos) {
            a.body = "{\"access_token\":\"ya29.c.fuzz\",\"expires_in\":3599,\"token_type\":\"Bearer\"}";
            return a;
        }
        if (op == 3) a.status = 400;
        a.headers["x-goog-request-id"] = "r";
        a.body = body;
        return a;
    });
    run_key_op(*p, op, std::vector<uint8_t>(53, 0x0a));
}

void one(uint8_t which, const std::string& s) {
    const int c = which % kCases;
    switch (c) {
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
        azure_key_answer(c - 18, s);
        break;
    case 21: {  // an AWS credential_process helper's answer
        std::string t = s;
        (void)cmk::aws::parse_process_output(t, "fuzz");
        break;
    }
    case 22:  // a profile's credential_process command line
        (void)cmk::aws::split_process_command("credential_process", s);
        break;
    case 23:  // AWS KMS: Decrypt, Encrypt, DescribeKey answers, a Decrypt error
    case 24:
    case 25:
    case 26:
        aws_key_answer(c - 23, s);
        break;
    case 27:  // Vault Transit: decrypt, encrypt, key read answers, a decrypt error
    case 28:
    case 29:
    case 30:
        vault_key_answer(c - 27, s);
        break;
    case 31:  // Cloud KMS: decrypt, encrypt, CryptoKey GET answers, a decrypt error
    case 32:
    case 33:
    case 34:
        gcp_key_answer(c - 31, s);
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
