// The AWS KMS key provider's checks and parsers that the unit tests reach directly
// (the provider itself is made by make_provider() with provider "aws"). Pure C++.
#pragma once

#include <map>
#include <string>

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

}  // namespace cmk::aws
