// Bounded JSON parsing (json.hpp): a linear pre-scan for size and depth, then
// RapidJSON's iterative parser, which keeps its own stack on the heap.
#include "cmk_lakebase/base/json.hpp"

#include <rapidjson/error/en.h>

namespace cmk {

std::string json_bounds_error(const char* text, size_t n, size_t max_depth, size_t max_bytes) {
    if (n > max_bytes) return "larger than " + std::to_string(max_bytes) + " bytes";
    size_t depth = 0;
    bool in_string = false, escaped = false;
    for (size_t i = 0; i < n; i++) {
        char c = text[i];
        if (in_string) {
            if (escaped)
                escaped = false;
            else if (c == '\\')
                escaped = true;
            else if (c == '"')
                in_string = false;
        } else if (c == '"') {
            in_string = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) return "nested deeper than " + std::to_string(max_depth) + " levels";
        } else if ((c == ']' || c == '}') && depth > 0) {
            depth--;
        }
    }
    return "";
}

namespace {

template <class Parse>
bool parse_checked(rapidjson::Document& d, const char* text, size_t n, std::string* why, Parse parse) {
    std::string bound = json_bounds_error(text, n);
    if (!bound.empty()) {
        if (why) *why = "JSON " + bound;
        d.Parse("");  // leaves d with a parse error, as callers that check only d test it
        return false;
    }
    parse();
    if (d.HasParseError()) {
        if (why)
            *why = std::string("invalid JSON at offset ") + std::to_string(d.GetErrorOffset()) + ": " +
                   rapidjson::GetParseError_En(d.GetParseError());
        return false;
    }
    return true;
}

}  // namespace

bool parse_json_bounded(rapidjson::Document& d, const std::string& text, std::string* why) {
    return parse_checked(d, text.data(), text.size(), why,
                         [&] { d.Parse<rapidjson::kParseIterativeFlag>(text.data(), text.size()); });
}

bool parse_json_bounded_insitu(rapidjson::Document& d, std::string& text, std::string* why) {
    return parse_checked(d, text.data(), text.size(), why,
                         [&] { d.ParseInsitu<rapidjson::kParseIterativeFlag>(&text[0]); });
}

}  // namespace cmk
