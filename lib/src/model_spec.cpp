// The resolved network description and what a strategy does to each of its layers: the one
// place that knows layer order, names, folding and per-layer modes (torch-free, no JSON).
#include <algorithm>
#include <cstdio>
#include <stdexcept>

#include "bnlab/config.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

struct ActivationEntry {
  Activation value;
  const char* name;
};

// Documentation order; names as Keras spells them (PyTorch's modules: ReLU, Tanh, GELU, Sigmoid,
// ELU, LeakyReLU, SiLU, Softplus, Identity).
const ActivationEntry kActivationNames[] = {
    {Activation::kRelu, "relu"},         {Activation::kTanh, "tanh"},   {Activation::kGelu, "gelu"},
    {Activation::kSigmoid, "sigmoid"},   {Activation::kElu, "elu"},     {Activation::kLeakyRelu, "leaky_relu"},
    {Activation::kSilu, "silu"},         {Activation::kSoftplus, "softplus"}, {Activation::kLinear, "linear"},
};

bool is_bn(const LayerSpec& l) {
  return l.kind == LayerKind::kBatchNorm || l.kind == LayerKind::kFrozenBatchNorm || l.kind == LayerKind::kBatchRenorm;
}

std::string num(double v) { return fmt_double(v); }

}  // namespace

const char* activation_name(Activation a) {
  for (const auto& e : kActivationNames)
    if (e.value == a) return e.name;
  throw std::logic_error("activation_name: unregistered activation");
}

bool activation_from_name(const std::string& name, Activation& out) {
  for (const auto& e : kActivationNames)
    if (name == e.name) {
      out = e.value;
      return true;
    }
  return false;
}

const std::vector<Activation>& all_activations() {
  static const std::vector<Activation> kAll = [] {
    std::vector<Activation> v;
    for (const auto& e : kActivationNames) v.push_back(e.value);
    return v;
  }();
  return kAll;
}

const char* layer_kind_name(LayerKind k) {
  switch (k) {
    case LayerKind::kDense: return "dense";
    case LayerKind::kBatchNorm: return "batchnorm";
    case LayerKind::kFrozenBatchNorm: return "frozen_batchnorm";
    case LayerKind::kBatchRenorm: return "batch_renorm";
    case LayerKind::kActivation: return "activation";
    case LayerKind::kDropout: return "dropout";
  }
  throw std::logic_error("layer_kind_name: unknown kind");
}

int64_t count_kind(const std::vector<LayerSpec>& layers, LayerKind kind) {
  return static_cast<int64_t>(std::count_if(layers.begin(), layers.end(), [&](const LayerSpec& l) { return l.kind == kind; }));
}

void name_layers(std::vector<LayerSpec>& layers) {
  int64_t bn = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    layers[i].name = std::to_string(i);
    layers[i].bn_index = is_bn(layers[i]) ? bn++ : -1;
  }
}

std::vector<LayerSpec> sized_layers(std::vector<LayerSpec> layers, int64_t inputs, int64_t outputs) {
  if (layers.empty() || layers.back().kind != LayerKind::kDense || !layers.back().head)
    throw std::invalid_argument("sized_layers: the layer list has no output head");
  int64_t width = inputs;
  for (auto& l : layers) {
    l.in = width;
    if (l.kind == LayerKind::kDense) {
      if (l.head) l.units = outputs;
      l.out = l.units;
    } else {
      l.out = width;
    }
    width = l.out;
  }
  return layers;
}

std::vector<LayerSpec> shorthand_layers(const std::vector<int64_t>& hidden, Activation activation, double dropout,
                                        bool batchnorm, const BatchNormConfig& bn, double alpha) {
  std::vector<LayerSpec> layers;
  for (int64_t h : hidden) {
    LayerSpec d;
    d.kind = LayerKind::kDense;
    d.units = h;
    layers.push_back(d);
    if (batchnorm) {
      LayerSpec b;
      b.kind = LayerKind::kBatchNorm;
      b.eps = bn.eps;
      b.momentum = bn.momentum;
      b.scale = b.center = bn.affine;
      b.semantics = bn.semantics;
      layers.push_back(b);
    }
    LayerSpec a;
    a.kind = LayerKind::kActivation;
    a.activation = activation;
    a.alpha = alpha;
    layers.push_back(a);
    if (dropout > 0) {
      LayerSpec p;
      p.kind = LayerKind::kDropout;
      p.rate = dropout;
      layers.push_back(p);
    }
  }
  LayerSpec head;
  head.kind = LayerKind::kDense;
  head.head = true;
  layers.push_back(head);
  name_layers(layers);
  return layers;
}

std::vector<FoldStep> fold_plan(const std::vector<LayerSpec>& layers, std::string* error) {
  std::vector<FoldStep> backward, forward;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (layers[i].kind != LayerKind::kBatchNorm) continue;
    // Consecutive BatchNorms fold one after another into the same Linear.
    size_t j = i;
    while (j > 0 && layers[j - 1].kind == LayerKind::kBatchNorm) --j;
    if (j > 0 && layers[j - 1].kind == LayerKind::kDense) {
      backward.push_back({i, j - 1, false});
      continue;
    }
    size_t k = i + 1;
    while (k < layers.size() && layers[k].kind == LayerKind::kBatchNorm) ++k;
    if (k < layers.size() && layers[k].kind == LayerKind::kDense) {
      forward.push_back({i, k, true});
      continue;
    }
    if (error != nullptr) {
      const LayerKind prev = i == 0 ? LayerKind::kBatchNorm : layers[i - 1].kind;
      const std::string before = i == 0                             ? "the inputs"
                                 : prev == LayerKind::kActivation ? std::string("an activation")
                                 : prev == LayerKind::kDropout    ? std::string("a Dropout")
                                                                  : std::string("a ") + layer_kind_name(prev);
      *error = "BatchNorm \"" + layers[i].name + "\" (after " + before +
               ") has no Linear directly before or after it to fold into; an activation or Dropout in between "
               "cannot be folded through";
    }
    return {};
  }
  // Folds into the Linear after are applied from the nearest BatchNorm outwards.
  std::reverse(forward.begin(), forward.end());
  backward.insert(backward.end(), forward.begin(), forward.end());
  if (error != nullptr) error->clear();
  return backward;
}

std::string pytorch_expression(const std::vector<LayerSpec>& sized) {
  std::vector<std::string> parts;
  for (const auto& l : sized) {
    switch (l.kind) {
      case LayerKind::kDense:
        parts.push_back("torch.nn.Linear(" + std::to_string(l.in) + ", " + std::to_string(l.out) +
                        (l.use_bias ? "" : ", bias=False") + ")");
        break;
      case LayerKind::kBatchRenorm: return "";  // torch.nn has no batch renormalization
      case LayerKind::kBatchNorm:
      case LayerKind::kFrozenBatchNorm:
        if (l.scale != l.center) return "";  // PyTorch's BatchNorm1d has gamma and beta together or neither
        parts.push_back("torch.nn.BatchNorm1d(" + std::to_string(l.out) + ", eps=" + num(l.eps) +
                        ", momentum=" + num(l.momentum) + (l.scale ? "" : ", affine=False") + ")");
        break;
      case LayerKind::kActivation:
        switch (l.activation) {
          case Activation::kLinear: parts.push_back("torch.nn.Identity()"); break;
          case Activation::kRelu: parts.push_back("torch.nn.ReLU()"); break;
          case Activation::kTanh: parts.push_back("torch.nn.Tanh()"); break;
          case Activation::kGelu: parts.push_back("torch.nn.GELU()"); break;
          case Activation::kSigmoid: parts.push_back("torch.nn.Sigmoid()"); break;
          case Activation::kElu: parts.push_back("torch.nn.ELU(alpha=" + num(l.alpha) + ")"); break;
          case Activation::kLeakyRelu: parts.push_back("torch.nn.LeakyReLU(negative_slope=" + num(l.alpha) + ")"); break;
          case Activation::kSilu: parts.push_back("torch.nn.SiLU()"); break;
          case Activation::kSoftplus: parts.push_back("torch.nn.Softplus()"); break;
        }
        break;
      case LayerKind::kDropout: parts.push_back("torch.nn.Dropout(p=" + num(l.rate) + ")"); break;
    }
  }
  return "torch.nn.Sequential(" + join(parts, ", ") + ")";
}

bool layer_selected(const LayerSelection& sel, const LayerSpec& l) {
  return sel.all || std::find(sel.indices.begin(), sel.indices.end(), l.bn_index) != sel.indices.end() ||
         std::find(sel.names.begin(), sel.names.end(), l.name) != sel.names.end();
}

std::vector<LayerSpec> prepared_layers(const std::vector<LayerSpec>& layers, const StrategyConfig& s) {
  std::vector<LayerSpec> out = layers;
  if (s.fold) {
    std::string error;
    const auto plan = fold_plan(layers, &error);
    if (!error.empty()) throw std::invalid_argument("fold: " + error);
    for (const auto& step : plan) out[step.linear].use_bias = true;  // the folded shift needs a bias
    out.erase(std::remove_if(out.begin(), out.end(), [](const LayerSpec& l) { return l.kind == LayerKind::kBatchNorm; }),
              out.end());
    name_layers(out);
    return out;
  }
  if (s.bn_module == BnModule::kFrozen)
    for (auto& l : out)
      if (l.kind == LayerKind::kBatchNorm && layer_selected(s.layers, l)) l.kind = LayerKind::kFrozenBatchNorm;
  if (s.renorm)
    for (auto& l : out) {
      if (l.kind != LayerKind::kBatchNorm || !layer_selected(s.layers, l)) continue;
      l.kind = LayerKind::kBatchRenorm;
      l.renorm_has_rmax = s.renorm_rmax.has_value();
      l.renorm_has_rmin = s.renorm_rmin.has_value();
      l.renorm_has_dmax = s.renorm_dmax.has_value();
      l.renorm_rmax = s.renorm_rmax.value_or(0);
      l.renorm_rmin = s.renorm_rmin.value_or(0);
      l.renorm_dmax = s.renorm_dmax.value_or(0);
      l.renorm_momentum = s.renorm_momentum.value_or(s.momentum.value_or(l.momentum));
    }
  return out;
}

std::vector<LayerMode> resolve_modes(const std::vector<LayerSpec>& prepared, const StrategyConfig* s) {
  std::vector<LayerMode> modes(prepared.size());
  int64_t dense = 0;
  for (size_t i = 0; i < prepared.size(); ++i) {
    const LayerSpec& l = prepared[i];
    LayerMode& m = modes[i];
    switch (l.kind) {
      case LayerKind::kDense:
        m.trainable = s == nullptr || dense >= s->freeze_linear;
        ++dense;
        break;
      case LayerKind::kBatchNorm: {
        // Unselected layers keep the model's defaults: they follow train mode, use their own
        // momentum and track running statistics.
        m.selected = s != nullptr && layer_selected(s->layers, l);
        const double prior = m.selected && s->prior ? *s->prior : -1;
        // prior_bn with p = 1 is the eval computation, and runs as it.
        m.eval_mode = m.selected && (s->bn_mode == BnMode::kEval || prior == 1);
        m.track_running_stats = m.selected ? s->track_running_stats : true;
        m.momentum = m.selected && s->momentum ? *s->momentum : l.momentum;
        m.trainable = (l.scale || l.center) && (!m.selected || s->affine_trainable);
        // Python's rule for an untracked module with buffers: batch statistics only in training,
        // and then neither an update nor a count (the buffers are not passed to the kernel).
        const bool python_untracked = m.selected && !m.track_running_stats && s->tracking_rule == TrackingRule::kPython;
        m.fit_batch_stats = !m.eval_mode || (!m.track_running_stats && !python_untracked);
        m.infer_batch_stats = !m.track_running_stats && !python_untracked;
        m.counts = !m.eval_mode && m.track_running_stats && prior < 0;
        m.updates = m.fit_batch_stats && !python_untracked && prior < 0;
        m.prior = m.fit_batch_stats && prior >= 0 ? prior : -1;
        break;
      }
      case LayerKind::kFrozenBatchNorm:
        m.selected = s != nullptr && layer_selected(s->layers, l);
        break;
      case LayerKind::kBatchRenorm:
        // Only a renorm strategy makes one, on the layers it selects (validation refuses eval).
        m.selected = true;
        m.momentum = s != nullptr && s->momentum ? *s->momentum : l.momentum;
        m.trainable = (l.scale || l.center) && (s == nullptr || s->affine_trainable);
        m.fit_batch_stats = m.counts = m.updates = true;
        break;
      case LayerKind::kActivation:
      case LayerKind::kDropout:
        break;
    }
  }
  return modes;
}

bool uses_batch_stats_in_fit(const std::vector<LayerSpec>& layers, const StrategyConfig& s) {
  std::vector<LayerSpec> prepared;
  try {
    prepared = prepared_layers(layers, s);
  } catch (const std::invalid_argument&) {
    return false;  // an impossible fold is reported on its own
  }
  const auto modes = resolve_modes(prepared, &s);
  for (size_t i = 0; i < prepared.size(); ++i)
    if ((prepared[i].kind == LayerKind::kBatchNorm || prepared[i].kind == LayerKind::kBatchRenorm) && modes[i].fit_batch_stats)
      return true;
  return false;
}

std::vector<BatchNormModeRow> batchnorm_mode_rows(const std::vector<LayerSpec>& layers, const StrategyConfig& strategy) {
  const auto prepared = prepared_layers(layers, strategy);
  const auto modes = resolve_modes(prepared, &strategy);
  std::vector<BatchNormModeRow> rows;
  for (size_t i = 0; i < prepared.size(); ++i) {
    const auto& l = prepared[i];
    if (l.kind != LayerKind::kBatchNorm && l.kind != LayerKind::kFrozenBatchNorm && l.kind != LayerKind::kBatchRenorm) continue;
    const auto& m = modes[i];
    BatchNormModeRow r;
    r.module = l.name;
    r.kind = layer_kind_name(l.kind);
    r.bn_index = l.bn_index;
    r.selected = m.selected;
    r.frozen_module = l.kind == LayerKind::kFrozenBatchNorm;
    r.fit_batch_statistics = !r.frozen_module && m.fit_batch_stats;
    r.inference_batch_statistics = !r.frozen_module && m.infer_batch_stats;
    r.running_statistics_updated = !r.frozen_module && m.updates && m.momentum > 0;
    char p[64];
    std::snprintf(p, sizeof p, "%.6g", m.prior);
    r.fit = r.frozen_module                    ? "running (FrozenBatchNorm1d)"
            : m.prior >= 0                     ? "p = " + std::string(p) + " of running, 1 - p of batch (prior)"
            : l.kind == LayerKind::kBatchRenorm ? std::string("batch, renormalised: x-hat * r + d (renorm)")
            : m.fit_batch_stats                ? "batch"
                                               : "running";
    r.inference = r.frozen_module ? "running (FrozenBatchNorm1d)" : m.infer_batch_stats ? "batch" : "running";
    r.affine = r.frozen_module || !(l.scale || l.center) ? "none trainable" : m.trainable ? "trainable" : "frozen";
    r.prior = m.prior;
    r.momentum = m.momentum;
    rows.push_back(r);
  }
  return rows;
}

}  // namespace bnlab
