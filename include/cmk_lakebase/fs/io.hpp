// The encrypting file layer's public face for I/O (DESIGN §3): what the PostgreSQL
// module calls to start the layer and report on it. Key administration (probes, the
// kill switch, rotation, bindings) is in key_admin.hpp. The layer sits between a process and libc's file calls, either
// preloaded (LD_PRELOAD, tools run by `pg_cmk exec` and `pg_cmk initdb`) or installed
// over the `postgres` executable's GOT slots by the module's _PG_init. It knows
// nothing of PostgreSQL internals.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cmk_lakebase/base/error.hpp"
#include "cmk_lakebase/base/fileclass.hpp"
#include "cmk_lakebase/kms/provider.hpp"

namespace cmk::fs {

// A refusal with the three parts PostgreSQL reports: message, detail, hint.
// A refusal of the layer (not active, keys wiped, a server it cannot serve): State.
struct LayerError : Error {
    LayerError(const std::string& msg, std::string d, std::string h)
        : Error(ErrorCategory::State, msg, std::move(d), std::move(h)) {}
};

enum class Mode { Off, Preload, Got };
const char* mode_name(Mode m);  // "off", "preload", "got"

struct LayerInfo {
    Mode mode = Mode::Off;
    std::string data_directory;
    std::string provider;
    std::string key_id;
    std::string kek_fingerprint;
    uint32_t kek_generation = 0;
    std::string cluster_id;
    bool per_boot_key_present = false;
    uint64_t dek_count = 0;
    bool keys_wiped = false;
    std::string config_name;        // named key configuration the cluster is bound to
    std::string kek_version;        // CMK version that wrapped the KEK, if known
    bool rotation_pending = false;  // a KEK rotation was interrupted and not completed yet
};

// Server start (postmaster, from _PG_init): loads the keyring of datadir, unwraps the
// KEK through its provider, opens the key map, refuses if a durable encrypted file has
// no key, creates the per-boot key and installs the layer over the executable's GOT.
// If the layer is already active by LD_PRELOAD on the same data directory, it only
// checks. Throws LayerError.
void start_server(const std::string& datadir);

// After start_server, in the postmaster (from _PG_init): points the file calls of the
// PostgreSQL modules loaded already from pkglibdir, and of every library PostgreSQL
// loads later, at the layer (src/fs/modules.cpp). module_addr: an address inside the
// calling module, which is left alone. refused: modules that must not load at all.
// No-op unless the layer runs over the GOT. Throws LayerError.
struct RefusedModule {
    std::string name;  // file name without ".so"
    std::string detail, hint;
};
void cover_modules(const std::string& pkglibdir, const void* module_addr,
                   const std::vector<RefusedModule>& refused);

LayerInfo info();

// What the layer knows about one file (path relative to the data directory).
struct FileKeyInfo {
    FileClass file_class = FileClass::Plaintext;
    bool exists = false;
    bool encrypted = false;
    std::string key_kind;     // "dek", "per-boot", "none"
    std::string fingerprint;  // of the file's data key; "" if none
};
FileKeyInfo describe_file(const std::string& relpath);

}  // namespace cmk::fs
