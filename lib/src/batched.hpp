// The batched engine: K single-sample fine-tunings at once, as one set of batched operations
// on hand-written kernels (no autograd, no per-op dispatch), and pretraining on the same
// kernels with BLAS for the matrix products. The torch engine (engine.hpp: torch::nn modules
// and autograd) stays the reference; tests hold the two within 1e-5 at every curve point.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/run.hpp"
#include "engine.hpp"

namespace bnlab {

/// Why the batched engine cannot run `strategy` of `config` exactly as the torch engine
/// would; "" when it can. (PyTorch-numerics BatchNorm on batch statistics with one row is
/// an error the torch engine reports; that case stays with it.)
std::string batched_unsupported(const Config& config, const StrategyConfig& strategy);

/// Whether a backward pass may stop at a BatchNorm on the batch statistics of one row when the
/// gradient it passes down is exactly +-0 and plain SGD would leave every parameter below as it
/// is, bit for bit (Net::zero_below lists the conditions, checked each step). On by default;
/// tests turn it off to compare the full pass. Returns the previous setting.
bool set_zero_gradient_shortcut(bool on);
/// How many backward passes (of a whole Net, every lane) took that shortcut in this process.
uint64_t zero_gradient_shortcuts();

/// The layer passes an epoch's paired inference and fit passes did not run, in this process
/// (every lane of a layer counts once): `shared`, a fit pass that was the inference pass itself
/// (the layer's two passes are the same and their inputs were: a frozen BatchNorm's network);
/// `kept`, a fit pass whose output was the last one's (below a layer where the backward pass
/// stopped, set_zero_gradient_shortcut). Bit for bit what running them gives.
struct PairSavings {
  uint64_t shared = 0, kept = 0;
};
PairSavings forward_pair_savings();

/// What finetune_batched keeps between its calls on one thread (the study runner holds one per
/// worker): for each model it was given (the pretrained weights, a strategy's prepared model),
/// the engine's arrays laid out for a work item's lanes, with the model's state read once.
/// Later calls with the same model, lanes and rows copy that state into the lanes instead of
/// reading the model again. The models must not change while a cache that has seen them is in use.
class BatchedCache {
 public:
  BatchedCache();
  ~BatchedCache();
  BatchedCache(const BatchedCache&) = delete;
  BatchedCache& operator=(const BatchedCache&) = delete;
  struct Nets;  // batched.cpp

 private:
  friend struct BatchedCacheAccess;
  std::unique_ptr<Nets> nets_;
};

/// Fine-tunes each of `samples` (row indices of `data`) on its own, from `pretrained`, under
/// `strategy`, with `config.seed` and `config.finetune` (one grid point), exactly what
/// finetune() does for each sample one after the other. Every lane has its own copy of every
/// weight, BatchNorm buffer, gradient, optimizer state, best-epoch checkpoint and dropout
/// generator (seeded with dropout_seed(seed, sample), drawn in forward order). Returns one
/// result per sample, in order; a lane whose loss is not finite comes back `failed` with the
/// torch engine's message while the other lanes go on. `on_epoch(lane, record)` sees every
/// epoch of every lane. `finetuned`, when given (one sample only), receives the fine-tuned
/// model as it ends (best weights loaded). `prepared`, when given, is prepare_model()'s result
/// for this seed and strategy, reused instead of preparing again (it does not depend on the
/// sample unless recalibration runs through dropout; then each lane is prepared on its own).
/// `run` gives the seed and the fine-tuning settings (its sample is ignored: `samples` are the lanes).
/// `cache`, when given, keeps the laid-out state of `pretrained` and `prepared` for the next call
/// on this thread (not of a model prepared here); results are the same bits with or without it.
std::vector<StrategyResult> finetune_batched(const ModelImpl& pretrained, const StrategyConfig& strategy,
                                             const Config& study, const RunSpec& run, const Dataset& data,
                                             const std::vector<int64_t>& samples,
                                             const std::function<void(size_t, const EpochRecord&)>& on_epoch = {},
                                             Model* finetuned = nullptr, const ModelImpl* prepared = nullptr,
                                             BatchedCache* cache = nullptr);
/// The same with run_of(config).
inline std::vector<StrategyResult> finetune_batched(const ModelImpl& pretrained, const StrategyConfig& strategy,
                                                    const Config& config, const Dataset& data,
                                                    const std::vector<int64_t>& samples,
                                                    const std::function<void(size_t, const EpochRecord&)>& on_epoch = {},
                                                    Model* finetuned = nullptr, const ModelImpl* prepared = nullptr,
                                                    BatchedCache* cache = nullptr) {
  return finetune_batched(pretrained, strategy, config, run_of(config), data, samples, on_epoch, finetuned, prepared, cache);
}

/// pretrain() on the batched engine's kernels (one lane, rows = the batch): the same batches,
/// learning-rate schedule, dropout masks and optimizer; sums in another order, so the weights
/// agree with pretrain()'s to float rounding, not bit for bit. Returns the last epoch's loss.
double pretrain_batched(ModelImpl& model, const Dataset& data, const Config& config, std::ostream& log, int verbose);

/// The fit forward and backward of the batched engine on one lane holding `model`'s state with
/// the rows of x, under `strategy`'s policy (nullptr: the model's defaults, as in pretraining).
/// Returns the loss and, per trainable parameter (state-dict name), its gradient; the model is
/// not changed. For tests against autograd.
double batched_gradients(const ModelImpl& model, const StrategyConfig* strategy, LossKind loss,
                         const torch::Tensor& x, const torch::Tensor& y,
                         std::vector<std::pair<std::string, torch::Tensor>>& grads);

/// One single-sample fine-tuning step (forward, loss read, backward, update) repeated, for
/// bench/bench_step.cpp: returns microseconds per step for `lanes` lanes stepping together.
double benchmark_step(const ModelImpl& model, const StrategyConfig& strategy, const Config& config,
                      const Dataset& data, int64_t lanes, int64_t steps);

}  // namespace bnlab
