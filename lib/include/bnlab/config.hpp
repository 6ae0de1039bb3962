// The experiment description: what a JSON config file says, fully resolved, with no torch types.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "bnlab/layers.hpp"

namespace bnlab {

enum class LossKind { kGaussianNll, kMse, kCrossEntropy };
/// kRmsprop is PyTorch's (eps added to the root: g / (sqrt(v) + eps)); kRmspropKeras is Keras'
/// (eps inside the root, lr inside the momentum: lr g / sqrt(v + eps)).
enum class OptimizerKind { kSgd, kAdam, kAdamW, kRmsprop, kRmspropKeras };
enum class Schedule { kConstant, kCosine };
enum class Monitor { kLoss, kValLoss };
enum class BnMode { kTrain, kEval };
enum class BnModule { kBatchNorm, kFrozen };
enum class TrackingRule { kLibTorch, kPython };

/// Settings of an optimizer; fields that do not apply to the chosen kind are ignored
/// and rejected by the parser when given.
struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSgd;  ///< "sgd" | "adam" | "adamw" | "rmsprop" | "rmsprop_keras"
  double lr = 1e-3;                          ///< learning rate, > 0
  double momentum = 0.0;                     ///< sgd, rmsprop, rmsprop_keras; in [0, 1); default 0
  bool nesterov = false;                     ///< sgd only; needs momentum > 0
  double weight_decay = 0.0;                 ///< >= 0; default 0 (adamw: 0.01); not rmsprop_keras
  double beta1 = 0.9;                        ///< adam/adamw, in [0, 1)
  double beta2 = 0.999;                      ///< adam/adamw, in [0, 1)
  double eps = 1e-8;                         ///< adam/adamw/rmsprop 1e-8, rmsprop_keras 1e-7; > 0
  double alpha = 0.99;                       ///< rmsprop: smoothing of the squared gradient (Keras' rho: 0.9), in [0, 1)
  bool centered = false;                     ///< rmsprop, rmsprop_keras: divide by the gradient's estimated variance
};

struct DataConfig {
  std::string source = "synthetic";  ///< "synthetic" | "csv"
  // synthetic
  uint64_t seed = 0;                 ///< seed of the generator: the data do not change with `seeds`
  int64_t samples = 100000;          ///< number of generated samples, >= 2
  int64_t features = 8;              ///< input width, >= 1
  int64_t targets = 1;               ///< regression outputs (gaussian_nll, mse), >= 1
  int64_t classes = 3;               ///< cross_entropy only: number of classes, >= 2
  double scale = 5e-4;               ///< amplitude of the synthetic target function, > 0
  double noise = 5e-5;               ///< regression: base std of the target noise (x e^[-0.5, 0.5]); classification: std of logit noise; >= 0
  // csv
  std::string path;                            ///< CSV file with a header row (relative to the config file)
  std::vector<std::string> feature_columns;    ///< default: every column that is not a target
  std::vector<std::string> target_columns;     ///< required for csv
  bool standardize = true;                     ///< standardize features with the data set's mean/std (all of it is pretraining data)
  std::string delimiter = ",";                 ///< the field separator: one character (",", ";", "\t", "|", ...)
  std::string missing = "error";               ///< a missing value (empty, NA, NaN, nan): "error" (exit 2) or "drop_rows"
  /// cross_entropy: the label of each class in class order. Resolved from the data (the whole
  /// numbers found, sorted) unless given; given, every label in the file must be one of them.
  std::vector<int64_t> class_labels;
  /// What finetune.sample(s) count: "file_rows" (every data row) or, with missing "drop_rows",
  /// "remaining_rows" (the rows left after dropping). Written to the resolved config; fixed by `missing`.
  std::string sample_indices() const { return missing == "drop_rows" ? "remaining_rows" : "file_rows"; }
};

/// model.batchnorm: the numerics convention of every BatchNorm layer, and the settings a
/// BatchNorm layer takes when it does not give its own.
struct BatchNormConfig {
  BnSemantics semantics = BnSemantics::kKeras;
  double eps = 1e-3;                          ///< default 1e-3 (keras) or 1e-5 (torch)
  double momentum = 0.01;                     ///< PyTorch convention; default 0.01 (keras) or 0.1 (torch)
  bool affine = true;                         ///< learnable gamma (weight) and beta (bias)
};

struct ModelConfig {
  /// The network, resolved once from model.layers or the shorthand (hidden, activation,
  /// dropout, batchnorm.enabled), with the output head appended, every layer named by its
  /// Sequential position. Everything reads this; nothing re-derives positions.
  std::vector<LayerSpec> layers;
  LossKind loss = LossKind::kGaussianNll;
  BatchNormConfig batchnorm;
};

/// The layers the shorthand describes: per width a Dense, a BatchNorm (when `batchnorm`), the
/// activation and a Dropout (when dropout > 0); then the head; named. The default model is
/// shorthand_layers({64, 64}, relu, 0, true, {}).
std::vector<LayerSpec> shorthand_layers(const std::vector<int64_t>& hidden, Activation activation, double dropout,
                                        bool batchnorm, const BatchNormConfig& bn, double alpha = 0);

struct PretrainConfig {
  int64_t epochs = 5;
  int64_t batch_size = 256;
  OptimizerConfig optimizer{OptimizerKind::kAdam, 1e-3};
  Schedule schedule = Schedule::kCosine;      ///< learning-rate schedule over all steps
};

struct FinetuneConfig {
  int64_t sample = 4321;                      ///< the sample of the current run (first of `samples`)
  /// Samples of the study, each fine-tuned on its own: `sample` (one index), `samples` (a
  /// list), or a random draw {count, seed} resolved once the data size is known.
  std::vector<int64_t> samples = {4321};
  int64_t draw_count = 0;                     ///< > 0: draw this many distinct indices at random
  uint64_t draw_seed = 0;                     ///< seed of that draw
  /// Fine-tuning on sets of k samples together (finetune.set / finetune.sets) instead of one: each
  /// set is one run, its rows fed in batches of batch_size as Keras' fit feeds k rows. Empty (and
  /// no set draw): every run fine-tunes one sample. With sets, `samples` holds the runs' ids, the
  /// set positions 0..n-1, and every set has the same size.
  std::vector<std::vector<int64_t>> sets;
  int64_t set_draw_count = 0, set_draw_size = 0;  ///< > 0: draw this many sets of that many distinct rows
  uint64_t set_draw_seed = 0;
  /// Keras fit(shuffle=True): each epoch feeds the set's rows in a new order (fine_tune_order).
  bool shuffle = true;
  bool on_sets() const { return !sets.empty() || set_draw_count > 0; }
  /// Rows one fit on a set holds: k (1 for a sample).
  int64_t set_size() const {
    return !sets.empty() ? static_cast<int64_t>(sets.front().size()) : set_draw_count > 0 ? set_draw_size : 1;
  }
  /// The data rows the run `id` (an entry of samples) fine-tunes on, in the set's order.
  std::vector<int64_t> rows_of(int64_t id) const {
    return sets.empty() ? std::vector<int64_t>{id} : sets.at(static_cast<size_t>(id));
  }
  /// What a run fine-tunes on, for messages and headings: "sample" or "set".
  const char* unit() const { return on_sets() ? "set" : "sample"; }
  int64_t epochs = 10;
  int64_t batch_size = 1;
  OptimizerConfig optimizer{OptimizerKind::kSgd, 1e-3};
  Monitor monitor = Monitor::kLoss;           ///< what the ModelCheckpoint equivalent watches
  bool save_best_only = true;                 ///< keep the best epoch's weights, else the last
};

/// Which BatchNorm layers a strategy touches: all, or a list of positions among the
/// BatchNorm layers (0 = first, LayerSpec::bn_index) and/or module names ("1", "4").
struct LayerSelection {
  bool all = true;
  std::vector<int64_t> indices;
  std::vector<std::string> names;
};

/// A freezing strategy: a value applied to the model, never a branch in the training loop.
struct StrategyConfig {
  std::string name;
  std::string preset;                          ///< preset it expands, "" for fully custom
  BnMode bn_mode = BnMode::kTrain;             ///< mode of selected BN layers during fit
  bool affine_trainable = true;                ///< gamma/beta get gradients and optimizer steps
  std::optional<double> momentum;              ///< running-stat momentum override (0 = frozen)
  bool track_running_stats = true;             ///< false: batch stats in train AND eval (LibTorch rule)
  /// How track_running_stats false reads. "libtorch": batch statistics in training and eval, the
  /// buffers still written, no count (torch::nn::BatchNorm1d). "python": torch.nn.BatchNorm1d's
  /// rule for a module whose buffers exist: batch statistics in training with no buffer update and
  /// no count, the stored buffers in eval (what Lightning's track_running_stats=False flip gives).
  TrackingRule tracking_rule = TrackingRule::kLibTorch;
  /// prior_bn (Schneider et al. 2020): the fit forward normalises with p * running + (1 - p) *
  /// batch statistics, held constant in the gradient; inference uses the running statistics,
  /// which it never updates. The value is p itself, in [0, 1] (p = N / (N + n) for a prior
  /// strength N and n rows per batch); p = 1 is the eval computation. Unset: off.
  std::optional<double> prior;
  /// Batch renormalization (Ioffe 2017) as Keras 3.14's BatchNormalization(renorm=True): the
  /// selected layers become BatchRenorm1d. renorm_clipping's keys; unset: no clip on that side.
  bool renorm = false;
  std::optional<double> renorm_rmax, renorm_rmin, renorm_dmax;
  std::optional<double> renorm_momentum;       ///< PyTorch convention; unset: the strategy's momentum, else the layer's
  /// Where the renorm statistics start: "moving" (from the pretrained moving statistics:
  /// renorm_mean = moving_mean, renorm_stddev = moving_stddev = sqrt(moving_variance + eps))
  /// or "keras" (as Keras creates the variables: 0, 1, 1).
  std::string renorm_init = "moving";
  LayerSelection layers;
  int64_t freeze_linear = 0;                   ///< freeze the first N Linear layers (weight and bias)
  /// PreciseBN: before fine-tuning, set the selected layers' running statistics to the true
  /// average of per-batch statistics over this many pretraining batches; 0 = off.
  int64_t recalibrate = 0;
  bool fold = false;                           ///< fold every BatchNorm into the Linear beside it (fold_plan)
  /// "batchnorm", or "frozen": replace the selected layers by FrozenBatchNorm1d (buffers only,
  /// x * scale + shift), the torchvision/detectron2 module, here for 1-D.
  BnModule bn_module = BnModule::kBatchNorm;
};

/// One point of the fine-tuning grid: its label ("optimizer.lr=1e-07,epochs=5", "" without
/// a grid) and the fine-tuning settings there.
struct GridPoint {
  std::string label;
  FinetuneConfig finetune;
};

/// report: what a study writes besides its store (study.sqlite), and how runs are classified.
/// Not part of a study's identity: changing it never reruns a finished run.
struct ReportConfig {
  /// "auto": curves.csv, metrics.jsonl and per-run records in summary.json for studies of at
  /// most export_limit runs; or an explicit list of "curves", "metrics", "runs" (possibly empty).
  bool export_auto = true;
  std::vector<std::string> exports;
  int64_t export_limit = 10000;                ///< >= 0
  /// A run is diverged when its final training loss exceeds its first by more than
  /// diverged_factor * max(1, |first loss|); > 0.
  double diverged_factor = 10;
};

/// The text exports "report.export" may name, in documentation order.
const std::vector<std::string>& report_export_names();

struct Config {
  std::string name;                            ///< experiment name; default run dir runs/<name>
  uint64_t seed = 0;                           ///< the current run's seed (first of `seeds`)
  std::vector<uint64_t> seeds = {0};           ///< every seed of the study: init, shuffling, dropout
  std::string grid_json = "{}";                ///< the grid as written: finetune path -> values
  std::vector<GridPoint> grid;                 ///< expanded grid; one unlabeled point without a grid
  std::string base_dir;                        ///< directory of the config file, for relative paths
  std::string init_keras;                      ///< init.keras (or its synonym init.keras_h5): start from the user's Keras file instead of pretraining
  /// When init.keras carries a model config, per module of model.layers: the Keras layer it
  /// comes from, Keras 3's weight group, and that layer's trainable flag; the input width and
  /// the last Dense's units the file gives (checked against the data and the loss). Empty for a
  /// weights-only file, whose layers come from the config's model.
  std::vector<std::string> keras_names, keras_weight_keys;
  std::vector<bool> keras_trainable;
  /// init.torch: start from the user's PyTorch file: a torch.save'd state dict, a training
  /// checkpoint holding one under init.key (found among kTorchCheckpointKeys when "") with
  /// init.prefix stripped from its tensor names, or a torch.jit.save'd Sequential.
  std::string init_torch, init_key, init_prefix;
  /// When init.torch is a TorchScript Sequential: per module of model.layers, its torch.nn class.
  std::vector<std::string> torch_types;
  /// The input width and the last Dense's units an init file gives (0: not given), checked
  /// against the data and the loss.
  int64_t init_inputs = 0, init_head_units = 0;
  DataConfig data;
  ModelConfig model;
  PretrainConfig pretrain;
  FinetuneConfig finetune;
  std::vector<StrategyConfig> strategies;
  ReportConfig report;
};

/// One run as the engines take it, handed down beside the study's config (which stays as it was
/// resolved, never patched per run): the seed, the fine-tuning settings of the run's grid point,
/// and the sample.
struct RunSpec {
  uint64_t seed = 0;
  const FinetuneConfig* finetune = nullptr;  ///< points into the study's grid (or its finetune)
  int64_t sample = 0;
};
/// Batches the recalibrate_frozen preset averages over (fvcore's PreciseBN uses 200 iterations).
inline constexpr int64_t kDefaultRecalibrateBatches = 100;

/// The one run a config describes on its own: config.seed, config.finetune, finetune.sample.
inline RunSpec run_of(const Config& config) { return {config.seed, &config.finetune, config.finetune.sample}; }

/// Names of the presets a strategy may start from, in documentation order.
const std::vector<std::string>& preset_names();

/// Reads the model config a Keras file carries (JSON text, "" for a weights-only file); the
/// library's is read_keras_model_config (keras_io.hpp). Injected so that config parsing stays
/// free of HDF5 and zip; without one, init.keras is not opened while parsing.
using KerasConfigReader = std::string (*)(const std::string& path);

/// The entries of a training checkpoint that hold the model's state dict, in the order they are
/// tried when init.key is not given: Lightning's and timm's "state_dict", the PyTorch tutorials'
/// "model_state_dict", and "model".
const std::vector<std::string>& torch_checkpoint_keys();

/// What a PyTorch file says about the network: a TorchScript Sequential gives its modules (named
/// by position, the last Linear the head, eps/momentum/affine from each BatchNorm1d) and their
/// torch.nn classes; a state dict or checkpoint gives none (the config's model describes it).
struct TorchFileModel {
  std::string form;                  ///< "torchscript", or "pickle" (a torch.save file: state dict or checkpoint)
  std::vector<LayerSpec> layers;     ///< torchscript only
  std::vector<std::string> types;    ///< per layer: "torch.nn.Linear", ...
  int64_t inputs = 0;                ///< the first Linear's in_features (torchscript), 0 if none
};
/// The library's is read_torch_file_model (torch_io.hpp); injected like KerasConfigReader.
using TorchModelReader = TorchFileModel (*)(const std::string& path);

/// The readers config parsing uses to take a network's architecture from the user's file.
struct ModelFileReaders {
  KerasConfigReader keras = nullptr;
  TorchModelReader torch = nullptr;
};
/// Both of the library's readers (defined with the file code, which links HDF5, libzip and torch).
ModelFileReaders model_file_readers();

/// The model config a Keras file carries, as JSON text: the model_config attribute of a Keras 2
/// model.save() HDF5 file (split attributes joined), config.json of a Keras 3 .keras archive
/// (read with libzip); "" for a weights-only file. A file of neither kind is an InputError.
/// Defined with the Keras file code (keras_io.cpp), which links HDF5 and libzip.
std::string read_keras_model_config(const std::string& path);

/// Parses a config file, applies `--set path=value` overrides (path in dots, value as JSON
/// or a bare string), fills defaults and validates. Throws InputError listing every problem.
/// With `readers`, an init.keras or init.torch file's architecture becomes model.layers (or is
/// checked against the config's own model) before validation.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {},
                   const ModelFileReaders& readers = {});

/// Same from JSON text; `origin` names the source in messages.
Config parse_config(const std::string& text, const std::string& origin,
                    const std::vector<std::string>& overrides = {},
                    const std::string& base_dir = ".", const ModelFileReaders& readers = {});

/// Every value of the config, defaults included, as pretty JSON (config.resolved.json).
std::string to_json(const Config& config);

/// What makes two studies the same study (resume, merge): to_json without the report section.
std::string study_identity(const Config& config);

/// Resolves a random sample draw against the data size (no-op for explicit samples);
/// throws InputError when the draw or an index does not fit.
void resolve_samples(Config& config, int64_t data_size);

/// splitmix64 (Steele, Lea and Flood 2014): the generator of every draw of samples and sets and
/// of the per-epoch order of a set; advances `state` and returns the next 64-bit value.
uint64_t splitmix64_next(uint64_t& state);

/// The smallest fit batch one epoch on a set holds: k when batch_size >= k, else the last
/// batch's k % batch_size rows (batch_size when it divides k). 1 for a sample.
int64_t smallest_fit_batch(const FinetuneConfig& finetune);
/// The smallest over the study's grid points (what the PyTorch-numerics rule reads).
int64_t smallest_fit_batch(const Config& config);

/// Every data row the study fine-tunes on, sorted and distinct: the samples, or the members of
/// the sets (what sample.pt holds).
std::vector<int64_t> fine_tuned_rows(const FinetuneConfig& finetune);

/// " (rows 3, 17, 42)" for a set, "" for a sample: what a run's heading adds to its id.
std::string set_members(const FinetuneConfig& finetune, int64_t id);

/// The order in which one epoch feeds a set's k rows (positions 0..k-1 in the set): Keras'
/// fit(shuffle=True) draws a new one each epoch. `state` starts at shuffle_state(seed, id) and
/// goes on from epoch to epoch; each epoch is a Fisher-Yates shuffle of 0..k-1 driven by
/// splitmix64 (j = next % (i + 1) for i = k-1 down to 1). Without shuffle, 0..k-1.
uint64_t shuffle_state(uint64_t seed, int64_t id);
void epoch_order(bool shuffle, uint64_t& state, std::vector<int64_t>& order);

/// Whether a strategy's layer selection picks this BatchNorm (by bn_index or module name).
bool layer_selected(const LayerSelection& selection, const LayerSpec& layer);

/// The layers a strategy fine-tunes: BatchNorms folded away (the Linear they fold into gains a
/// bias), or selected ones converted to FrozenBatchNorm1d; renamed by position. Throws
/// std::invalid_argument when fold has no plan (validation reports that first).
std::vector<LayerSpec> prepared_layers(const std::vector<LayerSpec>& layers, const StrategyConfig& strategy);

/// What a strategy does to one layer during fine-tuning: the one resolution that the torch
/// policy, the batched engine, validation and explain read.
struct LayerMode {
  bool trainable = false;            ///< its parameters get gradients and optimizer steps
  // BatchNorm (and FrozenBatchNorm1d, which has no parameters and ignores the rest)
  bool selected = false;             ///< picked by the strategy's `layers`
  bool eval_mode = false;            ///< module in eval mode during fit
  bool track_running_stats = true;
  bool fit_batch_stats = false;      ///< the fit forward normalises with batch statistics
  bool infer_batch_stats = false;    ///< inference does too (track_running_stats false: LibTorch's rule)
  bool counts = false;               ///< num_batches_tracked advances in the fit forward
  double momentum = 0;               ///< of the running-statistics update in the fit forward
  bool updates = false;              ///< the batch-statistics forward writes the running statistics
  /// prior_bn's p when the fit forward mixes running and batch statistics (fit_batch_stats is
  /// then true, the statistics are constants in the gradient); < 0 otherwise.
  double prior = -1;
};

/// Per layer of `prepared` (prepared_layers' result), what `strategy` sets; nullptr: the
/// model's own defaults in training mode (pretraining: everything trains, batch statistics).
std::vector<LayerMode> resolve_modes(const std::vector<LayerSpec>& prepared, const StrategyConfig* strategy);

/// One BatchNorm module as a strategy leaves it for fine-tuning: a row of explain's per-layer
/// table and of report.html's (read from resolve_modes, like the engines).
struct BatchNormModeRow {
  std::string module, kind;           ///< module name, layer kind name
  int64_t bn_index = 0;
  bool selected = false, frozen_module = false;
  bool fit_batch_statistics = false, inference_batch_statistics = false, running_statistics_updated = false;
  std::string fit, inference;         ///< what each forward normalises with, in words
  std::string affine;                 ///< "trainable", "frozen" or "none trainable"
  double prior = -1;                  ///< prior_bn's p; < 0: none
  double momentum = 0;                ///< meaningless for a FrozenBatchNorm1d (frozen_module)
};
std::vector<BatchNormModeRow> batchnorm_mode_rows(const std::vector<LayerSpec>& layers, const StrategyConfig& strategy);

/// Whether any BatchNorm computes batch statistics in the fit forward under this strategy.
bool uses_batch_stats_in_fit(const std::vector<LayerSpec>& layers, const StrategyConfig& strategy);

/// architecture.json: the sized network (inputs, outputs, every module's name, kind, widths and
/// options, and a PyTorch expression that builds the same modules), so that Python rebuilds it
/// without bnlab.
std::string architecture_json(const std::vector<LayerSpec>& sized, BnSemantics semantics, LossKind loss);

/// The network a Keras model config describes (the model_config attribute of a Keras 2
/// model.save() file, config.json of a Keras 3 .keras file): Sequential models and Functional
/// models that are a single chain, of Dense, BatchNormalization (feature axis), Activation,
/// ReLU, LeakyReLU, ELU and Dropout layers; the last Dense is the head. Momentum is converted
/// to PyTorch's convention. Anything else throws InputError naming the layer and its class.
struct KerasArchitecture {
  std::vector<LayerSpec> layers;         ///< named; the last Dense marked as the head
  std::vector<std::string> keras_name;   ///< per module: the Keras layer it comes from
  std::vector<std::string> weights_key;  ///< per module: Keras 3's weight group ("dense_3"), "" for a fused activation
  std::vector<bool> trainable;           ///< per module: that Keras layer's trainable flag
  int64_t inputs = 0;                    ///< the input width the file gives, 0 if none
};
KerasArchitecture keras_architecture(const std::string& json_text, const std::string& origin, const BatchNormConfig& bn);

/// How a network is written as a Keras 2 model.save() file: its model_config (a Sequential
/// of Dense with fused activations, BatchNormalization, Activation/LeakyReLU/ELU, Dropout; a
/// FrozenBatchNorm1d as a BatchNormalization with trainable false), the Keras layer names in
/// order, and for each Keras layer the module whose weights it holds (-1: none).
struct KerasExport {
  std::string model_config;
  std::vector<std::string> layer_names;
  std::vector<int> module_of_layer;
};
KerasExport keras_export_plan(const std::vector<LayerSpec>& sized);

/// keras.json for a run whose architecture came from a Keras file ("" otherwise): every module
/// with its Keras layer and trainable flag, and the strategy that reproduces what Keras' fit()
/// does with the file as saved (BatchNormalization with trainable false: inference mode and
/// frozen gamma/beta, the preset frozen on those layers; leading Dense layers with trainable
/// false: freeze_linear), with an explanation.
std::string keras_json(const Config& config);

/// Hash of the settings that determine pretrained weights (seed, data, model, pretrain).
std::string pretrain_cache_key(const Config& config);

const char* to_string(LossKind l);
const char* to_string(BnSemantics s);
const char* to_string(OptimizerKind o);
const char* to_string(BnMode m);
const char* to_string(BnModule m);
const char* to_string(TrackingRule r);

/// A preset that is another preset's computation under a tool's name ("tf2_trainable_false" is
/// "frozen"): the preset it stands for, or "" when `name` is not an alias.
std::string preset_alias_of(const std::string& name);

}  // namespace bnlab
