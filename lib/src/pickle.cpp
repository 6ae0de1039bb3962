// The pickle virtual machine of pickle.hpp: Python's opcode table (Lib/pickle.py, protocols 0-5),
// run over a byte buffer with every read bounds-checked.
#include "pickle.hpp"

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>

#include "bnlab/errors.hpp"
#include "text.hpp"

namespace bnlab::pickle {

const Value* Value::find(const std::string& key) const {
  if (kind != Kind::kDict) return nullptr;
  for (const auto& [k, v] : entries)
    if (k->kind == Kind::kString && k->text == key) return v;
  return nullptr;
}

std::string describe(const Value& v) {
  switch (v.kind) {
    case Kind::kNone: return "None";
    case Kind::kBool: return v.boolean ? "True" : "False";
    case Kind::kInt: return "the int " + std::to_string(v.integer);
    case Kind::kFloat: return "the float " + fmt_double(v.real);
    case Kind::kString: return "the string \"" + v.text + "\"";
    case Kind::kBytes: return "bytes";
    case Kind::kList: return "a list of " + std::to_string(v.items.size());
    case Kind::kTuple: return "a tuple of " + std::to_string(v.items.size());
    case Kind::kDict: return "a dict of " + std::to_string(v.entries.size()) + " entries";
    case Kind::kGlobal: return "the class or function " + v.text;
    case Kind::kObject: return "a " + v.text + " object";
    case Kind::kStorage: return "a storage";
    case Kind::kTensor: return "a tensor";
  }
  return "?";
}

namespace {

/// torch.<X>Storage -> dtype name; UntypedStorage counts bytes.
const std::map<std::string, std::string>& storage_dtypes() {
  static const std::map<std::string, std::string> m = {
      {"torch.FloatStorage", "float32"},   {"torch.DoubleStorage", "float64"}, {"torch.HalfStorage", "float16"},
      {"torch.BFloat16Storage", "bfloat16"}, {"torch.LongStorage", "int64"},  {"torch.IntStorage", "int32"},
      {"torch.ShortStorage", "int16"},     {"torch.CharStorage", "int8"},     {"torch.ByteStorage", "uint8"},
      {"torch.BoolStorage", "bool"},       {"torch.UntypedStorage", "uint8"}, {"torch.storage.UntypedStorage", "uint8"}};
  return m;
}

class Machine {
 public:
  Machine(const std::string& bytes, const std::string& origin) : b_(bytes), origin_(origin) {}

  Document run() {
    while (true) {
      if (pos_ >= b_.size()) fail("the program ends without STOP (truncated)");
      at_ = pos_;
      op_ = static_cast<unsigned char>(b_[pos_++]);
      if (op_ == '.') break;
      step();
    }
    if (stack_.size() != 1 || !marks_.empty()) fail("STOP with " + std::to_string(stack_.size()) + " values on the stack");
    doc_.root = stack_.back();
    return std::move(doc_);
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    char op[16];
    std::snprintf(op, sizeof op, "0x%02x", op_);
    throw InputError(origin_ + ": byte " + std::to_string(at_) + " (opcode " + op + "): " + why);
  }

  // ---- reading the program
  const char* take(size_t n) {
    if (n > b_.size() - pos_) fail("truncated (needs " + std::to_string(n) + " more bytes)");
    const char* p = b_.data() + pos_;
    pos_ += n;
    return p;
  }
  uint64_t le(size_t n) {
    const auto* p = reinterpret_cast<const unsigned char*>(take(n));
    uint64_t v = 0;
    for (size_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    return v;
  }
  std::string line() {
    const size_t end = b_.find('\n', pos_);
    if (end == std::string::npos) fail("truncated (a text argument has no newline)");
    std::string s = b_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return s;
  }
  std::string counted(uint64_t n) {
    if (n > b_.size() - pos_) fail("truncated (a " + std::to_string(n) + "-byte argument)");
    return std::string(take(static_cast<size_t>(n)), static_cast<size_t>(n));
  }

  // ---- values
  Value* make(Kind k) {
    if (doc_.values.size() >= kMaxValues) fail("builds more than " + std::to_string(kMaxValues) + " values");
    doc_.values.push_back(std::make_unique<Value>());
    doc_.values.back()->kind = k;
    return doc_.values.back().get();
  }
  Value* integer(int64_t i) {
    Value* v = make(Kind::kInt);
    v->integer = i;
    return v;
  }
  Value* text(Kind k, std::string s) {
    Value* v = make(k);
    v->text = std::move(s);
    return v;
  }
  void push(const Value* v) {
    if (stack_.size() >= (size_t{1} << 24)) fail("more than 16M values on the stack");
    stack_.push_back(v);
  }
  const Value* pop() {
    if (stack_.size() <= floor()) fail("pops an empty stack");
    const Value* v = stack_.back();
    stack_.pop_back();
    return v;
  }
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  std::vector<const Value*> pop_mark() {
    if (marks_.empty()) fail("no MARK to pop to");
    std::vector<const Value*> items(stack_.begin() + static_cast<std::ptrdiff_t>(marks_.back()), stack_.end());
    stack_.resize(marks_.back());
    marks_.pop_back();
    return items;
  }
  /// The value on top of the stack, of one of `kinds`, which the opcode modifies in place (its
  /// owner is doc_). Objects stand for instances of list and dict subclasses (Lightning's
  /// AttributeDict), whose items APPENDS and SETITEMS set.
  Value* top(const char* what, std::initializer_list<Kind> kinds) {
    if (stack_.size() <= floor()) fail(std::string(what) + " on an empty stack");
    const Value* v = stack_.back();
    if (std::find(kinds.begin(), kinds.end(), v->kind) == kinds.end()) fail(std::string(what) + " on " + describe(*v));
    return const_cast<Value*>(v);
  }
  Value* tuple(std::vector<const Value*> items) {
    Value* t = make(Kind::kTuple);
    t->items = std::move(items);
    return t;
  }
  void set_items(Value* dict, const std::vector<const Value*>& kv) {
    if (kv.size() % 2 != 0) fail("an odd number of values for a dict's keys and values");
    auto& index = keys_[dict];  // string key -> entry, so that a repeated key replaces (Python's rule) in O(1)
    for (size_t i = 0; i < kv.size(); i += 2) {
      if (kv[i]->kind == Kind::kString) {
        const auto [it, fresh] = index.emplace(kv[i]->text, dict->entries.size());
        if (!fresh) {
          dict->entries[it->second].second = kv[i + 1];
          continue;
        }
      }
      dict->entries.emplace_back(kv[i], kv[i + 1]);
    }
  }
  void memo_put(uint64_t index) {
    if (stack_.size() <= floor()) fail("memoizes an empty stack");
    memo_[index] = stack_.back();
  }
  const Value* memo_get(uint64_t index) {
    const auto it = memo_.find(index);
    if (it == memo_.end()) fail("memo entry " + std::to_string(index) + " was never stored");
    return it->second;
  }

  int64_t to_int(const Value* v, const char* what) {
    if (v->kind == Kind::kInt) return v->integer;
    if (v->kind == Kind::kBool) return v->boolean ? 1 : 0;
    fail(std::string(what) + " is " + describe(*v) + ", not an int");
  }
  std::vector<int64_t> ints(const Value* v, const char* what) {
    if (v->kind != Kind::kTuple && v->kind != Kind::kList) fail(std::string(what) + " is " + describe(*v) + ", not a tuple");
    std::vector<int64_t> out;
    for (const Value* x : v->items) out.push_back(to_int(x, what));
    return out;
  }

  /// REDUCE and NEWOBJ: the few callables torch.save writes become values; any other class or
  /// function becomes an opaque object of that name (nothing runs).
  const Value* call(const Value* callable, const Value* args) {
    if (callable->kind != Kind::kGlobal) fail("calls " + describe(*callable));
    if (args->kind != Kind::kTuple) fail("calls " + callable->text + " with " + describe(*args) + ", not a tuple");
    const auto& a = args->items;
    const std::string& f = callable->text;
    if (f == "collections.OrderedDict" || f == "builtins.dict") {
      Value* d = make(Kind::kDict);
      if (!a.empty()) {  // OrderedDict([(k, v), ...])
        if (a[0]->kind != Kind::kList && a[0]->kind != Kind::kTuple) fail(f + " of " + describe(*a[0]));
        for (const Value* kv : a[0]->items) {
          if (kv->kind != Kind::kTuple || kv->items.size() != 2) fail(f + " of an item that is not a pair");
          set_items(d, {kv->items[0], kv->items[1]});
        }
      }
      return d;
    }
    // LibTorch's pickler (torch::pickle_save) tags containers with their TorchScript type and
    // writes typed lists through builders; Python's torch.jit._pickle returns the value itself.
    if (f == "torch.jit._pickle.restore_type_tag" || f == "torch.jit._pickle.build_intlist" ||
        f == "torch.jit._pickle.build_doublelist" || f == "torch.jit._pickle.build_boollist" ||
        f == "torch.jit._pickle.build_tensorlist") {
      if (a.empty()) fail(f + " of nothing");
      return a[0];
    }
    if (f == "torch._utils._rebuild_tensor_v2" || f == "torch._utils._rebuild_tensor") {
      if (a.size() < 4 || a[0]->kind != Kind::kStorage) fail(f + " without (storage, offset, size, stride)");
      Value* t = make(Kind::kTensor);
      t->tensor.storage = a[0]->tensor.storage;
      t->tensor.offset = to_int(a[1], "the storage offset");
      t->tensor.sizes = ints(a[2], "the size");
      t->tensor.strides = ints(a[3], "the stride");
      if (t->tensor.sizes.size() != t->tensor.strides.size()) fail(f + ": size and stride differ in length");
      return t;
    }
    if (f == "torch._utils._rebuild_parameter" || f == "torch._utils._rebuild_parameter_with_state") {
      if (a.empty() || a[0]->kind != Kind::kTensor) fail(f + " of " + (a.empty() ? std::string("nothing") : describe(*a[0])));
      Value* t = make(Kind::kTensor);
      t->tensor = a[0]->tensor;
      t->tensor.parameter = true;
      return t;
    }
    Value* o = text(Kind::kObject, f);
    o->items = a;
    return o;
  }

  const Value* persistent(const Value* pid) {
    if (pid->kind != Kind::kTuple || pid->items.size() != 5 || pid->items[0]->kind != Kind::kString ||
        pid->items[0]->text != "storage" || pid->items[1]->kind != Kind::kGlobal || pid->items[2]->kind != Kind::kString ||
        pid->items[3]->kind != Kind::kString)
      fail("a persistent id that is not a torch storage ('storage', type, key, location, numel)");
    const auto it = storage_dtypes().find(pid->items[1]->text);
    if (it == storage_dtypes().end()) fail("the storage type " + pid->items[1]->text + " is not one bnlab reads");
    Value* s = make(Kind::kStorage);
    s->tensor.storage = Storage{it->second, pid->items[2]->text, pid->items[3]->text, to_int(pid->items[4], "the storage size")};
    if (s->tensor.storage.numel < 0) fail("a negative storage size");
    return s;
  }

  std::string quoted(std::string s) {  // protocol 0 STRING: 'text' or "text", no escapes
    if (s.size() < 2 || (s.front() != '\'' && s.front() != '"') || s.back() != s.front()) fail("a STRING argument without quotes");
    s = s.substr(1, s.size() - 2);
    if (s.find('\\') != std::string::npos) fail("a protocol-0 string with escapes (bnlab reads protocol 2 and later)");
    return s;
  }
  int64_t parse_int(const std::string& s) {
    std::string t = s;
    if (!t.empty() && t.back() == 'L') t.pop_back();
    try {
      size_t used = 0;
      const long long v = std::stoll(t, &used);
      if (used != t.size()) throw std::invalid_argument(t);
      return v;
    } catch (const std::exception&) {
      fail("\"" + s + "\" is not a 64-bit integer");
    }
  }
  const Value* long_bytes(uint64_t n) {
    if (n > 8) fail("an integer of " + std::to_string(n) + " bytes (bnlab reads up to 64 bits)");
    const auto* p = reinterpret_cast<const unsigned char*>(take(static_cast<size_t>(n)));
    uint64_t v = 0;
    for (uint64_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
    if (n > 0 && n < 8 && (p[n - 1] & 0x80)) v |= ~uint64_t{0} << (8 * n);  // sign-extend
    return integer(static_cast<int64_t>(v));
  }

  void step() {
    switch (op_) {
      case 0x80: le(1); break;                       // PROTO
      case 0x95: le(8); break;                       // FRAME: a length hint only
      case '(': marks_.push_back(stack_.size()); break;
      case '0': pop(); break;
      case '1': pop_mark(); break;
      case '2': push(top_any()); break;               // DUP
      case 'N': push(make(Kind::kNone)); break;
      case 0x88: case 0x89: {
        Value* v = make(Kind::kBool);
        v->boolean = op_ == 0x88;
        push(v);
        break;
      }
      case 'I': {
        const std::string s = line();
        if (s == "01" || s == "00") {
          Value* v = make(Kind::kBool);
          v->boolean = s == "01";
          push(v);
        } else {
          push(integer(parse_int(s)));
        }
        break;
      }
      case 'L': push(integer(parse_int(line()))); break;
      case 'J': push(integer(static_cast<int32_t>(le(4)))); break;
      case 'K': push(integer(static_cast<int64_t>(le(1)))); break;
      case 'M': push(integer(static_cast<int64_t>(le(2)))); break;
      case 0x8a: push(long_bytes(le(1))); break;
      case 0x8b: push(long_bytes(le(4))); break;
      case 'F': {
        const std::string s = line();
        Value* v = make(Kind::kFloat);
        try {
          v->real = std::stod(s);
        } catch (const std::exception&) {
          fail("\"" + s + "\" is not a float");
        }
        push(v);
        break;
      }
      case 'G': {
        const auto* p = reinterpret_cast<const unsigned char*>(take(8));
        uint64_t bits = 0;
        for (int i = 0; i < 8; ++i) bits = (bits << 8) | p[i];  // big-endian
        Value* v = make(Kind::kFloat);
        std::memcpy(&v->real, &bits, sizeof bits);
        push(v);
        break;
      }
      case 'S': push(text(Kind::kString, quoted(line()))); break;
      case 'V': {
        const std::string s = line();
        if (s.find('\\') != std::string::npos) fail("a protocol-0 unicode string with escapes (bnlab reads protocol 2 and later)");
        push(text(Kind::kString, s));
        break;
      }
      case 'T': push(text(Kind::kString, counted(le(4)))); break;
      case 'U': push(text(Kind::kString, counted(le(1)))); break;
      case 'X': push(text(Kind::kString, counted(le(4)))); break;
      case 0x8c: push(text(Kind::kString, counted(le(1)))); break;
      case 0x8d: push(text(Kind::kString, counted(le(8)))); break;
      case 'B': push(text(Kind::kBytes, counted(le(4)))); break;
      case 'C': push(text(Kind::kBytes, counted(le(1)))); break;
      case 0x8e: case 0x96: push(text(Kind::kBytes, counted(le(8)))); break;
      case ')': push(tuple({})); break;
      case 't': push(tuple(pop_mark())); break;
      case 0x85: case 0x86: case 0x87: {
        const size_t n = op_ - 0x84u;
        std::vector<const Value*> items(n);
        for (size_t i = n; i-- > 0;) items[i] = pop();
        push(tuple(std::move(items)));
        break;
      }
      case ']': push(make(Kind::kList)); break;
      case 'l': {
        Value* l = make(Kind::kList);
        l->items = pop_mark();
        push(l);
        break;
      }
      case 'a': {
        const Value* v = pop();
        top("APPEND", {Kind::kList})->items.push_back(v);
        break;
      }
      case 'e': {
        auto items = pop_mark();
        Value* l = top("APPENDS", {Kind::kList, Kind::kObject});
        l->items.insert(l->items.end(), items.begin(), items.end());
        break;
      }
      case '}': push(make(Kind::kDict)); break;
      case 'd': {
        Value* d = make(Kind::kDict);
        set_items(d, pop_mark());
        push(d);
        break;
      }
      case 's': {
        const Value* v = pop();
        const Value* k = pop();
        set_items(top("SETITEM", {Kind::kDict, Kind::kObject}), {k, v});
        break;
      }
      case 'u': {
        auto kv = pop_mark();
        set_items(top("SETITEMS", {Kind::kDict, Kind::kObject}), kv);
        break;
      }
      case 0x8f: push(text(Kind::kObject, "builtins.set")); break;
      case 0x90: {
        auto items = pop_mark();
        Value* s = top("ADDITEMS", {Kind::kObject});
        s->items.insert(s->items.end(), items.begin(), items.end());
        break;
      }
      case 0x91: {
        Value* s = text(Kind::kObject, "builtins.frozenset");
        s->items = pop_mark();
        push(s);
        break;
      }
      case 'g': push(memo_get(static_cast<uint64_t>(parse_int(line())))); break;
      case 'h': push(memo_get(le(1))); break;
      case 'j': push(memo_get(le(4))); break;
      case 'p': memo_put(static_cast<uint64_t>(parse_int(line()))); break;
      case 'q': memo_put(le(1)); break;
      case 'r': memo_put(le(4)); break;
      case 0x94: memo_put(memo_.size()); break;
      case 'c': {
        std::string module = line();
        std::string name = line();
        push(text(Kind::kGlobal, module + "." + name));
        break;
      }
      case 0x93: {
        const Value* name = pop();
        const Value* module = pop();
        if (module->kind != Kind::kString || name->kind != Kind::kString) fail("STACK_GLOBAL of values that are not strings");
        push(text(Kind::kGlobal, module->text + "." + name->text));
        break;
      }
      case 'R': {
        const Value* args = pop();
        const Value* f = pop();
        push(call(f, args));
        break;
      }
      case 0x81: {
        const Value* args = pop();
        const Value* cls = pop();
        push(call(cls, args));
        break;
      }
      case 0x92: {
        pop();  // kwargs
        const Value* args = pop();
        const Value* cls = pop();
        push(call(cls, args));
        break;
      }
      case 'i': {  // INST module\nname\n: an object of the marked arguments
        const std::string module = line();
        const std::string name = line();
        Value* o = text(Kind::kObject, module + "." + name);
        o->items = pop_mark();
        push(o);
        break;
      }
      case 'o': {
        auto items = pop_mark();
        if (items.empty() || items[0]->kind != Kind::kGlobal) fail("OBJ without a class");
        push(call(items[0], tuple(std::vector<const Value*>(items.begin() + 1, items.end()))));
        break;
      }
      case 'b': {
        // BUILD: an object's state. An OrderedDict's is its _metadata (versions of each
        // module's state-dict layout), which a state dict's tensors do not need.
        pop();
        top_any();
        break;
      }
      case 'P': push(persistent(text(Kind::kString, line()))); break;
      case 'Q': push(persistent(pop())); break;
      case 0x82: case 0x83: case 0x84: fail("an extension-registry code (copyreg), which needs Python");
      case 0x97: case 0x98: fail("an out-of-band buffer (protocol 5), which torch.save does not write");
      default: fail("not a pickle opcode");
    }
  }
  const Value* top_any() {
    if (stack_.size() <= floor()) fail("on an empty stack");
    return stack_.back();
  }
  const std::string& b_;
  const std::string& origin_;
  size_t pos_ = 0, at_ = 0;
  unsigned op_ = 0;
  Document doc_;
  std::vector<const Value*> stack_;
  std::vector<size_t> marks_;
  std::map<uint64_t, const Value*> memo_;
  std::unordered_map<const Value*, std::unordered_map<std::string, size_t>> keys_;
};

}  // namespace

Document parse(const std::string& bytes, const std::string& origin) { return Machine(bytes, origin).run(); }

}  // namespace bnlab::pickle
