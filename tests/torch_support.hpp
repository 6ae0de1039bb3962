// Helpers for the tests that build models directly (torch_tests only).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "bnlab/config.hpp"
#include "nn.hpp"

namespace bnlab::test {

/// A model of the shorthand layout (per width: Linear, BatchNorm when `batchnorm`, the
/// activation, Dropout when dropout > 0; then the head), sized for `inputs` and `outputs`.
inline bnlab::Model shorthand_model(const std::vector<int64_t>& hidden, int64_t inputs, int64_t outputs,
                                    bnlab::BnSemantics semantics = bnlab::BnSemantics::kKeras, double dropout = 0,
                                    bnlab::Activation activation = bnlab::Activation::kRelu, bool batchnorm = true) {
  bnlab::BatchNormConfig bn;
  bn.semantics = semantics;
  bn.eps = semantics == bnlab::BnSemantics::kKeras ? 1e-3 : 1e-5;
  bn.momentum = semantics == bnlab::BnSemantics::kKeras ? 0.01 : 0.1;
  return bnlab::Model(bnlab::sized_layers(bnlab::shorthand_layers(hidden, activation, dropout, batchnorm, bn), inputs, outputs));
}

/// The batched engine's gradients `grads` against the autograd gradients that `ref` holds after
/// backward(): the same trainable parameters, each within 1e-5 of the largest gradient anywhere
/// in the model (float rounding is relative to the size of the backward signal).
inline void expect_gradients_equal(const bnlab::ModelImpl& ref, const std::vector<std::pair<std::string, torch::Tensor>>& grads) {
  std::map<std::string, torch::Tensor> expected;
  double scale = 1e-6;
  for (const auto& p : ref.named_parameters())
    if (p.value().requires_grad()) {
      expected[p.key()] = p.value().grad();
      scale = std::max(scale, p.value().grad().abs().max().item<double>());
    }
  ASSERT_EQ(grads.size(), expected.size()) << "the batched engine trains another set of parameters";
  for (const auto& [name, g] : grads) {
    ASSERT_TRUE(expected.count(name)) << name;
    const auto& e = expected[name];
    ASSERT_EQ(g.sizes(), e.sizes()) << name;
    EXPECT_LE((g - e).abs().max().item<double>(), 1e-5 * scale) << name << ": largest gradient in the model " << scale;
  }
}

}  // namespace bnlab::test
