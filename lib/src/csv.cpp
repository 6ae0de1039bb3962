// See csv.hpp.
#include "csv.hpp"

#include "bnlab/errors.hpp"

namespace bnlab {

namespace {
constexpr const char kBom[] = "\xEF\xBB\xBF";
}

CsvReader::CsvReader(std::string_view text, std::string origin, char delimiter)
    : text_(text), origin_(std::move(origin)), delimiter_(delimiter) {
  if (delimiter == '"' || delimiter == '\r' || delimiter == '\n')
    throw InputError(origin_ + ": the delimiter cannot be a quote or a line break");
  if (text_.substr(0, 3) == kBom) pos_ = line_start_ = 3;  // Excel's "CSV UTF-8"
}

void CsvReader::fail(size_t line, size_t column, const std::string& what) const {
  throw InputError(origin_ + ":" + std::to_string(line) + ":" + std::to_string(column) + ": " + what);
}

bool CsvReader::next(std::vector<std::string>& fields, std::vector<CsvPosition>& where) {
  fields.clear();
  where.clear();
  const size_t n = text_.size();
  // Entirely empty lines (LF or CRLF alone) are not records.
  while (pos_ < n && (text_[pos_] == '\n' || (text_[pos_] == '\r' && pos_ + 1 < n && text_[pos_ + 1] == '\n'))) {
    pos_ += text_[pos_] == '\r' ? 2 : 1;
    ++line_;
    line_start_ = pos_;
  }
  if (pos_ >= n) return false;
  record_line_ = line_;
  const auto column = [&](size_t at) { return at - line_start_ + 1; };
  while (true) {  // one field per iteration
    if (fields.size() >= kCsvMaxFields) fail(line_, column(pos_), "more than " + std::to_string(kCsvMaxFields) + " fields in one record");
    const CsvPosition start{line_, column(pos_)};
    std::string field;
    if (pos_ < n && text_[pos_] == '"') {
      ++pos_;
      while (true) {
        if (pos_ >= n) fail(start.line, start.column, "unterminated quoted field (the quote opened here is never closed)");
        const char c = text_[pos_];
        if (c == '"') {
          if (pos_ + 1 < n && text_[pos_ + 1] == '"') {
            field += '"';
            pos_ += 2;
            continue;
          }
          ++pos_;
          break;
        }
        if (c == '\n') {
          ++line_;
          line_start_ = pos_ + 1;
        }
        field += c;
        ++pos_;
        if (field.size() > kCsvMaxField) fail(start.line, start.column, "a field longer than 1 MiB");
      }
      if (pos_ < n && text_[pos_] != delimiter_ && text_[pos_] != '\n' && !(text_[pos_] == '\r' && pos_ + 1 < n && text_[pos_ + 1] == '\n'))
        fail(line_, column(pos_), "text after the closing quote of a field (a quote inside a field is written \"\")");
    } else {
      const size_t begin = pos_;
      while (pos_ < n && text_[pos_] != delimiter_ && text_[pos_] != '\n') {
        const char c = text_[pos_];
        if (c == '\r' && pos_ + 1 < n && text_[pos_ + 1] == '\n') break;
        if (c == '"') fail(line_, column(pos_), "a quote inside an unquoted field (quote the whole field, and write a quote as \"\")");
        if (c == kBom[0] && text_.substr(pos_, 3) == kBom)
          fail(line_, column(pos_), "a UTF-8 byte-order mark inside the file (files joined together?)");
        ++pos_;
        if (pos_ - begin > kCsvMaxField) fail(start.line, start.column, "a field longer than 1 MiB");
      }
      field.assign(text_.data() + begin, pos_ - begin);
    }
    fields.push_back(std::move(field));
    where.push_back(start);
    if (pos_ >= n) return true;
    if (text_[pos_] == delimiter_) {
      ++pos_;
      continue;  // a delimiter at the very end leaves one more, empty field
    }
    pos_ += text_[pos_] == '\r' ? 2 : 1;  // the record's line break
    ++line_;
    line_start_ = pos_;
    return true;
  }
}

}  // namespace bnlab
