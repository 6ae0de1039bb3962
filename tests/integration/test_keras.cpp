// Keras interop: both weights layouts reproduce Keras numerics (computed independently with
// numpy by tests/keras/make_fixtures.py), export round-trips bit for bit, mismatches are clear.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "engine.hpp"
#include "keras_io.hpp"
#include "support.hpp"
#include "torch_support.hpp"
#include "text.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

Config fixture_config(const std::string& weights, const std::string& hidden = "[5, 3]") {
  const std::string text = R"({"name": "keras_fixture", "init": {"keras_h5": ")" + source("tests/keras/fixtures/" + weights) +
                           R"("}, "data": {"source": "csv", "path": ")" + source("tests/keras/fixtures/data.csv") +
                           R"(", "target_columns": ["y"], "standardize": false},
      "model": {"hidden": )" + hidden + R"(, "activation": "relu", "loss": "mse",
                "batchnorm": {"semantics": "keras", "eps": 0.001, "momentum": 0.01}},
      "pretrain": {"batch_size": 4},
      "finetune": {"sample": 0, "epochs": 3, "batch_size": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
      "strategies": ["train", "frozen"]})";
  return parse_config(text, "keras_fixture.json", {}, ".", model_file_readers());
}

RunResult run_quiet(const Config& c, const std::string& dir) {
  RunOptions o;
  o.out_dir = dir;
  o.verbose = 0;
  o.plots = false;
  std::ostringstream log;
  return run(c, o, log);
}

TEST(Keras, BothLayoutsReproduceKerasNumerics) {
  const auto expected = nlohmann::json::parse(read_file(source("tests/keras/fixtures/expected.json")));
  for (const char* file : {"keras2.h5", "keras2_model_save.h5", "keras3.weights.h5"}) {
    SCOPED_TRACE(file);
    const auto r = run_quiet(fixture_config(file), temp_dir("keras") + "/run");
    ASSERT_EQ(r.runs.size(), 2u);
    for (const auto& run : r.runs) {
      const auto& e = expected[run.name];
      EXPECT_NEAR(run.evaluate_before, expected["evaluate_before"].get<double>(), 1e-5);
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_NEAR(run.loss[k], e["loss"][k].get<double>(), 1e-5) << run.name << " loss epoch " << k + 1;
        EXPECT_NEAR(run.val_loss[k], e["val_loss"][k].get<double>(), 1e-5) << run.name << " val_loss epoch " << k + 1;
      }
    }
  }
}

TEST(Keras, ExportRoundTripsBitForBit) {
  const auto dir = temp_dir("export") + "/run";
  const auto c = fixture_config("keras3.weights.h5");
  run_quiet(c, dir);
  for (const auto& s : c.strategies) {
    SCOPED_TRACE(s.name);
    const std::string h5 = dir + "/" + s.name + ".h5", pt = dir + "/" + s.name + "_export.pt";
    export_weights(dir, s.name, "keras-h5", h5);
    export_weights(dir, s.name, "torch", pt);
    const auto bytes = read_file(finetuned_path(dir, s.name));
    const auto tuned = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
    Model back = strategy_architecture(c, s, 4, 1);
    import_keras_h5(h5, *back);
    const auto pt_bytes = read_file(pt);
    const auto exported = torch::pickle_load(std::vector<char>(pt_bytes.begin(), pt_bytes.end())).toGenericDict();
    for (const auto& [name, t] : state_dict(*back)) {
      if (name.find("num_batches_tracked") != std::string::npos) continue;  // Keras has no counter
      EXPECT_TRUE(torch::equal(t, tuned.at(name).toTensor())) << "keras-h5 round trip changed " << name;
      EXPECT_TRUE(torch::equal(exported.at(name).toTensor(), tuned.at(name).toTensor())) << "torch export changed " << name;
    }
  }
  EXPECT_THROW(export_weights(dir, "frozn", "torch", dir + "/x.pt"), InputError);
  EXPECT_THROW(export_weights(dir, "frozen", "onnx", dir + "/x.pt"), InputError);
}

TEST(Keras, MismatchesNameLayerDatasetAndShapes) {
  Model wrong = test::shorthand_model({5, 4}, 4, 1);
  try {
    import_keras_h5(source("tests/keras/fixtures/keras2.h5"), *wrong);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("layer \"dense_1\", dataset \"dense_1/dense_1/kernel:0\" has shape [5, 3] but the model's layer 3 weight (Keras kernel [in, out]) needs [5, 4]"),
              std::string::npos) << e.what();
  }
  Model fewer = test::shorthand_model({5}, 4, 1);
  try {
    import_keras_h5(source("tests/keras/fixtures/keras3.weights.h5"), *fewer);
    FAIL() << "expected InputError";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("the file has 3 Dense and 2 BatchNormalization layers with weights; the model has 2 Linear and 1 BatchNorm"),
              std::string::npos) << e.what();
  }
  EXPECT_THROW(import_keras_h5(source("tests/keras/fixtures/data.csv"), *fewer), InputError);
}

}  // namespace
