// Micro-benchmark of the study store's writer: Store::insert of finished runs (10-epoch curves
// and every figure of an ok run; no accuracy curves, no grid) into a fresh store, in transactions
// of a batch of runs as the study's writer takes them. Prints microseconds per run, best of
// REPEAT fresh stores: the inserts alone (what the writer does while the study runs) and with
// seal() (the log copied into the file when the study ends). To set against the fine-tuning's
// microseconds per run: the writer thread works beside the study's workers, and whatever it has
// not inserted when the last work item ends is the phase's tail. Not a test.
// Usage: bench_store DIR [RUNS] [BATCH] [REPEAT]   (DIR: an existing folder it may write in)
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "bnlab/run.hpp"
#include "store.hpp"

namespace {

/// argv[i] as a positive integer, `fallback` when absent; false when it is not one.
bool positive_arg(int argc, char** argv, int i, long fallback, long& out) {
  if (i >= argc) {
    out = fallback;
    return true;
  }
  char* end = nullptr;
  errno = 0;
  out = std::strtol(argv[i], &end, 10);
  return errno == 0 && end != argv[i] && *end == '\0' && out > 0;
}

int bench(const std::string& path, long runs, long batch, long repeat) {
  // The runs as the batched engine hands them over, cut into the writer's transactions up front.
  std::vector<std::vector<bnlab::StrategyResult>> parts;
  for (long at = 0; at < runs; at += batch) {
    auto& part = parts.emplace_back();
    for (long i = at; i < std::min(runs, at + batch); ++i) {
      auto& r = part.emplace_back();
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
      r.max_gap = r.lag_residual = r.lag_relative = 1e-5;
      r.lag_identity_holds = true;
    }
  }
  using clock = std::chrono::steady_clock;
  double best_inserts = 1e30, best_sealed = 1e30;
  for (long t = 0; t < repeat; ++t) {
    for (const char* suffix : {"", "-wal", "-shm"}) ::unlink((path + suffix).c_str());
    bnlab::Store store = bnlab::Store::create(path, {{"experiment", "bench_store"}});
    store.set_meta("finetune_started_at", "now");  // as the writer does first: the log exists
    const auto t0 = clock::now();
    for (const auto& part : parts) store.insert(part);
    const auto t1 = clock::now();
    store.seal();
    const auto t2 = clock::now();
    const auto per_run = [&](clock::duration d) {
      return std::chrono::duration<double, std::micro>(d).count() / static_cast<double>(runs);
    };
    best_inserts = std::min(best_inserts, per_run(t1 - t0));
    best_sealed = std::min(best_sealed, per_run(t2 - t0));
  }
  for (const char* suffix : {"", "-wal", "-shm"}) ::unlink((path + suffix).c_str());
  std::printf("store_insert runs %ld batch %ld us_per_run %.2f with_seal %.2f\n", runs, batch, best_inserts, best_sealed);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  long runs = 0, batch = 0, repeat = 0;
  if (argc < 2 || argc > 5 || !positive_arg(argc, argv, 2, 1000, runs) || !positive_arg(argc, argv, 3, 64, batch) ||
      !positive_arg(argc, argv, 4, 7, repeat)) {
    std::fprintf(stderr, "usage: bench_store DIR [RUNS] [BATCH] [REPEAT]   (RUNS, BATCH, REPEAT: positive integers)\n");
    return 2;
  }
  try {
    return bench(std::string(argv[1]) + "/bench_store.sqlite", runs, batch, repeat);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_store: %s\n", e.what());
    return 1;
  }
}
