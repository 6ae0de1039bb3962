// The model pieces: a BatchNorm1d with PyTorch or Keras numerics, the Dense/BatchNorm
// network with Sequential-style names, losses, and the freezing policy applied to it.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "bnlab/config.hpp"

namespace bnlab {

/// Options of BatchNorm, following torch::nn::BatchNormOptions with two additions: the
/// numerics convention, and Keras' center/scale (beta and gamma) taken separately.
/// momentum is always PyTorch's (weight of the new batch statistic).
struct BatchNormOptions {
  /* implicit */ BatchNormOptions(int64_t num_features) : num_features_(num_features) {}
  TORCH_ARG(int64_t, num_features);
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(double, momentum) = 0.1;
  TORCH_ARG(bool, scale) = true;   ///< a learnable gamma ("weight")
  TORCH_ARG(bool, center) = true;  ///< a learnable beta ("bias")
  /// Mirrors LibTorch's module option: when false, the forward uses batch statistics in
  /// training AND eval mode, and still updates the buffers it has (LibTorch's own rule).
  TORCH_ARG(bool, track_running_stats) = true;
  /// track_running_stats false read as torch.nn.BatchNorm1d reads it for a module whose buffers
  /// exist: batch statistics in training only, with no buffer update and no count.
  TORCH_ARG(bool, python_rule) = false;
  /// >= 0: prior_bn's p. In training the forward normalises with p * running + (1 - p) * batch
  /// statistics (the batch variance biased under Keras numerics, unbiased under PyTorch's),
  /// detached, and updates nothing.
  TORCH_ARG(double, prior) = -1;
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
  /// The training forward of prior_bn (options.prior() >= 0).
  torch::Tensor prior_forward(const torch::Tensor& input);
  torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
};
TORCH_MODULE(BatchNorm);

/// BatchNorm1d reduced to what inference needs: x * scale + shift with
/// scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale. Everything
/// is a buffer, so nothing trains and train()/eval() change nothing. torchvision, timm and
/// detectron2 ship this for 2-D only; this one takes the [N, C] input of a BatchNorm1d.
class FrozenBatchNormImpl : public torch::nn::Cloneable<FrozenBatchNormImpl> {
 public:
  explicit FrozenBatchNormImpl(int64_t num_features, double eps = 1e-5);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  int64_t num_features;
  double eps;
  torch::Tensor weight, bias, running_mean, running_var;
};
TORCH_MODULE(FrozenBatchNorm);

/// Batch renormalization (Ioffe 2017) as Keras 3.14's BatchNormalization(renorm=True) computes
/// it (keras/src/layers/normalization/batch_normalization.py, commit 019d9ed), under Keras
/// numerics, on [N, C]. In training:
///   mean, var   = the batch's mean and biased variance (constants neither)
///   stddev      = sqrt(var + eps);  s = max(renorm_stddev, sqrt(eps))
///   r = stddev / s, d = (mean - renorm_mean) / s, clipped to [rmin, rmax] and [-dmax, dmax]
///       where given, then constants in the gradient (stop_gradient)
///   y = (x - mean) * (rsqrt(var + eps) * (r * gamma)) + (d * gamma + beta)   (Keras' torch backend)
/// then, with Keras' momenta K = 1 - m (this module's m: the policy's momentum, renorm_momentum):
///   renorm_mean, renorm_stddev <- K * old + (1 - K) * (mean, stddev)   (r and d used the old ones)
///   running_mean, moving_stddev <- K * old + (1 - K) * (mean, stddev)
///   running_var = relu(moving_stddev^2 - eps);  num_batches_tracked += 1
/// In eval it is plain BatchNorm on running_mean / running_var.
class BatchRenormImpl : public torch::nn::Cloneable<BatchRenormImpl> {
 public:
  explicit BatchRenormImpl(const LayerSpec& spec);
  void reset() override;
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;

  LayerSpec spec;          ///< eps, scale/center, clipping, renorm_momentum
  double momentum = 0.01;  ///< of the moving statistics, PyTorch's convention (the policy sets it)
  torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked, renorm_mean, renorm_stddev, moving_stddev;
};
TORCH_MODULE(BatchRenorm);

/// A BatchRenorm1d holding `bn`'s state. The renorm statistics start from its moving statistics
/// (renorm_mean = running_mean, renorm_stddev = moving_stddev = sqrt(running_var + eps)) or,
/// with `keras_init`, as Keras creates them (0, 1, 1).
BatchRenorm to_renorm(const BatchNormImpl& bn, const LayerSpec& spec, bool keras_init);

/// Copies a BatchNorm's affine parameters (ones/zeros without affine) and running stats.
FrozenBatchNorm to_frozen(const BatchNormImpl& bn);
/// Back to a BatchNorm with `options` (num_features and eps taken from the frozen module).
BatchNorm from_frozen(const FrozenBatchNormImpl& frozen, BatchNormOptions options);

/// Inverted dropout drawing its masks from a generator the model owns, so that runs in
/// parallel threads each get their own reproducible masks (torch::nn::Dropout draws from
/// the global generator). mask = empty_like(x).bernoulli_(1 - p, gen); out = x * mask / (1 - p).
class DropoutImpl : public torch::nn::Cloneable<DropoutImpl> {
 public:
  explicit DropoutImpl(double p) : p(p) { reset(); }
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override { stream << "bnlab::Dropout(p=" << p << ")"; }
  double p;
  std::shared_ptr<at::Generator> generator;
};
TORCH_MODULE(Dropout);

/// Batch statistics as the Keras convention computes them: mean and biased variance over dim 0.
std::pair<torch::Tensor, torch::Tensor> batch_moments(const torch::Tensor& x);

/// The element-wise activation of a LayerSpec (kind activation) as a module without state.
class ActivationModuleImpl : public torch::nn::Cloneable<ActivationModuleImpl> {
 public:
  ActivationModuleImpl(Activation a, double alpha) : activation(a), alpha(alpha) {}
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& input);
  void pretty_print(std::ostream& stream) const override;
  Activation activation;
  double alpha;
};
TORCH_MODULE(ActivationModule);

class ModelImpl;

/// What a freezing strategy does to a model; applied now and after every train() call. It reads
/// resolve_modes() on the model's own (prepared) layers.
struct Policy {
  StrategyConfig strategy;
  /// Sets modes, momentum, track_running_stats and requires_grad. Idempotent.
  void apply(ModelImpl& model) const;
};

/// The network a LayerSpec list describes, one module per entry, registered as "0", "1", ...
/// exactly as torch.nn.Sequential would, so state dicts load in Python unchanged.
class ModelImpl : public torch::nn::Module {
 public:
  /// `layers`: sized (sized_layers); each module comes from its kind's definition (layer_kinds.hpp).
  explicit ModelImpl(std::vector<LayerSpec> layers);
  torch::Tensor forward(torch::Tensor x);
  /// The same forward pass, telling `observe` each layer's input and output.
  using LayerObserver = std::function<void(const LayerSpec&, const torch::Tensor& in, const torch::Tensor& out)>;
  torch::Tensor forward_observed(torch::Tensor x, const LayerObserver& observe);

  /// Module::train, then the policy again: a later train() cannot silently undo a freeze.
  void train(bool on = true) override;
  void set_policy(std::optional<Policy> policy);
  const std::optional<Policy>& policy() const { return policy_; }

  /// The resolved description of this network, one entry per module.
  const std::vector<LayerSpec>& layers() const { return spec_; }
  /// The module of layer i.
  std::shared_ptr<torch::nn::Module> module_at(size_t i) const { return layers_[i].ptr(); }
  std::vector<BatchNorm> batchnorms() const;
  /// The specs of batchnorms(), in the same order (names, bn_index, eps, momentum).
  std::vector<LayerSpec> batchnorm_specs() const;
  std::vector<torch::nn::Linear> linears() const;

  /// Replaces the selected BatchNorm layers by FrozenBatchNorm1d modules with the same state.
  void freeze_batchnorm_modules(const LayerSelection& selection);
  /// Replaces the BatchNorm layers a renorm strategy selects by BatchRenorm1d (to_renorm), with
  /// the specs prepared_layers gives them.
  void renorm_batchnorm_modules(const StrategyConfig& strategy);

  /// Copies every parameter and buffer from `other` (same architecture), bit for bit.
  void copy_state_from(const ModelImpl& other);

  /// Dropout masks come from this generator; set_dropout_seed reseeds it, and
  /// share_dropout_generator makes another model draw from the same stream.
  void set_dropout_seed(uint64_t seed);
  void share_dropout_generator(const ModelImpl& other);
  /// The generator the dropout masks come from (its state moves as masks are drawn).
  std::shared_ptr<at::Generator> dropout_generator() const { return dropout_generator_; }

  int64_t inputs() const { return spec_.front().in; }
  int64_t outputs() const { return spec_.back().out; }

 private:
  std::vector<torch::nn::AnyModule> layers_;
  std::vector<LayerSpec> spec_;
  std::optional<Policy> policy_;
  std::shared_ptr<at::Generator> dropout_generator_;
};
TORCH_MODULE(Model);

/// A model without BatchNorm whose inference output equals `model`'s, following fold_plan():
/// a BatchNorm after a Linear folds into it, W' = diag(s) W, b' = (b - mean) s + beta; one
/// before a Linear folds into that, W' = W diag(s), b' = b + W (beta - mean s); with
/// s = gamma / sqrt(running_var + eps), in double precision. Throws InputError when a
/// BatchNorm has no Linear beside it.
Model fold_batchnorm(const ModelImpl& model);

/// Width of the head for a loss: 2*targets (mean, log-variance) for gaussian_nll,
/// targets for mse, classes for cross_entropy.
int64_t head_width(LossKind loss, int64_t targets, int64_t classes);

/// Mean loss over the batch (and targets). y is float [N, T] for regression, or
/// float/long class labels [N, 1] or [N] for cross_entropy.
torch::Tensor compute_loss(LossKind loss, const torch::Tensor& out, const torch::Tensor& y);
/// Fraction of correct argmax predictions (cross_entropy only).
double accuracy(const torch::Tensor& out, const torch::Tensor& y);

/// Named state (parameters, then buffers) in state-dict order.
std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& m);

}  // namespace bnlab
