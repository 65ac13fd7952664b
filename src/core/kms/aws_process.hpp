// AWS `credential_process` (a profile's external credential helper, as the AWS CLI and
// SDKs run it): the command line split like botocore's shlex.split (no shell), the
// helper run with a deadline and an output bound, its JSON answer parsed. Internal to
// src/core/kms (aws_credentials.cpp).
//
// The helper runs as the database's OS user with the server's environment, stdin
// /dev/null, in a process group of its own (killed whole at the deadline), with every
// descriptor above stderr closed (a server has its data files open) and default signal
// dispositions and an empty signal mask (the caller may be a probe thread that blocks
// every signal). Its standard output holds secrets: it is wiped after parsing; its
// standard error is never copied into a message.
#pragma once

#include <string>
#include <vector>

#include "aws_sigv4.hpp"

namespace cmk::aws {

constexpr size_t kProcessOutputMax = 64 * 1024;

// The command line split into arguments: whitespace separates, single quotes keep
// everything literally, double quotes keep everything but \" and \\, a backslash
// outside quotes escapes the next character. The first argument must be an absolute
// path to an executable regular file (the server's PATH is not the operator's shell's).
// Throws KmsError Config naming `field` ("profile: profile \"p\" credential_process").
std::vector<std::string> split_process_command(const std::string& field, const std::string& command);
void check_process_executable(const std::string& field, const std::vector<std::string>& argv);

// Runs argv, waits at most timeout_ms, returns its standard output (at most
// kProcessOutputMax bytes). Throws KmsError Unavailable naming `what`: could not start,
// killed at the deadline, exited non-zero or by a signal, output too large.
std::string run_credential_process(const std::vector<std::string>& argv, long timeout_ms, const std::string& what);

// Parses the helper's answer: {"Version": 1, "AccessKeyId", "SecretAccessKey",
// "SessionToken"?, "Expiration"? (ISO 8601)}. The text is wiped. Throws KmsError
// Unavailable naming `what` (not JSON, another Version, keys missing).
Credentials parse_process_output(std::string& text, const std::string& what);

}  // namespace cmk::aws
