// The model pieces: a BatchNorm1d with PyTorch or Keras numerics, the Dense/BatchNorm
// network with Sequential-style names, losses, and the freezing policy applied to it.
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "bnlab/config.hpp"

namespace bnlab {

/// Options of BatchNorm, following torch::nn::BatchNormOptions with one addition: the
/// numerics convention. momentum is always PyTorch's (weight of the new batch statistic).
struct BatchNormOptions {
  /* implicit */ BatchNormOptions(int64_t num_features) : num_features_(num_features) {}
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(double, momentum) = 0.1;
  TORCH_ARG(bool, affine) = true;
  /// Mirrors LibTorch's module option: when false, the forward uses batch statistics in
  /// training AND eval mode, and still updates the buffers it has (LibTorch's own rule).
  TORCH_ARG(bool, track_running_stats) = true;
  TORCH_ARG(BnSemantics, semantics) = BnSemantics::kTorch;
};

/// BatchNorm1d over [N, C] inputs. Parameter and buffer names match torch.nn.BatchNorm1d
/// (weight, bias, running_mean, running_var, num_batches_tracked).
///  - kTorch: exactly LibTorch's batch_norm (unbiased running variance; batch of one in
///    training mode is an error).
///  - kKeras: biased running variance; a batch of one gives variance 0, so every unit
///    outputs beta, with no NaN. Inference is the same formula in both conventions.
class BatchNormImpl : public torch::nn::Cloneable<BatchNormImpl> {
 public:
  explicit BatchNormImpl(const BatchNormOptions& options);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  BatchNormOptions options;
  torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
};
TORCH_MODULE(BatchNorm);

/// Batch statistics as the Keras convention computes them: mean and biased variance over dim 0.
std::pair<torch::Tensor, torch::Tensor> batch_moments(const torch::Tensor& x);

/// One entry per layer of the network, in Sequential order.
struct LayerInfo {
  std::string name;   ///< "0", "1", ... as torch.nn.Sequential names children
  std::string kind;   ///< "linear", "batchnorm", "relu", "tanh", "gelu", "dropout"
};

class ModelImpl;

/// What a freezing strategy does to a model; applied now and after every train() call.
struct Policy {
  StrategyConfig strategy;
  BnSemantics semantics = BnSemantics::kKeras;
  double base_momentum = 0.1;
  /// Sets modes, momentum, track_running_stats and requires_grad. Idempotent.
  void apply(ModelImpl& model) const;
};

/// Dense/BatchNorm1d network: [Linear, BatchNorm?, activation, Dropout?] per hidden
/// width, then a Linear head. Children are registered as "0", "1", ... exactly as
/// torch.nn.Sequential would, so state dicts load in Python unchanged.
class ModelImpl : public torch::nn::Module {
 public:
  ModelImpl(const ModelConfig& config, int64_t inputs, int64_t outputs);
  torch::Tensor forward(torch::Tensor x);

  /// Module::train, then the policy again: a later train() cannot silently undo a freeze.
  void train(bool on = true) override;
  void set_policy(std::optional<Policy> policy);
  const std::optional<Policy>& policy() const { return policy_; }

  const std::vector<LayerInfo>& layers() const { return info_; }
  std::vector<BatchNorm> batchnorms() const;
  std::vector<std::string> batchnorm_names() const;
  std::vector<torch::nn::Linear> linears() const;

  /// Copies every parameter and buffer from `other` (same architecture), bit for bit.
  void copy_state_from(const ModelImpl& other);

  int64_t inputs() const { return inputs_; }
  int64_t outputs() const { return outputs_; }

 private:
  std::vector<torch::nn::AnyModule> layers_;
  std::vector<LayerInfo> info_;
  std::optional<Policy> policy_;
  int64_t inputs_, outputs_;
};
TORCH_MODULE(Model);

/// Width of the head for a loss: 2*targets (mean, log-variance) for gaussian_nll,
/// targets for mse, classes for cross_entropy.
int64_t head_width(LossKind loss, int64_t targets, int64_t classes);

/// Mean loss over the batch (and targets). y is float [N, T] for regression, or
/// float/long class labels [N, 1] or [N] for cross_entropy.
torch::Tensor compute_loss(LossKind loss, const torch::Tensor& out, const torch::Tensor& y);
/// Fraction of correct argmax predictions (cross_entropy only).
double accuracy(const torch::Tensor& out, const torch::Tensor& y);

/// Optimizer over the parameters that require grad (frozen ones are left out entirely);
/// nullptr when nothing is trainable.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& config,
                                                        const std::vector<torch::Tensor>& params);

/// Named state (parameters, then buffers) in state-dict order.
std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& m);

}  // namespace bnlab
