// The RFC 4180 reader (lib/src/csv.hpp), one test per rule; expected records written by hand.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "bnlab/errors.hpp"
#include "csv.hpp"

namespace {

using bnlab::CsvPosition;
using bnlab::CsvReader;
using Records = std::vector<std::vector<std::string>>;

Records read_all(const std::string& text, char delimiter = ',') {
  CsvReader r(text, "t.csv", delimiter);
  Records out;
  std::vector<std::string> fields;
  std::vector<CsvPosition> where;
  while (r.next(fields, where)) out.push_back(fields);
  return out;
}

std::string error_of(const std::string& text, char delimiter = ',') {
  try {
    read_all(text, delimiter);
  } catch (const bnlab::InputError& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(CsvReader, PlainFieldsAndLineEndings) {
  const Records want = {{"a", "b"}, {"1", "2"}};
  EXPECT_EQ(read_all("a,b\n1,2\n"), want);
  EXPECT_EQ(read_all("a,b\r\n1,2\r\n"), want);  // CRLF
  EXPECT_EQ(read_all("a,b\n1,2"), want);        // no final line break
  EXPECT_EQ(read_all("a,b\n\n1,2\n\n"), want);  // empty lines are not records
}

TEST(CsvReader, QuotedFields) {
  EXPECT_EQ(read_all("\"a\",\"b\"\n"), (Records{{"a", "b"}}));
  EXPECT_EQ(read_all("\"say \"\"hi\"\"\",x\n"), (Records{{"say \"hi\"", "x"}}));   // escaped quote
  EXPECT_EQ(read_all("\"1,5\",2\n"), (Records{{"1,5", "2"}}));                     // delimiter inside
  EXPECT_EQ(read_all("\"two\nlines\",2\r\n3,4\n"), (Records{{"two\nlines", "2"}, {"3", "4"}}));  // line break inside
  EXPECT_EQ(read_all("\"\",\"\"\n"), (Records{{"", ""}}));
}

TEST(CsvReader, EmptyFieldsAndTrailingDelimiter) {
  EXPECT_EQ(read_all("a,,c\n"), (Records{{"a", "", "c"}}));
  EXPECT_EQ(read_all("a,b,\n"), (Records{{"a", "b", ""}}));
  EXPECT_EQ(read_all("a,b,"), (Records{{"a", "b", ""}}));
}

TEST(CsvReader, ByteOrderMarkAtTheStartOnly) {
  EXPECT_EQ(read_all("\xEF\xBB\xBF\"a\",b\n1,2\n"), (Records{{"a", "b"}, {"1", "2"}}));
  EXPECT_EQ(error_of("a,b\n\xEF\xBB\xBF" "1,2\n"), "t.csv:2:1: a UTF-8 byte-order mark inside the file (files joined together?)");
}

TEST(CsvReader, OtherDelimiters) {
  EXPECT_EQ(read_all("a;b\n1,5;2\n", ';'), (Records{{"a", "b"}, {"1,5", "2"}}));
  EXPECT_EQ(read_all("a\tb\n\"x\ty\"\t2\n", '\t'), (Records{{"a", "b"}, {"x\ty", "2"}}));
  EXPECT_EQ(error_of("a,b", '"'), "t.csv: the delimiter cannot be a quote or a line break");
}

TEST(CsvReader, MalformedQuotingIsNamedByPosition) {
  EXPECT_EQ(error_of("a,b\n1,\"2\n3,4\n"), "t.csv:2:3: unterminated quoted field (the quote opened here is never closed)");
  EXPECT_EQ(error_of("a,b\n1,2\"x\n"), "t.csv:2:4: a quote inside an unquoted field (quote the whole field, and write a quote as \"\")");
  EXPECT_EQ(error_of("a,b\n\"1\"x,2\n"), "t.csv:2:4: text after the closing quote of a field (a quote inside a field is written \"\")");
}

TEST(CsvReader, PositionsCountLinesInsideQuotes) {
  const std::string text = "a,b\n\"x\ny\",z\n1,2\n";
  CsvReader r(text, "t.csv");
  std::vector<std::string> f;
  std::vector<CsvPosition> w;
  ASSERT_TRUE(r.next(f, w));
  ASSERT_TRUE(r.next(f, w));
  EXPECT_EQ(r.line(), 2u);
  EXPECT_EQ(w[1].line, 3u);
  EXPECT_EQ(w[1].column, 4u);  // line 3 is  y",z
  ASSERT_TRUE(r.next(f, w));
  EXPECT_EQ(r.line(), 4u);
  EXPECT_FALSE(r.next(f, w));
}

TEST(CsvReader, LimitsAreRefusedWithTheirPlace) {
  EXPECT_EQ(error_of(std::string(bnlab::kCsvMaxField + 1, '7') + "\n"), "t.csv:1:1: a field longer than 1 MiB");
  std::string wide(bnlab::kCsvMaxFields, ',');
  EXPECT_NE(error_of(wide + "\n").find("more than 100000 fields in one record"), std::string::npos);
}

}  // namespace
