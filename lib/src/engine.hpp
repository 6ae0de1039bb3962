// Pretraining, checkpoints and single-sample fine-tuning with Keras' fit semantics.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <iosfwd>
#include <string>

#include "bnlab/config.hpp"
#include "bnlab/run.hpp"
#include "data.hpp"
#include "nn.hpp"

namespace bnlab {

/// The network the config describes, sized for the data set.
Model build_model(const Config& config, const Dataset& data);

/// Mean loss of `x`,`y` under no_grad in the model's current mode; optional accuracy.
double evaluate(ModelImpl& model, LossKind loss, const torch::Tensor& x, const torch::Tensor& y,
                double* accuracy = nullptr);

/// Inference-mode loss: eval(), evaluate, and the previous mode restored.
double evaluate_inference(ModelImpl& model, LossKind loss, const torch::Tensor& x,
                          const torch::Tensor& y, double* accuracy = nullptr);

/// One pretraining step on a batch at learning rate `lr`; returns the batch's mean loss as
/// computed before the update.
using PretrainStep = std::function<double(const torch::Tensor& x, const torch::Tensor& y, double lr)>;

/// The pretraining schedule both engines share: epochs of batches shuffled by a generator
/// seeded with seed + 1, the cosine or constant learning rate, progress lines, divergence and
/// interruption checks. Returns the last epoch's mean training loss.
double pretrain_loop(const Dataset& data, const Config& config, std::ostream& log, int verbose,
                     const PretrainStep& step);

/// Trains on the whole data set with shuffled mini-batches (seeded), through torch::nn and
/// autograd (the torch engine). Returns the last epoch's mean training loss.
double pretrain(ModelImpl& model, const Dataset& data, const Config& config, std::ostream& log,
                int verbose);

/// Writes pretrained.pt: {"format", "cache_key", "state_dict": {name: tensor},
/// "x_mean", "x_std"} readable by Python's torch.load.
void save_pretrained(const std::string& path, const ModelImpl& model, const Dataset& data,
                     const std::string& cache_key);

enum class CacheState { kMissing, kStale, kLoaded };
/// Loads pretrained.pt into `model` when its cache key matches. A corrupt file or a
/// state dict that does not fit the model throws InputError naming the tensor and shapes.
CacheState load_pretrained(const std::string& path, ModelImpl& model, const std::string& cache_key);

/// One epoch's metrics as the loop emits them.
struct EpochRecord {
  std::string strategy;
  int64_t epoch = 0, epochs = 0;
  double loss = 0, val_loss = 0;
  double accuracy = 0, val_accuracy = 0;
  bool classification = false;
};

/// The message of a run whose loss is not finite, the same from both engines.
std::string not_finite_message(const std::string& strategy, uint64_t seed, int64_t sample, int64_t epoch,
                               double loss, double val_loss);

/// Keras' bookkeeping at the end of an epoch, shared by both engines: appends the epoch to the
/// curves and applies ModelCheckpoint (`monitor`, `save_best_only`, lower is better) against
/// `best_value`. Returns true when this epoch's weights become the checkpoint.
bool record_epoch(StrategyResult& r, const EpochRecord& rec, const FinetuneConfig& ft, double& best_value);

/// PreciseBN: sets the selected BatchNorm layers' running statistics to the exact average
/// of the per-batch statistics of `batches` shuffled batches of `data` (momentum 1/k for the
/// k-th batch, in train mode, no gradients). Other layers' buffers and every
/// num_batches_tracked are left as they were.
void recalibrate(ModelImpl& model, const Dataset& data, int64_t batches, int64_t batch_size,
                 uint64_t seed, const LayerSelection& selection);

/// Seed of a fine-tuning run's dropout generator: seed * 1000003 + sample. Recalibration and
/// fine-tuning draw from it in forward order.
uint64_t dropout_seed(const RunSpec& run);
inline uint64_t dropout_seed(const Config& config) { return dropout_seed(run_of(config)); }

/// The model a strategy fine-tunes: a copy of `pretrained`, recalibrated, folded or with
/// FrozenBatchNorm modules as the strategy says, its policy not yet applied.
Model prepare_model(const ModelImpl& pretrained, const StrategyConfig& strategy, const Config& study, const RunSpec& run,
                    const Dataset* data);
inline Model prepare_model(const ModelImpl& pretrained, const StrategyConfig& strategy, const Config& config, const Dataset* data) {
  return prepare_model(pretrained, strategy, config, run_of(config), data);
}
/// Whether prepare_model's model is `pretrained`'s copy and nothing else: the same layers, the
/// same state, bit for bit (its dropout seed aside). Its inference loss is then the pretrained
/// weights' own (the batched engine evaluates them once for both).
bool prepare_copies_only(const StrategyConfig& strategy);

/// Fine-tunes a copy of `pretrained` on (x, y) under `strategy`, validating on (x, y)
/// in inference mode after every epoch, Keras-style. `on_epoch` sees each epoch's record.
/// `hook`, when set, runs after every optimizer step (tests use it to call train()).
/// `data` (the pretraining set) is needed by strategies that recalibrate.
/// `finetuned`, when given, receives the model as it ends (best weights loaded).
/// `study` gives the model, loss and pretraining settings; `run` the seed, the fine-tuning
/// settings and the sample or set (x, y are its rows: one sample, or the set's rows in the set's
/// order; each epoch feeds them in epoch_order's order, in batches of batch_size, and logs
/// Keras' epoch loss: the row-weighted mean of the batches' pre-update losses).
StrategyResult finetune(const ModelImpl& pretrained, const StrategyConfig& strategy,
                        const torch::Tensor& x, const torch::Tensor& y, const Config& study, const RunSpec& run,
                        const std::function<void(const EpochRecord&)>& on_epoch,
                        const std::function<void(ModelImpl&, int64_t)>& hook = {},
                        const Dataset* data = nullptr, Model* finetuned = nullptr);
/// The same for the one run `config` describes on its own (run_of(config)).
inline StrategyResult finetune(const ModelImpl& pretrained, const StrategyConfig& strategy,
                               const torch::Tensor& x, const torch::Tensor& y, const Config& config,
                               const std::function<void(const EpochRecord&)>& on_epoch,
                               const std::function<void(ModelImpl&, int64_t)>& hook = {},
                               const Dataset* data = nullptr, Model* finetuned = nullptr) {
  return finetune(pretrained, strategy, x, y, config, run_of(config), on_epoch, hook, data, finetuned);
}

/// The architecture a strategy fine-tunes (folded: no BatchNorm; bn_module frozen:
/// FrozenBatchNorm1d for the selected layers), freshly initialised.
Model strategy_architecture(const Config& config, const StrategyConfig& strategy, int64_t inputs, int64_t outputs);

/// Copies a name -> tensor map into `model`; every tensor must be there with its shape.
void load_state(ModelImpl& model, const c10::impl::GenericDict& state, const std::string& origin);
/// The same from named tensors: each of the model's tensors must be there once, with its shape
/// and dtype; a missing, extra, mis-shaped or mis-typed tensor is an InputError naming it (all of
/// them, then `hint` when given); nothing is copied unless every tensor fits.
void load_state(ModelImpl& model, const std::vector<std::pair<std::string, torch::Tensor>>& state, const std::string& origin,
                const std::string& hint = "");

/// A fresh model with the same layers and a bit-for-bit copy of `source`'s state.
Model clone_model(const ModelImpl& source);

}  // namespace bnlab
