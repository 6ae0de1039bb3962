// See json_input.hpp.
#include "json_input.hpp"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>
#include <cstdlib>
#include <map>
#include <vector>

#include "bnlab/errors.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

/// Reads the string starting at the quote text[i]; returns its decoded value (so that "a" and
/// "\u0061" are the same key, as they are to the parser) and leaves i after the closing quote
/// (or at the end of the text when there is none: the parser reports that).
std::string read_string(const std::string& text, size_t& i) {
  std::string out;
  const size_t n = text.size();
  ++i;
  while (i < n && text[i] != '"') {
    if (text[i] != '\\') {
      out += text[i++];
      continue;
    }
    if (i + 1 >= n) {
      i = n;
      break;
    }
    const char e = text[i + 1];
    i += 2;
    switch (e) {
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'u': {
        uint32_t cp = 0;
        bool ok = i + 4 <= n;
        for (size_t k = 0; ok && k < 4; ++k) {
          const int h = hex_value(text[i + k]);
          ok = h >= 0;
          cp = cp * 16 + static_cast<uint32_t>(h < 0 ? 0 : h);
        }
        if (!ok) break;  // malformed: the parser reports it
        i += 4;
        if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= n && text[i] == '\\' && text[i + 1] == 'u') {
          uint32_t lo = 0;
          bool low_ok = true;
          for (size_t k = 0; low_ok && k < 4; ++k) {
            const int h = hex_value(text[i + 2 + k]);
            low_ok = h >= 0;
            lo = lo * 16 + static_cast<uint32_t>(h < 0 ? 0 : h);
          }
          if (low_ok && lo >= 0xDC00 && lo < 0xE000) {
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            i += 6;
          }
        }
        append_utf8(out, cp);
        break;
      }
      default: out += e;  // \" \\ \/ (anything else is the parser's to refuse)
    }
  }
  if (i < n) ++i;
  return out;
}

bool number_start(char c) { return c == '-' || (c >= '0' && c <= '9'); }
bool number_char(char c) { return number_start(c) || c == '+' || c == '.' || c == 'e' || c == 'E'; }

}  // namespace

std::optional<JsonIssue> scan_json(const std::string& text) {
  struct Frame {
    bool object;
    bool expect_key;
    std::map<std::string, size_t> keys;  // key -> offset of its first occurrence
  };
  std::vector<Frame> stack;
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const char c = text[i];
    if (c == '{' || c == '[') {
      if (stack.size() >= kJsonMaxDepth)
        return JsonIssue{i, "objects and arrays nested deeper than " + std::to_string(kJsonMaxDepth) + " levels"};
      stack.push_back({c == '{', c == '{', {}});
      ++i;
    } else if (c == '}' || c == ']') {
      if (!stack.empty()) stack.pop_back();
      ++i;
    } else if (c == ',') {
      if (!stack.empty() && stack.back().object) stack.back().expect_key = true;
      ++i;
    } else if (c == ':') {
      if (!stack.empty()) stack.back().expect_key = false;
      ++i;
    } else if (c == '"') {
      const size_t start = i;
      std::string s = read_string(text, i);
      if (!stack.empty() && stack.back().object && stack.back().expect_key) {
        auto& keys = stack.back().keys;
        const auto it = keys.find(s);
        if (it != keys.end()) {
          const auto first = line_column(text, it->second);
          return JsonIssue{start, "duplicate key \"" + s + "\" (first at line " + std::to_string(first.first) + ", column " +
                                      std::to_string(first.second) + "; JSON keeps only one of them)"};
        }
        keys.emplace(std::move(s), start);
        stack.back().expect_key = false;
      }
    } else if (number_start(c)) {
      const size_t start = i;
      while (i < n && number_char(text[i])) ++i;
      const std::string token = text.substr(start, i - start);
      char* end = nullptr;
      const double v = std::strtod(token.c_str(), &end);
      if (end != token.c_str() && std::isinf(v))
        return JsonIssue{start, "the number " + (token.size() > 40 ? token.substr(0, 40) + "..." : token) +
                                    " is beyond the range of a double (about 1.8e308)"};
    } else {
      ++i;
    }
  }
  return std::nullopt;
}

nlohmann::ordered_json parse_json(const std::string& text, const std::string& origin) {
  const auto at = [&](size_t offset) {
    const auto [line, column] = line_column(text, offset);
    return origin + ":" + std::to_string(line) + ":" + std::to_string(column) + ": ";
  };
  if (const auto issue = scan_json(text)) throw InputError(at(issue->offset) + issue->what);
  try {
    return nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    std::string what = e.what();
    const auto pos = what.find("; ");
    if (pos != std::string::npos) what = what.substr(pos + 2);
    throw InputError(at(e.byte == 0 ? 0 : e.byte - 1) + "malformed JSON: " + what);
  } catch (const nlohmann::json::exception& e) {
    // Nothing scan_json lets through should get here; if it does, it still names the file.
    std::string what = e.what();
    const auto pos = what.find("] ");
    throw InputError(origin + ": invalid JSON: " + (pos == std::string::npos ? what : what.substr(pos + 2)));
  }
}

std::string read_json_file(const std::string& path, const std::string& what) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) throw InputError(path + ": cannot read " + what + " (" + std::strerror(errno) + ")");
  if (!S_ISREG(st.st_mode)) throw InputError(path + ": is not a regular file; expected " + what + " (JSON)");
  if (static_cast<uint64_t>(st.st_size) > kJsonMaxBytes)
    throw InputError(path + ": " + std::to_string(st.st_size) + " bytes; bnlab reads " + what + " of up to " +
                     std::to_string(kJsonMaxBytes >> 20) + " MiB (a JSON document)");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError(path + ": cannot read " + what + " (" + std::strerror(errno) + ")");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace bnlab
