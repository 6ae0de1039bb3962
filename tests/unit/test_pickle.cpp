// bnlab's pickle reader on hand-assembled programs (opcodes from CPython's Lib/pickle.py): what
// torch.save writes for a state dict (an OrderedDict, its _metadata BUILD, storages by persistent
// id, memo references), and malformed programs, which must fail with the byte offset and opcode.
#include <gtest/gtest.h>

#include <string>

#include "bnlab/errors.hpp"
#include "pickle.hpp"

namespace {

using namespace bnlab::pickle;
using namespace std::string_literals;

std::string bytes(std::initializer_list<int> b) {
  std::string s;
  for (int c : b) s.push_back(static_cast<char>(c));
  return s;
}
std::string unicode(const std::string& t) {  // SHORT_BINUNICODE
  return bytes({0x8c, static_cast<int>(t.size())}) + t;
}

/// {"0.weight": tensor [2, 3] of FloatStorage "0"} as torch.save writes it (protocol 2).
std::string state_dict_program() {
  std::string p = bytes({0x80, 2});
  p += "ccollections\nOrderedDict\nq\x00)R"s; // GLOBAL, BINPUT 0, EMPTY_TUPLE, REDUCE
  p += "q\x01(";                              // BINPUT 1, MARK
  p += unicode("0.weight");
  p += "ctorch._utils\n_rebuild_tensor_v2\nq\x02(";
  p += "(" + unicode("storage") + "ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu") + "K\x06tQ";  // persistent id
  p += "K\x00K\x02K\x03\x86K\x03K\x01\x86\x89"s;  // offset 0, size (2, 3), stride (3, 1), requires_grad False
  p += "h\x00)Rq\x03"s;                          // backward hooks: OrderedDict() via BINGET 0
  p += "tRu";                                    // TUPLE, REDUCE, SETITEMS
  p += "}" + unicode("_metadata") + "h\x00)R"s + "sb.";  // BUILD {"_metadata": OrderedDict()}
  return std::string(p);
}

TEST(Pickle, ReadsAStateDictAsTorchSaveWritesIt) {
  const std::string prog = state_dict_program();
  const Document d = parse(prog, "sd.pt");
  ASSERT_EQ(d.root->kind, Kind::kDict);
  ASSERT_EQ(d.root->entries.size(), 1u);
  const Value* t = d.root->find("0.weight");
  ASSERT_NE(t, nullptr);
  ASSERT_EQ(t->kind, Kind::kTensor);
  EXPECT_EQ(t->tensor.storage.dtype, "float32");
  EXPECT_EQ(t->tensor.storage.key, "0");
  EXPECT_EQ(t->tensor.storage.location, "cpu");
  EXPECT_EQ(t->tensor.storage.numel, 6);
  EXPECT_EQ(t->tensor.sizes, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(t->tensor.strides, (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(t->tensor.offset, 0);
}

TEST(Pickle, ScalarsAndContainers) {
  // {"a": [1, -2, 300, 70000, 1.5, True, None], "b": (b"xy",)} with BININT1/BININT/BININT2/BINFLOAT/LONG1.
  std::string p = bytes({0x80, 2}) + "}(" + unicode("a") + "](K\x01J" + bytes({0xfe, 0xff, 0xff, 0xff}) + "M" + bytes({0x2c, 0x01}) +
                  bytes({0x8a, 3, 0x70, 0x11, 0x01}) + "G" + bytes({0x3f, 0xf8, 0, 0, 0, 0, 0, 0}) + bytes({0x88}) + "Ne" +
                  unicode("b") + "C\x02xy" + bytes({0x85}) + "u.";
  const Document d = parse(p, "t");
  const Value* a = d.root->find("a");
  ASSERT_NE(a, nullptr);
  ASSERT_EQ(a->items.size(), 7u);
  EXPECT_EQ(a->items[0]->integer, 1);
  EXPECT_EQ(a->items[1]->integer, -2);
  EXPECT_EQ(a->items[2]->integer, 300);
  EXPECT_EQ(a->items[3]->integer, 70000);
  EXPECT_EQ(a->items[4]->real, 1.5);
  EXPECT_TRUE(a->items[5]->boolean);
  EXPECT_EQ(a->items[6]->kind, Kind::kNone);
  const Value* b = d.root->find("b");
  ASSERT_EQ(b->kind, Kind::kTuple);
  EXPECT_EQ(b->items[0]->text, "xy");
}

TEST(Pickle, UnknownClassesAreNamedObjectsNotErrors) {
  // __main__.AttributeDict() via NEWOBJ, then SETITEMS on it (a dict subclass).
  std::string p = bytes({0x80, 2}) + "c__main__\nAttributeDict\n)" + bytes({0x81}) + "(" + unicode("lr") + "K\x01u.";
  const Document d = parse(p, "t");
  EXPECT_EQ(d.root->kind, Kind::kObject);
  EXPECT_EQ(d.root->text, "__main__.AttributeDict");
  EXPECT_EQ(describe(*d.root), "a __main__.AttributeDict object");
  ASSERT_EQ(d.root->entries.size(), 1u);
}

void expect_fails(const std::string& program, const std::string& needle) {
  try {
    parse(program, "bad.pt");
    ADD_FAILURE() << "parsed: " << needle;
  } catch (const bnlab::InputError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bad.pt: byte "), std::string::npos) << e.what();
  }
}

TEST(Pickle, MalformedProgramsNameTheByteAndOpcode) {
  const std::string good = state_dict_program();
  for (size_t cut = 0; cut + 1 < good.size(); cut += 7) expect_fails(good.substr(0, cut), "");
  expect_fails(bytes({0x80, 2}) + "X" + bytes({0xff, 0xff, 0xff, 0x7f}), "truncated");
  expect_fails(bytes({0x80, 2}) + "h\x05.", "memo entry 5 was never stored");
  expect_fails(bytes({0x80, 2}) + "0", "pops an empty stack");
  expect_fails(bytes({0x80, 2}) + bytes({0x82, 1}), "extension-registry");
  expect_fails(bytes({0x80, 2}) + "Z", "not a pickle opcode");
  expect_fails(bytes({0x80, 2}) + "K\x01K\x02.", "STOP with 2 values");
  expect_fails(bytes({0x80, 2}) + "(" + unicode("x") + "Q", "not a torch storage");
  expect_fails(bytes({0x80, 2}) + "K\x01" + "a", "APPEND");
  expect_fails(bytes({0x80, 2}) + bytes({0x8a, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9}), "an integer of 9 bytes");
}

}  // namespace
