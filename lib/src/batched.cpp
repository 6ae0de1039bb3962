// The batched engine: hand-written forward, backward and optimizer kernels over K lanes, each
// lane a full copy of the network's state. See batched.hpp and docs/performance.md.
#include "batched.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <stdexcept>

#include <map>

#include "lane_kernels.hpp"
#include "layer_kinds.hpp"
#include "optimizers.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

/// A segment of the parameter block that the optimizer steps.
struct Segment {
  int64_t offset, size;
  bool empty() const { return size == 0; }
};

torch::Tensor wrap(float* p, std::initializer_list<int64_t> sizes) {
  return torch::from_blob(p, sizes, torch::TensorOptions().dtype(torch::kFloat));
}

/// set_zero_gradient_shortcut's switch (on unless a test turns it off).
std::atomic<bool> zero_gradient_shortcut_on{true};
std::atomic<uint64_t> zero_gradient_shortcut_count{0};
bool zero_gradient_shortcut() { return zero_gradient_shortcut_on.load(std::memory_order_relaxed); }
std::atomic<uint64_t> pair_shared_count{0}, pair_kept_count{0};

/// The network as flat arrays: lanes x (parameters, buffers, counters), plus the activations
/// of the last forward pass that the backward pass needs. Every layer's state and kernels come
/// from its kind's definition (layer_kinds.hpp); this class only lays out storage and runs them.
class Net {
 public:
  /// Reads the layers of `model`; `shared`: every lane reads one copy of the state
  /// (inference only), else each lane has its own.
  Net(const ModelImpl& model, int64_t lanes, int64_t rows, bool shared) {
    // Many lanes are interleaved in groups of lanes::kWidth (vertical SIMD, the last group padded);
    // one lane, or one shared copy, keeps the plain layout.
    const int64_t V = !shared && lanes > 1 ? lanes::kWidth : 1;
    store_.V = V;
    store_.used = lanes;
    lanes = (lanes + V - 1) / V * V;
    store_.lanes = lanes;
    store_.stride = rows;
    store_.shared = shared;
    inputs_ = model.inputs();
    int64_t max_width = model.inputs();
    for (const auto& spec : model.layers()) {
      BatchedLayer l;
      l.spec = spec;
      param_begin_.push_back(n_params_);
      for (const auto& t : layer_kind(spec.kind).state(spec)) {
        int64_t n = 1;
        for (int64_t d : t.shape) n *= d;
        const bool absent = t.where != StateTensor::kCounter && t.shape.empty();
        int64_t& total = t.where == StateTensor::kParameter ? n_params_ : t.where == StateTensor::kBuffer ? n_buffers_ : n_counts_;
        l.at.push_back(absent ? -1 : total);
        if (!absent) total += n;
      }
      max_width = std::max(max_width, spec.out);
      layers_.push_back(std::move(l));
      specs_.push_back(spec);
    }
    for (const auto& l : layers_) ranges_.push_back(parameter_range(l));
    deferred_.assign(layers_.size(), false);
    outputs_ = model.outputs();
    // Every float array in one arena (see Arena); the hottest pair, parameters and gradients, first.
    const int64_t copies = shared ? 1 : lanes;
    param_floats_ = static_cast<size_t>(copies * n_params_);
    // Parameters are written whole by load() and replicate() before any use (a Dense layer's, in
    // interleaved one-row lanes, deferred to its first step: see replicate()), and gradients by
    // every backward pass before the optimizer reads them: neither is zeroed.
    const size_t p = arena_.reserve(copies * n_params_, /*zeroed=*/false);
    const size_t g = arena_.reserve(shared ? 0 : copies * n_params_, /*zeroed=*/false);
    const size_t b = arena_.reserve(copies * n_buffers_);
    std::vector<size_t> act, saved, saved_c;
    for (const auto& l : layers_) {
      int64_t n = 0, n_c = 0;
      layer_kind(l.spec.kind).saved_sizes(l.spec, lanes, rows, n, n_c);
      act.push_back(arena_.reserve(lanes * rows * l.spec.out));
      saved.push_back(arena_.reserve(n));
      saved_c.push_back(arena_.reserve(n_c));
    }
    const size_t ga = arena_.reserve(lanes * rows * max_width), gb = arena_.reserve(lanes * rows * max_width);
    // forward_pair's inference pass: one row per lane, own state (fine-tuning on a sample) only.
    const int64_t pair = !shared && rows == 1 ? lanes * max_width : 0;
    const size_t ia = arena_.reserve(pair), ib = arena_.reserve(pair);
    const size_t xin = arena_.reserve(V > 1 ? lanes * rows * inputs_ : 0);
    arena_.allocate();
    xin_ = arena_.at(xin);
    params_ = arena_.at(p);
    grads_ = shared ? nullptr : arena_.at(g);
    buffers_ = arena_.at(b);
    for (size_t i = 0; i < layers_.size(); ++i) {
      acts_.push_back(arena_.at(act[i]));
      layers_[i].saved = arena_.at(saved[i]);
      layers_[i].saved_c = arena_.at(saved_c[i]);
    }
    ga_ = arena_.at(ga);
    gb_ = arena_.at(gb);
    ia_ = arena_.at(ia);
    ib_ = arena_.at(ib);
    counts_.assign(static_cast<size_t>(copies * n_counts_), 0);
    generators_.resize(static_cast<size_t>(lanes));
    store_.params = params_;
    store_.grads = grads_;
    store_.buffers = buffers_;
    store_.counts = counts_.data();
    store_.n_params = n_params_;
    store_.n_buffers = n_buffers_;
    store_.n_counts = n_counts_;
    store_.generators = &generators_;
    store_.scratch = &scratch_;
    store_.stats = &stats_;
    set_policy(nullptr);
  }

  int64_t lanes() const { return store_.lanes; }  ///< with the padding of the last group
  int64_t used() const { return store_.used; }    ///< lanes that hold a run
  /// Whether `lanes` runs that fine-tune lay out in this Net's groups (interleaved, the last one
  /// padded), so that set_used() lets it serve them: a study's last, partial work item then reuses
  /// its worker's Net instead of making one (0.1 ms at seed_repro's size).
  bool takes(int64_t lanes) const {
    const int64_t V = store_.V;
    return !store_.shared && V > 1 && lanes > 1 && (lanes + V - 1) / V * V == store_.lanes;
  }
  /// `lanes` of them hold a run (takes(lanes)); the others are padding again, as in a Net made
  /// for `lanes`: input 0, no generator. (Their Dropout masks from the last item stay: only those
  /// padding lanes read them, and no run's values depend on a padding lane's.)
  void set_used(int64_t lanes) {
    TORCH_CHECK(takes(lanes), "Net::set_used: ", lanes, " lanes do not fit this Net's ", store_.lanes);
    for (int64_t lane = lanes; lane < store_.lanes; ++lane) {
      generators_[static_cast<size_t>(lane)] = nullptr;
      for (int64_t row = 0; row < store_.stride; ++row)
        for (int64_t col = 0; col < inputs_; ++col) xin_[offset(lane, row, col, inputs_)] = 0.f;
    }
    store_.used = lanes;
  }
  /// Where element (row, col) of a `width`-wide activation of `lane` sits.
  int64_t offset(int64_t lane, int64_t row, int64_t col, int64_t width) const {
    const int64_t V = store_.V;
    return (((lane / V) * store_.stride + row) * width + col) * V + lane % V;
  }
  /// Lane `lane`'s rows x width block of an activation-layout array, copied in from a plain
  /// [rows][width] block.
  void put_lane(float* acts, int64_t lane, int64_t rows, int64_t width, const float* plain) const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < width; ++c) acts[offset(lane, r, c, width)] = plain[r * width + c];
  }
  int64_t stride() const { return store_.stride; }  ///< rows each lane's block has room for
  int64_t outputs() const { return outputs_; }
  int64_t group_width() const { return store_.V; }
  int64_t n_params() const { return n_params_; }
  const std::vector<Segment>& trainable() const { return trainable_; }
  /// What the optimizer steps: trainable() less the layers that apply the SGD rule themselves,
  /// and after a backward pass that stopped at layer i (zero_below) less the layers below i, whose
  /// gradients it did not write: plain SGD would leave every bit of them as it is.
  const std::vector<Segment>& stepped() const { return stopped_at_ > 0 ? stepped_above_ : stepped_; }
  float* params() { return params_; }
  /// The gradients of the last backward pass; not those of layers that applied an SGD rule
  /// themselves (set_sgd), which are never written.
  float* grads() { return grads_; }
  size_t param_floats() const { return param_floats_; }  ///< of every lane together
  const float* output() const { return acts_.back(); }
  float* output_grad() { return ga_; }  // where the loss writes dL/d(output)

  /// A lane's whole state: parameters, buffers and num_batches_tracked counters.
  struct Snapshot {
    std::vector<float> values;
    std::vector<int64_t> counts;
  };
  /// Copies the state of `model` (same layers) into `lane`.
  void load(int64_t lane, const ModelImpl& model) { transfer(lane, const_cast<ModelImpl&>(model), true); }
  /// Reads `model`'s state into `dst` as snapshot() lays out a lane's, without writing any lane.
  void load(const ModelImpl& model, Snapshot& dst) {
    dst.values.resize(static_cast<size_t>(n_params_ + n_buffers_));
    dst.counts.assign(static_cast<size_t>(n_counts_), 0);
    transfer(-1, const_cast<ModelImpl&>(model), true, &dst);
  }
  /// Writes `lane`'s state into `model`.
  void store(int64_t lane, ModelImpl& model) const { const_cast<Net*>(this)->transfer(lane, model, false); }

  /// Copies lane `from`'s state to every other lane (the padding too).
  void replicate(int64_t from) {
    Snapshot s;
    snapshot(from, s, true);
    replicate(s, /*defer=*/false);
    spread_of_ = nullptr;  // s is gone: its address may be another snapshot's next time
  }
  /// Writes the state `s` (a snapshot of one lane) into every lane, the padding too. When the
  /// last replicate() was of this same `s` and since then only backward passes and the optimizer
  /// wrote parameters, the layers below the lowest one they may have changed hold s's parameters
  /// still, in every lane: those are not written again (under train, whose backward pass stops at
  /// the topmost BatchNorm, 95% of seed_repro's parameters).
  /// With `defer` (s outlives every use of this Net until the next replicate), a Dense layer's
  /// parameters are not written to interleaved one-row lanes at all: until a pass writes them, its
  /// forward passes read s (mark_same) and its first fused SGD step reads s and writes the lanes
  /// (dense_backward_sgd_same); anything else that reads or writes the lanes' state writes s's
  /// values there first (materialize). Spreading them cost 3% of a frozen study's main thread,
  /// 300 KB per 16-lane work item that the first step rewrote.
  void replicate(const Snapshot& s, bool defer = true) {
    const size_t keep = spread_of_ == &s && spread_version_ == store_.version ? unchanged_below_ : 0;
    ++store_.version;
    for (int64_t lane = 0; lane < store_.lanes; ++lane) std::copy_n(s.counts.data(), n_counts_, counts_.data() + lane * n_counts_);
    const bool may_defer = defer && store_.V > 1 && store_.stride == 1 && !store_.shared;
    for (size_t i = keep; i < layers_.size(); ++i) {  // the layers below keep hold s (or defer to it) still
      deferred_[i] = may_defer && layers_[i].spec.kind == LayerKind::kDense;
      if (!deferred_[i]) spread(params_, n_params_, s.values.data(), param_begin_[i], param_end(i));
    }
    spread(buffers_, n_buffers_, s.values.data() + n_params_);
    spread_of_ = &s;
    spread_version_ = store_.version;
    unchanged_below_ = layers_.size();
    // Every lane now holds s: zero_below's check of the parameters below each layer, on one lane.
    const auto& k = lanes::active();
    below_ok_.assign(layers_.size() + 1, 1);
    for (size_t j = 0; j < layers_.size(); ++j)
      below_ok_[j + 1] = below_ok_[j] && k.all_finite(s.values.data() + ranges_[j].offset, ranges_[j].size, true);
    below_ok_version_ = store_.version;
  }

  void set_generator(int64_t lane, std::shared_ptr<at::Generator> gen) { generators_[static_cast<size_t>(lane)] = std::move(gen); }

  /// The strategy's resolution of every layer (nullptr: the model's defaults, as in pretraining),
  /// the same one Policy::apply reads.
  void set_policy(const StrategyConfig* s) {
    // A Net the study runner keeps (BatchedCache) goes back to the defaults on every call: they
    // are resolved once. A strategy is resolved each time (the same object may be another one).
    if (s == nullptr && default_modes_.empty()) default_modes_ = resolve_modes(specs_, nullptr);
    const std::vector<LayerMode> resolved = s != nullptr ? resolve_modes(specs_, s) : std::vector<LayerMode>{};
    const auto& modes = s != nullptr ? resolved : default_modes_;
    bool below = false;
    for (size_t i = 0; i < layers_.size(); ++i) {
      auto& l = layers_[i];
      l.mode = modes[i];
      l.need_dx = below;
      below = below || (l.mode.trainable && !ranges_[i].empty());
    }
    trainable_ = segments(false);
    stepped_ = segments(store_.sgd != nullptr);
    stopped_at_ = 0;
  }

  /// The optimizer's rule when it is plain SGD (nullptr: another optimizer). The trainable layers
  /// that can (interleaved lanes, fuses_sgd()) apply it in their backward pass; without it every
  /// gradient is written and stepped by the optimizer. zero_below reads it too.
  void set_sgd(const lanes::Sgd* rule) {
    plain_sgd_ = rule;
    store_.sgd = store_.V > 1 ? rule : nullptr;
    stepped_ = segments(store_.sgd != nullptr);
    stopped_at_ = 0;
  }

  /// Forward pass of every lane over `rows` rows (<= the capacity); x is [lanes][stride][in].
  void forward(Pass pass, const float* x, int64_t rows) {
    mark_same();
    kept_below_ = 0;
    fit_same_below_ = 0;
    fit_paired_ = false;
    store_.rows = rows;
    const float* in = pack(x, rows);
    for (size_t i = 0; i < layers_.size(); ++i) {
      float* out = acts_[i];
      layer_kind(layers_[i].spec.kind).forward(store_, layers_[i], pass, in, out);
      in = out;
    }
  }

  /// An inference pass (`first`: kInfer, or kPlain) and then a fit pass over the same x and the
  /// same state, layer by layer (each layer's pair through its kind's forward_pair, which may
  /// load its weights once for both): the values of forward(first) followed by forward(kFit).
  /// The fit pass is what output() and backward() see; the inference pass's output is inferred().
  /// Work that would repeat a value is not done, the values are the same:
  /// - while both passes have had the same input, a layer whose two passes are the same
  ///   (same_passes: every layer of a frozen-BatchNorm strategy) runs one, which both read;
  /// - after a backward pass that stopped at layer `kept_below_` (zero_below: no parameter below
  ///   it changed) and with the same x, the fit pass's outputs below it are those of the last
  ///   fit pass as far as each layer's output is its input's (fit_output): a layer whose pass
  ///   writes no state is not run again, one that writes (BatchNorm's running statistics) is.
  void forward_pair(const float* x, int64_t rows, Pass first = Pass::kInfer) {
    TORCH_CHECK(!store_.shared && store_.stride == 1 && rows == 1, "forward_pair: one row per lane, own state");
    mark_same();
    const size_t xn = static_cast<size_t>(store_.used * inputs_);
    bool kept = kept_below_ > 0 && kept_version_ == store_.version && fit_x_.size() == xn &&
                std::memcmp(fit_x_.data(), x, xn * sizeof(float)) == 0;
    const size_t below = kept ? kept_below_ : 0;
    kept_below_ = 0;
    fit_same_below_ = 0;
    fit_x_.assign(x, x + xn);
    store_.rows = rows;
    const float* in_a = pack(x, rows);
    const float* in_b = in_a;
    bool same = true;  // in_a and in_b hold the same values
    uint64_t shared = 0, kept_n = 0;
    for (size_t i = 0; i < layers_.size(); ++i) {
      BatchedLayer& l = layers_[i];
      const LayerKindDef& kind = layer_kind(l.spec.kind);
      float* out_a = i % 2 == 0 ? ia_ : ib_;
      const auto fit = kind.fit_output(l);
      kept = kept && i < below && fit != LayerKindDef::FitOutput::kMore;
      fit_same_below_ = kept ? i + 1 : fit_same_below_;
      if (kept && fit == LayerKindDef::FitOutput::kInput) {  // acts_[i] holds this pass's output already
        if (same && kind.same_passes(l, first, Pass::kFit)) {  // and the inference pass's
          in_a = acts_[i];
        } else {
          kind.forward(store_, l, first, in_a, out_a);
          in_a = out_a;
          same = false;
        }
        in_b = acts_[i];
        ++kept_n;
        continue;
      }
      if (same && kind.same_passes(l, first, Pass::kFit)) {
        kind.forward(store_, l, Pass::kFit, in_b, acts_[i]);
        in_a = in_b = acts_[i];
        ++shared;
        continue;
      }
      same = false;
      kind.forward_pair(store_, l, first, in_a, out_a, Pass::kFit, in_b, acts_[i]);
      in_a = out_a;
      in_b = acts_[i];
    }
    inferred_ = in_a;
    fit_paired_ = true;
    pair_shared_count.fetch_add(shared, std::memory_order_relaxed);
    pair_kept_count.fetch_add(kept_n, std::memory_order_relaxed);
  }
  const float* inferred() const { return inferred_; }

  /// Backward pass from output_grad() through the last forward (a fit pass); fills grads()
  /// for the trainable layers and stops below the lowest of them, or where zero_below allows
  /// (then the layers below keep their old gradients and stepped() leaves them out).
  void backward(const float* x) {
    float* g = ga_;
    float* next = gb_;
    if (store_.V > 1) x = xin_;  // packed by the forward pass
    for (size_t i = layers_.size(); i-- > 0;) {
      BatchedLayer& l = layers_[i];
      if (!l.need_dx && !l.mode.trainable) break;
      // Before the layer's own backward (and the optimizer after it) may change it: a pass that
      // throws part-way leaves the mark right for the next replicate().
      unchanged_below_ = std::min(unchanged_below_, i);
      // Deferred lanes (replicate): a fused SGD step of one row reads the snapshot and writes
      // them; any other pass reads them, so they are written first.
      l.lazy_params = nullptr;
      if (deferred_[i]) {
        if (l.mode.trainable && store_.sgd != nullptr && store_.rows == 1) l.lazy_params = spread_of_->values.data();
        else materialize(i);
        deferred_[i] = false;
      }
      const float* in = i == 0 ? x : acts_[i - 1];
      if (l.need_dx && zero_below(i, x, g)) {
        // Its own gradients, no dx; what is below keeps every bit (see zero_below).
        l.need_dx = false;
        layer_kind(l.spec.kind).backward(store_, l, in, acts_[i], g, next);
        l.need_dx = true;
        l.lazy_params = nullptr;
        zero_gradient_shortcut_count.fetch_add(1, std::memory_order_relaxed);
        // Nothing below i changes: the next forward_pair may keep this fit pass's outputs there,
        // and the optimizer steps only the layers from i up.
        kept_below_ = fit_paired_ ? i : 0;
        kept_version_ = store_.version;
        if (stopped_at_ != i) stepped_above_ = segments(store_.sgd != nullptr, i);
        stopped_at_ = i;
        return;
      }
      layer_kind(l.spec.kind).backward(store_, l, in, acts_[i], g, next);
      l.lazy_params = nullptr;
      std::swap(g, next);
    }
    below_ok_version_ = 0;  // the parameters below may have changed
    kept_below_ = 0;
    stopped_at_ = 0;
  }

  /// Each trainable parameter: its state-dict name, offset and shape (in grads() when no SGD
  /// rule is set).
  std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>>> trainable_tensors() const {
    std::vector<std::tuple<std::string, int64_t, std::vector<int64_t>>> out;
    for (const auto& l : layers_) {
      if (!l.mode.trainable) continue;
      const auto state = layer_kind(l.spec.kind).state(l.spec);
      for (size_t t = 0; t < state.size(); ++t)
        if (state[t].where == StateTensor::kParameter && l.at[t] >= 0)
          out.emplace_back(l.spec.name + "." + state[t].name, l.at[t], state[t].shape);
    }
    return out;
  }

  /// Copies the state of `lane` into `dst` (save) or back from it.
  void snapshot(int64_t lane, Snapshot& dst, bool save) {
    materialize_all();
    const int64_t V = store_.V, v = lane % V;
    float* p = store_.P(lane / V) + v;
    float* b = store_.B(lane / V) + v;
    int64_t* c = counts_.data() + lane * n_counts_;
    if (save) {
      dst.values.resize(static_cast<size_t>(n_params_ + n_buffers_));
      dst.counts.assign(c, c + n_counts_);
    } else {
      ++store_.version;
      std::copy_n(dst.counts.data(), n_counts_, c);
    }
    float* values = dst.values.data();
    for (int64_t e = 0; e < n_params_; ++e) save ? void(values[e] = p[e * V]) : void(p[e * V] = values[e]);
    for (int64_t e = 0; e < n_buffers_; ++e)
      save ? void(values[n_params_ + e] = b[e * V]) : void(b[e * V] = values[n_params_ + e]);
  }

 private:
  /// Moves every state tensor by its state-dict name, as the kind's state() lists it: to or from
  /// `lane`, or (`snap`, in only) into a snapshot's layout.
  void transfer(int64_t lane, ModelImpl& model, bool in, Snapshot* snap = nullptr) {
    TORCH_CHECK(snap == nullptr || in, "Net::transfer: a snapshot is only read into");
    if (snap == nullptr) materialize_all();
    torch::NoGradGuard no_grad;
    if (in && snap == nullptr) ++store_.version;
    std::map<std::string, torch::Tensor> tensors;
    for (const auto& p : model.named_parameters()) tensors[p.key()] = p.value();
    for (const auto& b : model.named_buffers()) tensors[b.key()] = b.value();
    for (const auto& l : layers_) {
      const auto state = layer_kind(l.spec.kind).state(l.spec);
      for (size_t t = 0; t < state.size(); ++t) {
        if (l.at[t] < 0) continue;
        const std::string name = l.spec.name + "." + state[t].name;
        const auto it = tensors.find(name);
        TORCH_CHECK(it != tensors.end(), "batched engine: the model has no tensor ", name);
        const torch::Tensor& tensor = it->second;
        // Reading a CPU tensor that already is float32 (int64 for a counter) and contiguous goes
        // through its data pointer: the conversions' and item()'s dispatches were most of a
        // study's first Net's 0.1 to 0.15 ms load (the values are the same).
        const bool plain_cpu = tensor.device().is_cpu() && tensor.is_contiguous();
        if (state[t].where == StateTensor::kCounter) {
          int64_t& count = snap != nullptr ? snap->counts[static_cast<size_t>(l.at[t])] : store_.C(lane)[l.at[t]];
          if (!in) tensor.fill_(count);
          else if (plain_cpu && tensor.scalar_type() == torch::kLong && tensor.numel() == 1) count = *tensor.data_ptr<int64_t>();
          else count = tensor.item<int64_t>();
          continue;
        }
        // Element by element through a plain float copy of the tensor (a strided torch copy costs
        // more than the copying itself for tensors this small).
        const bool param = state[t].where == StateTensor::kParameter;
        const int64_t V = snap != nullptr ? 1 : store_.V, n = tensor.numel();
        float* base = snap != nullptr ? snap->values.data() + (param ? 0 : n_params_) + l.at[t]
                                      : (param ? store_.P(lane / V) : store_.B(lane / V)) + l.at[t] * V + lane % V;
        if (in) {
          const bool direct = plain_cpu && tensor.scalar_type() == torch::kFloat;
          const torch::Tensor src = direct ? torch::Tensor() : tensor.to(torch::kFloat).contiguous();
          const float* from = direct ? tensor.data_ptr<float>() : src.data_ptr<float>();
          for (int64_t e = 0; e < n; ++e) base[e * V] = from[e];
        } else {
          torch::Tensor dst = torch::empty({n}, torch::TensorOptions().dtype(torch::kFloat));
          float* to = dst.data_ptr<float>();
          for (int64_t e = 0; e < n; ++e) to[e] = base[e * V];
          tensor.view({-1}).copy_(dst);
        }
      }
    }
  }

  /// A layer's parameters as one segment, from its first to its last (they are contiguous);
  /// empty when it has none.
  Segment parameter_range(const BatchedLayer& l) const {
    int64_t first = -1, end = -1;
    const auto state = layer_kind(l.spec.kind).state(l.spec);
    for (size_t t = 0; t < state.size(); ++t) {
      if (state[t].where != StateTensor::kParameter || l.at[t] < 0) continue;
      int64_t n = 1;
      for (int64_t d : state[t].shape) n *= d;
      if (first < 0) first = l.at[t];
      end = l.at[t] + n;
    }
    return first < 0 ? Segment{0, 0} : Segment{first, end - first};
  }

  /// The trainable layers' parameters as merged segments, from layer `from` up; `fused`: without
  /// the layers that apply LaneStore::sgd themselves.
  std::vector<Segment> segments(bool fused, size_t from = 0) const {
    std::vector<Segment> out;
    for (size_t i = from; i < layers_.size(); ++i) {
      const BatchedLayer& l = layers_[i];
      const Segment r = ranges_[i];
      if (!l.mode.trainable || r.empty() || (fused && layer_kind(l.spec.kind).fuses_sgd())) continue;
      if (!out.empty() && out.back().offset + out.back().size == r.offset) out.back().size += r.size;
      else out.push_back(r);
    }
    return out;
  }

  /// Whether the gradient that layer i passes down is exactly +-0 in every lane, and SGD then leaves
  /// every parameter below as it is, bit for bit, so the backward pass may stop at layer i (the
  /// peer's shortcut, taken only where it is exact). Layer i is a BatchNorm on the batch statistics
  /// of one row: x - mean is exactly 0, x-hat is +-0, and dx = istd * (dh - mean(dh) - x-hat *
  /// mean(dh x-hat)) with dh = gradient * gamma is +-0 where x and dh are finite. Below (only kinds
  /// whose passes_zero_gradient() holds: Dense, BatchNorm, activations, Dropout), +-0 times finite
  /// weights, inputs, running statistics and 1/sqrt(var + eps) stays +-0, and p + (-lr) * (+-0)
  /// is p unless p is -0 (-0 + +0 is +0) or -lr is not finite; weight decay would change p. So: plain SGD without decay and a finite rate; dh,
  /// layer i's input, every input below and the BatchNorm statistics below finite (checked each
  /// step, every lane, the padding too); the parameters below finite and none -0 (checked on the
  /// one lane replicate() spreads, valid while only shortcut steps follow). Otherwise the full pass
  /// runs, and the shortcut waits for the next replicate().
  bool zero_below(size_t i, const float* x, const float* g) {
    const BatchedLayer& l = layers_[i];
    if (!zero_gradient_shortcut() || plain_sgd_ == nullptr || plain_sgd_->decay || !std::isfinite(plain_sgd_->neg_lr) ||
        l.spec.kind != LayerKind::kBatchNorm || !l.mode.fit_batch_stats || l.mode.prior >= 0 || store_.rows != 1 ||
        !(static_cast<float>(l.spec.eps) > 0.f))  // istd = 1/sqrt(0 + eps) finite
      return false;
    // The parameters below: every lane holds the snapshot replicate() checked, unchanged since (a
    // full pass, which may change them, or any other write of the state ends that until the next).
    if (below_ok_version_ != store_.version || !below_ok_[i]) return false;
    for (size_t j = 0; j < i; ++j)
      if (!layer_kind(layers_[j].spec.kind).passes_zero_gradient()) return false;
    const auto& k = lanes::active();
    const int64_t V = store_.V, C = l.spec.out * V;
    const auto rows_finite = [&](const float* a, int64_t width) {
      for (int64_t grp = 0; grp < store_.groups(); ++grp)
        if (!k.all_finite(a + grp * store_.stride * width * V, store_.rows * width * V, false)) return false;
      return true;
    };
    // x, the fit outputs below and the istd of the BatchNorms there are what the last step checked
    // when the fit pass kept or recomputed them (forward_pair: the same values below i).
    const bool checked = fit_same_below_ >= i;
    if (!rows_finite(g, l.spec.out) || (!checked && !rows_finite(x, inputs_))) return false;
    for (size_t j = 0; j < i; ++j) {
      if (!checked && !rows_finite(acts_[j], specs_[j].out)) return false;
      if (layers_[j].spec.kind != LayerKind::kBatchNorm) continue;
      const int64_t Cj = specs_[j].out * V;  // its running statistics and the istd its fit pass used
      for (int64_t grp = 0; grp < store_.groups(); ++grp)
        if (!k.all_finite(store_.B(grp) + layers_[j].at[2] * V, 2 * Cj, false) ||
            (!checked && !k.all_finite(layers_[j].saved_c + grp * Cj, Cj, false)))
          return false;
    }
    // dh = gradient * gamma, as the BatchNorm's backward forms it: finite factors may overflow.
    if (l.at[0] >= 0)
      for (int64_t grp = 0; grp < store_.groups(); ++grp) {
        const float* gy = g + grp * store_.stride * C;
        const float* gamma = store_.P(grp) + l.at[0] * V;
        int bad = 0;  // no early exit: the loop vectorizes
        for (int64_t e = 0; e < C; ++e) bad |= !(std::fabs(gy[e] * gamma[e]) <= std::numeric_limits<float>::max());
        if (bad) return false;
      }
    return true;
  }

  /// Points each layer below unchanged_below_ at the snapshot every lane holds (BatchedLayer::same_params)
  /// while that holds: its Dense forward passes then read one copy of the weights for all lanes.
  void mark_same() {
    const bool valid = store_.V > 1 && spread_of_ != nullptr && spread_version_ == store_.version;
    for (size_t i = 0; i < layers_.size(); ++i)
      layers_[i].same_params = valid && i < unchanged_below_ ? spread_of_->values.data() : nullptr;
  }

  /// Writes elements [from, to) (to: n when negative) of one lane's n (`column`) into every lane
  /// of every group of a block (interleaved groups: the kernels' spread, one vector store per
  /// value, compiled for the CPU's widest path).
  void spread(float* block, int64_t n, const float* column, int64_t from = 0, int64_t to = -1) {
    const int64_t V = store_.V, end = to < 0 ? n : to;
    for (int64_t grp = 0; grp < store_.groups(); ++grp) {
      float* dst = block + (grp * n + from) * V;
      if (V == lanes::kWidth) lanes::active().spread(column + from, dst, end - from);
      else std::copy_n(column + from, end - from, dst);
    }
  }
  int64_t param_end(size_t i) const { return i + 1 < layers_.size() ? param_begin_[i + 1] : n_params_; }
  /// Writes layer i's deferred parameters (replicate) into every lane.
  void materialize(size_t i) {
    if (!deferred_[i]) return;
    spread(params_, n_params_, spread_of_->values.data(), param_begin_[i], param_end(i));
    deferred_[i] = false;
  }
  void materialize_all() {
    for (size_t i = 0; i < deferred_.size(); ++i) materialize(i);
  }

  /// x as the first layer reads it: itself, or interleaved into xin_ (the padding stays 0).
  const float* pack(const float* x, int64_t rows) {
    if (store_.V == 1) return x;
    for (int64_t lane = 0; lane < store_.used; ++lane) put_lane(xin_, lane, rows, inputs_, x + lane * store_.stride * inputs_);
    return xin_;
  }

  LaneStore store_;
  int64_t inputs_ = 0;
  float* xin_ = nullptr;
  std::vector<BatchedLayer> layers_;
  std::vector<LayerSpec> specs_;  ///< the layers' specs, as resolve_modes reads them
  std::vector<Segment> ranges_;   ///< each layer's parameter_range
  std::vector<int64_t> param_begin_;  ///< where each layer's parameters begin (they follow the layers' order)
  /// Per layer: its parameters are not written in the lanes, which hold spread_of_'s (replicate).
  std::vector<bool> deferred_;
  std::vector<LayerMode> default_modes_;  ///< set_policy(nullptr)'s resolution
  int64_t n_params_ = 0, n_buffers_ = 0, n_counts_ = 0, outputs_ = 0;
  Arena arena_;
  float* params_ = nullptr;
  float* grads_ = nullptr;
  float* buffers_ = nullptr;
  size_t param_floats_ = 0;
  std::vector<int64_t> counts_;
  std::vector<float*> acts_;
  float* ga_ = nullptr;
  float* gb_ = nullptr;
  float* ia_ = nullptr;  // forward_pair's inference pass, layer by layer (ping-pong)
  float* ib_ = nullptr;
  const float* inferred_ = nullptr;
  /// forward_pair's keeping of fit outputs: below layer kept_below_ (0: none), while the
  /// version is kept_version_ and x is fit_x_ (the last pair's); fit_paired_: the last fit pass
  /// was a pair's.
  size_t kept_below_ = 0;
  uint64_t kept_version_ = 0;
  /// The last fit pass gave the layers below fit_same_below_ the outputs (and x) of the one before.
  size_t fit_same_below_ = 0;
  std::vector<float> fit_x_;
  bool fit_paired_ = false;
  std::vector<float> stats_, scratch_;
  std::vector<Segment> trainable_, stepped_;
  /// The layer the last backward pass stopped at (0: it did not stop), and stepped()'s segments
  /// from it up.
  size_t stopped_at_ = 0;
  std::vector<Segment> stepped_above_;
  const lanes::Sgd* plain_sgd_ = nullptr;  ///< set_sgd's rule, on every path
  /// replicate(Snapshot)'s check of zero_below's parameter condition, valid while below_ok_version_
  /// is the version: [i], the layers below i pass (finite, none -0).
  std::vector<char> below_ok_;
  uint64_t below_ok_version_ = 0;
  /// replicate()'s skipping: the snapshot it last spread and the version it left; the layers below
  /// unchanged_below_ have not been written since (backward() lowers it to the lowest layer it may
  /// have changed; any other write of the state changes the version).
  const Snapshot* spread_of_ = nullptr;
  uint64_t spread_version_ = 0;
  size_t unchanged_below_ = 0;
  std::vector<std::shared_ptr<at::Generator>> generators_;
};

/// Per-lane loss of the last forward pass (rows x outputs per lane; of `output` where given, laid
/// out as net.output()) against y (rows x targets per lane; each lane's block starts stride rows
/// after the last), as compute_loss computes it; with `grad`, dL/d(output) goes to
/// net.output_grad().
/// `correct` (cross_entropy) receives each lane's count of correct argmax predictions.
void lane_losses(Net& net, LossKind kind, const float* y, int64_t rows, int64_t targets, bool grad,
                 std::vector<double>& loss, std::vector<double>* correct, const float* output = nullptr) {
  const int64_t O = net.outputs(), L = net.used();
  const float* out = output != nullptr ? output : net.output();
  float* g = net.output_grad();
  loss.assign(static_cast<size_t>(net.lanes()), 0.0);
  if (correct) correct->assign(static_cast<size_t>(net.lanes()), 0.0);
  static const float kLog2Pi = static_cast<float>(std::log(2.0 * M_PI));
  // A lane's [rows][outputs] block is read (and its gradient written) where it is: element e of
  // it sits at offset(lane, 0, 0, O) + e * V (V = 1 for plain lanes). Copying an interleaved lane
  // out and its gradient back was a third of this function's time, twice an epoch.
  const int64_t V = net.group_width();
  if (grad)  // the padding lanes get no gradient
    for (int64_t lane = L; lane < net.lanes(); ++lane)
      for (int64_t e = 0, d0 = net.offset(lane, 0, 0, O); e < rows * O; ++e) g[d0 + e * V] = 0.f;
  for (int64_t lane = 0; lane < L; ++lane) {
    float sum = 0.f;
    const int64_t at = net.offset(lane, 0, 0, O);
    const float* o = out + at;
    const float* t = y + lane * net.stride() * targets;
    float* d = g + at;
    switch (kind) {
      case LossKind::kGaussianNll: {
        const int64_t T = O / 2;
        const float count = static_cast<float>(rows * T);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t k = 0; k < T; ++k) {
            const float mean = o[(r * O + k) * V], log_var = o[(r * O + T + k) * V];
            const float diff = t[r * targets + k] - mean;
            const float var = std::exp(log_var);
            const float sq = diff * diff / var;
            sum += 0.5f * (log_var + sq + kLog2Pi);
            if (grad) {
              d[(r * O + k) * V] = -diff / var / count;
              d[(r * O + T + k) * V] = 0.5f * (1.f - sq) / count;
            }
          }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / count);
        break;
      }
      case LossKind::kMse: {
        const float count = static_cast<float>(rows * O);
        for (int64_t k = 0; k < rows * O; ++k) {
          const float diff = o[k * V] - t[k];
          sum += diff * diff;
          if (grad) d[k * V] = 2.f * diff / count;
        }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / count);
        break;
      }
      case LossKind::kCrossEntropy: {
        for (int64_t r = 0; r < rows; ++r) {
          const float* z = o + r * O * V;
          const auto label = static_cast<int64_t>(t[r * targets]);
          int64_t best = 0;
          float mx = z[0];
          for (int64_t k = 1; k < O; ++k)
            if (z[k * V] > mx) mx = z[k * V], best = k;
          float se = 0.f;
          for (int64_t k = 0; k < O; ++k) se += std::exp(z[k * V] - mx);
          const float lse = std::log(se) + mx;
          sum += lse - z[label * V];
          if (correct && best == label) (*correct)[static_cast<size_t>(lane)] += 1;
          if (grad)
            for (int64_t k = 0; k < O; ++k)
              d[(r * O + k) * V] = (std::exp(z[k * V] - lse) - (k == label ? 1.f : 0.f)) / static_cast<float>(rows);
        }
        loss[static_cast<size_t>(lane)] = static_cast<double>(sum / static_cast<float>(rows));
        break;
      }
    }
  }
}

/// The registry's update of the configured optimizer over the trainable segments of every
/// lane, with its state slots laid out like the parameters.
class Optimizer {
 public:
  /// The slots take arena phases the parameters and gradients do not (the Net's start at 0).
  Optimizer(const OptimizerConfig& c, Net& net) : c_(c), def_(optimizer_kind(c.kind)), net_(net), lr_(c.lr), arena_(4) {
    std::vector<size_t> regions;
    for (int k = 0; k < def_.slots(c); ++k) regions.push_back(arena_.reserve(static_cast<int64_t>(net.param_floats())));
    arena_.allocate();
    for (size_t r : regions) slots_.push_back(arena_.at(r));
    ptrs_.resize(slots_.size());
    fused_ = def_.plain(c_, lr_, sgd_);
    if (fused_) net_.set_sgd(&sgd_);
  }
  ~Optimizer() {
    if (fused_) net_.set_sgd(nullptr);
  }
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;
  /// The learning rate of the next step. Set it before backward(): the Net's fused layers apply
  /// the rule there (the Net holds a pointer to sgd_, updated in place).
  void set_lr(double lr) {
    lr_ = lr;
    if (fused_) def_.plain(c_, lr_, sgd_);
  }
  void step() {
    ++step_;
    const int64_t P = net_.n_params();
    float* params = net_.params();
    const float* grads = net_.grads();
    // Element-wise, so a group's interleaved segment is one range of V times the lane's length.
    const int64_t V = net_.group_width();
    for (int64_t grp = 0; grp < net_.lanes() / V; ++grp)
      for (const auto& s : net_.stepped()) {
        const int64_t off = (grp * P + s.offset) * V;
        for (size_t k = 0; k < slots_.size(); ++k) ptrs_[k] = slots_[k] + off;
        def_.update(c_, lr_, step_, params + off, grads + off, ptrs_.data(), s.size * V);
      }
  }

 private:
  OptimizerConfig c_;
  const OptimizerDef& def_;
  Net& net_;
  double lr_;
  Arena arena_;
  std::vector<float*> slots_;
  std::vector<float*> ptrs_;
  lanes::Sgd sgd_;      ///< the plain SGD rule the Net's Dense layers apply, when it is one
  bool fused_ = false;  ///< the optimizer is that rule (fixed by the config)
  int64_t step_ = 0;
};

/// Rows `samples` of a [N, W] float tensor, as one contiguous [samples, W] block.
std::vector<float> gather_rows(const torch::Tensor& t, const std::vector<int64_t>& samples) {
  // Dataset tensors are contiguous float32: row copies (index_select costs more than the copy).
  const torch::Tensor src = t.dim() == 2 && t.scalar_type() == torch::kFloat ? t.contiguous() : t.to(torch::kFloat).contiguous();
  std::vector<float> out(samples.size() * static_cast<size_t>(src.size(1)));
  copy_rows(src.data_ptr<float>(), src.size(0), src.size(1), samples.data(), static_cast<int64_t>(samples.size()), out.data());
  return out;
}

/// A Net holding `model`'s state for `lanes` lanes of `rows` rows, and that state as read from
/// the model (`start`, one lane's snapshot; not kept for a shared Net, which no pass changes).
struct CachedNet {
  CachedNet(const ModelImpl& model, int64_t lanes, int64_t rows, bool shared) : net(model, lanes, rows, shared) {
    // A shared Net is the copy every lane reads; one that fine-tunes gets the model's state in
    // every lane from replicate(start) (net_for), so none is written here. Loading lane 0 and reading
    // it back wrote and read a value per 64-byte line of the interleaved layout: 0.05 to 0.1 ms.
    if (shared) net.load(0, model);
    else net.load(model, start);
  }
  Net net;
  /// One lane's copy of the model's state, which replicate() spreads to every lane (not kept for a
  /// shared Net). One lane, not a group's image: a 16-lane image of seed_repro's state is 300 KB
  /// of pages touched for the first time in a study's first work item, a millisecond on this VM.
  Net::Snapshot start;
};

}  // namespace

/// One shared Net (the pretrained weights' evaluation) and one that fine-tunes, each replaced
/// when a call needs another model or shape: a worker holds no more than one work item's Nets,
/// as check_memory() counts, and consecutive work items of a worker are mostly one strategy's.
struct BatchedCache::Nets {
  struct Slot {
    // The model itself is held: while a slot names it, its address cannot become another model's.
    std::shared_ptr<const torch::nn::Module> model;
    int64_t lanes = 0, rows = 0;
    std::unique_ptr<CachedNet> net;
  };
  Slot shared, own;
};
BatchedCache::BatchedCache() : nets_(std::make_unique<Nets>()) {}
BatchedCache::~BatchedCache() = default;
struct BatchedCacheAccess {
  static BatchedCache::Nets& nets(BatchedCache& c) { return *c.nets_; }
};

namespace {

/// `model`'s Net from `cache` (made there on first use), or made in `local` without one. A Net
/// that fine-tunes starts from the model's state in every lane (the padding too).
Net& net_for(BatchedCache* cache, std::unique_ptr<CachedNet>& local, const ModelImpl& model, int64_t lanes,
             int64_t rows, bool shared) {
  std::unique_ptr<CachedNet>* slot = &local;
  // Only a model owned by a shared_ptr (a Model) can be held, hence kept.
  std::shared_ptr<const torch::nn::Module> owner = cache != nullptr ? model.weak_from_this().lock() : nullptr;
  if (owner) {
    auto& nets = BatchedCacheAccess::nets(*cache);
    auto& s = shared ? nets.shared : nets.own;
    const bool same_shape = s.lanes == lanes || (!shared && s.net && s.net->net.takes(lanes));
    if (s.model.get() != owner.get() || !same_shape || s.rows != rows) {
      s.net.reset();  // its arena goes back to the thread's spares before the next is made
      s = {std::move(owner), lanes, rows, nullptr};
    }
    slot = &s.net;
  }
  if (!*slot) *slot = std::make_unique<CachedNet>(model, lanes, rows, shared);
  CachedNet& c = **slot;
  if (!shared) {
    if (c.net.used() != lanes) c.net.set_used(lanes);
    c.net.replicate(c.start);
  }
  return c.net;
}

}  // namespace

bool set_zero_gradient_shortcut(bool on) { return zero_gradient_shortcut_on.exchange(on); }
uint64_t zero_gradient_shortcuts() { return zero_gradient_shortcut_count.load(); }
PairSavings forward_pair_savings() { return {pair_shared_count.load(), pair_kept_count.load()}; }

std::string batched_unsupported(const Config& config, const StrategyConfig& strategy) {
  // The predicate config validation uses, so that anything validation lets through that the
  // batched engine cannot do goes to the torch engine, which reports LibTorch's own error.
  if (smallest_fit_batch(config) < 2 && config.model.batchnorm.semantics == BnSemantics::kTorch && uses_batch_stats_in_fit(config.model.layers, strategy))
    return "PyTorch-numerics BatchNorm on the batch statistics of one row (an error the torch engine reports)";
  return "";
}

std::vector<StrategyResult> finetune_batched(const ModelImpl& pretrained, const StrategyConfig& strategy,
                                             const Config& config, const RunSpec& run, const Dataset& data,
                                             const std::vector<int64_t>& samples,
                                             const std::function<void(size_t, const EpochRecord&)>& on_epoch,
                                             Model* finetuned, const ModelImpl* ready, BatchedCache* cache) {
  const std::string why = batched_unsupported(config, strategy);
  if (!why.empty()) throw std::runtime_error("batched engine: strategy \"" + strategy.name + "\": " + why);
  TORCH_CHECK(finetuned == nullptr || samples.size() == 1, "finetune_batched: finetuned needs exactly one sample");
  const auto& ft = *run.finetune;
  const LossKind loss_kind = config.model.loss;
  const bool classification = loss_kind == LossKind::kCrossEntropy;
  const auto L = static_cast<int64_t>(samples.size());
  // Each lane fine-tunes the k rows of one sample or set: x is [lanes][k][inputs] in the set's order.
  const int64_t k = ft.set_size();
  std::vector<int64_t> rows;
  for (int64_t id : samples) {
    const auto r = ft.rows_of(id);
    TORCH_CHECK(static_cast<int64_t>(r.size()) == k, "finetune_batched: every set of a study has the same size");
    rows.insert(rows.end(), r.begin(), r.end());
  }
  const std::vector<float> x = gather_rows(data.x, rows), y = gather_rows(data.y, rows);
  const int64_t inputs = data.x.size(1), targets = data.y.size(1);
  std::vector<StrategyResult> results(samples.size());
  for (auto& r : results) {  // the curves' room up front: growing them was 5 allocations per curve
    r.loss.reserve(static_cast<size_t>(ft.epochs));
    r.val_loss.reserve(static_cast<size_t>(ft.epochs));
    if (classification) {
      r.accuracy.reserve(static_cast<size_t>(ft.epochs));
      r.val_accuracy.reserve(static_cast<size_t>(ft.epochs));
    }
  }
  std::vector<double> values, correct;

  // Evaluate the untouched pretrained weights: one shared copy for every lane. Unless the model
  // the strategy fine-tunes is their copy (prepare_copies_only): evaluate_before below is then
  // the same pass on the same state and layers, every lane's value the same float (the shared
  // copy's kernels and the interleaved ones compute each lane in the same order).
  const bool pretrained_is_before = prepare_copies_only(strategy);
  std::unique_ptr<CachedNet> local_base, local_net;
  if (!pretrained_is_before) {
    Net& base = net_for(cache, local_base, pretrained, L, k, /*shared=*/true);
    base.forward(Pass::kPlain, x.data(), k);
    lane_losses(base, loss_kind, y.data(), k, targets, false, values, nullptr);
    for (int64_t l = 0; l < L; ++l) results[static_cast<size_t>(l)].evaluate_pretrained = values[static_cast<size_t>(l)];
  }

  // The model the strategy fine-tunes. It is the same for every sample unless recalibration
  // runs through dropout, whose masks come from the sample's own generator.
  const bool dropout = count_kind(config.model.layers, LayerKind::kDropout) > 0;
  const bool per_lane = strategy.recalibrate > 0 && dropout;
  RunSpec lane = run;
  lane.sample = samples.front();
  Model own{nullptr};
  if (ready == nullptr || per_lane) own = prepare_model(pretrained, strategy, config, lane, &data);
  const ModelImpl& source = own ? *own : *ready;
  // Every lane (the padding too) starts from the source's state; per_lane loads its own below.
  // A model prepared here is not kept (the next call prepares another).
  Net& net = net_for(own ? nullptr : cache, local_net, source, L, k, /*shared=*/false);
  net.set_policy(nullptr);
  for (int64_t l = 0; l < L; ++l) {
    lane.sample = samples[static_cast<size_t>(l)];
    if (per_lane) {
      Model lane_model = l == 0 ? own : prepare_model(pretrained, strategy, config, lane, &data);
      if (l > 0) net.load(l, *lane_model);
      net.set_generator(l, lane_model->dropout_generator());
    } else if (dropout) {  // only Dropout draws from it; making one per lane is a few percent of a short run
      net.set_generator(l, std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(dropout_seed(lane))));
    }
  }
  // With one row per lane, an epoch's inference pass and the next epoch's fit pass read the same
  // x and the same state: they run as one forward_pair, each weight loaded once for both. So do
  // evaluate_before's pass and the first epoch's fit pass (a kPlain pass reads no layer mode: it
  // is the same under the strategy's policy). Not with an export, whose checkpoint is taken after
  // the inference pass and before the next fit pass changes running statistics.
  const bool gather = k > 1;
  const bool pairs = !gather && finetuned == nullptr;
  bool fit_ready = pairs;  // this epoch's fit pass already ran (with the last inference pass)
  // Its losses (and their gradient) too: where the pair's passes gave one output, the inference
  // pass's lane_losses computed the next fit pass's values on the same floats, the gradient with them.
  bool fit_losses_ready = false;
  if (pairs) {
    net.set_policy(&strategy);
    net.forward_pair(x.data(), k, Pass::kPlain);
  } else {
    net.forward(Pass::kPlain, x.data(), k);
  }
  lane_losses(net, loss_kind, y.data(), k, targets, false, values, nullptr, pairs ? net.inferred() : nullptr);
  for (int64_t l = 0; l < L; ++l) {
    auto& r = results[static_cast<size_t>(l)];
    r.evaluate_before = values[static_cast<size_t>(l)];
    if (pretrained_is_before) r.evaluate_pretrained = r.evaluate_before;
  }

  if (!pairs) net.set_policy(&strategy);
  const bool steps = !net.trainable().empty();
  Optimizer optimizer(ft.optimizer, net);
  std::vector<Net::Snapshot> best(samples.size());
  std::vector<double> best_value(samples.size(), std::numeric_limits<double>::infinity());
  std::vector<double> val, val_correct;
  EpochRecord rec;  // what every lane shares is set once, not per lane and epoch
  rec.strategy = strategy.name;
  rec.epochs = ft.epochs;
  rec.classification = classification;
  // A set's epoch: its rows in the lane's own order (finetune()'s, from the same stream), in
  // batches of batch_size gathered into xb/yb; Keras' epoch loss is the row-weighted mean of
  // the batches' pre-update losses. One row (a sample) feeds x itself.
  const int64_t b = std::min(std::max<int64_t>(1, ft.batch_size), k);
  std::vector<float> xb(gather ? x.size() : 0), yb(gather ? y.size() : 0);
  // Only a set's rows have an order (one row needs none: no allocation per lane for it).
  const size_t ordered = gather ? samples.size() : 0;
  std::vector<uint64_t> shuffle(ordered);
  std::vector<std::vector<int64_t>> order(ordered, std::vector<int64_t>(static_cast<size_t>(k)));
  for (size_t l = 0; l < ordered; ++l) shuffle[l] = shuffle_state(run.seed, samples[l]);
  std::vector<double> sum(samples.size()), sum_correct(samples.size());
  for (int64_t epoch = 1; epoch <= ft.epochs; ++epoch) {
    rec.epoch = epoch;
    for (size_t l = 0; l < ordered; ++l) epoch_order(ft.shuffle, shuffle[l], order[l]);
    std::fill(sum.begin(), sum.end(), 0.0);
    std::fill(sum_correct.begin(), sum_correct.end(), 0.0);
    for (int64_t start = 0; start < k; start += b) {
      const int64_t len = std::min(b, k - start);
      if (gather)
        for (int64_t l = 0; l < L; ++l)
          for (int64_t r = 0; r < len; ++r) {
            const int64_t from = l * k + order[static_cast<size_t>(l)][static_cast<size_t>(start + r)], to = l * k + r;
            std::copy_n(x.data() + from * inputs, inputs, xb.data() + to * inputs);
            std::copy_n(y.data() + from * targets, targets, yb.data() + to * targets);
          }
      const float* xs = gather ? xb.data() : x.data();
      if (!fit_ready) net.forward(Pass::kFit, xs, len);
      if (fit_losses_ready) {
        values = val;
        if (classification) correct = val_correct;
      } else {
        lane_losses(net, loss_kind, gather ? yb.data() : y.data(), len, targets, steps, values, classification ? &correct : nullptr);
      }
      for (size_t l = 0; l < samples.size(); ++l) {
        sum[l] += values[l] * static_cast<double>(len);
        if (classification) sum_correct[l] += correct[l];
      }
      if (steps) {
        net.backward(xs);
        optimizer.step();
      }
    }
    fit_ready = pairs && epoch < ft.epochs;
    if (fit_ready) net.forward_pair(x.data(), k);
    else net.forward(Pass::kInfer, x.data(), k);
    fit_losses_ready = fit_ready && net.inferred() == net.output();
    lane_losses(net, loss_kind, y.data(), k, targets, fit_losses_ready && steps, val,
                classification ? &val_correct : nullptr, fit_ready ? net.inferred() : nullptr);
    for (size_t l = 0; l < samples.size(); ++l) {
      auto& r = results[l];
      if (r.failed) continue;
      rec.loss = sum[l] / static_cast<double>(k);
      rec.val_loss = val[l];
      if (classification) {
        rec.accuracy = sum_correct[l] / static_cast<double>(k);
        rec.val_accuracy = val_correct[l] / static_cast<double>(k);
      }
      if (!std::isfinite(rec.loss) || !std::isfinite(rec.val_loss)) {
        r = StrategyResult{};
        r.failed = true;
        r.error = not_finite_message(strategy.name, run.seed, samples[l], epoch, rec.loss, rec.val_loss);
        continue;
      }
      // Only an export needs the checkpoint's weights themselves (see evaluate_after below).
      if (record_epoch(r, rec, ft, best_value[l]) && finetuned != nullptr) net.snapshot(static_cast<int64_t>(l), best[l], true);
      if (on_epoch) on_epoch(l, rec);
    }
  }
  // evaluate_after is the inference loss of the best epoch's state. The val pass of that epoch
  // computed the same values on that same state (forward_pair's inference pass is forward(kInfer)
  // value for value; the checkpoint is taken right after it, and
  // inference reads no buffer it writes), so it IS val_loss[best_epoch], bit for bit; the
  // torch engine recomputes it, and BatchedEngine.EvaluateAfterIsTheBestEpochsValLoss checks
  // there that the two are identical for every preset. With an export, the state is restored
  // and the loss recomputed here too.
  if (finetuned != nullptr) {
    for (size_t l = 0; l < samples.size(); ++l)
      if (!best[l].values.empty()) net.snapshot(static_cast<int64_t>(l), best[l], false);
    net.forward(Pass::kInfer, x.data(), k);
    lane_losses(net, loss_kind, y.data(), k, targets, false, values, nullptr);
  }
  for (size_t l = 0; l < samples.size(); ++l) {
    auto& r = results[l];
    r.name = strategy.name;
    r.seed = run.seed;
    r.sample = samples[l];
    if (r.failed) continue;
    r.evaluate_after = finetuned != nullptr ? values[l] : r.val_loss[static_cast<size_t>(r.best_epoch - 1)];
    compute_lag(r);
  }
  if (finetuned != nullptr && !results.front().failed) {  // the torch engine throws first: nothing to export
    Model tuned = strategy_architecture(config, strategy, source.inputs(), source.outputs());
    tuned->copy_state_from(source);
    net.store(0, *tuned);
    tuned->set_policy(Policy{strategy});
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
    optimizer.set_lr(lr);  // before backward(), where a fused update applies it
    net.forward(Pass::kFit, x, rows);
    lane_losses(net, config.model.loss, yb.data_ptr<float>(), rows, targets, true, values, nullptr);
    net.backward(x);
    optimizer.step();
    return values[0];
  });
  net.store(0, model);
  return loss;
}

double batched_gradients(const ModelImpl& model, const StrategyConfig* strategy, LossKind loss,
                         const torch::Tensor& x, const torch::Tensor& y,
                         std::vector<std::pair<std::string, torch::Tensor>>& grads) {
  const int64_t rows = x.size(0);
  Net net(model, 1, rows, /*shared=*/false);
  net.load(0, model);
  // A copy of the model's dropout stream through its state, not Generator::clone(): LibTorch
  // 1.13's clone leaves the copy's weak count at zero, so it is never freed (LeakSanitizer).
  auto gen = std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(0));
  gen->set_state(model.dropout_generator()->get_state());
  net.set_generator(0, gen);
  net.set_policy(strategy);
  const auto xs = x.to(torch::kFloat).contiguous(), ys = y.to(torch::kFloat).contiguous();
  std::vector<double> values;
  net.forward(Pass::kFit, xs.data_ptr<float>(), rows);
  lane_losses(net, loss, ys.data_ptr<float>(), rows, ys.size(1), true, values, nullptr);
  net.backward(xs.data_ptr<float>());
  grads.clear();
  for (const auto& [name, offset, shape] : net.trainable_tensors())
    grads.emplace_back(name, wrap(net.grads() + offset, {std::accumulate(shape.begin(), shape.end(), int64_t{1},
                                                                                std::multiplies<int64_t>())})
                                 .clone()
                                 .view(shape));
  return values[0];
}

double benchmark_step(const ModelImpl& model, const StrategyConfig& strategy, const Config& config,
                      const Dataset& data, int64_t lanes, int64_t steps) {
  Net net(model, lanes, 1, /*shared=*/false);
  net.load(0, model);
  net.replicate(0);  // the padding lanes too
  std::vector<int64_t> samples;
  for (int64_t l = 0; l < lanes; ++l) {
    net.load(l, model);
    net.set_generator(l, std::make_shared<at::Generator>(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(l))));
    samples.push_back(l);
  }
  net.set_policy(&strategy);
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
