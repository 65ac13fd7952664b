// Unit tests of the RS256 JWT builder (jwt.hpp): the signature verifies with the
// public key, the header and claims come back exactly, our signature over PyJWT's
// signing input is byte-identical to PyJWT's (independent code, test/data), tampering
// and wrong keys are caught, and bad keys fail as Config errors naming the field.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/pem.h>

#include <memory>

#include "cmk_lakebase/base/crypto.hpp"
#include "core/kms/jwt.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "test_helpers.hpp"

using namespace cmk;

namespace {

std::string data_file(const std::string& name) {
    std::string text = cmk_test::slurp(cmk_test::data_dir() + "/" + name);
    if (text.empty()) ADD_FAILURE() << "missing test data " << name;
    return text;
}

// PEM of a freshly generated private key ("RSA" with bits, or "EC").
std::string fresh_key_pem(const char* type, unsigned bits) {
    EVP_PKEY* k = std::string(type) == "RSA" ? EVP_PKEY_Q_keygen(nullptr, nullptr, "RSA", (size_t)bits)
                                             : EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
    std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> key(k, EVP_PKEY_free);
    std::unique_ptr<BIO, int (*)(BIO*)> b(BIO_new(BIO_s_mem()), BIO_free);
    PEM_write_bio_PrivateKey(b.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr);
    char* p = nullptr;
    long n = BIO_get_mem_data(b.get(), &p);
    return std::string(p, static_cast<size_t>(n));
}

std::string public_pem_of(const std::string& priv) {
    std::unique_ptr<BIO, int (*)(BIO*)> in(BIO_new_mem_buf(priv.data(), (int)priv.size()), BIO_free);
    std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> key(
        PEM_read_bio_PrivateKey(in.get(), nullptr, nullptr, nullptr), EVP_PKEY_free);
    std::unique_ptr<BIO, int (*)(BIO*)> b(BIO_new(BIO_s_mem()), BIO_free);
    PEM_write_bio_PUBKEY(b.get(), key.get());
    char* p = nullptr;
    long n = BIO_get_mem_data(b.get(), &p);
    return std::string(p, static_cast<size_t>(n));
}

std::string last_line(const std::string& text) {
    std::string t = text;
    while (!t.empty() && t.back() == '\n') t.pop_back();
    return t.substr(t.rfind('\n') + 1);
}

}  // namespace

TEST(Base64Url, Rfc4648AlphabetAndNoPadding) {
    const uint8_t b[] = {0xfb, 0xff};
    EXPECT_EQ(base64url_encode(b, 2), "-_8");
    EXPECT_EQ(base64_encode(b, 2), "+/8=");
    EXPECT_EQ(base64url_encode("foob", 4), "Zm9vYg");
    EXPECT_EQ(base64url_encode("fooba", 5), "Zm9vYmE");
    EXPECT_EQ(base64url_encode("foobar", 6), "Zm9vYmFy");
    auto d = base64url_decode("-_8");
    ASSERT_EQ(d.size(), 2u);
    EXPECT_EQ(d[0], 0xfb);
    EXPECT_EQ(d[1], 0xff);
    EXPECT_THROW(base64url_decode("+/8"), CryptoError);    // standard alphabet refused
    EXPECT_THROW(base64url_decode("Zm9vY"), CryptoError);  // impossible length
}

TEST(Jwt, JsonObjectOrderAndEscaping) {
    jwt::JsonObject o;
    o.set("iss", "a\"b\\c\n").set("iat", int64_t{1700000000}).set("aud", "https://x/y");
    EXPECT_EQ(o.json(), "{\"iss\":\"a\\\"b\\\\c\\n\",\"iat\":1700000000,\"aud\":\"https://x/y\"}");
    EXPECT_EQ(jwt::rs256_header({{"kid", "k1"}}).json(),
              "{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"k1\"}");
}

TEST(Jwt, SignedTokenVerifiesWithPublicKeyAndCarriesClaims) {
    std::string priv = data_file("jwt_rs256_test_key.pem");
    std::string pub = data_file("jwt_rs256_test_pub.pem");
    jwt::JsonObject claims;
    claims.set("iss", "svc@p.iam.gserviceaccount.com")
        .set("scope", "https://www.googleapis.com/auth/cloudkms")
        .set("aud", "https://oauth2.googleapis.com/token")
        .set("iat", int64_t{1700000000})
        .set("exp", int64_t{1700003600});
    std::string tok = jwt::sign_rs256(jwt::rs256_header({{"kid", "abc123"}}), claims, priv);
    // Three base64url parts, no padding, no standard-alphabet characters.
    EXPECT_EQ(std::count(tok.begin(), tok.end(), '.'), 2);
    EXPECT_EQ(tok.find_first_of("=+/"), std::string::npos);
    std::string h, c;
    ASSERT_TRUE(jwt::verify_rs256(tok, pub, &h, &c));
    EXPECT_EQ(h, "{\"alg\":\"RS256\",\"typ\":\"JWT\",\"kid\":\"abc123\"}");
    EXPECT_EQ(c, claims.json());
    // The certificate of the same key verifies too.
    EXPECT_TRUE(jwt::verify_rs256(tok, data_file("jwt_rs256_test_cert.pem")));
    // Signature is 2048 bits.
    EXPECT_EQ(base64url_decode(tok.substr(tok.rfind('.') + 1)).size(), 256u);
}

TEST(Jwt, SameSignatureAsPyJwt) {
    std::string priv = data_file("jwt_rs256_test_key.pem");
    std::string pub = data_file("jwt_rs256_test_pub.pem");
    std::string theirs = last_line(data_file("jwt_rs256_pyjwt.txt"));
    // PyJWT's token verifies with our verifier ...
    std::string claims;
    ASSERT_TRUE(jwt::verify_rs256(theirs, pub, nullptr, &claims));
    EXPECT_NE(claims.find("\"iss\":\"svc@p.iam.gserviceaccount.com\""), std::string::npos);
    // ... and PKCS#1 v1.5 is deterministic: our signature over its signing input is its signature.
    std::string input = theirs.substr(0, theirs.rfind('.'));
    std::vector<uint8_t> sig = jwt::rs256_signature(input, priv);
    EXPECT_EQ(base64url_encode(sig.data(), sig.size()), theirs.substr(theirs.rfind('.') + 1));
}

TEST(Jwt, TamperingAndWrongKeyAreCaught) {
    std::string priv = data_file("jwt_rs256_test_key.pem");
    std::string pub = data_file("jwt_rs256_test_pub.pem");
    jwt::JsonObject claims;
    claims.set("sub", "alice").set("exp", int64_t{2000000000});
    std::string tok = jwt::sign_rs256(jwt::rs256_header(), claims, priv);
    ASSERT_TRUE(jwt::verify_rs256(tok, pub));
    // Other claims under the same signature.
    jwt::JsonObject other;
    other.set("sub", "mallory").set("exp", int64_t{2000000000});
    std::string forged = tok.substr(0, tok.find('.') + 1) +
                         base64url_encode(other.json().data(), other.json().size()) +
                         tok.substr(tok.rfind('.'));
    EXPECT_FALSE(jwt::verify_rs256(forged, pub));
    // A flipped signature bit.
    std::string bad = tok;
    bad[bad.size() - 3] = bad[bad.size() - 3] == 'A' ? 'B' : 'A';
    EXPECT_FALSE(jwt::verify_rs256(bad, pub));
    // Another key.
    EXPECT_FALSE(jwt::verify_rs256(tok, public_pem_of(fresh_key_pem("RSA", 2048))));
    // alg none, malformed tokens.
    std::string none_hdr = "{\"alg\":\"none\",\"typ\":\"JWT\"}";
    EXPECT_FALSE(jwt::verify_rs256(
        base64url_encode(none_hdr.data(), none_hdr.size()) + tok.substr(tok.find('.')), pub));
    EXPECT_FALSE(jwt::verify_rs256("a.b", pub));
    EXPECT_FALSE(jwt::verify_rs256(tok + ".x", pub));
    EXPECT_FALSE(jwt::verify_rs256(tok, "not a pem"));
}

TEST(Jwt, BadKeysAreConfigErrorsNamingTheFieldWithoutQuotingTheKey) {
    jwt::JsonObject claims;
    claims.set("sub", "x");
    auto msg_of = [&](const std::string& pem) -> std::string {
        try {
            jwt::sign_rs256(jwt::rs256_header(), claims, pem, "credentials_file");
        } catch (const KmsError& e) {
            EXPECT_EQ(e.kind, KmsErrorKind::Config);
            return e.what();
        }
        ADD_FAILURE() << "no KmsError";
        return "";
    };
    std::string m = msg_of(
        "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8w\n-----END PRIVATE KEY-----\n");
    EXPECT_EQ(m.rfind("credentials_file: ", 0), 0u) << m;
    EXPECT_EQ(m.find("MIIB"), std::string::npos) << m;
    std::string ec = fresh_key_pem("EC", 0);
    m = msg_of(ec);
    EXPECT_NE(m.find("not an RSA private key"), std::string::npos) << m;
    m = msg_of(fresh_key_pem("RSA", 1024));
    EXPECT_NE(m.find("shorter than 2048"), std::string::npos) << m;
    EXPECT_EQ(m.find("BEGIN"), std::string::npos) << m;
}

TEST(Jwt, X509Thumbprints) {
    // Values from: openssl x509 -outform DER | openssl dgst -sha1|-sha256 -binary | base64url
    std::string cert = data_file("jwt_rs256_test_cert.pem");
    EXPECT_EQ(jwt::x509_thumbprint(cert, "sha1"), "fy8hteHUfYXHd-yc-foQ-aV88J8");
    EXPECT_EQ(jwt::x509_thumbprint(cert, "sha256"), "QdmAuqKRwVYK0kru8gkZHn-qFVgyyLeGAzzgITvAuRM");
    EXPECT_THROW(jwt::x509_thumbprint("junk", "sha1"), KmsError);
    EXPECT_THROW(jwt::x509_thumbprint(cert, "md5"), KmsError);
}
