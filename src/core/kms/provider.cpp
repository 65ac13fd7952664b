// Key provider dispatch (kms/provider.hpp): validates a key configuration and returns
// the provider for it: local, kmip, aws, azure, vault, gcp (one implementation file
// each, <name>.cpp, on the shared provider kit, kit.hpp). Each factory validates its
// own options before any KMS call.
#include "cmk_lakebase/kms/provider.hpp"
#include "aws.hpp"
#include "azure.hpp"
#include "gcp.hpp"
#include "kit.hpp"
#include "vault.hpp"

#include <cstdlib>

namespace cmk {

std::unique_ptr<KeyProvider> make_local_provider(const KeyConfig& cfg);  // local.cpp
std::unique_ptr<KeyProvider> make_kmip_provider(const KeyConfig& cfg);   // kmip.cpp

ErrorCategory category_of(KmsErrorKind k) {
    switch (k) {
        case KmsErrorKind::Config:
            return ErrorCategory::Invalid;
        case KmsErrorKind::Unavailable:
            return ErrorCategory::KeyUnavailable;
        case KmsErrorKind::Revoked:
            return ErrorCategory::KeyRevoked;
    }
    return ErrorCategory::Internal;
}

// Only the provider's refusal is a revocation; anything else that stops a probe
// (timeouts, a bad answer, a local failure) is an outage, governed by the grace period.
KeyHealth health_of(ErrorCategory c) {
    return c == ErrorCategory::KeyRevoked ? KeyHealth::Revoked : KeyHealth::Unavailable;
}

const char* key_health_name(KeyHealth h) {
    switch (h) {
        case KeyHealth::Ok:
            return "ok";
        case KeyHealth::Unavailable:
            return "unavailable";
        case KeyHealth::Revoked:
            return "revoked";
    }
    return "unknown";
}

std::unique_ptr<KeyProvider> make_provider(const KeyConfig& cfg) {
    if (cfg.provider.empty()) throw KmsError(KmsErrorKind::Config, "provider: no key provider configured");
    // Key ids come from keyring.json, configs.json or a command line: raw invalid UTF-8
    // (or control characters) must never reach a log or a message.
    if (!printable_utf8(cfg.provider))
        throw KmsError(KmsErrorKind::Config, "provider: \"" + escape_text(cfg.provider) +
                                                 "\" is not valid UTF-8 text without control characters");
    if (!printable_utf8(cfg.key_id))
        throw KmsError(KmsErrorKind::Config, "key_id: \"" + escape_text(cfg.key_id) +
                                                 "\" is not valid UTF-8 text without control characters");
    if (cfg.provider == "local") return make_local_provider(cfg);
    if (cfg.provider == "kmip") return make_kmip_provider(cfg);
    if (cfg.provider == "aws") return aws::make_aws_provider(cfg);
    if (cfg.provider == "azure") return azure::make_azure_provider(cfg);
    if (cfg.provider == "vault") return vault::make_vault_provider(cfg);
    if (cfg.provider == "gcp") return gcp::make_gcp_provider(cfg);
    throw KmsError(KmsErrorKind::Config, "provider: unknown key provider \"" + cfg.provider +
                                             "\" (known: local, aws, azure, gcp, vault, kmip)");
}

std::string default_local_key_store() {
    const char* env = std::getenv("CMK_LAKEBASE_KEY_STORE");
    if (env && *env) return env;
    std::string h = kit::home_dir();
    if (h.empty()) h = "/";
    if (h.size() > 1 && h.back() == '/') h.pop_back();
    return (h == "/" ? "" : h) + "/.cmk_lakebase/keys";
}

}  // namespace cmk
