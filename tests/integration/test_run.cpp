// End to end, in-process: the same run() the CLI calls, on the smoke configs and seed_repro.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "engine.hpp"
#include "support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

RunResult run_quiet(const Config& c, const std::string& dir, bool force = false) {
  RunOptions o;
  o.out_dir = dir;
  o.verbose = 0;
  o.force = force;
  std::ostringstream log;
  return run(c, o, log);
}

const StrategyResult& by_name(const RunResult& r, const std::string& name) {
  for (const auto& s : r.runs)
    if (s.name == name) return s;
  throw std::runtime_error("no strategy " + name);
}

TEST(Run, SmokeWritesACompleteSelfDescribingRunDirectory) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("smoke") + "/run";
  const auto r = run_quiet(c, dir);
  for (const char* f : {"config.resolved.json", "manifest.json", "pretrained.pt", "sample.pt", "curves.csv",
                        "summary.json", "summary.md"})
    EXPECT_EQ(::access((dir + "/" + f).c_str(), R_OK), 0) << f;
  // curves.csv: header + one row per strategy and epoch, first columns as documented.
  std::istringstream csv(read_file(dir + "/curves.csv"));
  std::string line;
  std::getline(csv, line);
  EXPECT_EQ(line, "strategy,grid,seed,sample,epoch,loss,val_loss");
  int rows = 0;
  while (std::getline(csv, line)) ++rows;
  EXPECT_EQ(rows, 2 * 5);
  const auto summary = nlohmann::json::parse(read_file(dir + "/summary.json"));
  ASSERT_EQ(summary["runs"].size(), 2u);
  EXPECT_DOUBLE_EQ(summary["runs"][1]["evaluate_before"].get<double>(), r.runs[1].evaluate_before);
  EXPECT_EQ(summary["runs"][1]["loss"].size(), 5u);
  ASSERT_EQ(summary["aggregates"].size(), 2u);
  EXPECT_EQ(summary["aggregates"][1]["final_gap"]["n"].get<int>(), 1);
  const auto manifest = nlohmann::json::parse(read_file(dir + "/manifest.json"));
  EXPECT_EQ(manifest["seeds"][0].get<int>(), 7);
  EXPECT_FALSE(manifest["pretrain_cached"].get<bool>());
  // The engines' share of the fine-tuning phase, summed over the workers: at most each worker's
  // whole phase.
  const auto& t = manifest["timings_s"];
  EXPECT_GT(t["finetune_engines"].get<double>(), 0.0);
  EXPECT_LE(t["finetune_engines"].get<double>(), manifest["jobs"].get<double>() * t["finetune"].get<double>());
  EXPECT_DOUBLE_EQ(t["finetune_engines"].get<double>(), r.engine_seconds);
  // The resolved config parses back to the same experiment.
  EXPECT_EQ(to_json(parse_config(read_file(dir + "/config.resolved.json"), "resolved")), to_json(c));
}

// progress.json: there as "running" from the first finished run on (watchers, the CLI and Slurm
// tests wait for it), the writer's final counts at the end, and a rerun's resumed runs counted.
TEST(Run, ProgressFileSaysRunningFromTheFirstRunAndFinishedAtTheEnd) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("progress") + "/run";
  RunOptions o = test::quiet_options(dir);
  std::vector<nlohmann::json> during;
  o.on_run = [&](const StrategyResult&) {
    // The file is there from the phase's start. (Before, the writer wrote it with its first
    // transaction, at 64 runs, 0.2 s or the end: this study's first run finishes within a few ms,
    // so without the early write this fails unless the machine is 0.2 s slow to get there.)
    ASSERT_EQ(::access((dir + "/progress.json").c_str(), R_OK), 0) << "no progress.json while the study runs";
    during.push_back(nlohmann::json::parse(read_file(dir + "/progress.json")));
  };
  std::ostringstream log;
  run(c, o, log);
  ASSERT_EQ(during.size(), 2u);
  for (const auto& p : during) {
    EXPECT_EQ(p["state"], "running");
    EXPECT_EQ(p["runs_planned"].get<int>(), 2);
    EXPECT_LE(p["runs_done"].get<int>(), 2);
  }
  const auto end = nlohmann::json::parse(read_file(dir + "/progress.json"));
  EXPECT_EQ(end["state"], "finished");
  EXPECT_EQ(end["runs_planned"].get<int>(), 2);
  EXPECT_EQ(end["runs_done"].get<int>(), 2);
  EXPECT_EQ(end["resumed"].get<int>(), 0);
  EXPECT_EQ(end["ok"].get<int>() + end["diverged"].get<int>() + end["failed"].get<int>(), 2);
  EXPECT_GT(end["runs_per_s"].get<double>(), 0.0);
  EXPECT_EQ(end["eta_s"].get<double>(), 0.0);
  // Again into the same directory: both runs come from the store, none is fine-tuned.
  o.on_run = nullptr;
  run(c, o, log);
  const auto again = nlohmann::json::parse(read_file(dir + "/progress.json"));
  EXPECT_EQ(again["state"], "finished");
  EXPECT_EQ(again["resumed"].get<int>(), 2);
  EXPECT_EQ(again["runs_done"].get<int>(), 2);
  EXPECT_EQ(again["ok"].get<int>() + again["diverged"].get<int>() + again["failed"].get<int>(), 0);
}

// The store's sink writes progress.json's first state while its writer thread starts. When that
// write fails, the thread is joined before the error reaches the caller (a std::thread destroyed
// unjoined aborts the process: this test then crashes, as it did with the join removed), the
// last run's progress.json stays as it was, and a rerun works.
TEST(Run, AProgressFileThatCannotBeWrittenStopsTheStudyCleanly) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("progress_blocked") + "/run";
  RunOptions o = test::quiet_options(dir);
  size_t finished = 0;
  o.on_run = [&](const StrategyResult&) { ++finished; };
  std::ostringstream log;
  run(c, o, log);
  ASSERT_EQ(finished, 2u);
  const std::string before = read_file(dir + "/progress.json");
  // Where progress.json's temporary goes, a folder (not empty, so the sweep of stale temporaries
  // at the start leaves it): opening it as a file fails. --force: both runs again, from a new store.
  const std::string blocker = temp_name(dir + "/progress.json");
  ASSERT_TRUE(std::filesystem::create_directory(blocker));
  std::ofstream(blocker + "/keep") << "x";
  o.force = true;
  try {
    run(c, o, log);
    ADD_FAILURE() << "the study ran without its progress file";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("progress.json"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(dir + "/progress.json"), before);
  std::filesystem::remove_all(blocker);
  o.force = false;
  const RunResult r = run(c, o, log);
  EXPECT_EQ(r.resumed, 0u);
  EXPECT_EQ(finished, 4u);
  EXPECT_EQ(nlohmann::json::parse(read_file(dir + "/progress.json"))["state"], "finished");
}

// progress.json's final state is written by the store's writer thread after the last commit,
// while run() writes the reports; run() waits for it before the manifest. When that write fails
// (its temporary's path made a folder while the study runs), run() reports it naming the file,
// progress.json stays the last complete state, every run is in the store, and a rerun finishes.
TEST(Run, AFinalProgressFileThatCannotBeWrittenFailsTheRunAfterItsRunsAreStored) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("progress_final") + "/run";
  RunOptions o = test::quiet_options(dir);
  const std::string blocker = temp_name(dir + "/progress.json");
  std::string during;
  size_t seen = 0;
  o.on_run = [&](const StrategyResult&) {
    // At the last run (both are in the store's queue by now): only the final write follows,
    // unless the phase took a second (the writer's rewrite once a second).
    if (++seen < 2) return;
    during = read_file(dir + "/progress.json");
    ASSERT_TRUE(std::filesystem::create_directory(blocker));
    std::ofstream(blocker + "/keep") << "x";
  };
  std::ostringstream log;
  try {
    run(c, o, log);
    ADD_FAILURE() << "the study ended without its final progress file";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("progress.json"), std::string::npos) << e.what();
  }
  ASSERT_FALSE(during.empty());
  EXPECT_EQ(read_file(dir + "/progress.json"), during);
  EXPECT_EQ(nlohmann::json::parse(during)["state"], "running");
  EXPECT_FALSE(std::filesystem::exists(dir + "/manifest.json")) << "a manifest for a run that failed";
  std::filesystem::remove_all(blocker);
  o.on_run = nullptr;
  const RunResult r = run(c, o, log);
  EXPECT_EQ(r.resumed, 2u) << "the runs were not in the store";
  const auto end = nlohmann::json::parse(read_file(dir + "/progress.json"));
  EXPECT_EQ(end["state"], "finished");
  EXPECT_EQ(end["resumed"].get<int>(), 2);
}

TEST(Run, SetsAreRunsWithTheirRowsRecordedAndCurvesIndependentOfLanes) {
  // finetune.sets (issue 17, part 4) end to end: three drawn sets of four samples, batches of two.
  const auto c = load_config(source("configs/smoke/keras_nll.json"),
                             {R"(finetune.sets={"count": 3, "size": 4, "seed": 2})", "finetune.batch_size=2"});
  const auto base = temp_dir("sets");
  std::vector<std::string> curves;
  for (int lanes : {1, 3}) {
    RunOptions o;
    o.out_dir = base + "/lanes" + std::to_string(lanes);
    o.verbose = 0;
    o.lanes = lanes;
    o.jobs = 1;
    std::ostringstream log;
    const auto r = run(c, o, log);
    ASSERT_EQ(r.runs.size(), c.strategies.size() * 3);
    for (const auto& s : r.runs) {
      EXPECT_FALSE(s.failed) << s.error;
      EXPECT_GE(s.sample, 0);
      EXPECT_LT(s.sample, 3);  // a run's id is its set's position
    }
    curves.push_back(read_file(o.out_dir + "/curves.csv"));
  }
  EXPECT_EQ(curves[0], curves[1]) << "a set's curves depend on --lanes";
  const std::string dir = base + "/lanes3";
  const auto summary = nlohmann::json::parse(read_file(dir + "/summary.json"));
  ASSERT_EQ(summary["sets"].size(), 3u);
  const auto resolved = nlohmann::json::parse(read_file(dir + "/config.resolved.json"));
  EXPECT_EQ(resolved["finetune"]["sets"], summary["sets"]);
  EXPECT_FALSE(resolved["finetune"].contains("samples"));
  for (const auto& set : summary["sets"]) {
    const auto rows = set.get<std::vector<int64_t>>();
    ASSERT_EQ(rows.size(), 4u);
    EXPECT_TRUE(std::is_sorted(rows.begin(), rows.end()));
    EXPECT_EQ(std::adjacent_find(rows.begin(), rows.end()), rows.end()) << "a drawn set repeats a sample";
    for (int64_t i : rows) EXPECT_TRUE(i >= 0 && i < c.data.samples) << i;
  }
  // The resolved config reads back as the same study, its draw now explicit sets.
  const auto again = parse_config(read_file(dir + "/config.resolved.json"), "resolved");
  EXPECT_EQ(to_json(again), read_file(dir + "/config.resolved.json"));
  EXPECT_EQ(again.finetune.sets.size(), 3u);
  EXPECT_NE(read_file(dir + "/summary.md").find("3 set(s) of 4 samples fine-tuned together (batch_size 2, shuffled)"), std::string::npos)
      << read_file(dir + "/summary.md");
}

TEST(Run, SecondRunReusesTheCacheAndIsBitIdentical) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto dir = temp_dir("cache") + "/run";
  const auto first = run_quiet(c, dir);
  const auto second = run_quiet(c, dir);
  EXPECT_FALSE(first.pretrain_cached);
  EXPECT_TRUE(second.pretrain_cached);
  const auto curves = read_file(dir + "/curves.csv");
  // A fresh directory pretrains from scratch again: determinism of the whole pipeline.
  const auto dir2 = temp_dir("cache2") + "/run";
  run_quiet(c, dir2);
  EXPECT_EQ(read_file(dir2 + "/curves.csv"), curves) << "two runs of the same config gave different curves";
  EXPECT_EQ(read_file(dir2 + "/pretrained.pt").size(), read_file(dir + "/pretrained.pt").size());
  for (size_t i = 0; i < first.runs.size(); ++i) {
    EXPECT_EQ(first.runs[i].loss, second.runs[i].loss);
    EXPECT_EQ(first.runs[i].val_loss, second.runs[i].val_loss);
  }
  // Changing a pretraining setting invalidates the cache.
  const auto changed = parse_config(read_file(source("configs/smoke/keras_nll.json")), "c", {"pretrain.epochs=1"});
  EXPECT_FALSE(run_quiet(changed, dir).pretrain_cached);
}

TEST(Run, RefusesADirectoryOfAnotherExperimentAndWritesNothing) {
  const auto dir = temp_dir("other") + "/run";
  run_quiet(load_config(source("configs/smoke/keras_nll.json")), dir);
  const auto before = read_file(dir + "/curves.csv");
  const auto other = load_config(source("configs/smoke/torch_mse.json"));
  try {
    run_quiet(other, dir);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("holds results of experiment \"smoke_keras_nll\""), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(dir + "/curves.csv"), before);
  EXPECT_NO_THROW(run_quiet(other, dir, /*force=*/true));
}

TEST(Run, LagIdentityIsExactWhenBatchNormIsFrozen) {
  for (const char* cfg : {"configs/smoke/keras_nll.json", "configs/smoke/torch_mse.json"}) {
    const auto r = run_quiet(load_config(source(cfg)), temp_dir("lag") + "/run");
    const auto& f = by_name(r, "frozen");
    EXPECT_TRUE(f.lag_identity_holds) << cfg;
    // loss[1] is the forward pass of the untouched pretrained weights in inference mode.
    EXPECT_EQ(f.loss[0], f.evaluate_before) << cfg;
    for (size_t k = 0; k + 1 < f.loss.size(); ++k)
      EXPECT_NEAR(f.loss[k + 1], f.val_loss[k], 1e-6 * std::abs(f.val_loss[k])) << cfg << " epoch " << k + 2;
  }
}

TEST(Run, FrozenLeavesBatchNormBitForBitEvenWhenTrainIsCalledMidFit) {
  const auto c = load_config(source("configs/smoke/keras_nll.json"));
  const auto data = load_data(c);
  torch::manual_seed(c.seed);
  Model pretrained = build_model(c, data);
  pretrain(*pretrained, data, c, std::cerr, 0);
  const auto x = data.x.narrow(0, c.finetune.sample, 1), y = data.y.narrow(0, c.finetune.sample, 1);
  StrategyConfig frozen = c.strategies[1];
  ASSERT_EQ(frozen.name, "frozen");
  std::vector<std::vector<torch::Tensor>> seen;
  const auto hook = [&](ModelImpl& m, int64_t) {
    m.train();  // what a user's callback or a library helper might do between steps
    std::vector<torch::Tensor> snap;
    for (const auto& bn : m.batchnorms()) {
      EXPECT_FALSE(bn->is_training());
      for (const auto& t : {bn->weight, bn->bias, bn->running_mean, bn->running_var, bn->num_batches_tracked})
        snap.push_back(t.detach().clone());
    }
    seen.push_back(snap);
  };
  const auto r = finetune(*pretrained, frozen, x, y, c, {}, hook);
  ASSERT_EQ(seen.size(), static_cast<size_t>(c.finetune.epochs));
  std::vector<torch::Tensor> original;
  for (const auto& bn : pretrained->batchnorms())
    for (const auto& t : {bn->weight, bn->bias, bn->running_mean, bn->running_var, bn->num_batches_tracked})
      original.push_back(t);
  for (const auto& snap : seen)
    for (size_t i = 0; i < snap.size(); ++i) EXPECT_TRUE(torch::equal(snap[i], original[i])) << "BatchNorm tensor " << i;
  EXPECT_TRUE(r.lag_identity_holds);
  // The train strategy, by contrast, moves the running statistics on every step.
  StrategyConfig train = c.strategies[0];
  bool moved = false;
  finetune(*pretrained, train, x, y, c, {}, [&](ModelImpl& m, int64_t) {
    moved = moved || !torch::equal(m.batchnorms()[0]->running_var, pretrained->batchnorms()[0]->running_var);
  });
  EXPECT_TRUE(moved);
}

TEST(Run, ClassificationReportsAccuracy) {
  const auto c = load_config(source("configs/smoke/classify.json"));
  const auto dir = temp_dir("cls") + "/run";
  const auto r = run_quiet(c, dir);
  ASSERT_EQ(r.runs[0].accuracy.size(), 3u);
  for (double a : r.runs[0].val_accuracy) EXPECT_TRUE(a == 0.0 || a == 1.0);
  std::istringstream csv(read_file(dir + "/curves.csv"));
  std::string header;
  std::getline(csv, header);
  EXPECT_EQ(header, "strategy,grid,seed,sample,epoch,loss,val_loss,accuracy,val_accuracy");
  // save_best_only false: evaluate after uses the last epoch's weights.
  EXPECT_EQ(r.runs[0].best_epoch, 3);
  EXPECT_EQ(r.runs[0].evaluate_after, r.runs[0].val_loss.back());
}

// The report, reproduced: the main job's default config, checked against the issue's expectations.
TEST(SeedRepro, TrainGapIsLargeAndFrozenShowsTheOneEpochLag) {
  const auto c = load_config(source("configs/seed_repro.json"));
  const auto r = run_quiet(c, temp_dir("seed") + "/run");
  const auto& train = by_name(r, "train");
  const auto& frozen = by_name(r, "frozen");
  EXPECT_LT(train.evaluate_before, -5.5) << "the pretrained model should fit the sample well (report: -6.09)";
  for (size_t k = 0; k < train.loss.size(); ++k) {
    EXPECT_GE(train.loss[k] - train.val_loss[k], 1.0) << "epoch " << k + 1;
    EXPECT_NEAR(train.val_loss[k], train.evaluate_before, 0.5) << "val_loss should stay near evaluate, epoch " << k + 1;
  }
  EXPECT_FALSE(train.lag_identity_holds);
  EXPECT_TRUE(frozen.lag_identity_holds);
  EXPECT_EQ(frozen.loss[0], frozen.evaluate_before);
  for (size_t k = 0; k + 1 < frozen.loss.size(); ++k)
    EXPECT_NEAR(frozen.loss[k + 1], frozen.val_loss[k], 1e-6 * std::abs(frozen.val_loss[k]));
}

}  // namespace

namespace {

TEST(Run, CsvConfigWithAPathRelativeToTheConfigFile) {
  const auto dir = temp_dir("csv") + "/run";
  const auto base = parent_dir(dir);
  std::string csv = "u,v,w,target\n";
  for (int i = 0; i < 200; ++i) {
    const double u = std::sin(i * 0.37), v = std::cos(i * 0.11), w = (i % 7) / 7.0;
    csv += fmt_double(u) + "," + fmt_double(v) + "," + fmt_double(w) + "," + fmt_double(0.5 * u - v + 0.1 * w) + "\n";
  }
  write_file_atomic(base + "/table.csv", csv);
  write_file_atomic(base + "/exp.json", R"({"name": "csv", "data": {"source": "csv", "path": "table.csv",
      "target_columns": ["target"]}, "model": {"hidden": [8], "loss": "mse"},
      "pretrain": {"epochs": 2, "batch_size": 32}, "finetune": {"sample": 199, "epochs": 2}})");
  const auto r = run_quiet(load_config(base + "/exp.json"), dir);
  ASSERT_EQ(r.runs.size(), 2u);
  EXPECT_TRUE(by_name(r, "frozen").lag_identity_holds);
  // Sample beyond the file's rows is bad input, found before anything is written.
  const auto bad = parse_config(read_file(base + "/exp.json"), "exp.json", {"finetune.sample=200"}, base);
  try {
    run_quiet(bad, base + "/never");
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("finetune.sample: index 200 is beyond the data (" ), std::string::npos) << e.what();
  }
  EXPECT_NE(::access((base + "/never").c_str(), F_OK), 0);
}

}  // namespace
