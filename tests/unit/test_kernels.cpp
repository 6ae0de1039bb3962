// The batched engine's dense kernels against scalar loops written here from the summation
// order kernels.hpp documents, bit for bit. The kernels compute eight rows or 64 outputs at a
// time in vector registers; every lane of that must still add the same operands in the same
// order as one scalar loop would, or curves would change with the vector code. (This file is
// compiled with -ffp-contract=off, as the kernels are, so neither side fuses a multiply-add.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.hpp"
#include "lane_kernels.hpp"

namespace {

using bnlab::kernels::gemv;
using bnlab::kernels::gemv_t;
using bnlab::kernels::inv_sqrt;

/// dot(): eight partial sums (sum j takes k = j mod 8 while a whole block of eight remains),
/// combined as ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), then the tail in order.
float dot_reference(const float* a, const float* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] = s[j] + a[k + j] * b[k + j];
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; k < n; ++k) r = r + a[k] * b[k];
  return r;
}

/// Values over six orders of magnitude and both signs, so that a different order of the
/// additions shows in the last bits.
std::vector<float> values(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> mantissa(-1.f, 1.f);
  std::uniform_int_distribution<int> exponent(-3, 3);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = mantissa(gen) * std::pow(10.f, static_cast<float>(exponent(gen)));
  return v;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

const int64_t kOuts[] = {1, 2, 7, 8, 9, 16, 23, 64, 67};
const int64_t kIns[] = {1, 3, 7, 8, 9, 16, 63, 64, 65, 130};

TEST(Kernels, GemvAddsInDotsOrderForEveryShape) {
  int sequential_differs = 0;
  for (int64_t out : kOuts)
    for (int64_t in : kIns)
      for (bool with_bias : {false, true}) {
        SCOPED_TRACE("out " + std::to_string(out) + ", in " + std::to_string(in) + (with_bias ? ", bias" : ""));
        const auto W = values(out * in, 1), x = values(in, 2), bias = values(out, 3);
        std::vector<float> got(static_cast<size_t>(out)), want(got.size()), sequential(got.size());
        gemv(W.data(), x.data(), with_bias ? bias.data() : nullptr, got.data(), out, in);
        for (int64_t o = 0; o < out; ++o) {
          const float b = with_bias ? bias[static_cast<size_t>(o)] : 0.f;
          want[static_cast<size_t>(o)] = dot_reference(W.data() + o * in, x.data(), in) + b;
          float s = 0.f;
          for (int64_t k = 0; k < in; ++k) s = s + W[static_cast<size_t>(o * in + k)] * x[static_cast<size_t>(k)];
          sequential[static_cast<size_t>(o)] = s + b;
        }
        EXPECT_TRUE(same_bits(got, want));
        sequential_differs += !same_bits(sequential, want);
      }
  // The data discriminates between orders: a plain left-to-right sum differs somewhere.
  EXPECT_GT(sequential_differs, 0);
}

TEST(Kernels, GemvOfEightRowsMatchesDotRowByRow) {
  // The eight-row path against dot() itself (the kernel every single row went through before).
  const int64_t out = 16, in = 64;
  const auto W = values(out * in, 4), x = values(in, 5);
  std::vector<float> y(static_cast<size_t>(out));
  gemv(W.data(), x.data(), nullptr, y.data(), out, in);
  for (int64_t o = 0; o < out; ++o) {
    const float d = bnlab::kernels::dot(W.data() + o * in, x.data(), in) + 0.f;
    EXPECT_EQ(std::memcmp(&d, &y[static_cast<size_t>(o)], sizeof d), 0) << "row " << o;
  }
}

TEST(Kernels, GemvTransposedSumsOverOutputsInOrder) {
  for (int64_t out : kOuts)
    for (int64_t in : kIns) {
      SCOPED_TRACE("out " + std::to_string(out) + ", in " + std::to_string(in));
      const auto W = values(out * in, 6), g = values(out, 7);
      std::vector<float> got(static_cast<size_t>(in), 123.f), want(static_cast<size_t>(in));
      gemv_t(W.data(), g.data(), got.data(), out, in);
      for (int64_t k = 0; k < in; ++k) {
        float s = 0.f;
        for (int64_t o = 0; o < out; ++o) s = s + g[static_cast<size_t>(o)] * W[static_cast<size_t>(o * in + k)];
        want[static_cast<size_t>(k)] = s;
      }
      EXPECT_TRUE(same_bits(got, want));
    }
}

TEST(Kernels, InverseSquareRootIsCorrectlyRounded) {
  auto v = values(203, 8);
  for (auto& x : v) x = std::fabs(x);
  v[0] = 0.f;  // 1 / sqrt(eps)
  for (float eps : {1e-3f, 1e-5f}) {
    std::vector<float> got(v.size()), want(v.size());
    inv_sqrt(v.data(), eps, got.data(), static_cast<int64_t>(v.size()));
    for (size_t i = 0; i < v.size(); ++i) want[i] = 1.f / std::sqrt(v[i] + eps);
    EXPECT_TRUE(same_bits(got, want)) << "eps " << eps;
  }
}

}  // namespace

// ---- The lane-interleaved kernels (lane_kernels.hpp), on every instruction set this CPU runs:
// each of kWidth lanes must come out bit for bit as the one-lane kernels above compute it alone.
namespace {

namespace lanes = bnlab::lanes;
constexpr int64_t kW = lanes::kWidth;

/// Lane v's copy of an interleaved array of n elements.
std::vector<float> column(const std::vector<float>& a, int64_t n, int64_t v) {
  std::vector<float> out(static_cast<size_t>(n));
  for (int64_t e = 0; e < n; ++e) out[static_cast<size_t>(e)] = a[static_cast<size_t>(e * kW + v)];
  return out;
}

std::vector<float> transposed(const std::vector<float>& a, int64_t rows, int64_t cols) {
  std::vector<float> t(a.size());
  bnlab::kernels::transpose(a.data(), t.data(), rows, cols);
  return t;
}

}  // namespace

TEST(LaneKernels, EveryLaneMatchesTheOneLaneKernelsOnEveryInstructionSet) {
  const auto isas = lanes::available();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), "portable");
  int checked = 0;
  for (const auto& isa : isas) {
    ASSERT_TRUE(lanes::set_isa(isa));
    ASSERT_STREQ(lanes::active().isa, isa.c_str());
    for (int64_t out : {1, 2, 7, 9, 64})
      for (int64_t in : {1, 7, 8, 9, 64, 65})
        for (int64_t rows : {1, 3, 8, 9}) {
          SCOPED_TRACE(isa + ": out " + std::to_string(out) + ", in " + std::to_string(in) + ", rows " + std::to_string(rows));
          const bool gemm_order = rows >= 8;  // what the Dense kind picks (kGemmRows)
          const auto W = values(out * in * kW, 11), bias = values(out * kW, 12), x = values(rows * in * kW, 13),
                     g = values(rows * out * kW, 14);
          std::vector<float> y(static_cast<size_t>(rows * out * kW)), dW(W.size()), db(bias.size()), dx(x.size());
          lanes::active().dense_forward(W.data(), bias.data(), x.data(), y.data(), rows, out, in, gemm_order);
          lanes::active().dense_backward(W.data(), x.data(), g.data(), dW.data(), db.data(), dx.data(), rows, out, in,
                                         gemm_order);
          for (int64_t v = 0; v < kW; ++v) {
            // Lane v alone, as the one-lane path of the Dense kind computes it.
            const auto Wv = column(W, out * in, v), bv = column(bias, out, v), xv = column(x, rows * in, v),
                       gv = column(g, rows * out, v);
            std::vector<float> yv(static_cast<size_t>(rows * out)), dWv(Wv.size()), dbv(bv.size(), 0.f), dxv(xv.size());
            if (gemm_order) {
              const auto Wt = transposed(Wv, out, in), gt = transposed(gv, rows, out);
              bnlab::kernels::gemm(xv.data(), Wt.data(), yv.data(), rows, in, out, bv.data());
              bnlab::kernels::gemm(gt.data(), xv.data(), dWv.data(), out, rows, in, nullptr);
              bnlab::kernels::gemm(gv.data(), Wv.data(), dxv.data(), rows, out, in, nullptr);
            } else {
              for (int64_t r = 0; r < rows; ++r) {
                gemv(Wv.data(), xv.data() + r * in, bv.data(), yv.data() + r * out, out, in);
                bnlab::kernels::outer(gv.data() + r * out, xv.data() + r * in, dWv.data(), out, in, r > 0);
                gemv_t(Wv.data(), gv.data() + r * out, dxv.data() + r * in, out, in);
              }
            }
            for (int64_t o = 0; o < out; ++o)
              for (int64_t r = 0; r < rows; ++r) dbv[static_cast<size_t>(o)] += gv[static_cast<size_t>(r * out + o)];
            ASSERT_TRUE(same_bits(column(y, rows * out, v), yv)) << "forward, lane " << v;
            ASSERT_TRUE(same_bits(column(dW, out * in, v), dWv)) << "dW, lane " << v;
            ASSERT_TRUE(same_bits(column(db, out, v), dbv)) << "db, lane " << v;
            ASSERT_TRUE(same_bits(column(dx, rows * in, v), dxv)) << "dx, lane " << v;
          }
          ++checked;
        }
  }
  EXPECT_EQ(checked, static_cast<int>(isas.size()) * 5 * 6 * 4);
  EXPECT_FALSE(lanes::set_isa("sse9"));  // unknown: refused, nothing changes
  ASSERT_TRUE(lanes::set_isa(isas.back()));
}
