// TensorBoard event files (tensorboard.hpp) and report.html (html_report.hpp): framing and
// checksums against published values, the ledger's nested names, the page's self-containment.
// Torch-free; built into tools_tests and, with ASan/UBSan, into sanitized_tests. The decoder
// that checks the files independently is tests/report/test_tensorboard.py.
#include <dirent.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "bnlab/errors.hpp"
#include "html_report.hpp"
#include "run_dir.hpp"
#include "support.hpp"
#include "tensorboard.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::temp_dir;

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

uint32_t le32(const std::string& s, size_t at) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(s[at + static_cast<size_t>(i)]);
  return v;
}

TEST(TensorBoard, Crc32cMatchesPublishedCheckValues) {
  // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4; the CRC catalogue's "check").
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  // 32 bytes of zeros: RFC 3720, B.4, 0x8A9136AA.
  const std::string zeros(32, '\0');
  EXPECT_EQ(crc32c(zeros.data(), zeros.size()), 0x8A9136AAu);
  // TensorBoard's data server (tf_record.rs): the length 24 as 8 little-endian bytes has the
  // masked checksum 0x224b7fa3.
  const unsigned char len24[8] = {24, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(masked_crc32c(len24, 8), 0x224b7fa3u);
}

TEST(TensorBoard, RecordFramingIsLengthCrcPayloadCrc) {
  const std::string payload(24, 'x');
  const std::string r = tf_record(payload);
  ASSERT_EQ(r.size(), 8u + 4u + 24u + 4u);
  EXPECT_EQ(static_cast<unsigned char>(r[0]), 24);
  for (int i = 1; i < 8; ++i) EXPECT_EQ(r[static_cast<size_t>(i)], '\0');
  EXPECT_EQ(le32(r, 8), 0x224b7fa3u);
  EXPECT_EQ(r.substr(12, 24), payload);
  EXPECT_EQ(le32(r, 36), masked_crc32c(payload.data(), payload.size()));
}

TEST(TensorBoard, EventFileStartsWithTheFileVersion) {
  const std::string f = event_file({{"loss", 1, 0.25, "d"}, {"val_loss", 1, 0.5, "e"}, {"loss", 2, 0.125, ""}});
  // The first record's payload: wall_time 0 and step 0 (proto3 leaves both out), then
  // file_version (field 3, length-delimited: tag 0x1a) "brain.Event:2".
  const uint64_t n = static_cast<unsigned char>(f[0]);
  EXPECT_EQ(f.substr(12, n), std::string("\x1a\x0d") + "brain.Event:2");
  // Then one record per step: three records in all.
  size_t at = 0, records = 0;
  while (at < f.size()) {
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(f[at + static_cast<size_t>(i)]);
    ASSERT_EQ(le32(f, at + 8), masked_crc32c(f.data() + at, 8));
    ASSERT_EQ(le32(f, at + 12 + len), masked_crc32c(f.data() + at + 12, len));
    at += 16 + len;
    ++records;
  }
  EXPECT_EQ(at, f.size());
  EXPECT_EQ(records, 3u);
}

Config two_strategies() { return parse_config(R"({"name": "t", "strategies": ["train", "frozen"]})", "t.json"); }

GroupDigest group_of(size_t strategy, size_t runs) {
  GroupDigest g;
  g.strategy = strategy;
  g.curves = runs;
  g.agg.runs = runs;
  g.loss = {{1, 2}, {0.5, 1.5}, {1.5, 2.5}};
  g.val_loss = {{3, 4}, {2.5, 3.5}, {3.5, 4.5}};
  g.evaluate_before.median = 7;
  g.evaluate_after.median = 8;
  return g;
}

TEST(TensorBoard, TagsAreTheCurvesOrTheirQuartiles) {
  const Config c = two_strategies();
  const auto one = tensorboard_scalars(c, group_of(0, 1));
  ASSERT_EQ(one.size(), 6u);  // evaluate_before, 2 x (loss, val_loss), evaluate_after
  EXPECT_EQ(one[0].tag, "evaluate_before");
  EXPECT_EQ(one[0].step, 0);
  EXPECT_EQ(one[1].tag, "loss");
  EXPECT_EQ(one[1].step, 1);
  EXPECT_EQ(one[1].value, 1);
  EXPECT_EQ(one[4].tag, "val_loss");
  EXPECT_EQ(one[4].value, 4);
  EXPECT_EQ(one[5].tag, "evaluate_after");
  EXPECT_EQ(one[5].step, 2);
  // A study of several runs per group: quartile tags in every group, whatever failed.
  const Config study = parse_config(R"({"name": "t", "seeds": [0, 1], "strategies": ["train", "frozen"]})", "t.json");
  const auto many = tensorboard_scalars(study, group_of(1, 5));
  ASSERT_EQ(many.size(), 18u);
  EXPECT_EQ(tensorboard_scalars(study, group_of(1, 1)).size(), 18u);  // one run left of two: the same tags
  EXPECT_EQ(many[3].tag, "loss/median");
  EXPECT_EQ(many[4].tag, "loss/p25");
  EXPECT_EQ(many[4].value, 0.5);
  EXPECT_EQ(many[5].tag, "loss/p75");
  EXPECT_TRUE(tensorboard_scalars(c, group_of(0, 0)).empty());  // every run failed: no file
}

std::vector<std::string> files_under(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n != "." && n != "..") out.push_back(n);
  }
  ::closedir(d);
  return out;
}

TEST(TensorBoard, OneFolderPerStrategyAndAUsersFileIsLeftAlone) {
  const auto dir = temp_dir("tb");
  own_output_dir(dir);
  Config c = two_strategies();
  write_tensorboard(dir, c, {group_of(0, 1), group_of(1, 3)});
  const auto train = files_under(dir + "/tensorboard/train");
  ASSERT_EQ(train.size(), 1u);
  EXPECT_EQ(train[0].rfind("events.out.tfevents.", 0), 0u);
  EXPECT_EQ(files_under(dir + "/tensorboard/frozen").size(), 1u);
  EXPECT_TRUE(files_under(dir).size() > 0);
  for (const auto& n : files_under(dir)) EXPECT_EQ(n.find(".tmp."), std::string::npos) << n;  // no temporary left
  // A user's file in a folder bnlab made stays; a strategy the study no longer has loses its
  // (bnlab's) event file; an event file of an earlier name goes; the folders stay while not empty.
  std::ofstream(dir + "/tensorboard/frozen/notes.txt") << "mine";
  const std::string older = dir + "/tensorboard/train/events.out.tfevents.1796313695.bnlab";
  claim_path(older);  // as an earlier bnlab would have named it
  std::ofstream(older) << "old";
  c.strategies.pop_back();
  write_tensorboard(dir, c, {group_of(0, 1)});
  const auto frozen = files_under(dir + "/tensorboard/frozen");
  ASSERT_EQ(frozen.size(), 1u);
  EXPECT_EQ(frozen[0], "notes.txt");
  const auto again = files_under(dir + "/tensorboard/train");
  ASSERT_EQ(again.size(), 1u);  // the earlier event file was removed, not kept beside the new one
  EXPECT_EQ(again[0], train[0]);
  // The same digests, the same bytes: a rewrite is byte-identical.
  const std::string before = slurp(dir + "/tensorboard/train/" + train[0]);
  write_tensorboard(dir, c, {group_of(0, 1)});
  EXPECT_EQ(slurp(dir + "/tensorboard/train/" + train[0]), before);
  // An empty folder of a gone strategy is removed.
  std::remove((dir + "/tensorboard/frozen/notes.txt").c_str());
  write_tensorboard(dir, two_strategies(), {group_of(0, 1)});
  EXPECT_NE(::access((dir + "/tensorboard/frozen").c_str(), F_OK), 0);
}

TEST(TensorBoard, AUsersTensorboardFolderIsRefused) {
  const auto dir = temp_dir("tb_user");
  own_output_dir(dir);
  ASSERT_EQ(::mkdir((dir + "/tensorboard").c_str(), 0755), 0);
  try {
    write_tensorboard(dir, two_strategies(), {group_of(0, 1)});
    FAIL() << "wrote into a folder bnlab did not make";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tensorboard: exists and bnlab did not write it"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(files_under(dir + "/tensorboard").empty());
}

TEST(TensorBoard, FolderNamesAreSafeAndDistinct) {
  Config c = parse_config(R"({"name": "t", "strategies": [{"name": "a/b c", "preset": "train"}, {"name": "..", "preset": "frozen"},
                              {"name": "a_b_c", "preset": "eval"}, {"name": ".u.tmp.1", "preset": "eval"}]})", "t.json");
  EXPECT_EQ(tensorboard_folder(c, group_of(0, 1)), "a%2Fb%20c");
  EXPECT_EQ(tensorboard_folder(c, group_of(1, 1)), "%2E.");
  EXPECT_EQ(tensorboard_folder(c, group_of(2, 1)), "a_b_c");  // not the folder of "a/b c"
  EXPECT_EQ(tensorboard_folder(c, group_of(3, 1)), "%2Eu.tmp.1");  // neither hidden nor a temporary's name
}

TEST(TensorBoard, AUsersFolderStopsTheStudyBeforeItRuns) {
  const auto dir = temp_dir("tb_pre");
  own_output_dir(dir);
  const Config c = two_strategies();
  check_tensorboard_folders(dir, c);  // nothing there yet
  write_tensorboard(dir, c, {group_of(0, 1), group_of(1, 1)});
  check_tensorboard_folders(dir, c);  // bnlab's own
  // A folder of the user's where a new strategy's files would go.
  const Config more = parse_config(R"({"name": "t", "strategies": ["train", "frozen", "eval"]})", "t.json");
  ASSERT_EQ(::mkdir((dir + "/tensorboard/eval").c_str(), 0755), 0);
  try {
    check_tensorboard_folders(dir, more);
    FAIL() << "a user's folder was not refused";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tensorboard/eval: bnlab would write its TensorBoard files here, but it did not make the folder"),
              std::string::npos) << e.what();
  }
}

TEST(HtmlReport, SelfContainedEscapedAndNamesEveryStrategy) {
  const auto dir = temp_dir("html");
  Config c = parse_config(R"({"name": "<t&>", "strategies": [{"name": "x<y", "preset": "train"}, "frozen"]})", "t.json");
  StudyReport r;
  r.groups = {group_of(0, 1), group_of(1, 4)};
  r.groups[0].agg.strategy = "x<y";
  r.groups[1].agg.strategy = "frozen";
  r.groups[1].lag_holds = 4;
  r.groups[1].agg.final_gap.median = 0.1;
  r.groups[1].gaps = {0.05, 0.1, 0.1, 0.2};
  r.stored = r.planned = 5;
  const std::string page = html_report(dir, c, r);
  EXPECT_EQ(page.find("<t&>"), std::string::npos);  // escaped
  EXPECT_NE(page.find("&lt;t&amp;&gt;"), std::string::npos);
  EXPECT_NE(page.find("data-strategy=\"x&lt;y\""), std::string::npos);
  EXPECT_NE(page.find("data-strategy=\"frozen\""), std::string::npos);
  EXPECT_NE(page.find("data-key=\"final_gap_median\" data-v=\"0.1\""), std::string::npos);
  for (const char* external : {"http:", "https:", "<link", "<script", "<img", "@import", "url("})
    EXPECT_EQ(page.find(external), std::string::npos) << external;
  EXPECT_NE(page.find("No manifest.json yet"), std::string::npos);
  EXPECT_NE(page.find("<span class=\"good\">frozen</span>"), std::string::npos);
}

}  // namespace
