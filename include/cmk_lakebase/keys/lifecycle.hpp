// Key lifecycle (DESIGN §2, issue 5): re-wrapping the KEK under the CMK's current
// version, binding the cluster to another key configuration (another CMK or
// provider), rotating the KEK itself, and managing named key configurations. None of
// these rewrites a data file: they change keyring.json, the key map (KEK rotation
// only) and configs.json, each replaced atomically, in an order that leaves the
// cluster startable after a crash at any step (docs/CONTRACTS.md, "Rotation").
// Shared by the server (through the file layer, online) and pg_cmk (offline).
// Provider-generic: everything goes through KeyProvider. Pure C++.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::lifecycle {

// A key operation that cannot be done (unknown configuration, concurrent change,
// verification failure). KmsError from the provider passes through unchanged.
struct LifecycleError : Error {
    enum Kind { Invalid, NotFound, Exists, Conflict };
    explicit LifecycleError(const std::string& m, Kind k = Invalid) : Error(category_of(k), m), kind(k) {}
    Kind kind;
    static ErrorCategory category_of(Kind k) {
        return k == NotFound ? ErrorCategory::NotFound
               : k == Exists ? ErrorCategory::Exists
               : k == Conflict ? ErrorCategory::Conflict
                               : ErrorCategory::Invalid;
    }
};

struct Context {
    std::string dir;                        // keyring directory (<datadir>/cmk_lakebase)
    KeyMap* keymap = nullptr;               // open on dir
    Keyring keyring;                        // current, verified
    SecureBytes kek;                        // KEK of keyring.kek_generation
    std::unique_ptr<KeyProvider> provider;  // for keyring.config
    // Other KEK generations known without a KMS call (the server's shared memory).
    std::function<std::optional<SecureBytes>(uint32_t)> kek_of;
    // Called with a new KEK before anything on disk refers to it (the server makes it
    // known to every process), and with a generation once nothing refers to it.
    std::function<void(uint32_t, const SecureBytes&)> publish;
    std::function<void(uint32_t)> retire;
    // Makes the provider for a configuration (the caller wraps it for the audit trail).
    std::function<std::unique_ptr<KeyProvider>(const KeyConfig&, const std::string& name)> make_provider;
};

struct Result {
    std::string action;  // rewrap, bind_cluster, rotate_kek
    std::string config_name;
    std::string provider;
    std::string key_id;
    std::string key_version_before;
    std::string key_version;
    uint32_t kek_generation_before = 0;
    uint32_t kek_generation = 0;
    std::string kek_fingerprint;
    bool finished_interrupted = false;  // an interrupted KEK rotation was completed first
};

// a. Re-wraps the KEK under the CMK's current (primary) version.
Result rewrap(Context& ctx);
// b. Unwrap with the old, wrap with the new: binds the cluster to a named configuration.
Result bind_cluster(Context& ctx, const std::string& config_name);
// c. New KEK, every DEK re-sealed, old KEK destroyed; kek_generation + 1.
Result rotate_kek(Context& ctx);
// Completes a KEK rotation a crash interrupted (keyring with a previous KEK); false if
// there was none. Every operation above calls it first.
bool finish_interrupted(Context& ctx);

struct ConfigRow {
    NamedKeyConfig named;
    bool bound = false;
};
std::vector<ConfigRow> list_configs(Context& ctx);
void create_config(Context& ctx, const NamedKeyConfig& c);
void drop_config(Context& ctx, const std::string& name);

// Wraps kek with p and proves the wrapping by unwrapping it again (same key, constant
// time compare). Throws KmsError or LifecycleError.
WrapResult wrap_checked(KeyProvider& p, const SecureBytes& kek);

// Crash injection for the rotation tests: at the named step ("rotate_kek:after_keymap")
// the process kills itself with SIGKILL, leaving the files as a crash there would.
// "" disables. Step names are listed in docs/CONTRACTS.md.
void set_crash_point(const std::string& step);
void crash_point(const char* step);
const std::vector<std::string>& crash_steps();

}  // namespace cmk::lifecycle
