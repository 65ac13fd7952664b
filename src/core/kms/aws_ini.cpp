// The AWS shared credentials and config files' INI dialect (aws.hpp: parse_ini): sections
// in brackets, "key = value" lines, keys lower-cased, comments with # or ;. The text holds
// secret keys: every intermediate copy is wiped.
#include <openssl/crypto.h>

#include <cctype>
#include <string>

#include "aws.hpp"
#include "kit.hpp"

namespace cmk::aws {

using kit::trim;

IniFile parse_ini(const std::string& text) {
    IniFile out;
    std::string section;
    bool in_section = false;
    size_t i = 0;
    while (i < text.size()) {
        size_t j = text.find('\n', i);
        if (j == std::string::npos) j = text.size();
        std::string line = trim(text.substr(i, j - i));
        i = j + 1;
        if (line.empty() || line[0] == '#' || line[0] == ';') continue;
        if (line.front() == '[' && line.back() == ']') {
            section = trim(line.substr(1, line.size() - 2));
            in_section = true;
            out[section];
            continue;
        }
        size_t eq = line.find('=');
        if (!in_section || eq == std::string::npos) continue;
        std::string k = trim(line.substr(0, eq));
        for (char& c : k) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
        std::string v = trim(line.substr(eq + 1));
        std::string& slot = out[section][k];
        if (!slot.empty()) OPENSSL_cleanse(&slot[0], slot.size());
        slot = v;
        OPENSSL_cleanse(&line[0], line.size());
        OPENSSL_cleanse(&v[0], v.size());
    }
    return out;
}

}  // namespace cmk::aws
