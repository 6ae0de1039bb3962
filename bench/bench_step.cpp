// Micro-benchmark: one single-sample fine-tuning step (forward, loss read, backward, update) of
// a config's model, through each engine. Prints `step_us ENGINE PRESET LANES MICROSECONDS` lines
// (for lanes > 1: microseconds per lane-step). Not a test.
// Usage: bench_step CONFIG [STEPS]
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "batched.hpp"
#include "bnlab/config.hpp"
#include "engine.hpp"
#include "optimizers.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: bench_step CONFIG [STEPS]\n";
    return 2;
  }
  const int steps = argc > 2 ? std::atoi(argv[2]) : 5000;
  torch::set_num_threads(1);
  const auto c = bnlab::load_config(argv[1]);
  const auto data = bnlab::make_synthetic(c.data, c.model.loss, c.data.seed);
  torch::manual_seed(c.seed);
  bnlab::Model model = bnlab::build_model(c, data);
  // The Dense layers' sizes, for the roofline line: multiply-adds of one forward pass, of the
  // input gradients (every Dense layer but the lowest, the rest being trainable under train and
  // frozen), and the weights and biases an SGD step updates.
  long long macs = 0, dx_macs = 0, weights = 0, biases = 0;
  bool lowest = true;
  for (const auto& l : model->layers()) {
    if (l.kind != bnlab::LayerKind::kDense) continue;
    macs += l.in * l.out;
    if (!lowest) dx_macs += l.in * l.out;
    lowest = false;
    weights += l.in * l.out;
    if (l.use_bias) biases += l.out;
  }
  // Under train every BatchNorm normalizes one row by its own statistics and passes down an exactly
  // zero gradient, so the backward pass stops at the topmost one (set_zero_gradient_shortcut):
  // the Dense layers below it get neither input nor weight gradients, and SGD reads none of them.
  const auto& layers = model->layers();
  size_t top_bn = 0;
  for (size_t i = 0; i < layers.size(); ++i)
    if (layers[i].kind == bnlab::LayerKind::kBatchNorm) top_bn = i;
  long long skip_w = 0, skip_b = 0, skip_dx = 0;
  for (size_t i = 0, dense = 0; i < top_bn; ++i) {
    if (layers[i].kind != bnlab::LayerKind::kDense) continue;
    skip_w += layers[i].in * layers[i].out;
    if (layers[i].use_bias) skip_b += layers[i].out;
    if (dense++ > 0) skip_dx += layers[i].in * layers[i].out;
  }
  // And the epoch's paired forward passes (Net::forward_pair) do not run a fit pass that would
  // repeat a value: under train the Dense layers below that BatchNorm keep their fit outputs (their
  // parameters and x did not change), under frozen every layer's fit pass is its inference pass.
  // BatchedEngine.PairedPassesSkipExactlyWhatRepeats counts the skipped layer passes.
  std::printf("model dense_macs %lld dx_macs %lld weights %lld biases %lld train_skipped_weights %lld train_skipped_biases %lld "
              "train_skipped_dx_macs %lld train_kept_fit_macs %lld frozen_shared_fit_macs %lld\n",
              macs, dx_macs, weights, biases, skip_w, skip_b, skip_dx, skip_w, macs);
  for (const char* preset : {"frozen", "train"}) {
    bnlab::StrategyConfig s = bnlab::parse_config(std::string(R"({"name": "b", "strategies": [")") + preset + "\"]}", "b")
                                  .strategies.front();
    // The torch engine: torch::nn modules, autograd, torch::optim.
    bnlab::Model m = bnlab::clone_model(*model);
    m->set_policy(bnlab::Policy{s});
    auto opt = bnlab::make_optimizer(c.finetune.optimizer, m->parameters());
    const auto x = data.x.narrow(0, 0, 1), y = data.y.narrow(0, 0, 1);
    m->train();
    const auto step = [&] {
      opt->zero_grad();
      auto loss = bnlab::compute_loss(c.model.loss, m->forward(x), y);
      (void)loss.item<double>();  // the engine reads the loss before the update, as Keras logs it
      loss.backward();
      opt->step();
    };
    for (int i = 0; i < 200; ++i) step();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) step();
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / steps;
    std::printf("step_us torch %s 1 %.3f\n", preset, us);
    // The batched engine: one lane (a single-sample run), and 32 lanes (a study's work item).
    for (int64_t lanes : {1, 16, 32}) {
      const double lane_us = bnlab::benchmark_step(*model, s, c, data, lanes, lanes == 1 ? steps * 20 : steps) / lanes;
      std::printf("step_us batched %s %lld %.3f\n", preset, static_cast<long long>(lanes), lane_us);
    }
  }
  // The engine alone on a study's work: every preset, 1000 samples in work items of 32 lanes.
  const std::vector<std::string> presets = {"train", "freeze_affine", "momentum_zero", "freeze_affine_momentum_zero",
                                            "eval", "frozen", "recalibrate_frozen", "fold", "batch_stats"};
  double seconds = 0, prepare_seconds = 0;
  for (const auto& name : presets) {
    const auto s = bnlab::parse_config(R"({"name": "b", "strategies": [")" + name + "\"]}", "b").strategies.front();
    const auto t0 = std::chrono::steady_clock::now();
    bnlab::Model ready = bnlab::prepare_model(*model, s, c, &data);
    const auto t1 = std::chrono::steady_clock::now();
    for (int64_t first = 0; first < 1000; first += 32) {
      std::vector<int64_t> samples;
      for (int64_t i = first; i < std::min<int64_t>(first + 32, 1000); ++i) samples.push_back(i * 7);
      bnlab::finetune_batched(*model, s, c, data, samples, {}, nullptr, ready.get());
    }
    prepare_seconds += std::chrono::duration<double>(t1 - t0).count();
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  std::printf("engine_sample_epochs_per_s %.0f (preparing the nine models: %.3f s of %.3f s)\n",
              9000.0 * static_cast<double>(c.finetune.epochs) / seconds, prepare_seconds, seconds);
  return 0;
}
