// The AWS credential chain of the aws key provider, and the endpoint rule it shares
// with the provider: environment, web identity token -> STS
// AssumeRoleWithWebIdentity, shared credentials/config files with profiles, EC2
// IMDSv2, in that order. The chain's source is chosen at configuration time without
// a network call, so that a missing credential is a one-line configuration error
// naming what is missing. Internal to src/core/kms.
#pragma once

#include <memory>
#include <string>

#include "aws_sigv4.hpp"
#include "http.hpp"
#include "kit.hpp"

namespace cmk::aws {

struct Endpoint {
    std::string url;   // scheme://host[:port]/
    std::string host;  // host[:port] as sent in the Host header
};

// https://host[:port][/] or, to a loopback address only (kit's rule), http://...
// (tests, local proxies). Throws Config naming `field`.
Endpoint parse_endpoint(const std::string& field, const std::string& url);

// How the chain's requests (STS, IMDS) are sent: the provider's timing and CA bundle.
struct ChainTransport {
    kit::Timing timing;
    std::string ca_file;
};

class CredentialChain {
public:
    // Decides the source now (options credentials, profile, shared_credentials_file,
    // config_file, web_identity_token_file, role_arn, role_session_name,
    // imds_endpoint, and the AWS_* environment). Throws KmsError Config.
    CredentialChain(const KeyConfig& cfg, Endpoint sts, ChainTransport transport);
    ~CredentialChain();

    // Current credentials: static sources are read on each use (rotation of a
    // credentials file needs no restart); STS and IMDS answers are cached until five
    // minutes before they expire.
    Credentials get();
    // Temporary credentials (STS, IMDS) may expire early: forget() then get() anew.
    bool temporary() const;
    void forget();

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace cmk::aws
