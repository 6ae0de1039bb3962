// Model pieces: names and shapes, BatchNorm numerics in both conventions, losses, policy.
// Golden values are derived by hand in the comments, or come from LibTorch's own
// torch::nn::BatchNorm1d, an implementation independent of bnlab's.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "bnlab/config.hpp"
#include "nn.hpp"
#include "optimizers.hpp"
#include "torch_support.hpp"

namespace {

using namespace bnlab;

void expect_bitwise_equal(const torch::Tensor& got, const torch::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  const auto g = got.contiguous().view(-1), w = want.contiguous().view(-1);
  for (int64_t i = 0; i < g.numel(); ++i)
    ASSERT_EQ(g[i].item<double>(), w[i].item<double>()) << what << " differs at index " << i;
}

void expect_close(const torch::Tensor& got, const std::vector<double>& want, double tol, const std::string& what) {
  const auto g = got.contiguous().view(-1);
  ASSERT_EQ(g.numel(), static_cast<int64_t>(want.size())) << what;
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(g[static_cast<int64_t>(i)].item<double>(), want[i], tol) << what << "[" << i << "]";
}

Model small_model(BnSemantics s = BnSemantics::kKeras) { return test::shorthand_model({5, 3}, 4, 2, s); }

TEST(Model, NamesAndShapesFollowPythonSequential) {
  // torch.nn.Sequential(Linear(4,5), BatchNorm1d(5), ReLU(), Linear(5,3), BatchNorm1d(3), ReLU(), Linear(3,2))
  Model m = small_model();
  std::vector<std::pair<std::string, std::vector<int64_t>>> want = {
      {"0.weight", {5, 4}}, {"0.bias", {5}}, {"1.weight", {5}}, {"1.bias", {5}}, {"3.weight", {3, 5}},
      {"3.bias", {3}}, {"4.weight", {3}}, {"4.bias", {3}}, {"6.weight", {2, 3}}, {"6.bias", {2}},
      {"1.running_mean", {5}}, {"1.running_var", {5}}, {"1.num_batches_tracked", {}},
      {"4.running_mean", {3}}, {"4.running_var", {3}}, {"4.num_batches_tracked", {}}};
  const auto got = state_dict(*m);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].first, want[i].first);
    EXPECT_EQ(got[i].second.sizes().vec(), want[i].second) << want[i].first;
  }
  EXPECT_EQ(m->forward(torch::randn({7, 4})).sizes().vec(), (std::vector<int64_t>{7, 2}));
}

TEST(Model, DropoutTakesAnIndexAsInSequential) {
  Model m = test::shorthand_model({3}, 2, 1, BnSemantics::kKeras, 0.2);
  // Linear, BatchNorm, ReLU, Dropout, Linear -> the head is "4".
  EXPECT_EQ(m->layers().back().name, "4");
  ASSERT_EQ(m->batchnorm_specs().size(), 1u);
  EXPECT_EQ(m->batchnorm_specs()[0].name, "1");
}

TEST(BatchNorm, TorchSemanticsIsLibTorchBatchNorm1dBitForBit) {
  torch::manual_seed(1);
  BatchNorm ours(BatchNormOptions(6).eps(1e-5).momentum(0.1).semantics(BnSemantics::kTorch));
  torch::nn::BatchNorm1d ref(torch::nn::BatchNormOptions(6).eps(1e-5).momentum(0.1));
  {
    torch::NoGradGuard g;
    auto w = torch::randn({6}), b = torch::randn({6});
    ours->weight.copy_(w), ref->weight.copy_(w), ours->bias.copy_(b), ref->bias.copy_(b);
  }
  for (int step = 0; step < 3; ++step) {
    const auto x = torch::randn({4, 6}) * 3 + 1;
    expect_bitwise_equal(ours->forward(x), ref->forward(x), "train output");
  }
  expect_bitwise_equal(ours->running_mean, ref->running_mean, "running_mean");
  expect_bitwise_equal(ours->running_var, ref->running_var, "running_var");
  expect_bitwise_equal(ours->num_batches_tracked, ref->num_batches_tracked, "num_batches_tracked");
  ours->eval(), ref->eval();
  const auto x = torch::randn({3, 6});
  expect_bitwise_equal(ours->forward(x), ref->forward(x), "eval output");
}

TEST(BatchNorm, TorchSemanticsRefusesABatchOfOneInTraining) {
  BatchNorm bn(BatchNormOptions(3).semantics(BnSemantics::kTorch));
  EXPECT_THROW(bn->forward(torch::ones({1, 3})), c10::Error);
  bn->eval();
  EXPECT_NO_THROW(bn->forward(torch::ones({1, 3})));
}

TEST(BatchNorm, KerasSemanticsHandDerived) {
  // x = [[1, 2], [3, 6]]: mean [2, 4], biased var [1, 4], eps 1e-3, gamma [2, 1], beta [0.5, -1].
  // out = (x - mean) / sqrt(var + eps) * gamma + beta
  //   col 0: -+1/sqrt(1.001)*2 + 0.5 = 0.5 -+ 1.999000999...
  //   col 1: -+2/sqrt(4.001)*1 - 1   = -1 -+ 0.999875023...
  // running (momentum 0.01, PyTorch convention) from mean 0 / var 1:
  //   mean = 0 - (0 - [2, 4]) * 0.01 = [0.02, 0.04]; var = 1 - (1 - [1, 4]) * 0.01 = [1, 1.03] (biased!)
  BatchNorm bn(BatchNormOptions(2).eps(1e-3).momentum(0.01).semantics(BnSemantics::kKeras));
  {
    torch::NoGradGuard g;
    bn->weight.copy_(torch::tensor({2.f, 1.f}));
    bn->bias.copy_(torch::tensor({0.5f, -1.f}));
  }
  const auto out = bn->forward(torch::tensor({{1.f, 2.f}, {3.f, 6.f}}));
  const double a = 2 / std::sqrt(1.001), b = 2 / std::sqrt(4.001);
  expect_close(out, {0.5 - a, -1 - b, 0.5 + a, -1 + b}, 1e-6, "keras train output");
  expect_close(bn->running_mean, {0.02, 0.04}, 1e-7, "running_mean");
  expect_close(bn->running_var, {1.0, 1.03}, 1e-6, "running_var (biased)");
  EXPECT_EQ(bn->num_batches_tracked.item<int64_t>(), 1);
}

TEST(BatchNorm, KerasSemanticsBatchOfOneOutputsBetaExactly) {
  BatchNorm bn(BatchNormOptions(4).eps(1e-3).momentum(0.01).semantics(BnSemantics::kKeras));
  const auto beta = torch::tensor({0.25f, -2.f, 3.5f, 0.f});
  {
    torch::NoGradGuard g;
    bn->bias.copy_(beta);
    bn->weight.copy_(torch::tensor({3.f, -1.f, 0.5f, 7.f}));
  }
  const auto out = bn->forward(torch::tensor({{10.f, -4.f, 0.3f, 123.f}}));
  expect_bitwise_equal(out.view(-1), beta, "output of a batch of one");
  // The batch variance is 0, so the running variance decays toward 0 and stays finite:
  // 1 - (1 - 0) * 0.01 = 0.99; the running mean moves 1% toward the sample.
  expect_close(bn->running_var, {0.99, 0.99, 0.99, 0.99}, 1e-7, "running_var");
  expect_close(bn->running_mean, {0.1, -0.04, 0.003, 1.23}, 1e-6, "running_mean");
  // The gradient reaches beta (1 per unit) and nothing upstream: the input was erased.
  auto x = torch::tensor({{1.f, 2.f, 3.f, 4.f}}, torch::requires_grad());
  bn->forward(x).sum().backward();
  expect_close(x.grad(), {0, 0, 0, 0}, 0, "input gradient");
  expect_close(bn->bias.grad(), {1, 1, 1, 1}, 0, "beta gradient");
}

TEST(BatchNorm, InferenceIsTheSameFormulaInBothConventions) {
  torch::manual_seed(2);
  BatchNorm k(BatchNormOptions(3).eps(1e-3).semantics(BnSemantics::kKeras));
  BatchNorm t(BatchNormOptions(3).eps(1e-3).semantics(BnSemantics::kTorch));
  {
    torch::NoGradGuard g;
    for (auto* bn : {&k, &t}) {
      (*bn)->running_mean.copy_(torch::tensor({0.5f, -1.f, 2.f}));
      (*bn)->running_var.copy_(torch::tensor({4.f, 0.25f, 1.f}));
    }
  }
  k->eval(), t->eval();
  const auto x = torch::tensor({{1.5f, 0.f, 2.f}});
  // (x - mean) / sqrt(var + eps): 1/sqrt(4.001), 1/sqrt(0.251), 0
  expect_close(k->forward(x), {1 / std::sqrt(4.001), 1 / std::sqrt(0.251), 0}, 1e-6, "keras eval");
  expect_bitwise_equal(k->forward(x), t->forward(x), "keras vs torch eval");
}

TEST(BatchNorm, TrackRunningStatsOffMatchesLibTorchFlippedOption) {
  // Flipping track_running_stats on an existing LibTorch module: eval uses batch statistics
  // and still writes the running buffers. Ours must do exactly the same.
  torch::manual_seed(3);
  BatchNorm ours(BatchNormOptions(4).semantics(BnSemantics::kTorch));
  torch::nn::BatchNorm1d ref(torch::nn::BatchNormOptions(4));
  ours->options.track_running_stats(false);
  ref->options.track_running_stats(false);
  ours->eval(), ref->eval();
  const auto x = torch::randn({5, 4}) + 2;
  expect_bitwise_equal(ours->forward(x), ref->forward(x), "eval output with batch stats");
  expect_bitwise_equal(ours->running_mean, ref->running_mean, "running_mean written in eval");
  EXPECT_GT(ours->running_mean.abs().sum().item<double>(), 0.0);
  expect_bitwise_equal(ours->num_batches_tracked, ref->num_batches_tracked, "counter untouched");
}

TEST(Loss, GaussianNllHandComputed) {
  // mean 0.5, log_var log 2, y 1.5: 0.5 * (log 2 + 1 / 2 + log(2 pi)) = 1.5155121...
  // second row mean -1, log_var 0, y -1: 0.5 * log(2 pi) = 0.9189385...
  const auto out = torch::tensor({{0.5f, std::log(2.f)}, {-1.f, 0.f}});
  const auto y = torch::tensor({{1.5f}, {-1.f}});
  const double row0 = 0.5 * (std::log(2.0) + 0.5 + std::log(2 * M_PI));
  const double row1 = 0.5 * std::log(2 * M_PI);
  EXPECT_NEAR(compute_loss(LossKind::kGaussianNll, out, y).item<double>(), (row0 + row1) / 2, 1e-6);
}

TEST(Loss, MseAndCrossEntropyHandComputed) {
  // ((1-0)^2 + (2-4)^2) / 2 = 2.5
  EXPECT_NEAR(compute_loss(LossKind::kMse, torch::tensor({{1.f, 2.f}}), torch::tensor({{0.f, 4.f}})).item<double>(), 2.5, 1e-7);
  // logits [1, 2, 3], label 2: -log(e^3 / (e + e^2 + e^3)) = 0.40760596...
  const auto out = torch::tensor({{1.f, 2.f, 3.f}, {0.f, 0.f, 0.f}});
  const auto y = torch::tensor({{2.f}, {0.f}});
  const double ce0 = -std::log(std::exp(3.0) / (std::exp(1.0) + std::exp(2.0) + std::exp(3.0)));
  const double ce1 = std::log(3.0);
  EXPECT_NEAR(compute_loss(LossKind::kCrossEntropy, out, y).item<double>(), (ce0 + ce1) / 2, 1e-6);
  EXPECT_DOUBLE_EQ(accuracy(out, y), 1.0);  // argmax of a tie is index 0
}

StrategyConfig frozen() {
  StrategyConfig s;
  s.name = "frozen";
  s.bn_mode = BnMode::kEval;
  s.affine_trainable = false;
  return s;
}

TEST(Policy, FrozenSurvivesTrainCallsAndIsIdempotent) {
  Model m = small_model();
  m->set_policy(Policy{frozen()});
  for (int i = 0; i < 3; ++i) {
    m->train();  // the classic trap: this would put BatchNorm back into training mode
    for (const auto& bn : m->batchnorms()) {
      EXPECT_FALSE(bn->is_training());
      EXPECT_FALSE(bn->weight.requires_grad());
      EXPECT_FALSE(bn->bias.requires_grad());
    }
    EXPECT_TRUE(m->linears()[0]->is_training());
    EXPECT_TRUE(m->linears()[0]->weight.requires_grad());
  }
  size_t n = 0;
  for (const auto& p : m->parameters()) n += p.requires_grad() ? 1 : 0;
  EXPECT_EQ(n, 6u) << "three Linear layers x (weight, bias); gamma/beta left out";
  EXPECT_NE(make_optimizer(OptimizerConfig{}, m->parameters()), nullptr);
}

TEST(Policy, LayerSelectionAndMomentumOverride) {
  Model m = small_model();
  auto s = frozen();
  s.layers.all = false;
  s.layers.names = {"4"};
  s.momentum = 0.0;
  s.freeze_linear = 1;
  m->set_policy(Policy{s});
  m->train();
  const auto bns = m->batchnorms();
  EXPECT_TRUE(bns[0]->is_training());
  EXPECT_DOUBLE_EQ(bns[0]->options.momentum(), 0.01);
  EXPECT_FALSE(bns[1]->is_training());
  EXPECT_DOUBLE_EQ(bns[1]->options.momentum(), 0.0);
  EXPECT_FALSE(m->linears()[0]->weight.requires_grad());
  EXPECT_TRUE(m->linears()[1]->weight.requires_grad());
  m->set_policy(std::nullopt);
  m->set_policy(Policy{StrategyConfig{}});  // back to "train": all restored
  for (const auto& bn : m->batchnorms()) EXPECT_TRUE(bn->is_training() && bn->weight.requires_grad());
  EXPECT_TRUE(m->linears()[0]->weight.requires_grad());
}

TEST(Optimizer, NothingTrainableGivesNoOptimizer) {
  Model m = small_model();
  for (auto& p : m->parameters()) p.requires_grad_(false);
  EXPECT_EQ(make_optimizer(OptimizerConfig{}, m->parameters()), nullptr);
}

}  // namespace
