// Micro-benchmark of the study store's writer: Store::insert of finished runs (10-epoch curves,
// every column filled) into a fresh store, in transactions of a batch of runs as the study's
// writer takes them. Prints microseconds per run (best of REPEAT fresh stores), to set against
// the fine-tuning's microseconds per run: the writer works on the other core while the study
// runs, and whatever it has not inserted when the last work item ends is the phase's tail. Not
// a test. Usage: bench_store DIR [RUNS] [BATCH] [REPEAT]   (DIR: an empty folder it may write)
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bnlab/run.hpp"
#include "store.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_store DIR [RUNS] [BATCH] [REPEAT]\n");
    return 2;
  }
  const std::string path = std::string(argv[1]) + "/bench_store.sqlite";
  const long runs = argc > 2 ? std::atol(argv[2]) : 1000, batch = argc > 3 ? std::atol(argv[3]) : 64,
             repeat = argc > 4 ? std::atol(argv[4]) : 7;
  if (runs < 1 || batch < 1 || repeat < 1) {
    std::fprintf(stderr, "bench_store: RUNS, BATCH and REPEAT must be positive\n");
    return 2;
  }
  // The runs as the batched engine hands them over, values varied so no page compresses alike.
  std::vector<bnlab::StrategyResult> all(static_cast<size_t>(runs));
  for (long i = 0; i < runs; ++i) {
    auto& r = all[static_cast<size_t>(i)];
    r.name = "frozen";
    r.run = static_cast<size_t>(i);
    r.sample = i;
    r.engine = "batched";
    r.evaluate_pretrained = r.evaluate_before = 1.0 + 1e-3 * static_cast<double>(i);
    for (int e = 0; e < 10; ++e) {
      r.loss.push_back(r.evaluate_before - 1e-5 * e);
      r.val_loss.push_back(r.evaluate_before - 1e-5 * (e + 1));
    }
    r.evaluate_after = r.val_loss.back();
    r.best_epoch = 10;
    r.max_gap = r.lag_residual = 1e-5;
    r.lag_relative = 1e-5;
    r.lag_identity_holds = true;
  }
  double best = 1e30;
  for (long t = 0; t < repeat; ++t) {
    for (const char* suffix : {"", "-wal", "-shm"}) ::unlink((path + suffix).c_str());
    bnlab::Store store = bnlab::Store::create(path, {{"experiment", "bench_store"}});
    store.set_meta("finetune_started_at", "now");  // as the writer does first: the log exists
    std::vector<bnlab::StrategyResult> part;
    const auto t0 = std::chrono::steady_clock::now();
    for (long at = 0; at < runs; at += batch) {
      part.assign(all.begin() + at, all.begin() + std::min(runs, at + batch));
      store.insert(part);
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, us / static_cast<double>(runs));
  }
  for (const char* suffix : {"", "-wal", "-shm"}) ::unlink((path + suffix).c_str());
  std::printf("store_insert runs %ld batch %ld us_per_run %.2f\n", runs, batch, best);
  return 0;
}
