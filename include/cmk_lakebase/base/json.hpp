// Bounded JSON (issue 18): every JSON text the project reads (key files, provider
// answers, SQL arguments) is checked for size and nesting depth before RapidJSON sees
// it, and parsed iteratively, so a hostile or damaged text ('[' repeated 200,000
// times) is refused with one line instead of exhausting the stack.
#pragma once

#include <cstddef>
#include <string>

#include <rapidjson/document.h>

namespace cmk {

constexpr size_t kJsonMaxDepth = 64;          // our formats nest 4 levels at most
constexpr size_t kJsonMaxBytes = 16u << 20;  // our largest file is a few KiB

// "" if text is within the bounds, else why not ("nested deeper than 64 levels").
// Linear, no allocation; brackets inside strings do not count.
std::string json_bounds_error(const char* text, size_t n, size_t max_depth = kJsonMaxDepth,
                              size_t max_bytes = kJsonMaxBytes);

// Parses text into d when it is within the bounds. False with *why set (one line:
// the bound exceeded, or RapidJSON's error and offset) otherwise.
bool parse_json_bounded(rapidjson::Document& d, const std::string& text, std::string* why);
// The same, in place (the strings stay in text, which the caller may scrub).
bool parse_json_bounded_insitu(rapidjson::Document& d, std::string& text, std::string* why);

}  // namespace cmk
