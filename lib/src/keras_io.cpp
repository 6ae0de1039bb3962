// Keras weights files through Debian's HDF5 C library.
#include "keras_io.hpp"

#include <hdf5.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <map>

#include "archive.hpp"
#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "layer_kinds.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

/// Closes an HDF5 handle when it goes out of scope.
struct Handle {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle() {
    if (id >= 0 && close != nullptr) close(id);
  }
  explicit operator bool() const { return id >= 0; }
};

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

/// A string-array attribute, fixed or variable length (h5py writes either).
std::vector<std::string> read_string_attr(hid_t obj, const char* name, const std::string& path) {
  Handle attr(H5Aopen(obj, name, H5P_DEFAULT), H5Aclose);
  if (!attr) return {};
  Handle type(H5Aget_type(attr.id), H5Tclose);
  Handle space(H5Aget_space(attr.id), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id);
  std::vector<std::string> out;
  if (n <= 0) return out;
  if (H5Tis_variable_str(type.id) > 0) {
    std::vector<char*> ptrs(static_cast<size_t>(n), nullptr);
    Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.id, H5T_VARIABLE);
    if (H5Aread(attr.id, mem.id, ptrs.data()) >= 0)
      for (auto* p : ptrs) out.emplace_back(p ? p : "");
    H5Dvlen_reclaim(mem.id, space.id, H5P_DEFAULT, ptrs.data());
  } else {
    const size_t size = H5Tget_size(type.id);
    if (size == 0 || static_cast<uint64_t>(n) > kJsonMaxBytes / size)  // the model config is one JSON document
      throw InputError(path + ": attribute \"" + name + "\": " + std::to_string(n) + " strings of " + std::to_string(size) +
                       " bytes, more than the " + std::to_string(kJsonMaxBytes >> 20) + " MiB bnlab reads");
    std::vector<char> buf(size * static_cast<size_t>(n) + 1, '\0');
    Handle mem(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.id, size);
    H5Tset_strpad(mem.id, H5T_STR_NULLPAD);  // numpy's 'S' strings use the full width, no terminator
    if (H5Aread(attr.id, mem.id, buf.data()) >= 0)
      for (hssize_t i = 0; i < n; ++i) {
        const char* p = buf.data() + static_cast<size_t>(i) * size;
        out.emplace_back(p, strnlen(p, size));
      }
  }
  return out;
}

struct Array {
  std::string dataset;          ///< full path in the file, for messages
  std::vector<int64_t> shape;
  std::vector<float> values;
};

Array read_dataset(hid_t file, const std::string& path, const std::string& where) {
  Handle ds(H5Dopen2(file, path.c_str(), H5P_DEFAULT), H5Dclose);
  if (!ds) throw InputError(where + ": dataset \"" + path + "\" is missing");
  Handle space(H5Dget_space(ds.id), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.id);
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(rank, 0)));
  H5Sget_simple_extent_dims(space.id, dims.data(), nullptr);
  Array a;
  a.dataset = path;
  // The shape is the file's word: a product that overflows would size the buffer below what
  // H5Dread writes. A weight tensor of up to 2^31 floats (8 GiB) is read; beyond it, exit 2.
  constexpr uint64_t kMaxElements = uint64_t{1} << 31;
  uint64_t n = 1;
  for (auto d : dims) {
    a.shape.push_back(static_cast<int64_t>(d));
    if (d != 0 && n > kMaxElements / d) n = kMaxElements + 1;
    else n *= d;
  }
  if (n > kMaxElements)
    throw InputError(where + ": dataset \"" + path + "\" declares more than 2^31 values; bnlab reads weight tensors of up to 2^31 floats");
  a.values.resize(static_cast<size_t>(n));
  if (n > 0 && H5Dread(ds.id, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.values.data()) < 0)
    throw InputError(where + ": cannot read dataset \"" + path + "\" as numbers");
  return a;
}

/// One layer with weights, as the file has it.
struct FileLayer {
  std::string name;
  bool dense = false;
  std::vector<Array> vars;  ///< dense: kernel, bias; batchnorm: [gamma, beta,] moving_mean, moving_variance
};

std::vector<FileLayer> read_keras2(hid_t file, hid_t root, const std::string& root_path, const std::string& path) {
  std::vector<FileLayer> out;
  for (const auto& layer : read_string_attr(root, "layer_names", path)) {
    Handle g(H5Gopen2(root, layer.c_str(), H5P_DEFAULT), H5Gclose);
    if (!g) throw InputError(path + ": layer \"" + layer + "\" is listed in layer_names but has no group");
    const auto names = read_string_attr(g.id, "weight_names", path);
    if (names.empty()) continue;  // activation, dropout, ...: nothing to load
    FileLayer l;
    l.name = layer;
    for (const auto& w : names) l.vars.push_back(read_dataset(file, root_path + layer + "/" + w, path + ": layer \"" + layer + "\""));
    l.dense = std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.find("kernel") != std::string::npos; });
    if (!l.dense && !std::any_of(names.begin(), names.end(), [](const std::string& n) { return n.find("moving_mean") != std::string::npos; }))
      throw InputError(path + ": layer \"" + layer + "\" is neither Dense (kernel) nor BatchNormalization (moving_mean)");
    out.push_back(std::move(l));
  }
  return out;
}

/// Names of a group's links, through calls whose signature is the same in HDF5 1.10 to 1.14.
std::vector<std::string> link_names(hid_t group) {
  H5G_info_t info{};
  std::vector<std::string> names;
  if (H5Gget_info(group, &info) < 0) return names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len <= 0) continue;
    std::string name(static_cast<size_t>(len) + 1, '\0');
    H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT);
    name.resize(static_cast<size_t>(len));
    names.push_back(name);
  }
  return names;
}

/// Keras 3 names layers "dense", "dense_1", ...; HDF5 lists them alphabetically, so order by
/// (kind prefix, numeric suffix) to recover creation order within each kind.
std::pair<std::string, long> name_order(const std::string& n) {
  const auto us = n.find_last_of('_');
  if (us != std::string::npos && us + 1 < n.size() && std::all_of(n.begin() + static_cast<long>(us) + 1, n.end(), ::isdigit))
    return {n.substr(0, us), std::stol(n.substr(us + 1))};
  return {n, 0};
}

std::vector<FileLayer> read_keras3(hid_t file, const std::string& path) {
  Handle layers(H5Gopen2(file, "layers", H5P_DEFAULT), H5Gclose);
  std::vector<std::string> names = link_names(layers.id);
  std::sort(names.begin(), names.end(), [](const std::string& a, const std::string& b) { return name_order(a) < name_order(b); });
  std::vector<FileLayer> out;
  for (const auto& layer : names) {
    const std::string vars_path = "layers/" + layer + "/vars";
    if (H5Lexists(file, ("layers/" + layer).c_str(), H5P_DEFAULT) <= 0 || H5Lexists(file, vars_path.c_str(), H5P_DEFAULT) <= 0)
      continue;
    FileLayer l;
    l.name = layer;
    for (int i = 0;; ++i) {
      const std::string ds = vars_path + "/" + std::to_string(i);
      if (H5Lexists(file, ds.c_str(), H5P_DEFAULT) <= 0) break;
      l.vars.push_back(read_dataset(file, ds, path + ": layer \"" + layer + "\""));
    }
    if (l.vars.empty()) continue;
    l.dense = l.vars.front().shape.size() == 2;
    out.push_back(std::move(l));
  }
  return out;
}

void copy_into(const torch::Tensor& target, const Array& a, const std::vector<int64_t>& want, bool transpose,
               const std::string& path, const std::string& layer, const std::string& param) {
  if (a.shape != want)
    throw InputError(path + ": layer \"" + layer + "\", dataset \"" + a.dataset + "\" has shape " + shape_text(a.shape) +
                     " but the model's " + param + " needs " + shape_text(want));
  auto t = torch::from_blob(const_cast<float*>(a.values.data()), a.shape, torch::kFloat);
  if (transpose) t = t.t();
  torch::NoGradGuard no_grad;
  target.copy_(t);
}

/// Copies one file layer's weights into the model's layer `target`, each tensor as the kind's
/// Keras mapping lists it; a count or shape that does not fit is an InputError.
using Tensors = std::map<std::string, torch::Tensor>;

Tensors tensors_of(const ModelImpl& model) {
  Tensors out;
  for (const auto& [name, t] : state_dict(model)) out[name] = t;
  return out;
}

void load_layer(const Tensors& tensors, const FileLayer& l, const LayerSpec& target, const std::string& path) {
  const auto weights = layer_kind(target.kind).keras_weights(target);
  if (l.vars.size() != weights.size()) {
    std::vector<std::string> names;
    for (const auto& w : weights) names.emplace_back(w.keras);
    throw InputError(path + ": " + layer_kind(target.kind).keras_class(target) + " layer \"" + l.name + "\" has " +
                     std::to_string(l.vars.size()) + " weights; the model's layer " + target.name + " needs " +
                     std::to_string(weights.size()) + " (" + join(names, ", ") + ")");
  }
  for (size_t k = 0; k < weights.size(); ++k) {
    const auto& t = tensors.at(target.name + "." + weights[k].tensor);
    std::vector<int64_t> want(t.sizes().begin(), t.sizes().end());
    if (weights[k].transpose) std::reverse(want.begin(), want.end());
    copy_into(t, l.vars[k], want, weights[k].transpose, path, l.name,
              "layer " + target.name + " " + weights[k].tensor + " (Keras " + weights[k].keras +
                  (weights[k].transpose ? " [in, out]" : "") + ")");
  }
}

/// One entry of a Keras 3 .keras archive.
std::string zip_entry(const std::string& path, const char* entry) {
  return ZipArchive(path, "Keras 3 .keras file").read(entry);
}

/// An HDF5 file opened from bytes in memory (model.weights.h5 of a .keras archive).
hid_t open_image(const std::string& bytes) {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_fapl_core(fapl.id, 1 << 16, 0);
  H5Pset_file_image(fapl.id, const_cast<char*>(bytes.data()), bytes.size());
  return H5Fopen("model.weights.h5", H5F_ACC_RDONLY, fapl.id);
}

}  // namespace

std::string read_keras_model_config(const std::string& path) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  if (is_zip(path)) return ZipArchive(path, "Keras 3 .keras file").read("config.json", kJsonMaxBytes);
  if (H5Fis_hdf5(path.c_str()) <= 0) throw InputError(path + ": neither a Keras HDF5 file nor a .keras archive (or missing)");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file) throw InputError(path + ": cannot open the HDF5 file");
  if (H5Aexists(file.id, "model_config") > 0) {
    const auto v = read_string_attr(file.id, "model_config", path);
    return v.empty() ? std::string() : v.front();
  }
  // Attributes over 64 KiB are split into model_config0, model_config1, ... (legacy_h5_format.py).
  std::string joined;
  for (int i = 0; H5Aexists(file.id, ("model_config" + std::to_string(i)).c_str()) > 0; ++i)
    for (const auto& part : read_string_attr(file.id, ("model_config" + std::to_string(i)).c_str(), path)) joined += part;
  return joined;  // "" for a weights-only file
}

void import_keras_model(const std::string& path, ModelImpl& model, const std::vector<std::string>& keras_name,
                        const std::vector<std::string>& weights_key) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  const auto& spec = model.layers();
  TORCH_CHECK(keras_name.size() == spec.size() && weights_key.size() == spec.size(), "import_keras_model: one name per module");
  const bool keras3 = is_zip(path);
  std::string image;
  if (keras3) image = zip_entry(path, "model.weights.h5");
  Handle file(keras3 ? open_image(image) : H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file) throw InputError(path + ": cannot open the weights" + std::string(keras3 ? " (model.weights.h5 in the archive)" : ""));
  if (!keras3 && H5Lexists(file.id, "model_weights", H5P_DEFAULT) <= 0)
    throw InputError(path + ": has a model config but no model_weights group");
  const Tensors tensors = tensors_of(model);
  for (size_t i = 0; i < spec.size(); ++i) {
    if (layer_kind(spec[i].kind).keras_weights(spec[i]).empty()) continue;
    FileLayer l;
    l.name = keras3 ? weights_key[i] : keras_name[i];
    if (keras3) {
      // Keras 3 addresses a layer's weights by its class and counter, in the config's order.
      const std::string vars = "layers/" + weights_key[i] + "/vars";
      if (H5Lexists(file.id, "layers", H5P_DEFAULT) <= 0 || H5Lexists(file.id, ("layers/" + weights_key[i]).c_str(), H5P_DEFAULT) <= 0)
        throw InputError(path + ": model.weights.h5 has no layers/" + weights_key[i] + " for layer \"" + keras_name[i] + "\"");
      for (int k = 0;; ++k) {
        const std::string ds = vars + "/" + std::to_string(k);
        if (H5Lexists(file.id, vars.c_str(), H5P_DEFAULT) <= 0 || H5Lexists(file.id, ds.c_str(), H5P_DEFAULT) <= 0) break;
        l.vars.push_back(read_dataset(file.id, ds, path + ": layer \"" + keras_name[i] + "\""));
      }
    } else {
      const std::string group = "model_weights/" + keras_name[i];
      if (H5Lexists(file.id, group.c_str(), H5P_DEFAULT) <= 0)
        throw InputError(path + ": model_weights has no group for layer \"" + keras_name[i] + "\"");
      Handle g(H5Gopen2(file.id, group.c_str(), H5P_DEFAULT), H5Gclose);
      for (const auto& w : read_string_attr(g.id, "weight_names", path))
        l.vars.push_back(read_dataset(file.id, group + "/" + w, path + ": layer \"" + keras_name[i] + "\""));
    }
    load_layer(tensors, l, spec[i], path);
  }
}

namespace {

}  // namespace

void import_keras_h5(const std::string& path, ModelImpl& model) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become our messages, not HDF5's stack dumps
  if (H5Fis_hdf5(path.c_str()) <= 0) throw InputError(path + ": not an HDF5 file (or missing)");
  Handle file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
  if (!file) throw InputError(path + ": cannot open the HDF5 file");
  std::vector<FileLayer> layers;
  if (H5Lexists(file.id, "model_weights", H5P_DEFAULT) > 0) {  // model.save(): weights under model_weights/
    Handle root(H5Gopen2(file.id, "model_weights", H5P_DEFAULT), H5Gclose);
    layers = read_keras2(file.id, root.id, "model_weights/", path);
  } else if (H5Aexists(file.id, "layer_names") > 0) {
    layers = read_keras2(file.id, file.id, "", path);
  } else if (H5Lexists(file.id, "layers", H5P_DEFAULT) > 0) {
    layers = read_keras3(file.id, path);
  } else {
    throw InputError(path + ": neither a Keras 2 weights file (no layer_names) nor a Keras 3 .weights.h5 (no layers/)");
  }
  // Weights-only files do not say where weightless layers stand, and Keras 3's list its layers
  // grouped by kind: the i-th Dense goes to the i-th Linear, the i-th BatchNormalization to the
  // i-th BatchNorm, each tensor as the kind's Keras mapping lists it.
  std::vector<const FileLayer*> dense, bn;
  for (const auto& l : layers) (l.dense ? dense : bn).push_back(&l);
  std::vector<size_t> model_dense, model_bn;
  const auto& spec = model.layers();
  for (size_t i = 0; i < spec.size(); ++i) {
    if (spec[i].kind == LayerKind::kDense) model_dense.push_back(i);
    if (spec[i].kind == LayerKind::kBatchNorm) model_bn.push_back(i);
  }
  if (dense.size() != model_dense.size() || bn.size() != model_bn.size())
    throw InputError(path + ": the file has " + std::to_string(dense.size()) + " Dense and " + std::to_string(bn.size()) +
                     " BatchNormalization layers with weights; the model has " + std::to_string(model_dense.size()) + " Linear and " +
                     std::to_string(model_bn.size()) + " BatchNorm layers (check model.layers)");
  const Tensors tensors = tensors_of(model);
  for (size_t i = 0; i < dense.size(); ++i) load_layer(tensors, *dense[i], spec[model_dense[i]], path);
  for (size_t i = 0; i < bn.size(); ++i) load_layer(tensors, *bn[i], spec[model_bn[i]], path);
}

namespace {

/// Why the last HDF5 call failed: the system's error text where the file driver reports one
/// ("No space left on device"), else the innermost description on HDF5's error stack.
std::string hdf5_reason() {
  std::string reason;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_UPWARD,
      [](unsigned, const H5E_error2_t* e, void* data) -> herr_t {
        auto& r = *static_cast<std::string*>(data);
        const std::string desc = e->desc != nullptr ? e->desc : "";
        const auto at = desc.find("error message = '");
        if (at != std::string::npos) {
          const auto from = at + 17, to = desc.find('\'', from);
          r = desc.substr(from, to == std::string::npos ? std::string::npos : to - from);
          return 1;  // the driver's errno text: stop here
        }
        if (r.empty()) r = desc;
        return 0;
      },
      &reason);
  return reason.empty() ? "an HDF5 error" : reason;
}

}  // namespace

void export_keras_h5(const std::string& path, const ModelImpl& model) {
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  // HDF5 builds the file in memory (its core driver, no backing file) and bnlab writes the image
  // as it writes every output: to a temporary, synced, renamed into place. A full disk is then
  // one clean error, never a half-flushed HDF5 file or a library left holding it open.
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error("cannot build " + path + " (" + what + "): " + hdf5_reason());
  };
  std::string image;
  {
    Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
    if (!fapl || H5Pset_fapl_core(fapl.id, size_t{1} << 20, /*backing_store=*/0) < 0) fail("setting up HDF5's memory driver");
    Handle file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id), H5Fclose);
    if (!file) fail("creating it");
    {
      Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
      H5Pset_create_intermediate_group(lcpl.id, 1);
      const auto write_strings = [&](hid_t obj, const char* name, const std::vector<std::string>& values) {
        size_t width = 1;
        for (const auto& v : values) width = std::max(width, v.size());
        std::vector<char> buf(std::max<size_t>(1, width * values.size()), '\0');
        for (size_t i = 0; i < values.size(); ++i) std::copy(values[i].begin(), values[i].end(), buf.begin() + static_cast<long>(i * width));
        Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
        H5Tset_size(type.id, width);
        H5Tset_strpad(type.id, H5T_STR_NULLPAD);  // as numpy/h5py write 'S' arrays
        const hsize_t n = values.size();
        Handle space(values.size() == 1 && std::string(name) != "layer_names" && std::string(name) != "weight_names"
                         ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr), H5Sclose);
        Handle attr(H5Acreate2(obj, name, type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
        if (!attr || H5Awrite(attr.id, type.id, buf.data()) < 0) fail(std::string("writing the attribute ") + name);
      };
      const auto write_array = [&](hid_t group, const std::string& name, const torch::Tensor& t) {
        const auto c = t.detach().to(torch::kFloat).contiguous();
        std::vector<hsize_t> dims(c.sizes().begin(), c.sizes().end());
        Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
        Handle ds(H5Dcreate2(group, name.c_str(), H5T_IEEE_F32LE, space.id, lcpl.id, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
        if (!ds || H5Dwrite(ds.id, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, c.data_ptr<float>()) < 0) fail("writing " + name);
      };
      // A model.save() file: the architecture in model_config, every layer (weightless ones too)
      // under model_weights/ with its weight_names, datasets at model_weights/<layer>/<layer>/<w>:0.
      const KerasExport plan = keras_export_plan(model.layers());
      {
        Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
        H5Tset_size(type.id, H5T_VARIABLE);
        Handle space(H5Screate(H5S_SCALAR), H5Sclose);
        Handle attr(H5Acreate2(file.id, "model_config", type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
        const char* text = plan.model_config.c_str();
        if (!attr || H5Awrite(attr.id, type.id, &text) < 0) fail("writing model_config");
      }
      {
        Handle weights_group(H5Gcreate2(file.id, "model_weights", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
        if (!weights_group) fail("creating model_weights");
        const Tensors sd = tensors_of(model);
        for (size_t k = 0; k < plan.layer_names.size(); ++k) {
          const std::string& name = plan.layer_names[k];
          Handle g(H5Gcreate2(weights_group.id, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
          if (!g) fail("creating model_weights/" + name);
          std::vector<std::string> wn;
          if (plan.module_of_layer[k] >= 0) {
            const LayerSpec& info = model.layers()[static_cast<size_t>(plan.module_of_layer[k])];
            for (const auto& w : layer_kind(info.kind).keras_weights(info)) {
              const std::string dataset = name + "/" + w.keras + ":0";
              const auto& t = sd.at(info.name + "." + w.tensor);
              write_array(g.id, dataset, w.transpose ? t.t() : t);
              wn.push_back(dataset);
            }
          }
          write_strings(g.id, "weight_names", wn);
        }
        write_strings(weights_group.id, "layer_names", plan.layer_names);
        write_strings(weights_group.id, "backend", {"tensorflow"});
        write_strings(weights_group.id, "keras_version", {"2.15.0"});
      }
      write_strings(file.id, "backend", {"tensorflow"});
      write_strings(file.id, "keras_version", {"2.15.0"});
    }
    // Every object is closed; flushed, the image is the file HDF5 would have written.
    if (H5Fflush(file.id, H5F_SCOPE_GLOBAL) < 0) fail("flushing it");
    const ssize_t size = H5Fget_file_image(file.id, nullptr, 0);
    if (size <= 0) fail("taking its image");
    image.resize(static_cast<size_t>(size));
    if (H5Fget_file_image(file.id, image.data(), image.size()) != size) fail("taking its image");
  }
  write_file_atomic(path, image);
}

}  // namespace bnlab
