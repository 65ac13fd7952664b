// Opens a cluster's keys (open_keys.hpp): the one place that knows how an interrupted
// KEK rotation leaves the keyring (current and previous generation) and the key map
// (sealed under either).
#include "cmk_lakebase/keys/open_keys.hpp"

#include "cmk_lakebase/keys/keyconfigs.hpp"

namespace cmk {

ClusterKeys unlock_cluster_keys(const std::string& dir, const Keyring& kr, KeyProvider& provider,
                                UnwrapPrevious previous) {
    ClusterKeys k;
    k.kek = unlock_keyring(kr, provider);
    k.kek_generation = kr.kek_generation;
    k.map_generation = kr.kek_generation;
    if (kr.previous) {
        // Interrupted KEK rotation: the key map may still be sealed under the previous
        // generation.
        try {
            k.map_generation = KeyMap::peek_generation(dir);
        } catch (const std::exception&) {
            k.map_generation = kr.kek_generation;  // reported when the key map is opened
        }
        bool map_needs_it = k.map_generation == kr.previous->kek_generation;
        if (map_needs_it || previous == UnwrapPrevious::Always) k.previous_kek = unlock_previous_kek(kr, provider);
        if (!map_needs_it) k.map_generation = kr.kek_generation;
    }
    return k;
}

std::unique_ptr<KeyMap> open_cluster_keymap(const std::string& dir, const Keyring& kr, const ClusterKeys& keys,
                                            KeyMap::KekResolver resolver) {
    return std::make_unique<KeyMap>(dir, keys.map_kek(), kr.cluster_id, keys.map_generation, std::move(resolver));
}

void verify_key_configs(const std::string& dir, const Keyring& kr, const ClusterKeys& keys) {
    if (kr.previous || !key_configs_exist(dir)) return;
    (void)load_key_configs(dir, [&](uint32_t g) -> std::optional<SecureBytes> {
        if (g == keys.kek_generation && !keys.kek.empty()) return keys.kek.clone();
        return std::nullopt;
    });
}

}  // namespace cmk
