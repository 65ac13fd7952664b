// libFuzzer target: the files of a keyring directory and of the local key provider,
// read through the loaders the product uses (they take a directory, so the input is
// written to a scratch directory first). The first byte chooses the file (modulo the
// number of cases), the rest is its content:
//   0 keyring.json (load_keyring)      1 configs.json (load_key_configs)
//   2 keymap (KeyMap, then a lookup)    3 <id>.key of the local provider
//   4 audit.log (audit::read_all)
// The KEK is a fixed, known one, so seeds written by the code itself pass the MACs and
// reach the record parsers. Any project exception is a clean rejection.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <vector>
#include <exception>
#include <optional>
#include <string>

#include "cmk_lakebase/base/crypto.hpp"
#include "cmk_lakebase/keys/audit.hpp"
#include "cmk_lakebase/keys/keyconfigs.hpp"
#include "cmk_lakebase/keys/keymap.hpp"
#include "cmk_lakebase/keys/keyring.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "fuzz_common.hpp"

namespace {

constexpr const char* kClusterId = "fuzzcluster";  // the key map header must name it

cmk::SecureBytes fixed_kek() {
    uint8_t k[cmk::kKekSize];
    for (size_t i = 0; i < sizeof k; i++) k[i] = uint8_t(i * 7 + 1);
    return cmk::SecureBytes(k, sizeof k);
}

void one(uint8_t which, const uint8_t* data, size_t size) {
    const std::string& dir = cmk_fuzz::scratch_dir();
    switch (which % 5) {
    case 0:
        cmk_fuzz::write_file(dir + "/" + cmk::kKeyringFile, data, size);
        (void)cmk::load_keyring(dir);
        break;
    case 1:
        cmk_fuzz::write_file(dir + "/" + cmk::kConfigsFile, data, size);
        (void)cmk::load_key_configs(dir, [](uint32_t) -> std::optional<cmk::SecureBytes> { return fixed_kek(); });
        break;
    case 2: {
        cmk_fuzz::write_file(dir + "/" + cmk::kKeyMapFile, data, size);
        cmk::KeyMap km(dir, fixed_kek(), kClusterId, 1,
                       [](uint32_t) -> std::optional<cmk::SecureBytes> { return fixed_kek(); });
        (void)km.get("base/1/1");
        km.refresh();
        break;
    }
    case 3: {
        cmk_fuzz::write_file(dir + "/k1.key", data, size);
        cmk::LocalKeyStore ks(dir);
        (void)ks.state("k1");
        (void)ks.primary_version("k1");
        break;
    }
    case 4:
        ::unlink((dir + "/audit.log.1").c_str());
        cmk_fuzz::write_file(dir + "/" + cmk::audit::kAuditFile, data, size);
        (void)cmk::audit::read_all(dir);
        break;
    }
}

// Seeds written by the product's own writers (so the MACs and seals pass under the
// fixed KEK), one file per case, prefixed by the case's byte:
// CMK_FUZZ_WRITE_SEEDS=fuzz/corpus/fuzz_keyfiles build/fuzz/fuzz_keyfiles
void write_seed(const std::string& out, uint8_t which, const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::string body((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::string name = out + "/seed_" + std::to_string(which) + "_" + path.substr(path.rfind('/') + 1);
    std::ofstream o(name, std::ios::binary);
    o.put(char(which));
    o << body;
}

void write_seeds(const std::string& out) {
    std::string dir = cmk_fuzz::scratch_dir() + "/seed";
    ::mkdir(dir.c_str(), 0700);
    cmk::SecureBytes kek = fixed_kek();

    cmk::Keyring kr;
    kr.cluster_id = kClusterId;
    kr.config = {"local", "k1", {{"key_store", "/var/lib/cmk/keys"}}};
    kr.wrapped_kek = std::vector<uint8_t>(60, 0xa5);
    kr.kek_version = "1";
    kr.created_at = "2026-01-01T00:00:00Z";
    kr.previous = cmk::PreviousKek{std::vector<uint8_t>(60, 0x5a), "1", "00ff", 1};
    kr.kek_generation = 2;
    cmk::seal_keyring(kr, kek);
    cmk::save_keyring(dir, kr);
    write_seed(out, 0, dir + "/" + cmk::kKeyringFile);

    cmk::KeyConfigSet set;
    set.kek_generation = 1;
    set.configs["default"] = {"default", {"aws", "arn:aws:kms:eu-west-1:1:key/x", {{"region", "eu-west-1"}}},
                              "2026-01-01T00:00:00Z"};
    set.configs["db1"] = {"db1", {"vault", "k", {{"address", "https://vault:8200"}}}, "2026-01-02T00:00:00Z"};
    cmk::save_key_configs(dir, set, kek);
    write_seed(out, 1, dir + "/" + cmk::kConfigsFile);

    cmk::KeyMap::create_empty(dir, kClusterId, 1);
    {
        cmk::KeyMap km(dir, kek, kClusterId, 1);
        km.create("base/1/1", cmk::FileClass::Relation);
        km.create("pg_wal/000000010000000000000001", cmk::FileClass::Wal);
        km.move("base/1/1", "base/1/2", cmk::FileClass::Relation, true);
        km.remove("base/1/2");
    }
    write_seed(out, 2, dir + "/" + cmk::kKeyMapFile);

    cmk::LocalKeyStore ks(dir + "/keys");
    ks.ensure_dir();
    ks.create("k1");
    ks.rotate("k1");
    ks.set_state("k1", "disabled");
    write_seed(out, 3, dir + "/keys/k1.key");

    cmk::audit::Event e;
    e.actor = "pg_cmk";
    e.action = "unwrap";
    e.provider = "local";
    e.key_id = "k1";
    e.kek_generation = 1;
    cmk::audit::record_to(dir, e);
    e.action = "rotate_kek";
    cmk::audit::record_to(dir, e);
    write_seed(out, 4, dir + "/" + cmk::audit::kAuditFile);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
    if (const char* out = std::getenv("CMK_FUZZ_WRITE_SEEDS")) {
        try {
            write_seeds(out);
        } catch (const std::exception& e) {
            std::fprintf(stderr, "writing seeds: %s\n", e.what());
            std::exit(1);
        }
        std::exit(0);
    }
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size == 0) return 0;
    try {
        one(data[0], data + 1, size - 1);
    } catch (const std::exception&) {
    }
    return 0;
}
