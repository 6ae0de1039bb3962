// Study reports: aggregates over seeds and samples, exports and plots, computed from the study
// store. No torch: `bnlab merge` rebuilds every report of a study from its store alone.
#pragma once

#include <iosfwd>
#include <functional>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/run.hpp"
#include "store.hpp"

namespace bnlab {

/// Summary statistics of one figure over the runs of a group.
struct Stats {
  size_t n = 0;  ///< runs the figures cover
  double mean = 0, std = 0, median = 0, p25 = 0, p75 = 0, iqr = 0, p90 = 0;  ///< std: sample (n - 1); quantiles: linear interpolation
};
Stats describe(std::vector<double> values);
/// The q-quantile of non-empty sorted values, interpolated linearly (numpy's default).
double quantile(const std::vector<double>& sorted, double q);

/// One (grid point, strategy) group aggregated over seeds and samples: failed runs are left out
/// of the figures, diverged runs are in them (and counted).
struct Aggregate {
  std::string grid, strategy;
  size_t runs = 0, failed = 0, diverged = 0;
  Stats final_gap;      ///< loss - val_loss at the last epoch
  Stats lag_residual;   ///< max(|loss[1] - evaluate before|, max_k |loss[k+1] - val_loss[k]|)
  Stats eval_change;    ///< evaluate after - evaluate before
};
std::vector<Aggregate> aggregate(const Config& config, const std::vector<StrategyResult>& runs);
/// The same from a store, in one pass that holds three numbers per run.
std::vector<Aggregate> aggregate(const Config& config, const Store& store);

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

/// Which text exports a study of `runs` runs gets under config.report ("curves", "metrics", "runs").
std::vector<std::string> exports_for(const Config& config, size_t runs);

/// A per-epoch band of one group: median and quartiles over its runs that did not fail.
struct Band {
  std::vector<double> median, p25, p75;
};

/// One (grid point, strategy) group digested from the store: what every report draws from.
struct GroupDigest {
  Aggregate agg;
  size_t grid = 0, strategy = 0;  ///< indices into the config's grid and strategies
  size_t curves = 0;              ///< runs the bands and figures cover (not failed)
  size_t lag_holds = 0;           ///< of those, runs whose lag identity holds
  Band loss, val_loss;
  Stats evaluate_before, evaluate_after;
  std::vector<double> gaps;     ///< sorted final gaps (first grid point only: the distribution)
  std::vector<double> shown;    ///< at most 1000 of them, strided in run order
};

/// What write_reports found: the console table, the groups in config order, and the counts.
struct StudyReport {
  std::string table;
  std::vector<GroupDigest> groups;
  size_t stored = 0, planned = 0;
};

/// A figure as summary.csv writes it: the shortest text that reads back as the same double;
/// "" when not finite.
std::string csv_number(double v);

/// The digest write_reports draws from, without writing anything (report.html after explain).
StudyReport digest_study(const Config& c, const Store& store, size_t planned);

/// Writes a study's reports from its store, each file atomically: summary.json (aggregates, and
/// per-run records when exported), summary.csv, summary.md, the exports of exports_for (streamed
/// from the store; an export not written this time is removed, so none disagrees with the
/// store) and, when `plots`, curves.png/svg and (more than one run per strategy)
/// gap_distribution.png/svg, and tensorboard/ (tensorboard.hpp). `planned` is how many runs
/// the directory should hold. report.html is written afterwards (html_report.hpp), when the
/// manifest is.
StudyReport write_reports(const std::string& dir, const Config& config, Store& store, bool plots,
                          std::ostream& log, size_t planned);

}  // namespace bnlab
