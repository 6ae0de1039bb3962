// The PyTorch file code against LibTorch: every registered layer kind (every activation, BatchNorm
// with and without gamma/beta, FrozenBatchNorm1d, Dropout) written as TorchScript by the registry
// and read back; state dicts written by export_torch and read by bnlab's own pickle reader.
#include <gtest/gtest.h>
#include <torch/script.h>
#include <torch/torch.h>

#include "bnlab/errors.hpp"
#include "engine.hpp"
#include "layer_kinds.hpp"
#include "support.hpp"
#include "torch_io.hpp"

namespace {

using namespace bnlab;

std::vector<LayerSpec> network(const LayerSpec& middle) {
  LayerSpec d;
  d.kind = LayerKind::kDense;
  d.units = 6;
  LayerSpec head = d;
  head.head = true;
  head.use_bias = false;
  std::vector<LayerSpec> layers{d, middle, head};
  name_layers(layers);
  return sized_layers(layers, 4, 2);
}

/// Every kind and activation, as one middle layer between two Linears.
std::vector<std::pair<std::string, LayerSpec>> middles() {
  std::vector<std::pair<std::string, LayerSpec>> out;
  for (Activation a : all_activations()) {
    LayerSpec l;
    l.kind = LayerKind::kActivation;
    l.activation = a;
    l.alpha = a == Activation::kLeakyRelu ? 0.15 : a == Activation::kElu ? 0.7 : 0.0;
    out.emplace_back(activation_name(a), l);
  }
  for (int variant = 0; variant < 3; ++variant) {
    LayerSpec b;
    b.kind = LayerKind::kBatchNorm;
    b.semantics = BnSemantics::kTorch;
    b.eps = 1e-4;
    b.momentum = 0.3;
    b.scale = variant != 1;
    b.center = variant != 2;
    out.emplace_back("batchnorm_" + std::to_string(variant), b);
  }
  LayerSpec p;
  p.kind = LayerKind::kDropout;
  p.rate = 0.25;
  out.emplace_back("dropout", p);
  LayerSpec f;
  f.kind = LayerKind::kFrozenBatchNorm;
  f.eps = 1e-3;
  out.emplace_back("frozen", f);
  return out;
}

void randomize(ModelImpl& m) {
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : state_dict(m))
    if (t.is_floating_point()) t.copy_(torch::rand_like(t) + 0.5);
}

TEST(TorchIo, EveryKindRoundTripsThroughTorchScript) {
  const auto dir = test::temp_dir("torchscript");
  for (const auto& [what, middle] : middles()) {
    SCOPED_TRACE(what);
    torch::manual_seed(1);
    Model m(network(middle));
    randomize(*m);
    const std::string path = dir + "/" + what + ".pt";
    export_torch(path, *m, "torchscript", "", "", {});
    // LibTorch runs the exported module and gets what bnlab's torch module computes (eval mode).
    auto script = torch::jit::load(path);
    script.eval();
    m->eval();
    const auto x = torch::randn({5, 4});
    const auto want = m->forward(x);
    const auto got = script.forward({x}).toTensor();
    EXPECT_TRUE(torch::equal(got, want)) << (got - want).abs().max().item<float>();
    // bnlab's reader takes the same layers and tensors back, except FrozenBatchNorm1d, which it refuses.
    if (middle.kind == LayerKind::kFrozenBatchNorm) {
      try {
        read_torch_file_model(path);
        ADD_FAILURE() << "FrozenBatchNorm1d read back";
      } catch (const InputError& e) {
        EXPECT_NE(std::string(e.what()).find("FrozenBatchNorm1d"), std::string::npos) << e.what();
      }
      continue;
    }
    const auto file = read_torch_file_model(path);
    ASSERT_EQ(file.layers.size(), 3u);
    const LayerSpec& r = file.layers[1];
    EXPECT_EQ(r.kind, middle.kind);
    EXPECT_EQ(r.activation, middle.activation);
    EXPECT_EQ(r.alpha, middle.alpha);
    EXPECT_EQ(r.eps, middle.eps);
    EXPECT_EQ(r.momentum, middle.momentum);
    EXPECT_EQ(r.scale, middle.scale);
    EXPECT_EQ(r.center, middle.center);
    EXPECT_EQ(r.rate, middle.rate);
    EXPECT_TRUE(file.layers[2].head);
    EXPECT_FALSE(file.layers[2].use_bias);
    EXPECT_EQ(file.inputs, 4);
    Model back(sized_layers(file.layers, 4, 2));
    import_torch_file(path, "", "", *back);
    const auto a = state_dict(*m), b = state_dict(*back);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  }
}

TEST(TorchIo, CheckpointKeyAndPrefixRoundTrip) {
  const auto dir = test::temp_dir("checkpoint");
  LayerSpec bn;
  bn.kind = LayerKind::kBatchNorm;
  bn.semantics = BnSemantics::kTorch;
  Model m(network(bn));
  randomize(*m);
  export_torch(dir + "/ck.pt", *m, "checkpoint", "model_state_dict", "module.", {{"strategy", "eval"}});
  Model back(m->layers());
  // Without the prefix nothing fits, and the message says which prefix to set.
  try {
    import_torch_file(dir + "/ck.pt", "", "", *back);
    FAIL() << "loaded names with a prefix";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("set init.prefix to \"module.\""), std::string::npos) << e.what();
  }
  const TorchState s = import_torch_file(dir + "/ck.pt", "", "module.", *back);
  EXPECT_EQ(s.form, "checkpoint");
  EXPECT_EQ(s.key, "model_state_dict");
  const auto a = state_dict(*m), b = state_dict(*back);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
  // A state dict file: bare names.
  export_torch(dir + "/sd.pt", *m, "state_dict", "", "", {});
  EXPECT_EQ(read_torch_state(dir + "/sd.pt", "", "").form, "state_dict");
}

TEST(TorchIo, MismatchedTensorsNameTheTensorAndLoadNothing) {
  const auto dir = test::temp_dir("mismatch");
  LayerSpec relu;
  relu.kind = LayerKind::kActivation;
  Model m(network(relu));
  export_torch(dir + "/sd.pt", *m, "state_dict", "", "", {});
  auto layers = network(relu);
  layers[0].units = layers[0].out = 7;
  layers[1].in = layers[1].out = 7;
  layers[2].in = 7;
  Model other(layers);
  const auto before = state_dict(*other)[0].second.clone();
  try {
    import_torch_file(dir + "/sd.pt", "", "", *other);
    FAIL() << "loaded a [6, 4] weight into [7, 4]";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("tensor \"0.weight\" has shape [6, 4] but the model needs [7, 4]"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(torch::equal(state_dict(*other)[0].second, before));
}

}  // namespace
