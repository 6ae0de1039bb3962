// Strict JSON config parsing (unknown keys are errors), defaults, overrides and validation.
// The only translation unit that knows the JSON layout of an experiment.
#include "bnlab/config.hpp"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "text.hpp"

namespace bnlab {

using json = nlohmann::ordered_json;

InputError::InputError(std::vector<std::string> problems)
    : std::runtime_error(problems.empty() ? std::string("bad input") : problems.front()),
      problems_(std::move(problems)) {}

namespace {

const char* json_type(const json& j) {
  switch (j.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::number_float: return "a number";
    default: return "an integer";
  }
}

std::string shown(const json& j) {
  std::string s = j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

/// Collects problems, each prefixed with the file it came from.
struct Problems {
  std::string origin;
  std::vector<std::string> list;
  void add(const std::string& path, const std::string& message) {
    list.push_back(origin + ": " + (path.empty() ? std::string("(top level)") : path) + ": " + message);
  }
};

template <class E>
using EnumTable = std::vector<std::pair<const char*, E>>;

const EnumTable<Activation> kActivations = [] {
  EnumTable<Activation> t;
  for (Activation a : all_activations()) t.emplace_back(activation_name(a), a);
  return t;
}();
const EnumTable<LossKind> kLosses = {{"gaussian_nll", LossKind::kGaussianNll},
                                     {"mse", LossKind::kMse},
                                     {"cross_entropy", LossKind::kCrossEntropy}};
const EnumTable<BnSemantics> kSemantics = {{"keras", BnSemantics::kKeras},
                                           {"torch", BnSemantics::kTorch}};
const EnumTable<OptimizerKind> kOptimizers = {{"sgd", OptimizerKind::kSgd},
                                              {"adam", OptimizerKind::kAdam},
                                              {"adamw", OptimizerKind::kAdamW},
                                              {"rmsprop", OptimizerKind::kRmsprop},
                                              {"rmsprop_keras", OptimizerKind::kRmspropKeras}};
const EnumTable<Schedule> kSchedules = {{"constant", Schedule::kConstant},
                                        {"cosine", Schedule::kCosine}};
const EnumTable<Monitor> kMonitors = {{"loss", Monitor::kLoss}, {"val_loss", Monitor::kValLoss}};
const EnumTable<BnMode> kBnModes = {{"train", BnMode::kTrain}, {"eval", BnMode::kEval}};
const EnumTable<BnModule> kBnModules = {{"batchnorm", BnModule::kBatchNorm}, {"frozen", BnModule::kFrozen}};
const EnumTable<TrackingRule> kTrackingRules = {{"libtorch", TrackingRule::kLibTorch}, {"python", TrackingRule::kPython}};

template <class E>
const char* enum_name(const EnumTable<E>& table, E value) {
  for (const auto& [name, v] : table)
    if (v == value) return name;
  return "?";
}

template <class E>
std::string enum_choices(const EnumTable<E>& table) {
  std::vector<std::string> names;
  for (const auto& entry : table) names.emplace_back(entry.first);
  return join(names, ", ");
}

/// Reads one JSON object: typed getters record which keys were used; finish() reports
/// the keys that were not, with a "did you mean" when one is close to a known key.
class ObjectReader {
 public:
  ObjectReader(const json* j, std::string path, Problems& problems)
      : j_(j), path_(std::move(path)), problems_(problems) {
    if (j_ != nullptr && !j_->is_object()) {
      problems_.add(path_, std::string("expected an object, got ") + json_type(*j_) + " " + shown(*j_));
      j_ = nullptr;
    }
  }

  std::string child_path(const std::string& key) const {
    return path_.empty() ? key : path_ + "." + key;
  }

  /// The value at key, or nullptr when absent; marks the key as known.
  const json* find(const std::string& key) {
    known_.push_back(key);
    if (j_ == nullptr) return nullptr;
    auto it = j_->find(key);
    return it == j_->end() ? nullptr : &*it;
  }

  bool has(const std::string& key) const { return j_ != nullptr && j_->contains(key); }

  void get(const std::string& key, bool& out) {
    if (const json* v = find(key)) {
      if (v->is_boolean()) out = v->get<bool>();
      else type_error(key, "a boolean (true or false)", *v);
    }
  }
  void get(const std::string& key, int64_t& out) {
    if (const json* v = find(key)) read_int(child_path(key), *v, out);
  }
  void get(const std::string& key, uint64_t& out) {
    if (const json* v = find(key)) {
      if (v->is_number_unsigned()) out = v->get<uint64_t>();
      else if (v->is_number_integer() && v->get<int64_t>() >= 0) out = v->get<uint64_t>();
      else type_error(key, "a non-negative integer", *v);
    }
  }
  void get(const std::string& key, double& out) {
    if (const json* v = find(key)) {
      if (v->is_number()) out = v->get<double>();
      else type_error(key, "a number", *v);
    }
  }
  void get(const std::string& key, std::string& out) {
    if (const json* v = find(key)) {
      if (v->is_string()) out = v->get<std::string>();
      else type_error(key, "a string", *v);
    }
  }
  void get(const std::string& key, std::vector<int64_t>& out) {
    if (const json* v = find(key)) {
      if (!v->is_array()) return type_error(key, "an array of integers", *v);
      out.clear();
      for (size_t i = 0; i < v->size(); ++i) {
        int64_t x = 0;
        if (read_int(child_path(key) + "[" + std::to_string(i) + "]", (*v)[i], x)) out.push_back(x);
      }
    }
  }
  void get(const std::string& key, std::vector<std::string>& out) {
    if (const json* v = find(key)) {
      if (!v->is_array()) return type_error(key, "an array of strings", *v);
      out.clear();
      for (size_t i = 0; i < v->size(); ++i) {
        if ((*v)[i].is_string()) out.push_back((*v)[i].get<std::string>());
        else problems_.add(child_path(key) + "[" + std::to_string(i) + "]",
                           std::string("expected a string, got ") + json_type((*v)[i]) + " " + shown((*v)[i]));
      }
    }
  }
  template <class E>
  void get_enum(const std::string& key, const EnumTable<E>& table, E& out) {
    if (const json* v = find(key)) {
      if (!v->is_string()) return type_error(key, "one of " + enum_choices(table), *v);
      const std::string s = v->get<std::string>();
      for (const auto& [name, value] : table) {
        if (s == name) {
          out = value;
          return;
        }
      }
      std::vector<std::string> names;
      for (const auto& entry : table) names.emplace_back(entry.first);
      problems_.add(child_path(key), "unknown value \"" + s + "\"" + did_you_mean(s, names) +
                                         "; valid values: " + enum_choices(table));
    }
  }

  void finish() {
    if (j_ == nullptr) return;
    for (auto it = j_->begin(); it != j_->end(); ++it) {
      if (std::find(known_.begin(), known_.end(), it.key()) != known_.end()) continue;
      problems_.add(child_path(it.key()),
                    "unknown key" + did_you_mean(it.key(), known_) +
                        (known_.empty() ? std::string() : "; valid keys here: " + join(known_, ", ")));
    }
  }

  void type_error(const std::string& key, const std::string& expected, const json& v) {
    problems_.add(child_path(key), "expected " + expected + ", got " + json_type(v) + " " + shown(v));
  }

 private:
  bool read_int(const std::string& path, const json& v, int64_t& out) {
    if (v.is_number_integer()) {
      out = v.get<int64_t>();
      return true;
    }
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::floor(d) == d && std::abs(d) < 9e15) {  // 1e5 written as a float is still whole
        out = static_cast<int64_t>(d);
        return true;
      }
    }
    problems_.add(path, std::string("expected an integer, got ") + json_type(v) + " " + shown(v));
    return false;
  }

  const json* j_;
  std::string path_;
  Problems& problems_;
  std::vector<std::string> known_;
};

/// The keys each optimizer takes after name and lr, in the order config.resolved.json writes
/// them: the one place that says which settings belong to which optimizer.
struct OptimizerField {
  const char* key;
  double OptimizerConfig::*number;
  bool OptimizerConfig::*flag;
};

const std::vector<OptimizerField>& optimizer_fields(OptimizerKind kind) {
  using O = OptimizerConfig;
  static const std::vector<OptimizerField> kSgd = {
      {"weight_decay", &O::weight_decay, nullptr}, {"momentum", &O::momentum, nullptr}, {"nesterov", nullptr, &O::nesterov}};
  static const std::vector<OptimizerField> kAdam = {{"weight_decay", &O::weight_decay, nullptr},
                                                    {"beta1", &O::beta1, nullptr},
                                                    {"beta2", &O::beta2, nullptr},
                                                    {"eps", &O::eps, nullptr}};
  static const std::vector<OptimizerField> kRmsprop = {{"weight_decay", &O::weight_decay, nullptr},
                                                       {"alpha", &O::alpha, nullptr},
                                                       {"eps", &O::eps, nullptr},
                                                       {"momentum", &O::momentum, nullptr},
                                                       {"centered", nullptr, &O::centered}};
  // Keras' name for the smoothing is rho; Keras 3's weight_decay is another (decoupled) rule, not offered.
  static const std::vector<OptimizerField> kRmspropKeras = {{"rho", &O::alpha, nullptr},
                                                            {"eps", &O::eps, nullptr},
                                                            {"momentum", &O::momentum, nullptr},
                                                            {"centered", nullptr, &O::centered}};
  switch (kind) {
    case OptimizerKind::kSgd: return kSgd;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW: return kAdam;
    case OptimizerKind::kRmsprop: return kRmsprop;
    case OptimizerKind::kRmspropKeras: return kRmspropKeras;
  }
  throw std::logic_error("optimizer_fields: unregistered optimizer");
}

void read_optimizer(ObjectReader& parent, const std::string& key, OptimizerConfig& o,
                    Problems& problems) {
  const json* j = parent.find(key);
  if (j == nullptr) return;
  ObjectReader r(j, parent.child_path(key), problems);
  r.get_enum("name", kOptimizers, o.kind);
  // Each framework's defaults: torch's AdamW decays 0.01; Keras' RMSprop has rho 0.9, eps 1e-7.
  if (o.kind == OptimizerKind::kAdamW) o.weight_decay = 0.01;
  if (o.kind == OptimizerKind::kRmspropKeras) o.alpha = 0.9, o.eps = 1e-7;
  r.get("lr", o.lr);
  for (const auto& f : optimizer_fields(o.kind)) {
    if (f.number) r.get(f.key, o.*f.number);
    else r.get(f.key, o.*f.flag);
  }
  r.finish();
}

struct Preset {
  const char* name;
  std::function<void(StrategyConfig&)> set;
  const char* alias_of = nullptr;  ///< the preset whose computation this is, under a tool's name
};

/// prior_bn's p: a prior worth N = 16 samples against the one sample of a fit batch,
/// p = N / (N + n) = 16/17 (robusta computes p this way, examples/batchnorm/src/evaluate.py).
constexpr double kDefaultPrior = 16.0 / 17.0;

const std::vector<Preset>& presets() {
  static const std::vector<Preset> kPresets = [] {
    std::vector<Preset> v = {
        {"train", [](StrategyConfig&) {}},
        {"freeze_affine", [](StrategyConfig& s) { s.affine_trainable = false; }},
        {"momentum_zero", [](StrategyConfig& s) { s.momentum = 0.0; }},
        {"freeze_affine_momentum_zero",
         [](StrategyConfig& s) {
           s.affine_trainable = false;
           s.momentum = 0.0;
         }},
        {"eval", [](StrategyConfig& s) { s.bn_mode = BnMode::kEval; }},
        {"frozen",
         [](StrategyConfig& s) {
           s.bn_mode = BnMode::kEval;
           s.affine_trainable = false;
         }},
        {"recalibrate_frozen",
         [](StrategyConfig& s) {
           s.recalibrate = kDefaultRecalibrateBatches;
           s.bn_mode = BnMode::kEval;
           s.affine_trainable = false;
         }},
        {"fold", [](StrategyConfig& s) { s.fold = true; }},
        {"batch_stats", [](StrategyConfig& s) { s.track_running_stats = false; }},
        {"prior_bn", [](StrategyConfig& s) { s.prior = kDefaultPrior; }},
        {"renorm",
         [](StrategyConfig& s) {
           // Ioffe (2017)'s final clipping, rmin = 1/rmax (torchrl's BatchRenorm1d defaults too).
           s.renorm = true;
           s.renorm_rmax = 3.0;
           s.renorm_rmin = 1.0 / 3.0;
           s.renorm_dmax = 5.0;
         }},
        {"frozen_bn_module", [](StrategyConfig& s) { s.bn_module = BnModule::kFrozen; }},
        {"lightning_freeze",
         [](StrategyConfig& s) {
           s.affine_trainable = false;
           s.track_running_stats = false;
           s.tracking_rule = TrackingRule::kPython;
         }},
    };
    // What a user of each tool gets, where it is one of the computations above
    // (docs/strategies.md cites the code of each).
    const std::pair<const char*, const char*> kAliases[] = {
        {"keras2_trainable_false", "freeze_affine_momentum_zero"},
        {"tf1_learning_phase", "frozen"},
        {"tf2_trainable_false", "frozen"},
        {"keras3_trainable_false", "frozen"},
        {"keras3_training_false", "eval"},
        {"torch_eval_then_train", "train"},
        {"fastai_bn_freeze", "frozen"},
        {"mmcv_norm_eval", "eval"},
        {"detectron2_frozen_bn", "frozen_bn_module"},
        {"timm_frozen_bn", "frozen_bn_module"},
    };
    for (const auto& [alias, target] : kAliases) {
      const auto it = std::find_if(v.begin(), v.end(), [t = target](const Preset& p) { return std::string(p.name) == t; });
      v.push_back({alias, it->set, it->name});
    }
    return v;
  }();
  return kPresets;
}

bool apply_preset(const std::string& name, StrategyConfig& s) {
  for (const auto& p : presets()) {
    if (name == p.name) {
      s.preset = name;
      p.set(s);
      return true;
    }
  }
  return false;
}

std::string unknown_preset_message(const std::string& name) {
  return "unknown preset \"" + name + "\"" + did_you_mean(name, preset_names()) +
         "; valid presets: " + join(preset_names(), ", ");
}

void read_strategy(const json& j, const std::string& path, StrategyConfig& s, Problems& problems) {
  if (j.is_string()) {
    s.name = j.get<std::string>();
    if (!apply_preset(s.name, s)) problems.add(path, unknown_preset_message(s.name));
    return;
  }
  ObjectReader r(&j, path, problems);
  std::string preset;
  r.get("preset", preset);
  if (!preset.empty() && !apply_preset(preset, s)) problems.add(r.child_path("preset"), unknown_preset_message(preset));
  s.name = preset;
  r.get("name", s.name);
  if (!r.has("name") && preset.empty()) problems.add(path, "a custom strategy needs a \"name\" (or a \"preset\" to start from)");
  if (r.has("name") && s.name.empty()) problems.add(r.child_path("name"), "must not be empty");
  r.get_enum("bn_mode", kBnModes, s.bn_mode);
  if (const json* a = r.find("affine")) {
    if (a->is_string() && (*a == "trainable" || *a == "frozen")) s.affine_trainable = (*a == "trainable");
    else r.type_error("affine", "\"trainable\" or \"frozen\"", *a);
  }
  if (const json* rs = r.find("running_stats")) {
    if (rs->is_string() && *rs == "update") s.momentum.reset();
    else if (rs->is_string() && *rs == "freeze") s.momentum = 0.0;
    else r.type_error("running_stats", "\"update\" or \"freeze\"", *rs);
  }
  if (const json* m = r.find("momentum")) {
    if (!m->is_number()) r.type_error("momentum", "a number in [0, 1]", *m);
    else if (r.has("running_stats")) problems.add(r.child_path("momentum"), "give either running_stats or momentum, not both");
    else s.momentum = m->get<double>();
  }
  r.get("track_running_stats", s.track_running_stats);
  r.get_enum("tracking_rule", kTrackingRules, s.tracking_rule);
  if (const json* pr = r.find("prior")) {
    if (pr->is_number()) s.prior = pr->get<double>();
    else if (pr->is_null()) s.prior.reset();
    else r.type_error("prior", "a number p in [0, 1] (p = N / (N + n) for a prior strength N), or null", *pr);
  }
  r.get("renorm", s.renorm);
  if (const json* rc = r.find("renorm_clipping")) {
    const std::string cpath = r.child_path("renorm_clipping");
    if (rc->is_object()) {
      // Keras' renorm_clipping: the keys given are the clipping; a missing key clips nothing.
      s.renorm_rmax.reset(), s.renorm_rmin.reset(), s.renorm_dmax.reset();
      ObjectReader c(rc, cpath, problems);
      const auto key = [&](const char* k, std::optional<double>& out) {
        if (const json* v = c.find(k)) {
          if (v->is_number()) out = v->get<double>();
          else if (v->is_null()) out.reset();
          else c.type_error(k, "a number or null (no clipping)", *v);
        }
      };
      key("rmax", s.renorm_rmax);
      key("rmin", s.renorm_rmin);
      key("dmax", s.renorm_dmax);
      c.finish();
    } else if (rc->is_null()) {  // Keras' renorm_clipping=None: no clipping
      s.renorm_rmax.reset(), s.renorm_rmin.reset(), s.renorm_dmax.reset();
    } else {
      r.type_error("renorm_clipping", "an object with rmax, rmin and/or dmax (Keras' renorm_clipping)", *rc);
    }
  }
  if (const json* rm = r.find("renorm_momentum")) {
    if (rm->is_number()) s.renorm_momentum = rm->get<double>();
    else if (rm->is_null()) s.renorm_momentum.reset();
    else r.type_error("renorm_momentum", "a number in [0, 1] (PyTorch's convention) or null (the layer's momentum)", *rm);
  }
  if (const json* ri = r.find("renorm_init")) {
    if (ri->is_string() && (*ri == "moving" || *ri == "keras")) s.renorm_init = ri->get<std::string>();
    else r.type_error("renorm_init", "\"moving\" or \"keras\"", *ri);
  }
  // Switching a preset's computation off takes its settings with it, unless they are given here.
  if (r.has("renorm") && !s.renorm && !r.has("renorm_clipping") && !r.has("renorm_momentum") && !r.has("renorm_init")) {
    s.renorm_rmax.reset(), s.renorm_rmin.reset(), s.renorm_dmax.reset(), s.renorm_momentum.reset();
    s.renorm_init = "moving";
  }
  if (r.has("track_running_stats") && s.track_running_stats && !r.has("tracking_rule")) s.tracking_rule = TrackingRule::kLibTorch;
  if (const json* l = r.find("layers")) {
    const std::string lpath = r.child_path("layers");
    if (l->is_string() && *l == "all") {
      s.layers = LayerSelection{};
    } else if (l->is_array()) {
      s.layers.all = false;
      for (size_t i = 0; i < l->size(); ++i) {
        const json& e = (*l)[i];
        if (e.is_number_integer()) s.layers.indices.push_back(e.get<int64_t>());
        else if (e.is_string()) s.layers.names.push_back(e.get<std::string>());
        else problems.add(lpath + "[" + std::to_string(i) + "]",
                          std::string("expected a BatchNorm index (integer) or module name (string), got ") + json_type(e));
      }
    } else {
      r.type_error("layers", "\"all\" or an array of BatchNorm indices / module names", *l);
    }
  }
  r.get("freeze_linear", s.freeze_linear);
  r.get("recalibrate", s.recalibrate);
  r.get("fold", s.fold);
  r.get_enum("bn_module", kBnModules, s.bn_module);
  r.finish();
}

/// Sets root[a][b]... = value for a dotted path, creating missing objects. An array element
/// must already exist (an index never grows an array: "strategies.99999999999" would
/// allocate gigabytes); a component inside a number, string or boolean is refused.
bool set_path(json& root, const std::string& dotted, const json& value, std::string& why) {
  std::vector<std::string> parts;
  std::string part;
  std::stringstream ss(dotted);
  while (std::getline(ss, part, '.')) parts.push_back(part);
  if (parts.empty() || dotted.back() == '.') {
    why = "empty component in path \"" + dotted + "\"";
    return false;
  }
  json* node = &root;
  for (size_t i = 0; i < parts.size(); ++i) {
    const std::string& key = parts[i];
    if (key.empty()) {
      why = "empty component in path \"" + dotted + "\"";
      return false;
    }
    const bool last = i + 1 == parts.size();
    if (node->is_null()) *node = json::object();
    if (node->is_object()) {
      // An override of one of two keys that say the same thing replaces the other: --set
      // finetune.samples=... on a file that gives finetune.sample turns the job into a study.
      // So does --set finetune.sets=... on a file that gives samples (one or the other is used).
      static const std::vector<std::vector<std::string>> kSynonyms = {
          {"sample", "samples", "set", "sets"}, {"seed", "seeds"}, {"keras", "keras_h5"}};
      for (const auto& group : kSynonyms)
        if (std::find(group.begin(), group.end(), key) != group.end())
          for (const auto& other : group)
            if (other != key) node->erase(other);
      node = &(*node)[key];
    } else if (node->is_array()) {
      char* end = nullptr;
      const unsigned long long idx = std::strtoull(key.c_str(), &end, 10);
      if (key.empty() || *end != '\0' || !std::isdigit(static_cast<unsigned char>(key[0])) || idx >= node->size()) {
        why = "\"" + key + "\" is not an element of the " + std::to_string(node->size()) + "-element array at \"" +
              join(std::vector<std::string>(parts.begin(), parts.begin() + static_cast<long>(i)), ".") + "\"";
        return false;
      }
      node = &(*node)[static_cast<size_t>(idx)];
    } else {
      why = "\"" + join(std::vector<std::string>(parts.begin(), parts.begin() + static_cast<long>(i)), ".") +
            "\" is " + json_type(*node) + ", not an object";
      return false;
    }
    if (last) *node = value;
  }
  return true;
}

/// finetune.set (one set: a list of row indices, or a draw {"size": k, "seed": S}) and
/// finetune.sets (a list of such lists, or a draw {"count": n, "size": k, "seed": S}). With sets,
/// samples become the set positions 0..n-1 (the runs' ids); a draw fills them once resolved.
void read_sets(ObjectReader& r, const std::string& path, FinetuneConfig& f, Problems& problems) {
  const bool one = r.has("set");
  const char* key = one ? "set" : "sets";
  const json* v = r.find(key);
  if (v == nullptr) return;
  const std::string at = path + "." + key;
  f.samples.clear();
  if (v->is_object()) {
    ObjectReader d(v, at, problems);
    f.set_draw_count = 1;
    if (!one) d.get("count", f.set_draw_count);
    d.get("size", f.set_draw_size);
    d.get("seed", f.set_draw_seed);
    if (!one && !d.has("count")) problems.add(at, "a random draw of sets needs \"count\" and \"size\" (and optionally \"seed\")");
    else if (f.set_draw_count < 1) problems.add(at + ".count", "must be >= 1, got " + std::to_string(f.set_draw_count));
    if (!d.has("size")) problems.add(at, std::string("a random draw of ") + (one ? "a set" : "sets") + " needs \"size\", the samples per set");
    else if (f.set_draw_size < 1) problems.add(at + ".size", "must be >= 1, got " + std::to_string(f.set_draw_size));
    d.finish();
    if (f.set_draw_count < 1 || f.set_draw_size < 1) f.set_draw_count = f.set_draw_size = 0;
    return;
  }
  const char* expected = one ? "a list of sample indices or {\"size\": k, \"seed\": S}"
                             : "a list of sets (lists of sample indices) or {\"count\": n, \"size\": k, \"seed\": S}";
  if (!v->is_array()) return r.type_error(key, expected, *v);
  std::vector<char> malformed;  // per set: not a list (reported already)
  if (one) {
    f.sets.assign(1, {});
    malformed.assign(1, 0);
    r.get("set", f.sets[0]);
  } else {
    for (size_t i = 0; i < v->size(); ++i) {
      const json& e = (*v)[i];
      const std::string here = at + "[" + std::to_string(i) + "]";
      malformed.push_back(!e.is_array());
      if (!e.is_array()) {
        problems.add(here, "expected a list of sample indices, got " + shown(e));
        f.sets.emplace_back();
        continue;
      }
      std::vector<int64_t> set;
      for (size_t k = 0; k < e.size(); ++k) {
        if (!e[k].is_number_integer()) {
          problems.add(here + "[" + std::to_string(k) + "]", "expected a whole number (a sample index), got " + shown(e[k]));
          continue;
        }
        set.push_back(e[k].get<int64_t>());
      }
      f.sets.push_back(std::move(set));
    }
    if (f.sets.empty()) problems.add(at, "is empty: list at least one set");
  }
  std::set<std::vector<int64_t>> seen;
  for (size_t i = 0; i < f.sets.size(); ++i) {
    const auto& set = f.sets[i];
    const std::string here = one ? at : at + "[" + std::to_string(i) + "]";
    if (malformed[i]) continue;
    if (set.empty()) problems.add(here, "is empty: a set holds at least one sample index");
    if (set.size() != f.sets.front().size())
      problems.add(here, "holds " + std::to_string(set.size()) + " samples, the first set " + std::to_string(f.sets.front().size()) +
                             ": every set of a study has the same size (its runs compare as one population)");
    std::set<int64_t> members;
    for (int64_t idx : set) {
      if (idx < 0) problems.add(here, "a sample index must be >= 0, got " + std::to_string(idx));
      if (!members.insert(idx).second) problems.add(here, "lists sample " + std::to_string(idx) + " more than once");
    }
    if (!set.empty() && !seen.insert(set).second) problems.add(here, "lists the same set as an earlier one");
  }
  for (size_t i = 0; i < f.sets.size(); ++i) f.samples.push_back(static_cast<int64_t>(i));
}

/// Whether the samples, or the sets and their draw, fit data of n rows (`noun` in messages):
/// add(path, message) per problem; `why` is appended to an index's message.
void check_rows_fit(const FinetuneConfig& f, int64_t n, const char* noun, const std::string& why,
                    const std::function<void(const std::string&, const std::string&)>& add) {
  const auto beyond = [&](int64_t idx) {
    return "index " + std::to_string(idx) + " is beyond the data (" + std::to_string(n) + " " + noun + ": 0.." + std::to_string(n - 1) + ")" + why;
  };
  if (!f.on_sets()) {
    for (int64_t idx : f.samples)
      if (idx < 0 || idx >= n) add(f.samples.size() == 1 ? "finetune.sample" : "finetune.samples", beyond(idx));
    if (f.draw_count > n)
      add("finetune.samples.count", "cannot draw " + std::to_string(f.draw_count) + " distinct samples from " + std::to_string(n));
    return;
  }
  if (f.set_draw_size > n)
    add("finetune.sets.size", "cannot draw a set of " + std::to_string(f.set_draw_size) + " distinct samples from " + std::to_string(n));
  for (size_t i = 0; i < f.sets.size(); ++i)
    for (int64_t idx : f.sets[i])
      if (idx < 0 || idx >= n) add(f.sets.size() == 1 ? "finetune.set" : "finetune.sets[" + std::to_string(i) + "]", beyond(idx));
}

void read_finetune(const json* j, const std::string& path, FinetuneConfig& f, Problems& problems, bool in_grid) {
  ObjectReader r(j, path, problems);
  if (in_grid) {  // the study's samples and sets were read with the base settings
    for (const char* key : {"sample", "samples", "set", "sets"}) r.find(key);
  } else {
    if (r.has("sample") && r.has("samples")) problems.add(path, "give either sample or samples, not both");
    if (r.has("set") && r.has("sets")) problems.add(path, "give either set or sets, not both");
    if ((r.has("set") || r.has("sets")) && (r.has("sample") || r.has("samples")))
      problems.add(path, "give either samples (each fine-tuned on its own) or sets (k samples fine-tuned together), not both");
    if (const json* one = r.find("sample")) {
      int64_t v = 0;
      r.get("sample", v);
      if (one->is_number()) f.samples = {v};
    }
    if (const json* many = r.find("samples")) {
      if (many->is_array()) {
        r.get("samples", f.samples);
        if (f.samples.empty()) problems.add(path + ".samples", "is empty: list at least one sample index");
      } else if (many->is_object()) {
        ObjectReader d(many, path + ".samples", problems);
        d.get("count", f.draw_count);
        d.get("seed", f.draw_seed);
        if (!d.has("count")) problems.add(path + ".samples", "a random draw needs \"count\" (and optionally \"seed\")");
        else if (f.draw_count < 1) problems.add(path + ".samples.count", "must be >= 1, got " + std::to_string(f.draw_count));
        d.finish();
        f.samples.clear();
      } else {
        r.type_error("samples", "a list of sample indices or {\"count\": N, \"seed\": S}", *many);
      }
    }
    read_sets(r, path, f, problems);
    if (!f.samples.empty()) f.sample = f.samples.front();
  }
  r.get("shuffle", f.shuffle);
  r.get("epochs", f.epochs);
  r.get("batch_size", f.batch_size);
  read_optimizer(r, "optimizer", f.optimizer, problems);
  r.get_enum("monitor", kMonitors, f.monitor);
  r.get("save_best_only", f.save_best_only);
  r.finish();
}

/// Expands `grid` (finetune path -> list of values) into its cartesian product, in key order.
void read_grid(ObjectReader& top, const json& root, Config& c, Problems& problems) {
  c.grid = {GridPoint{"", c.finetune}};
  const json* g = top.find("grid");
  if (g == nullptr) return;
  if (!g->is_object()) return top.type_error("grid", "an object mapping finetune settings to lists of values", *g);
  c.grid_json = g->dump();
  const json base = root.contains("finetune") && root["finetune"].is_object() ? root["finetune"] : json::object();
  std::vector<std::pair<std::string, json>> axes;
  for (auto it = g->begin(); it != g->end(); ++it) {
    const std::string key = it.key();
    if (key == "sample" || key == "samples" || key.rfind("sample", 0) == 0) {
      problems.add("grid." + key, "samples are not a grid setting: list them in finetune.samples");
      continue;
    }
    if (key == "set" || key == "sets" || key.rfind("set.", 0) == 0 || key.rfind("sets.", 0) == 0) {
      problems.add("grid." + key, "sets are not a grid setting: list them in finetune.sets");
      continue;
    }
    if (!it->is_array() || it->empty()) {
      problems.add("grid." + key, "expected a non-empty list of values, got " + shown(*it));
      continue;
    }
    axes.emplace_back(key, *it);
  }
  if (axes.empty()) return;
  std::vector<GridPoint> points;
  std::vector<size_t> at(axes.size(), 0);
  while (true) {
    json f = base;
    std::vector<std::string> parts;
    for (size_t a = 0; a < axes.size(); ++a) {
      const json& v = axes[a].second[at[a]];
      std::string why;
      if (!set_path(f, axes[a].first, v, why)) {
        problems.add("grid." + axes[a].first, "is not a setting inside finetune: " + why);
        return;
      }
      parts.push_back(axes[a].first + "=" + v.dump());
    }
    GridPoint p{join(parts, ","), c.finetune};
    const size_t before = problems.list.size();
    read_finetune(&f, "grid[" + p.label + "]: finetune", p.finetune, problems, /*in_grid=*/true);
    if (problems.list.size() != before) return;  // one report per broken axis is enough
    points.push_back(p);
    size_t a = axes.size();
    while (a > 0) {
      --a;
      if (++at[a] < axes[a].second.size()) break;
      at[a] = 0;
      if (a == 0) {
        c.grid = points;
        return;
      }
    }
  }
}

/// An activation named at `key` of `r`, with the parameter it takes as a sibling key
/// (leaky_relu: negative_slope, required since the frameworks' defaults differ; elu: alpha).
void read_activation(ObjectReader& r, const std::string& key, LayerSpec& a, Problems& problems) {
  a.kind = LayerKind::kActivation;
  r.get_enum(key, kActivations, a.activation);
  if (a.activation == Activation::kLeakyRelu) {
    if (!r.has("negative_slope"))
      problems.add(r.child_path(key), "leaky_relu needs its \"negative_slope\" beside it (PyTorch's default is 0.01, Keras 2's 0.3, Keras 3's 0.2)");
    r.get("negative_slope", a.alpha);
    if (!std::isfinite(a.alpha)) problems.add(r.child_path("negative_slope"), "must be a finite number");
  } else if (a.activation == Activation::kElu) {
    a.alpha = 1.0;  // the same default in Keras and PyTorch
    r.get("alpha", a.alpha);
    if (!(a.alpha > 0) || !std::isfinite(a.alpha)) problems.add(r.child_path("alpha"), "must be > 0, got " + fmt_double(a.alpha));
  }
}

void check_batchnorm_numbers(const LayerSpec& b, const std::string& path, Problems& problems) {
  if (!(b.eps > 0) || !std::isfinite(b.eps)) problems.add(path + ".eps", "must be > 0, got " + fmt_double(b.eps));
  if (!(b.momentum >= 0 && b.momentum <= 1))
    problems.add(path + ".momentum", "must be in [0, 1] (PyTorch convention: the weight of the new batch; Keras' momentum m is 1 - m here), got " +
                                         fmt_double(b.momentum));
}

void check_dropout(double rate, const std::string& path, Problems& problems) {
  if (!(rate >= 0 && rate < 1)) problems.add(path, "must be in [0, 1), got " + fmt_double(rate));
}

/// One element of model.layers: exactly one kind key, and the options of that kind.
void read_layer(const json& e, const std::string& path, const BatchNormConfig& bn, std::vector<LayerSpec>& out,
                Problems& problems) {
  static const std::vector<std::string> kKinds = {"dense", "batchnorm", "activation", "dropout"};
  if (!e.is_object()) {
    problems.add(path, std::string("expected a layer object such as {\"dense\": 64}, got ") + json_type(e) + " " + shown(e));
    return;
  }
  std::vector<std::string> kinds;
  for (const auto& k : kKinds)
    if (e.contains(k)) kinds.push_back(k);
  // {"dense": 32, "activation": "tanh"} is one layer: Keras' Dense with a fused activation.
  if (kinds.size() == 2 && kinds[0] == "dense" && kinds[1] == "activation") kinds.pop_back();
  if (kinds.size() != 1) {
    if (!kinds.empty()) {
      problems.add(path, "names " + std::to_string(kinds.size()) + " layer kinds (" + join(kinds, ", ") + "); give one layer per element");
      return;
    }
    const std::string first = e.empty() ? std::string() : e.begin().key();
    problems.add(path, "names no layer kind" + (first.empty() ? std::string() : did_you_mean(first, kKinds)) +
                           "; each layer is one of {\"dense\": units}, {\"batchnorm\": {...}}, {\"activation\": name}, {\"dropout\": rate}");
    return;
  }
  ObjectReader r(&e, path, problems);
  LayerSpec l;
  const std::string& kind = kinds.front();
  if (kind == "dense") {
    l.kind = LayerKind::kDense;
    r.get("dense", l.units);
    if (l.units < 1) problems.add(r.child_path("dense"), "the number of units must be >= 1, got " + std::to_string(l.units));
    r.get("use_bias", l.use_bias);
    out.push_back(l);
    if (r.has("activation")) {  // Keras' Dense(units, activation=...): a Linear, then the activation module
      LayerSpec a;
      read_activation(r, "activation", a, problems);
      a.fused = true;
      if (a.activation != Activation::kLinear) out.push_back(a);  // Keras' default: no activation at all
    }
  } else if (kind == "batchnorm") {
    l.kind = LayerKind::kBatchNorm;
    l.eps = bn.eps;
    l.momentum = bn.momentum;
    l.scale = l.center = bn.affine;
    l.semantics = bn.semantics;
    ObjectReader b(r.find("batchnorm"), r.child_path("batchnorm"), problems);
    b.get("eps", l.eps);
    b.get("momentum", l.momentum);
    if (b.has("affine") && (b.has("center") || b.has("scale")))
      problems.add(r.child_path("batchnorm"), "give either affine or center/scale, not both");
    bool affine = bn.affine;
    b.get("affine", affine);
    if (b.has("affine")) l.scale = l.center = affine;
    b.get("center", l.center);
    b.get("scale", l.scale);
    b.finish();
    check_batchnorm_numbers(l, r.child_path("batchnorm"), problems);
    out.push_back(l);
  } else if (kind == "activation") {
    read_activation(r, "activation", l, problems);
    out.push_back(l);
  } else {
    l.kind = LayerKind::kDropout;
    r.get("dropout", l.rate);
    check_dropout(l.rate, r.child_path("dropout"), problems);
    out.push_back(l);
  }
  r.finish();
}

void read_model(const json* j, ModelConfig& m, Problems& problems, BnSemantics default_semantics) {
  ObjectReader r(j, "model", problems);
  r.get_enum("loss", kLosses, m.loss);
  const bool listed = r.has("layers");
  ObjectReader b(r.find("batchnorm"), "model.batchnorm", problems);
  auto& bn = m.batchnorm;
  bn.semantics = default_semantics;
  bool enabled = true;
  if (!listed) b.get("enabled", enabled);
  else if (b.find("enabled")) problems.add("model.batchnorm.enabled", "with model.layers, BatchNorm layers are listed where they stand; drop \"enabled\"");
  b.get_enum("semantics", kSemantics, bn.semantics);
  // Defaults follow the chosen framework: Keras eps 1e-3, momentum 0.99 (= 0.01 here);
  // PyTorch eps 1e-5, momentum 0.1.
  bn.eps = bn.semantics == BnSemantics::kKeras ? 1e-3 : 1e-5;
  bn.momentum = bn.semantics == BnSemantics::kKeras ? 0.01 : 0.1;
  b.get("eps", bn.eps);
  b.get("momentum", bn.momentum);
  b.get("affine", bn.affine);
  b.finish();
  LayerSpec defaults;
  defaults.eps = bn.eps;
  defaults.momentum = bn.momentum;
  check_batchnorm_numbers(defaults, "model.batchnorm", problems);
  if (listed) {
    for (const char* key : {"hidden", "activation", "dropout", "negative_slope", "alpha"})
      if (r.find(key)) problems.add(r.child_path(key), "give either model.layers or the shorthand (hidden, activation, dropout), not both");
    const json* list = r.find("layers");
    m.layers.clear();
    if (!list->is_array()) {
      r.type_error("layers", "an array of layers such as [{\"dense\": 64}, {\"batchnorm\": {}}, {\"activation\": \"relu\"}]", *list);
    } else {
      for (size_t i = 0; i < list->size(); ++i)
        read_layer((*list)[i], "model.layers[" + std::to_string(i) + "]", bn, m.layers, problems);
    }
    LayerSpec head;
    head.kind = LayerKind::kDense;
    head.head = true;
    m.layers.push_back(head);
    name_layers(m.layers);
  } else {
    std::vector<int64_t> hidden = {64, 64};
    r.get("hidden", hidden);
    for (size_t i = 0; i < hidden.size(); ++i)
      if (hidden[i] < 1) problems.add("model.hidden[" + std::to_string(i) + "]", "must be >= 1, got " + std::to_string(hidden[i]));
    if (hidden.empty() && enabled)
      problems.add("model.hidden", "is empty, so there is no hidden Linear for BatchNorm to follow; add a width or set model.batchnorm.enabled false");
    LayerSpec act;
    act.activation = Activation::kRelu;
    read_activation(r, "activation", act, problems);
    double dropout = 0;
    r.get("dropout", dropout);
    check_dropout(dropout, "model.dropout", problems);
    r.find("layers");
    m.layers = shorthand_layers(hidden, act.activation, dropout, enabled, bn, act.alpha);
  }
  // The head bnlab appends: PyTorch's Linear(..., bias=False) and Keras' Dense(use_bias=False) too.
  bool head_bias = true;
  r.get("head_bias", head_bias);
  m.layers.back().use_bias = head_bias;
  r.finish();
}

/// A network a user's file describes (Keras model config, TorchScript Sequential) against the
/// config: the file's becomes model.layers, or, when the config describes a model too, must agree
/// with it module by module; `origin(i)` names the file's module i in messages. Returns false
/// when it does not agree.
template <typename Origin>
bool take_file_architecture(const json& root, Config& c, const std::vector<LayerSpec>& theirs, const std::string& path,
                            const std::string& drop_hint, Origin origin, Problems& problems) {
  const json* model = root.contains("model") && root["model"].is_object() ? &root["model"] : nullptr;
  const bool described = model != nullptr && (model->contains("layers") || model->contains("hidden") ||
                                               model->contains("activation") || model->contains("dropout"));
  const size_t before = problems.list.size();
  // An explicit model.batchnorm eps/momentum/affine is a statement about the file's layers too.
  const json* bn = model != nullptr && model->contains("batchnorm") && (*model)["batchnorm"].is_object() ? &(*model)["batchnorm"] : nullptr;
  if (!described && bn != nullptr) {
    for (size_t i = 0; i < theirs.size(); ++i) {
      const LayerSpec& b = theirs[i];
      if (b.kind != LayerKind::kBatchNorm) continue;
      const auto& mb = c.model.batchnorm;
      if (bn->contains("eps") && std::abs(mb.eps - b.eps) > 1e-12 * std::max(1.0, b.eps))
        problems.add("model.batchnorm.eps", "is " + fmt_double(mb.eps) + ", but " + origin(i) + " of " + path + " has eps " + fmt_double(b.eps) +
                                               "; drop it to take the file's");
      if (bn->contains("momentum") && std::abs(mb.momentum - b.momentum) > 1e-9)
        problems.add("model.batchnorm.momentum", "is " + fmt_double(mb.momentum) + ", but " + origin(i) + " of " + path + " has momentum " +
                                                    fmt_double(b.momentum) + " (PyTorch's convention); drop it to take the file's");
      if (bn->contains("affine") && (mb.affine != b.scale || mb.affine != b.center))
        problems.add("model.batchnorm.affine", std::string("is ") + (mb.affine ? "true" : "false") + ", but " + origin(i) + " of " + path +
                                                  " differs; drop it to take the file's");
    }
  }
  if (!described) {
    if (problems.list.size() != before) return false;
    c.model.layers = theirs;
    return true;
  }
  const auto& mine = c.model.layers;
  const auto describe = [](const LayerSpec& l) {
    std::string d = layer_kind_name(l.kind);
    if (l.kind == LayerKind::kDense) d += l.head ? " (the head)" : " " + std::to_string(l.units);
    if (l.kind == LayerKind::kActivation) d += std::string(" ") + activation_name(l.activation);
    return d;
  };
  if (mine.size() != theirs.size())
    problems.add("model", "describes " + std::to_string(mine.size()) + " modules, " + path + " " +
                              std::to_string(theirs.size()) + "; " + drop_hint);
  for (size_t i = 0; i < std::min(mine.size(), theirs.size()); ++i) {
    const LayerSpec &a = mine[i], &b = theirs[i];
    std::string why;
    if (a.kind != b.kind || (a.kind == LayerKind::kActivation && a.activation != b.activation)) why = "is " + describe(a) + " here, " + describe(b);
    else if (a.kind == LayerKind::kDense && !a.head && a.units != b.units) why = "has " + std::to_string(a.units) + " units here, " + std::to_string(b.units);
    else if (a.kind == LayerKind::kDense && a.use_bias != b.use_bias) why = "differs in use_bias";
    else if (a.kind == LayerKind::kBatchNorm && std::abs(a.eps - b.eps) > 1e-12 * std::max(1.0, b.eps)) why = "has eps " + fmt_double(a.eps) + " here, " + fmt_double(b.eps);
    else if (a.kind == LayerKind::kBatchNorm && std::abs(a.momentum - b.momentum) > 1e-9) why = "has momentum " + fmt_double(a.momentum) + " here, " + fmt_double(b.momentum) + " (PyTorch's convention)";
    else if (a.kind == LayerKind::kBatchNorm && (a.center != b.center || a.scale != b.scale)) why = "differs in center/scale";
    else if (a.kind == LayerKind::kActivation && a.alpha != b.alpha) why = "has slope/alpha " + fmt_double(a.alpha) + " here, " + fmt_double(b.alpha);
    else if (a.kind == LayerKind::kDropout && a.rate != b.rate) why = "has rate " + fmt_double(a.rate) + " here, " + fmt_double(b.rate);
    if (!why.empty())
      problems.add("model", "module " + a.name + " " + why + " in " + path + " (" + origin(i) + "); bnlab never loads weights into another architecture");
  }
  return problems.list.size() == before;
}

/// The model of an init.keras file.
void apply_keras_architecture(const json& root, Config& c, KerasConfigReader reader, Problems& problems) {
  if (c.init_keras.empty() || reader == nullptr) return;
  std::string text;
  KerasArchitecture arch;
  const std::string path = resolve_path(c.base_dir, c.init_keras);
  try {
    text = reader(path);
    if (text.empty()) return;  // weights only: the config's model says what the network is
    arch = keras_architecture(text, path, c.model.batchnorm);
  } catch (const InputError& e) {
    problems.list.push_back(e.what());
    return;
  }
  take_file_architecture(root, c, arch.layers, path, "drop model.layers to take the file's architecture",
                         [&](size_t i) { return "Keras layer \"" + arch.keras_name[i] + "\""; }, problems);
  c.keras_names = arch.keras_name;
  c.keras_weight_keys = arch.weights_key;
  c.keras_trainable = arch.trainable;
  c.init_inputs = arch.inputs;
  c.init_head_units = arch.layers.back().units;
}

/// The model of an init.torch file: a TorchScript Sequential's modules; a state dict's network
/// is the config's (its tensors are checked against it when the network is built).
void apply_torch_architecture(const json& root, Config& c, TorchModelReader reader, Problems& problems) {
  if (c.init_torch.empty() || reader == nullptr) return;
  const std::string path = resolve_path(c.base_dir, c.init_torch);
  TorchFileModel file;
  try {
    file = reader(path);
  } catch (const InputError& e) {
    problems.list.push_back(e.what());
    return;
  }
  if (file.form != "torchscript") return;
  if (!c.init_key.empty() || !c.init_prefix.empty())
    problems.add(c.init_key.empty() ? "init.prefix" : "init.key", "applies to a state dict or checkpoint; " + path +
                                                                     " is a TorchScript module, whose tensors are named by its own submodules");
  for (auto& l : file.layers) l.semantics = c.model.batchnorm.semantics;
  take_file_architecture(root, c, file.layers, path, "drop model.layers to take the TorchScript module's",
                         [&](size_t i) { return "submodule \"" + file.layers[i].name + "\", " + file.types[i]; }, problems);
  c.torch_types = file.types;
  c.init_inputs = file.inputs;
  c.init_head_units = file.layers.back().units;
}

void read_config(const json& root, Config& c, Problems& problems, const ModelFileReaders& readers) {
  ObjectReader top(&root, "", problems);
  top.get("name", c.name);
  if (top.has("seed") && top.has("seeds")) problems.add("seeds", "give either seed or seeds, not both");
  top.get("seed", c.seed);
  c.seeds = {c.seed};
  if (const json* many = top.find("seeds")) {
    if (!many->is_array() || many->empty()) {
      top.type_error("seeds", "a non-empty list of non-negative integers", *many);
    } else {
      c.seeds.clear();
      for (size_t i = 0; i < many->size(); ++i) {
        const json& v = (*many)[i];
        if (v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0)) c.seeds.push_back(v.get<uint64_t>());
        else problems.add("seeds[" + std::to_string(i) + "]", std::string("expected a non-negative integer, got ") + json_type(v) + " " + shown(v));
      }
      if (!c.seeds.empty()) c.seed = c.seeds.front();
    }
  }

  {
    const json* j = top.find("data");
    ObjectReader r(j, "data", problems);
    r.get("source", c.data.source);
    if (c.data.source == "synthetic") {
      r.get("seed", c.data.seed);
      r.get("samples", c.data.samples);
      r.get("features", c.data.features);
      r.get("targets", c.data.targets);
      r.get("classes", c.data.classes);
      r.get("scale", c.data.scale);
      r.get("noise", c.data.noise);
    } else if (c.data.source == "csv") {
      r.get("path", c.data.path);
      r.get("feature_columns", c.data.feature_columns);
      r.get("target_columns", c.data.target_columns);
      r.get("standardize", c.data.standardize);
      r.get("delimiter", c.data.delimiter);
      r.get("missing", c.data.missing);
      r.get("class_labels", c.data.class_labels);
      std::string indices;
      r.get("sample_indices", indices);
      if (r.has("sample_indices") && indices != c.data.sample_indices())
        problems.add("data.sample_indices", "is \"" + c.data.sample_indices() + "\" with data.missing \"" + c.data.missing +
                                                 "\", got \"" + indices + "\" (it records what finetune.sample counts; data.missing sets it)");
    } else {
      problems.add("data.source", "unknown value \"" + c.data.source + "\"" +
                                      did_you_mean(c.data.source, {"synthetic", "csv"}) +
                                      "; valid values: synthetic, csv");
    }
    if (c.data.source == "synthetic") r.get("standardize", c.data.standardize);
    r.finish();
  }
  if (const json* init = top.find("init")) {
    ObjectReader r(init, "init", problems);
    if (r.has("keras") && r.has("keras_h5")) problems.add("init", "give either keras or its synonym keras_h5, not both");
    r.get("keras_h5", c.init_keras);
    r.get("keras", c.init_keras);
    r.get("torch", c.init_torch);
    r.get("key", c.init_key);
    r.get("prefix", c.init_prefix);
    r.finish();
    if (!c.init_keras.empty() && !c.init_torch.empty())
      problems.add("init", "names both a Keras file (keras) and a PyTorch file (torch); the weights come from one of them");
    if (c.init_torch.empty() && (r.has("key") || r.has("prefix")))
      problems.add(r.has("key") ? "init.key" : "init.prefix", "applies to a PyTorch checkpoint; give init.torch too");
  }
  // A PyTorch file's BatchNorm layers follow PyTorch's numerics unless the config says otherwise.
  read_model(top.find("model"), c.model, problems, c.init_torch.empty() ? BnSemantics::kKeras : BnSemantics::kTorch);
  {
    ObjectReader r(top.find("pretrain"), "pretrain", problems);
    r.get("epochs", c.pretrain.epochs);
    r.get("batch_size", c.pretrain.batch_size);
    read_optimizer(r, "optimizer", c.pretrain.optimizer, problems);
    r.get_enum("schedule", kSchedules, c.pretrain.schedule);
    r.finish();
  }
  read_finetune(top.find("finetune"), "finetune", c.finetune, problems, /*in_grid=*/false);
  apply_keras_architecture(root, c, readers.keras, problems);
  apply_torch_architecture(root, c, readers.torch, problems);
  read_grid(top, root, c, problems);
  if (const json* s = top.find("strategies")) {
    if (!s->is_array()) {
      top.type_error("strategies", "an array of preset names or strategy objects", *s);
    } else {
      for (size_t i = 0; i < s->size(); ++i) {
        StrategyConfig sc;
        read_strategy((*s)[i], "strategies[" + std::to_string(i) + "]", sc, problems);
        c.strategies.push_back(sc);
      }
    }
  } else {
    for (const char* name : {"train", "frozen"}) {
      StrategyConfig sc;
      sc.name = name;
      apply_preset(name, sc);
      c.strategies.push_back(sc);
    }
  }
  if (const json* rep = top.find("report")) {
    ObjectReader r(rep, "report", problems);
    if (const json* e = r.find("export")) {
      if (e->is_string() && e->get<std::string>() == "auto") {
        c.report.export_auto = true;
      } else if (e->is_array()) {
        c.report.export_auto = false;
        r.get("export", c.report.exports);
        for (size_t i = 0; i < c.report.exports.size(); ++i) {
          const auto& names = report_export_names();
          const std::string& x = c.report.exports[i];
          if (std::find(names.begin(), names.end(), x) == names.end())
            problems.add("report.export[" + std::to_string(i) + "]", "unknown export \"" + x + "\"" + did_you_mean(x, names) +
                                                                      "; valid values: " + join(names, ", "));
        }
      } else {
        r.type_error("export", "\"auto\" or a list of \"curves\", \"metrics\", \"runs\"", *e);
      }
    }
    r.get("export_limit", c.report.export_limit);
    r.get("diverged_factor", c.report.diverged_factor);
    r.finish();
  }
  // Strategies may select BatchNorm layers by their Keras names ("batch_normalization_1") when
  // the architecture came from a Keras file; they become module names here.
  for (auto& s : c.strategies)
    for (auto& name : s.layers.names)
      for (size_t i = 0; i < c.keras_names.size() && i < c.model.layers.size(); ++i)
        if (name == c.keras_names[i] && c.model.layers[i].kind == LayerKind::kBatchNorm && name != c.model.layers[i].name) {
          name = c.model.layers[i].name;
          break;
        }
  top.finish();
}

void check_optimizer(const OptimizerConfig& o, const std::string& path, Problems& p) {
  if (!(o.lr > 0) || !std::isfinite(o.lr)) p.add(path + ".lr", "must be > 0, got " + fmt_double(o.lr));
  if (!(o.weight_decay >= 0)) p.add(path + ".weight_decay", "must be >= 0, got " + fmt_double(o.weight_decay));
  if (!(o.momentum >= 0 && o.momentum < 1)) p.add(path + ".momentum", "must be in [0, 1), got " + fmt_double(o.momentum));
  if (o.nesterov && o.momentum <= 0) p.add(path + ".nesterov", "nesterov needs momentum > 0");
  if (!(o.beta1 >= 0 && o.beta1 < 1)) p.add(path + ".beta1", "must be in [0, 1), got " + fmt_double(o.beta1));
  if (!(o.beta2 >= 0 && o.beta2 < 1)) p.add(path + ".beta2", "must be in [0, 1), got " + fmt_double(o.beta2));
  if (!(o.eps > 0)) p.add(path + ".eps", "must be > 0, got " + fmt_double(o.eps));
  if (!(o.alpha >= 0 && o.alpha < 1))
    p.add(path + (o.kind == OptimizerKind::kRmspropKeras ? ".rho" : ".alpha"), "must be in [0, 1), got " + fmt_double(o.alpha));
}

void validate(const Config& c, Problems& p) {
  if (c.report.export_limit < 0) p.add("report.export_limit", "must be >= 0, got " + std::to_string(c.report.export_limit));
  if (!(c.report.diverged_factor > 0) || !std::isfinite(c.report.diverged_factor))
    p.add("report.diverged_factor", "must be > 0, got " + fmt_double(c.report.diverged_factor));
  {
    std::set<std::string> once(c.report.exports.begin(), c.report.exports.end());
    if (once.size() != c.report.exports.size()) p.add("report.export", "lists an export more than once");
  }
  if (c.name.empty()) p.add("name", "missing: every experiment needs a name (it names the run directory)");
  if (c.name.find_first_of("/\\") != std::string::npos || c.name == "." || c.name == "..")
    p.add("name", "\"" + c.name + "\" cannot be used as a directory name");
  const auto& d = c.data;
  if (d.source == "synthetic") {
    if (d.samples < 2) p.add("data.samples", "must be >= 2, got " + std::to_string(d.samples));
    if (d.samples > 100000000) p.add("data.samples", "must be <= 100000000, got " + std::to_string(d.samples));
    if (d.features < 1) p.add("data.features", "must be >= 1, got " + std::to_string(d.features));
    if (d.targets < 1) p.add("data.targets", "must be >= 1, got " + std::to_string(d.targets));
    if (d.classes < 2) p.add("data.classes", "must be >= 2, got " + std::to_string(d.classes));
    if (!(d.scale > 0)) p.add("data.scale", "must be > 0, got " + fmt_double(d.scale));
    if (!(d.noise >= 0)) p.add("data.noise", "must be >= 0, got " + fmt_double(d.noise));
    if (d.samples >= 2) check_rows_fit(c.finetune, d.samples, "samples", "", [&](const std::string& at, const std::string& m) { p.add(at, m); });
  } else if (d.source == "csv") {
    if (d.path.empty()) p.add("data.path", "missing: a csv source needs the path of its file");
    if (d.target_columns.empty()) p.add("data.target_columns", "missing: name the target column(s)");
    if (!c.finetune.on_sets())
      for (int64_t idx : c.finetune.samples)
        if (idx < 0) p.add("finetune.samples", "a sample index must be >= 0, got " + std::to_string(idx));
    const std::string& del = d.delimiter;
    if (del.size() != 1 || del[0] == '"' || del[0] == '\r' || del[0] == '\n' || std::isalnum(static_cast<unsigned char>(del[0])) ||
        del[0] == '.' || del[0] == '-' || del[0] == '+' || static_cast<unsigned char>(del[0]) >= 0x80)
      p.add("data.delimiter", "expected one character that cannot be part of a number, such as \",\", \";\", \"\\t\" (tab) or \"|\", got " +
                                  json(del).dump());
    if (d.missing != "error" && d.missing != "drop_rows")
      p.add("data.missing", "unknown value \"" + d.missing + "\"" + did_you_mean(d.missing, {"error", "drop_rows"}) + "; valid values: error, drop_rows");
    if (!d.class_labels.empty()) {
      if (c.model.loss != LossKind::kCrossEntropy) p.add("data.class_labels", "applies to model.loss cross_entropy only");
      if (d.class_labels.size() < 2) p.add("data.class_labels", "needs at least 2 labels, got " + std::to_string(d.class_labels.size()));
      std::vector<int64_t> sorted = d.class_labels;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        p.add("data.class_labels", "label " + std::to_string(*std::adjacent_find(sorted.begin(), sorted.end())) + " is listed twice");
    }
  }
  if (c.model.loss == LossKind::kCrossEntropy && d.source == "csv" && d.target_columns.size() > 1)
    p.add("data.target_columns", "cross_entropy takes one target column of class labels");

  const auto& bn = c.model.batchnorm;
  const auto& layers = c.model.layers;
  const auto check_loop = [&](const std::string& path, int64_t epochs, int64_t batch) {
    if (epochs < 1) p.add(path + ".epochs", "must be >= 1, got " + std::to_string(epochs));
    if (epochs > 1000000) p.add(path + ".epochs", "must be <= 1000000, got " + std::to_string(epochs));
    if (batch < 1) p.add(path + ".batch_size", "must be >= 1, got " + std::to_string(batch));
  };
  check_loop("pretrain", c.pretrain.epochs, c.pretrain.batch_size);
  check_optimizer(c.pretrain.optimizer, "pretrain.optimizer", p);
  for (const auto& g : c.grid) {
    const std::string where = g.label.empty() ? "finetune" : "grid[" + g.label + "]: finetune";
    check_loop(where, g.finetune.epochs, g.finetune.batch_size);
    check_optimizer(g.finetune.optimizer, where + ".optimizer", p);
    const int64_t k = g.finetune.set_size();
    if (g.finetune.on_sets() && k >= 1 && g.finetune.batch_size > k)
      p.add(where + ".batch_size", std::to_string(g.finetune.batch_size) + " is more than the " + std::to_string(k) +
                                       " samples of a set: use at most " + std::to_string(k) + " (" + std::to_string(k) +
                                       " is one batch per epoch)");
  }
  {
    std::set<int64_t> distinct(c.finetune.samples.begin(), c.finetune.samples.end());
    if (distinct.size() != c.finetune.samples.size() && !c.finetune.on_sets()) p.add("finetune.samples", "lists a sample more than once");
    std::set<uint64_t> seeds(c.seeds.begin(), c.seeds.end());
    if (seeds.size() != c.seeds.size()) p.add("seeds", "lists a seed more than once");
  }

  const int64_t bn_layers = count_kind(layers, LayerKind::kBatchNorm);
  const int64_t dense_layers = count_kind(layers, LayerKind::kDense);
  // Pretraining batches are drawn unless the weights come from the user's file; recalibration
  // draws them too.
  const bool batches = (c.init_keras.empty() && c.init_torch.empty()) ||
                       std::any_of(c.strategies.begin(), c.strategies.end(), [](const StrategyConfig& s) { return s.recalibrate > 0; });
  const bool torch_bn = bn_layers > 0 && bn.semantics == BnSemantics::kTorch && batches;
  if (torch_bn && c.pretrain.batch_size == 1)
    p.add("pretrain.batch_size", "1 gives batches of ONE sample, which PyTorch BatchNorm refuses in training mode; use >= 2");
  else if (torch_bn && d.source == "synthetic" && c.pretrain.batch_size > 1 && d.samples % c.pretrain.batch_size == 1)
    p.add("pretrain.batch_size", std::to_string(c.pretrain.batch_size) + " leaves a last batch of ONE sample out of " +
                                     std::to_string(d.samples) + ", which PyTorch BatchNorm refuses in training mode; pick a batch size that does not divide samples-1");

  if (c.strategies.empty()) p.add("strategies", "is empty: list at least one strategy, e.g. [\"train\", \"frozen\"]");
  std::set<std::string> seen;
  std::vector<std::string> bn_names;
  for (const auto& l : layers)
    if (l.kind == LayerKind::kBatchNorm) bn_names.push_back(l.name);
  const std::string no_bn = "the model has no BatchNorm layer";
  for (size_t i = 0; i < c.strategies.size(); ++i) {
    const auto& s = c.strategies[i];
    const std::string path = "strategies[" + std::to_string(i) + "]";
    if (s.name.empty()) continue;  // reported while reading
    if (!seen.insert(s.name).second) p.add(path, "duplicate strategy name \"" + s.name + "\"; give each strategy its own \"name\"");
    if (s.momentum && !(*s.momentum >= 0 && *s.momentum <= 1))
      p.add(path + ".momentum", "must be in [0, 1], got " + fmt_double(*s.momentum));
    if (s.freeze_linear < 0 || s.freeze_linear > dense_layers)
      p.add(path + ".freeze_linear", "must be in [0, " + std::to_string(dense_layers) +
                                         "] (the model has that many Linear layers, the head included), got " + std::to_string(s.freeze_linear));
    if (s.recalibrate < 0 || s.recalibrate > 100000)
      p.add(path + ".recalibrate", "must be a number of batches in [0, 100000], got " + std::to_string(s.recalibrate));
    if (s.recalibrate > 0 && bn_layers == 0) p.add(path + ".recalibrate", "there is nothing to recalibrate: " + no_bn);
    if (s.fold && bn_layers == 0) p.add(path + ".fold", "there is nothing to fold: " + no_bn);
    if (s.fold && bn_layers > 0) {
      std::string why;
      fold_plan(layers, &why);
      if (!why.empty()) p.add(path + ".fold", why);
    }
    if (s.fold && !s.layers.all)
      p.add(path + ".layers", "fold folds every BatchNorm; a layer selection does not apply to it");
    if (s.fold && s.bn_module == BnModule::kFrozen)
      p.add(path + ".bn_module", "fold removes the BatchNorm modules; there is nothing left to convert");
    if (s.bn_module == BnModule::kFrozen && bn_layers == 0) p.add(path + ".bn_module", "there is nothing to convert: " + no_bn);
    if (s.tracking_rule == TrackingRule::kPython && s.track_running_stats)
      p.add(path + ".tracking_rule", "\"python\" says how track_running_stats false reads; this strategy tracks running statistics");
    if (s.tracking_rule == TrackingRule::kPython && !s.track_running_stats && s.momentum)
      p.add(path + ".tracking_rule", "under \"python\" an untracked BatchNorm never updates its buffers; remove momentum/running_stats");
    if (s.renorm) {
      const std::string rp = path + ".renorm";
      if (bn_layers == 0) p.add(rp, "there is nothing to renormalise: " + no_bn);
      if (bn.semantics != BnSemantics::kKeras)
        p.add(rp, "renorm follows Keras 3.14's BatchNormalization(renorm=True) (biased batch variance, a batch of one allowed); "
                  "set model.batchnorm.semantics \"keras\"");
      if (s.bn_mode == BnMode::kEval) p.add(rp, "renorm is a training-mode computation; with bn_mode \"eval\" it would be plain eval");
      if (!s.track_running_stats) p.add(rp, "renorm needs the moving statistics; remove track_running_stats false");
      if (s.prior) p.add(rp, "give either renorm or prior, not both");
      if (s.fold || s.bn_module == BnModule::kFrozen) p.add(rp, "renorm needs BatchNorm modules; fold and bn_module \"frozen\" remove them");
      const std::string cp = path + ".renorm_clipping";
      if (s.renorm_rmax && !(*s.renorm_rmax > 0 && std::isfinite(*s.renorm_rmax))) p.add(cp + ".rmax", "must be > 0, got " + fmt_double(*s.renorm_rmax));
      if (s.renorm_rmin && !(*s.renorm_rmin >= 0 && std::isfinite(*s.renorm_rmin))) p.add(cp + ".rmin", "must be >= 0, got " + fmt_double(*s.renorm_rmin));
      if (s.renorm_dmax && !(*s.renorm_dmax >= 0 && std::isfinite(*s.renorm_dmax))) p.add(cp + ".dmax", "must be >= 0, got " + fmt_double(*s.renorm_dmax));
      if (s.renorm_rmax && s.renorm_rmin && *s.renorm_rmax < *s.renorm_rmin)
        p.add(cp, "rmax " + fmt_double(*s.renorm_rmax) + " is below rmin " + fmt_double(*s.renorm_rmin));
      if (s.renorm_momentum && !(*s.renorm_momentum >= 0 && *s.renorm_momentum <= 1))
        p.add(path + ".renorm_momentum", "must be in [0, 1] (PyTorch's convention: the weight of the new batch), got " + fmt_double(*s.renorm_momentum));
    } else if (s.renorm_rmax || s.renorm_rmin || s.renorm_dmax || s.renorm_momentum || s.renorm_init != "moving") {
      p.add(path, "renorm_clipping, renorm_momentum and renorm_init apply only with \"renorm\": true");
    }
    if (s.prior) {
      const std::string pp = path + ".prior";
      if (!(*s.prior >= 0 && *s.prior <= 1)) p.add(pp, "must be a weight p in [0, 1] (p = N / (N + n) for a prior strength N), got " + fmt_double(*s.prior));
      if (bn_layers == 0) p.add(pp, "there is nothing to normalise: " + no_bn);
      // prior_bn decides the mode and the statistics itself; another field would be ignored.
      if (s.bn_mode == BnMode::kEval) p.add(pp, "prior weights running against batch statistics in the fit forward; bn_mode \"eval\" would ignore it (p = 1 is eval)");
      if (s.momentum) p.add(pp, "prior_bn never updates the running statistics; remove momentum/running_stats");
      if (!s.track_running_stats) p.add(pp, "prior needs the running statistics; remove track_running_stats false");
      if (s.fold || s.bn_module == BnModule::kFrozen) p.add(pp, "prior needs BatchNorm modules; fold and bn_module \"frozen\" remove them");
    }
    for (int64_t idx : s.layers.indices)
      if (idx < 0 || idx >= bn_layers)
        p.add(path + ".layers", "BatchNorm index " + std::to_string(idx) + " does not exist: the model has " +
                                    std::to_string(bn_layers) + " BatchNorm layer(s)" +
                                    (bn_layers > 0 ? ", indices 0.." + std::to_string(bn_layers - 1) : std::string()));
    for (const auto& name : s.layers.names)
      if (std::find(bn_names.begin(), bn_names.end(), name) == bn_names.end())
        p.add(path + ".layers", "no BatchNorm module is named \"" + name + "\"" + did_you_mean(name, bn_names) +
                                    "; BatchNorm modules: " + (bn_names.empty() ? std::string("none") : join(bn_names, ", ")));
    // A sample is a fit batch of one row; a set's smallest batch may be one row too.
    const bool one_row = torch_bn && smallest_fit_batch(c) < 2;
    if (one_row && s.prior && *s.prior < 1 && uses_batch_stats_in_fit(layers, s))
      p.add(path, "strategy \"" + s.name + "\" (prior " + fmt_double(*s.prior) + ") mixes in the batch variance, which PyTorch "
                  "semantics take unbiased (as robusta's momentum-1 BatchNorm does): undefined for a batch of ONE sample. Use "
                  "model.batchnorm.semantics \"keras\" (the biased variance, 0 for one row) or prior 1 (the eval computation)");
    else if (one_row && uses_batch_stats_in_fit(layers, s))
      p.add(path, "strategy \"" + s.name + "\" runs BatchNorm in training mode on a batch of ONE sample, which PyTorch "
                  "semantics cannot do (the batch variance needs n >= 2: \"Expected more than 1 value per channel when "
                  "training\"). Use model.batchnorm.semantics \"keras\" to see what Keras does (every BN unit outputs beta), "
                  "or a strategy whose BatchNorm layers are all in eval mode with running statistics (e.g. \"eval\", \"frozen\")" +
                  (c.finetune.on_sets() ? std::string(", or a finetune.batch_size that leaves no batch of one row in a set of ") +
                                              std::to_string(c.finetune.set_size())
                                        : std::string()));
  }
}

/// Turns a `--set a.b.c=value` override into a JSON pointer and sets it; array elements
/// are addressed by number (`strategies.0.momentum=0`).
void apply_override(json& root, const std::string& spec, Problems& p) {
  const auto eq = spec.find('=');
  if (eq == std::string::npos || eq == 0) {
    p.list.push_back("--set " + spec + ": expected PATH=VALUE, e.g. --set finetune.epochs=20");
    return;
  }
  const std::string path = spec.substr(0, eq);
  const std::string text = spec.substr(eq + 1);
  try {
    (void)json(path).dump();  // the path's parts become object keys, which JSON needs in UTF-8
  } catch (const json::exception&) {
    p.list.push_back("--set " + json(path).dump(-1, ' ', false, json::error_handler_t::replace) +
                     "=...: the path is not valid UTF-8 text");
    return;
  }
  // Checked only as JSON: a bare word (a name like exp_4e512f0) is a string, whatever it holds.
  if (const auto issue = scan_json(text); issue && json::accept(text)) {
    p.list.push_back("--set " + path + "=...: column " + std::to_string(issue->offset + 1) + " of the value: " + issue->what);
    return;
  }
  json value;
  try {
    value = json::parse(text);
  } catch (const json::out_of_range&) {
    p.list.push_back("--set " + path + "=" + text + ": the number " + text + " is beyond the range of a double (about 1.8e308)");
    return;
  } catch (const json::parse_error&) {
    value = text;  // a bare word is a string: --set model.activation=tanh
    try {
      (void)value.dump();
    } catch (const json::exception&) {
      p.list.push_back("--set " + path + "=...: the value is not valid UTF-8 text");
      return;
    }
  }
  std::string why;
  if (!set_path(root, path, value, why)) p.list.push_back("--set " + spec + ": " + why);
}

}  // namespace

const std::vector<std::string>& preset_names() {
  static const std::vector<std::string> kNames = [] {
    std::vector<std::string> names;
    for (const auto& p : presets()) names.emplace_back(p.name);
    return names;
  }();
  return kNames;
}

Config parse_config(const std::string& text, const std::string& origin,
                    const std::vector<std::string>& overrides, const std::string& base_dir, const ModelFileReaders& readers) {
  Problems problems{origin, {}};
  json root = parse_json(text, origin);
  for (const auto& o : overrides) apply_override(root, o, problems);
  Config c;
  c.base_dir = base_dir;
  read_config(root, c, problems, readers);
  validate(c, problems);
  if (!problems.list.empty()) throw InputError(problems.list);
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides, const ModelFileReaders& readers) {
  return parse_config(read_json_file(path, "the config file"), path, overrides, parent_dir(path), readers);
}

const char* to_string(LossKind l) { return enum_name(kLosses, l); }

const std::vector<std::string>& torch_checkpoint_keys() {
  static const std::vector<std::string> keys = {"state_dict", "model_state_dict", "model"};
  return keys;
}
const char* to_string(BnSemantics s) { return enum_name(kSemantics, s); }
const char* to_string(OptimizerKind o) { return enum_name(kOptimizers, o); }
const char* to_string(BnMode m) { return enum_name(kBnModes, m); }
const char* to_string(BnModule m) { return enum_name(kBnModules, m); }
const char* to_string(TrackingRule r) { return enum_name(kTrackingRules, r); }

std::string preset_alias_of(const std::string& name) {
  for (const auto& p : presets())
    if (name == p.name) return p.alias_of ? p.alias_of : "";
  return "";
}

namespace {

json optimizer_json(const OptimizerConfig& o) {
  json j{{"name", to_string(o.kind)}, {"lr", o.lr}};
  for (const auto& f : optimizer_fields(o.kind)) {
    if (f.number) j[f.key] = o.*f.number;
    else j[f.key] = o.*f.flag;
  }
  return j;
}

json data_json(const DataConfig& d) {
  json j{{"source", d.source}};
  if (d.source == "csv") {
    j["path"] = d.path;
    j["feature_columns"] = d.feature_columns;
    j["target_columns"] = d.target_columns;
    j["delimiter"] = d.delimiter;
    j["missing"] = d.missing;
    j["sample_indices"] = d.sample_indices();
    if (!d.class_labels.empty()) j["class_labels"] = d.class_labels;
  } else {
    j["seed"] = d.seed;
    j["samples"] = d.samples;
    j["features"] = d.features;
    j["targets"] = d.targets;
    j["classes"] = d.classes;
    j["scale"] = d.scale;
    j["noise"] = d.noise;
  }
  j["standardize"] = d.standardize;
  return j;
}

/// The parameter an activation takes, under the key a config file gives it ("" for none).
const char* activation_param(Activation a) {
  return a == Activation::kLeakyRelu ? "negative_slope" : a == Activation::kElu ? "alpha" : "";
}

void put_activation(json& j, const LayerSpec& a) {
  j["activation"] = activation_name(a.activation);
  if (*activation_param(a.activation)) j[activation_param(a.activation)] = a.alpha;
}

/// model.layers as a config file writes it: the head left out (it is appended), a fused
/// activation back inside its Dense; parsing this gives the same list.
json layers_json(const std::vector<LayerSpec>& layers) {
  json out = json::array();
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerSpec& l = layers[i];
    json j;
    switch (l.kind) {
      case LayerKind::kDense:
        if (l.head) continue;
        j = json{{"dense", l.units}, {"use_bias", l.use_bias}};
        if (i + 1 < layers.size() && layers[i + 1].kind == LayerKind::kActivation && layers[i + 1].fused)
          put_activation(j, layers[++i]);
        break;
      case LayerKind::kBatchNorm:
      case LayerKind::kFrozenBatchNorm:
      case LayerKind::kBatchRenorm:
        j = json{{"batchnorm", {{"eps", l.eps}, {"momentum", l.momentum}, {"center", l.center}, {"scale", l.scale}}}};
        break;
      case LayerKind::kActivation: put_activation(j, l); break;
      case LayerKind::kDropout: j = json{{"dropout", l.rate}}; break;
    }
    out.push_back(j);
  }
  return out;
}

json model_json(const ModelConfig& m) {
  const auto& b = m.batchnorm;
  json j{{"layers", layers_json(m.layers)},
         {"loss", to_string(m.loss)},
         {"batchnorm", {{"semantics", to_string(b.semantics)}, {"eps", b.eps}, {"momentum", b.momentum}, {"affine", b.affine}}}};
  // Written only when false, so that every earlier config keeps its resolved text and cache key.
  if (!m.layers.empty() && !m.layers.back().use_bias) j["head_bias"] = false;
  return j;
}

json init_json(const Config& c) {
  if (!c.init_keras.empty()) return json{{"keras", c.init_keras}};
  if (c.init_torch.empty()) return json::object();
  json j{{"torch", c.init_torch}};
  if (!c.init_key.empty()) j["key"] = c.init_key;
  if (!c.init_prefix.empty()) j["prefix"] = c.init_prefix;
  return j;
}

json pretrain_json(const PretrainConfig& p) {
  return json{{"epochs", p.epochs},
              {"batch_size", p.batch_size},
              {"optimizer", optimizer_json(p.optimizer)},
              {"schedule", enum_name(kSchedules, p.schedule)}};
}

json strategy_json(const StrategyConfig& s) {
  json layers = "all";
  if (!s.layers.all) {
    layers = json::array();
    for (auto i : s.layers.indices) layers.push_back(i);
    for (const auto& n : s.layers.names) layers.push_back(n);
  }
  json j{{"name", s.name}};
  if (!s.preset.empty()) j["preset"] = s.preset;
  j["bn_mode"] = to_string(s.bn_mode);
  j["affine"] = s.affine_trainable ? "trainable" : "frozen";
  if (s.momentum) j["momentum"] = *s.momentum;
  else j["running_stats"] = "update";
  j["track_running_stats"] = s.track_running_stats;
  // Written where they apply or where the preset set them (so that a config that switched one
  // off reads back the same), and nowhere else: the identity of a study without them stays as it was.
  StrategyConfig base;
  if (!s.preset.empty()) apply_preset(s.preset, base);
  if (!s.track_running_stats || base.tracking_rule != TrackingRule::kLibTorch) j["tracking_rule"] = to_string(s.tracking_rule);
  if (s.prior || base.prior) j["prior"] = s.prior ? json(*s.prior) : json(nullptr);
  if (!s.renorm && base.renorm) j["renorm"] = false;
  if (s.renorm) {
    j["renorm"] = true;
    json clip = json::object();
    if (s.renorm_rmax) clip["rmax"] = *s.renorm_rmax;
    if (s.renorm_rmin) clip["rmin"] = *s.renorm_rmin;
    if (s.renorm_dmax) clip["dmax"] = *s.renorm_dmax;
    j["renorm_clipping"] = clip;
    j["renorm_momentum"] = s.renorm_momentum ? json(*s.renorm_momentum) : json(nullptr);
    j["renorm_init"] = s.renorm_init;
  }
  j["layers"] = layers;
  j["freeze_linear"] = s.freeze_linear;
  j["recalibrate"] = s.recalibrate;
  j["fold"] = s.fold;
  j["bn_module"] = to_string(s.bn_module);
  return j;
}

}  // namespace

std::string to_json(const Config& c) {
  json strategies = json::array();
  for (const auto& s : c.strategies) strategies.push_back(strategy_json(s));
  const auto& f = c.finetune;
  json samples = f.samples;
  if (f.draw_count > 0) samples = json{{"count", f.draw_count}, {"seed", f.draw_seed}};
  // Sets stand where samples would (the runs' ids are then their positions).
  const char* unit = f.on_sets() ? "sets" : "samples";
  if (f.on_sets()) samples = f.set_draw_count > 0 ? json{{"count", f.set_draw_count}, {"size", f.set_draw_size}, {"seed", f.set_draw_seed}}
                                                  : json(f.sets);
  json j{{"name", c.name},
         {"seeds", c.seeds},
         {"data", data_json(c.data)},
         {"model", model_json(c.model)},
         {"pretrain", pretrain_json(c.pretrain)},
         {"finetune",
          {{unit, samples},
           {"shuffle", f.shuffle},
           {"epochs", c.finetune.epochs},
           {"batch_size", c.finetune.batch_size},
           {"optimizer", optimizer_json(c.finetune.optimizer)},
           {"monitor", enum_name(kMonitors, c.finetune.monitor)},
           {"save_best_only", c.finetune.save_best_only}}},
         {"grid", json::parse(c.grid_json)},
         {"init", init_json(c)},
         {"strategies", strategies},
         {"report",
          {{"export", c.report.export_auto ? json("auto") : json(c.report.exports)},
           {"export_limit", c.report.export_limit},
           {"diverged_factor", c.report.diverged_factor}}}};
  return j.dump(2) + "\n";
}

std::string study_identity(const Config& c) {
  json j = json::parse(to_json(c));
  j.erase("report");
  return j.dump();
}

const std::vector<std::string>& report_export_names() {
  static const std::vector<std::string> names{"curves", "metrics", "runs"};
  return names;
}

uint64_t splitmix64_next(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

int64_t smallest_fit_batch(const FinetuneConfig& f) {
  const int64_t k = f.set_size(), b = std::max<int64_t>(1, f.batch_size);
  if (b >= k) return k;
  return k % b == 0 ? b : k % b;
}

int64_t smallest_fit_batch(const Config& c) {
  int64_t smallest = std::numeric_limits<int64_t>::max();
  for (const auto& g : c.grid) smallest = std::min(smallest, smallest_fit_batch(g.finetune));
  return smallest;
}

std::vector<int64_t> fine_tuned_rows(const FinetuneConfig& f) {
  if (!f.on_sets()) return f.samples;
  std::set<int64_t> rows;
  for (const auto& set : f.sets) rows.insert(set.begin(), set.end());
  return std::vector<int64_t>(rows.begin(), rows.end());
}

std::string set_members(const FinetuneConfig& f, int64_t id) {
  if (!f.on_sets() || id < 0 || static_cast<size_t>(id) >= f.sets.size()) return "";
  std::vector<std::string> rows;
  for (int64_t r : f.sets[static_cast<size_t>(id)]) rows.push_back(std::to_string(r));
  return " (rows " + join(rows, ", ") + ")";
}

uint64_t shuffle_state(uint64_t seed, int64_t id) {
  // Its own stream, apart from dropout's (dropout_seed) and the draws' (their seeds).
  return (seed * 1000003ULL + static_cast<uint64_t>(id)) ^ 0x53485546464C45ULL;  // "SHUFFLE"
}

void epoch_order(bool shuffle, uint64_t& state, std::vector<int64_t>& order) {
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  if (!shuffle) return;
  for (size_t i = order.size(); i-- > 1;) std::swap(order[i], order[static_cast<size_t>(splitmix64_next(state) % (i + 1))]);
}

namespace {

/// `count` distinct indices of 0..n-1 by a partial Fisher-Yates shuffle driven by splitmix64
/// from `state` (which goes on), sorted.
std::vector<int64_t> draw_distinct(int64_t n, int64_t count, uint64_t& state) {
  std::vector<int64_t> idx(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) idx[static_cast<size_t>(i)] = i;
  for (int64_t i = 0; i < count; ++i) {
    const auto j = i + static_cast<int64_t>(splitmix64_next(state) % static_cast<uint64_t>(n - i));
    std::swap(idx[static_cast<size_t>(i)], idx[static_cast<size_t>(j)]);
  }
  std::vector<int64_t> out(idx.begin(), idx.begin() + count);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

void resolve_samples(Config& c, int64_t n) {
  auto& f = c.finetune;
  const auto fail = [](const std::string& at, const std::string& m) { throw InputError(at + ": " + m); };
  const std::string why = c.data.missing == "drop_rows" ? "; indices count the rows that remain after data.missing drop_rows" : "";
  check_rows_fit(f, n, "rows", why, fail);  // given indices, and draws too large for the data; drawn rows fit
  if (f.draw_count > 0) {
    // A partial Fisher-Yates shuffle driven by splitmix64: the draw depends only on (seed, n).
    uint64_t state = f.draw_seed;
    f.samples = draw_distinct(n, f.draw_count, state);
    f.draw_count = 0;
  }
  if (f.set_draw_count > 0) {
    // Each set its own draw, from one stream: sets may share samples, never within a set.
    uint64_t state = f.set_draw_seed;
    f.sets.clear();
    for (int64_t i = 0; i < f.set_draw_count; ++i) f.sets.push_back(draw_distinct(n, f.set_draw_size, state));
    f.samples.clear();
    for (int64_t i = 0; i < f.set_draw_count; ++i) f.samples.push_back(i);
    f.set_draw_count = f.set_draw_size = 0;
  }
  f.sample = f.samples.front();
  for (auto& g : c.grid) {
    g.finetune.samples = f.samples;
    g.finetune.sample = f.sample;
    g.finetune.draw_count = 0;
    g.finetune.sets = f.sets;
    g.finetune.set_draw_count = g.finetune.set_draw_size = 0;
  }
}

std::string pretrain_cache_key(const Config& c) {
  // The data file's size and mtime stand in for its content, so an edited CSV is not reused.
  json j{{"format", 1}, {"seed", c.seed}, {"data", data_json(c.data)},
         {"model", model_json(c.model)}, {"pretrain", pretrain_json(c.pretrain)}};
  if (c.data.source == "csv") j["data"]["file"] = file_fingerprint(resolve_path(c.base_dir, c.data.path));
  const std::string& init_file = c.init_keras.empty() ? c.init_torch : c.init_keras;
  if (!init_file.empty()) {
    j["init"] = init_json(c);
    j["init"]["file"] = file_fingerprint(resolve_path(c.base_dir, init_file));
  }
  return fnv1a_hex(j.dump());
}

std::string architecture_json(const std::vector<LayerSpec>& sized, BnSemantics semantics, LossKind loss) {
  json layers = json::array();
  for (const auto& l : sized) {
    json j{{"name", l.name}, {"kind", layer_kind_name(l.kind)}, {"in", l.in}, {"out", l.out}};
    switch (l.kind) {
      case LayerKind::kDense:
        j["use_bias"] = l.use_bias;
        j["head"] = l.head;
        break;
      case LayerKind::kBatchNorm:
      case LayerKind::kFrozenBatchNorm:
      case LayerKind::kBatchRenorm:
        j["eps"] = l.eps;
        j["momentum"] = l.momentum;
        j["center"] = l.center;
        j["scale"] = l.scale;
        j["bn_index"] = l.bn_index;
        break;
      case LayerKind::kActivation:
        put_activation(j, l);
        j["fused"] = l.fused;
        break;
      case LayerKind::kDropout: j["rate"] = l.rate; break;
    }
    layers.push_back(j);
  }
  const std::string expr = pytorch_expression(sized);
  json j{{"format", "bnlab.architecture/1"},
         {"inputs", sized.empty() ? 0 : sized.front().in},
         {"outputs", sized.empty() ? 0 : sized.back().out},
         {"loss", to_string(loss)},
         {"semantics", to_string(semantics)},
         {"layers", layers},
         {"pytorch", expr.empty() ? json(nullptr) : json(expr)}};
  return j.dump(2) + "\n";
}

}  // namespace bnlab

// ---------------------------------------------------------------------------------------------
// Keras model configs: the architecture a Keras file carries, as bnlab's layer list.

namespace bnlab {

namespace {

std::string fmt_printf(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

/// snake_case of a Keras class name, as Keras 3 names weight groups: BatchNormalization ->
/// batch_normalization, ReLU -> re_lu, LeakyReLU -> leaky_re_lu.
std::string snake_case(const std::string& name) {
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool upper = std::isupper(static_cast<unsigned char>(c)) != 0;
    if (upper && i > 0) {
      const bool prev_lower = std::islower(static_cast<unsigned char>(name[i - 1])) != 0;
      const bool next_lower = i + 1 < name.size() && std::islower(static_cast<unsigned char>(name[i + 1])) != 0;
      if (prev_lower || (next_lower && std::isupper(static_cast<unsigned char>(name[i - 1])))) out += '_';
    }
    out += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return out;
}

/// A Keras activation name as bnlab's, or false ("swish" is Keras' other name for silu).
bool keras_activation(const std::string& name, Activation& a) {
  if (name == "swish") {
    a = Activation::kSilu;
    return true;
  }
  return activation_from_name(name, a);
}

/// The names a layer entry takes its input from (Keras 2 and Keras 3 inbound_nodes forms);
/// `nodes` counts the calls of the layer (a shared layer has several).
std::vector<std::string> inbound_names(const json& entry, size_t& nodes) {
  std::vector<std::string> out;
  nodes = 0;
  const auto it = entry.find("inbound_nodes");
  if (it == entry.end() || !it->is_array()) return out;
  nodes = it->size();
  std::function<void(const json&)> collect = [&](const json& j) {
    if (j.is_object()) {
      if (j.value("class_name", "") == "__keras_tensor__" && j.contains("config") && j["config"].contains("keras_history") &&
          j["config"]["keras_history"].is_array() && !j["config"]["keras_history"].empty() &&
          j["config"]["keras_history"][0].is_string())
        out.push_back(j["config"]["keras_history"][0].get<std::string>());
      else
        for (const auto& v : j) collect(v);
    } else if (j.is_array()) {
      // Keras 2: [[["name", node, tensor, {kwargs}], ...]]
      if (j.size() >= 3 && j[0].is_string() && j[1].is_number()) out.push_back(j[0].get<std::string>());
      else
        for (const auto& v : j) collect(v);
    }
  };
  collect(*it);
  return out;
}

/// The input width from an InputLayer config or a layer's batch_input_shape / batch_shape.
int64_t input_width(const json& cfg) {
  for (const char* key : {"batch_input_shape", "batch_shape"}) {
    const auto it = cfg.find(key);
    if (it != cfg.end() && it->is_array() && it->size() == 2 && (*it)[1].is_number_integer()) return (*it)[1].get<int64_t>();
  }
  return 0;
}

}  // namespace

namespace {
KerasArchitecture read_keras_architecture(const json& root, const std::string& origin, const BatchNormConfig& bn);
}  // namespace

KerasArchitecture keras_architecture(const std::string& text, const std::string& origin, const BatchNormConfig& bn) {
  const json root = parse_json(text, origin + " (the model config)");
  try {
    return read_keras_architecture(root, origin, bn);
  } catch (const json::exception& e) {
    // A value of another type than Keras writes where the reader looks (a number as a class name).
    std::string what = e.what();
    const auto pos = what.find("] ");
    throw InputError(origin + ": the model config is not as Keras writes it (" + (pos == std::string::npos ? what : what.substr(pos + 2)) + ")");
  }
}

namespace {
KerasArchitecture read_keras_architecture(const json& root, const std::string& origin, const BatchNormConfig& bn) {
  const auto fail = [&](const std::string& what) { throw InputError(origin + ": " + what); };
  if (!root.is_object() || !root.contains("class_name") || !root.contains("config") || !root["config"].is_object())
    fail("the model config has no class_name/config; is this a Keras model file?");
  const std::string cls = root["class_name"].is_string() ? root["class_name"].get<std::string>() : "";
  if (cls != "Sequential" && cls != "Functional" && cls != "Model")
    fail("the model is a " + cls + "; bnlab reads Sequential models and Functional models that are a single chain");
  const auto layers_it = root["config"].find("layers");
  if (layers_it == root["config"].end() || !layers_it->is_array()) fail("the model config lists no layers");
  const json& layers = *layers_it;
  // The layer entries in chain order.
  std::vector<const json*> chain;
  const auto name_of = [](const json& e) {
    if (e.contains("name") && e["name"].is_string()) return e["name"].get<std::string>();
    if (e.contains("config") && e["config"].is_object() && e["config"].contains("name") && e["config"]["name"].is_string())
      return e["config"]["name"].get<std::string>();
    return std::string();
  };
  if (cls == "Sequential") {
    for (const auto& e : layers) chain.push_back(&e);
  } else {
    std::map<std::string, std::vector<const json*>> consumers;
    const json* input = nullptr;
    for (const auto& e : layers) {
      size_t nodes = 0;
      const auto from = inbound_names(e, nodes);
      const std::string name = name_of(e);
      if (e.value("class_name", "") == "InputLayer") {
        if (input != nullptr) fail("the model has more than one input (\"" + name_of(*input) + "\", \"" + name + "\"); bnlab reads a single chain");
        input = &e;
        continue;
      }
      if (nodes > 1) fail("layer \"" + name + "\" (" + e.value("class_name", "") + ") is called " + std::to_string(nodes) + " times; bnlab reads a single chain");
      if (from.size() != 1)
        fail("layer \"" + name + "\" (" + e.value("class_name", "") + ") takes " + std::to_string(from.size()) +
             " inputs (" + join(from, ", ") + "); bnlab reads a single chain, not a branching model");
      consumers[from.front()].push_back(&e);
    }
    if (input == nullptr) fail("the Functional model has no InputLayer");
    chain.push_back(input);
    for (std::string at = name_of(*input);;) {
      const auto it = consumers.find(at);
      if (it == consumers.end()) break;
      if (it->second.size() > 1) {
        std::vector<std::string> names;
        for (const auto* e : it->second) names.push_back(name_of(*e));
        fail("layer \"" + at + "\" feeds " + std::to_string(names.size()) + " layers (" + join(names, ", ") +
             "): the model branches; bnlab reads a single chain");
      }
      chain.push_back(it->second.front());
      at = name_of(*it->second.front());
    }
    if (chain.size() != layers.size()) fail("some layers are not on the chain from the input to the output; bnlab reads a single chain");
  }

  KerasArchitecture arch;
  std::map<std::string, int> counters;  // Keras 3 weight groups: snake_case class + per-class counter
  const auto add = [&](LayerSpec l, const std::string& name, const std::string& key, bool trainable) {
    arch.layers.push_back(std::move(l));
    arch.keras_name.push_back(name);
    arch.weights_key.push_back(key);
    arch.trainable.push_back(trainable);
  };
  for (const json* ep : chain) {
    const json& e = *ep;
    const std::string lcls = e.value("class_name", "");
    const json cfg = e.contains("config") && e["config"].is_object() ? e["config"] : json::object();
    const std::string name = name_of(e);
    const std::string where = "layer \"" + name + "\" (" + lcls + ")";
    const bool trainable = cfg.value("trainable", true);
    const int k = counters[snake_case(lcls)]++;
    const std::string key = k == 0 ? snake_case(lcls) : snake_case(lcls) + "_" + std::to_string(k);
    const auto number = [&](const char* field, double fallback) {
      const auto it = cfg.find(field);
      if (it == cfg.end() || it->is_null()) return fallback;
      if (!it->is_number()) fail(where + ": \"" + field + "\" is not a number");
      return it->get<double>();
    };
    const auto flag = [&](const char* field, bool fallback) {
      const auto it = cfg.find(field);
      if (it == cfg.end()) return fallback;
      if (!it->is_boolean()) fail(where + ": \"" + field + "\" is not a boolean");
      return it->get<bool>();
    };
    const auto activation_layer = [&](const std::string& act, double alpha) {
      LayerSpec a;
      a.kind = LayerKind::kActivation;
      if (!keras_activation(act, a.activation))
        fail(where + ": activation \"" + act + "\" is not one bnlab has (" + join([] {
               std::vector<std::string> n;
               for (Activation x : all_activations()) n.emplace_back(activation_name(x));
               return n;
             }(), ", ") + ")");
      a.alpha = a.activation == Activation::kElu ? (alpha > 0 ? alpha : 1.0) : a.activation == Activation::kLeakyRelu ? alpha : 0.0;
      return a;
    };
    if (lcls == "InputLayer") {
      arch.inputs = input_width(cfg);
      if (arch.inputs == 0) fail(where + ": the input shape is not [batch, features]");
      continue;
    }
    if (arch.inputs == 0) arch.inputs = input_width(cfg);
    if (lcls == "Dense") {
      LayerSpec d;
      d.kind = LayerKind::kDense;
      d.units = static_cast<int64_t>(number("units", 0));
      if (d.units < 1) fail(where + ": units must be >= 1");
      d.use_bias = flag("use_bias", true);
      add(d, name, key, trainable);
      const std::string act = cfg.value("activation", std::string("linear"));
      if (act != "linear") {
        // Keras 3's leaky_relu activation function has slope 0.2; the fused form takes no parameter.
        LayerSpec a = activation_layer(act, act == "leaky_relu" ? 0.2 : 1.0);
        a.fused = true;
        add(a, name, "", trainable);
      }
    } else if (lcls == "BatchNormalization") {
      const auto axis = cfg.find("axis");
      const bool feature_axis = axis == cfg.end() ||
                                (axis->is_number_integer() && (axis->get<int64_t>() == -1 || axis->get<int64_t>() == 1)) ||
                                (axis->is_array() && axis->size() == 1 && (*axis)[0].is_number_integer() &&
                                 ((*axis)[0].get<int64_t>() == -1 || (*axis)[0].get<int64_t>() == 1));
      if (!feature_axis) fail(where + ": axis " + axis->dump() + " is not the feature axis (-1); bnlab's BatchNorm1d normalises each feature over the batch");
      if (flag("renorm", false))
        fail(where + ": renorm=True is not read from a file (bnlab would drop its renorm statistics and build a plain "
                     "BatchNormalization); save the model with renorm=False and fine-tune with the strategy \"renorm\", "
                     "which starts the renorm statistics from the moving ones");
      LayerSpec b;
      b.kind = LayerKind::kBatchNorm;
      b.semantics = bn.semantics;
      b.eps = number("epsilon", 1e-3);
      // Keras' weight of the old value -> PyTorch's of the new batch, to 15 digits so that 0.99
      // reads back as 0.01 rather than 0.010000000000000009.
      b.momentum = std::stod(fmt_printf("%.15g", 1.0 - number("momentum", 0.99)));
      b.center = flag("center", true);
      b.scale = flag("scale", true);
      add(b, name, key, trainable);
    } else if (lcls == "Activation") {
      add(activation_layer(cfg.value("activation", std::string("linear")), 0.0), name, key, trainable);
    } else if (lcls == "ReLU") {
      const double slope = number("negative_slope", 0.0);
      if (!cfg.value("max_value", json()).is_null() || number("threshold", 0.0) != 0)
        fail(where + ": max_value or threshold is set; bnlab's ReLU has neither");
      add(activation_layer(slope != 0 ? "leaky_relu" : "relu", slope), name, key, trainable);
    } else if (lcls == "LeakyReLU") {
      // Keras 3 calls the slope negative_slope (default 0.3), Keras 2 alpha (default 0.3).
      const double slope = cfg.contains("negative_slope") ? number("negative_slope", 0.3) : number("alpha", 0.3);
      add(activation_layer("leaky_relu", slope), name, key, trainable);
    } else if (lcls == "ELU") {
      add(activation_layer("elu", number("alpha", 1.0)), name, key, trainable);
    } else if (lcls == "Dropout") {
      LayerSpec p;
      p.kind = LayerKind::kDropout;
      p.rate = number("rate", 0.0);
      if (!(p.rate >= 0 && p.rate < 1)) fail(where + ": rate must be in [0, 1)");
      add(p, name, key, trainable);
    } else {
      fail(where + ": bnlab builds Dense, BatchNormalization, Activation, ReLU, LeakyReLU, ELU and Dropout layers, not " + lcls);
    }
  }
  // The last Dense is the head: nothing but a Dense may follow the network's body.
  size_t last = arch.layers.size();
  while (last > 0 && arch.layers[last - 1].kind != LayerKind::kDense) --last;
  if (last == 0) fail("the model has no Dense layer to be its output head");
  if (last != arch.layers.size())
    fail("the model ends in layer \"" + arch.keras_name[last] + "\", after its last Dense \"" + arch.keras_name[last - 1] +
         "\"; bnlab's output head is a plain Dense (the loss applies its own output transform)");
  arch.layers[last - 1].head = true;
  name_layers(arch.layers);
  return arch;
}
}  // namespace

}  // namespace bnlab

namespace bnlab {

std::string keras_json(const Config& c) {
  if (c.keras_names.empty()) return "";
  json layers = json::array();
  std::vector<std::string> frozen_bn, frozen_bn_shown;
  int64_t dense = 0, frozen_dense = 0;
  bool prefix = true;
  for (size_t i = 0; i < c.model.layers.size(); ++i) {
    const LayerSpec& l = c.model.layers[i];
    const bool trainable = c.keras_trainable[i];
    layers.push_back(json{{"module", l.name}, {"kind", layer_kind_name(l.kind)}, {"keras_layer", c.keras_names[i]},
                          {"trainable", trainable}});
    if (l.kind == LayerKind::kBatchNorm && !trainable) {
      frozen_bn.push_back(l.name);
      frozen_bn_shown.push_back("\"" + c.keras_names[i] + "\" (module " + l.name + ")");
    }
    if (l.kind == LayerKind::kDense) {
      if (!trainable && frozen_dense == dense) ++frozen_dense;
      else if (!trainable) prefix = false;
      ++dense;
    }
  }
  // What Keras' fit() does with the file as saved (TF 2 / Keras 3): a BatchNormalization with
  // trainable false runs in inference mode with gamma and beta frozen; a Dense with trainable
  // false is not updated.
  json strategy{{"name", "as_saved"}};
  std::string why;
  if (frozen_bn.empty()) {
    strategy["preset"] = "train";
    why = "every BatchNormalization is trainable: fit() normalises with batch statistics (the preset train)";
  } else {
    strategy["preset"] = "frozen";
    strategy["layers"] = frozen_bn;
    why = "BatchNormalization layer(s) " + join(frozen_bn_shown, ", ") +
          " have trainable false: since TF 2.0 fit() runs them in inference mode with gamma and beta frozen (the preset frozen on those layers)";
  }
  if (frozen_dense > 0) {
    strategy["freeze_linear"] = frozen_dense;
    why += "; the first " + std::to_string(frozen_dense) + " Dense layer(s) have trainable false (freeze_linear)";
  }
  json as_saved{{"strategy", strategy}, {"explanation", why}};
  if (!prefix) {
    as_saved["strategy"] = nullptr;
    as_saved["explanation"] = why + "; but Dense layers with trainable false that are not the first ones cannot be expressed by freeze_linear";
  }
  return json{{"file", c.init_keras}, {"layers", layers}, {"as_saved", as_saved}}.dump(2) + "\n";
}

}  // namespace bnlab

namespace bnlab {

KerasExport keras_export_plan(const std::vector<LayerSpec>& sized) {
  KerasExport plan;
  json layers = json::array();
  layers.push_back(json{{"class_name", "InputLayer"},
                        {"config", {{"batch_input_shape", {nullptr, sized.empty() ? 0 : sized.front().in}}, {"dtype", "float32"},
                                    {"name", "input_1"}}}});
  std::map<std::string, int> counters;
  const auto name_for = [&](const std::string& stem) {
    const int k = counters[stem]++;
    return k == 0 ? stem : stem + "_" + std::to_string(k);
  };
  const auto keras_activation_name = [](Activation a) {
    return a == Activation::kSilu ? std::string("swish") : std::string(activation_name(a));  // swish: both Keras 2 and 3
  };
  for (size_t i = 0; i < sized.size(); ++i) {
    const LayerSpec& l = sized[i];
    json entry;
    int weights = -1;
    std::string name;
    switch (l.kind) {
      case LayerKind::kDense: {
        name = name_for("dense");
        weights = static_cast<int>(i);
        std::string act = "linear";
        if (i + 1 < sized.size() && sized[i + 1].kind == LayerKind::kActivation && sized[i + 1].fused &&
            sized[i + 1].activation != Activation::kLeakyRelu && sized[i + 1].activation != Activation::kElu)
          act = keras_activation_name(sized[++i].activation);
        entry = json{{"class_name", "Dense"},
                     {"config", {{"name", name}, {"trainable", true}, {"dtype", "float32"}, {"units", l.out}, {"activation", act},
                                 {"use_bias", l.use_bias}}}};
        break;
      }
      case LayerKind::kBatchNorm:
      case LayerKind::kFrozenBatchNorm:
      case LayerKind::kBatchRenorm:
        // FrozenBatchNorm1d is what TF 2 makes of a BatchNormalization with trainable false;
        // BatchRenorm1d is written as the plain BatchNormalization its inference is.
        name = name_for("batch_normalization");
        entry = json{{"class_name", "BatchNormalization"},
                     {"config", {{"name", name}, {"trainable", l.kind != LayerKind::kFrozenBatchNorm}, {"dtype", "float32"}, {"axis", -1},
                                 {"momentum", std::stod(fmt_printf("%.15g", 1.0 - l.momentum))}, {"epsilon", l.eps},
                                 {"center", l.kind == LayerKind::kFrozenBatchNorm || l.center},
                                 {"scale", l.kind == LayerKind::kFrozenBatchNorm || l.scale}}}};
        weights = static_cast<int>(i);
        break;
      case LayerKind::kActivation:
        if (l.activation == Activation::kLeakyRelu) {
          name = name_for("leaky_re_lu");
          entry = json{{"class_name", "LeakyReLU"}, {"config", {{"name", name}, {"trainable", true}, {"alpha", l.alpha}}}};
        } else if (l.activation == Activation::kElu) {
          name = name_for("elu");
          entry = json{{"class_name", "ELU"}, {"config", {{"name", name}, {"trainable", true}, {"alpha", l.alpha}}}};
        } else {
          name = name_for("activation");
          entry = json{{"class_name", "Activation"},
                       {"config", {{"name", name}, {"trainable", true}, {"activation", keras_activation_name(l.activation)}}}};
        }
        break;
      case LayerKind::kDropout:
        name = name_for("dropout");
        entry = json{{"class_name", "Dropout"}, {"config", {{"name", name}, {"trainable", true}, {"rate", l.rate}}}};
        break;
    }
    layers.push_back(entry);
    plan.layer_names.push_back(name);
    plan.module_of_layer.push_back(weights);
  }
  plan.model_config = json{{"class_name", "Sequential"}, {"config", {{"name", "sequential"}, {"layers", layers}}}}.dump();
  return plan;
}

}  // namespace bnlab
