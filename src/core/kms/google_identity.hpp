// The Google identity of the gcp key provider: a service-account key file
// (credentials_file, else $GOOGLE_APPLICATION_CREDENTIALS) traded for an access token
// by the JWT bearer grant (RFC 7523, RS256 assertion signed here, jwt.hpp), or the
// metadata server (metadata_host, else $GCE_METADATA_HOST, else
// metadata.google.internal). Access tokens are cached until a minute before they
// expire. Internal to src/core/kms.
#pragma once

#include <functional>
#include <string>

#include "http.hpp"
#include "kit.hpp"

namespace cmk::gcp {

// Where tokens come from, chosen and checked at configuration time: a key file
// (field names the option or variable that gave it) or the metadata server.
struct IdentitySource {
    std::string field;          // "credentials_file" or "GOOGLE_APPLICATION_CREDENTIALS"; "" = metadata
    std::string path;           // the key file
    std::string metadata_host;  // HOST[:PORT], when path is ""
};

// Reads options credentials_file and metadata_host and the environment; a key file is
// parsed and its private key tried now (wiped at once). Throws KmsError Config.
IdentitySource choose_identity(const KeyConfig& cfg);

class Identity {
public:
    // `send` performs one token request and maps a refusal to a KmsError.
    using Send = std::function<http::Response(http::Request&)>;
    Identity(IdentitySource src, kit::Timing timing, std::string ca_file, Send send);

    // An access token: the cached one, or a new one when none is fresh or `refresh`.
    kit::Secret token(bool refresh, const std::string& where);

    const IdentitySource& source() const { return src_; }

private:
    kit::Secret fetch(long* life_s, const std::string& where);

    IdentitySource src_;
    kit::Timing timing_;
    std::string ca_file_;
    Send send_;
    kit::TokenCache cache_{60};
};

}  // namespace cmk::gcp
