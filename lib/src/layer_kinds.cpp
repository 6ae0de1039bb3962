// The layer-kind registry (see layer_kinds.hpp): one definition per kind, holding its state,
// its torch module, its batched forward and backward kernels and its Keras mapping.
#include "layer_kinds.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "kernels.hpp"
#include "lane_kernels.hpp"

namespace bnlab {

namespace {

/// Rows at or above which a lane's matrix products go through kernels::gemm (pretraining
/// batches); below, matrix-vector loops need no transposed copies.
constexpr int64_t kGemmRows = 8;

/// The factor that turns a batch's biased variance over n rows into what a BatchNorm's running
/// variance and prior_bn take: 1 under Keras numerics, n / (n - 1) (unbiased) under PyTorch's.
float variance_unbias(BnSemantics semantics, int64_t n) {
  return semantics == BnSemantics::kKeras ? 1.f : static_cast<float>(n) / static_cast<float>(n - 1);
}

torch::Tensor wrap(float* p, std::initializer_list<int64_t> sizes) {
  return torch::from_blob(p, sizes, torch::TensorOptions().dtype(torch::kFloat));
}


/// A double as a TorchScript float literal that reads back to the same value ("0.10000000000000001").
std::string script_float(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s = buf;
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// ---------------------------------------------------------------------------------- Dense
class DenseKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec& l) const override {
    std::vector<StateTensor> s{{"weight", StateTensor::kParameter, {l.out, l.in}}};
    if (l.use_bias) s.push_back({"bias", StateTensor::kParameter, {l.out}});
    return s;
  }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>&) const override {
    return torch::nn::AnyModule(torch::nn::Linear(torch::nn::LinearOptions(l.in, l.out).bias(l.use_bias)));
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass, const float* in, float* out) const override {
    const LayerSpec& l = L.spec;
    if (s.V > 1) {  // interleaved groups: vertical SIMD over the lanes, each in its one-lane order
      const auto& k = lanes::active();
      const bool sequential = s.rows >= kGemmRows;
      const float* same = sequential ? nullptr : L.same_params;  // every lane's weights, one copy
      for (int64_t grp = 0; grp < s.groups(); ++grp) {
        const int64_t xi = grp * s.stride * l.in * s.V, yo = grp * s.stride * l.out * s.V;
        if (same != nullptr)
          k.dense_forward_same(same + L.at[0], l.use_bias ? same + L.at[1] : nullptr, in + xi, out + yo, s.rows, l.out, l.in);
        else
          k.dense_forward(s.P(grp) + L.at[0] * s.V, l.use_bias ? s.P(grp) + L.at[1] * s.V : nullptr, in + xi, out + yo,
                          s.rows, l.out, l.in, sequential);
      }
      return;
    }
    for (int64_t lane = 0; lane < s.lanes; ++lane) {
      const float* W = s.P(lane) + L.at[0];
      const float* bias = l.use_bias ? s.P(lane) + L.at[1] : nullptr;
      const float* X = in + lane * s.stride * l.in;
      float* Y = out + lane * s.stride * l.out;
      if (s.rows >= kGemmRows) {
        s.scratch->resize(static_cast<size_t>(l.in * l.out));
        kernels::transpose(W, s.scratch->data(), l.out, l.in);
        kernels::gemm(X, s.scratch->data(), Y, s.rows, l.in, l.out, bias);
        continue;
      }
      for (int64_t r = 0; r < s.rows; ++r) kernels::gemv(W, X + r * l.in, bias, Y + r * l.out, l.out, l.in);
    }
  }
  void forward_pair(const LaneStore& s, BatchedLayer& L, Pass first, const float* in_a, float* out_a, Pass second,
                    const float* in_b, float* out_b) const override {
    const LayerSpec& l = L.spec;
    if (s.V == 1 || s.rows != 1) {  // the pair kernel is for one row of interleaved lanes
      LayerKindDef::forward_pair(s, L, first, in_a, out_a, second, in_b, out_b);
      return;
    }
    const auto& k = lanes::active();
    const float* same = L.same_params;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const int64_t xi = grp * s.stride * l.in * s.V, yo = grp * s.stride * l.out * s.V;
      if (same != nullptr)
        k.dense_forward_pair_same(same + L.at[0], l.use_bias ? same + L.at[1] : nullptr, in_a + xi, out_a + yo,
                                  in_b + xi, out_b + yo, l.out, l.in);
      else
        k.dense_forward_pair(s.P(grp) + L.at[0] * s.V, l.use_bias ? s.P(grp) + L.at[1] * s.V : nullptr, in_a + xi,
                             out_a + yo, in_b + xi, out_b + yo, l.out, l.in);
    }
  }
  bool same_passes(const BatchedLayer&, Pass, Pass) const override { return true; }
  FitOutput fit_output(const BatchedLayer&) const override { return FitOutput::kInput; }
  void backward(const LaneStore& s, const BatchedLayer& L, const float* in, const float*, const float* g,
                float* dx) const override {
    const LayerSpec& l = L.spec;
    const bool trainable = L.mode.trainable;
    if (s.V > 1) {
      const auto& k = lanes::active();
      const int64_t V = s.V;
      if (L.lazy_params != nullptr) {  // the lanes hold nothing of this layer yet: only this step may run
        TORCH_CHECK(trainable && s.sgd != nullptr && s.rows == 1, "batched engine: deferred Dense lanes outside a fused one-row SGD step");
        const float* ws = L.lazy_params + L.at[0];
        const float* bs = l.use_bias ? L.lazy_params + L.at[1] : nullptr;
        for (int64_t grp = 0; grp < s.groups(); ++grp)
          k.dense_backward_sgd_same(ws, bs, s.P(grp) + L.at[0] * V, l.use_bias ? s.P(grp) + L.at[1] * V : nullptr,
                                    in + grp * s.stride * l.in * V, g + grp * s.stride * l.out * V,
                                    L.need_dx ? dx + grp * s.stride * l.in * V : nullptr, l.out, l.in, false, *s.sgd);
        return;
      }
      if (trainable && s.sgd != nullptr) {
        for (int64_t grp = 0; grp < s.groups(); ++grp)
          k.dense_backward_sgd(s.P(grp) + L.at[0] * V, l.use_bias ? s.P(grp) + L.at[1] * V : nullptr,
                               in + grp * s.stride * l.in * V, g + grp * s.stride * l.out * V,
                               L.need_dx ? dx + grp * s.stride * l.in * V : nullptr, s.rows, l.out, l.in,
                               s.rows >= kGemmRows, *s.sgd);
        return;
      }
      for (int64_t grp = 0; grp < s.groups(); ++grp)
        k.dense_backward(s.P(grp) + L.at[0] * V, in + grp * s.stride * l.in * V, g + grp * s.stride * l.out * V,
                         trainable ? s.G(grp) + L.at[0] * V : nullptr,
                         trainable && l.use_bias ? s.G(grp) + L.at[1] * V : nullptr,
                         L.need_dx ? dx + grp * s.stride * l.in * V : nullptr, s.rows, l.out, l.in, s.rows >= kGemmRows);
      return;
    }
    for (int64_t lane = 0; lane < s.lanes; ++lane) {
      const float* W = s.P(lane) + L.at[0];
      const float* X = in + lane * s.stride * l.in;
      const float* Gy = g + lane * s.stride * l.out;
      float* Dx = dx + lane * s.stride * l.in;
      float* dW = s.G(lane) + L.at[0];
      float* db = l.use_bias ? s.G(lane) + L.at[1] : nullptr;
      if (s.rows >= kGemmRows) {
        if (trainable) {
          s.scratch->resize(static_cast<size_t>(s.rows * l.out));
          kernels::transpose(Gy, s.scratch->data(), s.rows, l.out);
          kernels::gemm(s.scratch->data(), X, dW, l.out, s.rows, l.in, nullptr);
          if (db) {
            std::fill(db, db + l.out, 0.f);
            for (int64_t r = 0; r < s.rows; ++r)
              for (int64_t o = 0; o < l.out; ++o) db[o] += Gy[r * l.out + o];
          }
        }
        if (L.need_dx) kernels::gemm(Gy, W, Dx, s.rows, l.out, l.in, nullptr);
        continue;
      }
      if (trainable) {
        if (db)
          for (int64_t o = 0; o < l.out; ++o) {
            float sum = 0.f;
            for (int64_t r = 0; r < s.rows; ++r) sum += Gy[r * l.out + o];
            db[o] = sum;
          }
        for (int64_t r = 0; r < s.rows; ++r) kernels::outer(Gy + r * l.out, X + r * l.in, dW, l.out, l.in, r > 0);
      }
      if (L.need_dx)
        for (int64_t r = 0; r < s.rows; ++r) kernels::gemv_t(W, Gy + r * l.out, Dx + r * l.in, l.out, l.in);
    }
  }
  bool fuses_sgd() const override { return true; }
  bool passes_zero_gradient() const override { return true; }
  const char* keras_class(const LayerSpec&) const override { return "Dense"; }
  std::vector<KerasWeight> keras_weights(const LayerSpec& l) const override {
    std::vector<KerasWeight> w{{"kernel", "weight", true}};
    if (l.use_bias) w.push_back({"bias", "bias", false});
    return w;
  }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    return {"__torch__.torch.nn.modules.linear.Linear",
            {{"in_features", l.in}, {"out_features", l.out}},
            l.use_bias ? std::vector<std::string>{} : std::vector<std::string>{"bias"},
            "def forward(self, input: Tensor) -> Tensor:\n  return torch.linear(input, self.weight, self.bias)\n"};
  }
};

// ------------------------------------------------------------------------------ BatchNorm
/// Inference over n rows of C channels: alpha = gamma / sqrt(running_var + eps),
/// y = x * alpha + (beta - mean * alpha); istd receives 1 / sqrt(running_var + eps), or holds it
/// already (`istd_current`). This forward runs for every evaluation and every frozen-BatchNorm
/// step. With Xb, a second input on the same state (an inference pass and a fit pass on running
/// statistics) goes to Yb with the same scale and shift: the same values as two calls.
/// `kept` (2C floats: scale, shift), when given, holds them between passes: `kept_current`, they
/// are already there (computed at this state); else they are computed into it.
void bn_inference(const LaneStore& s, int64_t C, int64_t n, float eps, const float* gamma, const float* beta,
                  const float* rm, const float* rv, float* istd, const float* X, float* Y, bool istd_current = false,
                  const float* Xb = nullptr, float* Yb = nullptr, float* kept = nullptr, bool kept_current = false) {
  const auto& k = lanes::active();
  float* alpha = kept != nullptr ? kept : s.stat(C, 0);
  float* shift = kept != nullptr ? kept + C : s.stat(C, 1);
  if (kept == nullptr || !kept_current) {
    if (!istd_current) k.inv_sqrt(rv, eps, istd, C);
    k.bn_scale_shift(gamma, beta, rm, istd, alpha, shift, C);
  }
  k.bn_affine(X, alpha, shift, Y, n, C);
  if (Xb != nullptr) k.bn_affine(Xb, alpha, shift, Yb, n, C);
}

/// A group's kept scale and shift: after `offset` floats of saved_c, 2C per group.
float* bn_kept(const LaneStore& s, const BatchedLayer& L, int64_t offset, int64_t group) {
  return L.saved_c + offset + group * 2 * L.spec.out * s.V;
}

/// Tensor positions in BatchNormKind::state(): gamma and beta exist only with scale/center.
enum BnSlot { kGamma, kBeta, kMean, kVar, kCount };

/// One lane's gamma and beta (nullptr when absent) and running statistics, for the kinds that
/// share BatchNorm's first slots.
struct BnLane {
  const float* gamma;
  const float* beta;
  float* rm;
  float* rv;
};
BnLane bn_lane(const LaneStore& s, const BatchedLayer& L, int64_t group) {
  const int64_t V = s.V;
  return {L.at[kGamma] >= 0 ? s.P(group) + L.at[kGamma] * V : nullptr, L.at[kBeta] >= 0 ? s.P(group) + L.at[kBeta] * V : nullptr,
          s.B(group) + L.at[kMean] * V, s.B(group) + L.at[kVar] * V};
}

class BatchNormKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec& l) const override {
    // Always five entries, so slots keep their positions; an absent one has an empty shape
    // and no offset (BatchedLayer::at is -1 for it).
    return {{"weight", StateTensor::kParameter, l.scale ? std::vector<int64_t>{l.out} : std::vector<int64_t>{}},
            {"bias", StateTensor::kParameter, l.center ? std::vector<int64_t>{l.out} : std::vector<int64_t>{}},
            {"running_mean", StateTensor::kBuffer, {l.out}},
            {"running_var", StateTensor::kBuffer, {l.out}},
            {"num_batches_tracked", StateTensor::kCounter, {}}};
  }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>&) const override {
    return torch::nn::AnyModule(BatchNorm(
        BatchNormOptions(l.out).eps(l.eps).momentum(l.momentum).scale(l.scale).center(l.center).semantics(l.semantics)));
  }
  void saved_sizes(const LayerSpec& l, int64_t lanes, int64_t stride, int64_t& saved, int64_t& saved_c) const override {
    saved = lanes * stride * l.out;
    saved_c = 3 * lanes * l.out;  // 1/sqrt(var + eps); the kept scale and shift
  }
  static bool batch_stats(const BatchedLayer& L, Pass pass) {
    return pass == Pass::kFit ? L.mode.fit_batch_stats : pass == Pass::kInfer ? L.mode.infer_batch_stats : false;
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass pass, const float* in, float* out) const override {
    const int64_t C = L.spec.out * s.V, n = s.rows;  // a group's channels x lanes
    const bool batch = batch_stats(L, pass);
    const float eps = static_cast<float>(L.spec.eps);
    const auto& k = lanes::active();
    const bool current = !batch && L.istd_version == s.version;
    L.istd_version = batch ? 0 : s.version;  // saved_c: batch statistics, or the running ones
    // Scale and shift kept while gamma and beta do not train (nothing else changes them here).
    const bool keep = !batch && !L.mode.trainable;
    const bool kept_current = keep && L.affine_version == s.version;
    L.affine_version = keep ? s.version : 0;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const float* X = in + grp * s.stride * C;
      float* Y = out + grp * s.stride * C;
      const auto [gamma, beta, rm, rv] = bn_lane(s, L, grp);
      float* istd = L.saved_c + grp * C;
      if (!batch) {
        bn_inference(s, C, n, eps, gamma, beta, rm, rv, istd, X, Y, current, nullptr, nullptr,
                     keep ? bn_kept(s, L, s.groups() * C, grp) : nullptr, kept_current);
        continue;
      }
      // Batch statistics: mean and biased variance over the rows (with one row, x - mean is
      // exactly 0 and every unit outputs beta, as in Keras).
      float* xhat = L.saved + grp * s.stride * C;
      float* mean = s.stat(C, 0);
      float* var = s.stat(C, 1);
      k.bn_moments(X, n, C, mean, var);
      const bool prior = pass == Pass::kFit && L.mode.prior >= 0;
      if (prior) {
        // prior_bn: p * running + (1 - p) * batch, the batch variance biased under Keras numerics
        // and unbiased (robusta's momentum-1 BatchNorm) under PyTorch's; nothing is updated.
        const float p = static_cast<float>(L.mode.prior), q = static_cast<float>(1.0 - L.mode.prior);
        const float unbias = variance_unbias(L.spec.semantics, n);
        for (int64_t c = 0; c < C; ++c) {
          mean[c] = rm[c] * p + mean[c] * q;
          var[c] = rv[c] * p + var[c] * unbias * q;
        }
      }
      k.inv_sqrt(var, eps, istd, C);
      k.bn_normalize(X, mean, istd, gamma, beta, xhat, Y, n, C);
      if (pass == Pass::kFit && L.mode.counts) s.count(grp, L.at[kCount]);
      if (pass == Pass::kFit && !L.mode.updates) continue;
      const bool keras = L.spec.semantics == BnSemantics::kKeras;
      k.bn_running(rm, rv, mean, var, static_cast<float>(L.mode.momentum), keras, variance_unbias(L.spec.semantics, n), C);
    }
  }
  void forward_pair(const LaneStore& s, BatchedLayer& L, Pass first, const float* in_a, float* out_a, Pass second,
                    const float* in_b, float* out_b) const override {
    if (!batch_stats(L, first) && second == Pass::kFit && L.mode.fit_batch_stats && L.mode.prior < 0 && s.rows == 1) {
      // Running statistics, then one row's own (train's pair): one kernel, the two forward calls' values.
      const int64_t C = L.spec.out * s.V;
      L.istd_version = 0;  // saved_c ends with the fit pass's 1/sqrt, as after forward(kFit)
      L.affine_version = 0;
      const bool keras = L.spec.semantics == BnSemantics::kKeras;
      for (int64_t grp = 0; grp < s.groups(); ++grp) {
        const auto [gamma, beta, rm, rv] = bn_lane(s, L, grp);
        const int64_t at = grp * s.stride * C;
        lanes::active().bn_pair_one_row(in_a + at, out_a + at, in_b + at, out_b + at, L.saved + at, L.saved_c + grp * C,
                                        gamma, beta, rm, rv, static_cast<float>(L.spec.eps), L.mode.updates,
                                        static_cast<float>(L.mode.momentum), keras, variance_unbias(L.spec.semantics, s.rows), C);
        if (L.mode.counts) s.count(grp, L.at[kCount]);
      }
      return;
    }
    if (batch_stats(L, first) || batch_stats(L, second)) {
      LayerKindDef::forward_pair(s, L, first, in_a, out_a, second, in_b, out_b);
      return;
    }
    // Both on the running statistics, which neither pass then changes (forward: no update without
    // batch statistics): scale and shift once for both.
    const int64_t C = L.spec.out * s.V;
    const bool current = L.istd_version == s.version;
    L.istd_version = s.version;
    const bool keep = !L.mode.trainable;
    const bool kept_current = keep && L.affine_version == s.version;
    L.affine_version = keep ? s.version : 0;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const auto [gamma, beta, rm, rv] = bn_lane(s, L, grp);
      const int64_t at = grp * s.stride * C;
      bn_inference(s, C, s.rows, static_cast<float>(L.spec.eps), gamma, beta, rm, rv, L.saved_c + grp * C, in_a + at,
                   out_a + at, current, in_b + at, out_b + at, keep ? bn_kept(s, L, s.groups() * C, grp) : nullptr,
                   kept_current);
    }
  }
  // On the running statistics, a pass writes nothing they depend on (no update without batch
  // statistics). On one batch's statistics (not prior_bn's mix) its output is the input's.
  bool same_passes(const BatchedLayer& L, Pass a, Pass b) const override { return !batch_stats(L, a) && !batch_stats(L, b); }
  bool passes_zero_gradient() const override { return true; }
  FitOutput fit_output(const BatchedLayer& L) const override {
    return L.mode.fit_batch_stats && L.mode.prior < 0 ? FitOutput::kInputWrites : FitOutput::kMore;
  }
  void backward(const LaneStore& s, const BatchedLayer& L, const float* in, const float*, const float* g,
                float* dx) const override {
    const int64_t C = L.spec.out * s.V, n = s.rows;  // a group's channels x lanes
    // Batch statistics in the fit forward; prior_bn's mixed ones are constants in the gradient.
    const bool batch = L.mode.fit_batch_stats;
    const bool through_stats = batch && L.mode.prior < 0;
    const auto& k = lanes::active();
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const float* X = in + grp * s.stride * C;
      const float* Gy = g + grp * s.stride * C;
      float* Dx = dx + grp * s.stride * C;
      const BnLane state = bn_lane(s, L, grp);
      const float* gamma = state.gamma;
      const float* rm = state.rm;
      const float* istd = L.saved_c + grp * C;
      const float* xhat = L.saved + grp * s.stride * C;
      float* sum_g = s.stat(C, 0);
      float* sum_gx = s.stat(C, 1);
      // The sums are dgamma and dbeta; dx needs them only through the batch statistics.
      if (L.mode.trainable || through_stats) k.bn_sums(Gy, batch ? xhat : nullptr, X, rm, istd, sum_g, sum_gx, n, C);
      if (L.mode.trainable) {
        if (L.at[kGamma] >= 0) std::copy(sum_gx, sum_gx + C, s.G(grp) + L.at[kGamma] * s.V);
        if (L.at[kBeta] >= 0) std::copy(sum_g, sum_g + C, s.G(grp) + L.at[kBeta] * s.V);
      }
      if (!L.need_dx) continue;
      if (through_stats) k.bn_dx_batch(Gy, xhat, gamma, istd, sum_g, sum_gx, Dx, n, C);
      else k.bn_dx_fixed(Gy, gamma, istd, Dx, n, C);
    }
  }
  const char* keras_class(const LayerSpec&) const override { return "BatchNormalization"; }
  std::vector<KerasWeight> keras_weights(const LayerSpec& l) const override {
    std::vector<KerasWeight> w;
    if (l.scale) w.push_back({"gamma", "weight", false});
    if (l.center) w.push_back({"beta", "bias", false});
    w.push_back({"moving_mean", "running_mean", false});
    w.push_back({"moving_variance", "running_var", false});
    return w;
  }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    // torch.nn.BatchNorm1d's forward with its constants inlined, as torch.jit.script writes it
    // (PyTorch's numerics in training mode whatever model.batchnorm.semantics was).
    std::vector<std::string> none;
    if (!l.scale) none.emplace_back("weight");
    if (!l.center) none.emplace_back("bias");
    return {"__torch__.torch.nn.modules.batchnorm.BatchNorm1d",
            {{"momentum", l.momentum}, {"eps", l.eps}, {"track_running_stats", true}, {"affine", l.scale && l.center},
             {"num_features", l.out}},
            none,
            "def forward(self, input: Tensor) -> Tensor:\n"
            "  if self.training:\n"
            "    self.num_batches_tracked.add_(1)\n"
            "  return torch.batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var, self.training, " +
                script_float(l.momentum) + ", " + script_float(l.eps) + ", False)\n"};
  }
  bool selectable() const override { return true; }
};

// ------------------------------------------------------------------------- BatchRenorm1d
/// Tensor positions in BatchRenormKind::state(): BatchNorm's five, then the renorm statistics.
enum RenormSlot { kRenormMean = kCount + 1, kRenormStd, kMovingStd };
/// Per-channel values a renorm forward keeps per lane: 1/sqrt(var + eps), r, d, sqrt(var + eps).
constexpr int64_t kRenormSaved = 4;

/// Keras 3.14's BatchNormalization(renorm=True) under Keras numerics (see BatchRenormImpl in
/// nn.hpp for the order of operations, which this follows in float).
class BatchRenormKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec& l) const override {
    auto s = layer_kind(LayerKind::kBatchNorm).state(l);
    s.push_back({"renorm_mean", StateTensor::kBuffer, {l.out}});
    s.push_back({"renorm_stddev", StateTensor::kBuffer, {l.out}});
    s.push_back({"moving_stddev", StateTensor::kBuffer, {l.out}});
    return s;
  }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>&) const override {
    return torch::nn::AnyModule(BatchRenorm(l));
  }
  void saved_sizes(const LayerSpec& l, int64_t lanes, int64_t stride, int64_t& saved, int64_t& saved_c) const override {
    saved = lanes * stride * l.out;
    saved_c = kRenormSaved * lanes * l.out;  // 1/sqrt(var + eps), r, d, sqrt(var + eps)
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass pass, const float* in, float* out) const override {
    const int64_t C = L.spec.out * s.V, n = s.rows;  // a group's channels x lanes
    const float eps = static_cast<float>(L.spec.eps);
    const float sqrt_eps = std::sqrt(eps);
    const LayerSpec& l = L.spec;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const float* X = in + grp * s.stride * C;
      float* Y = out + grp * s.stride * C;
      const auto [gamma, beta, rm, rv] = bn_lane(s, L, grp);
      float* b = s.B(grp);
      float *ren_mean = b + L.at[kRenormMean] * s.V, *ren_std = b + L.at[kRenormStd] * s.V, *mov_std = b + L.at[kMovingStd] * s.V;
      float* istd = L.saved_c + kRenormSaved * grp * C;
      float* r = istd + C;
      float* d = istd + 2 * C;
      float* stddev = istd + 3 * C;  // sqrt(var + eps), for the updates
      if (pass != Pass::kFit) {  // inference is plain BatchNorm on the moving statistics
        bn_inference(s, C, n, eps, gamma, beta, rm, rv, istd, X, Y);
        continue;
      }
      float* xhat = L.saved + grp * s.stride * C;
      float* mean = s.stat(C, 0);
      float* var = s.stat(C, 1);
      lanes::active().bn_moments(X, n, C, mean, var);
      for (int64_t c = 0; c < C; ++c) {
        stddev[c] = std::sqrt(var[c] + eps);
        const float rs = std::max(ren_std[c], sqrt_eps);
        float rc = stddev[c] / rs, dc = (mean[c] - ren_mean[c]) / rs;
        if (l.renorm_has_rmin) rc = std::max(rc, static_cast<float>(l.renorm_rmin));
        if (l.renorm_has_rmax) rc = std::min(rc, static_cast<float>(l.renorm_rmax));
        if (l.renorm_has_dmax) dc = std::min(std::max(dc, static_cast<float>(-l.renorm_dmax)), static_cast<float>(l.renorm_dmax));
        r[c] = rc;
        d[c] = dc;
      }
      lanes::active().inv_sqrt(var, eps, istd, C);
      for (int64_t c = 0; c < C; ++c) {
        const float eff_gamma = gamma ? r[c] * gamma[c] : r[c];
        float eff_beta = gamma ? d[c] * gamma[c] : d[c];
        if (beta) eff_beta = eff_beta + beta[c];
        const float scale = istd[c] * eff_gamma;
        for (int64_t row = 0; row < n; ++row) {
          const float centred = X[row * C + c] - mean[c];
          xhat[row * C + c] = centred * istd[c];
          Y[row * C + c] = centred * scale + eff_beta;
        }
      }
      if (L.mode.counts) s.count(grp, L.at[kCount]);
      // Keras' updates in its own convention (momentum K = 1 - m, taken to float32 as Keras does).
      const double km = 1.0 - L.mode.momentum, kr = 1.0 - l.renorm_momentum;
      const float km_f = static_cast<float>(km), km_new = static_cast<float>(1.0 - km);
      const float kr_f = static_cast<float>(kr), kr_new = static_cast<float>(1.0 - kr);
      for (int64_t c = 0; c < C; ++c) {
        ren_mean[c] = ren_mean[c] * kr_f + mean[c] * kr_new;
        ren_std[c] = ren_std[c] * kr_f + stddev[c] * kr_new;
        rm[c] = rm[c] * km_f + mean[c] * km_new;
        mov_std[c] = mov_std[c] * km_f + stddev[c] * km_new;
        rv[c] = std::max(mov_std[c] * mov_std[c] - eps, 0.f);
      }
    }
  }
  void backward(const LaneStore& s, const BatchedLayer& L, const float*, const float*, const float* g,
                float* dx) const override {
    const int64_t C = L.spec.out * s.V, n = s.rows;  // a group's channels x lanes
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const float* Gy = g + grp * s.stride * C;
      float* Dx = dx + grp * s.stride * C;
      const float* gamma = bn_lane(s, L, grp).gamma;
      const float* istd = L.saved_c + kRenormSaved * grp * C;
      const float* r = istd + C;
      const float* d = istd + 2 * C;
      const float* xhat = L.saved + grp * s.stride * C;
      float* sum_g = s.stat(C, 0);
      float* sum_gx = s.stat(C, 1);
      float* scale = s.stat(C, 2);
      const auto& k = lanes::active();
      k.bn_sums(Gy, xhat, nullptr, nullptr, nullptr, sum_g, sum_gx, n, C);
      // y = x-hat * (r gamma) + (d gamma + beta), r and d constants: dgamma = r sum(g x-hat) + d sum(g).
      if (L.mode.trainable) {
        if (L.at[kGamma] >= 0)
          for (int64_t c = 0; c < C; ++c) s.G(grp)[L.at[kGamma] * s.V + c] = sum_gx[c] * r[c] + sum_g[c] * d[c];
        if (L.at[kBeta] >= 0) std::copy(sum_g, sum_g + C, s.G(grp) + L.at[kBeta] * s.V);
      }
      if (!L.need_dx) continue;
      for (int64_t c = 0; c < C; ++c) scale[c] = gamma ? r[c] * gamma[c] : r[c];
      k.bn_dx_batch(Gy, xhat, scale, istd, sum_g, sum_gx, Dx, n, C);
    }
  }
  const char* keras_class(const LayerSpec&) const override { return "BatchNormalization"; }
  std::vector<KerasWeight> keras_weights(const LayerSpec& l) const override {
    return layer_kind(LayerKind::kBatchNorm).keras_weights(l);  // what inference needs
  }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    // Inference only (plain BatchNorm on the moving statistics): torch.nn has no renormalization.
    std::vector<std::string> none;
    if (!l.scale) none.emplace_back("weight");
    if (!l.center) none.emplace_back("bias");
    return {"__torch__.bnlab.BatchRenorm1d",
            {{"eps", l.eps}, {"num_features", l.out}},
            none,
            "def forward(self, input: Tensor) -> Tensor:\n"
            "  return torch.batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var, False, 0.0, " +
                script_float(l.eps) + ", False)\n"};
  }
  bool selectable() const override { return true; }
};

// ----------------------------------------------------------------------- FrozenBatchNorm1d
/// A lane group's weight, bias, running mean and running variance (all buffers).
BnLane frozen_lane(const LaneStore& s, const BatchedLayer& L, int64_t group) {
  float* b = s.B(group);
  return {b + L.at[0] * s.V, b + L.at[1] * s.V, b + L.at[2] * s.V, b + L.at[3] * s.V};
}

class FrozenBatchNormKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec& l) const override {
    return {{"weight", StateTensor::kBuffer, {l.out}},
            {"bias", StateTensor::kBuffer, {l.out}},
            {"running_mean", StateTensor::kBuffer, {l.out}},
            {"running_var", StateTensor::kBuffer, {l.out}}};
  }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>&) const override {
    return torch::nn::AnyModule(FrozenBatchNorm(l.out, l.eps));
  }
  void saved_sizes(const LayerSpec& l, int64_t lanes, int64_t, int64_t& saved, int64_t& saved_c) const override {
    saved = 0;
    saved_c = 2 * lanes * l.out;  // scale and shift, kept: its four tensors are buffers no pass changes
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass, const float* in, float* out) const override {
    const int64_t C = L.spec.out * s.V;  // a group's channels x lanes
    const float eps = static_cast<float>(L.spec.eps);
    // scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale: BatchNorm's
    // inference with the four tensors as buffers.
    const bool kept_current = L.affine_version == s.version;
    L.affine_version = s.version;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {
      const auto [w, bias, rm, rv] = frozen_lane(s, L, grp);
      bn_inference(s, C, s.rows, eps, w, bias, rm, rv, s.stat(C, 2), in + grp * s.stride * C, out + grp * s.stride * C,
                   false, nullptr, nullptr, bn_kept(s, L, 0, grp), kept_current);
    }
  }
  void forward_pair(const LaneStore& s, BatchedLayer& L, Pass, const float* in_a, float* out_a, Pass,
                    const float* in_b, float* out_b) const override {
    const int64_t C = L.spec.out * s.V;
    const bool kept_current = L.affine_version == s.version;
    L.affine_version = s.version;
    for (int64_t grp = 0; grp < s.groups(); ++grp) {  // every pass is the same inference: scale and shift once
      const auto [w, bias, rm, rv] = frozen_lane(s, L, grp);
      const int64_t at = grp * s.stride * C;
      bn_inference(s, C, s.rows, static_cast<float>(L.spec.eps), w, bias, rm, rv, s.stat(C, 2), in_a + at, out_a + at,
                   false, in_b + at, out_b + at, bn_kept(s, L, 0, grp), kept_current);
    }
  }
  bool same_passes(const BatchedLayer&, Pass, Pass) const override { return true; }
  FitOutput fit_output(const BatchedLayer&) const override { return FitOutput::kInput; }  // buffers no pass writes
  void backward(const LaneStore& s, const BatchedLayer& L, const float*, const float*, const float* g,
                float* dx) const override {
    const int64_t C = L.spec.out * s.V;  // a group's channels x lanes
    // The fit pass's scale, kept by its forward at this state (a backward follows its forward).
    TORCH_CHECK(L.affine_version == s.version, "FrozenBatchNorm1d backward without its forward pass");
    for (int64_t grp = 0; grp < s.groups(); ++grp)
      lanes::active().bn_affine(g + grp * s.stride * C, bn_kept(s, L, 0, grp), nullptr, dx + grp * s.stride * C, s.rows, C);
  }
  // The same four tensors under the same names as a BatchNormalization layer.
  const char* keras_class(const LayerSpec&) const override { return "BatchNormalization"; }
  std::vector<KerasWeight> keras_weights(const LayerSpec&) const override {
    return {{"gamma", "weight", false}, {"beta", "bias", false}, {"moving_mean", "running_mean", false},
            {"moving_variance", "running_var", false}};
  }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    const std::string eps = script_float(l.eps);
    return {"__torch__.bnlab.FrozenBatchNorm1d",
            {{"eps", l.eps}, {"num_features", l.out}},
            {},
            "def forward(self, input: Tensor) -> Tensor:\n"
            "  scale = self.weight * torch.rsqrt(self.running_var + " + eps + ")\n"
            "  shift = self.bias - self.running_mean * scale\n"
            "  return input * scale + shift\n"};
  }
  bool selectable() const override { return true; }
};

// ----------------------------------------------------------------------------- activations
/// y = f(x) and dL/dx = g * f'(x) (from x and y) for n elements; every activation is one case
/// of each switch, so a new one cannot fall through to another's formula.
void activation_forward(Activation a, float alpha, const float* x, float* y, int64_t n) {
  switch (a) {
    case Activation::kLinear: std::copy(x, x + n, y); return;
    case Activation::kRelu: lanes::active().relu_forward(x, y, n); return;
    case Activation::kTanh:
      for (int64_t k = 0; k < n; ++k) y[k] = std::tanh(x[k]);
      return;
    case Activation::kGelu:
      for (int64_t k = 0; k < n; ++k) y[k] = x[k] * 0.5f * (1.f + std::erf(x[k] * static_cast<float>(M_SQRT1_2)));
      return;
    case Activation::kSigmoid:
      for (int64_t k = 0; k < n; ++k) y[k] = 1.f / (1.f + std::exp(-x[k]));
      return;
    case Activation::kElu:
      for (int64_t k = 0; k < n; ++k) y[k] = x[k] > 0.f ? x[k] : alpha * std::expm1(x[k]);
      return;
    case Activation::kLeakyRelu:
      for (int64_t k = 0; k < n; ++k) y[k] = x[k] > 0.f ? x[k] : x[k] * alpha;
      return;
    case Activation::kSilu:
      for (int64_t k = 0; k < n; ++k) y[k] = x[k] / (1.f + std::exp(-x[k]));
      return;
    case Activation::kSoftplus:
      // PyTorch's Softplus (beta 1, threshold 20): x itself above 20, where log1p(exp(x)) rounds to x.
      for (int64_t k = 0; k < n; ++k) y[k] = x[k] > 20.f ? x[k] : std::log1p(std::exp(x[k]));
      return;
  }
  throw std::logic_error("activation_forward: unregistered activation");
}

void activation_backward(Activation a, float alpha, const float* x, const float* y, const float* g, float* dx,
                         int64_t n) {
  switch (a) {
    case Activation::kLinear: std::copy(g, g + n, dx); return;
    case Activation::kRelu: lanes::active().relu_backward(y, g, dx, n); return;
    case Activation::kTanh:
      for (int64_t k = 0; k < n; ++k) dx[k] = g[k] * (1.f - y[k] * y[k]);
      return;
    case Activation::kGelu:
      for (int64_t k = 0; k < n; ++k) {
        const float v = x[k];
        const float cdf = 0.5f * (1.f + std::erf(v * static_cast<float>(M_SQRT1_2)));
        const float pdf = std::exp(-0.5f * v * v) * static_cast<float>(M_2_SQRTPI * M_SQRT1_2 * 0.5);
        dx[k] = g[k] * (cdf + v * pdf);
      }
      return;
    case Activation::kSigmoid:
      for (int64_t k = 0; k < n; ++k) dx[k] = g[k] * (y[k] * (1.f - y[k]));
      return;
    case Activation::kElu:
      for (int64_t k = 0; k < n; ++k) dx[k] = x[k] > 0.f ? g[k] : g[k] * (y[k] + alpha);
      return;
    case Activation::kLeakyRelu:
      for (int64_t k = 0; k < n; ++k) dx[k] = x[k] > 0.f ? g[k] : g[k] * alpha;
      return;
    case Activation::kSilu:
      for (int64_t k = 0; k < n; ++k) {
        const float sig = 1.f / (1.f + std::exp(-x[k]));
        dx[k] = g[k] * (sig * (1.f + x[k] * (1.f - sig)));
      }
      return;
    case Activation::kSoftplus:
      for (int64_t k = 0; k < n; ++k) {
        const float z = std::exp(x[k]);
        dx[k] = x[k] > 20.f ? g[k] : g[k] * (z / (z + 1.f));
      }
      return;
  }
  throw std::logic_error("activation_backward: unregistered activation");
}

class ActivationKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec&) const override { return {}; }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>&) const override {
    return torch::nn::AnyModule(ActivationModule(l.activation, l.alpha));
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass, const float* in, float* out) const override {
    activation_forward(L.spec.activation, static_cast<float>(L.spec.alpha), in, out, s.lanes * s.stride * L.spec.out);
  }
  bool same_passes(const BatchedLayer&, Pass, Pass) const override { return true; }
  FitOutput fit_output(const BatchedLayer&) const override { return FitOutput::kInput; }
  bool passes_zero_gradient() const override { return true; }
  void backward(const LaneStore& s, const BatchedLayer& L, const float* in, const float* out, const float* g,
                float* dx) const override {
    activation_backward(L.spec.activation, static_cast<float>(L.spec.alpha), in, out, g, dx, s.lanes * s.stride * L.spec.out);
  }
  const char* keras_class(const LayerSpec&) const override { return "Activation"; }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    const std::string a = script_float(l.alpha);
    const auto cls = [](const char* name, std::vector<std::pair<std::string, c10::IValue>> constants, const std::string& expr) {
      return TorchScriptClass{std::string("__torch__.torch.nn.modules.") + name, std::move(constants), {},
                              "def forward(self, input: Tensor) -> Tensor:\n  return " + expr + "\n"};
    };
    switch (l.activation) {
      case Activation::kLinear: return cls("linear.Identity", {}, "input");
      case Activation::kRelu: return cls("activation.ReLU", {{"inplace", false}}, "torch.relu(input)");
      case Activation::kTanh: return cls("activation.Tanh", {}, "torch.tanh(input)");
      case Activation::kGelu: return cls("activation.GELU", {{"approximate", std::string("none")}}, "torch.gelu(input)");
      case Activation::kSigmoid: return cls("activation.Sigmoid", {}, "torch.sigmoid(input)");
      case Activation::kElu: return cls("activation.ELU", {{"alpha", l.alpha}, {"inplace", false}}, "torch.elu(input, " + a + ")");
      case Activation::kLeakyRelu:
        return cls("activation.LeakyReLU", {{"negative_slope", l.alpha}, {"inplace", false}}, "torch.leaky_relu(input, " + a + ")");
      case Activation::kSilu: return cls("activation.SiLU", {{"inplace", false}}, "torch.silu(input)");
      case Activation::kSoftplus: return cls("activation.Softplus", {{"beta", 1}, {"threshold", 20}}, "torch.softplus(input, 1, 20)");
    }
    throw std::logic_error("torchscript: unregistered activation");
  }
};

// --------------------------------------------------------------------------------- Dropout
class DropoutKind final : public LayerKindDef {
 public:
  std::vector<StateTensor> state(const LayerSpec&) const override { return {}; }
  torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>& gen) const override {
    Dropout d(l.rate);
    d->generator = gen;
    return torch::nn::AnyModule(d);
  }
  void saved_sizes(const LayerSpec& l, int64_t lanes, int64_t stride, int64_t& saved, int64_t& saved_c) const override {
    saved = lanes * stride * l.out;  // the mask
    saved_c = 0;
  }
  void forward(const LaneStore& s, BatchedLayer& L, Pass pass, const float* in, float* out) const override {
    const int64_t W = L.spec.out;
    if (pass != Pass::kFit || L.spec.rate == 0) {
      std::copy(in, in + s.lanes * s.stride * W, out);
      return;
    }
    const float keep = static_cast<float>(1 - L.spec.rate);
    const int64_t V = s.V;
    for (int64_t lane = 0; lane < s.lanes; ++lane) {
      const int64_t grp = lane / V, v = lane % V;
      float* mask = L.saved + grp * s.stride * W * V;
      // The same draw as bnlab::Dropout: bernoulli_(1 - p) on a [rows, width] tensor from the lane's
      // generator (a padding lane of a group has none and keeps its mask of zeros).
      auto& gen = (*s.generators)[static_cast<size_t>(lane)];
      if (gen == nullptr && lane >= s.used) continue;
      TORCH_CHECK(gen != nullptr, "batched engine: lane ", lane, " has no dropout generator");
      if (V == 1) {
        wrap(mask, {s.rows, W}).bernoulli_(1 - L.spec.rate, *gen);
        continue;
      }
      // Drawn contiguously, as the torch engine draws, then spread to the lane's column.
      s.scratch->resize(static_cast<size_t>(s.rows * W));
      float* draw = s.scratch->data();
      wrap(draw, {s.rows, W}).bernoulli_(1 - L.spec.rate, *gen);
      for (int64_t k = 0; k < s.rows * W; ++k) mask[k * V + v] = draw[k];
    }
    for (int64_t grp = 0; grp < s.groups(); ++grp) {  // element-wise over each group's rows in use
      const int64_t base = grp * s.stride * W * V, used = s.rows * W * V;
      for (int64_t k = base; k < base + used; ++k) out[k] = in[k] * L.saved[k] / keep;
    }
  }
  // A copy unless a fit pass draws a mask.
  bool same_passes(const BatchedLayer& L, Pass a, Pass b) const override {
    return L.spec.rate == 0 || (a != Pass::kFit && b != Pass::kFit);
  }
  FitOutput fit_output(const BatchedLayer& L) const override { return L.spec.rate == 0 ? FitOutput::kInput : FitOutput::kMore; }
  bool passes_zero_gradient() const override { return true; }  // g / keep * mask
  void backward(const LaneStore& s, const BatchedLayer& L, const float*, const float*, const float* g,
                float* dx) const override {
    const int64_t n = s.lanes * s.stride * L.spec.out;
    if (L.spec.rate == 0) {
      std::copy(g, g + n, dx);
      return;
    }
    const float* mask = L.saved;
    const float keep = static_cast<float>(1 - L.spec.rate);
    for (int64_t k = 0; k < n; ++k) dx[k] = g[k] / keep * mask[k];
  }
  const char* keras_class(const LayerSpec&) const override { return "Dropout"; }
  TorchScriptClass torchscript(const LayerSpec& l) const override {
    return {"__torch__.torch.nn.modules.dropout.Dropout", {{"p", l.rate}, {"inplace", false}}, {},
            "def forward(self, input: Tensor) -> Tensor:\n  return torch.dropout(input, " + script_float(l.rate) +
                ", self.training)\n"};
  }
};

}  // namespace

const LayerKindDef& layer_kind(LayerKind kind) {
  static const DenseKind kDense;
  static const BatchNormKind kBatchNorm;
  static const FrozenBatchNormKind kFrozen;
  static const ActivationKind kActivation;
  static const DropoutKind kDropout;
  static const BatchRenormKind kRenorm;
  switch (kind) {
    case LayerKind::kDense: return kDense;
    case LayerKind::kBatchNorm: return kBatchNorm;
    case LayerKind::kFrozenBatchNorm: return kFrozen;
    case LayerKind::kActivation: return kActivation;
    case LayerKind::kDropout: return kDropout;
    case LayerKind::kBatchRenorm: return kRenorm;
  }
  throw std::logic_error("layer_kind: unregistered kind");
}

const std::vector<LayerKind>& all_layer_kinds() {
  static const std::vector<LayerKind> kAll = {LayerKind::kDense, LayerKind::kBatchNorm, LayerKind::kFrozenBatchNorm,
                                              LayerKind::kActivation, LayerKind::kDropout, LayerKind::kBatchRenorm};
  return kAll;
}

torch::Tensor activation_torch(Activation a, double alpha, const torch::Tensor& x) {
  namespace F = torch::nn::functional;
  switch (a) {
    case Activation::kLinear: return x;
    case Activation::kRelu: return torch::relu(x);
    case Activation::kTanh: return torch::tanh(x);
    case Activation::kGelu: return torch::gelu(x);
    case Activation::kSigmoid: return torch::sigmoid(x);
    case Activation::kElu: return F::elu(x, F::ELUFuncOptions().alpha(alpha));
    case Activation::kLeakyRelu: return F::leaky_relu(x, F::LeakyReLUFuncOptions().negative_slope(alpha));
    case Activation::kSilu: return F::silu(x);
    case Activation::kSoftplus: return F::softplus(x);
  }
  throw std::logic_error("activation_torch: unregistered activation");
}

}  // namespace bnlab
