// Every JSON document bnlab reads (configs, --set values, golden files, Keras architectures,
// manifests and caches in run directories) goes through parse_json: bounded, positioned errors.
#pragma once

#include <cstddef>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace bnlab {

/// Objects and arrays nested deeper than this are refused (a Keras model config nests about 8).
constexpr size_t kJsonMaxDepth = 128;

/// A JSON file larger than this is refused before it is read (a config is a few KB; the golden
/// of a 10,000-run study about 60 MB; nlohmann's tree of a document takes up to 10x its size).
constexpr size_t kJsonMaxBytes = size_t{256} << 20;

/// What is wrong with a JSON text beyond its syntax, and where (a byte offset).
struct JsonIssue {
  size_t offset = 0;
  std::string what;
};

/// Checks what nlohmann::json accepts silently or cannot report with a position: nesting deeper
/// than kJsonMaxDepth (stopped before the parser sees it), a key repeated in one object (naming
/// the key and the line of its first occurrence) and a number beyond the range of a double.
/// Tolerates malformed text (its syntax is the parser's to report); returns the first issue.
std::optional<JsonIssue> scan_json(const std::string& text);

/// scan_json, then nlohmann's parser; any problem is an InputError
/// "ORIGIN:LINE:COLUMN: what is wrong".
nlohmann::ordered_json parse_json(const std::string& text, const std::string& origin);

/// The text of a JSON file named `what` in messages ("the config file"): an InputError naming
/// the file when it is not a regular file, cannot be read or is larger than kJsonMaxBytes.
std::string read_json_file(const std::string& path, const std::string& what);

}  // namespace bnlab
