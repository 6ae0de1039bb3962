// Bounded JSON input (json_input.hpp) and bnlab's ownership of output folders (run_dir.hpp).
// Built into tools_tests and, with ASan/UBSan, into sanitized_tests.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <iterator>
#include <string>

#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "run_dir.hpp"
#include "support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::temp_dir;

std::string nested(size_t depth) { return std::string(depth, '[') + std::string(depth, ']'); }

std::string error_of(const std::string& text) {
  try {
    (void)parse_json(text, "f.json");
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(JsonInput, NestingIsBoundedBeforeTheParserSeesIt) {
  EXPECT_EQ(error_of(nested(kJsonMaxDepth)), "");
  EXPECT_NE(error_of(nested(kJsonMaxDepth + 1)).find("f.json:1:129: objects and arrays nested deeper than 128 levels"),
            std::string::npos);
  // Far beyond any stack: the scan is iterative and stops at the first level too deep.
  EXPECT_NE(error_of(std::string(1000000, '{')).find("f.json:1:129:"), std::string::npos);
  // Brackets inside strings are text, not nesting.
  EXPECT_EQ(error_of("[\"" + std::string(1000, '[') + "\"]"), "");
}

TEST(JsonInput, DuplicateKeysNameTheKeyAndBothPlaces) {
  const std::string e = error_of("{\n  \"a\": 1,\n  \"b\": {\"a\": 2},\n  \"a\": 3\n}");
  EXPECT_NE(e.find("f.json:4:3: duplicate key \"a\" (first at line 2, column 3"), std::string::npos) << e;
  // The same key in different objects, in arrays of objects, or as a value is fine.
  EXPECT_EQ(error_of(R"({"a": {"a": 1}, "l": [{"a": 1}, {"a": 2}], "v": "a", "w": ["a", "a"]})"), "");
  // Keys compare as the parser decodes them: "a" and "\u0061" are one key.
  EXPECT_NE(error_of(R"({"a": 1, "\u0061": 2})").find("duplicate key \"a\""), std::string::npos);
  // An escaped quote does not end a key.
  EXPECT_EQ(error_of(R"({"a\"b": 1, "a": 2})"), "");
  EXPECT_NE(error_of(R"({"a\"b": 1, "a\"b": 2})").find("duplicate key \"a\"b\""), std::string::npos);
}

TEST(JsonInput, NumbersBeyondADoubleArePositioned) {
  EXPECT_NE(error_of("{\"x\": [1,\n 1e400]}").find("f.json:2:2: the number 1e400 is beyond the range of a double"), std::string::npos);
  EXPECT_NE(error_of("[-1e400]").find("f.json:1:2:"), std::string::npos);
  EXPECT_NE(error_of("[1" + std::string(400, '0') + "]").find("f.json:1:2: the number 1000"), std::string::npos);
  EXPECT_EQ(error_of("[1e-400, 1e308, -0.0]"), "");  // underflow reads as 0, as the parser reads it
}

TEST(JsonInput, MalformedTextKeepsItsPosition) {
  EXPECT_NE(error_of("{\n  \"a\": 1,,\n}").find("f.json:2:10: malformed JSON"), std::string::npos) << error_of("{\n  \"a\": 1,,\n}");
  // Whatever the scan meets in broken text, it ends: unterminated strings and escapes.
  for (const char* t : {"\"", "{\"a", "{\"a\\", "{\"a\\u12", "[\"\\ud800\\u", "{]", "]]]", "-", "1e", "{\"a\":}"})
    EXPECT_NE(error_of(t), "") << t;
}

void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }
std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
std::string refusal(const std::function<void()>& f) {
  try {
    f();
  } catch (const InputError& e) {
    return e.what();
  }
  return "";
}

TEST(RunDir, OnlyNewEmptyOrOwnFoldersAreUsed) {
  const auto dir = temp_dir("rundir");
  EXPECT_EQ(refusal([&] { check_output_dir(dir + "/new", "e", false); }), "");
  EXPECT_EQ(refusal([&] { check_output_dir(dir, "e", false); }), "");  // empty
  write(dir + "/file", "x");
  EXPECT_NE(refusal([&] { check_output_dir(dir + "/file", "e", true); }).find("is a file, not a folder"), std::string::npos);
  // A folder of the user's: refused with or without force, naming what it holds.
  const std::string msg = refusal([&] { check_output_dir(dir, "e", true); });
  EXPECT_NE(msg.find("is not a bnlab run directory (it holds file)"), std::string::npos) << msg;
}

TEST(RunDir, TheLedgerGuardsEveryWriteAndRemoval) {
  const auto dir = temp_dir("ledger");
  own_output_dir(dir);
  write_file_atomic(dir + "/summary.md", "bnlab's");
  EXPECT_TRUE(may_remove(dir + "/summary.md"));
  EXPECT_NE(slurp(dir + "/.bnlab-files").find("summary.md\n"), std::string::npos);
  // A file bnlab did not write: never replaced, never removed.
  write(dir + "/curves.csv", "the user's");
  EXPECT_FALSE(may_remove(dir + "/curves.csv"));
  EXPECT_NE(refusal([&] { write_file_atomic(dir + "/curves.csv", "bnlab's"); }).find("exists and bnlab did not write it"),
            std::string::npos);
  EXPECT_EQ(slurp(dir + "/curves.csv"), "the user's");
  // The next run sees the same: refused up front, --force or not.
  for (bool force : {false, true})
    EXPECT_NE(refusal([&] { check_output_dir(dir, "e", force); }).find("curves.csv: bnlab would write this file, but it did not write"),
              std::string::npos);
  // Its temporaries are bnlab's to clean up; a user's file of that shape is not.
  write(dir + "/.summary.md.tmp.99999", "stale");
  write(dir + "/.notes.txt.tmp.1", "the user's");
  remove_stale_temps(dir);
  EXPECT_NE(::access((dir + "/.summary.md.tmp.99999").c_str(), F_OK), 0);
  EXPECT_EQ(slurp(dir + "/.notes.txt.tmp.1"), "the user's");
}

TEST(RunDir, AFolderFromBeforeTheLedgerIsAdopted) {
  const auto dir = temp_dir("legacy");
  write(dir + "/config.resolved.json", R"({"name": "old"})");
  write(dir + "/summary.md", "old summary");
  write(dir + "/notes.txt", "the user's");
  EXPECT_EQ(refusal([&] { check_output_dir(dir, "old", false); }), "");
  EXPECT_NE(refusal([&] { check_output_dir(dir, "other", false); }).find("holds results of experiment \"old\""), std::string::npos);
  own_output_dir(dir);
  EXPECT_TRUE(may_remove(dir + "/summary.md"));
  EXPECT_FALSE(may_remove(dir + "/notes.txt"));
}

TEST(RunDir, NamesAloneDoNotMakeAFolderBnlabs) {
  // A user's folder holding only a file with a name bnlab writes: not bnlab's.
  const auto user = temp_dir("names");
  write(user + "/curves.csv", "a,b");
  EXPECT_NE(refusal([&] { check_output_dir(user, "e", true); }).find("is not a bnlab run directory"), std::string::npos);
  // What an older `bnlab explain` left (no resolved config): its checkpoint carries bnlab's format tag.
  const auto old = temp_dir("old_explain");
  write(old + "/explain.json", "{}");
  write(old + "/pretrained.pt", "pickle ... bnlab.pretrained/1 ...");
  EXPECT_EQ(refusal([&] { check_output_dir(old, "e", false); }), "");
  write(old + "/pretrained.pt", "someone else's weights");
  EXPECT_NE(refusal([&] { check_output_dir(old, "e", false); }).find("is not a bnlab run directory"), std::string::npos);
}

TEST(RunDir, StandaloneOutputsAreNeverReplacedUnlessBnlabsOwnKind) {
  const auto dir = temp_dir("standalone");
  EXPECT_EQ(refusal([&] { check_new_output_file(dir + "/new.pt", "-o"); }), "");
  write(dir + "/g.json", "{\"format\": \"bnlab.golden/1\", \"experiment\": \"x\"}");
  EXPECT_EQ(refusal([&] { check_new_output_file(dir + "/g.json", "-o", "{\"format\": \"bnlab.golden/1\""); }), "");
  write(dir + "/mine.json", "{\"mine\": 1}");
  EXPECT_NE(refusal([&] { check_new_output_file(dir + "/mine.json", "-o", "{\"format\": \"bnlab.golden/1\""); }).find("already exists"),
            std::string::npos);
  EXPECT_NE(refusal([&] { check_new_output_file(dir, "-o"); }).find("is a folder"), std::string::npos);
}

}  // namespace
