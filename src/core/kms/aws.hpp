// The AWS KMS key provider's checks and parsers that the unit tests reach directly,
// and its factory (make_provider() makes the provider for provider "aws" with
// make_aws_provider()). Pure C++.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "cmk_lakebase/kms/provider.hpp"
#include "http.hpp"

namespace cmk::aws {

// us-east-1, eu-west-3, ap-southeast-2, us-gov-west-1, cn-north-1, us-iso-east-1, ...
bool valid_region(const std::string& region);

// A KMS key reference the provider accepts: key ARN, alias ARN, "alias/NAME", key id
// (UUID) or multi-Region key id ("mrk-" + 32 hex). On success *arn_region is the
// region of an ARN ("" otherwise).
bool valid_key_id(const std::string& key_id, std::string* arn_region = nullptr);

// INI text of ~/.aws/credentials and ~/.aws/config: section -> key -> value (section
// names as written, e.g. "default", "profile dev"; keys lower-cased; '#' and ';'
// comment lines; values trimmed).
using IniFile = std::map<std::string, std::map<std::string, std::string>>;
IniFile parse_ini(const std::string& text);

// The answer of KMS's JSON 1.1 error body / x-amzn-ErrorType header reduced to the bare
// type name: "com.amazonaws.kms#NotFoundException" and "NotFoundException:http://..."
// both give "NotFoundException".
std::string error_type(const std::string& raw);

// The provider, its options and credential source checked now (KmsError Config). KMS
// calls go through `transport`, the network (perform_with_retry, retrying transient
// statuses and error types) when it is empty; the fuzz target passes canned answers.
// The credential chain's own requests (STS, IMDS) always use the network.
std::unique_ptr<KeyProvider> make_aws_provider(const KeyConfig& cfg, http::Transport transport = nullptr);

}  // namespace cmk::aws
