// Config parsing and validation: strictness, defaults, overrides, and every problem at once.
#include <gtest/gtest.h>

#include <set>

#include <nlohmann/json.hpp>
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
      case bnlab::LayerKind::kBatchRenorm: out += "renorm"; break;
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

TEST(Config, FrameworkPresetsAreAliasesWithTheirTargetsFields) {
  const auto c = parse_config(R"({"name": "t", "strategies": ["tf1_learning_phase", "frozen", "keras2_trainable_false",
                                  "freeze_affine_momentum_zero", "lightning_freeze", "prior_bn"]})", "cfg.json");
  const auto fields = [&](size_t i) {
    auto j = nlohmann::json::parse(bnlab::to_json(c))["strategies"][i];
    j.erase("name");
    j.erase("preset");
    return j.dump();
  };
  EXPECT_EQ(fields(0), fields(1));
  EXPECT_EQ(fields(2), fields(3));
  EXPECT_EQ(bnlab::preset_alias_of("tf1_learning_phase"), "frozen");
  EXPECT_EQ(bnlab::preset_alias_of("frozen"), "");
  EXPECT_EQ(bnlab::preset_alias_of("lightning_freeze"), "");
  EXPECT_EQ(c.strategies[0].preset, "tf1_learning_phase");
  EXPECT_EQ(c.strategies[4].tracking_rule, bnlab::TrackingRule::kPython);
  EXPECT_FALSE(c.strategies[4].track_running_stats);
  ASSERT_TRUE(c.strategies[5].prior.has_value());
  EXPECT_EQ(*c.strategies[5].prior, 16.0 / 17.0);
  // The resolved config reads back to itself, prior and tracking rule included.
  EXPECT_EQ(bnlab::to_json(parse_config(bnlab::to_json(c), "resolved")), bnlab::to_json(c));
  const auto text = bnlab::to_json(c);
  EXPECT_NE(text.find("\"tracking_rule\": \"python\""), std::string::npos) << text;
  EXPECT_NE(text.find("\"prior\": 0.9411764705882"), std::string::npos) << text;
}

TEST(Config, PriorAndTrackingRuleAreChecked) {
  const auto p = problems_of(R"({"name": "t", "strategies": [
      {"preset": "prior_bn", "name": "a", "prior": 1.5},
      {"preset": "prior_bn", "name": "b", "prior": "high"},
      {"preset": "prior_bn", "name": "c", "bn_mode": "eval"},
      {"preset": "prior_bn", "name": "d", "momentum": 0.1},
      {"preset": "prior_bn", "name": "e", "fold": true},
      {"preset": "train", "name": "f", "tracking_rule": "python"},
      {"preset": "batch_stats", "name": "g", "tracking_rule": "tensorflow"},
      {"preset": "lightning_freeze", "name": "h", "running_stats": "freeze"}]})");
  for (const char* needle : {"strategies[0].prior: must be a weight p in [0, 1]", "strategies[1].prior: expected a number p in [0, 1]",
                             "strategies[2].prior: prior weights running against batch statistics",
                             "strategies[3].prior: prior_bn never updates the running statistics",
                             "strategies[4].prior: prior needs BatchNorm modules",
                             "strategies[5].tracking_rule: \"python\" says how track_running_stats false reads",
                             "strategies[6].tracking_rule: unknown value \"tensorflow\"",
                             "strategies[7].tracking_rule: under \"python\" an untracked BatchNorm never updates its buffers"})
    EXPECT_NE(p.find(needle), std::string::npos) << "missing \"" << needle << "\" in:\n" << p;
  const auto torch = problems_of(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}},
                                     "strategies": ["prior_bn", {"preset": "prior_bn", "name": "one", "prior": 1}]})");
  EXPECT_NE(torch.find("strategies[0]: strategy \"prior_bn\" (prior 0.941176"), std::string::npos) << torch;
  EXPECT_EQ(torch.find("strategies[1]"), std::string::npos) << "prior 1 is eval:\n" << torch;
}

TEST(Config, SetsReadCheckAndRoundTrip) {
  // finetune.set / finetune.sets (issue 17, part 4): runs are the sets' positions.
  const auto c = parse_config(R"({"name": "t", "finetune": {"sets": [[5, 1, 9], [2, 3, 4]], "batch_size": 2, "shuffle": false}})", "cfg.json");
  EXPECT_TRUE(c.finetune.on_sets());
  EXPECT_EQ(c.finetune.samples, (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(c.finetune.rows_of(0), (std::vector<int64_t>{5, 1, 9}));  // the set's own order, kept
  EXPECT_EQ(c.finetune.set_size(), 3);
  EXPECT_EQ(smallest_fit_batch(c.finetune), 1);  // 2 then 1
  EXPECT_EQ(fine_tuned_rows(c.finetune), (std::vector<int64_t>{1, 2, 3, 4, 5, 9}));
  EXPECT_FALSE(c.grid.front().finetune.shuffle);
  EXPECT_EQ(to_json(parse_config(to_json(c), "resolved")), to_json(c));
  const auto one = parse_config(R"({"name": "t", "finetune": {"set": [7, 8]}})", "cfg.json");
  EXPECT_EQ(one.finetune.sets, (std::vector<std::vector<int64_t>>{{7, 8}}));
  EXPECT_TRUE(one.finetune.shuffle) << "Keras' fit shuffles by default";
  // A draw resolves against the data: distinct rows within a set, the same for the same seed.
  auto drawn = parse_config(R"({"name": "t", "finetune": {"sets": {"count": 4, "size": 3, "seed": 8}}})", "cfg.json");
  auto again = drawn;
  resolve_samples(drawn, 10);
  resolve_samples(again, 10);
  ASSERT_EQ(drawn.finetune.sets.size(), 4u);
  EXPECT_EQ(drawn.finetune.sets, again.finetune.sets);
  EXPECT_EQ(drawn.grid.front().finetune.sets, drawn.finetune.sets);
  for (const auto& set : drawn.finetune.sets) EXPECT_EQ(std::set<int64_t>(set.begin(), set.end()).size(), 3u);
  EXPECT_NE(drawn.finetune.sets[0], drawn.finetune.sets[1]);
  // --set finetune.sets=... replaces the file's sample, not conflicts with it.
  const auto over = parse_config(R"({"name": "t", "finetune": {"sample": 3}})", "cfg.json", {"finetune.sets=[[1, 2]]"});
  EXPECT_EQ(over.finetune.sets.size(), 1u);
  try {
    auto big = parse_config(R"({"name": "t", "data": {"source": "csv", "path": "x.csv", "target_columns": ["y"]},
                                "finetune": {"sets": {"count": 2, "size": 30}}})", "cfg.json");
    resolve_samples(big, 20);
    ADD_FAILURE() << "a set of 30 from 20 rows was drawn";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("finetune.sets.size: cannot draw a set of 30 distinct samples from 20"), std::string::npos) << e.what();
  }
}

TEST(Config, BadSetsAreNamedWhereTheyAre) {
  const auto p = problems_of(R"({"name": "t", "data": {"samples": 100},
      "finetune": {"sets": [[1, 2, 2], [3], [4, "x", 5], [1, 2, 2], 7, [-1, 100, 6]], "batch_size": 5}})");
  for (const char* needle : {"finetune.sets[0]: lists sample 2 more than once",
                             "finetune.sets[1]: holds 1 samples, the first set 3: every set of a study has the same size",
                             "finetune.sets[2][1]: expected a whole number (a sample index), got \"x\"",
                             "finetune.sets[3]: lists the same set as an earlier one",
                             "finetune.sets[4]: expected a list of sample indices, got 7",
                             "finetune.sets[5]: a sample index must be >= 0, got -1",
                             "finetune.sets[5]: index 100 is beyond the data (100 samples: 0..99)",
                             "finetune.batch_size: 5 is more than the 3 samples of a set: use at most 3"})
    EXPECT_NE(p.find(needle), std::string::npos) << "missing \"" << needle << "\" in:\n" << p;
  for (const auto& [text, needle] : std::vector<std::pair<const char*, const char*>>{
           {R"({"name": "t", "finetune": {"sample": 1, "set": [1, 2]}})", "finetune: give either samples (each fine-tuned on its own) or sets"},
           {R"({"name": "t", "finetune": {"set": [1, 2], "sets": [[1, 2]]}})", "finetune: give either set or sets, not both"},
           {R"({"name": "t", "finetune": {"sets": {"size": 2}}})", "finetune.sets: a random draw of sets needs \"count\""},
           {R"({"name": "t", "finetune": {"set": {"size": 0}}})", "finetune.set.size: must be >= 1, got 0"},
           {R"({"name": "t", "finetune": {"sets": []}})", "finetune.sets: is empty: list at least one set"},
           {R"({"name": "t", "finetune": {"set": "all"}})", "finetune.set: expected a list of sample indices or {\"size\": k"},
           {R"({"name": "t", "finetune": {"set": [1, 2]}, "grid": {"set": [[1], [2]]}})", "grid.set: sets are not a grid setting"},
           {R"({"name": "t", "finetune": {"set": [1, 2], "shuffle": 1}})", "finetune.shuffle: expected a boolean"}})
    EXPECT_NE(problems_of(text).find(needle), std::string::npos) << "missing \"" << needle << "\" in:\n" << problems_of(text);
  // PyTorch numerics: batch statistics need no batch of one row; batches of 2 and 2 are fine.
  const std::string torch = R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}}, "strategies": ["train"], "finetune": {"set": [1, 2, 3, 4, 5], )";
  EXPECT_NE(problems_of(torch + R"("batch_size": 2}})").find("or a finetune.batch_size that leaves no batch of one row in a set of 5"),
            std::string::npos)
      << problems_of(torch + R"("batch_size": 2}})");
  EXPECT_NO_THROW(parse_config(torch + R"("batch_size": 5}})", "cfg.json"));
}

TEST(Config, RenormFieldsReadCheckAndRoundTrip) {
  const auto c = parse_config(R"({"name": "t", "strategies": ["renorm",
      {"preset": "renorm", "name": "open", "renorm_clipping": {"rmax": 2}, "renorm_momentum": 0.1, "renorm_init": "keras"}]})",
                              "cfg.json");
  ASSERT_TRUE(c.strategies[0].renorm_rmax && c.strategies[0].renorm_rmin && c.strategies[0].renorm_dmax);
  EXPECT_EQ(*c.strategies[0].renorm_rmin, 1.0 / 3.0);
  // A given renorm_clipping is the whole clipping, as in Keras: the keys it lacks clip nothing.
  EXPECT_EQ(*c.strategies[1].renorm_rmax, 2.0);
  EXPECT_FALSE(c.strategies[1].renorm_rmin.has_value());
  EXPECT_FALSE(c.strategies[1].renorm_dmax.has_value());
  EXPECT_EQ(c.strategies[1].renorm_init, "keras");
  EXPECT_EQ(bnlab::to_json(parse_config(bnlab::to_json(c), "resolved")), bnlab::to_json(c));
  // Switched off, a preset's renorm settings go with it; a preset's python rule too when tracking.
  const auto off = parse_config(R"({"name": "t", "strategies": [{"preset": "renorm", "name": "off", "renorm": false},
      {"preset": "lightning_freeze", "name": "tracked", "track_running_stats": true},
      {"preset": "renorm", "name": "none", "renorm_clipping": null}]})", "cfg.json");
  EXPECT_FALSE(off.strategies[0].renorm_rmax.has_value());
  EXPECT_EQ(off.strategies[1].tracking_rule, bnlab::TrackingRule::kLibTorch);
  EXPECT_FALSE(off.strategies[2].renorm_dmax.has_value());
  // ... and the resolved config says so, so that it reads back the same (found by the config fuzzer).
  EXPECT_EQ(bnlab::to_json(parse_config(bnlab::to_json(off), "resolved")), bnlab::to_json(off));
  const auto no_prior = parse_config(R"({"name": "t", "strategies": [{"preset": "prior_bn", "name": "x", "prior": null}]})", "cfg.json");
  EXPECT_FALSE(no_prior.strategies[0].prior.has_value());
  EXPECT_EQ(bnlab::to_json(parse_config(bnlab::to_json(no_prior), "resolved")), bnlab::to_json(no_prior));
  const auto p = problems_of(R"({"name": "t", "strategies": [
      {"preset": "renorm", "name": "a", "renorm_clipping": {"rmax": 0.5, "rmin": 2}},
      {"preset": "renorm", "name": "b", "renorm_clipping": {"dmax": -1, "rmx": 3}},
      {"preset": "renorm", "name": "c", "renorm_momentum": 2, "bn_mode": "eval"},
      {"preset": "train", "name": "d", "renorm_momentum": 0.1},
      {"preset": "renorm", "name": "e", "prior": 0.5, "renorm_init": "zeros"}]})");
  for (const char* needle : {"strategies[0].renorm_clipping: rmax 0.5 is below rmin 2",
                             "strategies[1].renorm_clipping.dmax: must be >= 0", "strategies[1].renorm_clipping.rmx: unknown key; did you mean \"rmax\"?",
                             "strategies[2].renorm_momentum: must be in [0, 1]", "strategies[2].renorm: renorm is a training-mode computation",
                             "strategies[3]: renorm_clipping, renorm_momentum and renorm_init apply only with",
                             "strategies[4].renorm: give either renorm or prior", "strategies[4].renorm_init: expected \"moving\" or \"keras\""})
    EXPECT_NE(p.find(needle), std::string::npos) << "missing \"" << needle << "\" in:\n" << p;
  const auto torch = problems_of(R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}}, "strategies": ["renorm"]})");
  EXPECT_NE(torch.find("strategies[0].renorm: renorm follows Keras 3.14"), std::string::npos) << torch;
}

TEST(Config, AKerasRenormLayerIsRefusedWithTheWayOut) {
  const std::string json = R"({"class_name": "Sequential", "config": {"name": "s", "layers": [
      {"class_name": "InputLayer", "config": {"batch_input_shape": [null, 4], "name": "in"}},
      {"class_name": "Dense", "config": {"name": "d", "units": 3, "activation": "linear", "use_bias": true}},
      {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": -1, "momentum": 0.99, "epsilon": 0.001,
                                                       "center": true, "scale": true, "renorm": true}},
      {"class_name": "Dense", "config": {"name": "head", "units": 2, "activation": "linear", "use_bias": true}}]}})";
  try {
    bnlab::keras_architecture(json, "model.h5", bnlab::BatchNormConfig{});
    FAIL() << "a renorm layer was read";
  } catch (const bnlab::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("renorm=True is not read from a file"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("the strategy \"renorm\""), std::string::npos) << e.what();
  }
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

TEST(Config, CsvReadingSettings) {
  const std::string head = R"({"name": "t", "strategies": ["train"], "data": {"source": "csv", "path": "d.csv", "target_columns": ["y"], )";
  // Defaults, written out in the resolved config, which parses back to the same.
  const auto c = parse_config(head + R"("delimiter": ";", "missing": "drop_rows"}})", "cfg.json");
  EXPECT_EQ(c.data.delimiter, ";");
  EXPECT_EQ(c.data.sample_indices(), "remaining_rows");
  const std::string text = bnlab::to_json(c);
  EXPECT_NE(text.find("\"sample_indices\": \"remaining_rows\""), std::string::npos) << text;
  EXPECT_EQ(bnlab::to_json(parse_config(text, "resolved")), text);
  const auto plain = parse_config(head + R"("delimiter": "\t"}})", "cfg.json");
  EXPECT_EQ(plain.data.delimiter, "\t");
  EXPECT_NE(bnlab::to_json(plain).find("\"missing\": \"error\""), std::string::npos);
  EXPECT_NE(bnlab::to_json(plain).find("\"sample_indices\": \"file_rows\""), std::string::npos);
  // Bad values, each named by its path.
  auto p = problems_of(head + R"("delimiter": ";;", "missing": "drop_row"}})");
  EXPECT_NE(p.find("data.delimiter: expected one character that cannot be part of a number"), std::string::npos) << p;
  EXPECT_NE(p.find("data.missing: unknown value \"drop_row\"; did you mean \"drop_rows\"?"), std::string::npos) << p;
  for (const char* del : {"\"1\"", "\".\"", "\"-\"", "\"\\\"\"", "\"\\n\"", "\"\""})
    EXPECT_NE(problems_of(head + "\"delimiter\": " + del + "}}").find("data.delimiter: expected one character"), std::string::npos) << del;
  p = problems_of(head + R"("sample_indices": "remaining_rows"}})");
  EXPECT_NE(p.find("data.sample_indices: is \"file_rows\" with data.missing \"error\", got \"remaining_rows\""), std::string::npos) << p;
  // class_labels: cross_entropy only, distinct, at least two.
  p = problems_of(head + R"("class_labels": [1, 2]}})");
  EXPECT_NE(p.find("data.class_labels: applies to model.loss cross_entropy only"), std::string::npos) << p;
  p = problems_of(head + R"("class_labels": [3, 1, 3]}, "model": {"loss": "cross_entropy"}})");
  EXPECT_NE(p.find("data.class_labels: label 3 is listed twice"), std::string::npos) << p;
  p = problems_of(head + R"("class_labels": [1.5, 2]}, "model": {"loss": "cross_entropy"}})");
  EXPECT_NE(p.find("data.class_labels"), std::string::npos) << p;
  const auto cls = parse_config(head + R"("class_labels": [5, 1]}, "model": {"loss": "cross_entropy"}})", "cfg.json");
  EXPECT_EQ(cls.data.class_labels, (std::vector<int64_t>{5, 1}));
  EXPECT_EQ(bnlab::to_json(parse_config(bnlab::to_json(cls), "resolved")), bnlab::to_json(cls));
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

// --- model.layers: the one resolved layer list ------------------------------------------------

namespace {

std::string with_layers(const std::string& layers, const std::string& rest = R"("strategies": ["train", "frozen"])") {
  return R"({"name": "t", "model": {"layers": )" + layers + "}, " + rest + "}";
}

TEST(Layers, AnyOrderAndBatchNormAnywhere) {
  // The issue's example: BatchNorm on the inputs, after the activation, after a fused Dense.
  const auto c = parse_config(with_layers(R"([{"batchnorm": {}}, {"dense": 64}, {"activation": "relu"},
      {"batchnorm": {"eps": 0.01}}, {"dropout": 0.1}, {"dense": 32, "activation": "tanh"}, {"batchnorm": {}}])"), "c");
  EXPECT_EQ(layout(c), "bn dense64 relu bn dropout dense32 tanh bn head");
  const auto& l = c.model.layers;
  for (size_t i = 0; i < l.size(); ++i) EXPECT_EQ(l[i].name, std::to_string(i)) << "Sequential positions";
  EXPECT_EQ(l[0].bn_index, 0);
  EXPECT_EQ(l[3].bn_index, 1);
  EXPECT_EQ(l[7].bn_index, 2);
  EXPECT_DOUBLE_EQ(l[3].eps, 0.01);
  EXPECT_DOUBLE_EQ(l[0].eps, 1e-3);  // model.batchnorm's (Keras) default
  EXPECT_TRUE(l[6].fused);
  EXPECT_FALSE(l[2].fused);
  EXPECT_TRUE(l[8].head);
}

TEST(Layers, ShorthandExpandsIntoTheSameList) {
  const auto a = parse_config(R"({"name": "t", "model": {"hidden": [7, 5], "activation": "gelu", "dropout": 0.25}})", "c");
  const auto b = parse_config(with_layers(R"([{"dense": 7}, {"batchnorm": {}}, {"activation": "gelu"}, {"dropout": 0.25},
                                              {"dense": 5}, {"batchnorm": {}}, {"activation": "gelu"}, {"dropout": 0.25}])",
                                          R"("strategies": ["train", "frozen"])"),
                              "c");
  EXPECT_EQ(layout(a), "dense7 bn gelu dropout dense5 bn gelu dropout head");
  EXPECT_EQ(bnlab::to_json(a), bnlab::to_json(b));
  EXPECT_EQ(bnlab::pretrain_cache_key(a), bnlab::pretrain_cache_key(b)) << "the same network, the same cache";
  EXPECT_EQ(layout(parse_config(R"({"name": "t", "model": {"batchnorm": {"enabled": false}, "hidden": [3]}})", "c")),
            "dense3 relu head");
}

TEST(Layers, ResolvedListRoundTrips) {
  for (const char* name : {"bn_on_inputs", "bn_some_layers", "fused_dense_bn", "three_widths", "dropout_between", "torch_numerics"}) {
    const auto c = bnlab::load_config(std::string(BNLAB_SOURCE_DIR) + "/configs/layouts/" + name + ".json");
    const auto text = bnlab::to_json(c);
    EXPECT_EQ(bnlab::to_json(parse_config(text, "resolved")), text) << name;
  }
}

TEST(Layers, OptionsOfEachKind) {
  const auto c = parse_config(with_layers(R"([{"dense": 4, "use_bias": false}, {"batchnorm": {"center": false, "momentum": 0.2}},
      {"activation": "leaky_relu", "negative_slope": 0.05}, {"activation": "elu"}, {"dense": 3, "activation": "linear"},
      {"batchnorm": {"affine": false}}])"), "c");
  const auto& l = c.model.layers;
  EXPECT_EQ(layout(c), "dense4nobias bn leaky_relu elu dense3 bn head") << "a fused linear activation adds no module";
  EXPECT_FALSE(l[1].center);
  EXPECT_TRUE(l[1].scale);
  EXPECT_DOUBLE_EQ(l[1].momentum, 0.2);
  EXPECT_DOUBLE_EQ(l[2].alpha, 0.05);
  EXPECT_DOUBLE_EQ(l[3].alpha, 1.0);  // ELU's alpha: 1 in Keras and in PyTorch
  EXPECT_FALSE(l[5].center || l[5].scale);
}

TEST(Layers, BadListsNameTheElement) {
  const auto p = problems_of(with_layers(R"([{"dens": 4}, {"dense": 0}, {"dense": 3, "batchnorm": {}}, {"dropout": 1.0},
      {"activation": "leaky_relu"}, {"batchnorm": {"eps": 0, "epss": 1}}, {"batchnorm": {"affine": true, "center": false}},
      {"activation": "relu", "alpha": 2}, 7])"));
  for (const char* needle :
       {"model.layers[0]: names no layer kind; did you mean \"dense\"?", "model.layers[1].dense: the number of units must be >= 1, got 0",
        "model.layers[2]: names 2 layer kinds (dense, batchnorm); give one layer per element",
        "model.layers[3].dropout: must be in [0, 1), got 1", "model.layers[4].activation: leaky_relu needs its \"negative_slope\"",
        "model.layers[5].batchnorm.eps: must be > 0, got 0", "model.layers[5].batchnorm.epss: unknown key; did you mean \"eps\"?",
        "model.layers[6].batchnorm: give either affine or center/scale, not both", "model.layers[7].alpha: unknown key",
        "model.layers[8]: expected a layer object such as {\"dense\": 64}, got an integer 7"})
    EXPECT_NE(p.find(needle), std::string::npos) << needle << "\n" << p;
  const auto both = problems_of(R"({"name": "t", "model": {"hidden": [3], "layers": [], "batchnorm": {"enabled": true}}})");
  EXPECT_NE(both.find("model.hidden: give either model.layers or the shorthand"), std::string::npos) << both;
  EXPECT_NE(both.find("model.batchnorm.enabled: with model.layers, BatchNorm layers are listed where they stand"), std::string::npos) << both;
}

TEST(Layers, StrategiesSelectByTheListsNamesAndIndices) {
  const std::string net = R"([{"dense": 4}, {"activation": "relu"}, {"batchnorm": {}}, {"dense": 4}, {"batchnorm": {}}])";
  EXPECT_NO_THROW(parse_config(with_layers(net, R"("strategies": [{"preset": "frozen", "name": "f", "layers": ["2", 1]}])"), "c"));
  const auto p = problems_of(with_layers(net, R"("strategies": [{"preset": "frozen", "name": "f", "layers": ["1", 2]},
                                                               {"preset": "train", "name": "g", "freeze_linear": 4}])"));
  EXPECT_NE(p.find("no BatchNorm module is named \"1\"; did you mean \"2\"?; BatchNorm modules: 2, 4"), std::string::npos) << p;
  EXPECT_NE(p.find("BatchNorm index 2 does not exist: the model has 2 BatchNorm layer(s), indices 0..1"), std::string::npos) << p;
  EXPECT_NE(p.find("strategies[1].freeze_linear: must be in [0, 3]"), std::string::npos) << p;
}

TEST(Layers, FoldNeedsALinearBesideEachBatchNorm) {
  // BatchNorm between two activations: nothing linear to fold it into.
  const auto p = problems_of(with_layers(R"([{"dense": 4}, {"activation": "relu"}, {"batchnorm": {}}, {"activation": "tanh"}])",
                                         R"("strategies": ["fold"])"));
  EXPECT_NE(p.find("strategies[0].fold: BatchNorm \"2\" (after an activation) has no Linear directly before or after it"),
            std::string::npos) << p;
  EXPECT_NE(problems_of(with_layers(R"([{"dense": 4}, {"dropout": 0.5}, {"batchnorm": {}}, {"dropout": 0.5}])", R"("strategies": ["fold"])"))
                .find("cannot be folded through"),
            std::string::npos);
  // On the inputs, after an activation, consecutive and last before the head: each has a Linear.
  const auto c = parse_config(with_layers(R"([{"batchnorm": {}}, {"dense": 4}, {"batchnorm": {}}, {"batchnorm": {}},
                                              {"activation": "relu"}, {"batchnorm": {}}])", R"("strategies": ["fold"])"), "c");
  std::string error;
  const auto plan = bnlab::fold_plan(c.model.layers, &error);
  EXPECT_EQ(error, "");
  ASSERT_EQ(plan.size(), 4u);
  // Into the Linear before first, in order; then into the Linear after, nearest first.
  EXPECT_EQ(plan[0].bn, 2u);
  EXPECT_EQ(plan[1].bn, 3u);
  EXPECT_EQ(plan[2].bn, 5u);
  EXPECT_EQ(plan[3].bn, 0u);
  EXPECT_FALSE(plan[0].into_next);
  EXPECT_EQ(plan[2].linear, 6u) << "the BatchNorm last before the head folds into the head";
  EXPECT_TRUE(plan[2].into_next && plan[3].into_next);
  const auto folded = bnlab::prepared_layers(c.model.layers, c.strategies[0]);
  std::string kinds;
  for (const auto& l : folded) kinds += std::string(bnlab::layer_kind_name(l.kind)) + l.name + " ";
  EXPECT_EQ(kinds, "dense0 activation1 dense2 ");
}

TEST(Layers, OneResolutionOfEachStrategyPerLayer) {
  const auto c = parse_config(with_layers(R"([{"dense": 4}, {"batchnorm": {"momentum": 0.3}}, {"activation": "relu"},
                                              {"dense": 4}, {"batchnorm": {}}])",
                                          R"("strategies": ["train", "frozen", "momentum_zero", "batch_stats",
                                              {"preset": "eval", "name": "second", "layers": [1], "freeze_linear": 1}])"),
                              "c");
  const auto modes = [&](size_t s) { return bnlab::resolve_modes(c.model.layers, &c.strategies[s]); };
  auto m = modes(0);  // train: batch statistics, updates, its own momentum
  EXPECT_TRUE(m[1].fit_batch_stats && m[1].counts && m[1].trainable && !m[1].infer_batch_stats);
  EXPECT_DOUBLE_EQ(m[1].momentum, 0.3);
  EXPECT_DOUBLE_EQ(m[4].momentum, 0.01);
  m = modes(1);  // frozen
  EXPECT_TRUE(!m[1].fit_batch_stats && !m[1].counts && !m[1].trainable && m[1].eval_mode);
  EXPECT_TRUE(m[0].trainable && m[3].trainable && m[5].trainable);
  m = modes(2);
  EXPECT_DOUBLE_EQ(m[1].momentum, 0.0);
  m = modes(3);  // batch_stats: batch statistics in inference too
  EXPECT_TRUE(m[4].fit_batch_stats && m[4].infer_batch_stats);
  m = modes(4);  // eval on the second BatchNorm only, first Linear frozen
  EXPECT_TRUE(m[1].fit_batch_stats && !m[1].selected);
  EXPECT_TRUE(!m[4].fit_batch_stats && m[4].selected && m[4].trainable);
  EXPECT_FALSE(m[0].trainable);
  EXPECT_TRUE(m[3].trainable);
  EXPECT_TRUE(bnlab::uses_batch_stats_in_fit(c.model.layers, c.strategies[4]));
  EXPECT_FALSE(bnlab::uses_batch_stats_in_fit(c.model.layers, c.strategies[1]));
}

TEST(Layers, TorchBatchOfOneRuleReadsTheResolution) {
  const std::string net = R"([{"batchnorm": {}}, {"dense": 4}, {"activation": "relu"}, {"batchnorm": {}}])";
  const auto torch_cfg = [&](const std::string& strategies) {
    return R"({"name": "t", "model": {"batchnorm": {"semantics": "torch"}, "layers": )" + net + "}, " + strategies + "}";
  };
  EXPECT_NO_THROW(parse_config(torch_cfg(R"("strategies": ["eval", "frozen", "fold", {"preset": "frozen", "name": "m", "bn_module": "frozen"}])"), "c"));
  const auto p = problems_of(torch_cfg(R"("strategies": [{"preset": "frozen", "name": "half", "layers": ["3"], "bn_module": "frozen"}])"));
  EXPECT_NE(p.find("strategy \"half\" runs BatchNorm in training mode on a batch of ONE sample"), std::string::npos) << p;
}

TEST(Optimizers, EachFrameworksRmspropWithItsOwnKeysAndDefaults) {
  const auto c = parse_config(R"({"name": "t", "finetune": {"optimizer": {"name": "rmsprop_keras", "lr": 0.01}},
                                  "pretrain": {"optimizer": {"name": "rmsprop", "centered": true}}})", "c");
  EXPECT_DOUBLE_EQ(c.finetune.optimizer.alpha, 0.9);  // Keras' rho
  EXPECT_DOUBLE_EQ(c.finetune.optimizer.eps, 1e-7);
  EXPECT_DOUBLE_EQ(c.pretrain.optimizer.alpha, 0.99);  // PyTorch's alpha
  EXPECT_DOUBLE_EQ(c.pretrain.optimizer.eps, 1e-8);
  EXPECT_TRUE(c.pretrain.optimizer.centered);
  const auto p = problems_of(R"({"name": "t", "finetune": {"optimizer": {"name": "rmsprop_keras", "alpha": 0.9, "weight_decay": 0.1}},
                                 "pretrain": {"optimizer": {"name": "rmsprop", "rho": 0.9, "beta1": 0.5}}})");
  for (const char* needle : {"finetune.optimizer.alpha: unknown key", "finetune.optimizer.weight_decay: unknown key",
                             "pretrain.optimizer.rho: unknown key", "pretrain.optimizer.beta1: unknown key"})
    EXPECT_NE(p.find(needle), std::string::npos) << needle << "\n" << p;
  EXPECT_NE(problems_of(R"({"name": "t", "finetune": {"optimizer": {"name": "rmsprop_keras", "rho": 1.0}}})")
                .find("finetune.optimizer.rho: must be in [0, 1), got 1"),
            std::string::npos);
}

}  // namespace

// --- Keras model configs -----------------------------------------------------------------------

namespace {

std::string keras_layout(const bnlab::KerasArchitecture& a) {
  std::string out;
  for (const auto& l : a.layers) {
    if (!out.empty()) out += " ";
    switch (l.kind) {
      case bnlab::LayerKind::kDense: out += (l.head ? "head" : "dense") + std::to_string(l.units); break;
      case bnlab::LayerKind::kBatchNorm: out += "bn"; break;
      case bnlab::LayerKind::kFrozenBatchNorm: out += "frozen"; break;
      case bnlab::LayerKind::kBatchRenorm: out += "renorm"; break;
      case bnlab::LayerKind::kActivation: out += bnlab::activation_name(l.activation); break;
      case bnlab::LayerKind::kDropout: out += "dropout"; break;
    }
  }
  return out;
}

std::string keras_problem(const std::string& text) {
  try {
    bnlab::keras_architecture(text, "m.h5", {});
  } catch (const InputError& e) {
    return e.what();
  }
  ADD_FAILURE() << "accepted: " << text;
  return "";
}

TEST(KerasConfig, Keras2SequentialWithFusedActivationAndBatchNormAfterIt) {
  const auto a = bnlab::keras_architecture(R"({"class_name": "Sequential", "config": {"name": "s", "layers": [
      {"class_name": "InputLayer", "config": {"batch_input_shape": [null, 6], "name": "dense_input"}},
      {"class_name": "Dense", "config": {"name": "dense", "units": 16, "activation": "relu", "use_bias": true}},
      {"class_name": "BatchNormalization", "config": {"name": "batch_normalization", "axis": [1], "momentum": 0.9,
                                                     "epsilon": 0.01, "center": false, "scale": true, "trainable": false}},
      {"class_name": "LeakyReLU", "config": {"name": "leaky_re_lu", "alpha": 0.1}},
      {"class_name": "Dropout", "config": {"name": "dropout", "rate": 0.25}},
      {"class_name": "Dense", "config": {"name": "dense_1", "units": 1, "activation": "linear", "use_bias": false}}]}})",
                                           "m.h5", {});
  EXPECT_EQ(keras_layout(a), "dense16 relu bn leaky_relu dropout head1");
  EXPECT_EQ(a.inputs, 6);
  const auto& bn = a.layers[2];
  EXPECT_NEAR(bn.momentum, 0.1, 1e-12) << "Keras' 0.9 is PyTorch's 0.1";
  EXPECT_DOUBLE_EQ(bn.eps, 0.01);
  EXPECT_FALSE(bn.center);
  EXPECT_TRUE(bn.scale);
  EXPECT_TRUE(a.layers[1].fused);
  EXPECT_DOUBLE_EQ(a.layers[3].alpha, 0.1);
  EXPECT_FALSE(a.layers[5].use_bias);
  EXPECT_EQ(a.keras_name[1], "dense") << "the fused activation belongs to its Dense";
  EXPECT_FALSE(a.trainable[2]);
  EXPECT_EQ(a.weights_key[2], "batch_normalization");
  EXPECT_EQ(a.layers[5].name, "5");
}

TEST(KerasConfig, Keras3FunctionalChainAndWeightKeysInLayerOrder) {
  std::string layers = R"({"class_name": "InputLayer", "config": {"batch_shape": [null, 3], "name": "in"}, "name": "in", "inbound_nodes": []})";
  std::string prev = "in";
  for (int i = 0; i < 11; ++i) {
    const std::string name = "d" + std::to_string(i);
    layers += R"(, {"class_name": "Dense", "config": {"name": ")" + name + R"(", "units": )" + std::to_string(i == 10 ? 1 : 4) +
              R"(, "activation": ")" + (i == 10 ? "linear" : "tanh") + R"("}, "name": ")" + name +
              R"(", "inbound_nodes": [{"args": [{"class_name": "__keras_tensor__", "config": {"keras_history": [")" + prev +
              R"(", 0, 0]}}], "kwargs": {}}]})";
    prev = name;
  }
  const auto a = bnlab::keras_architecture(R"({"module": "keras", "class_name": "Functional", "config": {"layers": [)" + layers + "]}}",
                                           "m.keras", {});
  EXPECT_EQ(a.layers.size(), 21u);
  EXPECT_EQ(a.inputs, 3);
  EXPECT_EQ(a.weights_key.back(), "dense_10") << "Keras 3 names weight groups by class and counter";
  EXPECT_EQ(a.weights_key[2], "dense_1");
  EXPECT_TRUE(a.layers.back().head);
}

TEST(KerasConfig, WhatBnlabCannotBuildIsNamed) {
  EXPECT_NE(keras_problem(R"({"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", "config": {"name": "d", "units": 3}},
      {"class_name": "LayerNormalization", "config": {"name": "layer_normalization"}}, {"class_name": "Dense", "config": {"name": "o", "units": 1}}]}})")
                .find("m.h5: layer \"layer_normalization\" (LayerNormalization): bnlab builds Dense, BatchNormalization"),
            std::string::npos);
  EXPECT_NE(keras_problem(R"({"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", "config": {"name": "d", "units": 3}},
      {"class_name": "BatchNormalization", "config": {"name": "bn", "axis": 0}}, {"class_name": "Dense", "config": {"name": "o", "units": 1}}]}})")
                .find("layer \"bn\" (BatchNormalization): axis 0 is not the feature axis"),
            std::string::npos);
  EXPECT_NE(keras_problem(R"({"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", "config": {"name": "o", "units": 1}},
      {"class_name": "Activation", "config": {"name": "a", "activation": "sigmoid"}}]}})")
                .find("the model ends in layer \"a\", after its last Dense \"o\""),
            std::string::npos);
  const std::string t = R"({"class_name": "__keras_tensor__", "config": {"keras_history": ["in", 0, 0]}})";
  EXPECT_NE(keras_problem(R"({"class_name": "Functional", "config": {"layers": [
      {"class_name": "InputLayer", "config": {"batch_shape": [null, 3]}, "name": "in", "inbound_nodes": []},
      {"class_name": "Dense", "config": {"name": "a", "units": 2}, "name": "a", "inbound_nodes": [{"args": [)" + t + R"(]}]},
      {"class_name": "Dense", "config": {"name": "b", "units": 2}, "name": "b", "inbound_nodes": [{"args": [)" + t + R"(]}]}]}})")
                .find("layer \"in\" feeds 2 layers (a, b): the model branches"),
            std::string::npos);
  EXPECT_NE(keras_problem(R"({"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense", "config": {"name": "d", "units": 3, "activation": "mish"}},
      {"class_name": "Dense", "config": {"name": "o", "units": 1}}]}})")
                .find("layer \"d\" (Dense): activation \"mish\" is not one bnlab has"),
            std::string::npos);
}

}  // namespace

namespace {
TEST(Config, HeadWithoutBiasSurvivesTheResolvedConfig) {
  // A file whose last Linear has no bias (PyTorch's bias=False) must come back the same from
  // config.resolved.json, or export and reruns would build a head with a bias.
  const auto c = bnlab::parse_config(R"({"name": "h", "model": {"hidden": [4], "head_bias": false}})", "h");
  ASSERT_FALSE(c.model.layers.back().use_bias);
  const std::string text = bnlab::to_json(c);
  EXPECT_NE(text.find("\"head_bias\": false"), std::string::npos);
  EXPECT_FALSE(bnlab::parse_config(text, "resolved").model.layers.back().use_bias);
  EXPECT_EQ(bnlab::to_json(bnlab::parse_config(text, "resolved")), text);
  // The default stays out of the resolved text (earlier runs keep their cache keys).
  EXPECT_EQ(bnlab::to_json(bnlab::parse_config(R"({"name": "h"})", "h")).find("head_bias"), std::string::npos);
}

TEST(Config, InitTorchDefaultsToPyTorchNumerics) {
  const auto c = bnlab::parse_config(R"({"name": "t", "init": {"torch": "sd.pt", "prefix": "module."}})", "t");
  EXPECT_EQ(c.model.batchnorm.semantics, bnlab::BnSemantics::kTorch);
  EXPECT_EQ(c.model.batchnorm.eps, 1e-5);
  EXPECT_EQ(c.init_prefix, "module.");
  try {
    bnlab::parse_config(R"({"name": "t", "init": {"prefix": "module."}})", "t");
    ADD_FAILURE() << "init.prefix without init.torch accepted";
  } catch (const bnlab::InputError& e) {
    EXPECT_NE(std::string(e.what()).find("init.prefix: applies to a PyTorch checkpoint; give init.torch too"), std::string::npos) << e.what();
  }
}
}  // namespace
