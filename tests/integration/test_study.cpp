// Studies: statistics, concurrency that does not change results, shards and merge, metrics.jsonl,
// plots, failed runs, and the golden check used by CI.
#include <gtest/gtest.h>
#include <unistd.h>

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "bnlab/tools.hpp"
#include "report.hpp"
#include "store.hpp"
#include "support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

RunResult run_study(const Config& c, const std::string& dir, int jobs, int shard = 1, int shards = 1, bool plots = false,
                    std::ostream* log = nullptr) {
  RunOptions o = test::quiet_options(dir, jobs);
  o.verbose = log ? 1 : 0;
  o.shard_index = shard;
  o.shard_count = shards;
  o.plots = plots;
  std::ostringstream sink;
  return run(c, o, log ? *log : sink);
}

/// Every field a store keeps, equal bit for bit between two lists of runs.
void expect_same_runs(const std::vector<StrategyResult>& a, const std::vector<StrategyResult>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto where = what + ": run " + std::to_string(a[i].run);
    EXPECT_EQ(a[i].run, b[i].run) << where;
    EXPECT_EQ(a[i].name, b[i].name) << where;
    EXPECT_EQ(a[i].grid, b[i].grid) << where;
    EXPECT_EQ(a[i].seed, b[i].seed) << where;
    EXPECT_EQ(a[i].sample, b[i].sample) << where;
    EXPECT_EQ(a[i].engine, b[i].engine) << where;
    EXPECT_EQ(a[i].failed, b[i].failed) << where;
    EXPECT_EQ(a[i].diverged, b[i].diverged) << where;
    EXPECT_EQ(a[i].evaluate_pretrained, b[i].evaluate_pretrained) << where;
    EXPECT_EQ(a[i].evaluate_before, b[i].evaluate_before) << where;
    EXPECT_EQ(a[i].evaluate_after, b[i].evaluate_after) << where;
    EXPECT_EQ(a[i].best_epoch, b[i].best_epoch) << where;
    EXPECT_EQ(a[i].loss, b[i].loss) << where;
    EXPECT_EQ(a[i].val_loss, b[i].val_loss) << where;
    EXPECT_EQ(a[i].accuracy, b[i].accuracy) << where;
    EXPECT_EQ(a[i].lag_residual, b[i].lag_residual) << where;
    EXPECT_EQ(a[i].lag_identity_holds, b[i].lag_identity_holds) << where;
  }
}

std::vector<StrategyResult> stored(const std::string& dir) { return Store::open(store_path(dir), false).read_all(); }

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
  expect_same_runs(stored(base + "/seq"), stored(base + "/par"), "--jobs 2 store");
  expect_same_runs(stored(base + "/seq"), stored(base + "/merged"), "merged store of 3 shards");
  EXPECT_EQ(stored(shards[1]).size(), 32u);
  // Merging an incomplete set of shards is refused, naming what is missing.
  try {
    merge_shards({shards[0], shards[1]}, base + "/partial", false, false, log);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("runs are in none of the shards"), std::string::npos) << e.what();
  }
}

// The on_run callback follows the store among the sinks: a callback that throws stops the
// study, but the work item it was handed is in the store already (and progress.json says the
// study stopped short of its plan).
TEST(Store, ACallbackThatThrowsLeavesItsWorkItemStored) {
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto dir = temp_dir("store_cb") + "/run";
  RunOptions o = test::quiet_options(dir, 1);
  std::vector<StrategyResult> seen;
  o.on_run = [&](const StrategyResult& r) {
    seen.push_back(r);
    throw std::runtime_error("the callback stops here");
  };
  std::ostringstream log;
  try {
    run(c, o, log);
    FAIL() << "expected the callback's error";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("the callback stops here"), std::string::npos) << e.what();
  }
  ASSERT_EQ(seen.size(), 1u);
  const auto in_store = stored(dir);
  const auto it = std::find_if(in_store.begin(), in_store.end(), [&](const StrategyResult& r) { return r.run == seen[0].run; });
  ASSERT_NE(it, in_store.end()) << "the run the callback was handed is not in the store";
  expect_same_runs({seen[0]}, {*it}, "the callback's run");
  const auto progress = nlohmann::json::parse(read_file(dir + "/progress.json"));
  EXPECT_EQ(progress["state"], "stopped");
  EXPECT_EQ(progress["runs_done"].get<size_t>(), in_store.size());
  EXPECT_LT(in_store.size(), progress["runs_planned"].get<size_t>());
}

TEST(Store, HoldsExactlyWhatTheEnginesReported) {
  // Half the runs on each engine: the same study, once more with --engine torch, is compared too.
  const auto c = load_config(source("configs/smoke/study.json"));
  const auto dir = temp_dir("store_eq") + "/run";
  RunOptions o = test::quiet_options(dir, 2);
  std::vector<StrategyResult> seen;
  o.on_run = [&](const StrategyResult& r) { seen.push_back(r); };
  std::ostringstream log;
  run(c, o, log);
  std::sort(seen.begin(), seen.end(), [](const StrategyResult& a, const StrategyResult& b) { return a.run < b.run; });
  expect_same_runs(seen, stored(dir), "store vs in-memory results");
  // The exports are the store's values, printed so that they read back bit for bit.
  std::istringstream csv(read_file(dir + "/curves.csv"));
  std::string line;
  std::getline(csv, line);
  size_t row = 0;
  while (std::getline(csv, line)) {
    const auto& r = seen[row / 5];
    const auto last = line.rfind(','), before = line.rfind(',', last - 1);
    EXPECT_EQ(std::stod(line.substr(before + 1, last - before - 1)), r.loss[row % 5]) << line;
    EXPECT_EQ(std::stod(line.substr(last + 1)), r.val_loss[row % 5]) << line;
    ++row;
  }
  EXPECT_EQ(row, seen.size() * 5);
  // The torch engine's runs reach the store the same way.
  const auto tdir = temp_dir("store_eq_torch") + "/run";
  o.out_dir = tdir;
  o.engine = "torch";
  seen.clear();
  run(c, o, log);
  std::sort(seen.begin(), seen.end(), [](const StrategyResult& a, const StrategyResult& b) { return a.run < b.run; });
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.front().engine, "torch");
  expect_same_runs(seen, stored(tdir), "torch engine: store vs in-memory results");
}

TEST(Store, AForeignOrCorruptStoreStopsTheRunAndStaysAsItWas) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  // A run directory of bnlab's whose store was since replaced by something else (a folder
  // that is not bnlab's is refused before the store is looked at: RunDir.*, cli).
  const auto dir = temp_dir("store_bad") + "/run";
  RunOptions o = test::quiet_options(dir);
  std::ostringstream log;
  run(c, o, log);
  { std::ofstream(dir + "/study.sqlite", std::ios::trunc) << "SQLite format 3, or so it says"; }
  const std::string resolved = read_file(dir + "/config.resolved.json");
  ::unlink((dir + "/summary.md").c_str());
  try {
    run(c, o, log);
    FAIL() << "a run went ahead over a corrupt store";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(dir + "/study.sqlite"), std::string::npos) << e.what();
  }
  o.force = true;
  EXPECT_THROW(run(c, o, log), InputError) << "--force replaced a file bnlab cannot tell is its own";
  EXPECT_EQ(read_file(dir + "/study.sqlite"), "SQLite format 3, or so it says");
  EXPECT_EQ(read_file(dir + "/config.resolved.json"), resolved);
  EXPECT_NE(::access((dir + "/summary.md").c_str(), F_OK), 0) << "something was written before the refusal";
}

TEST(Study, DivergedRunsAreCountedAndReclassifiedWithoutRerunning) {
  // At lr 0.1 some runs overshoot (measured: one of 48 ends 34x above its first loss, the rest
  // within 9x); at 1e-6 none does.
  const std::string grid = R"(grid={"optimizer.lr": [1e-06, 0.1]})";
  const auto c = load_config(source("configs/smoke/study.json"), {grid});
  const auto dir = temp_dir("diverged") + "/run";
  const auto first = run_study(c, dir, 2);
  size_t by_default = 0;
  for (const auto& r : first.runs)
    by_default += r.loss.back() - r.loss.front() > 10 * std::max(1.0, std::abs(r.loss.front())) ? 1 : 0;
  EXPECT_GE(by_default, 1u);
  EXPECT_EQ(first.diverged, by_default);
  EXPECT_EQ(first.failed, 0u);
  // A threshold between the runs' own rises, so some runs count as diverged and others not;
  // the expected counts are computed here from the curves, independently of the store's SQL.
  std::vector<double> rise;
  for (const auto& r : first.runs) rise.push_back((r.loss.back() - r.loss.front()) / std::max(1.0, std::abs(r.loss.front())));
  std::vector<double> positive;
  for (double v : rise)
    if (v > 0) positive.push_back(v);
  ASSERT_GE(positive.size(), 2u);
  std::sort(positive.begin(), positive.end());
  const double factor = positive[positive.size() / 2 - 1];
  std::map<std::pair<std::string, std::string>, int> expected;
  size_t total = 0;
  for (size_t i = 0; i < rise.size(); ++i)
    if (rise[i] > factor) ++expected[{first.runs[i].grid, first.runs[i].name}], ++total;
  ASSERT_GT(total, 0u);
  ASSERT_LT(total, rise.size());
  const auto again = load_config(source("configs/smoke/study.json"), {grid, "report.diverged_factor=" + fmt_double(factor)});
  const auto second = run_study(again, dir, 2);
  EXPECT_EQ(second.resumed, first.runs.size()) << "a report setting reran the study";
  EXPECT_EQ(second.diverged, total);
  const auto summary = nlohmann::json::parse(read_file(dir + "/summary.json"));
  for (const auto& a : summary["aggregates"]) {
    const auto key = std::make_pair(a["grid"].get<std::string>(), a["strategy"].get<std::string>());
    EXPECT_EQ(a["diverged"].get<int>(), expected[key]) << a.dump();
    EXPECT_EQ(a["final_gap"]["n"].get<size_t>(), a["runs"].get<size_t>()) << "diverged runs left the figures";
  }
  size_t flagged = 0;
  for (const auto& r : summary["runs"]) flagged += r["status"] == "diverged" ? 1 : 0;
  EXPECT_EQ(flagged, total);
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
