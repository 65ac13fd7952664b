// RS256 JSON Web Tokens (jwt.hpp): the signed assertions that Google's OAuth token
// endpoint and Entra ID accept in exchange for an access token. Every OpenSSL handle
// is RAII; PEM text is never quoted in an error.
#include "jwt.hpp"

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <rapidjson/document.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>

#include <memory>

#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "kit.hpp"

namespace cmk::jwt {
namespace {

using kit::BioPtr;
using kit::config_error;
using kit::MdCtxPtr;
using kit::PkeyPtr;
using kit::X509Ptr;

BioPtr mem_bio(const std::string& pem) {
    BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!b) throw config_error("out of memory reading a PEM");
    return b;
}

// No passphrase callback: an encrypted key must fail, not prompt on a terminal.
int no_passphrase(char*, int, int, void*) {
    return -1;
}

PkeyPtr load_rsa_private_key(const std::string& pem, const std::string& field) {
    BioPtr b = mem_bio(pem);
    PkeyPtr k(PEM_read_bio_PrivateKey(b.get(), nullptr, no_passphrase, nullptr));
    ERR_clear_error();
    if (!k) throw config_error(field + ": not an unencrypted PEM private key");
    if (EVP_PKEY_base_id(k.get()) != EVP_PKEY_RSA) throw config_error(field + ": not an RSA private key");
    if (EVP_PKEY_bits(k.get()) < 2048) throw config_error(field + ": RSA key shorter than 2048 bits");
    return k;
}

PkeyPtr load_public_key(const std::string& pem) {
    BioPtr b = mem_bio(pem);
    PkeyPtr k(PEM_read_bio_PUBKEY(b.get(), nullptr, no_passphrase, nullptr));
    if (!k) {
        ERR_clear_error();
        BioPtr b2 = mem_bio(pem);
        X509Ptr x(PEM_read_bio_X509(b2.get(), nullptr, no_passphrase, nullptr));
        if (x) k.reset(X509_get_pubkey(x.get()));
    }
    ERR_clear_error();
    return k;
}

std::string b64url(const std::string& s) {
    return base64url_encode(s.data(), s.size());
}

bool decode_part(const std::string& part, std::string* out) {
    try {
        std::vector<uint8_t> raw = base64url_decode(part);
        if (out) out->assign(raw.begin(), raw.end());
        return true;
    } catch (const CryptoError&) {
        return false;
    }
}

}  // namespace

bool unverified_exp(const std::string& token, int64_t* exp) {
    size_t a = token.find('.');
    if (a == std::string::npos) return false;
    size_t b = token.find('.', a + 1);
    if (b == std::string::npos || token.find('.', b + 1) != std::string::npos) return false;
    std::string payload;
    if (!decode_part(token.substr(a + 1, b - a - 1), &payload)) return false;
    kit::WipeOnExit w{payload};
    rapidjson::Document d;
    parse_json_bounded_insitu(d, payload, nullptr);
    if (d.HasParseError() || !d.IsObject()) return false;
    auto it = d.FindMember("exp");
    if (it == d.MemberEnd() || !it->value.IsInt64()) return false;
    *exp = it->value.GetInt64();
    return true;
}

JsonObject& JsonObject::set(const std::string& name, const std::string& value) {
    Member m;
    m.name = name;
    m.str = value;
    members_.push_back(std::move(m));
    return *this;
}

JsonObject& JsonObject::set(const std::string& name, int64_t value) {
    Member m;
    m.name = name;
    m.is_int = true;
    m.num = value;
    members_.push_back(std::move(m));
    return *this;
}

std::string JsonObject::json() const {
    rapidjson::StringBuffer sb;
    rapidjson::Writer<rapidjson::StringBuffer> w(sb);
    w.StartObject();
    for (const auto& m : members_) {
        w.Key(m.name.c_str(), static_cast<rapidjson::SizeType>(m.name.size()));
        if (m.is_int)
            w.Int64(m.num);
        else
            w.String(m.str.c_str(), static_cast<rapidjson::SizeType>(m.str.size()));
    }
    w.EndObject();
    return std::string(sb.GetString(), sb.GetSize());
}

JsonObject rs256_header(const std::vector<std::pair<std::string, std::string>>& extra) {
    JsonObject h;
    h.set("alg", "RS256").set("typ", "JWT");
    for (const auto& e : extra) h.set(e.first, e.second);
    return h;
}

std::vector<uint8_t> rs256_signature(const std::string& data, const std::string& private_key_pem,
                                     const std::string& field) {
    PkeyPtr key = load_rsa_private_key(private_key_pem, field);
    MdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx) throw config_error(field + ": out of memory signing a JWT");
    size_t len = 0;
    if (EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key.get()) != 1 ||
        EVP_DigestSign(ctx.get(), nullptr, &len, reinterpret_cast<const unsigned char*>(data.data()),
                       data.size()) != 1) {
        ERR_clear_error();
        throw config_error(field + ": RS256 signing failed");
    }
    std::vector<uint8_t> sig(len);
    if (EVP_DigestSign(ctx.get(), sig.data(), &len, reinterpret_cast<const unsigned char*>(data.data()),
                       data.size()) != 1) {
        ERR_clear_error();
        throw config_error(field + ": RS256 signing failed");
    }
    sig.resize(len);
    return sig;
}

std::string sign_rs256(const JsonObject& header, const JsonObject& claims, const std::string& private_key_pem,
                       const std::string& field) {
    std::string input = b64url(header.json()) + "." + b64url(claims.json());
    std::vector<uint8_t> sig = rs256_signature(input, private_key_pem, field);
    return input + "." + base64url_encode(sig.data(), sig.size());
}

bool verify_rs256(const std::string& token, const std::string& public_pem, std::string* header_json,
                  std::string* claims_json) {
    size_t d1 = token.find('.');
    if (d1 == std::string::npos) return false;
    size_t d2 = token.find('.', d1 + 1);
    if (d2 == std::string::npos || token.find('.', d2 + 1) != std::string::npos) return false;
    std::string header, claims, sig;
    if (!decode_part(token.substr(0, d1), &header) ||
        !decode_part(token.substr(d1 + 1, d2 - d1 - 1), &claims) || !decode_part(token.substr(d2 + 1), &sig))
        return false;
    rapidjson::Document h;
    parse_json_bounded(h, header, nullptr);
    if (h.HasParseError() || !h.IsObject()) return false;
    auto alg = h.FindMember("alg");
    if (alg == h.MemberEnd() || !alg->value.IsString() || std::string(alg->value.GetString()) != "RS256")
        return false;
    PkeyPtr key = load_public_key(public_pem);
    if (!key || EVP_PKEY_base_id(key.get()) != EVP_PKEY_RSA) return false;
    MdCtxPtr ctx(EVP_MD_CTX_new());
    if (!ctx) return false;
    const std::string input = token.substr(0, d2);
    bool ok = EVP_DigestVerifyInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key.get()) == 1 &&
              EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(sig.data()), sig.size(),
                               reinterpret_cast<const unsigned char*>(input.data()), input.size()) == 1;
    ERR_clear_error();
    if (!ok) return false;
    if (header_json) *header_json = header;
    if (claims_json) *claims_json = claims;
    return true;
}

std::string x509_thumbprint(const std::string& cert_pem, const std::string& digest,
                            const std::string& field) {
    const EVP_MD* md = digest == "sha1" ? EVP_sha1() : digest == "sha256" ? EVP_sha256() : nullptr;
    if (!md) throw config_error(field + ": unknown thumbprint digest \"" + digest + "\"");
    BioPtr b = mem_bio(cert_pem);
    X509Ptr x(PEM_read_bio_X509(b.get(), nullptr, no_passphrase, nullptr));
    ERR_clear_error();
    if (!x) throw config_error(field + ": no PEM certificate found");
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    if (X509_digest(x.get(), md, out, &n) != 1) {
        ERR_clear_error();
        throw config_error(field + ": could not hash the certificate");
    }
    return base64url_encode(out, n);
}

}  // namespace cmk::jwt
