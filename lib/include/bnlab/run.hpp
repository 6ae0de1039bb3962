// The library's entry points: what `bnlab run` does, callable in-process by tests.
#pragma once

#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "bnlab/config.hpp"

namespace bnlab {

struct StrategyResult;

struct RunOptions {
  std::string out_dir;                 ///< default: runs/<config name>
  bool force = false;                  ///< reuse a directory holding another experiment; ignore the cache
  int verbose = -1;                    ///< 0 silent, 1 progress, 2 one line per epoch; -1: 2 for <= 20 runs, else 1
  int threads = 1;                     ///< intra-op threads per run; fixed for reproducible curves
  int jobs = 0;                        ///< runs executed concurrently; 0 = all cores
  int shard_index = 1;                 ///< with shard_count: run only runs r with r % count == index - 1
  int shard_count = 1;
  /// "auto": the batched engine wherever it reproduces the torch engine (every preset except
  /// PyTorch-numerics BatchNorm on one row's batch statistics), else torch; "batched" is the
  /// same; "torch": torch::nn and autograd for everything (the reference).
  std::string engine = "auto";
  int lanes = 16;                      ///< batched engine: samples fine-tuned together per work item (one lane group)
  bool plots = true;                   ///< render curves.png/svg (and the gap distribution) with gnuplot
  std::vector<std::string> argv;       ///< recorded in manifest.json
  /// Called with every run as it finishes (from worker threads, one call at a time), after the
  /// store has it queued; for callers that watch a study in process.
  std::function<void(const StrategyResult&)> on_run;
};

/// What one run (grid point x strategy x seed x sample) produced. Index k of loss/val_loss
/// is epoch k+1.
struct StrategyResult {
  std::string name;                    ///< the strategy
  size_t run = 0;                      ///< position in the study's run order (grid, strategy, seed, sample)
  std::string grid;                    ///< grid point label, "" without a grid
  uint64_t seed = 0;
  int64_t sample = 0;
  std::string engine;                  ///< "batched" or "torch": which engine fine-tuned it
  bool failed = false;                 ///< e.g. a non-finite loss; `error` says where
  std::string error;
  bool diverged = false;               ///< final loss far above the first (report.diverged_factor); still counted everywhere
  double evaluate_pretrained = 0;      ///< untouched pretrained weights, inference mode
  double evaluate_before = 0;          ///< the model about to be fine-tuned (after the strategy's
                                       ///< recalibrate/fold/bn_module transforms), inference mode
  double evaluate_after = 0;           ///< best (or last) weights, inference mode, after
  std::vector<double> loss;            ///< Keras `loss`: mean of the pre-update batch losses
  std::vector<double> val_loss;        ///< Keras `val_loss`: inference-mode loss after the epoch
  std::vector<double> accuracy, val_accuracy;  ///< cross_entropy only
  int best_epoch = 0;                  ///< epoch whose weights evaluate_after used (1-based)
  double final_gap = 0;                ///< loss - val_loss at the last epoch
  double max_gap = 0;                  ///< max_k |loss[k] - val_loss[k]|
  double lag_first = 0;                ///< |loss[1] - evaluate_before|
  double lag_steps = 0;                ///< max_k |loss[k+1] - val_loss[k]|
  double lag_residual = 0;             ///< max(lag_first, lag_steps)
  double lag_relative = 0;             ///< the same residuals, each relative to max(|a|, |b|)
  bool lag_identity_holds = false;     ///< lag_relative <= kLagTolerance
};

inline constexpr double kLagTolerance = 1e-6;
/// |a - b| / max(|a|, |b|): the measure the lag identity is judged by (compute_lag, explain).
double relative_difference(double a, double b);

struct RunResult {
  std::string out_dir;
  bool pretrain_cached = false;        ///< every seed's weights came from the cache
  double pretrain_seconds = 0;
  double finetune_seconds = 0;
  /// The time the workers spent in the engines during the fine-tuning phase (preparing each
  /// strategy's model, fine-tuning the work items, collecting their curves), summed over the
  /// workers; at one job, the phase less its set-up, handing runs to the sinks and waiting for
  /// the store's writer.
  double engine_seconds = 0;
  /// This shard's finished runs in run order, read back from the store, for studies of at most
  /// report.export_limit runs; empty for larger ones (read study.sqlite instead).
  std::vector<StrategyResult> runs;
  size_t failed = 0;                   ///< runs that failed (the others completed)
  size_t diverged = 0;                 ///< runs that completed but diverged
  size_t planned = 0;                  ///< runs of this shard
  size_t batched_runs = 0;             ///< runs the batched engine fine-tuned
  size_t torch_runs = 0;               ///< runs the torch engine fine-tuned
  size_t resumed = 0;                  ///< runs taken from an earlier, interrupted invocation
  bool interrupted = false;            ///< stopped by request_stop(); rerun to resume
};

/// Loads data, pretrains (or reuses the cached checkpoint), fine-tunes the sample under
/// every strategy from the same weights, and writes the run directory. Bad input throws
/// InputError before anything is written. Progress and Keras-style lines go to `log`.
RunResult run(const Config& config, const RunOptions& options, std::ostream& log);

struct ExplainOptions {
  std::string out_dir;                 ///< run directory holding (or receiving) pretrained.pt
  int64_t sample = -1;                 ///< -1: finetune.sample
  std::string strategy;                ///< "": every strategy of the config
  bool force = false;
  int threads = 1;
  int verbose = 1;
};

/// Per BatchNorm layer: what training mode would normalise the sample with versus what
/// inference uses, and how far apart the outputs are; per strategy: whether its
/// training-mode forward pass IS the inference forward pass (and so whether loss will
/// equal val_loss up to the one-epoch lag). Prints tables to `out`, writes explain.json
/// into the run directory, and returns that JSON text.
std::string explain(const Config& config, const ExplainOptions& options, std::ostream& out,
                    std::ostream& log);

/// Writes a strategy's fine-tuned (best) weights from a run directory as a Keras 2 model.save()
/// HDF5 file ("keras-h5") or for PyTorch ("torch"), `as` one of "state_dict" (the default: a
/// torch.load-able {name: tensor}), "checkpoint" ({key: state dict with the run's init.key and
/// init.prefix, "bnlab": what it is}) or "torchscript" (a torch.jit.load-able Sequential).
void export_weights(const std::string& run_dir, const std::string& strategy, const std::string& format,
                    const std::string& out, const std::string& as = "");

/// Where a run directory keeps a strategy's fine-tuned weights (one-run-per-strategy studies).
std::string finetuned_path(const std::string& run_dir, const std::string& strategy);

/// Derives final_gap, max_gap and the lag residuals from the curves (exposed for tests).
void compute_lag(StrategyResult& r);

std::string version_string();

}  // namespace bnlab
