// The batched engine: hand-written forward, backward and optimizer kernels over K lanes, each
// lane a full copy of the network's state. See batched.hpp and docs/performance.md.
#include "batched.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <stdexcept>

#include "kernels.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

enum class Kind { kLinear, kBatchNorm, kFrozenBn, kRelu, kTanh, kGelu, kDropout };

/// Which forward pass: the fit (training) forward under the policy; inference under the policy
/// (what evaluate_inference runs on a model with a policy); inference with running statistics
/// everywhere (a model without a policy, as evaluate_before and evaluate_pretrained see it).
enum class Pass { kFit, kInfer, kPlain };

struct Layer {
  Kind kind = Kind::kLinear;
  std::string name;
  int64_t in = 0, out = 0;      ///< widths (equal except for Linear)
  int64_t w = -1, b = -1;       ///< parameter offsets: Linear weight [out, in] and bias, BatchNorm gamma and beta
  int64_t rm = -1, rv = -1;     ///< buffer offsets: running mean/var (FrozenBatchNorm1d: fw, fb too)
  int64_t fw = -1, fb = -1;
  int64_t counter = -1;         ///< BatchNorm: index of its num_batches_tracked
  bool trainable = false;       ///< the layer's parameters get gradients and optimizer steps
  bool need_dx = false;         ///< some trainable parameter sits before this layer
  double eps = 0, momentum = 0, p = 0;
  BnSemantics semantics = BnSemantics::kKeras;
  bool fit_batch_stats = true;    ///< BatchNorm: batch statistics in the fit forward (train mode or not tracking)
  bool infer_batch_stats = false; ///< ... and in inference (track_running_stats false: LibTorch's rule)
  bool counts = true;             ///< num_batches_tracked counted by the fit forward (train mode and tracking)
};

/// A segment of the parameter block that the optimizer steps.
struct Segment {
  int64_t offset, size;
};

/// Rows at or above which a lane's matrix products go through kernels::gemm (pretraining
/// batches); below, matrix-vector loops need no transposed copies.
constexpr int64_t kGemmRows = 8;

torch::Tensor wrap(float* p, std::initializer_list<int64_t> sizes) {
  return torch::from_blob(p, sizes, torch::TensorOptions().dtype(torch::kFloat));
}

/// The network as flat arrays: lanes x (parameters, buffers, counters), plus the activations
/// of the last forward pass that the backward pass needs.
class Net {
 public:
  /// Reads the architecture of `model`; `shared`: every lane reads one copy of the state
  /// (inference only), else each lane has its own.
  Net(const ModelImpl& model, int64_t lanes, int64_t rows, bool shared) : lanes_(lanes), rows_(rows), shared_(shared) {
    const auto children = model.named_children();
    int64_t width = model.inputs();
    for (const auto& info : model.layers()) {
      Layer l;
      l.name = info.name;
      l.in = width;
      const auto& module = children[info.name];
      if (info.kind == "linear") {
        const auto& lin = *std::dynamic_pointer_cast<torch::nn::LinearImpl>(module);
        l.kind = Kind::kLinear;
        l.out = lin.weight.size(0);
        l.w = take_param(l.out * l.in);
        l.b = take_param(l.out);
      } else if (info.kind == "batchnorm") {
        const auto& bn = *std::dynamic_pointer_cast<BatchNormImpl>(module);
        l.kind = Kind::kBatchNorm;
        l.out = l.in;
        if (bn.weight.defined()) {
          l.w = take_param(l.out);
          l.b = take_param(l.out);
        }
        l.rm = take_buffer(l.out);
        l.rv = take_buffer(l.out);
        l.counter = counters_++;
        l.eps = bn.options.eps();
        l.momentum = bn.options.momentum();
        l.semantics = bn.options.semantics();
      } else if (info.kind == "frozen_batchnorm") {
        const auto& f = *std::dynamic_pointer_cast<FrozenBatchNormImpl>(module);
        l.kind = Kind::kFrozenBn;
        l.out = l.in;
        l.fw = take_buffer(l.out);
        l.fb = take_buffer(l.out);
        l.rm = take_buffer(l.out);
        l.rv = take_buffer(l.out);
        l.eps = f.eps;
      } else if (info.kind == "dropout") {
        l.kind = Kind::kDropout;
        l.out = l.in;
        l.p = std::dynamic_pointer_cast<DropoutImpl>(module)->p;
      } else {
        l.kind = info.kind == "relu" ? Kind::kRelu : info.kind == "tanh" ? Kind::kTanh : Kind::kGelu;
        l.out = l.in;
      }
      width = l.out;
      max_width_ = std::max(max_width_, width);
      layers_.push_back(l);
    }
    outputs_ = width;
    const int64_t copies = shared ? 1 : lanes;
    params_.assign(static_cast<size_t>(copies * n_params_), 0.f);
    buffers_.assign(static_cast<size_t>(copies * n_buffers_), 0.f);
    counts_.assign(static_cast<size_t>(copies * counters_), 0);
    for (const auto& l : layers_) acts_.emplace_back(static_cast<size_t>(lanes * rows * l.out));
    xhat_.resize(layers_.size());
    istd_.resize(layers_.size());
    for (size_t i = 0; i < layers_.size(); ++i) {
      if (layers_[i].kind == Kind::kBatchNorm) {
        xhat_[i].resize(static_cast<size_t>(lanes * rows * layers_[i].out));
        istd_[i].resize(static_cast<size_t>(lanes * layers_[i].out));
      } else if (layers_[i].kind == Kind::kDropout) {
        xhat_[i].resize(static_cast<size_t>(lanes * rows * layers_[i].out));  // the mask
      }
    }
    ga_.resize(static_cast<size_t>(lanes * rows * max_width_));
    gb_.resize(ga_.size());
    if (!shared) grads_.assign(params_.size(), 0.f);
    generators_.resize(static_cast<size_t>(lanes));
    set_policy(nullptr, 0);
  }

  int64_t lanes() const { return lanes_; }
  int64_t outputs() const { return outputs_; }
  int64_t n_params() const { return n_params_; }
  const std::vector<Segment>& trainable() const { return trainable_; }
  std::vector<float>& params() { return params_; }
  std::vector<float>& grads() { return grads_; }
  const float* output() const { return acts_.back().data(); }
  float* output_grad() { return ga_.data(); }  // where the loss writes dL/d(output)

  /// Copies the state of `model` (same architecture) into `lane`.
  void load(int64_t lane, const ModelImpl& model) { transfer(lane, const_cast<ModelImpl&>(model), true); }
  /// Writes `lane`'s state into `model`.
  void store(int64_t lane, ModelImpl& model) const { const_cast<Net*>(this)->transfer(lane, model, false); }

  /// Copies lane `from`'s state to every other lane.
  void replicate(int64_t from) {
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      if (lane == from) continue;
      std::copy_n(params_.data() + from * n_params_, n_params_, params_.data() + lane * n_params_);
      std::copy_n(buffers_.data() + from * n_buffers_, n_buffers_, buffers_.data() + lane * n_buffers_);
      std::copy_n(counts_.data() + from * counters_, counters_, counts_.data() + lane * counters_);
    }
  }

  void set_generator(int64_t lane, std::shared_ptr<at::Generator> gen) { generators_[static_cast<size_t>(lane)] = std::move(gen); }

  /// The policy as Policy::apply sets it (nullptr: the model's defaults, as in pretraining).
  void set_policy(const StrategyConfig* s, double base_momentum) {
    size_t bn_index = 0;
    int64_t linear_index = 0;
    for (auto& l : layers_) {
      if (l.kind == Kind::kLinear) {
        l.trainable = s == nullptr || linear_index >= s->freeze_linear;
        ++linear_index;
      } else if (l.kind == Kind::kBatchNorm || l.kind == Kind::kFrozenBn) {
        // Positions count FrozenBatchNorm1d layers too, as ModelImpl::batchnorm_positions does.
        const bool selected = s != nullptr && layer_selected(s->layers, bn_index, l.name);
        ++bn_index;
        if (l.kind == Kind::kFrozenBn) continue;
        const bool eval_mode = selected && s->bn_mode == BnMode::kEval;
        const bool track = selected ? s->track_running_stats : true;
        l.momentum = selected && s->momentum ? *s->momentum : (s == nullptr ? l.momentum : base_momentum);
        l.trainable = l.w >= 0 && (!selected || s->affine_trainable);
        l.fit_batch_stats = !eval_mode || !track;
        l.infer_batch_stats = !track;
        l.counts = !eval_mode && track;
      }
    }
    trainable_.clear();
    bool below = false;
    for (auto& l : layers_) {
      l.need_dx = below;
      if (l.trainable) {
        const int64_t size = l.kind == Kind::kLinear ? l.out * l.in + l.out : 2 * l.out;
        if (!trainable_.empty() && trainable_.back().offset + trainable_.back().size == l.w) trainable_.back().size += size;
        else trainable_.push_back({l.w, size});
        below = true;
      }
    }
  }

  /// Forward pass of every lane over `rows` rows (<= the capacity); x is [lanes][rows][in].
  void forward(Pass pass, const float* x, int64_t rows) {
    rows_now_ = rows;
    const float* in = x;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      float* out = acts_[i].data();
      switch (l.kind) {
        case Kind::kLinear: linear_forward(l, in, out); break;
        case Kind::kBatchNorm: batchnorm_forward(i, pass, in, out); break;
        case Kind::kFrozenBn: frozen_forward(l, in, out); break;
        case Kind::kRelu:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) out[k] = in[k] > 0.f ? in[k] : 0.f;
          break;
        case Kind::kTanh:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) out[k] = std::tanh(in[k]);
          break;
        case Kind::kGelu:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k)
            out[k] = in[k] * 0.5f * (1.f + std::erf(in[k] * static_cast<float>(M_SQRT1_2)));
          break;
        case Kind::kDropout: dropout_forward(i, pass, in, out); break;
      }
      in = out;
    }
  }

  /// Backward pass from output_grad() through the last forward (a fit pass); fills grads()
  /// for the trainable layers and stops below the lowest of them.
  void backward(const float* x) {
    float* g = ga_.data();
    float* next = gb_.data();
    for (size_t i = layers_.size(); i-- > 0;) {
      const Layer& l = layers_[i];
      const float* in = i == 0 ? x : acts_[i - 1].data();
      const bool dx = l.need_dx;
      if (!dx && !l.trainable) break;
      switch (l.kind) {
        case Kind::kLinear: linear_backward(l, in, g, next); break;
        case Kind::kBatchNorm: batchnorm_backward(i, in, g, next); break;
        case Kind::kFrozenBn: frozen_backward(l, g, next); break;
        case Kind::kRelu:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) next[k] = acts_[i][k] > 0.f ? g[k] : 0.f;
          break;
        case Kind::kTanh:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) next[k] = g[k] * (1.f - acts_[i][k] * acts_[i][k]);
          break;
        case Kind::kGelu:
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) {
            const float v = in[k];
            const float cdf = 0.5f * (1.f + std::erf(v * static_cast<float>(M_SQRT1_2)));
            const float pdf = std::exp(-0.5f * v * v) * static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
            next[k] = g[k] * (cdf + v * pdf);
          }
          break;
        case Kind::kDropout: {
          const float* mask = xhat_[i].data();
          const float keep = static_cast<float>(1 - l.p);
          for (int64_t k = 0, n = lanes_ * rows_ * l.out; k < n; ++k) next[k] = g[k] / keep * mask[k];
          break;
        }
      }
      std::swap(g, next);
    }
  }

  /// Each trainable parameter: its state-dict name, offset and shape.
  std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>>> trainable_tensors() const {
    std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>>> out;
    for (const auto& l : layers_) {
      if (!l.trainable) continue;
      if (l.kind == Kind::kLinear) out.emplace_back(l.name + ".weight", l.w, std::vector<int64_t>{l.out, l.in});
      else out.emplace_back(l.name + ".weight", l.w, std::vector<int64_t>{l.out});
      out.emplace_back(l.name + ".bias", l.b, std::vector<int64_t>{l.out});
    }
    return out;
  }

  /// A lane's whole state: parameters, buffers and num_batches_tracked counters.
  struct Snapshot {
    std::vector<float> values;
    std::vector<int64_t> counts;
  };
  /// Copies the state of `lane` into `dst` (save) or back from it.
  void snapshot(int64_t lane, Snapshot& dst, bool save) {
    float* p = params_.data() + lane * n_params_;
    float* b = buffers_.data() + lane * n_buffers_;
    int64_t* c = counts_.data() + lane * counters_;
    if (save) {
      dst.values.assign(p, p + n_params_);
      dst.values.insert(dst.values.end(), b, b + n_buffers_);
      dst.counts.assign(c, c + counters_);
    } else {
      std::copy_n(dst.values.data(), n_params_, p);
      std::copy_n(dst.values.data() + n_params_, n_buffers_, b);
      std::copy_n(dst.counts.data(), counters_, c);
    }
  }

 private:
  int64_t take_param(int64_t n) { return (n_params_ += n) - n; }
  int64_t take_buffer(int64_t n) { return (n_buffers_ += n) - n; }
  float* P(int64_t lane) { return params_.data() + (shared_ ? 0 : lane * n_params_); }
  float* B(int64_t lane) { return buffers_.data() + (shared_ ? 0 : lane * n_buffers_); }
  float* G(int64_t lane) { return grads_.data() + lane * n_params_; }

  void transfer(int64_t lane, ModelImpl& model, bool in) {
    torch::NoGradGuard no_grad;
    const auto children = model.named_children();
    const auto move = [&](const torch::Tensor& t, float* p) {
      auto view = wrap(p, {t.numel()});
      if (in) view.copy_(t.reshape({-1}));
      else t.view({-1}).copy_(view);
    };
    for (const auto& l : layers_) {
      const auto& module = children[l.name];
      float* p = P(lane);
      float* b = B(lane);
      if (l.kind == Kind::kLinear) {
        const auto& lin = *std::dynamic_pointer_cast<torch::nn::LinearImpl>(module);
        move(lin.weight, p + l.w);
        move(lin.bias, p + l.b);
      } else if (l.kind == Kind::kBatchNorm) {
        const auto& bn = *std::dynamic_pointer_cast<BatchNormImpl>(module);
        if (l.w >= 0) {
          move(bn.weight, p + l.w);
          move(bn.bias, p + l.b);
        }
        move(bn.running_mean, b + l.rm);
        move(bn.running_var, b + l.rv);
        int64_t& count = counts_[static_cast<size_t>((shared_ ? 0 : lane) * counters_ + l.counter)];
        if (in) count = bn.num_batches_tracked.item<int64_t>();
        else bn.num_batches_tracked.fill_(count);
      } else if (l.kind == Kind::kFrozenBn) {
        const auto& f = *std::dynamic_pointer_cast<FrozenBatchNormImpl>(module);
        move(f.weight, b + l.fw);
        move(f.bias, b + l.fb);
        move(f.running_mean, b + l.rm);
        move(f.running_var, b + l.rv);
      }
    }
  }

  void linear_forward(const Layer& l, const float* in, float* out) {
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* W = P(lane) + l.w;
      const float* bias = P(lane) + l.b;
      const float* X = in + lane * rows_ * l.in;
      float* Y = out + lane * rows_ * l.out;
      if (rows_now_ >= kGemmRows) {
        scratch_.resize(static_cast<size_t>(l.in * l.out));
        kernels::transpose(W, scratch_.data(), l.out, l.in);
        kernels::gemm(X, scratch_.data(), Y, rows_now_, l.in, l.out, bias);
        continue;
      }
      for (int64_t r = 0; r < rows_now_; ++r) kernels::gemv(W, X + r * l.in, bias, Y + r * l.out, l.out, l.in);
    }
  }

  void linear_backward(const Layer& l, const float* in, const float* g, float* dx) {
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* W = P(lane) + l.w;
      const float* X = in + lane * rows_ * l.in;
      const float* Gy = g + lane * rows_ * l.out;
      float* Dx = dx + lane * rows_ * l.in;
      if (rows_now_ >= kGemmRows) {
        if (l.trainable) {
          scratch_.resize(static_cast<size_t>(rows_now_ * l.out));
          kernels::transpose(Gy, scratch_.data(), rows_now_, l.out);
          kernels::gemm(scratch_.data(), X, G(lane) + l.w, l.out, rows_now_, l.in, nullptr);
          float* db = G(lane) + l.b;
          std::fill(db, db + l.out, 0.f);
          for (int64_t r = 0; r < rows_now_; ++r)
            for (int64_t o = 0; o < l.out; ++o) db[o] += Gy[r * l.out + o];
        }
        if (l.need_dx) kernels::gemm(Gy, W, Dx, rows_now_, l.out, l.in, nullptr);
        continue;
      }
      if (l.trainable) {
        float* db = G(lane) + l.b;
        for (int64_t o = 0; o < l.out; ++o) {
          float s = 0.f;
          for (int64_t r = 0; r < rows_now_; ++r) s += Gy[r * l.out + o];
          db[o] = s;
        }
        for (int64_t r = 0; r < rows_now_; ++r) kernels::outer(Gy + r * l.out, X + r * l.in, G(lane) + l.w, l.out, l.in, r > 0);
      }
      if (l.need_dx)
        for (int64_t r = 0; r < rows_now_; ++r) kernels::gemv_t(W, Gy + r * l.out, Dx + r * l.in, l.out, l.in);
    }
  }

  bool uses_batch_stats(const Layer& l, Pass pass) const {
    return pass == Pass::kFit ? l.fit_batch_stats : pass == Pass::kInfer ? l.infer_batch_stats : false;
  }

  void batchnorm_forward(size_t i, Pass pass, const float* in, float* out) {
    const Layer& l = layers_[i];
    const int64_t C = l.out, n = rows_now_;
    const bool batch = uses_batch_stats(l, pass);
    const float eps = static_cast<float>(l.eps);
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* X = in + lane * rows_ * C;
      float* Y = out + lane * rows_ * C;
      const float* gamma = l.w >= 0 ? P(lane) + l.w : nullptr;
      const float* beta = l.w >= 0 ? P(lane) + l.b : nullptr;
      float* rm = B(lane) + l.rm;
      float* rv = B(lane) + l.rv;
      float* istd = istd_[i].data() + lane * C;
      if (!batch) {
        // Inference: alpha = gamma / sqrt(running_var + eps), y = x * alpha + (beta - mean * alpha).
        for (int64_t c = 0; c < C; ++c) {
          istd[c] = 1.f / std::sqrt(rv[c] + eps);
          const float alpha = gamma ? gamma[c] * istd[c] : istd[c];
          const float shift = (beta ? beta[c] : 0.f) - rm[c] * alpha;
          for (int64_t r = 0; r < n; ++r) Y[r * C + c] = X[r * C + c] * alpha + shift;
        }
        continue;
      }
      // Batch statistics: mean and biased variance over the rows (with one row, x - mean is
      // exactly 0 and every unit outputs beta, as in Keras).
      float* xhat = xhat_[i].data() + lane * rows_ * C;
      float* mean = ga_stats(C, 0);
      float* var = ga_stats(C, 1);
      std::fill(mean, mean + C, 0.f);
      std::fill(var, var + C, 0.f);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c) mean[c] += X[r * C + c];
      for (int64_t c = 0; c < C; ++c) mean[c] /= static_cast<float>(n);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const float d = X[r * C + c] - mean[c];
          var[c] += d * d;
        }
      for (int64_t c = 0; c < C; ++c) {
        var[c] /= static_cast<float>(n);
        istd[c] = 1.f / std::sqrt(var[c] + eps);
      }
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const float h = (X[r * C + c] - mean[c]) * istd[c];
          xhat[r * C + c] = h;
          Y[r * C + c] = gamma ? h * gamma[c] + beta[c] : h;
        }
      const float m = static_cast<float>(l.momentum);
      if (l.semantics == BnSemantics::kKeras) {
        for (int64_t c = 0; c < C; ++c) {
          rm[c] -= (rm[c] - mean[c]) * m;
          rv[c] -= (rv[c] - var[c]) * m;
        }
      } else {
        const float unbias = static_cast<float>(n) / static_cast<float>(n - 1);
        for (int64_t c = 0; c < C; ++c) {
          rm[c] = m * mean[c] + (1.f - m) * rm[c];
          rv[c] = m * var[c] * unbias + (1.f - m) * rv[c];
        }
      }
      if (pass == Pass::kFit && l.counts) ++counts_[static_cast<size_t>(lane * counters_ + l.counter)];
    }
  }

  void batchnorm_backward(size_t i, const float* in, const float* g, float* dx) {
    const Layer& l = layers_[i];
    const int64_t C = l.out, n = rows_now_;
    const bool batch = l.fit_batch_stats;
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* X = in + lane * rows_ * C;
      const float* Gy = g + lane * rows_ * C;
      float* Dx = dx + lane * rows_ * C;
      const float* gamma = l.w >= 0 ? P(lane) + l.w : nullptr;
      const float* rm = B(lane) + l.rm;
      const float* istd = istd_[i].data() + lane * C;
      const float* xhat = xhat_[i].data() + lane * rows_ * C;
      float* sum_g = ga_stats(C, 0);
      float* sum_gx = ga_stats(C, 1);
      std::fill(sum_g, sum_g + C, 0.f);
      std::fill(sum_gx, sum_gx + C, 0.f);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t c = 0; c < C; ++c) {
          const float h = batch ? xhat[r * C + c] : (X[r * C + c] - rm[c]) * istd[c];
          sum_g[c] += Gy[r * C + c];
          sum_gx[c] += Gy[r * C + c] * h;
        }
      if (l.trainable) {
        std::copy(sum_gx, sum_gx + C, G(lane) + l.w);
        std::copy(sum_g, sum_g + C, G(lane) + l.b);
      }
      if (!l.need_dx) continue;
      for (int64_t c = 0; c < C; ++c) {
        const float s = gamma ? gamma[c] : 1.f;
        if (!batch) {
          for (int64_t r = 0; r < n; ++r) Dx[r * C + c] = Gy[r * C + c] * s * istd[c];
          continue;
        }
        // d/dx of (x - mean) * istd with batch statistics: istd * (dh - mean(dh) - h * mean(dh * h)).
        const float mean_dh = sum_g[c] * s / static_cast<float>(n);
        const float mean_dhh = sum_gx[c] * s / static_cast<float>(n);
        for (int64_t r = 0; r < n; ++r) {
          const float dh = Gy[r * C + c] * s;
          Dx[r * C + c] = istd[c] * (dh - mean_dh - xhat[r * C + c] * mean_dhh);
        }
      }
    }
  }

  void frozen_forward(const Layer& l, const float* in, float* out) {
    const int64_t C = l.out;
    const float eps = static_cast<float>(l.eps);
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* b = B(lane);
      const float* X = in + lane * rows_ * C;
      float* Y = out + lane * rows_ * C;
      for (int64_t c = 0; c < C; ++c) {
        const float scale = b[l.fw + c] * (1.f / std::sqrt(b[l.rv + c] + eps));
        const float shift = b[l.fb + c] - b[l.rm + c] * scale;
        for (int64_t r = 0; r < rows_now_; ++r) Y[r * C + c] = X[r * C + c] * scale + shift;
      }
    }
  }

  void frozen_backward(const Layer& l, const float* g, float* dx) {
    const int64_t C = l.out;
    const float eps = static_cast<float>(l.eps);
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      const float* b = B(lane);
      for (int64_t c = 0; c < C; ++c) {
        const float scale = b[l.fw + c] * (1.f / std::sqrt(b[l.rv + c] + eps));
        for (int64_t r = 0; r < rows_now_; ++r) dx[(lane * rows_ + r) * C + c] = g[(lane * rows_ + r) * C + c] * scale;
      }
    }
  }

  void dropout_forward(size_t i, Pass pass, const float* in, float* out) {
    const Layer& l = layers_[i];
    const int64_t n = lanes_ * rows_ * l.out;
    if (pass != Pass::kFit || l.p == 0) {
      std::copy(in, in + n, out);
      return;
    }
    const float keep = static_cast<float>(1 - l.p);
    for (int64_t lane = 0; lane < lanes_; ++lane) {
      float* mask = xhat_[i].data() + lane * rows_ * l.out;
      // The same draw as bnlab::Dropout: bernoulli_(1 - p) on a [rows, width] tensor from the lane's generator.
      auto& gen = generators_[static_cast<size_t>(lane)];
      TORCH_CHECK(gen != nullptr, "batched engine: lane ", lane, " has no dropout generator");
      wrap(mask, {rows_now_, l.out}).bernoulli_(1 - l.p, *gen);
      const float* X = in + lane * rows_ * l.out;
      float* Y = out + lane * rows_ * l.out;
      for (int64_t k = 0; k < rows_now_ * l.out; ++k) Y[k] = X[k] * mask[k] / keep;
    }
  }

  /// Scratch for per-channel statistics (two vectors of `C`).
  float* ga_stats(int64_t C, int which) {
    if (static_cast<int64_t>(stats_.size()) < 2 * C) stats_.resize(static_cast<size_t>(2 * C));
    return stats_.data() + which * C;
  }

  int64_t lanes_, rows_, rows_now_ = 0;
  bool shared_;
  std::vector<Layer> layers_;
  int64_t n_params_ = 0, n_buffers_ = 0, counters_ = 0, outputs_ = 0, max_width_ = 0;
  std::vector<float> params_, buffers_, grads_;
  std::vector<int64_t> counts_;
  std::vector<std::vector<float>> acts_, xhat_, istd_;
  std::vector<float> ga_, gb_, stats_, scratch_;
  std::vector<Segment> trainable_;
  std::vector<std::shared_ptr<at::Generator>> generators_;
};

/// Per-lane loss of the last forward pass (rows x outputs per lane) against y (rows x targets
/// per lane), as compute_loss computes it; with `grad`, dL/d(output) goes to net.output_grad().
/// `correct` (cross_entropy) receives each lane's count of correct argmax predictions.
void lane_losses(Net& net, LossKind kind, const float* y, int64_t rows, int64_t targets, bool grad,
                 std::vector<double>& loss, std::vector<double>* correct) {
  const int64_t O = net.outputs(), L = net.lanes();
  const float* out = net.output();
  float* g = net.output_grad();
  loss.assign(static_cast<size_t>(L), 0.0);
  if (correct) correct->assign(static_cast<size_t>(L), 0.0);
  static const float kLog2Pi = static_cast<float>(std::log(2.0 * M_PI));
  for (int64_t lane = 0; lane < L; ++lane) {
    float sum = 0.f;
    const float* o = out + lane * rows * O;
    const float* t = y + lane * rows * targets;
    float* d = g + lane * rows * O;
    switch (kind) {
      case LossKind::kGaussianNll: {
        const int64_t T = O / 2;
        const float count = static_cast<float>(rows * T);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < T; ++k) {
            const float mean = o[r * O + k], log_var = o[r * O + T + k];
            const float diff = t[r * targets + k] - mean;
            const float var = std::exp(log_var);
            const float sq = diff * diff / var;
            sum += 0.5f * (log_var + sq + kLog2Pi);
            if (grad) {
              d[r * O + k] = -diff / var / count;
              d[r * O + T + k] = 0.5f * (1.f - sq) / count;
            }
          }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / count);
        break;
      }
      case LossKind::kMse: {
        const float count = static_cast<float>(rows * O);
        for (int64_t k = 0; k < rows * O; ++k) {
          const float diff = o[k] - t[k];
          sum += diff * diff;
          if (grad) d[k] = 2.f * diff / count;
        }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / count);
        break;
      }
      case LossKind::kCrossEntropy: {
        for (int64_t r = 0; r < rows; ++r) {
          const float* z = o + r * O;
          const auto label = static_cast<int64_t>(t[r * targets]);
          int64_t best = 0;
          float mx = z[0];
          for (int64_t k = 1; k < O; ++k)
            if (z[k] > mx) mx = z[k], best = k;
          float se = 0.f;
          for (int64_t k = 0; k < O; ++k) se += std::exp(z[k] - mx);
          const float lse = std::log(se) + mx;
          sum += lse - z[label];
          if (correct && best == label) (*correct)[static_cast<size_t>(lane)] += 1;
          if (grad)
            for (int64_t k = 0; k < O; ++k)
              d[r * O + k] = (std::exp(z[k] - lse) - (k == label ? 1.f : 0.f)) / static_cast<float>(rows);
        }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / static_cast<float>(rows));
        break;
      }
    }
  }
}

/// torch::optim's SGD, Adam and AdamW update rules, element by element, over the trainable
/// segments of every lane (the same float operations in the same order as those classes).
class Optimizer {
 public:
  Optimizer(const OptimizerConfig& c, Net& net) : c_(c), net_(net) {
    const size_t n = net.params().size();
    if (c.kind != OptimizerKind::kSgd) {
      m_.assign(n, 0.f);
      v_.assign(n, 0.f);
    } else if (c.momentum != 0) {
      m_.assign(n, 0.f);
    }
  }
  void set_lr(double lr) { c_.lr = lr; }
  void step() {
    ++step_;
    const int64_t P = net_.n_params();
    float* params = net_.params().data();
    const float* grads = net_.grads().data();
    for (int64_t lane = 0; lane < net_.lanes(); ++lane)
      for (const auto& s : net_.trainable()) {
        const int64_t off = lane * P + s.offset;
        update(params + off, grads + off, m_.empty() ? nullptr : m_.data() + off, v_.empty() ? nullptr : v_.data() + off, s.size);
      }
  }

 private:
  void update(float* p, const float* g, float* m, float* v, int64_t n) {
    const float wd = static_cast<float>(c_.weight_decay);
    if (c_.kind == OptimizerKind::kSgd) {
      const float lr = static_cast<float>(-c_.lr);
      const float mom = static_cast<float>(c_.momentum);
      for (int64_t k = 0; k < n; ++k) {
        float d = g[k];
        if (c_.weight_decay != 0) d = d + wd * p[k];
        if (c_.momentum != 0) {
          m[k] = step_ == 1 ? d : m[k] * mom + d;
          d = c_.nesterov ? d + mom * m[k] : m[k];
        }
        p[k] = p[k] + lr * d;
      }
      return;
    }
    const double bc1 = 1 - std::pow(c_.beta1, static_cast<double>(step_));
    const double bc2 = 1 - std::pow(c_.beta2, static_cast<double>(step_));
    const float b1 = static_cast<float>(c_.beta1), b2 = static_cast<float>(c_.beta2);
    const float a1 = static_cast<float>(1 - c_.beta1), a2 = static_cast<float>(1 - c_.beta2);
    const float sqrt_bc2 = static_cast<float>(std::sqrt(bc2)), eps = static_cast<float>(c_.eps);
    const float step_size = static_cast<float>(-(c_.lr / bc1));
    const bool adamw = c_.kind == OptimizerKind::kAdamW;
    const float decay = static_cast<float>(1 - c_.lr * c_.weight_decay);
    for (int64_t k = 0; k < n; ++k) {
      float grad = g[k];
      if (adamw) {
        if (c_.weight_decay != 0) p[k] = p[k] * decay;
      } else if (c_.weight_decay != 0) {
        grad = grad + wd * p[k];
      }
      m[k] = m[k] * b1 + a1 * grad;
      v[k] = v[k] * b2 + a2 * (grad * grad);
      const float denom = std::sqrt(v[k]) / sqrt_bc2 + eps;
      p[k] = p[k] + step_size * (m[k] / denom);
    }
  }

  OptimizerConfig c_;
  Net& net_;
  std::vector<float> m_, v_;
  int64_t step_ = 0;
};

/// Rows `samples` of a [N, W] float tensor, as one contiguous [samples, W] block.
std::vector<float> gather_rows(const torch::Tensor& t, const std::vector<int64_t>& samples) {
  const auto rows = t.index_select(0, torch::tensor(samples, torch::kLong)).to(torch::kFloat).contiguous();
  return std::vector<float>(rows.data_ptr<float>(), rows.data_ptr<float>() + rows.numel());
}

}  // namespace

std::string batched_unsupported(const Config& config, const StrategyConfig& strategy) {
  // The predicate config validation uses, so that anything validation lets through that the
  // batched engine cannot do goes to the torch engine, which reports LibTorch's own error.
  const auto& bn = config.model.batchnorm;
  const int64_t per_block = 3 + (config.model.dropout > 0 ? 1 : 0);
  if (bn.enabled && bn.semantics == BnSemantics::kTorch &&
      uses_batch_stats_in_fit(strategy, static_cast<int64_t>(config.model.hidden.size()), per_block))
    return "PyTorch-numerics BatchNorm on the batch statistics of one row (an error the torch engine reports)";
  return "";
}

std::vector<StrategyResult> finetune_batched(const ModelImpl& pretrained, const StrategyConfig& strategy,
                                             const Config& config, const Dataset& data,
                                             const std::vector<int64_t>& samples,
                                             const std::function<void(size_t, const EpochRecord&)>& on_epoch,
                                             Model* finetuned, const ModelImpl* ready) {
  const std::string why = batched_unsupported(config, strategy);
  if (!why.empty()) throw std::runtime_error("batched engine: strategy \"" + strategy.name + "\": " + why);
  TORCH_CHECK(finetuned == nullptr || samples.size() == 1, "finetune_batched: finetuned needs exactly one sample");
  const auto& ft = config.finetune;
  const LossKind loss_kind = config.model.loss;
  const bool classification = loss_kind == LossKind::kCrossEntropy;
  const auto L = static_cast<int64_t>(samples.size());
  const std::vector<float> x = gather_rows(data.x, samples), y = gather_rows(data.y, samples);
  const int64_t targets = data.y.size(1);
  std::vector<StrategyResult> results(samples.size());
  std::vector<double> values, correct;

  // Evaluate the untouched pretrained weights: one shared copy for every lane.
  {
    Net base(pretrained, L, 1, /*shared=*/true);
    base.load(0, pretrained);
    base.forward(Pass::kPlain, x.data(), 1);
    lane_losses(base, loss_kind, y.data(), 1, targets, false, values, nullptr);
    for (int64_t l = 0; l < L; ++l) results[static_cast<size_t>(l)].evaluate_pretrained = values[static_cast<size_t>(l)];
  }

  // The model the strategy fine-tunes. It is the same for every sample unless recalibration
  // runs through dropout, whose masks come from the sample's own generator.
  const bool per_lane = strategy.recalibrate > 0 && config.model.dropout > 0;
  Config lane_config = config;
  lane_config.finetune.sample = samples.front();
  Model own{nullptr};
  if (ready == nullptr || per_lane) own = prepare_model(pretrained, strategy, lane_config, &data);
  const ModelImpl& source = own ? *own : *ready;
  Net net(source, L, 1, /*shared=*/false);
  net.load(0, source);
  if (!per_lane) net.replicate(0);
  for (int64_t l = 0; l < L; ++l) {
    lane_config.finetune.sample = samples[static_cast<size_t>(l)];
    if (per_lane) {
      Model lane_model = l == 0 ? own : prepare_model(pretrained, strategy, lane_config, &data);
      if (l > 0) net.load(l, *lane_model);
      net.set_generator(l, lane_model->dropout_generator());
    } else {
      net.set_generator(l, std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(dropout_seed(lane_config))));
    }
  }
  net.forward(Pass::kPlain, x.data(), 1);
  lane_losses(net, loss_kind, y.data(), 1, targets, false, values, nullptr);
  for (int64_t l = 0; l < L; ++l) results[static_cast<size_t>(l)].evaluate_before = values[static_cast<size_t>(l)];

  net.set_policy(&strategy, config.model.batchnorm.momentum);
  const bool steps = !net.trainable().empty();
  Optimizer optimizer(ft.optimizer, net);
  std::vector<Net::Snapshot> best(samples.size());
  std::vector<double> best_value(samples.size(), std::numeric_limits<double>::infinity());
  std::vector<double> val, val_correct;
  EpochRecord rec;  // what every lane shares is set once, not per lane and epoch
  rec.strategy = strategy.name;
  rec.epochs = ft.epochs;
  rec.classification = classification;
  for (int64_t epoch = 1; epoch <= ft.epochs; ++epoch) {
    rec.epoch = epoch;
    net.forward(Pass::kFit, x.data(), 1);
    lane_losses(net, loss_kind, y.data(), 1, targets, steps, values, classification ? &correct : nullptr);
    if (steps) {
      net.backward(x.data());
      optimizer.step();
    }
    net.forward(Pass::kInfer, x.data(), 1);
    lane_losses(net, loss_kind, y.data(), 1, targets, false, val, classification ? &val_correct : nullptr);
    for (size_t l = 0; l < samples.size(); ++l) {
      auto& r = results[l];
      if (r.failed) continue;
      rec.loss = values[l];
      rec.val_loss = val[l];
      if (classification) {
        rec.accuracy = correct[l];
        rec.val_accuracy = val_correct[l];
      }
      if (!std::isfinite(rec.loss) || !std::isfinite(rec.val_loss)) {
        r = StrategyResult{};
        r.failed = true;
        r.error = not_finite_message(strategy.name, config.seed, samples[l], epoch, rec.loss, rec.val_loss);
        continue;
      }
      // Only an export needs the checkpoint's weights themselves (see evaluate_after below).
      if (record_epoch(r, rec, ft, best_value[l]) && finetuned != nullptr) net.snapshot(static_cast<int64_t>(l), best[l], true);
      if (on_epoch) on_epoch(l, rec);
    }
  }
  // evaluate_after is the inference loss of the best epoch's state. The val pass of that epoch
  // ran the same kernels on that same state (the checkpoint is taken right after it, and
  // inference reads no buffer it writes), so it IS val_loss[best_epoch], bit for bit; the
  // torch engine recomputes it, and BatchedEngine.EvaluateAfterIsTheBestEpochsValLoss checks
  // there that the two are identical for every preset. With an export, the state is restored
  // and the loss recomputed here too.
  if (finetuned != nullptr) {
    for (size_t l = 0; l < samples.size(); ++l)
      if (!best[l].values.empty()) net.snapshot(static_cast<int64_t>(l), best[l], false);
    net.forward(Pass::kInfer, x.data(), 1);
    lane_losses(net, loss_kind, y.data(), 1, targets, false, values, nullptr);
  }
  for (size_t l = 0; l < samples.size(); ++l) {
    auto& r = results[l];
    r.name = strategy.name;
    r.seed = config.seed;
    r.sample = samples[l];
    if (r.failed) continue;
    r.evaluate_after = finetuned != nullptr ? values[l] : r.val_loss[static_cast<size_t>(r.best_epoch - 1)];
    compute_lag(r);
  }
  if (finetuned != nullptr && !results.front().failed) {  // the torch engine throws first: nothing to export
    Model tuned = strategy_architecture(config, strategy, source.inputs(), source.outputs());
    tuned->copy_state_from(source);
    net.store(0, *tuned);
    tuned->set_policy(Policy{strategy, config.model.batchnorm.momentum});
    *finetuned = tuned;
  }
  return results;
}

double pretrain_batched(ModelImpl& model, const Dataset& data, const Config& config, std::ostream& log, int verbose) {
  const auto& p = config.pretrain;
  Net net(model, 1, std::min(p.batch_size, data.size()), /*shared=*/false);
  net.load(0, model);
  model.set_dropout_seed(config.seed + 3);
  net.set_generator(0, model.dropout_generator());
  Optimizer optimizer(p.optimizer, net);
  const int64_t targets = data.y.size(1);
  std::vector<double> values;
  const double loss = pretrain_loop(data, config, log, verbose, [&](const torch::Tensor& xb, const torch::Tensor& yb, double lr) {
    const int64_t rows = xb.size(0);
    const float* x = xb.data_ptr<float>();
    net.forward(Pass::kFit, x, rows);
    lane_losses(net, config.model.loss, yb.data_ptr<float>(), rows, targets, true, values, nullptr);
    net.backward(x);
    optimizer.set_lr(lr);
    optimizer.step();
    return values[0];
  });
  net.store(0, model);
  return loss;
}

double batched_gradients(const ModelImpl& model, const StrategyConfig* strategy, double base_momentum, LossKind loss,
                         const torch::Tensor& x, const torch::Tensor& y,
                         std::vector<std::pair<std::string, torch::Tensor>>& grads) {
  const int64_t rows = x.size(0);
  Net net(model, 1, rows, /*shared=*/false);
  net.load(0, model);
  auto gen = std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(0));
  *gen = model.dropout_generator()->clone();
  net.set_generator(0, gen);
  net.set_policy(strategy, base_momentum);
  const auto xs = x.to(torch::kFloat).contiguous(), ys = y.to(torch::kFloat).contiguous();
  std::vector<double> values;
  net.forward(Pass::kFit, xs.data_ptr<float>(), rows);
  lane_losses(net, loss, ys.data_ptr<float>(), rows, ys.size(1), true, values, nullptr);
  net.backward(xs.data_ptr<float>());
  grads.clear();
  for (const auto& [name, offset, shape] : net.trainable_tensors())
    grads.emplace_back(name, wrap(net.grads().data() + offset, {std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                                                                std::multiplies<int64_t>())})
                                 .clone()
                                 .view(shape));
  return values[0];
}

double benchmark_step(const ModelImpl& model, const StrategyConfig& strategy, const Config& config,
                      const Dataset& data, int64_t lanes, int64_t steps) {
  Net net(model, lanes, 1, /*shared=*/false);
  std::vector<int64_t> samples;
  for (int64_t l = 0; l < lanes; ++l) {
    net.load(l, model);
    net.set_generator(l, std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(l))));
    samples.push_back(l);
  }
  net.set_policy(&strategy, config.model.batchnorm.momentum);
  Optimizer optimizer(config.finetune.optimizer, net);
  const std::vector<float> x = gather_rows(data.x, samples), y = gather_rows(data.y, samples);
  std::vector<double> values;
  double sink = 0;
  const auto step = [&] {
    net.forward(Pass::kFit, x.data(), 1);
    lane_losses(net, config.model.loss, y.data(), 1, data.y.size(1), true, values, nullptr);
    sink += values[0];  // the loss is read before the update, as Keras logs it
    net.backward(x.data());
    optimizer.step();
  };
  for (int64_t i = 0; i < std::min<int64_t>(steps, 200); ++i) step();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < steps; ++i) step();
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  if (!std::isfinite(sink)) throw std::runtime_error("benchmark_step: the loss is not finite");
  return us / static_cast<double>(steps);
}

}  // namespace bnlab
