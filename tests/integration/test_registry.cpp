// The generic tests of the registries: every registered layer kind (every activation, every
// BatchNorm variant) through the batched engine's forward and backward against LibTorch
// autograd, on one and several rows, under Keras and PyTorch numerics; every registered
// optimizer against torch::optim on the same gradients; fold on every layout against the
// unfolded model; explain on a layout with BatchNorm after the activation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "batched.hpp"
#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "engine.hpp"
#include "layer_kinds.hpp"
#include "optimizers.hpp"
#include "support.hpp"
#include "torch_support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;

LayerSpec dense(int64_t units, bool bias = true) {
  LayerSpec l;
  l.kind = LayerKind::kDense;
  l.units = units;
  l.use_bias = bias;
  return l;
}

LayerSpec batchnorm(BnSemantics s, bool scale = true, bool center = true) {
  LayerSpec l;
  l.kind = LayerKind::kBatchNorm;
  l.semantics = s;
  l.eps = s == BnSemantics::kKeras ? 1e-3 : 1e-5;
  l.momentum = 0.2;
  l.scale = scale;
  l.center = center;
  return l;
}

LayerSpec activation(Activation a, double alpha = 0) {
  LayerSpec l;
  l.kind = LayerKind::kActivation;
  l.activation = a;
  l.alpha = alpha;
  return l;
}

/// A network of `body` between a first Linear (so that gradients flow through the layer under
/// test) and the head, sized 5 -> 3, with random weights and BatchNorm statistics.
Model network(std::vector<LayerSpec> body, uint64_t seed) {
  std::vector<LayerSpec> layers{dense(6)};
  for (auto& l : body) layers.push_back(l);
  LayerSpec head = dense(0);
  head.head = true;
  layers.push_back(head);
  name_layers(layers);
  torch::manual_seed(seed);
  Model m(sized_layers(layers, 5, 3));
  torch::NoGradGuard no_grad;
  for (auto& p : m->parameters()) p.copy_(torch::randn_like(p) * 0.7);
  for (auto& b : m->named_buffers()) {
    const std::string& name = b.key();
    const auto ends = [&](const std::string& tail) { return name.size() > tail.size() && name.substr(name.size() - tail.size()) == tail; };
    // Positive spreads (renorm's stddevs too, so that the sqrt(eps) floor is the exception).
    if (ends(".running_var") || ends("stddev")) b.value().copy_(torch::rand_like(b.value()) + 0.5);
    else if (b.value().is_floating_point()) b.value().copy_(torch::randn_like(b.value()) * 0.5);  // FrozenBatchNorm1d's too
  }
  return m;
}

/// Every variant of a kind that the tests run: each activation, BatchNorm with and without
/// gamma/beta, FrozenBatchNorm1d, Dropout. The switch has no default: a new kind does not
/// compile here until it has its cases, so registering a kind gets it tested.
std::vector<std::pair<std::string, std::vector<LayerSpec>>> variants(LayerKind kind, BnSemantics s) {
  std::vector<std::pair<std::string, std::vector<LayerSpec>>> out;
  switch (kind) {
    case LayerKind::kDense:
      out.push_back({"dense without bias", {dense(4, false), activation(Activation::kTanh)}});
      out.push_back({"dense", {dense(4)}});
      break;
    case LayerKind::kBatchNorm:
      out.push_back({"batchnorm", {batchnorm(s)}});
      out.push_back({"batchnorm scale only", {batchnorm(s, true, false)}});
      out.push_back({"batchnorm center only", {batchnorm(s, false, true)}});
      out.push_back({"batchnorm affine false", {batchnorm(s, false, false), activation(Activation::kRelu)}});
      break;
    case LayerKind::kFrozenBatchNorm: {
      auto f = batchnorm(s);
      f.kind = LayerKind::kFrozenBatchNorm;
      out.push_back({"frozen batchnorm", {f}});
      break;
    }
    case LayerKind::kActivation:
      for (Activation a : all_activations()) {
        const double alpha = a == Activation::kLeakyRelu ? 0.1 : a == Activation::kElu ? 0.7 : 0.0;
        out.push_back({std::string("activation ") + activation_name(a), {activation(a, alpha)}});
      }
      break;
    case LayerKind::kDropout: {
      LayerSpec d;
      d.kind = LayerKind::kDropout;
      d.rate = 0.3;
      out.push_back({"dropout", {d, batchnorm(s)}});
      break;
    }
    case LayerKind::kBatchRenorm: {
      if (s != BnSemantics::kKeras) break;  // renorm follows Keras (validation refuses PyTorch numerics)
      auto r = batchnorm(s);
      r.kind = LayerKind::kBatchRenorm;
      r.renorm_momentum = 0.3;
      out.push_back({"batch renorm unclipped", {r}});
      r.renorm_has_rmax = r.renorm_has_rmin = r.renorm_has_dmax = true;
      r.renorm_rmax = 1.2, r.renorm_rmin = 0.8, r.renorm_dmax = 0.3;  // tight enough that rows get clipped
      out.push_back({"batch renorm clipped", {r}});
      auto bare = batchnorm(s, false, false);
      bare.kind = LayerKind::kBatchRenorm;
      out.push_back({"batch renorm affine false", {bare, activation(Activation::kTanh)}});
      break;
    }
  }
  return out;
}

StrategyConfig preset(const std::string& name) {
  return parse_config(R"({"name": "p", "strategies": [")" + name + R"("]})", "preset").strategies.at(0);
}

void expect_batched_equals_autograd(const Model& source, const StrategyConfig* strategy, int64_t rows, const std::string& what) {
  SCOPED_TRACE(what + ", rows " + std::to_string(rows) + ", " + (strategy ? strategy->name : std::string("no policy")));
  torch::manual_seed(rows);
  const auto x = torch::randn({rows, 5}) * 1.5, y = torch::randn({rows, 3});
  Model m = clone_model(*source);
  m->set_dropout_seed(17);
  std::vector<std::pair<std::string, torch::Tensor>> grads;
  const double loss = batched_gradients(*m, strategy, LossKind::kMse, x, y, grads);

  Model ref = clone_model(*m);
  ref->set_dropout_seed(17);
  if (strategy) ref->set_policy(Policy{*strategy});
  ref->train();
  auto ref_loss = compute_loss(LossKind::kMse, ref->forward(x), y);
  ref_loss.backward();
  EXPECT_NEAR(loss, ref_loss.item<double>(), 1e-5 * std::max(1.0, std::abs(loss))) << "the forward pass";
  test::expect_gradients_equal(*ref, grads);
}

TEST(LayerKinds, EveryKindForwardAndBackwardMatchAutograd) {
  size_t cases = 0;
  for (LayerKind kind : all_layer_kinds())
    for (BnSemantics s : {BnSemantics::kKeras, BnSemantics::kTorch})
      for (const auto& [what, body] : variants(kind, s)) {
        Model m = network(body, 3);
        const bool has_bn = !m->batchnorms().empty();
        const std::string where = what + (s == BnSemantics::kKeras ? ", keras" : ", torch");
        for (int64_t rows : {1, 4}) {
          // PyTorch numerics refuse batch statistics of one row: that case runs with BatchNorm in eval mode.
          if (!(has_bn && s == BnSemantics::kTorch && rows == 1)) {
            expect_batched_equals_autograd(m, nullptr, rows, where);
            ++cases;
          }
          for (const char* name : {"eval", "freeze_affine"}) {
            const auto st = preset(name);
            if (has_bn && s == BnSemantics::kTorch && rows == 1 && std::string(name) != "eval") continue;
            expect_batched_equals_autograd(m, &st, rows, where);
            ++cases;
          }
        }
      }
  RecordProperty("cases", static_cast<int>(cases));
  EXPECT_GE(cases, 190u);
}

TEST(LayerKinds, StateMatchesTheTorchModule) {
  for (LayerKind kind : all_layer_kinds())
    for (const auto& [what, body] : variants(kind, BnSemantics::kKeras)) {
      Model m = network(body, 1);
      std::map<std::string, std::vector<int64_t>> module_state;
      for (const auto& [name, t] : state_dict(*m)) module_state[name] = t.sizes().vec();
      std::map<std::string, std::vector<int64_t>> declared;
      for (const auto& l : m->layers())
        for (const auto& t : layer_kind(l.kind).state(l))
          if (t.where == StateTensor::kCounter || !t.shape.empty()) declared[l.name + "." + t.name] = t.shape;
      EXPECT_EQ(declared, module_state) << what;
      for (const auto& l : m->layers())
        EXPECT_EQ(layer_kind(l.kind).selectable(), l.kind == LayerKind::kBatchNorm || l.kind == LayerKind::kFrozenBatchNorm ||
                                                        l.kind == LayerKind::kBatchRenorm)
            << layer_kind_name(l.kind);
    }
}

// --- optimizers -----------------------------------------------------------------------------------

std::vector<OptimizerConfig> optimizer_variants(OptimizerKind kind) {
  OptimizerConfig base;
  base.kind = kind;
  base.lr = 0.05;
  if (kind == OptimizerKind::kRmspropKeras) base.alpha = 0.9, base.eps = 1e-7;
  if (kind == OptimizerKind::kAdamW) base.weight_decay = 0.01;
  std::vector<OptimizerConfig> out{base};
  auto v = base;
  switch (kind) {
    case OptimizerKind::kSgd:
      v.momentum = 0.9;
      out.push_back(v);
      v.nesterov = true;
      v.weight_decay = 0.1;
      out.push_back(v);
      break;
    case OptimizerKind::kAdam:
    case OptimizerKind::kAdamW:
      v.weight_decay = 0.1;
      v.beta1 = 0.5;
      out.push_back(v);
      break;
    case OptimizerKind::kRmsprop:
      v.weight_decay = 0.1;
      out.push_back(v);
      v.momentum = 0.9;
      v.centered = true;
      out.push_back(v);
      break;
    case OptimizerKind::kRmspropKeras:
      v.momentum = 0.9;
      out.push_back(v);
      v.centered = true;
      out.push_back(v);
      break;
  }
  return out;
}

TEST(Optimizers, EveryKindMatchesTheTorchEngineOnTheSameGradients) {
  for (OptimizerKind kind : all_optimizer_kinds())
    for (const auto& c : optimizer_variants(kind)) {
      const auto& def = optimizer_kind(kind);
      SCOPED_TRACE(std::string(to_string(kind)) + " momentum " + fmt_double(c.momentum) + " wd " + fmt_double(c.weight_decay) +
                   (c.centered ? " centered" : ""));
      torch::manual_seed(5);
      auto p = torch::randn({11});
      std::vector<float> flat(p.data_ptr<float>(), p.data_ptr<float>() + 11);
      std::vector<std::vector<float>> slots(static_cast<size_t>(def.slots(c)), std::vector<float>(11, 0.f));
      std::vector<float*> ptrs;
      for (auto& s : slots) ptrs.push_back(s.data());
      p.requires_grad_(true);
      auto opt = def.torch(c, {p});
      for (int64_t step = 1; step <= 4; ++step) {
        const double lr = c.lr / static_cast<double>(step);  // a schedule: set_lr must reach both
        const auto g = torch::randn({11});
        opt->set_lr(lr);
        opt->zero_grad();
        p.mutable_grad() = g.clone();
        opt->step();
        def.update(c, lr, step, flat.data(), g.data_ptr<float>(), ptrs.data(), 11);
        for (int64_t k = 0; k < 11; ++k) {
          const double want = p[k].item<double>();
          EXPECT_NEAR(flat[static_cast<size_t>(k)], want, 1e-6 * std::max(1.0, std::abs(want))) << "step " << step << ", element " << k;
        }
      }
    }
}

TEST(Optimizers, RmspropEpsilonPlacementHandDerived) {
  // One step from p = 1 with g = 0.5, lr = 0.1, no momentum.
  // PyTorch (alpha 0.99, eps 1e-8): v = 0.01 * 0.25 = 0.0025, p = 1 - 0.1 * 0.5 / (0.05 + 1e-8) = 1.9999996e-7.
  // Keras (rho 0.9, eps 1e-7): v = 0.1 * 0.25 = 0.025, p = 1 - 0.1 * 0.5 / sqrt(0.0250001) = 0.68377287.
  for (auto [kind, want] : {std::pair{OptimizerKind::kRmsprop, 1.9999996e-7}, std::pair{OptimizerKind::kRmspropKeras, 0.68377287}}) {
    OptimizerConfig c;
    c.kind = kind;
    c.lr = 0.1;
    c.alpha = kind == OptimizerKind::kRmsprop ? 0.99 : 0.9;
    c.eps = kind == OptimizerKind::kRmsprop ? 1e-8 : 1e-7;
    float p = 1.f, g = 0.5f, v = 0.f;
    float* slot = &v;
    optimizer_kind(kind).update(c, c.lr, 1, &p, &g, &slot, 1);
    EXPECT_NEAR(p, want, 1e-6) << to_string(kind);
  }
}

// --- fold on every layout ---------------------------------------------------------------------------

TEST(Fold, EveryLayoutEqualsTheUnfoldedModelAtInference) {
  const auto relu = activation(Activation::kRelu);
  const auto bn = batchnorm(BnSemantics::kKeras);
  const std::vector<std::pair<std::string, std::vector<LayerSpec>>> layouts = {
      {"after a Linear", {bn, relu}},
      {"after the activation, into the next Linear", {relu, bn}},
      {"two in a row after a Linear", {bn, bn, relu}},
      {"after a Linear without bias", {dense(4, false), bn, relu}},
      {"without gamma and beta", {relu, batchnorm(BnSemantics::kKeras, false, false)}},
      {"last before the head", {relu, dense(4), relu, bn}},
  };
  for (const auto& [what, body] : layouts) {
    Model m = network(body, 8);
    Model folded = fold_batchnorm(*m);
    EXPECT_TRUE(folded->batchnorms().empty()) << what;
    m->eval();
    folded->eval();
    const auto x = torch::randn({9, 5}) * 2;
    const double diff = (m->forward(x) - folded->forward(x)).abs().max().item<double>();
    EXPECT_LT(diff, 1e-5) << what;
  }
  // On the inputs: a BatchNorm before the first Linear folds into it.
  LayerSpec head = dense(0);
  head.head = true;
  std::vector<LayerSpec> on_inputs{bn, dense(6), relu, head};
  name_layers(on_inputs);
  torch::manual_seed(2);
  Model m(sized_layers(on_inputs, 5, 3));
  {
    torch::NoGradGuard no_grad;
    m->batchnorms()[0]->running_mean.copy_(torch::randn({5}));
    m->batchnorms()[0]->running_var.copy_(torch::rand({5}) + 0.2);
    m->batchnorms()[0]->weight.copy_(torch::randn({5}));
    m->batchnorms()[0]->bias.copy_(torch::randn({5}));
  }
  Model folded = fold_batchnorm(*m);
  m->eval();
  const auto x = torch::randn({9, 5});
  EXPECT_LT((m->forward(x) - folded->forward(x)).abs().max().item<double>(), 1e-5) << "on the inputs";
  EXPECT_EQ(folded->layers().size(), 3u);
  // Between two activations there is nothing to fold into.
  Model stuck = network({relu, bn, activation(Activation::kTanh)}, 1);
  try {
    fold_batchnorm(*stuck);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("BatchNorm \"2\""), std::string::npos) << e.what();
  }
}

// --- FrozenBatchNorm1d, recalibration and explain on a layout with BatchNorm after the activation ---

TEST(Layouts, FrozenModulesRecalibrationAndExplainFollowTheList) {
  const auto c = load_config(test::source("configs/layouts/dense_relu_bn.json"));
  ExplainOptions eo;
  eo.out_dir = test::temp_dir("explain_layout") + "/run";
  eo.verbose = 0;
  std::ostringstream table, log;
  const auto j = nlohmann::json::parse(explain(c, eo, table, log));
  ASSERT_EQ(j["layers"].size(), 2u);
  EXPECT_EQ(j["layers"][0]["module"], "2") << "the BatchNorm after the first activation";
  EXPECT_EQ(j["layers"][1]["module"], "5");
  for (const auto& s : j["strategies"]) {
    const std::string name = s["name"];
    if (name == "fold") {
      EXPECT_TRUE(s["batchnorm_layers"].empty());
      continue;
    }
    ASSERT_EQ(s["batchnorm_layers"].size(), 2u) << name;
    const bool eval_like = name == "eval" || name == "frozen" || name == "recalibrate_frozen" || name == "frozen_modules";
    for (const auto& l : s["batchnorm_layers"]) {
      EXPECT_EQ(l["fit_batch_statistics"].get<bool>(), !eval_like) << name;
      EXPECT_EQ(l["kind"], name == "frozen_modules" ? "frozen_batchnorm" : "batchnorm") << name;
    }
    EXPECT_EQ(s["lag_identity_holds"].get<bool>(), eval_like) << name;
  }
  EXPECT_NE(table.str().find("| frozen_modules | 5 | running (FrozenBatchNorm1d) |"), std::string::npos) << table.str();
}

}  // namespace
