// libFuzzer target: the RFC 4180 reader behind data.path (lib/src/csv.hpp). The first byte picks
// the delimiter (comma, semicolon or tab), the rest is the file. Records, or an InputError naming
// file:line:column, never a crash or a hang; every position lies inside the text.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "bnlab/errors.hpp"
#include "csv.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const char kDelimiters[] = {',', ';', '\t'};
  const char delimiter = kDelimiters[data[0] % 3];
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  size_t lines = 1;
  for (char c : text) lines += c == '\n';
  try {
    bnlab::CsvReader reader(text, "fuzz.csv", delimiter);
    std::vector<std::string> fields;
    std::vector<bnlab::CsvPosition> where;
    size_t bytes = 0;
    while (reader.next(fields, where)) {
      if (fields.size() != where.size() || fields.empty()) std::abort();
      for (size_t i = 0; i < fields.size(); ++i) {
        if (where[i].line < reader.line() || where[i].line > lines) std::abort();
        bytes += fields[i].size();
      }
      if (bytes > text.size()) std::abort();  // unquoting only ever removes bytes
    }
  } catch (const bnlab::InputError& e) {
    if (e.problems().empty()) std::abort();
  }
  return 0;
}
