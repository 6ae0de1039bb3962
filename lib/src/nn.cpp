// BatchNorm with two numerics conventions, the Dense/BatchNorm network, losses and policy.
#include "nn.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>

namespace bnlab {

BatchNormImpl::BatchNormImpl(const BatchNormOptions& options_) : options(options_) { reset(); }

void BatchNormImpl::reset() {
  TORCH_CHECK(options.num_features() > 0, "BatchNorm: num_features must be > 0");
  TORCH_CHECK(options.eps() > 0, "BatchNorm: eps must be > 0");
  TORCH_CHECK(options.momentum() >= 0 && options.momentum() <= 1, "BatchNorm: momentum must be in [0, 1]");
  const int64_t c = options.num_features();
  if (options.affine()) {
    weight = register_parameter("weight", torch::ones({c}));
    bias = register_parameter("bias", torch::zeros({c}));
  }
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
  const bool use_batch_stats = is_training() || !options.track_running_stats();
  if (is_training() && options.track_running_stats() && num_batches_tracked.defined()) {
    torch::NoGradGuard no_grad;
    num_batches_tracked.add_(1);
  }
  if (!use_batch_stats || options.semantics() == BnSemantics::kTorch) {
    namespace F = torch::nn::functional;
    return F::batch_norm(input, running_mean, running_var,
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
  if (options.affine()) out = out * weight + bias;
  if (running_mean.defined()) {
    torch::NoGradGuard no_grad;
    const double m = options.momentum();
    // Keras: moving -= (moving - batch) * (1 - momentum_keras), with 1 - momentum_keras = m.
    running_mean.sub_((running_mean - mean) * m);
    running_var.sub_((running_var - var) * m);
  }
  return out;
}

void BatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << "bnlab::BatchNorm1d(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=" << options.momentum() << ", affine=" << options.affine()
         << ", track_running_stats=" << options.track_running_stats()
         << ", semantics=" << to_string(options.semantics()) << ")";
}

torch::Tensor DropoutImpl::forward(const torch::Tensor& input) {
  if (!is_training() || p == 0) return input;
  TORCH_CHECK(generator != nullptr, "Dropout: no generator");
  const auto mask = torch::empty_like(input).bernoulli_(1 - p, *generator);
  return input * mask / (1 - p);
}

ModelImpl::ModelImpl(const ModelConfig& config, int64_t inputs, int64_t outputs)
    : dropout_generator_(std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(0))),
      inputs_(inputs), outputs_(outputs) {
  TORCH_CHECK(inputs > 0 && outputs > 0, "Model: inputs and outputs must be > 0");
  const auto add = [this](const std::string& kind, torch::nn::AnyModule module) {
    const std::string name = std::to_string(layers_.size());
    register_module(name, module.ptr());
    layers_.push_back(std::move(module));
    info_.push_back({name, kind});
  };
  int64_t width = inputs;
  const auto& bn = config.batchnorm;
  for (int64_t h : config.hidden) {
    add("linear", torch::nn::AnyModule(torch::nn::Linear(width, h)));
    if (bn.enabled) {
      add("batchnorm", torch::nn::AnyModule(BatchNorm(BatchNormOptions(h)
                                                          .eps(bn.eps)
                                                          .momentum(bn.momentum)
                                                          .affine(bn.affine)
                                                          .semantics(bn.semantics))));
    }
    switch (config.activation) {
      case Activation::kRelu: add("relu", torch::nn::AnyModule(torch::nn::ReLU())); break;
      case Activation::kTanh: add("tanh", torch::nn::AnyModule(torch::nn::Tanh())); break;
      case Activation::kGelu: add("gelu", torch::nn::AnyModule(torch::nn::GELU())); break;
    }
    if (config.dropout > 0) {
      Dropout d(config.dropout);
      d->generator = dropout_generator_;
      add("dropout", torch::nn::AnyModule(d));
    }
    width = h;
  }
  add("linear", torch::nn::AnyModule(torch::nn::Linear(width, outputs)));
}

torch::Tensor ModelImpl::forward(torch::Tensor x) {
  for (auto& layer : layers_) x = layer.forward(x);
  return x;
}

torch::Tensor ModelImpl::forward_observed(torch::Tensor x, const LayerObserver& observe) {
  for (size_t i = 0; i < layers_.size(); ++i) {
    auto y = layers_[i].forward(x);
    observe(info_[i], x, y);
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
    if (info_[i].kind == "dropout") layers_[i].get<Dropout>()->generator = dropout_generator_;
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
    if (info_[i].kind == "batchnorm") out.emplace_back(layers_[i].get<BatchNorm>());
  return out;
}

std::vector<int64_t> ModelImpl::batchnorm_positions() const {
  std::vector<int64_t> out;
  int64_t position = 0;
  for (const auto& l : info_) {
    if (l.kind == "batchnorm") out.push_back(position);
    if (l.kind == "batchnorm" || l.kind == "frozen_batchnorm") ++position;
  }
  return out;
}

std::vector<std::string> ModelImpl::batchnorm_names() const {
  std::vector<std::string> out;
  for (const auto& l : info_)
    if (l.kind == "batchnorm") out.push_back(l.name);
  return out;
}

std::vector<torch::nn::Linear> ModelImpl::linears() const {
  std::vector<torch::nn::Linear> out;
  for (size_t i = 0; i < layers_.size(); ++i)
    if (info_[i].kind == "linear") out.emplace_back(layers_[i].get<torch::nn::Linear>());
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

bool layer_selected(const LayerSelection& sel, size_t index, const std::string& name) {
  return sel.all ||
         std::find(sel.indices.begin(), sel.indices.end(), static_cast<int64_t>(index)) != sel.indices.end() ||
         std::find(sel.names.begin(), sel.names.end(), name) != sel.names.end();
}

void ModelImpl::freeze_batchnorm_modules(const LayerSelection& selection) {
  size_t bn_index = 0;
  for (size_t i = 0; i < layers_.size(); ++i) {
    if (info_[i].kind != "batchnorm") continue;
    if (layer_selected(selection, bn_index++, info_[i].name)) {
      auto frozen = to_frozen(*layers_[i].get<BatchNorm>());
      replace_module(info_[i].name, frozen.ptr());
      layers_[i] = torch::nn::AnyModule(frozen);
      info_[i].kind = "frozen_batchnorm";
    }
  }
}

Model fold_batchnorm(const ModelImpl& model, const ModelConfig& config) {
  ModelConfig plain = config;
  plain.batchnorm.enabled = false;
  Model folded(plain, model.inputs(), model.outputs());
  folded->share_dropout_generator(model);
  const auto src = model.linears();
  const auto bns = model.batchnorms();
  const auto dst = folded->linears();
  TORCH_CHECK(src.size() == dst.size() && bns.size() + 1 == src.size(), "fold: expected one BatchNorm per hidden Linear");
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < src.size(); ++i) {
    auto w = src[i]->weight.to(torch::kDouble), b = src[i]->bias.to(torch::kDouble);
    if (i < bns.size()) {
      const auto& bn = *bns[i];
      const auto gamma = bn.weight.defined() ? bn.weight.to(torch::kDouble) : torch::ones_like(b);
      const auto beta = bn.bias.defined() ? bn.bias.to(torch::kDouble) : torch::zeros_like(b);
      const auto scale = gamma / torch::sqrt(bn.running_var.to(torch::kDouble) + bn.options.eps());
      w = w * scale.unsqueeze(1);
      b = (b - bn.running_mean.to(torch::kDouble)) * scale + beta;
    }
    dst[i]->weight.copy_(w.to(torch::kFloat));
    dst[i]->bias.copy_(b.to(torch::kFloat));
  }
  return folded;
}

void Policy::apply(ModelImpl& model) const {
  auto bns = model.batchnorms();
  const auto names = model.batchnorm_names();
  const auto positions = model.batchnorm_positions();
  for (size_t i = 0; i < bns.size(); ++i) {
    const bool selected = layer_selected(strategy.layers, static_cast<size_t>(positions[i]), names[i]);
    auto& bn = *bns[i];
    // Unselected layers are put back to the model's defaults, so applying is idempotent
    // whatever state a previous policy left.
    bn.options.momentum(selected && strategy.momentum ? *strategy.momentum : base_momentum);
    bn.options.track_running_stats(selected ? strategy.track_running_stats : true);
    const bool affine_grad = !selected || strategy.affine_trainable;
    if (bn.weight.defined()) bn.weight.requires_grad_(affine_grad);
    if (bn.bias.defined()) bn.bias.requires_grad_(affine_grad);
    if (selected && strategy.bn_mode == BnMode::kEval) bn.eval();
    else bn.train(model.is_training());
  }
  auto lins = model.linears();
  for (size_t i = 0; i < lins.size(); ++i) {
    const bool trainable = static_cast<int64_t>(i) >= strategy.freeze_linear;
    lins[i]->weight.requires_grad_(trainable);
    if (lins[i]->bias.defined()) lins[i]->bias.requires_grad_(trainable);
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

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerConfig& c,
                                                        const std::vector<torch::Tensor>& all) {
  std::vector<torch::Tensor> params;
  for (const auto& p : all)
    if (p.requires_grad()) params.push_back(p);
  if (params.empty()) return nullptr;  // everything frozen: nothing to step
  switch (c.kind) {
    case OptimizerKind::kSgd:
      return std::make_unique<torch::optim::SGD>(
          params, torch::optim::SGDOptions(c.lr).momentum(c.momentum).nesterov(c.nesterov).weight_decay(c.weight_decay));
    case OptimizerKind::kAdam:
      return std::make_unique<torch::optim::Adam>(
          params, torch::optim::AdamOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(c.weight_decay));
    case OptimizerKind::kAdamW:
      return std::make_unique<torch::optim::AdamW>(
          params, torch::optim::AdamWOptions(c.lr).betas({c.beta1, c.beta2}).eps(c.eps).weight_decay(c.weight_decay));
  }
  return nullptr;
}

std::vector<std::pair<std::string, torch::Tensor>> state_dict(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

}  // namespace bnlab
