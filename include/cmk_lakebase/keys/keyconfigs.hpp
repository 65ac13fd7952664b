// Named key configurations (docs/CONTRACTS.md, "Key configurations"): provider, key
// id and options (credentials references only, never secrets), stored in
// <datadir>/cmk_lakebase/configs.json so that the file layer can use them before any
// catalog is readable. The file holds no secret; a MAC keyed by a key derived from the
// KEK (HKDF, its own label) makes any edit detectable. It records the KEK generation
// it is sealed under, so that it stays verifiable across a KEK rotation. The
// configuration the cluster is bound to lives in the keyring (Keyring::config); the
// cluster's first one is called "default". Pure C++.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk {

constexpr const char* kConfigsFile = "configs.json";

struct NamedKeyConfig {
    std::string name;
    KeyConfig config;
    std::string created_at;
};

struct KeyConfigSet {
    uint32_t kek_generation = 0;  // generation of the KEK the MAC is keyed from
    std::map<std::string, NamedKeyConfig> configs;
};

// KEK of a generation, or nullopt if unknown here.
using KekLookup = std::function<std::optional<SecureBytes>(uint32_t generation)>;

bool key_configs_exist(const std::string& keyring_dir);
// Missing file: an empty set. Throws KeyringError if damaged or its MAC does not
// verify under the KEK of its generation.
KeyConfigSet load_key_configs(const std::string& keyring_dir, const KekLookup& kek_of);
// Atomic replace, sealed under kek (set.kek_generation must be its generation).
void save_key_configs(const std::string& keyring_dir, const KeyConfigSet& set, const SecureBytes& kek);

// Names: 1 to 63 of a-z 0-9 _ - (first a letter or digit). Throws KmsError Config.
void validate_config_name(const std::string& name);
// The provider accepts the configuration (make_provider, no KMS call) and no option
// holds a secret: option names containing secret, password, token, private_key or
// credential must end in _file or _env (a reference). Throws KmsError Config.
void validate_key_config(const KeyConfig& cfg);

}  // namespace cmk
