// PyTorch files in and out: see torch_io.hpp.
#include "torch_io.hpp"

#include <torch/script.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <sstream>

#include "archive.hpp"
#include "bnlab/errors.hpp"
#include "engine.hpp"
#include "keras_io.hpp"
#include "layer_kinds.hpp"
#include "pickle.hpp"
#include "text.hpp"

namespace bnlab {

ModelFileReaders model_file_readers() { return {read_keras_model_config, read_torch_file_model}; }

namespace {

using pickle::Kind;
using pickle::Value;

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

/// The archive's top folder (torch.save names every record "<folder>/...", the folder being the
/// file's stem when it was written).
std::string archive_folder(const ZipArchive& zip, const std::string& path) {
  for (const auto& n : zip.names()) {
    const auto slash = n.find('/');
    if (slash != std::string::npos && n.compare(slash, std::string::npos, "/data.pkl") == 0) return n.substr(0, slash);
  }
  throw InputError(path + ": a zip archive without data.pkl, so not a file torch.save or torch.jit.save wrote");
}

bool is_torchscript(const ZipArchive& zip, const std::string& folder) {
  if (zip.has(folder + "/constants.pkl")) return true;
  for (const auto& n : zip.names())
    if (n.rfind(folder + "/code/", 0) == 0) return true;
  return false;
}

/// A file that is not a zip archive: say what it is when it looks like a PyTorch file.
[[noreturn]] void not_zip(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) throw InputError(path + ": cannot read the file (" + errno_text() + ")");
  unsigned char head[2] = {0, 0};
  const size_t n = std::fread(head, 1, 2, f);
  std::fclose(f);
  if (n == 2 && head[0] == 0x80 && head[1] <= 5)
    throw InputError(path + ": the legacy torch.save format (PyTorch before 1.6, or _use_new_zipfile_serialization=False); "
                            "load it in Python and save it again with torch.save(obj, path)");
  throw InputError(path + ": not a PyTorch file (torch.save and torch.jit.save write zip archives)");
}

torch::ScalarType scalar_type(const std::string& dtype) {
  static const std::map<std::string, torch::ScalarType> m = {
      {"float32", torch::kFloat}, {"float64", torch::kDouble}, {"float16", torch::kHalf}, {"bfloat16", torch::kBFloat16},
      {"int64", torch::kLong},    {"int32", torch::kInt},      {"int16", torch::kShort},  {"int8", torch::kChar},
      {"uint8", torch::kByte},    {"bool", torch::kBool}};
  return m.at(dtype);
}

/// A pickled tensor from its storage record, with every index checked against the storage.
torch::Tensor rebuild(const pickle::Tensor& t, const ZipArchive& zip, const std::string& folder, const std::string& where,
                      std::map<std::string, std::string>& records) {
  const auto type = scalar_type(t.storage.dtype);
  const int64_t item = static_cast<int64_t>(c10::elementSize(type));
  const std::string record = folder + "/data/" + t.storage.key;
  // The record must hold the elements the pickle declares; only then is anything read.
  if (t.storage.numel > zip.size(record) / item)
    throw InputError(where + ": its storage " + record + " holds " + std::to_string(std::max<int64_t>(zip.size(record), 0)) +
                     " bytes, fewer than the " + std::to_string(t.storage.numel) + " elements it declares (truncated file?)");
  auto it = records.find(t.storage.key);
  if (it == records.end()) it = records.emplace(t.storage.key, zip.read(record, static_cast<uint64_t>(t.storage.numel * item))).first;
  const std::string& bytes = it->second;
  if (t.offset < 0) throw InputError(where + ": a negative storage offset");
  // A view never has more elements than its storage (an expanded, stride-0 tensor would, and
  // would be materialised at full size by the copy below).
  int64_t count = 1;
  for (const int64_t s : t.sizes) {
    if (s < 0) throw InputError(where + ": a negative size");
    if (s > 0 && count > t.storage.numel / s)
      throw InputError(where + ": its size declares more elements than its storage of " + std::to_string(t.storage.numel) + " holds");
    count *= s;
  }
  int64_t last = t.offset;  // the highest element index the tensor reads
  bool empty = false;
  for (size_t d = 0; d < t.sizes.size(); ++d) {
    if (t.sizes[d] < 0 || t.strides[d] < 0) throw InputError(where + ": a negative size or stride");
    if (t.sizes[d] == 0) empty = true;
  }
  if (!empty)
    for (size_t d = 0; d < t.sizes.size(); ++d) {
      if (t.sizes[d] > 1 && t.strides[d] > (t.storage.numel - last) / (t.sizes[d] - 1))
        throw InputError(where + ": its size and stride reach beyond its storage of " + std::to_string(t.storage.numel) + " elements");
      last += (t.sizes[d] - 1) * t.strides[d];
    }
  if (!empty && last >= t.storage.numel)
    throw InputError(where + ": its size and stride reach beyond its storage of " + std::to_string(t.storage.numel) + " elements");
  auto flat = torch::from_blob(const_cast<char*>(bytes.data()), {t.storage.numel}, torch::TensorOptions().dtype(type));
  return flat.as_strided(t.sizes, t.strides, t.offset).clone();
}

/// Whether a dict holds only tensors under string keys (a state dict).
bool state_dict_like(const Value& v) {
  if (v.kind != Kind::kDict || v.entries.empty()) return false;
  for (const auto& [k, x] : v.entries)
    if (k->kind != Kind::kString || x->kind != Kind::kTensor) return false;
  return true;
}

std::string entries_text(const Value& d) {
  std::vector<std::string> parts;
  for (const auto& [k, x] : d.entries) {
    if (parts.size() == 8) {
      parts.push_back("... (" + std::to_string(d.entries.size()) + " in all)");
      break;
    }
    parts.push_back((k->kind == Kind::kString ? "\"" + k->text + "\"" : pickle::describe(*k)) + " (" + pickle::describe(*x) + ")");
  }
  return join(parts, ", ");
}

/// The dict of tensors a torch.save file holds, and how it was found.
const Value* find_state_dict(const Value& root, const std::string& path, const std::string& key, std::string& form, std::string& found) {
  if (root.kind == Kind::kObject)
    throw InputError(path + ": holds a pickled " + root.text + " object (torch.save(model)), which only Python can rebuild; "
                            "save model.state_dict() instead, or torch.jit.script(model)");
  if (root.kind != Kind::kDict) throw InputError(path + ": holds " + pickle::describe(root) + ", not a state dict or a checkpoint dict");
  if (!key.empty()) {
    const Value* v = root.find(key);
    if (v == nullptr) throw InputError("init.key: " + path + " has no entry \"" + key + "\"; its entries: " + entries_text(root));
    if (v->kind != Kind::kDict) throw InputError("init.key: entry \"" + key + "\" of " + path + " is " + pickle::describe(*v) + ", not a state dict");
    form = "checkpoint";
    found = key;
    return v;
  }
  if (state_dict_like(root)) {
    form = "state_dict";
    return &root;
  }
  std::vector<std::string> hits;
  for (const auto& k : torch_checkpoint_keys())
    if (const Value* v = root.find(k); v != nullptr && state_dict_like(*v)) hits.push_back(k);
  if (hits.empty())
    throw InputError(path + ": holds no state dict (no dict of tensors under " + join(torch_checkpoint_keys(), ", ") +
                     "); its entries: " + entries_text(root) + "; name the one that holds the model's tensors with init.key");
  if (hits.size() > 1)
    throw InputError(path + ": holds dicts under both \"" + hits[0] + "\" and \"" + hits[1] +
                     "\"; say which is the model's with init.key");
  form = "checkpoint";
  found = hits[0];
  return root.find(hits[0]);
}

/// PyTorch's class name without the __torch__ root and the ___torch_mangle_N parts TorchScript
/// adds when two instances of a class differ in their constants.
std::string torch_class(const torch::jit::Module& m) {
  const std::string q = m.type()->name()->qualifiedName();
  std::string out;
  size_t start = 0;
  while (start <= q.size()) {  // keep every dotted part but "___torch_mangle_<digits>"
    size_t dot = q.find('.', start);
    if (dot == std::string::npos) dot = q.size();
    const std::string part = q.substr(start, dot - start);
    const bool mangle = part.rfind("___torch_mangle_", 0) == 0 && part.size() > 16 &&
                        part.find_first_not_of("0123456789", 16) == std::string::npos;
    if (!mangle) out += (out.empty() ? "" : ".") + part;
    start = dot + 1;
  }
  if (out.rfind("__torch__.", 0) == 0) out = out.substr(10);
  return out;
}

/// torch.nn.modules.linear.Linear -> torch.nn.Linear, as users write it.
std::string short_class(const std::string& q) {
  const std::string head = "torch.nn.modules.";
  if (q.rfind(head, 0) != 0) return q;
  const size_t dot = q.find('.', head.size());
  return dot == std::string::npos ? q : "torch.nn." + q.substr(dot + 1);
}

torch::jit::Module load_script(const std::string& path) {
  try {
    return torch::jit::load(path);
  } catch (const c10::Error& e) {
    throw InputError(path + ": torch::jit::load cannot read the TorchScript module: " + first_line(e.what_without_backtrace()));
  } catch (const std::exception& e) {
    throw InputError(path + ": torch::jit::load cannot read the TorchScript module: " + first_line(e.what()));
  }
}

}  // namespace

namespace {
TorchFileModel script_model(const std::string& path);
}  // namespace

TorchFileModel read_torch_file_model(const std::string& path) {
  if (!is_zip(path)) not_zip(path);
  {
    ZipArchive zip(path, "PyTorch file");
    if (!is_torchscript(zip, archive_folder(zip, path))) {
      TorchFileModel out;
      out.form = "pickle";
      return out;
    }
  }
  try {
    return script_model(path);
  } catch (const c10::Error& e) {  // a constant or attribute of another type than torch.nn's
    throw InputError(path + ": the TorchScript module is not one bnlab reads: " + first_line(e.what_without_backtrace()));
  }
}

namespace {
TorchFileModel script_model(const std::string& path) {
  TorchFileModel out;
  out.form = "torchscript";
  const auto root = load_script(path);
  const std::string root_class = torch_class(root);
  if (root_class != "torch.nn.modules.container.Sequential")
    throw InputError(path + ": the TorchScript module is a " + root_class +
                     ", not a torch.nn.Sequential; bnlab reads its children as the network's layers in order, which only a "
                     "Sequential's forward guarantees. Script the Sequential itself (torch.jit.script(model.net))");
  size_t position = 0;
  for (const auto& child : root.named_children()) {
    const std::string name = child.name;
    const torch::jit::Module& m = child.value;
    const std::string cls = torch_class(m);
    const std::string where = path + ": submodule \"" + name + "\" (" + short_class(cls) + ")";
    if (name != std::to_string(position++)) throw InputError(where + ": not at its Sequential position " + std::to_string(position - 1));
    const auto type = m.type();
    const auto constant = [&](const char* c) -> c10::IValue {
      if (!type->hasConstant(c))
        throw InputError(where + ": no constant \"" + c + "\"; a traced module (torch.jit.trace) does not record its modules' "
                                 "options. Save torch.jit.script(model) instead");
      return type->getConstant(c);
    };
    const auto number = [&](const char* c) {
      const auto v = constant(c);
      double x = 0;
      if (v.isDouble()) x = v.toDouble();
      else if (v.isInt()) x = static_cast<double>(v.toInt());
      else throw InputError(where + ": constant \"" + c + "\" is " + v.tagKind() + ", not a number");
      if (!std::isfinite(x)) throw InputError(where + ": constant \"" + c + "\" is not finite");
      return x;
    };
    const auto width = [&](const char* c) {
      const double x = number(c);
      if (x < 1 || x > 1e9 || x != std::floor(x)) throw InputError(where + ": " + c + " " + fmt_double(x) + " is not a width >= 1");
      return static_cast<int64_t>(x);
    };
    const auto flag = [&](const char* c) {
      const auto v = constant(c);
      if (!v.isBool()) throw InputError(where + ": constant \"" + c + "\" is " + v.tagKind() + ", not a bool");
      return v.toBool();
    };
    const auto has_tensor = [&](const char* attr) { return m.hasattr(attr) && m.attr(attr).isTensor(); };
    LayerSpec l;
    if (cls == "torch.nn.modules.linear.Linear") {
      l.kind = LayerKind::kDense;
      l.in = width("in_features");
      l.units = l.out = width("out_features");
      l.use_bias = has_tensor("bias");
      if (out.inputs == 0) out.inputs = l.in;
    } else if (cls == "torch.nn.modules.batchnorm.BatchNorm1d") {
      l.kind = LayerKind::kBatchNorm;
      l.eps = number("eps");
      if (!(l.eps > 0)) throw InputError(where + ": eps " + fmt_double(l.eps) + " must be > 0");
      if (constant("momentum").isNone())
        throw InputError(where + ": momentum is None (a cumulative average of every batch), which bnlab's BatchNorm does not have");
      l.momentum = number("momentum");
      if (l.momentum < 0 || l.momentum > 1) throw InputError(where + ": momentum " + fmt_double(l.momentum) + " is outside [0, 1]");
      if (!flag("track_running_stats"))
        throw InputError(where + ": track_running_stats is False, so it has no running statistics and normalises even one "
                                 "evaluation sample by its own batch statistics, which PyTorch refuses for a single sample");
      // What the forward uses: affine's weight and bias, when they are tensors (None: no scale, no shift).
      l.scale = has_tensor("weight");
      l.center = has_tensor("bias");
      if (out.inputs == 0) out.inputs = width("num_features");
    } else if (cls == "torch.nn.modules.dropout.Dropout") {
      l.kind = LayerKind::kDropout;
      l.rate = number("p");
      if (!(l.rate >= 0 && l.rate < 1)) throw InputError(where + ": p must be in [0, 1), got " + fmt_double(l.rate));
    } else {
      static const std::map<std::string, Activation> acts = {
          {"torch.nn.modules.activation.ReLU", Activation::kRelu},       {"torch.nn.modules.activation.Tanh", Activation::kTanh},
          {"torch.nn.modules.activation.GELU", Activation::kGelu},       {"torch.nn.modules.activation.Sigmoid", Activation::kSigmoid},
          {"torch.nn.modules.activation.ELU", Activation::kElu},         {"torch.nn.modules.activation.LeakyReLU", Activation::kLeakyRelu},
          {"torch.nn.modules.activation.SiLU", Activation::kSilu},       {"torch.nn.modules.activation.Softplus", Activation::kSoftplus},
          {"torch.nn.modules.linear.Identity", Activation::kLinear}};
      const auto a = acts.find(cls);
      if (a == acts.end()) {
        if (cls == "bnlab.FrozenBatchNorm1d")
          throw InputError(where + ": bnlab's FrozenBatchNorm1d, which a frozen strategy's export writes; bnlab reads the "
                                   "BatchNorm1d it came from and applies the strategy itself");
        throw InputError(where + ": bnlab builds torch.nn.Linear, BatchNorm1d, Dropout, ReLU, Tanh, GELU, Sigmoid, ELU, LeakyReLU, "
                                 "SiLU, Softplus and Identity, not " + short_class(cls));
      }
      l.kind = LayerKind::kActivation;
      l.activation = a->second;
      if (a->second == Activation::kElu) l.alpha = number("alpha");
      if (a->second == Activation::kLeakyRelu) l.alpha = number("negative_slope");
      // PyTorch before 1.12 has no approximate: its GELU is the exact one.
      if (a->second == Activation::kGelu && type->hasConstant("approximate")) {
        const auto v = constant("approximate");
        if (!v.isString() || v.toStringRef() != "none")
          throw InputError(where + ": approximate='" + (v.isString() ? v.toStringRef() : std::string("?")) +
                           "'; bnlab's GELU is the exact (erf) one");
      }
      if (a->second == Activation::kSoftplus && (number("beta") != 1 || number("threshold") != 20))
        throw InputError(where + ": beta " + fmt_double(number("beta")) + ", threshold " + fmt_double(number("threshold")) +
                         "; bnlab's Softplus has PyTorch's defaults (1, 20)");
    }
    out.layers.push_back(l);
    out.types.push_back(short_class(cls));
  }
  size_t last = out.layers.size();
  while (last > 0 && out.layers[last - 1].kind != LayerKind::kDense) --last;
  if (last == 0) throw InputError(path + ": the TorchScript Sequential has no Linear to be its output head");
  if (last != out.layers.size())
    throw InputError(path + ": the Sequential ends in submodule \"" + std::to_string(last) + "\" (" + out.types[last] +
                     ") after its last Linear \"" + std::to_string(last - 1) +
                     "\"; bnlab's output head is a plain Linear (the loss applies its own output transform)");
  out.layers[last - 1].head = true;
  name_layers(out.layers);
  return out;
}
}  // namespace

TorchState read_torch_state(const std::string& path, const std::string& key, const std::string& prefix) {
  if (!is_zip(path)) not_zip(path);
  TorchState out;
  std::vector<std::pair<std::string, torch::Tensor>> all;
  ZipArchive zip(path, "PyTorch file");
  const std::string folder = archive_folder(zip, path);
  if (is_torchscript(zip, folder)) {
    out.form = "torchscript";
    const auto m = load_script(path);
    for (const auto& p : m.named_parameters(true)) all.emplace_back(p.name, p.value.detach().clone());
    for (const auto& b : m.named_buffers(true)) all.emplace_back(b.name, b.value.detach().clone());
  } else {
    if (zip.has(folder + "/byteorder") && zip.read(folder + "/byteorder") != "little")
      throw InputError(path + ": written on a big-endian machine (byteorder \"" + zip.read(folder + "/byteorder") + "\")");
    const auto doc = pickle::parse(zip.read(folder + "/data.pkl", uint64_t{256} << 20), path + ": " + folder + "/data.pkl");
    const Value* sd = find_state_dict(*doc.root, path, key, out.form, out.key);
    std::map<std::string, std::string> records;
    const std::string in = out.key.empty() ? "" : " of entry \"" + out.key + "\"";
    for (const auto& [k, v] : sd->entries) {
      if (k->kind != Kind::kString) throw InputError(path + ": a state dict key" + in + " is " + pickle::describe(*k) + ", not a string");
      const std::string where = path + ": tensor \"" + k->text + "\"" + in;
      if (v->kind != Kind::kTensor) throw InputError(path + ": entry \"" + k->text + "\"" + in + " is " + pickle::describe(*v) + ", not a tensor");
      all.emplace_back(k->text, rebuild(v->tensor, zip, folder, where, records));
    }
  }
  if (prefix.empty()) {
    out.tensors = std::move(all);
    return out;
  }
  for (auto& [name, t] : all) {
    if (name.rfind(prefix, 0) == 0) out.tensors.emplace_back(name.substr(prefix.size()), std::move(t));
    else out.outside_prefix.push_back(name);
  }
  if (out.tensors.empty())
    throw InputError("init.prefix: no tensor name in " + path + " starts with \"" + prefix + "\" (the first is \"" +
                     (out.outside_prefix.empty() ? std::string() : out.outside_prefix.front()) + "\")");
  return out;
}

TorchState import_torch_file(const std::string& path, const std::string& key, const std::string& prefix, ModelImpl& model) {
  TorchState s = read_torch_state(path, key, prefix);
  load_torch_state(s, path, prefix, model);
  return s;
}

void load_torch_state(const TorchState& s, const std::string& path, const std::string& prefix, ModelImpl& model) {
  // Names like "module.0.weight" or "model.0.weight" while the model's are "0.weight": say which prefix to strip.
  std::string hint;
  const auto first_part = [](const std::string& n) { return n.substr(0, n.find('.') + 1); };
  if (!s.tensors.empty() && prefix.empty()) {
    const std::string p = first_part(s.tensors.front().first);
    bool shared = p.size() > 1 && !std::isdigit(static_cast<unsigned char>(p[0]));
    for (const auto& [n, t] : s.tensors) shared = shared && n.rfind(p, 0) == 0;
    if (shared) hint = "every tensor name starts with \"" + p + "\"; set init.prefix to \"" + p + "\" to strip it";
  }
  std::string origin = path;
  if (!s.key.empty()) origin += " (entry \"" + s.key + "\")";
  load_state(model, s.tensors, origin, hint);
}

void export_torch(const std::string& path, const ModelImpl& model, const std::string& form, const std::string& key,
                  const std::string& prefix, const std::map<std::string, std::string>& about) {
  const auto named = state_dict(model);
  if (form == "state_dict" || form == "checkpoint") {
    c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
    for (const auto& [name, t] : named) sd.insert((form == "checkpoint" ? prefix : "") + name, t.detach().clone());
    c10::IValue root(sd);
    if (form == "checkpoint") {
      c10::impl::GenericDict meta(c10::StringType::get(), c10::StringType::get());
      for (const auto& [k, v] : about) meta.insert(k, v);
      c10::impl::GenericDict ck(c10::StringType::get(), c10::AnyType::get());
      ck.insert(key.empty() ? "state_dict" : key, sd);
      ck.insert("bnlab", meta);
      root = c10::IValue(ck);
    }
    const auto bytes = torch::pickle_save(root);
    write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
    return;
  }
  if (form != "torchscript") throw std::invalid_argument("export_torch: unknown form " + form);
  std::map<std::string, torch::Tensor> tensors(named.begin(), named.end());
  torch::jit::Module seq("__torch__.torch.nn.modules.container.Sequential");
  seq.register_attribute("training", c10::BoolType::get(), false);
  std::string chain = "def forward(self, input: Tensor) -> Tensor:\n";
  for (const auto& l : model.layers()) {
    const LayerKindDef& kind = layer_kind(l.kind);
    const TorchScriptClass def = kind.torchscript(l);
    torch::jit::Module m(def.qualified_name);
    m.register_attribute("training", c10::BoolType::get(), false);
    for (const auto& [name, value] : def.constants) m.type()->addConstant(name, value);
    for (const auto& st : kind.state(l)) {
      if (std::find(def.none.begin(), def.none.end(), st.name) != def.none.end()) continue;
      const torch::Tensor t = tensors.at(l.name + "." + st.name).detach().clone();
      // Parameters keep requires_grad, as torch.jit.save writes them, so Python can fine-tune the module.
      if (st.where == StateTensor::kParameter) m.register_parameter(st.name, t.requires_grad_(true), /*is_buffer=*/false);
      else m.register_buffer(st.name, t);
    }
    for (const auto& name : def.none) m.register_attribute(name, c10::OptionalType::create(c10::TensorType::get()), c10::IValue());
    m.define(def.forward);
    seq.register_module(l.name, m);
    chain += "  input = getattr(self, \"" + l.name + "\").forward(input)\n";
  }
  seq.define(chain + "  return input\n");
  std::ostringstream bytes;
  seq.save(bytes);
  write_file_atomic(path, bytes.str());
}

}  // namespace bnlab
