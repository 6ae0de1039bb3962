// The optimizer registry: each optimizer kind in one definition, with its state slots and
// element-wise update for the batched engine and its counterpart for the torch engine
// (torch::optim where LibTorch has it). The generic test runs over every kind.
#pragma once

#include <torch/torch.h>

#include <memory>
#include <vector>

#include "bnlab/config.hpp"
#include "lane_kernels.hpp"

namespace bnlab {

/// What the torch engine steps: torch::optim's classes behind one small interface, so that an
/// optimizer LibTorch lacks (Keras' RMSprop) is written the same way.
class TorchOptimizer {
 public:
  virtual ~TorchOptimizer() = default;
  virtual void zero_grad() = 0;
  virtual void step() = 0;
  virtual void set_lr(double lr) = 0;
};

class OptimizerDef {
 public:
  virtual ~OptimizerDef() = default;
  /// Per-parameter state vectors the update keeps (momentum buffer, moments, ...).
  virtual int slots(const OptimizerConfig& c) const = 0;
  /// One step at `lr`, the `step`-th (from 1), over n elements: p, g and each slot[i] point at
  /// the same element range; slots start at 0.
  virtual void update(const OptimizerConfig& c, double lr, int64_t step, float* p, const float* g, float* const* slot,
                      int64_t n) const = 0;
  /// Whether one step at `lr` is the plain SGD rule, element by element with no state (then
  /// `rule` is set): what the batched engine may apply inside the backward pass.
  virtual bool plain(const OptimizerConfig&, double /*lr*/, lanes::Sgd& /*rule*/) const { return false; }
  /// The torch engine's optimizer over `params` (all of which require grad).
  virtual std::unique_ptr<TorchOptimizer> torch(const OptimizerConfig& c, const std::vector<torch::Tensor>& params) const = 0;
};

/// The definition of a kind: an exhaustive switch, no default.
const OptimizerDef& optimizer_kind(OptimizerKind kind);
/// Every registered kind (what the generic tests iterate over).
const std::vector<OptimizerKind>& all_optimizer_kinds();

/// The torch engine's optimizer over the parameters that require grad (frozen ones are left
/// out entirely); nullptr when nothing is trainable.
std::unique_ptr<TorchOptimizer> make_optimizer(const OptimizerConfig& config, const std::vector<torch::Tensor>& params);

}  // namespace bnlab
