// The optimizer registry (see optimizers.hpp). The batched updates follow torch::optim's float
// operations in the same order; Keras' RMSprop follows keras/src/optimizers/rmsprop.py.
#include "optimizers.hpp"

#include <cmath>
#include <stdexcept>

namespace bnlab {

namespace {

/// torch::optim::Optimizer behind TorchOptimizer.
class TorchOptim final : public TorchOptimizer {
 public:
  explicit TorchOptim(std::unique_ptr<torch::optim::Optimizer> o) : o_(std::move(o)) {}
  void zero_grad() override { o_->zero_grad(); }
  void step() override { o_->step(); }
  void set_lr(double lr) override {
    for (auto& g : o_->param_groups()) g.options().set_lr(lr);
  }

 private:
  std::unique_ptr<torch::optim::Optimizer> o_;
};

// -------------------------------------------------------------------------------------- SGD
class SgdDef final : public OptimizerDef {
 public:
  int slots(const OptimizerConfig& c) const override { return c.momentum != 0 ? 1 : 0; }
  bool plain(const OptimizerConfig& c, double lr, lanes::Sgd& rule) const override {
    if (c.momentum != 0) return false;
    rule.neg_lr = static_cast<float>(-lr);
    rule.wd = static_cast<float>(c.weight_decay);
    rule.decay = c.weight_decay != 0;
    return true;
  }
  void update(const OptimizerConfig& c, double lr_d, int64_t step, float* p, const float* g, float* const* slot,
              int64_t n) const override {
    const float lr = static_cast<float>(-lr_d);
    const float mom = static_cast<float>(c.momentum);
    const float wd = static_cast<float>(c.weight_decay);
    // Without momentum: the rule the batched Dense kernels fuse into their backward pass; the
    // same float operations in the same order as the general loop below.
    lanes::Sgd rule;
    if (plain(c, lr_d, rule)) {
      for (int64_t k = 0; k < n; ++k) p[k] = rule(p[k], g[k]);
      return;
    }
    float* m = slot[0];
    for (int64_t k = 0; k < n; ++k) {
      float d = g[k];
      if (c.weight_decay != 0) d = d + wd * p[k];
      m[k] = step == 1 ? d : m[k] * mom + d;  // torch: the buffer starts as the first gradient
      d = c.nesterov ? d + mom * m[k] : m[k];
      p[k] = p[k] + lr * d;
    }
  }
  std::unique_ptr<TorchOptimizer> torch(const OptimizerConfig& c, const std::vector<torch::Tensor>& params) const override {
    return std::make_unique<TorchOptim>(std::make_unique<torch::optim::SGD>(
        params, torch::optim::SGDOptions(c.lr).momentum(c.momentum).nesterov(c.nesterov).weight_decay(c.weight_decay)));
  }
};

// ------------------------------------------------------------------------------ Adam, AdamW
class AdamDef final : public OptimizerDef {
 public:
  explicit AdamDef(bool decoupled) : decoupled_(decoupled) {}
  int slots(const OptimizerConfig&) const override { return 2; }
  void update(const OptimizerConfig& c, double lr, int64_t step, float* p, const float* g, float* const* slot,
              int64_t n) const override {
    float* m = slot[0];
    float* v = slot[1];
    const double bc1 = 1 - std::pow(c.beta1, static_cast<double>(step));
    const double bc2 = 1 - std::pow(c.beta2, static_cast<double>(step));
    const float b1 = static_cast<float>(c.beta1), b2 = static_cast<float>(c.beta2);
    const float a1 = static_cast<float>(1 - c.beta1), a2 = static_cast<float>(1 - c.beta2);
    const float sqrt_bc2 = static_cast<float>(std::sqrt(bc2)), eps = static_cast<float>(c.eps);
    const float step_size = static_cast<float>(-(lr / bc1));
    const float wd = static_cast<float>(c.weight_decay);
    const float decay = static_cast<float>(1 - lr * c.weight_decay);
    for (int64_t k = 0; k < n; ++k) {
      float grad = g[k];
      if (decoupled_) {
        if (c.weight_decay != 0) p[k] = p[k] * decay;
      } else if (c.weight_decay != 0) {
        grad = grad + wd * p[k];
      }
      m[k] = m[k] * b1 + a1 * grad;
      v[k] = v[k] * b2 + a2 * (grad * grad);
      const float denom = std::sqrt(v[k]) / sqrt_bc2 + eps;
      p[k] = p[k] + step_size * (m[k] / denom);
    }
  }
  std::unique_ptr<TorchOptimizer> torch(const OptimizerConfig& c, const std::vector<torch::Tensor>& params) const override {
    if (decoupled_)
      return std::make_unique<TorchOptim>(std::make_unique<torch::optim::AdamW>(
          params, torch::optim::AdamWOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(c.weight_decay)));
    return std::make_unique<TorchOptim>(std::make_unique<torch::optim::Adam>(
        params, torch::optim::AdamOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(c.weight_decay)));
  }

 private:
  bool decoupled_;
};

/// Both RMSprops keep the squared-gradient average, the gradient average (centered) and the
/// momentum buffer, in that order, each only when used.
struct RmspropSlots {
  float *square, *mean, *momentum;
  RmspropSlots(const OptimizerConfig& c, float* const* slot)
      : square(slot[0]), mean(c.centered ? slot[1] : nullptr), momentum(c.momentum > 0 ? slot[c.centered ? 2 : 1] : nullptr) {}
  static int count(const OptimizerConfig& c) { return 1 + (c.centered ? 1 : 0) + (c.momentum > 0 ? 1 : 0); }
};

// -------------------------------------------------------------------------- RMSprop (PyTorch)
/// square_avg = alpha sa + (1 - alpha) g^2; avg = sqrt(sa [- ga^2]) + eps;
/// momentum: buf = momentum buf + g / avg, p -= lr buf; else p -= lr g / avg.
class RmspropDef final : public OptimizerDef {
 public:
  int slots(const OptimizerConfig& c) const override { return RmspropSlots::count(c); }
  void update(const OptimizerConfig& c, double lr_d, int64_t, float* p, const float* g, float* const* slot,
              int64_t n) const override {
    const RmspropSlots s(c, slot);
    float *sa = s.square, *ga = s.mean, *buf = s.momentum;
    const float alpha = static_cast<float>(c.alpha), one_minus = static_cast<float>(1 - c.alpha);
    const float eps = static_cast<float>(c.eps), lr = static_cast<float>(lr_d);
    const float wd = static_cast<float>(c.weight_decay), mom = static_cast<float>(c.momentum);
    for (int64_t k = 0; k < n; ++k) {
      float d = g[k];
      if (c.weight_decay != 0) d = d + wd * p[k];
      sa[k] = sa[k] * alpha + one_minus * d * d;
      float avg;
      if (ga) {
        ga[k] = ga[k] * alpha + one_minus * d;
        avg = std::sqrt(sa[k] - ga[k] * ga[k]) + eps;
      } else {
        avg = std::sqrt(sa[k]) + eps;
      }
      if (buf) {
        buf[k] = buf[k] * mom + d / avg;
        p[k] = p[k] - lr * buf[k];
      } else {
        p[k] = p[k] - lr * (d / avg);
      }
    }
  }
  std::unique_ptr<TorchOptimizer> torch(const OptimizerConfig& c, const std::vector<torch::Tensor>& params) const override {
    return std::make_unique<TorchOptim>(std::make_unique<torch::optim::RMSprop>(
        params, torch::optim::RMSpropOptions(c.lr).alpha(c.alpha).eps(c.eps).weight_decay(c.weight_decay)
                    .momentum(c.momentum).centered(c.centered)));
  }
};

// ---------------------------------------------------------------------------- RMSprop (Keras)
/// Keras 3 (and tf.keras 2's ApplyRMSProp): v = rho v + (1 - rho) g^2; centered: a = rho a +
/// (1 - rho) g, d = v - a^2 + eps, else d = v + eps; increment = lr g / sqrt(d);
/// momentum: m = momentum m + increment, p -= m; else p -= increment. LibTorch has no such
/// optimizer, so the torch engine's is these tensor operations.
class KerasRmsprop final : public TorchOptimizer {
 public:
  KerasRmsprop(const OptimizerConfig& c, std::vector<torch::Tensor> params) : c_(c), params_(std::move(params)) {
    for (const auto& p : params_) {
      v_.push_back(torch::zeros_like(p));
      a_.push_back(c.centered ? torch::zeros_like(p) : torch::Tensor());
      m_.push_back(c.momentum > 0 ? torch::zeros_like(p) : torch::Tensor());
    }
  }
  void zero_grad() override {
    for (auto& p : params_)
      if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
  void set_lr(double lr) override { c_.lr = lr; }
  void step() override {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i];
      if (!p.grad().defined()) continue;
      const auto g = p.grad();
      v_[i] = v_[i] * c_.alpha + (g * g) * (1 - c_.alpha);
      torch::Tensor denom;
      if (c_.centered) {
        a_[i] = a_[i] * c_.alpha + g * (1 - c_.alpha);
        denom = v_[i] - a_[i] * a_[i] + c_.eps;
      } else {
        denom = v_[i] + c_.eps;
      }
      const auto increment = (g * c_.lr) / torch::sqrt(denom);
      if (c_.momentum > 0) {
        m_[i] = m_[i] * c_.momentum + increment;
        p.sub_(m_[i]);
      } else {
        p.sub_(increment);
      }
    }
  }

 private:
  OptimizerConfig c_;
  std::vector<torch::Tensor> params_, v_, a_, m_;
};

class RmspropKerasDef final : public OptimizerDef {
 public:
  int slots(const OptimizerConfig& c) const override { return RmspropSlots::count(c); }
  void update(const OptimizerConfig& c, double lr_d, int64_t, float* p, const float* g, float* const* slot,
              int64_t n) const override {
    const RmspropSlots s(c, slot);
    float *v = s.square, *a = s.mean, *m = s.momentum;
    const float rho = static_cast<float>(c.alpha), one_minus = static_cast<float>(1 - c.alpha);
    const float eps = static_cast<float>(c.eps), lr = static_cast<float>(lr_d), mom = static_cast<float>(c.momentum);
    for (int64_t k = 0; k < n; ++k) {
      v[k] = v[k] * rho + (g[k] * g[k]) * one_minus;
      float denom;
      if (a) {
        a[k] = a[k] * rho + g[k] * one_minus;
        denom = v[k] - a[k] * a[k] + eps;
      } else {
        denom = v[k] + eps;
      }
      const float increment = (g[k] * lr) / std::sqrt(denom);
      if (m) {
        m[k] = m[k] * mom + increment;
        p[k] = p[k] - m[k];
      } else {
        p[k] = p[k] - increment;
      }
    }
  }
  std::unique_ptr<TorchOptimizer> torch(const OptimizerConfig& c, const std::vector<torch::Tensor>& params) const override {
    return std::make_unique<KerasRmsprop>(c, params);
  }
};

}  // namespace

const OptimizerDef& optimizer_kind(OptimizerKind kind) {
  static const SgdDef kSgd;
  static const AdamDef kAdam(/*decoupled=*/false);
  static const AdamDef kAdamW(/*decoupled=*/true);
  static const RmspropDef kRmsprop;
  static const RmspropKerasDef kRmspropKeras;
  switch (kind) {
    case OptimizerKind::kSgd: return kSgd;
    case OptimizerKind::kAdam: return kAdam;
    case OptimizerKind::kAdamW: return kAdamW;
    case OptimizerKind::kRmsprop: return kRmsprop;
    case OptimizerKind::kRmspropKeras: return kRmspropKeras;
  }
  throw std::logic_error("optimizer_kind: unregistered optimizer");
}

const std::vector<OptimizerKind>& all_optimizer_kinds() {
  static const std::vector<OptimizerKind> kAll = {OptimizerKind::kSgd, OptimizerKind::kAdam, OptimizerKind::kAdamW,
                                                  OptimizerKind::kRmsprop, OptimizerKind::kRmspropKeras};
  return kAll;
}

std::unique_ptr<TorchOptimizer> make_optimizer(const OptimizerConfig& c, const std::vector<torch::Tensor>& all) {
  std::vector<torch::Tensor> params;
  for (const auto& p : all)
    if (p.requires_grad()) params.push_back(p);
  if (params.empty()) return nullptr;  // everything frozen: nothing to step
  return optimizer_kind(c.kind).torch(c, params);
}

}  // namespace bnlab
