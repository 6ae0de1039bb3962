// The layer-kind registry: everything about one kind of layer in one definition (its state
// tensors, its torch module, its batched-engine forward and backward, its Keras mapping,
// whether strategies select it). Adding a kind means adding its definition in
// layer_kinds.cpp and a case to layer_kind(); the generic tests run over every kind.
#pragma once

#include <torch/torch.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "arena.hpp"
#include "lane_kernels.hpp"
#include "nn.hpp"

namespace bnlab {

/// Which forward pass the batched engine runs: the fit (training) forward under the policy;
/// inference under the policy (what evaluate_inference runs on a model with a policy);
/// inference with running statistics everywhere (a model without a policy).
enum class Pass { kFit, kInfer, kPlain };

/// One state tensor of a layer, in state-dict order within the layer.
struct StateTensor {
  enum Where { kParameter, kBuffer, kCounter };  ///< counter: an int64 buffer (num_batches_tracked)
  std::string name;                               ///< "weight", "running_mean", ...
  Where where;
  std::vector<int64_t> shape;
};

/// One Keras weight of a layer, in the order Keras saves them, and the tensor it holds.
struct KerasWeight {
  const char* keras;   ///< "kernel", "gamma", ...
  const char* tensor;  ///< the state tensor: "weight", ...
  bool transpose;      ///< Keras' kernel is [in, out], PyTorch's weight [out, in]
};

/// The batched engine's storage, as every kind's kernels see it: `lanes` copies of a flat
/// parameter block (and its gradients), a buffer block and int64 counters. Lanes come in groups
/// of V, interleaved: element e of lane v of group g is at [g][e][v] (block(g)[e * V + v]), and
/// activations are [groups][stride rows][width][V] with `rows` rows in use. With V = 1 that is
/// one plain block per lane; with V = lanes::kWidth one lane's arithmetic is a column of vertical
/// SIMD. Element-wise loops over a group's block (V times a lane's length) need no change.
struct LaneStore {
  int64_t lanes = 0, stride = 0, rows = 0;
  int64_t V = 1;        ///< lanes per group; `lanes` is a multiple of it
  int64_t used = 0;     ///< lanes that hold a run; the rest pad the last group
  bool shared = false;  ///< every lane reads copy 0 (inference on shared weights)
  float* params = nullptr;
  float* grads = nullptr;
  float* buffers = nullptr;
  int64_t* counts = nullptr;
  int64_t n_params = 0, n_buffers = 0, n_counts = 0;
  std::vector<std::shared_ptr<at::Generator>>* generators = nullptr;  ///< per lane (dropout)
  std::vector<float>* scratch = nullptr;  ///< transposes for the GEMM path
  std::vector<float>* stats = nullptr;    ///< per-channel sums
  /// Set (interleaved lanes only): a trainable layer whose kind fuses_sgd() applies this rule to
  /// its parameters in its backward pass instead of writing their gradients.
  const lanes::Sgd* sgd = nullptr;
  /// Bumped by the engine whenever it writes the buffers from outside a forward pass (loading,
  /// replicating, restoring lanes): what a layer computed from its running statistics before is
  /// then stale (BatchedLayer::istd_version).
  uint64_t version = 1;
  int64_t groups() const { return lanes / V; }
  /// The parameter, gradient and buffer blocks of a group (of a lane where V = 1).
  float* P(int64_t group) const { return params + (shared ? 0 : group * n_params * V); }
  float* G(int64_t group) const { return grads + group * n_params * V; }
  float* B(int64_t group) const { return buffers + (shared ? 0 : group * n_buffers * V); }
  /// A lane's counters (never interleaved).
  int64_t* C(int64_t lane) const { return counts + (shared ? 0 : lane * n_counts); }
  /// Adds one to counter `at` of every lane of `group`.
  void count(int64_t group, int64_t at) const {
    for (int64_t v = 0; v < V; ++v) ++C(group * V + v)[at];
  }
  /// Three per-channel scratch vectors of `c` floats (which = 0, 1, 2); all three are sized at
  /// once, so a pointer taken earlier stays valid for the same c.
  float* stat(int64_t c, int which) const {
    if (static_cast<int64_t>(stats->size()) < 3 * c) stats->resize(static_cast<size_t>(3 * c));
    return stats->data() + which * c;
  }
};

/// One layer in the batched engine: its spec, what the strategy does to it, where its state
/// tensors sit (offset of each StateTensor in its block, in state() order) and what the
/// backward pass needs from the forward pass.
struct BatchedLayer {
  LayerSpec spec;
  LayerMode mode;
  std::vector<int64_t> at;
  bool need_dx = false;        ///< a trainable parameter sits below this layer
  float* saved = nullptr;      ///< BatchNorm: x-hat; Dropout: the mask ([lanes][stride][width])
  float* saved_c = nullptr;    ///< BatchNorm: 1/sqrt(var + eps) per lane and channel
  /// BatchNorm: the LaneStore::version at which saved_c was computed from the running variance
  /// of every group, unchanged since (0: not). The running statistics change only in a forward
  /// pass on batch statistics, which resets it, or from outside, which bumps the version; an
  /// inference forward then reuses saved_c instead of taking a square root and a division per
  /// element again (frozen BatchNorm: every pass).
  uint64_t istd_version = 0;
  /// BatchNorm and FrozenBatchNorm1d: the LaneStore::version at which saved_c's scale and shift
  /// (after the 1/sqrt) were computed from a gamma, beta and running statistics that nothing but
  /// the engine's writes can change there (0: not kept). A layer whose gamma or beta trains never
  /// keeps them; a forward pass on batch statistics drops them.
  uint64_t affine_version = 0;
  /// Set by the engine before a forward pass when every lane (the padding too) holds the same
  /// parameters for this layer: one lane's plain copy of the whole parameter block (this layer's
  /// at `at`, not interleaved), which a kind may read once for all lanes instead of each lane's
  /// copy. Null otherwise.
  const float* same_params = nullptr;
  /// Set by the Net for one backward pass of a trainable Dense layer under a fused SGD rule, one
  /// row per lane: the lanes do not hold this layer's parameters yet (their memory is stale);
  /// they are these values (one lane's state, plain), which the step reads from here before it
  /// writes the lanes (see Net::replicate).
  const float* lazy_params = nullptr;
};

/// How a layer is written as a TorchScript module (bnlab export --as torchscript): PyTorch's own
/// class name, so that torch.jit.load and bnlab's TorchScript reader see a torch.nn module; its
/// Final constants; its forward in TorchScript. Its state tensors are registered as state()
/// says, and each name in `none` as an Optional[Tensor] attribute holding None (no bias).
struct TorchScriptClass {
  std::string qualified_name;
  std::vector<std::pair<std::string, c10::IValue>> constants;
  std::vector<std::string> none;
  std::string forward;
};

class LayerKindDef {
 public:
  virtual ~LayerKindDef() = default;
  /// The layer's tensors with their shapes (what state_dict holds under "<name>.").
  virtual std::vector<StateTensor> state(const LayerSpec& l) const = 0;
  /// The torch module (the torch engine, the reference). `dropout_generator`: the model's.
  virtual torch::nn::AnyModule module(const LayerSpec& l, const std::shared_ptr<at::Generator>& dropout_generator) const = 0;
  /// How many floats of saved activations the layer needs for `lanes` x `stride` rows: per
  /// element of its output (`saved`) and per lane and channel (`saved_c`); 0 for none.
  virtual void saved_sizes(const LayerSpec&, int64_t /*lanes*/, int64_t /*stride*/, int64_t& saved, int64_t& saved_c) const {
    saved = saved_c = 0;
  }
  /// out = layer(in) for every lane over store.rows rows.
  virtual void forward(const LaneStore& store, BatchedLayer& l, Pass pass, const float* in, float* out) const = 0;
  /// Two forward passes over the same state, `first` on in_a then `second` on in_b: the values
  /// of two forward() calls in that order (a kind may share its loads between them). Net runs
  /// every layer's pair before the next layer's, which gives the values of the two whole passes
  /// in sequence because a layer's forward reads and writes only its own state, and `first` (the
  /// inference pass) draws no random numbers: a kind that broke either would have to opt out.
  virtual void forward_pair(const LaneStore& store, BatchedLayer& l, Pass first, const float* in_a, float* out_a,
                            Pass second, const float* in_b, float* out_b) const {
    forward(store, l, first, in_a, out_a);
    forward(store, l, second, in_b, out_b);
  }
  /// Whether forward(a) and forward(b) give the same values from the same input and state, and
  /// the second writes no state the first does not (Net::forward_pair then runs one of them).
  virtual bool same_passes(const BatchedLayer&, Pass /*a*/, Pass /*b*/) const { return false; }
  /// What a fit pass's output depends on (Net::forward_pair keeps it across a step that changed
  /// no parameter of this layer or below): kInput, the input and the layer's parameters alone,
  /// and the pass writes no state, so the kept output stands; kInputWrites, the same output
  /// from the same input and parameters, but the pass also writes state (running statistics)
  /// and must run; kMore, anything else (random numbers, running statistics).
  enum class FitOutput { kInput, kInputWrites, kMore };
  virtual FitOutput fit_output(const BatchedLayer&) const { return FitOutput::kMore; }
  /// From g = dL/d(out): the parameter gradients (when l.mode.trainable) and dx = dL/d(in)
  /// (when l.need_dx), after a fit forward.
  virtual void backward(const LaneStore& store, const BatchedLayer& l, const float* in, const float* out,
                        const float* g, float* dx) const = 0;
  /// Whether backward applies LaneStore::sgd itself when one is set (the optimizer then skips
  /// the layer's parameters).
  virtual bool fuses_sgd() const { return false; }
  /// Whether a +-0 gradient from above gives +-0 parameter gradients and a +-0 dx here, given
  /// finite inputs, parameters and (for BatchNorm, which Net::zero_below checks) running
  /// statistics: a kind that may sit below a zero_below stop.
  virtual bool passes_zero_gradient() const { return false; }
  /// Keras: the class name of the layer and its weights in file order.
  virtual const char* keras_class(const LayerSpec& l) const = 0;
  virtual std::vector<KerasWeight> keras_weights(const LayerSpec&) const { return {}; }
  virtual TorchScriptClass torchscript(const LayerSpec& l) const = 0;
  /// Strategies' `layers` select layers of this kind (BatchNorm).
  virtual bool selectable() const { return false; }
};

/// The definition of a kind: an exhaustive switch, no default.
const LayerKindDef& layer_kind(LayerKind kind);

/// Every registered kind (what the generic tests iterate over).
const std::vector<LayerKind>& all_layer_kinds();

/// The activation as tensor ops (the torch engine) and as the batched kernels' loops.
torch::Tensor activation_torch(Activation a, double alpha, const torch::Tensor& x);

}  // namespace bnlab
