// Config parsing and validation: strictness, defaults, overrides, and every problem at once.
#include <gtest/gtest.h>

#include <string>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"

namespace {

using bnlab::InputError;
using bnlab::parse_config;

const char* kMinimal = R"({"name": "t", "strategies": ["train", "frozen"]})";

/// All problem lines of a config that must fail, joined; fails the test if it parses.
std::string problems_of(const std::string& text, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(text, "cfg.json", overrides);
  } catch (const InputError& e) {
    std::string all;
    for (const auto& p : e.problems()) all += p + "\n";
    return all;
  }
  ADD_FAILURE() << "config was accepted: " << text;
  return "";
}

/// The layer list in one line: "dense64 bn relu ... head", each token a module in order.
std::string layout(const bnlab::Config& c) {
  std::string out;
  for (const auto& l : c.model.layers) {
    if (!out.empty()) out += " ";
    switch (l.kind) {
      case bnlab::LayerKind::kDense: out += l.head ? "head" : "dense" + std::to_string(l.units) + (l.use_bias ? "" : "nobias"); break;
      case bnlab::LayerKind::kBatchNorm: out += "bn"; break;
      case bnlab::LayerKind::kFrozenBatchNorm: out += "frozen"; break;
      case bnlab::LayerKind::kActivation: out += bnlab::activation_name(l.activation); break;
      case bnlab::LayerKind::kDropout: out += "dropout"; break;
    }
  }
  return out;
}

TEST(Config, DefaultsMatchTheDocumentedReproduction) {
  const auto c = parse_config(kMinimal, "cfg.json");
  EXPECT_EQ(c.data.samples, 100000);
  EXPECT_EQ(c.data.features, 8);
  EXPECT_EQ(layout(c), "dense64 bn relu dense64 bn relu head");
  EXPECT_EQ(c.model.loss, bnlab::LossKind::kGaussianNll);
  EXPECT_EQ(c.model.batchnorm.semantics, bnlab::BnSemantics::kKeras);
  EXPECT_DOUBLE_EQ(c.model.batchnorm.eps, 1e-3);       // Keras' default
  EXPECT_DOUBLE_EQ(c.model.batchnorm.momentum, 0.01);  // Keras' 0.99 in PyTorch's convention
  EXPECT_EQ(c.finetune.batch_size, 1);
  ASSERT_EQ(c.strategies.size(), 2u);
  EXPECT_EQ(c.strategies[1].bn_mode, bnlab::BnMode::kEval);
  EXPECT_FALSE(c.strategies[1].affine_trainable);
}

TEST(Config, TorchSemanticsTakesPyTorchDefaults) {
  const auto c = parse_config(
      R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}}, "strategies": ["frozen"]})", "cfg.json");
  EXPECT_DOUBLE_EQ(c.model.batchnorm.eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.model.batchnorm.momentum, 0.1);
}

TEST(Config, SeedReproFileParses) {
  const auto c = bnlab::load_config(std::string(BNLAB_SOURCE_DIR) + "/configs/seed_repro.json");
  EXPECT_EQ(c.name, "seed_repro");
  EXPECT_EQ(c.finetune.sample, 4321);
  EXPECT_EQ(c.finetune.epochs, 10);
}

TEST(Config, UnknownKeyNamesPathAndSuggestion) {
  const auto p = problems_of(R"({"name": "t", "model": {"hiden": [4]}})");
  EXPECT_NE(p.find("cfg.json: model.hiden: unknown key; did you mean \"hidden\"?"), std::string::npos) << p;
}

TEST(Config, WrongTypeNamesPathAndValue) {
  const auto p = problems_of(R"({"name": "t", "finetune": {"epochs": "ten"}})");
  EXPECT_NE(p.find("finetune.epochs: expected an integer, got a string \"ten\""), std::string::npos) << p;
}

TEST(Config, MalformedJsonGivesLineAndColumn) {
  const auto p = problems_of("{\n  \"name\": \"t\",\n  \"seed\": ,\n}");
  EXPECT_NE(p.find("cfg.json:3:11: malformed JSON"), std::string::npos) << p;
}

TEST(Config, ReportsEveryProblemAtOnce) {
  const auto p = problems_of(
      R"({"name": "t", "model": {"batchnorm": {"momentum": 1.5, "eps": 0}},
          "pretrain": {"optimizer": {"name": "adam", "lr": -1}},
          "finetune": {"epochs": 0, "batch_size": 0, "sample": 100000}})");
  for (const char* needle : {"model.batchnorm.momentum: must be in [0, 1]", "model.batchnorm.eps: must be > 0",
                             "pretrain.optimizer.lr: must be > 0", "finetune.epochs: must be >= 1",
                             "finetune.batch_size: must be >= 1", "finetune.sample: index 100000 is beyond the data"})
    EXPECT_NE(p.find(needle), std::string::npos) << "missing \"" << needle << "\" in:\n" << p;
}

TEST(Config, UnknownPresetListsValidOnes) {
  const auto p = problems_of(R"({"name": "t", "strategies": ["frozn"]})");
  EXPECT_NE(p.find("strategies[0]: unknown preset \"frozn\"; did you mean \"frozen\"?"), std::string::npos) << p;
  EXPECT_NE(p.find("valid presets: train, "), std::string::npos) << p;
}

TEST(Config, UnknownEnumValueListsValidOnes) {
  const auto p = problems_of(R"({"name": "t", "model": {"activation": "swish", "loss": "mae"}})");
  EXPECT_NE(p.find("model.activation: unknown value \"swish\""), std::string::npos) << p;
  EXPECT_NE(p.find("valid values: relu, tanh, gelu"), std::string::npos) << p;
  EXPECT_NE(p.find("model.loss: unknown value \"mae\""), std::string::npos) << p;
}

TEST(Config, DuplicateAndEmptyStrategies) {
  EXPECT_NE(problems_of(R"({"name": "t", "strategies": ["train", "train"]})").find("duplicate strategy name \"train\""),
            std::string::npos);
  EXPECT_NE(problems_of(R"({"name": "t", "strategies": []})").find("strategies: is empty"), std::string::npos);
}

TEST(Config, TorchSemanticsRejectsTrainModeBatchNormOnOneSample) {
  const auto p = problems_of(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}},
                                  "strategies": ["train", "frozen"]})");
  EXPECT_NE(p.find("strategies[0]: strategy \"train\" runs BatchNorm in training mode on a batch of ONE sample"),
            std::string::npos) << p;
  EXPECT_NE(p.find("Expected more than 1 value per channel when training"), std::string::npos) << p;
  EXPECT_EQ(p.find("strategies[1]"), std::string::npos) << "frozen uses eval-mode BN and is fine:\n" << p;
}

TEST(Config, TorchSemanticsRejectsALastPretrainBatchOfOne) {
  const auto p = problems_of(R"({"name": "t", "data": {"samples": 257}, "pretrain": {"batch_size": 256},
                                  "model": {"batchnorm": {"semantics": "torch"}}, "strategies": ["frozen"]})");
  EXPECT_NE(p.find("pretrain.batch_size: 256 leaves a last batch of ONE sample"), std::string::npos) << p;
}

TEST(Config, LayerSelectionMustExist) {
  const auto p = problems_of(R"({"name": "t", "strategies": [{"preset": "frozen", "name": "f", "layers": [0, 5, "2"]}]})");
  EXPECT_NE(p.find("BatchNorm index 5 does not exist: the model has 2 BatchNorm layer(s)"), std::string::npos) << p;
  EXPECT_NE(p.find("no BatchNorm module is named \"2\""), std::string::npos) << p;
  // "1" and "4" are the BatchNorm modules of [Linear, BN, ReLU] x 2.
  EXPECT_NO_THROW(parse_config(R"({"name": "t", "strategies": [{"preset": "frozen", "name": "f", "layers": ["1", "4"]}]})", "c"));
}

TEST(Config, StrategyFieldsAndPresetOverrides) {
  const auto c = parse_config(R"({"name": "t", "strategies": [
      {"preset": "train", "name": "half", "momentum": 0.5, "layers": [1], "freeze_linear": 2},
      {"name": "custom", "bn_mode": "eval", "affine": "frozen", "running_stats": "freeze"}]})", "c");
  ASSERT_EQ(c.strategies.size(), 2u);
  EXPECT_EQ(c.strategies[0].preset, "train");
  EXPECT_DOUBLE_EQ(c.strategies[0].momentum.value(), 0.5);
  EXPECT_FALSE(c.strategies[0].layers.all);
  EXPECT_EQ(c.strategies[0].freeze_linear, 2);
  EXPECT_EQ(c.strategies[1].bn_mode, bnlab::BnMode::kEval);
  EXPECT_DOUBLE_EQ(c.strategies[1].momentum.value(), 0.0);
  EXPECT_NE(problems_of(R"({"name": "t", "strategies": [{"name": "x", "running_stats": "freeze", "momentum": 0.1}]})")
                .find("give either running_stats or momentum, not both"), std::string::npos);
}

TEST(Config, OverridesComeAfterTheFile) {
  const auto c = parse_config(kMinimal, "c", {"finetune.epochs=20", "model.activation=tanh", "model.hidden=[3]"});
  EXPECT_EQ(c.finetune.epochs, 20);
  EXPECT_EQ(layout(c), "dense3 bn tanh head");
  EXPECT_NE(problems_of(kMinimal, {"finetune.epoch=3"}).find("finetune.epoch: unknown key; did you mean \"epochs\"?"),
            std::string::npos);
  EXPECT_NE(problems_of(kMinimal, {"novalue"}).find("expected PATH=VALUE"), std::string::npos);
}

TEST(Config, ResolvedJsonRoundTrips) {
  const auto c = bnlab::load_config(std::string(BNLAB_SOURCE_DIR) + "/configs/seed_repro.json");
  const auto text = bnlab::to_json(c);
  const auto again = parse_config(text, "resolved");
  EXPECT_EQ(bnlab::to_json(again), text);
  EXPECT_EQ(bnlab::pretrain_cache_key(again), bnlab::pretrain_cache_key(c));
}

TEST(Config, CacheKeyIgnoresFinetuneButNotPretrain) {
  const auto a = parse_config(kMinimal, "c");
  EXPECT_EQ(bnlab::pretrain_cache_key(a), bnlab::pretrain_cache_key(parse_config(kMinimal, "c", {"finetune.epochs=3"})));
  EXPECT_NE(bnlab::pretrain_cache_key(a), bnlab::pretrain_cache_key(parse_config(kMinimal, "c", {"pretrain.epochs=3"})));
  EXPECT_NE(bnlab::pretrain_cache_key(a), bnlab::pretrain_cache_key(parse_config(kMinimal, "c", {"seed=1"})));
}

}  // namespace

namespace {

TEST(Config, EmptyStrategyNameIsRejected) {
  EXPECT_NE(problems_of(R"({"name": "t", "strategies": [{"preset": "train", "name": ""}]})").find("strategies[0].name: must not be empty"),
            std::string::npos);
}

TEST(Config, TorchRuleCountsUnselectedLayersAndBatchSizeOne) {
  // eval on layer 0 only leaves layer 1 in training mode: still a batch-of-one BatchNorm.
  auto p = problems_of(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}},
                            "strategies": [{"preset": "frozen", "name": "f", "layers": [0]}]})");
  EXPECT_NE(p.find("strategy \"f\" runs BatchNorm in training mode"), std::string::npos) << p;
  EXPECT_NO_THROW(parse_config(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}},
                                   "strategies": [{"preset": "frozen", "name": "f", "layers": [0, "4"]}]})", "c"));
  p = problems_of(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}}, "pretrain": {"batch_size": 1},
                       "strategies": ["frozen"]})");
  EXPECT_NE(p.find("pretrain.batch_size: 1 gives batches of ONE sample"), std::string::npos) << p;
}

}  // namespace
