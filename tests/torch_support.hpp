// Helpers for the tests that build models directly (torch_tests only).
#pragma once

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

}  // namespace bnlab::test
