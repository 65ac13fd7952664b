// `pg_cmk key`: manages customer-managed keys in the local provider's key store (the
// stand-in for a KMS on one machine). Disabling a key is the kill switch of every
// cluster that uses it; deleting destroys the key material for good. Never prints
// key material.
#include <openssl/crypto.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include <rapidjson/document.h>

#include "cli.hpp"
#include "cmk_lakebase/base/json.hpp"
#include "cmk_lakebase/kms/provider.hpp"
#include "cmk_lakebase/base/sys.hpp"

namespace cmk::cli {
namespace {

const char kKeyUsage[] =
    "pg_cmk key manages keys in the local key store of cmk_lakebase.\n"
    "\n"
    "Usage:\n"
    "  pg_cmk key create KEY_ID [--key-store DIR]    create a new enabled key\n"
    "  pg_cmk key enable KEY_ID [--key-store DIR]    enable a disabled key\n"
    "  pg_cmk key disable KEY_ID [--key-store DIR]   disable a key: clusters using it\n"
    "                                                shut down and cannot start\n"
    "  pg_cmk key delete KEY_ID --yes [--key-store DIR]\n"
    "                                                destroy the key material\n"
    "                                                (irreversible)\n"
    "  pg_cmk key rotate KEY_ID [--key-store DIR]    add a new primary key version (older\n"
    "                                                versions still unwrap)\n"
    "  pg_cmk key show KEY_ID [--key-store DIR]      show a key's state\n"
    "  pg_cmk key list [--key-store DIR]             list the keys\n"
    "\n"
    "Options:\n"
    "  --key-store=DIR   key store directory (default: $CMK_LAKEBASE_KEY_STORE, else\n"
    "                    $HOME/.cmk_lakebase/keys)\n"
    "  --yes             confirm \"delete\"\n"
    "  -?, --help        show this help, then exit\n";

std::string sub_usage(const std::string& sub) {
    std::string line;
    if (sub == "list")
        line = "  pg_cmk key list [--key-store DIR]\n";
    else if (sub == "delete")
        line = "  pg_cmk key delete KEY_ID --yes [--key-store DIR]\n";
    else
        line = "  pg_cmk key " + sub + " KEY_ID [--key-store DIR]\n";
    std::string what;
    if (sub == "create") what = "Creates a new enabled key (random material) in the key store.\n";
    if (sub == "enable") what = "Enables a disabled key.\n";
    if (sub == "disable")
        what =
            "Disables a key. Clusters using it shut down within seconds and cannot start\n"
            "until the key is enabled again.\n";
    if (sub == "delete")
        what =
            "Destroys the key material (irreversible): every cluster encrypted under the\n"
            "key becomes unreadable for good. Requires --yes.\n";
    if (sub == "rotate")
        what =
            "Adds a new key version with new material and makes it the primary one (as a KMS\n"
            "rotates a key). Older versions still unwrap; re-wrap a cluster's KEK under the new\n"
            "version with cmk_lakebase.rewrap() (running) or pg_cmk rewrap (stopped).\n";
    if (sub == "show") what = "Shows a key's id, state and creation time (never its material).\n";
    if (sub == "list") what = "Lists the keys of the key store with their states.\n";
    return what + "\nUsage:\n" + line +
           "\nOptions:\n"
           "  --key-store=DIR   key store directory (default: $CMK_LAKEBASE_KEY_STORE,\n"
           "                    else $HOME/.cmk_lakebase/keys)\n" +
           (sub == "delete" ? "  --yes             confirm the deletion\n" : "") +
           "  -?, --help        show this help, then exit\n";
}

// created_at from the key file, the only field of it that is read here. The file
// holds the key material, so the buffer is cleansed afterwards.
std::string key_created_at(const LocalKeyStore& ks, const std::string& id) {
    std::string text;
    try {
        text = sys::read_file(ks.key_path(id).c_str());
    } catch (const std::exception&) {
        return "";
    }
    std::string created;
    if (!text.empty()) {
        // In-situ parsing keeps every string inside `text`, so cleansing it afterwards
        // leaves no copy of the material behind.
        rapidjson::Document doc;
        parse_json_bounded_insitu(doc, text, nullptr);
        if (!doc.HasParseError() && doc.IsObject()) {
            auto it = doc.FindMember("created_at");
            if (it != doc.MemberEnd() && it->value.IsString()) created = it->value.GetString();
        }
        OPENSSL_cleanse(&text[0], text.size());
    }
    return created;
}

void require_exists(const LocalKeyStore& ks, const std::string& id) {
    if (!ks.exists(id))
        throw CliError("key \"" + id + "\" does not exist in the local key store " + ks.dir() +
                       "; list the keys with: pg_cmk key list --key-store " + ks.dir());
}

}  // namespace

int cmd_key(const std::vector<std::string>& args) {
    if (args.empty())
        throw UsageError("key",
                         "no key command given (create, enable, disable, "
                         "delete, show or list)");
    const std::string& sub = args[0];
    if (sub == "--help" || sub == "-?" || sub == "help") {
        std::fputs(kKeyUsage, stdout);
        return 0;
    }
    if (sub != "create" && sub != "enable" && sub != "disable" && sub != "delete" && sub != "show" &&
        sub != "list" && sub != "rotate")
        throw UsageError("key", "unknown key command \"" + sub + "\"");

    const std::string cmdname = "key " + sub;
    std::vector<OptSpec> specs{{"key-store", 0, true}};
    if (sub == "delete") specs.push_back({"yes", 0, false});
    ParsedArgs a = parse_args(cmdname, std::vector<std::string>(args.begin() + 1, args.end()), specs);
    if (a.has("help")) {
        std::fputs(sub_usage(sub).c_str(), stdout);
        return 0;
    }
    if (!a.rest.empty()) throw UsageError(cmdname, "unexpected argument \"" + a.rest[0] + "\"");

    std::string key_id;
    if (sub == "list") {
        if (!a.positional.empty())
            throw UsageError(cmdname, "unexpected argument \"" + a.positional[0] + "\"");
    } else {
        if (a.positional.empty()) throw UsageError(cmdname, "no key id given");
        if (a.positional.size() > 1)
            throw UsageError(cmdname, "unexpected argument \"" + a.positional[1] + "\"");
        key_id = a.positional[0];
        if (!LocalKeyStore::valid_key_id(key_id))
            throw UsageError(cmdname,
                             "invalid key id \"" + key_id + "\" (use 1 to 128 of A-Z a-z 0-9 . _ -)");
    }
    if (sub == "delete" && !a.has("yes"))
        throw UsageError(cmdname, "deleting key \"" + key_id +
                                      "\" destroys its key material irreversibly: every "
                                      "cluster encrypted under it becomes unreadable for "
                                      "good; add --yes to confirm");

    const std::string store =
        make_absolute(a.has("key-store") ? a.get("key-store") : default_local_key_store());
    LocalKeyStore ks(store);

    if (sub == "create") {
        ks.ensure_dir();
        if (ks.exists(key_id))
            throw CliError("key \"" + key_id + "\" already exists in the local key store " + store);
        ks.create(key_id);
        std::printf("created key \"%s\" in the local key store %s\n", key_id.c_str(), store.c_str());
        return 0;
    }
    if (sub == "list") {
        if (!is_directory(store))
            throw CliError("the local key store " + store +
                           " does not exist; create a key with: pg_cmk key create KEY_ID "
                           "--key-store " +
                           store);
        std::vector<std::string> ids = ks.list();
        size_t width = 6;
        for (const auto& id : ids) width = std::max(width, id.size());
        for (const auto& id : ids)
            std::printf("%-*s  %s\n", static_cast<int>(width), id.c_str(), ks.state(id).c_str());
        return 0;
    }

    require_exists(ks, key_id);
    const std::string state = ks.state(key_id);
    if (sub == "show") {
        std::string created = key_created_at(ks, key_id);
        std::printf("key_id: %s\nstate: %s\ncreated_at: %s\nkey_store: %s\nprimary_version: %u\n",
                    key_id.c_str(), state.c_str(), created.empty() ? "unknown" : created.c_str(),
                    store.c_str(), ks.primary_version(key_id));
        return 0;
    }
    if (sub == "rotate") {
        uint32_t v = ks.rotate(key_id);
        std::printf("key \"%s\" rotated: version %u is now primary; older versions still unwrap\n",
                    key_id.c_str(), v);
        return 0;
    }
    if (sub == "enable") {
        if (state == "deleted")
            throw CliError("key \"" + key_id + "\" in the local key store " + store +
                           " was deleted (its key material is destroyed) and cannot be "
                           "enabled again");
        if (state != "enabled") ks.set_state(key_id, "enabled");
        std::printf("key \"%s\" is enabled\n", key_id.c_str());
        return 0;
    }
    if (sub == "disable") {
        if (state == "deleted")
            throw CliError("key \"" + key_id + "\" in the local key store " + store +
                           " was deleted; there is nothing to disable");
        if (state != "disabled") ks.set_state(key_id, "disabled");
        std::printf(
            "key \"%s\" is disabled: clusters using it shut down and cannot start "
            "until it is enabled again (pg_cmk key enable %s --key-store %s)\n",
            key_id.c_str(), key_id.c_str(), store.c_str());
        return 0;
    }
    // delete
    if (state != "deleted") ks.set_state(key_id, "deleted");
    std::printf("key \"%s\" is deleted: its key material is destroyed\n", key_id.c_str());
    return 0;
}

}  // namespace cmk::cli
