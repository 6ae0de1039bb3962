// The network as one resolved description: its layers in torch.nn.Sequential order, one entry
// per module, that the engines, validation, explain, export, interop and the reference all read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bnlab {

/// Every kind of module a network holds. FrozenBatchNorm1d (bn_module "frozen") and
/// BatchRenorm1d (renorm) are made by strategies, never listed by a user.
enum class LayerKind { kDense, kBatchNorm, kFrozenBatchNorm, kActivation, kDropout, kBatchRenorm };

/// BatchNorm numerics: PyTorch's (unbiased running variance, a batch of one is an error in
/// training) or Keras' (biased, a batch of one outputs beta).
enum class BnSemantics { kTorch, kKeras };

/// Element-wise activations, as Keras and PyTorch name them.
enum class Activation { kLinear, kRelu, kTanh, kGelu, kSigmoid, kElu, kLeakyRelu, kSilu, kSoftplus };

/// One module of the network. Fields that do not apply to the kind keep their defaults.
struct LayerSpec {
  LayerKind kind = LayerKind::kDense;
  std::string name;            ///< the Sequential position, "0", "1", ... (state-dict prefix)
  int64_t in = 0, out = 0;     ///< widths; 0 until the network is sized for the data set
  // dense
  int64_t units = 0;           ///< output width; 0 for the head until sized
  bool use_bias = true;        ///< Keras' use_bias / PyTorch's bias
  bool head = false;           ///< the output Dense that bnlab appends (sized by the loss)
  // batchnorm and frozen batchnorm
  BnSemantics semantics = BnSemantics::kKeras;  ///< model.batchnorm.semantics, the same for every layer
  double eps = 1e-3;           ///< > 0
  double momentum = 0.01;      ///< PyTorch convention (weight of the new batch), in [0, 1]
  bool scale = true;           ///< gamma ("weight") exists and is a parameter (Keras' scale)
  bool center = true;          ///< beta ("bias") exists and is a parameter (Keras' center)
  int64_t bn_index = -1;       ///< position among the model's BatchNorm layers, kept after a
                               ///< strategy converts the layer to FrozenBatchNorm1d or BatchRenorm1d
  // batch renormalization (BatchRenorm1d): Keras' renorm_clipping, +-inf / 0 where not given,
  // and the renorm statistics' momentum (PyTorch convention)
  double renorm_rmax = 0, renorm_rmin = 0, renorm_dmax = 0;
  bool renorm_has_rmax = false, renorm_has_rmin = false, renorm_has_dmax = false;
  double renorm_momentum = 0.01;
  // activation
  Activation activation = Activation::kRelu;
  double alpha = 0;            ///< leaky_relu: negative slope; elu: alpha
  bool fused = false;          ///< written as Dense(activation=...) (Keras' fused form)
  // dropout
  double rate = 0;             ///< probability of zeroing, in [0, 1)
};

/// Number of layers of `kind` in `layers`.
int64_t count_kind(const std::vector<LayerSpec>& layers, LayerKind kind);

/// Gives every layer its Sequential name and every BatchNorm its bn_index, in order.
void name_layers(std::vector<LayerSpec>& layers);

/// Fills the widths for `inputs` features and a head of `outputs` units. Throws
/// std::invalid_argument when the list has no head.
std::vector<LayerSpec> sized_layers(std::vector<LayerSpec> layers, int64_t inputs, int64_t outputs);

/// The name a config file uses for an activation ("relu", "leaky_relu", ...), and back;
/// from_name returns false for an unknown name.
const char* activation_name(Activation a);
bool activation_from_name(const std::string& name, Activation& out);
/// Every activation, in documentation order (what the generic kernel test iterates over).
const std::vector<Activation>& all_activations();
const char* layer_kind_name(LayerKind k);

/// How the network's BatchNorm layers fold into Linear layers: each BatchNorm directly after a
/// Linear folds into it; one after an activation, a Dropout or on the inputs folds into the
/// Linear directly after it. `error` names the first BatchNorm that has neither.
struct FoldStep {
  size_t bn = 0;               ///< index of the BatchNorm in the layer list
  size_t linear = 0;           ///< index of the Linear it folds into
  bool into_next = false;      ///< true: W' = W diag(s), b' = b + W (beta - mean s)
};
std::vector<FoldStep> fold_plan(const std::vector<LayerSpec>& layers, std::string* error);

/// A one-line PyTorch expression that builds the same modules (torch.nn.Sequential(...)).
std::string pytorch_expression(const std::vector<LayerSpec>& sized);

}  // namespace bnlab
