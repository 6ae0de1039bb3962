// The PyTorch user's own files: state dicts and training checkpoints saved by Python's torch.save
// (read with bnlab's pickle reader, pickle.hpp, and libzip), TorchScript Sequentials saved by
// torch.jit.save (read with LibTorch's torch::jit::load); and the same three forms written back.
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "bnlab/config.hpp"
#include "nn.hpp"

namespace bnlab {

/// What a PyTorch file is ("torchscript" or "pickle": a torch.save file) and, for a TorchScript
/// Sequential, its network: each child by its torch.nn class (Linear, BatchNorm1d with its eps,
/// momentum, affine and track_running_stats, ReLU, Tanh, GELU, Sigmoid, ELU, LeakyReLU, SiLU,
/// Softplus, Identity, Dropout), the last Linear the head. A file of no PyTorch kind, the legacy
/// non-zip torch.save format, a traced module, a root that is not a Sequential, or a child bnlab
/// does not build is an InputError naming the file, the submodule and its class.
TorchFileModel read_torch_file_model(const std::string& path);

/// The tensors a PyTorch file holds, by name, with `prefix` stripped.
struct TorchState {
  std::string form;                    ///< "state_dict", "checkpoint" or "torchscript"
  std::string key;                     ///< the checkpoint entry they came from ("" otherwise)
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::vector<std::string> outside_prefix;  ///< names that do not start with `prefix` (not loaded)
};

/// Reads a state dict (a dict of tensors, OrderedDict included), a checkpoint holding one under
/// `key` (or, with key "", under the first of torch_checkpoint_keys() that holds a dict, which
/// must be the only one), or a TorchScript module's parameters and buffers. With a non-empty
/// `prefix`, only names that start with it are kept, without it. Anything that is not such a
/// file, or an entry that is not a dense CPU-readable tensor, is an InputError naming it.
TorchState read_torch_state(const std::string& path, const std::string& key, const std::string& prefix);

/// read_torch_state, then every tensor into `model` by name, shape and dtype (load_state's rules:
/// a missing, extra or mis-shaped tensor is an InputError naming it and both shapes).
TorchState import_torch_file(const std::string& path, const std::string& key, const std::string& prefix, ModelImpl& model);

/// The second half of import_torch_file: `s` (read from `path` with `prefix`) into `model`.
void load_torch_state(const TorchState& s, const std::string& path, const std::string& prefix, ModelImpl& model);

/// Writes `model` as `form`, atomically: "state_dict" ({name: tensor}, names as torch.nn.Sequential
/// gives them), "checkpoint" ({key: {prefix + name: tensor}, "bnlab": about}) or "torchscript" (a
/// Sequential of torch.nn modules in eval mode that torch.jit.load reads, built from the layer
/// registry's TorchScript classes).
void export_torch(const std::string& path, const ModelImpl& model, const std::string& form, const std::string& key,
                  const std::string& prefix, const std::map<std::string, std::string>& about);

}  // namespace bnlab
