// BatchNorm with two numerics conventions, the Dense/BatchNorm network, losses and policy.
#include "nn.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

#include "bnlab/errors.hpp"
#include "layer_kinds.hpp"

namespace bnlab {

BatchNormImpl::BatchNormImpl(const BatchNormOptions& options_) : options(options_) { reset(); }

void BatchNormImpl::reset() {
  TORCH_CHECK(options.num_features() > 0, "BatchNorm: num_features must be > 0");
  TORCH_CHECK(options.eps() > 0, "BatchNorm: eps must be > 0");
  TORCH_CHECK(options.momentum() >= 0 && options.momentum() <= 1, "BatchNorm: momentum must be in [0, 1]");
  const int64_t c = options.num_features();
  if (options.scale()) weight = register_parameter("weight", torch::ones({c}));
  if (options.center()) bias = register_parameter("bias", torch::zeros({c}));
  if (options.track_running_stats()) {
    running_mean = register_buffer("running_mean", torch::zeros({c}));
    running_var = register_buffer("running_var", torch::ones({c}));
    num_batches_tracked = register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
  }
}

FrozenBatchNormImpl::FrozenBatchNormImpl(int64_t num_features_, double eps_)
    : num_features(num_features_), eps(eps_) {
  reset();
}

void FrozenBatchNormImpl::reset() {
  TORCH_CHECK(num_features > 0 && eps > 0, "FrozenBatchNorm: num_features and eps must be > 0");
  weight = register_buffer("weight", torch::ones({num_features}));
  bias = register_buffer("bias", torch::zeros({num_features}));
  running_mean = register_buffer("running_mean", torch::zeros({num_features}));
  running_var = register_buffer("running_var", torch::ones({num_features}));
}

torch::Tensor FrozenBatchNormImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.size(1) == num_features,
              "FrozenBatchNorm: expected input [N, ", num_features, "], got ", input.sizes());
  const auto scale = weight * torch::rsqrt(running_var + eps);
  const auto shift = bias - running_mean * scale;
  return input * scale + shift;
}

void FrozenBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "bnlab::FrozenBatchNorm1d(" << num_features << ", eps=" << eps << ")";
}

BatchRenormImpl::BatchRenormImpl(const LayerSpec& spec_) : spec(spec_), momentum(spec_.momentum) { reset(); }

void BatchRenormImpl::reset() {
  TORCH_CHECK(spec.out > 0 && spec.eps > 0, "BatchRenorm: num_features and eps must be > 0");
  const int64_t c = spec.out;
  if (spec.scale) weight = register_parameter("weight", torch::ones({c}));
  if (spec.center) bias = register_parameter("bias", torch::zeros({c}));
  running_mean = register_buffer("running_mean", torch::zeros({c}));
  running_var = register_buffer("running_var", torch::ones({c}));
  num_batches_tracked = register_buffer("num_batches_tracked", torch::zeros({}, torch::kLong));
  renorm_mean = register_buffer("renorm_mean", torch::zeros({c}));
  renorm_stddev = register_buffer("renorm_stddev", torch::ones({c}));
  moving_stddev = register_buffer("moving_stddev", torch::ones({c}));
}

torch::Tensor BatchRenormImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.size(1) == spec.out, "BatchRenorm: expected input [N, ", spec.out, "], got ",
              input.sizes());
  if (!is_training()) {
    namespace F = torch::nn::functional;
    return F::batch_norm(input, running_mean, running_var,
                         F::BatchNormFuncOptions().weight(weight).bias(bias).training(false).eps(spec.eps));
  }
  auto [mean, var] = batch_moments(input);
  torch::Tensor r, d, stddev;
  {
    torch::NoGradGuard no_grad;
    stddev = torch::sqrt(var.detach() + spec.eps);
    const auto floor = torch::sqrt(torch::scalar_tensor(spec.eps, torch::kFloat));
    const auto s = torch::maximum(renorm_stddev, floor);
    r = stddev / s;
    d = (mean.detach() - renorm_mean) / s;
    if (spec.renorm_has_rmin) r = torch::clamp_min(r, static_cast<float>(spec.renorm_rmin));
    if (spec.renorm_has_rmax) r = torch::clamp_max(r, static_cast<float>(spec.renorm_rmax));
    if (spec.renorm_has_dmax) d = torch::clamp(d, -static_cast<float>(spec.renorm_dmax), static_cast<float>(spec.renorm_dmax));
  }
  const auto eff_gamma = weight.defined() ? r * weight : r;
  auto eff_beta = weight.defined() ? d * weight : d;
  if (bias.defined()) eff_beta = eff_beta + bias;
  auto out = (input - mean) * (torch::rsqrt(var + spec.eps) * eff_gamma) + eff_beta;
  {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
    const auto mixed = [](const torch::Tensor& old, const torch::Tensor& now, double m) {
      const double k = 1.0 - m;  // Keras' momentum
      return old * static_cast<double>(static_cast<float>(k)) + now * static_cast<double>(static_cast<float>(1.0 - k));
    };
    const auto m = mean.detach();
    renorm_mean.copy_(mixed(renorm_mean, m, spec.renorm_momentum));
    renorm_stddev.copy_(mixed(renorm_stddev, stddev, spec.renorm_momentum));
    running_mean.copy_(mixed(running_mean, m, momentum));
    moving_stddev.copy_(mixed(moving_stddev, stddev, momentum));
    running_var.copy_(torch::relu(moving_stddev * moving_stddev - spec.eps));
  }
  return out;
}

void BatchRenormImpl::pretty_print(std::ostream& stream) const {
  stream << "bnlab::BatchRenorm1d(" << spec.out << ", eps=" << spec.eps << ", momentum=" << momentum
         << ", renorm_momentum=" << spec.renorm_momentum << ")";
}

BatchRenorm to_renorm(const BatchNormImpl& bn, const LayerSpec& spec, bool keras_init) {
  BatchRenorm r(spec);
  torch::NoGradGuard no_grad;
  if (bn.weight.defined()) r->weight.copy_(bn.weight);
  if (bn.bias.defined()) r->bias.copy_(bn.bias);
  r->running_mean.copy_(bn.running_mean);
  r->running_var.copy_(bn.running_var);
  r->num_batches_tracked.copy_(bn.num_batches_tracked);
  if (!keras_init) {
    const auto stddev = torch::sqrt(bn.running_var + spec.eps);
    r->renorm_mean.copy_(bn.running_mean);
    r->renorm_stddev.copy_(stddev);
    r->moving_stddev.copy_(stddev);
  }
  return r;
}

FrozenBatchNorm to_frozen(const BatchNormImpl& bn) {
  FrozenBatchNorm f(bn.options.num_features(), bn.options.eps());
  torch::NoGradGuard no_grad;
  if (bn.weight.defined()) f->weight.copy_(bn.weight);
  if (bn.bias.defined()) f->bias.copy_(bn.bias);
  if (bn.running_mean.defined()) f->running_mean.copy_(bn.running_mean);
  if (bn.running_var.defined()) f->running_var.copy_(bn.running_var);
  return f;
}

BatchNorm from_frozen(const FrozenBatchNormImpl& frozen, BatchNormOptions options) {
  options.num_features(frozen.num_features).eps(frozen.eps).track_running_stats(true);
  BatchNorm bn(options);
  torch::NoGradGuard no_grad;
  if (bn->weight.defined()) bn->weight.copy_(frozen.weight);
  if (bn->bias.defined()) bn->bias.copy_(frozen.bias);
  bn->running_mean.copy_(frozen.running_mean);
  bn->running_var.copy_(frozen.running_var);
  return bn;
}

std::pair<torch::Tensor, torch::Tensor> batch_moments(const torch::Tensor& x) {
  auto mean = x.mean(0);
  auto var = (x - mean).square().mean(0);  // biased: divide by n
  return {mean, var};
}

torch::Tensor BatchNormImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.dim() == 2 && input.size(1) == options.num_features(),
              "BatchNorm: expected input [N, ", options.num_features(), "], got ", input.sizes());
  // LibTorch's rule: batch statistics whenever training OR not tracking running stats;
  // the buffers that exist are updated then, but the counter only while tracking.
  // Python's rule (python_rule) differs only for an untracked module: batch statistics in
  // training alone, and the buffers are not handed to the kernel then.
  const bool python_untracked = options.python_rule() && !options.track_running_stats();
  const bool use_batch_stats = is_training() || (!options.track_running_stats() && !python_untracked);
  const bool prior = is_training() && options.prior() >= 0;
  if (is_training() && options.track_running_stats() && num_batches_tracked.defined() && !prior) {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  if (prior) return prior_forward(input);
  if (!use_batch_stats || options.semantics() == BnSemantics::kTorch) {
    namespace F = torch::nn::functional;
    const bool pass_buffers = !(use_batch_stats && python_untracked);
    return F::batch_norm(input, pass_buffers ? running_mean : torch::Tensor(), pass_buffers ? running_var : torch::Tensor(),
                         F::BatchNormFuncOptions()
                             .weight(weight)
                             .bias(bias)
                             .training(use_batch_stats)
                             .momentum(options.momentum())
                             .eps(options.eps()));
  }
  // Keras numerics: normalise with the biased batch variance, store it biased too. With
  // one sample x - mean is exactly 0, so the output is exactly beta and nothing is NaN.
  auto [mean, var] = batch_moments(input);
  auto out = (input - mean) * torch::rsqrt(var + options.eps());
  if (weight.defined() && bias.defined()) out = out * weight + bias;
  else if (weight.defined()) out = out * weight;
  else if (bias.defined()) out = out + bias;
  if (running_mean.defined() && !python_untracked) {
    torch::NoGradGuard no_grad;
    const double m = options.momentum();
    // Keras: moving -= (moving - batch) * (1 - momentum_keras), with 1 - momentum_keras = m.
    running_mean.sub_((running_mean - mean) * m);
    running_var.sub_((running_var - var) * m);
  }
  return out;
}

torch::Tensor BatchNormImpl::prior_forward(const torch::Tensor& input) {
  // Schneider et al. (2020), as bethgelab/robusta's BayesianBatchNorm computes it: the batch
  // statistics come from a buffer there, so they are constants in the gradient here too.
  torch::Tensor mean, var;
  {
    torch::NoGradGuard no_grad;
    auto [bm, bv] = batch_moments(input.detach());
    if (options.semantics() == BnSemantics::kTorch) {
      const int64_t n = input.size(0);
      bv = bv * static_cast<double>(static_cast<float>(n) / static_cast<float>(n - 1));
    }
    const double p = static_cast<float>(options.prior()), q = static_cast<float>(1.0 - options.prior());
    mean = running_mean * p + bm * q;
    var = running_var * p + bv * q;
  }
  auto out = (input - mean) * torch::rsqrt(var + options.eps());
  if (weight.defined()) out = out * weight;
  if (bias.defined()) out = out + bias;
  return out;
}

void BatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "bnlab::BatchNorm1d(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=" << options.momentum() << ", scale=" << options.scale() << ", center=" << options.center()
         << ", track_running_stats=" << options.track_running_stats()
         << ", semantics=" << to_string(options.semantics()) << ")";
}

torch::Tensor DropoutImpl::forward(const torch::Tensor& input) {
  if (!is_training() || p == 0) return input;
  TORCH_CHECK(generator != nullptr, "Dropout: no generator");
  const auto mask = torch::empty_like(input).bernoulli_(1 - p, *generator);
  return input * mask / (1 - p);
}

torch::Tensor ActivationModuleImpl::forward(const torch::Tensor& input) { return activation_torch(activation, alpha, input); }

void ActivationModuleImpl::pretty_print(std::ostream& stream) const {
  stream << "bnlab::Activation(" << activation_name(activation);
  if (activation == Activation::kLeakyRelu || activation == Activation::kElu) stream << ", " << alpha;
  stream << ")";
}

ModelImpl::ModelImpl(std::vector<LayerSpec> layers)
    : spec_(std::move(layers)),
      dropout_generator_(std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(0))) {
  TORCH_CHECK(!spec_.empty() && spec_.front().in > 0 && spec_.back().out > 0, "Model: the layers must be sized");
  for (size_t i = 0; i < spec_.size(); ++i) {
    TORCH_CHECK(spec_[i].name == std::to_string(i), "Model: layer ", i, " is named \"", spec_[i].name, "\"");
    auto module = layer_kind(spec_[i].kind).module(spec_[i], dropout_generator_);
    register_module(spec_[i].name, module.ptr());
    layers_.push_back(std::move(module));
  }
}

torch::Tensor ModelImpl::forward(torch::Tensor x) {
  for (auto& layer : layers_) x = layer.forward(x);
  return x;
}

torch::Tensor ModelImpl::forward_observed(torch::Tensor x, const LayerObserver& observe) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    auto y = layers_[i].forward(x);
    observe(spec_[i], x, y);
    x = std::move(y);
  }
  return x;
}

void ModelImpl::set_dropout_seed(uint64_t seed) {
  *dropout_generator_ = at::make_generator<at::CPUGeneratorImpl>(seed);
}

void ModelImpl::share_dropout_generator(const ModelImpl& other) {
  dropout_generator_ = other.dropout_generator_;
  for (size_t i = 0; i < layers_.size(); ++i)
    if (spec_[i].kind == LayerKind::kDropout) layers_[i].get<Dropout>()->generator = dropout_generator_;
}

void ModelImpl::train(bool on) {
  torch::nn::Module::train(on);
  if (policy_) policy_->apply(*this);
}

void ModelImpl::set_policy(std::optional<Policy> policy) {
  policy_ = std::move(policy);
  if (policy_) policy_->apply(*this);
}

std::vector<BatchNorm> ModelImpl::batchnorms() const {
  std::vector<BatchNorm> out;
  for (size_t i = 0; i < layers_.size(); ++i)
    if (spec_[i].kind == LayerKind::kBatchNorm) out.emplace_back(layers_[i].get<BatchNorm>());
  return out;
}

std::vector<LayerSpec> ModelImpl::batchnorm_specs() const {
  std::vector<LayerSpec> out;
  for (const auto& l : spec_)
    if (l.kind == LayerKind::kBatchNorm) out.push_back(l);
  return out;
}

std::vector<torch::nn::Linear> ModelImpl::linears() const {
  std::vector<torch::nn::Linear> out;
  for (size_t i = 0; i < layers_.size(); ++i)
    if (spec_[i].kind == LayerKind::kDense) out.emplace_back(layers_[i].get<torch::nn::Linear>());
  return out;
}

void ModelImpl::copy_state_from(const ModelImpl& other) {
  torch::NoGradGuard no_grad;
  const auto src = state_dict(other);
  auto dst = state_dict(*this);
  TORCH_CHECK(src.size() == dst.size(), "copy_state_from: architectures differ");
  for (size_t i = 0; i < src.size(); ++i) {
    TORCH_CHECK(src[i].first == dst[i].first && src[i].second.sizes() == dst[i].second.sizes(),
                "copy_state_from: ", dst[i].first, " does not match ", src[i].first);
    dst[i].second.copy_(src[i].second);
  }
}

void ModelImpl::freeze_batchnorm_modules(const LayerSelection& selection) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (spec_[i].kind != LayerKind::kBatchNorm || !layer_selected(selection, spec_[i])) continue;
    auto frozen = to_frozen(*layers_[i].get<BatchNorm>());
    replace_module(spec_[i].name, frozen.ptr());
    layers_[i] = torch::nn::AnyModule(frozen);
    spec_[i].kind = LayerKind::kFrozenBatchNorm;
  }
}

void ModelImpl::renorm_batchnorm_modules(const StrategyConfig& strategy) {
  const auto prepared = prepared_layers(spec_, strategy);
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (spec_[i].kind != LayerKind::kBatchNorm || prepared[i].kind != LayerKind::kBatchRenorm) continue;
    auto renorm = to_renorm(*layers_[i].get<BatchNorm>(), prepared[i], strategy.renorm_init == "keras");
    replace_module(spec_[i].name, renorm.ptr());
    layers_[i] = torch::nn::AnyModule(renorm);
    spec_[i] = prepared[i];
  }
}

Model fold_batchnorm(const ModelImpl& model) {
  const auto& src = model.layers();
  std::string error;
  const auto plan = fold_plan(src, &error);
  if (!error.empty()) throw InputError("fold: " + error);
  StrategyConfig fold;
  fold.fold = true;
  Model folded(sized_layers(prepared_layers(src, fold), model.inputs(), model.outputs()));
  folded->share_dropout_generator(model);
  // Every Linear's weight and bias in double, updated by each fold step in plan order.
  std::vector<torch::Tensor> w(src.size()), b(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i].kind != LayerKind::kDense) continue;
    const auto& lin = *std::dynamic_pointer_cast<torch::nn::LinearImpl>(model.module_at(i));
    w[i] = lin.weight.detach().to(torch::kDouble);
    b[i] = lin.bias.defined() ? lin.bias.detach().to(torch::kDouble) : torch::zeros({src[i].out}, torch::kDouble);
  }
  torch::NoGradGuard no_grad;
  for (const auto& step : plan) {
    const auto& bn = *std::dynamic_pointer_cast<BatchNormImpl>(model.module_at(step.bn));
    const int64_t c = src[step.bn].out;
    const auto gamma = bn.weight.defined() ? bn.weight.to(torch::kDouble) : torch::ones({c}, torch::kDouble);
    const auto beta = bn.bias.defined() ? bn.bias.to(torch::kDouble) : torch::zeros({c}, torch::kDouble);
    const auto scale = gamma / torch::sqrt(bn.running_var.to(torch::kDouble) + bn.options.eps());
    const auto mean = bn.running_mean.to(torch::kDouble);
    auto& W = w[step.linear];
    auto& B = b[step.linear];
    if (step.into_next) {
      B = B + torch::mv(W, beta - mean * scale);
      W = W * scale.unsqueeze(0);
    } else {
      W = W * scale.unsqueeze(1);
      B = (B - mean) * scale + beta;
    }
  }
  // Copy into the folded model: its layers are the source's minus the BatchNorms, in order.
  size_t j = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i].kind == LayerKind::kBatchNorm) continue;
    if (src[i].kind == LayerKind::kDense) {
      auto& lin = *std::dynamic_pointer_cast<torch::nn::LinearImpl>(folded->module_at(j));
      lin.weight.copy_(w[i].to(torch::kFloat));
      lin.bias.copy_(b[i].to(torch::kFloat));
    }
    ++j;
  }
  return folded;
}

void Policy::apply(ModelImpl& model) const {
  const auto& layers = model.layers();
  const auto modes = resolve_modes(layers, &strategy);
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerMode& m = modes[i];
    switch (layers[i].kind) {
      case LayerKind::kDense: {
        auto& lin = *std::dynamic_pointer_cast<torch::nn::LinearImpl>(model.module_at(i));
        lin.weight.requires_grad_(m.trainable);
        if (lin.bias.defined()) lin.bias.requires_grad_(m.trainable);
        break;
      }
      case LayerKind::kBatchNorm: {
        // Every field is set from the resolution, unselected layers back to the model's
        // defaults, so applying is idempotent whatever state a previous policy left.
        auto& bn = *std::dynamic_pointer_cast<BatchNormImpl>(model.module_at(i));
        bn.options.momentum(m.momentum);
        bn.options.track_running_stats(m.track_running_stats);
        bn.options.python_rule(m.selected && strategy.tracking_rule == TrackingRule::kPython);
        bn.options.prior(m.prior);
        if (bn.weight.defined()) bn.weight.requires_grad_(m.trainable);
        if (bn.bias.defined()) bn.bias.requires_grad_(m.trainable);
        if (m.eval_mode) bn.eval();
        else bn.train(model.is_training());
        break;
      }
      case LayerKind::kBatchRenorm: {
        auto& bn = *std::dynamic_pointer_cast<BatchRenormImpl>(model.module_at(i));
        bn.momentum = m.momentum;
        if (bn.weight.defined()) bn.weight.requires_grad_(m.trainable);
        if (bn.bias.defined()) bn.bias.requires_grad_(m.trainable);
        bn.train(model.is_training());
        break;
      }
      case LayerKind::kFrozenBatchNorm:  // buffers only: nothing to train, the same in both modes
      case LayerKind::kActivation:
      case LayerKind::kDropout:
        break;
    }
  }
}

int64_t head_width(LossKind loss, int64_t targets, int64_t classes) {
  switch (loss) {
    case LossKind::kGaussianNll: return 2 * targets;
    case LossKind::kMse: return targets;
    case LossKind::kCrossEntropy: return classes;
  }
  return targets;
}

namespace {
torch::Tensor class_labels(const torch::Tensor& y) {
  return (y.dim() == 2 ? y.select(1, 0) : y).to(torch::kLong);
}
}  // namespace

torch::Tensor compute_loss(LossKind loss, const torch::Tensor& out, const torch::Tensor& y) {
  switch (loss) {
    case LossKind::kGaussianNll: {
      const int64_t t = out.size(1) / 2;
      const auto mean = out.narrow(1, 0, t);
      const auto log_var = out.narrow(1, t, t);
      static const double kLog2Pi = std::log(2.0 * M_PI);
      return (0.5 * (log_var + (y - mean).square() / torch::exp(log_var) + kLog2Pi)).mean();
    }
    case LossKind::kMse:
      return (out - y).square().mean();
    case LossKind::kCrossEntropy:
      return torch::nn::functional::cross_entropy(out, class_labels(y));
  }
  TORCH_CHECK(false, "unknown loss");
}

double accuracy(const torch::Tensor& out, const torch::Tensor& y) {
  return out.argmax(1).eq(class_labels(y)).to(torch::kDouble).mean().item<double>();
}

std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

}  // namespace bnlab
