// Torch-free pieces (reports, goldens, check, merge) on hand-made run records. Built twice:
// normally, and with AddressSanitizer + UndefinedBehaviorSanitizer (see tests/CMakeLists.txt).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/tools.hpp"
#include "report.hpp"
#include "support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

const char* kStudy = R"({"name": "hand", "seeds": [1, 2], "finetune": {"samples": [3, 4], "epochs": 2},
                         "strategies": ["train", "frozen"]})";

/// Hand-made runs: loss[k] = base + k, val_loss[k] = base - 1 + k, evaluate before = base.
std::vector<StrategyResult> hand_runs(const Config& c) {
  std::vector<StrategyResult> out;
  for (const auto& k : plan_runs(c)) {
    StrategyResult r;
    r.run = k.run;
    r.name = c.strategies[k.strategy].name;
    r.seed = c.seeds[k.seed];
    r.sample = c.finetune.samples[k.sample];
    const double base = static_cast<double>(k.run);
    r.evaluate_pretrained = r.evaluate_before = base;
    r.loss = {base, base + 1};
    r.val_loss = {base + 1, base + 2};
    r.evaluate_after = base + 2;
    r.best_epoch = 2;
    compute_lag(r);
    out.push_back(r);
  }
  return out;
}

TEST(Tools, LagOfHandMadeCurvesHolds) {
  const auto runs = hand_runs(parse_config(kStudy, "hand"));
  ASSERT_EQ(runs.size(), 8u);
  // loss[1] == evaluate before and loss[2] == val_loss[1]: the identity holds, max gap 1.
  EXPECT_TRUE(runs[3].lag_identity_holds);
  EXPECT_EQ(runs[3].lag_residual, 0.0);
  EXPECT_EQ(runs[3].max_gap, 1.0);
  EXPECT_EQ(keras_line(3, 10, -6.0948, -6.0903, nullptr, nullptr), "Epoch 3/10 - loss: -6.0948e+00 - val_loss: -6.0903e+00");
}

TEST(Tools, AggregatesGroupByStrategy) {
  const auto c = parse_config(kStudy, "hand");
  const auto aggs = aggregate(c, hand_runs(c));
  ASSERT_EQ(aggs.size(), 2u);
  EXPECT_EQ(aggs[0].strategy, "train");
  EXPECT_EQ(aggs[0].runs, 4u);
  EXPECT_DOUBLE_EQ(aggs[0].final_gap.mean, -1.0);  // loss - val_loss = -1 for every run
  EXPECT_DOUBLE_EQ(aggs[0].eval_change.mean, 2.0);
}

TEST(Tools, GoldenCheckAndMergeOnHandMadeRunDirectories) {
  const auto c = parse_config(kStudy, "hand");
  const auto runs = hand_runs(c);
  const auto base = temp_dir("tools");
  std::ostringstream log;
  // Two shard directories holding the even and the odd runs, then merged.
  for (int shard = 0; shard < 2; ++shard) {
    const std::string dir = base + "/s" + std::to_string(shard);
    ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
    write_file_atomic(dir + "/config.resolved.json", to_json(c));
    std::vector<StrategyResult> part;
    for (const auto& r : runs)
      if (static_cast<int>(r.run % 2) == shard) part.push_back(r);
    write_reports(dir, c, part, /*plots=*/false, log, part.size());
  }
  merge_shards({base + "/s0", base + "/s1"}, base + "/m", false, false, log);
  const auto merged = read_runs(base + "/m/summary.json");
  ASSERT_EQ(merged.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(merged[i].loss, runs[i].loss);
  write_golden(base + "/m", base + "/golden.json");
  std::ostringstream out;
  EXPECT_EQ(check_golden(base + "/m", base + "/golden.json", CheckOptions{}, out), 0u) << out.str();
  EXPECT_THROW(check_golden(base + "/nowhere", base + "/golden.json", CheckOptions{}, out), InputError);
  write_file_atomic(base + "/bad.json", "{\"format\": \"something else\"}");
  EXPECT_THROW(check_golden(base + "/m", base + "/bad.json", CheckOptions{}, out), InputError);
  EXPECT_THROW(merge_shards({base + "/s0"}, base + "/m2", false, false, log), InputError);  // runs missing
  // Shards pretrained alike (the same cache keys in manifest.json) merge; shards pretrained by
  // another engine or with other settings are refused, naming both key sets.
  write_file_atomic(base + "/s0/manifest.json", R"({"cache_keys": ["abc-batched"]})");
  write_file_atomic(base + "/s1/manifest.json", R"({"cache_keys": ["abc-batched"]})");
  merge_shards({base + "/s0", base + "/s1"}, base + "/m3", false, false, log);
  EXPECT_EQ(read_runs(base + "/m3/summary.json").size(), runs.size());
  write_file_atomic(base + "/s1/manifest.json", R"({"cache_keys": ["abc-torch"]})");
  try {
    merge_shards({base + "/s0", base + "/s1"}, base + "/m4", false, false, log);
    ADD_FAILURE() << "shards with different cache keys were merged";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("abc-torch"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("another --engine"), std::string::npos) << e.what();
  }
  EXPECT_NE(::access((base + "/m4/summary.json").c_str(), F_OK), 0) << "a refused merge wrote results";
}

TEST(Tools, AtomicWriteLeavesNoTemporary) {
  const auto dir = temp_dir("atomic");
  write_file_atomic(dir + "/a.txt", "hello");
  EXPECT_EQ(read_file(dir + "/a.txt"), "hello");
  write_file_atomic(temp_name(dir + "/b.txt"), "left by a killed process");
  remove_stale_temps(dir);
  EXPECT_NE(::access(temp_name(dir + "/b.txt").c_str(), F_OK), 0);
  EXPECT_EQ(::access((dir + "/a.txt").c_str(), F_OK), 0);
  EXPECT_THROW(write_file_atomic(dir + "/no/such/dir/c.txt", "x"), std::runtime_error);
}

}  // namespace
