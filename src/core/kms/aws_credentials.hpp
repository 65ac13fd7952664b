// The AWS credential chain of the aws key provider, and the endpoint rule it shares
// with the provider: environment, web identity token -> STS
// AssumeRoleWithWebIdentity, shared credentials/config files with profiles (and their
// role_arn / source_profile / credential_source chains), EC2 IMDSv2, in that order;
// then, when the key configuration names the customer's role (assume_role_arn), STS
// AssumeRole from those base credentials with the customer's external id. The chain's
// source is chosen at configuration time without a network call, so that a missing
// credential is a one-line configuration error naming what is missing. Internal to
// src/core/kms.
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
    std::string region;  // the STS endpoint's signing region (the provider's region)
};

// One STS AssumeRole step: the role to assume and how. Validated by validate_role_hop.
struct RoleHop {
    std::string role_arn;      // arn:PARTITION:iam::ACCOUNT:role/[PATH/]NAME
    std::string external_id;   // "" = none; 2-1224 of [A-Za-z0-9_+=,.@:/-]
    std::string session_name;  // 2-64 of [A-Za-z0-9_+=,.@-]
    long duration_s = 3600;    // 900-43200
    std::string where;         // option or profile it came from, for messages
};

// Throws KmsError Config naming the field (arn_field, "external_id", ...) when a part
// of the hop is not what STS accepts.
void validate_role_hop(const RoleHop& hop, const std::string& arn_field, const std::string& external_id_field,
                       const std::string& session_field, const std::string& duration_field);

// The query-protocol body of AssumeRole (application/x-www-form-urlencoded), in the
// parameter order of AWS's API reference example.
std::string assume_role_body(const RoleHop& hop);

// The unsigned AssumeRole request to `sts` (Host and Content-Type set; sign() adds the
// rest).
SigV4Request assume_role_request(const Endpoint& sts, const RoleHop& hop);

// What a successful AssumeRole (or AssumeRoleWithWebIdentity) answer holds.
struct AssumedRole {
    Credentials creds;
    std::string assumed_role_arn;  // AssumedRoleUser/Arn: arn:aws:sts::ACCOUNT:assumed-role/ROLE/SESSION
    std::string request_id;        // ResponseMetadata/RequestId
};

// Parses a 200 answer (at most 64 KiB; the text is not kept). Throws KmsError
// Unavailable naming `what` when credentials are missing or the answer is too large.
AssumedRole parse_assumed_role(const std::string& xml, const std::string& what);

// The KmsError a non-200 STS answer stands for (docs/providers/aws.md): AccessDenied
// (trust policy, external id, role deleted) and InvalidClientTokenId are revocations,
// a validation error is a configuration error naming `arn_field`, the rest an outage.
KmsError sts_error(long status, const std::string& xml, const std::string& what, const std::string& arn_field,
                   const std::string& request_id);

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
    // Who the calls run as, for the audit trail and messages, without a network call:
    // the assumed role's session ARN once known, else the role to assume, else the
    // base source ("environment (AWS_ACCESS_KEY_ID) AKID...").
    std::string identity() const;

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace cmk::aws
