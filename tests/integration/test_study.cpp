// Studies: statistics, concurrency that does not change results, shards and merge, metrics.jsonl,
// plots, failed runs, and the golden check used by CI.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "bnlab/tools.hpp"
#include "report.hpp"
#include "support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

RunResult run_study(const Config& c, const std::string& dir, int jobs, int shard = 1, int shards = 1, bool plots = false,
                    std::ostream* log = nullptr) {
  RunOptions o;
  o.out_dir = dir;
  o.verbose = log ? 1 : 0;
  o.jobs = jobs;
  o.shard_index = shard;
  o.shard_count = shards;
  o.plots = plots;
  std::ostringstream sink;
  return run(c, o, log ? *log : sink);
}

TEST(Stats, HandComputed) {
  // [10, 1, 3, 2, 4]: mean 4; sample std sqrt((9 + 4 + 1 + 0 + 36) / 4) = sqrt(12.5);
  // median 3; p90 at position 0.9 * 4 = 3.6 between 4 and 10: 4 + 0.6 * 6 = 7.6 (numpy's default).
  const auto s = describe({10, 1, 3, 2, 4});
  EXPECT_EQ(s.n, 5u);
  EXPECT_DOUBLE_EQ(s.mean, 4.0);
  EXPECT_DOUBLE_EQ(s.std, std::sqrt(12.5));
  EXPECT_DOUBLE_EQ(s.median, 3.0);
  EXPECT_NEAR(s.p90, 7.6, 1e-12);
  const auto one = describe({2.5});
  EXPECT_EQ(one.std, 0.0);
  EXPECT_EQ(one.p90, 2.5);
}

TEST(Study, ConcurrencyAndShardsDoNotChangeResults) {
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto base = temp_dir("study");
  const auto seq = run_study(c, base + "/seq", 1);
  const auto par = run_study(c, base + "/par", 2);
  ASSERT_EQ(seq.runs.size(), 3u * 2u * 8u * 2u);  // strategies x seeds x samples x grid points
  for (const char* f : {"curves.csv", "metrics.jsonl", "summary.json", "summary.csv", "summary.md"})
    EXPECT_EQ(read_file(base + "/seq/" + f), read_file(base + "/par/" + f)) << f << " depends on --jobs";
  std::vector<std::string> shards;
  for (int i = 1; i <= 3; ++i) {
    shards.push_back(base + "/shard" + std::to_string(i));
    const auto r = run_study(c, shards.back(), 2, i, 3);
    for (const auto& run : r.runs) EXPECT_EQ(run.run % 3, static_cast<size_t>(i - 1));
  }
  std::ostringstream log;
  merge_shards(shards, base + "/merged", false, false, log);
  for (const char* f : {"curves.csv", "metrics.jsonl", "summary.json", "summary.csv", "summary.md"})
    EXPECT_EQ(read_file(base + "/seq/" + f), read_file(base + "/merged/" + f)) << f << " differs after merge";
  // Merging an incomplete set of shards is refused, naming what is missing.
  try {
    merge_shards({shards[0], shards[1]}, base + "/partial", false, false, log);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("runs are in none of the shards"), std::string::npos) << e.what();
  }
}

TEST(Study, EveryRunOfASeedStartsFromThatSeedsWeights) {
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto r = run_study(c, temp_dir("seedw") + "/run", 2);
  std::map<std::pair<uint64_t, int64_t>, double> first;
  std::set<double> per_seed_sample;
  for (const auto& run : r.runs) {
    const auto key = std::make_pair(run.seed, run.sample);
    if (!first.count(key)) first[key] = run.evaluate_pretrained;
    EXPECT_EQ(run.evaluate_pretrained, first[key]) << run.name << " seed " << run.seed << " sample " << run.sample;
  }
  EXPECT_EQ(first.size(), 2u * 8u);
  // The two seeds pretrain differently (initialisation and shuffling), over the same data.
  EXPECT_NE(first.begin()->second, first.rbegin()->second);
}

TEST(Study, MetricsJsonlHasOneLinePerRunAndEpochInRunOrder) {
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto dir = temp_dir("metrics") + "/run";
  std::ostringstream log;
  const auto r = run_study(c, dir, 2, 1, 1, false, &log);
  std::istringstream in(read_file(dir + "/metrics.jsonl"));
  std::string line;
  size_t lines = 0, last_run = 0;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_GE(j["run"].get<size_t>(), last_run);
    last_run = j["run"].get<size_t>();
    EXPECT_TRUE(j.contains("loss") && j.contains("val_loss") && j.contains("epoch"));
    ++lines;
  }
  EXPECT_EQ(lines, r.runs.size() * 5);
  // Not a terminal: plain progress lines, ending at 100%.
  EXPECT_NE(log.str().find("study: 96/96 runs (100%)"), std::string::npos) << log.str();
}

/// Width and height from a PNG's IHDR chunk (bytes 16-23, big endian).
std::pair<uint32_t, uint32_t> png_size(const std::string& bytes) {
  const auto be = [&](size_t at) {
    return (uint32_t(uint8_t(bytes[at])) << 24) | (uint32_t(uint8_t(bytes[at + 1])) << 16) |
           (uint32_t(uint8_t(bytes[at + 2])) << 8) | uint32_t(uint8_t(bytes[at + 3]));
  };
  return {be(16), be(20)};
}

TEST(Study, PlotsAreRealImages) {
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    FAIL() << "gnuplot is not installed; scripts/setup.sh installs gnuplot-nox";
  }
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto dir = temp_dir("plots") + "/run";
  run_study(c, dir, 2, 1, 1, /*plots=*/true);
  for (const char* stem : {"curves", "gap_distribution"}) {
    const auto png = read_file(dir + "/" + stem + ".png");
    ASSERT_GT(png.size(), 8u);
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << stem;
    const auto [w, h] = png_size(png);
    EXPECT_GE(w, 1000u) << stem;
    EXPECT_GE(h, 600u) << stem;
    EXPECT_GT(png.size(), 20000u) << stem << ".png looks empty";
    const auto svg = read_file(dir + "/" + stem + ".svg");
    EXPECT_NE(svg.find("<svg"), std::string::npos);
    EXPECT_GT(std::count(svg.begin(), svg.end(), '\n'), 200) << stem << ".svg has almost nothing drawn";
    for (const auto& s : c.strategies) EXPECT_NE(svg.find(s.name), std::string::npos) << stem << " lacks " << s.name;
  }
  // A single-run-per-strategy study has no distribution to draw.
  const auto single = temp_dir("plots1") + "/run";
  run_study(load_config(source("configs/smoke/keras_nll.json")), single, 1, 1, 1, true);
  EXPECT_EQ(::access((single + "/curves.png").c_str(), R_OK), 0);
  EXPECT_NE(::access((single + "/gap_distribution.png").c_str(), F_OK), 0);
}

TEST(Study, ADivergingRunFailsAloneAndIsReported) {
  // lr 1e3 on a Gaussian NLL at ~1e-3 scale diverges to a non-finite loss; the rest completes.
  const auto c = load_config(source("configs/smoke/keras_nll.json"), {R"(grid={"optimizer.lr": [1e-6, 1e3]})"});
  const auto dir = temp_dir("fail") + "/run";
  const auto r = run_study(c, dir, 2);
  ASSERT_EQ(r.runs.size(), 4u);
  EXPECT_GE(r.failed, 1u);
  for (const auto& run : r.runs) {
    if (run.grid == "optimizer.lr=1e-06") {
      EXPECT_FALSE(run.failed) << run.name;
    }
    if (run.failed) {
      EXPECT_NE(run.error.find("strategy \"" + run.name + "\", seed 7, sample 11, epoch"), std::string::npos) << run.error;
      EXPECT_NE(run.error.find("not finite"), std::string::npos) << run.error;
    }
  }
  const auto summary = nlohmann::json::parse(read_file(dir + "/summary.json"));
  bool marked = false;
  for (const auto& a : summary["aggregates"]) marked = marked || a["failed"].get<int>() > 0;
  EXPECT_TRUE(marked);
  EXPECT_NE(read_file(dir + "/summary.md").find("failed"), std::string::npos);
}

TEST(Check, FindsEveryKindOfMismatchAndWritesJUnit) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("check");
  run_study(c, dir + "/run", 1);
  write_golden(dir + "/run", dir + "/golden.json");
  std::ostringstream out;
  EXPECT_EQ(check_golden(dir + "/run", dir + "/golden.json", CheckOptions{}, out), 0u) << out.str();
  // Shift one value by 1e-4 (relative ~2e-4 > rtol 1e-5) and drop another.
  auto g = nlohmann::json::parse(read_file(dir + "/golden.json"));
  g["values"][3]["value"] = g["values"][3]["value"].get<double>() + 1e-4;
  const auto dropped = g["values"][6];
  g["values"].erase(6);
  write_file_atomic(dir + "/bad.json", g.dump());
  CheckOptions o;
  o.junit = dir + "/junit.xml";
  std::ostringstream diff;
  EXPECT_EQ(check_golden(dir + "/run", dir + "/bad.json", o, diff), 2u);
  EXPECT_NE(diff.str().find("| strategy | grid | seed | sample | epoch | metric | expected | got | tolerance |"), std::string::npos);
  EXPECT_NE(diff.str().find("(none)"), std::string::npos) << "an unexpected value is reported";
  const auto xml = read_file(dir + "/junit.xml");
  EXPECT_NE(xml.find("<testsuite name=\"bnlab.check\""), std::string::npos);
  EXPECT_NE(xml.find("<failure message="), std::string::npos);
  // A looser tolerance accepts the shifted value (the dropped one still counts).
  o.rtol = 1e-2;
  std::ostringstream loose;
  EXPECT_EQ(check_golden(dir + "/run", dir + "/bad.json", o, loose), 1u);
}

}  // namespace
