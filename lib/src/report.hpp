// Study reports: curves, per-run records, aggregates over seeds and samples, plots. No torch:
// `bnlab merge` rebuilds every report of a study from its runs' records alone.
#pragma once

#include <iosfwd>
#include <functional>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/run.hpp"

namespace bnlab {

/// Summary statistics of one figure over the runs of a group.
struct Stats {
  size_t n = 0;
  double mean = 0, std = 0, median = 0, p90 = 0;  ///< std: sample (n - 1); p90: linear interpolation
};
Stats describe(std::vector<double> values);
/// The q-quantile of non-empty sorted values, interpolated linearly (numpy's default).
double quantile(const std::vector<double>& sorted, double q);

/// One (grid point, strategy) group aggregated over seeds and samples (failed runs left out).
struct Aggregate {
  std::string grid, strategy;
  size_t runs = 0, failed = 0;
  Stats final_gap;      ///< loss - val_loss at the last epoch
  Stats lag_residual;   ///< max(|loss[1] - evaluate before|, max_k |loss[k+1] - val_loss[k]|)
  Stats eval_change;    ///< evaluate after - evaluate before
};
std::vector<Aggregate> aggregate(const Config& config, const std::vector<StrategyResult>& runs);

/// The run order of a study: grid point, then strategy, then seed, then sample.
struct RunKey {
  size_t run = 0, grid = 0, strategy = 0, seed = 0, sample = 0;  ///< indices into the config's lists
};
std::vector<RunKey> plan_runs(const Config& config);

/// Keras' epoch line: "Epoch 3/10 - loss: -6.0948e+00 - val_loss: -6.0903e+00".
std::string keras_line(int64_t epoch, int64_t epochs, double loss, double val_loss, const double* accuracy,
                       const double* val_accuracy);

/// metrics.jsonl lines (one JSON object per epoch) of one run.
std::string metrics_lines(const StrategyResult& run);

/// Writes what a study has so far, each file atomically: curves.csv, metrics.jsonl and
/// summary.json (with "complete" and "runs_planned"). `cancelled`, when given, is asked
/// between files: a true answer leaves the remaining files as they were (each file is complete
/// either way; the caller is about to rewrite them all).
void write_progress(const std::string& dir, const Config& config, const std::vector<StrategyResult>& runs,
                    size_t planned, const std::function<bool()>& cancelled = {});

/// write_progress, then summary.csv, summary.md and, when `plots`, curves.png/svg and (for
/// studies with more than one run per strategy) gap_distribution.png/svg; every file
/// atomically. `planned` is how many runs this directory should hold. Returns the summary
/// table for the console.
std::string write_reports(const std::string& dir, const Config& config, const std::vector<StrategyResult>& runs,
                          bool plots, std::ostream& log, size_t planned);

/// The per-run records of summary.json, read back (for merge and check).
std::vector<StrategyResult> read_runs(const std::string& summary_json_path);

}  // namespace bnlab
