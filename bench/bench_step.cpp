// Micro-benchmark: one single-sample fine-tuning step (forward + backward + SGD update) of the
// seed_repro model, as bnlab's engine runs it. Prints microseconds per step. Not a test.
// Usage: bench_step CONFIG [STEPS]
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include "bnlab/config.hpp"
#include "engine.hpp"

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
  for (const char* preset : {"frozen", "train"}) {
    bnlab::StrategyConfig s = bnlab::parse_config(std::string(R"({"name": "b", "strategies": [")") + preset + "\"]}", "b")
                                  .strategies.front();
    bnlab::Model m = bnlab::clone_model(*model, c);
    m->set_policy(bnlab::Policy{s, c.model.batchnorm.momentum});
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
    std::printf("step_us %s %.2f\n", preset, us);
  }
  return 0;
}
