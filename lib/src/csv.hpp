// RFC 4180 CSV records, torch-free (the data reader in data.cpp turns them into tensors).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace bnlab {

/// Where a cell starts in the file: 1-based line and column (in bytes).
struct CsvPosition {
  size_t line = 1, column = 1;
};

/// Splits CSV text into records as RFC 4180 defines them: fields separated by `delimiter`,
/// records by LF or CRLF; a field in double quotes may hold the delimiter, line breaks and ""
/// (one quote). A UTF-8 byte-order mark at the start is skipped; a last record without a line
/// break is a record; lines that are entirely empty are skipped. Anything else is an InputError
/// "ORIGIN:LINE:COLUMN: what is wrong": an unterminated quote (at the opening quote), a quote
/// inside an unquoted field, text after a closing quote, a byte-order mark past the start, a
/// field longer than kCsvMaxField bytes or a record of more than kCsvMaxFields fields.
class CsvReader {
 public:
  /// `text` is read in place (a file's bytes, or a mapping of the file): it must outlive the
  /// reader (a temporary string is refused at compile time).
  CsvReader(std::string_view text, std::string origin, char delimiter = ',');
  CsvReader(std::string&& text, std::string origin, char delimiter = ',') = delete;

  /// The next record's fields (unquoted) and where each starts; false at the end of the text.
  bool next(std::vector<std::string>& fields, std::vector<CsvPosition>& where);

  /// The line the last record returned started on.
  size_t line() const { return record_line_; }

  /// Bytes of the text read so far (the reader never looks back before this).
  size_t offset() const { return pos_; }

 private:
  [[noreturn]] void fail(size_t line, size_t column, const std::string& what) const;
  std::string_view text_;
  std::string origin_;
  char delimiter_;
  size_t pos_ = 0, line_ = 1, line_start_ = 0, record_line_ = 0;
};

constexpr size_t kCsvMaxField = size_t{1} << 20;   ///< 1 MiB: no number is longer
constexpr size_t kCsvMaxFields = 100000;           ///< columns per record

}  // namespace bnlab
