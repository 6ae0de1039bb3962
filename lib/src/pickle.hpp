// A strict reader of Python pickles as torch.save writes them (data.pkl of its zip archive), with
// no torch types: LibTorch 1.13's own unpickler cannot read a Python state dict (the OrderedDict
// state that carries _metadata trips an internal assert: pytorch/pytorch#100741, fixed only in
// 2.6), and it rejects a whole checkpoint for one class it does not know (Lightning's
// AttributeDict under "hyper_parameters").
//
// Values are plain data: None, bools, ints, floats, strings, bytes, lists, tuples, dicts (in
// insertion order), tensors (a reference into the archive's storages) and opaque objects, which
// are kept by class name so that a message can say what an entry is. Nothing is executed.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace bnlab::pickle {

enum class Kind { kNone, kBool, kInt, kFloat, kString, kBytes, kList, kTuple, kDict, kGlobal, kObject, kStorage, kTensor };

/// A storage of the archive (a persistent id ('storage', torch.FloatStorage, key, location, numel)).
struct Storage {
  std::string dtype;      ///< "float32", "float64", "int64", ... ("uint8" for torch.UntypedStorage)
  std::string key;        ///< the record data/<key>
  std::string location;   ///< "cpu", "cuda:0", ... (read onto the CPU either way)
  int64_t numel = 0;      ///< elements of dtype
};

/// A dense tensor: torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...).
struct Tensor {
  Storage storage;
  int64_t offset = 0;
  std::vector<int64_t> sizes, strides;
  bool parameter = false;  ///< wrapped by torch._utils._rebuild_parameter
};

/// One value of the program. Values are owned by their Document and point at each other, so a
/// deep or cyclic structure (which a malformed file may build) is freed without recursion.
struct Value {
  Kind kind = Kind::kNone;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::string text;                         ///< string, bytes; the "module.name" of a global or an object's class
  std::vector<const Value*> items;          ///< list, tuple, set; an object's constructor arguments
  std::vector<std::pair<const Value*, const Value*>> entries;  ///< dict (or a dict subclass's object), in insertion order
  Tensor tensor;                            ///< tensor; storage: tensor.storage

  /// The entry of a dict with this string key, or nullptr.
  const Value* find(const std::string& key) const;
};

/// What a value is, for messages: "a tensor", "a dict of 3 entries", "a collections.Counter object".
std::string describe(const Value& v);

/// At most this many values per program (about 1 GiB of memory; a state dict needs about ten per
/// tensor), so that a small hostile file cannot exhaust memory.
inline constexpr size_t kMaxValues = size_t{1} << 22;

/// The values a program built, and the one it returned.
struct Document {
  std::vector<std::unique_ptr<Value>> values;
  const Value* root = nullptr;
};

/// Runs the pickle program in `bytes` (protocols 0 to 5) and returns what it builds. Throws
/// bnlab::InputError naming `origin`, the byte offset and the opcode for a truncated or malformed
/// program, or an opcode that needs Python (EXT*, out-of-band buffers, a persistent id that is
/// not a torch storage).
Document parse(const std::string& bytes, const std::string& origin);

}  // namespace bnlab::pickle
