// The batched engine's dense kernels against scalar loops written here from the summation
// order kernels.hpp documents, bit for bit. The kernels compute eight rows or 64 outputs at a
// time in vector registers; every lane of that must still add the same operands in the same
// order as one scalar loop would, or curves would change with the vector code. (This file is
// compiled with -ffp-contract=off, as the kernels are, so neither side fuses a multiply-add.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <vector>

#include "kernels.hpp"
#include "lane_kernels.hpp"

namespace {

using bnlab::kernels::gemv;
using bnlab::kernels::gemv_t;

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

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
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
    // out 3 and 6: the one-row fused backward's last sweep of three rows from o = 0, of two after four.
    for (int64_t out : {1, 2, 3, 6, 7, 9, 64})
      for (int64_t in : {1, 7, 8, 9, 16, 24, 64, 65, 130})
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
          if (rows == 1) {  // two inputs at once: each as dense_forward computes it alone
            const auto x2 = values(in * kW, 15);
            std::vector<float> ya(y.size()), yb(y.size()), y2(y.size());
            lanes::active().dense_forward(W.data(), bias.data(), x2.data(), y2.data(), 1, out, in, false);
            lanes::active().dense_forward_pair(W.data(), bias.data(), x.data(), ya.data(), x2.data(), yb.data(), out, in);
            ASSERT_TRUE(same_bits(ya, y)) << "forward pair, first";
            ASSERT_TRUE(same_bits(yb, y2)) << "forward pair, second";
          }
          // Fused with plain SGD (with and without weight decay): the same weights as the
          // unfused gradients (checked above) stepped by the rule, and the same dx.
          lanes::Sgd sgd;
          sgd.neg_lr = -0.37f;
          sgd.decay = checked % 2 == 1;
          sgd.wd = sgd.decay ? 0.01f : 0.f;
          auto W2 = W, bias2 = bias;
          std::vector<float> dx2(x.size());
          lanes::active().dense_backward_sgd(W2.data(), bias2.data(), x.data(), g.data(), dx2.data(), rows, out, in,
                                             gemm_order, sgd);
          auto Wexp = W, bexp = bias;
          for (size_t e = 0; e < W.size(); ++e) Wexp[e] = sgd(W[e], dW[e]);
          for (size_t e = 0; e < bias.size(); ++e) bexp[e] = sgd(bias[e], db[e]);
          ASSERT_TRUE(same_bits(W2, Wexp)) << "fused SGD, weights";
          ASSERT_TRUE(same_bits(bias2, bexp)) << "fused SGD, bias";
          ASSERT_TRUE(same_bits(dx2, dx)) << "fused SGD, dx";
          ASSERT_FALSE(same_bits(W2, W)) << "the step changed nothing";
          // Without dx (the lowest Dense layer), with its bias: the same weights and bias.
          auto W3 = W, bias3 = bias;
          lanes::active().dense_backward_sgd(W3.data(), bias3.data(), x.data(), g.data(), nullptr, rows, out, in,
                                             gemm_order, sgd);
          ASSERT_TRUE(same_bits(W3, Wexp)) << "fused SGD without dx, weights";
          ASSERT_TRUE(same_bits(bias3, bexp)) << "fused SGD without dx, bias";
          // With dx, without a bias: the same weights and dx.
          auto W4 = W;
          std::vector<float> dx4(x.size(), 123.f);
          lanes::active().dense_backward_sgd(W4.data(), nullptr, x.data(), g.data(), dx4.data(), rows, out, in,
                                             gemm_order, sgd);
          ASSERT_TRUE(same_bits(W4, Wexp)) << "fused SGD without a bias, weights";
          ASSERT_TRUE(same_bits(dx4, dx)) << "fused SGD without a bias, dx";
          ++checked;
        }
  }
  EXPECT_EQ(checked, static_cast<int>(isas.size()) * 7 * 9 * 4);
  EXPECT_FALSE(lanes::set_isa("sse9"));  // unknown: refused, nothing changes
  ASSERT_TRUE(lanes::set_isa(isas.back()));
}

// One plain copy of the weights that every lane shares (the engine's layers below a backward pass
// that stopped): dense_forward_same and dense_forward_pair_same must give exactly what
// dense_forward and dense_forward_pair give on that copy spread into every lane.
TEST(LaneKernels, SharedWeightsGiveWhatEachLanesCopyGivesOnEveryInstructionSet) {
  int checked = 0;
  for (const auto& isa : lanes::available()) {
    ASSERT_TRUE(lanes::set_isa(isa));
    const auto& k = lanes::active();
    for (int64_t out : {1, 2, 3, 7, 64})
      for (int64_t in : {1, 7, 8, 9, 16, 64, 65})
        for (bool with_bias : {false, true})
          for (int64_t rows : {1, 3}) {
            SCOPED_TRACE(isa + ": out " + std::to_string(out) + ", in " + std::to_string(in) + (with_bias ? ", bias" : "") +
                         ", rows " + std::to_string(rows));
            auto W = values(out * in, 21);
            W[0] = -0.f;  // copied as bits, not as values
            const auto bias = values(out, 22), x = values(rows * in * kW, 23), x2 = values(in * kW, 24);
            std::vector<float> Wl(W.size() * kW), bl(bias.size() * kW);
            k.spread(W.data(), Wl.data(), out * in);
            k.spread(bias.data(), bl.data(), out);
            const float* b = with_bias ? bias.data() : nullptr;
            const float* bL = with_bias ? bl.data() : nullptr;
            std::vector<float> want(static_cast<size_t>(rows * out * kW)), got(want.size(), 123.f);
            k.dense_forward(Wl.data(), bL, x.data(), want.data(), rows, out, in, false);
            k.dense_forward_same(W.data(), b, x.data(), got.data(), rows, out, in);
            ASSERT_TRUE(same_bits(got, want)) << "forward";
            if (rows != 1) continue;
            std::vector<float> wa(static_cast<size_t>(out * kW)), wb(wa.size()), ga(wa.size(), 123.f), gb(wa.size(), 123.f);
            k.dense_forward_pair(Wl.data(), bL, x.data(), wa.data(), x2.data(), wb.data(), out, in);
            k.dense_forward_pair_same(W.data(), b, x.data(), ga.data(), x2.data(), gb.data(), out, in);
            ASSERT_TRUE(same_bits(ga, wa)) << "pair, first";
            ASSERT_TRUE(same_bits(gb, wb)) << "pair, second";
            if (out * in > 1) {  // (W[0] is 0)
              ASSERT_FALSE(same_bits(ga, gb)) << "the two inputs gave the same outputs";
            }
            // The fused SGD step of one row reading the shared copy and writing the lanes (whose
            // old contents it must not read: they hold garbage here) gives what it gives on the
            // lanes' copies, with dx (from 0 and the first row) and without.
            const auto g = values(out * kW, 25);
            lanes::Sgd sgd;
            sgd.neg_lr = -0.37f;
            for (bool with_dx : {true, false}) {
              auto Wwant = Wl, bwant = bl;
              std::vector<float> dxwant(static_cast<size_t>(in * kW)), dxgot(dxwant.size(), 123.f);
              k.dense_backward_sgd(Wwant.data(), with_bias ? bwant.data() : nullptr, x.data(), g.data(),
                                   with_dx ? dxwant.data() : nullptr, 1, out, in, false, sgd);
              std::vector<float> Wgot(Wl.size(), std::numeric_limits<float>::quiet_NaN()), bgot(bl.size(), 7.f);
              k.dense_backward_sgd_same(W.data(), b, Wgot.data(), with_bias ? bgot.data() : nullptr, x.data(), g.data(),
                                        with_dx ? dxgot.data() : nullptr, out, in, false, sgd);
              ASSERT_TRUE(same_bits(Wgot, Wwant)) << "fused SGD on shared weights, weights";
              if (with_bias) {
                ASSERT_TRUE(same_bits(bgot, bwant)) << "fused SGD on shared weights, bias";
              }
              if (with_dx) {
                ASSERT_TRUE(same_bits(dxgot, dxwant)) << "fused SGD on shared weights, dx";
              }
              ASSERT_FALSE(same_bits(Wwant, Wl)) << "the step changed nothing";
            }
            ++checked;
          }
  }
  EXPECT_EQ(checked, static_cast<int>(lanes::available().size()) * 5 * 7 * 2);
  ASSERT_TRUE(lanes::set_isa(lanes::available().back()));
}

// train's BatchNorm pair in one kernel: what the separate kernels give, called in the order the
// two forward passes call them (inference on the running statistics, then the fit pass on the
// row's own statistics and the update), bit for bit; rows with an infinity or a NaN leave the
// variance's all-zero shortcut for the chunk that holds them.
TEST(LaneKernels, OneRowBatchNormPairIsTheTwoPassesOnEveryInstructionSet) {
  int checked = 0;
  for (const auto& isa : lanes::available()) {
    ASSERT_TRUE(lanes::set_isa(isa));
    const auto& k = lanes::active();
    for (int64_t C : {1, 7, 16, 37, 1024})
      for (int variant = 0; variant < 16; ++variant) {
        const bool with_gamma = variant & 1, with_beta = variant & 2, keras = variant & 4, update = variant & 8;
        SCOPED_TRACE(isa + ": channels " + std::to_string(C) + ", variant " + std::to_string(variant));
        const size_t c_ = static_cast<size_t>(C);
        auto xa = values(C, 31), xb = values(C, 32), rm = values(C, 35), rv = values(C, 36);
        const auto gamma = values(C, 33), beta = values(C, 34);
        for (auto& v : rv) v = std::fabs(v);
        rv[0] = -0.f;
        if (C > 20) {  // the second chunk: a non-finite row
          xb[17] = std::numeric_limits<float>::infinity();
          xb[19] = std::numeric_limits<float>::quiet_NaN();
        }
        const float eps = 1e-3f, m = 0.01f, unbias = keras ? 1.f : 1.7f;
        const float* g = with_gamma ? gamma.data() : nullptr;
        const float* b = with_beta ? beta.data() : nullptr;
        // The two passes, kernel by kernel.
        auto rm1 = rm, rv1 = rv;
        std::vector<float> is(c_), alpha(c_), shift(c_), ya(c_), mean(c_), var(c_), istd(c_), xhat(c_), yb(c_);
        k.inv_sqrt(rv1.data(), eps, is.data(), C);
        k.bn_scale_shift(g, b, rm1.data(), is.data(), alpha.data(), shift.data(), C);
        k.bn_affine(xa.data(), alpha.data(), shift.data(), ya.data(), 1, C);
        k.bn_moments(xb.data(), 1, C, mean.data(), var.data());
        k.inv_sqrt(var.data(), eps, istd.data(), C);
        k.bn_normalize(xb.data(), mean.data(), istd.data(), g, b, xhat.data(), yb.data(), 1, C);
        if (update) k.bn_running(rm1.data(), rv1.data(), mean.data(), var.data(), m, keras, unbias, C);
        // The one kernel.
        auto rm2 = rm, rv2 = rv;
        std::vector<float> ya2(c_, 9.f), yb2(c_, 9.f), xhat2(c_, 9.f), istd2(c_, 9.f);
        k.bn_pair_one_row(xa.data(), ya2.data(), xb.data(), yb2.data(), xhat2.data(), istd2.data(), g, b, rm2.data(),
                          rv2.data(), eps, update, m, keras, unbias, C);
        ASSERT_TRUE(same_bits(ya2, ya)) << "inference output";
        ASSERT_TRUE(same_bits(yb2, yb)) << "fit output";
        ASSERT_TRUE(same_bits(xhat2, xhat)) << "xhat";
        ASSERT_TRUE(same_bits(istd2, istd)) << "istd";
        ASSERT_TRUE(same_bits(rm2, rm1)) << "running mean";
        ASSERT_TRUE(same_bits(rv2, rv1)) << "running variance";
        if (update) {
          ASSERT_FALSE(same_bits(rv2, rv)) << "the update changed nothing";
        }
        ++checked;
      }
  }
  EXPECT_EQ(checked, static_cast<int>(lanes::available().size()) * 5 * 16);
  ASSERT_TRUE(lanes::set_isa(lanes::available().back()));
}

// The element-wise kernels (BatchNorm, ReLU, spread, all_finite) on every instruction set against the formulas
// written out here one element at a time, bit for bit, with each optional pointer present and
// absent.
TEST(LaneKernels, ElementWiseKernelsMatchTheirFormulasOnEveryInstructionSet) {
  int checked = 0;
  for (const auto& isa : lanes::available()) {
    ASSERT_TRUE(lanes::set_isa(isa));
    const auto& k = lanes::active();
    for (int64_t n : {1, 2, 5})
      for (int64_t C : {1, 7, 16, 100, 1029}) {
        SCOPED_TRACE(isa + ": rows " + std::to_string(n) + ", channels " + std::to_string(C));
        const auto X = values(n * C, 21), G = values(n * C, 22), gamma = values(C, 23), beta = values(C, 24),
                   mean = values(C, 25);
        auto var = values(C, 26);
        for (auto& v : var) v = std::fabs(v);
        var[0] = 0.f;  // 1 / sqrt(eps)
        const size_t nc = static_cast<size_t>(n * C), c_ = static_cast<size_t>(C);
        std::vector<float> a(c_), b(c_), got(nc), want(nc), got2(nc);
        const float eps = 1e-3f, rows = static_cast<float>(n);

        k.inv_sqrt(var.data(), eps, a.data(), C);
        for (size_t c = 0; c < c_; ++c) b[c] = 1.f / std::sqrt(var[c] + eps);
        ASSERT_TRUE(same_bits(a, b)) << "inv_sqrt";
        // A variance of zeros (one row's batch statistics), +0 and -0, takes its shortcut; one
        // nonzero element among them must not.
        for (size_t z = 0; z <= c_; ++z) {
          std::vector<float> zeros(c_, 0.f), za(c_), zb(c_);
          for (size_t c = 0; c < c_; c += 3) zeros[c] = -0.f;
          if (z < c_) zeros[z] = 0.25f;
          k.inv_sqrt(zeros.data(), eps, za.data(), C);
          for (size_t c = 0; c < c_; ++c) zb[c] = 1.f / std::sqrt(zeros[c] + eps);
          ASSERT_TRUE(same_bits(za, zb)) << "inv_sqrt of zeros, nonzero at " << z;
        }
        const auto istd = a;

        k.bn_moments(X.data(), n, C, a.data(), b.data());
        for (size_t c = 0; c < c_; ++c) {
          float m = 0.f, v = 0.f;
          for (size_t r = 0; r < static_cast<size_t>(n); ++r) m += X[r * c_ + c];
          m /= rows;
          for (size_t r = 0; r < static_cast<size_t>(n); ++r) v += (X[r * c_ + c] - m) * (X[r * c_ + c] - m);
          v /= rows;
          ASSERT_EQ(bits(a[c]), bits(m)) << "bn_moments mean " << c;
          ASSERT_EQ(bits(b[c]), bits(v)) << "bn_moments var " << c;
        }
        if (n == 1) {  // one row skips the divisions by 1: the same bits for -0, infinities, NaN, subnormals
          const float specials[] = {-0.f, 0.f, INFINITY, -INFINITY, std::nanf("0x2a5"), -std::nanf("7"), 1e-40f, -1e-42f,
                                    FLT_MAX, -FLT_MAX, 1.5f};
          for (size_t first = 0; first < std::size(specials); ++first) {
            std::vector<float> S(c_);
            for (size_t c = 0; c < c_; ++c) S[c] = specials[(first + c) % std::size(specials)];
            k.bn_moments(S.data(), 1, C, a.data(), b.data());
            volatile float one = 1.f;  // the general loop's division by the row count, not folded away
            for (size_t c = 0; c < c_; ++c) {
              const float m = (0.f + S[c]) / one, d = S[c] - m, v = (0.f + d * d) / one;
              ASSERT_EQ(bits(a[c]), bits(m)) << "bn_moments one row, mean of " << S[c];
              ASSERT_EQ(bits(b[c]), bits(v)) << "bn_moments one row, var of " << S[c];
            }
          }
        }

        for (int with = 0; with < 4; ++with) {  // gamma and beta present or absent
          const float* gp = with & 1 ? gamma.data() : nullptr;
          const float* bp = with & 2 ? beta.data() : nullptr;
          k.bn_scale_shift(gp, bp, mean.data(), istd.data(), a.data(), b.data(), C);
          for (size_t c = 0; c < c_; ++c) {
            const float alpha = gp ? gp[c] * istd[c] : istd[c];
            ASSERT_EQ(bits(a[c]), bits(alpha)) << "bn_scale_shift alpha";
            ASSERT_EQ(bits(b[c]), bits((bp ? bp[c] : 0.f) - mean[c] * alpha)) << "bn_scale_shift shift";
          }
          std::vector<float> h(nc);
          k.bn_normalize(X.data(), mean.data(), istd.data(), gp, bp, h.data(), got.data(), n, C);
          for (size_t e = 0; e < nc; ++e) {
            const size_t c = e % c_;
            const float he = (X[e] - mean[c]) * istd[c];
            float y = gp ? he * gp[c] : he;
            if (bp) y = y + bp[c];
            ASSERT_EQ(bits(h[e]), bits(he)) << "bn_normalize xhat";
            ASSERT_EQ(bits(got[e]), bits(y)) << "bn_normalize y";
          }
          // dx: through fixed statistics and through the batch's (scale = gamma or 1).
          k.bn_dx_fixed(G.data(), gp, istd.data(), got.data(), n, C);
          std::vector<float> sg(c_), sgx(c_);
          k.bn_sums(G.data(), h.data(), nullptr, nullptr, nullptr, sg.data(), sgx.data(), n, C);
          k.bn_dx_batch(G.data(), h.data(), gp, istd.data(), sg.data(), sgx.data(), got2.data(), n, C);
          for (size_t e = 0; e < nc; ++e) {
            const size_t c = e % c_;
            const float sc = gp ? gp[c] : 1.f;
            ASSERT_EQ(bits(got[e]), bits(G[e] * sc * istd[c])) << "bn_dx_fixed";
            const float mdh = sg[c] * sc / rows, mdhh = sgx[c] * sc / rows;
            ASSERT_EQ(bits(got2[e]), bits(istd[c] * (G[e] * sc - mdh - h[e] * mdhh))) << "bn_dx_batch";
          }
        }

        // bn_sums from x-hat and from (x - running mean) * istd; bn_affine with and without shift.
        std::vector<float> h(nc);
        for (size_t e = 0; e < nc; ++e) h[e] = X[e] * 0.5f;
        for (bool from_xhat : {true, false}) {
          k.bn_sums(G.data(), from_xhat ? h.data() : nullptr, X.data(), mean.data(), istd.data(), a.data(), b.data(), n,
                    C);
          for (size_t c = 0; c < c_; ++c) {
            float sg = 0.f, sgx = 0.f;
            for (size_t r = 0; r < static_cast<size_t>(n); ++r) {
              const size_t e = r * c_ + c;
              sg += G[e];
              sgx += G[e] * (from_xhat ? h[e] : (X[e] - mean[c]) * istd[c]);
            }
            ASSERT_EQ(bits(a[c]), bits(sg)) << "bn_sums g";
            ASSERT_EQ(bits(b[c]), bits(sgx)) << "bn_sums gx";
          }
        }
        for (bool shift : {true, false}) {
          k.bn_affine(X.data(), gamma.data(), shift ? beta.data() : nullptr, got.data(), n, C);
          for (size_t e = 0; e < nc; ++e)
            ASSERT_EQ(bits(got[e]), bits(shift ? X[e] * gamma[e % c_] + beta[e % c_] : X[e] * gamma[e % c_])) << "bn_affine";
        }

        for (bool keras : {true, false}) {  // the running statistics' update
          auto rm = gamma, rv = var;
          const float m = 0.01f, unbias = keras ? 1.f : rows / (rows + 1.f);
          k.bn_running(rm.data(), rv.data(), mean.data(), beta.data(), m, keras, unbias, C);
          for (size_t c = 0; c < c_; ++c) {
            const float wm = keras ? gamma[c] - (gamma[c] - mean[c]) * m : m * mean[c] + (1.f - m) * gamma[c];
            const float wv = keras ? var[c] - (var[c] - beta[c]) * m : m * beta[c] * unbias + (1.f - m) * var[c];
            ASSERT_EQ(bits(rm[c]), bits(wm)) << "bn_running mean";
            ASSERT_EQ(bits(rv[c]), bits(wv)) << "bn_running var";
          }
        }

        k.relu_forward(X.data(), got.data(), n * C);
        k.relu_backward(got.data(), G.data(), got2.data(), n * C);
        for (size_t e = 0; e < nc; ++e) {
          ASSERT_EQ(bits(got[e]), bits(X[e] > 0.f ? X[e] : 0.f)) << "relu_forward";
          ASSERT_EQ(bits(got2[e]), bits(got[e] > 0.f ? G[e] : 0.f)) << "relu_backward";
        }
        // spread: every element in each of the kWidth lanes, bit for bit (-0, a NaN's payload, an
        // infinity among them), and nothing past the last.
        auto column = X;
        const uint32_t odd[] = {0x80000000u, 0x7fc01234u, 0xffa00001u, 0x7f800000u};
        for (size_t e = 0; e < nc && e < 4; ++e) std::memcpy(&column[e], &odd[e], sizeof(float));
        std::vector<float> wide(nc * lanes::kWidth + 1, 7.f);
        k.spread(column.data(), wide.data(), n * C);
        for (size_t e = 0; e < nc; ++e)
          for (size_t v = 0; v < static_cast<size_t>(lanes::kWidth); ++v)
            ASSERT_EQ(bits(wide[e * lanes::kWidth + v]), bits(column[e])) << "spread " << e << " lane " << v;
        ASSERT_EQ(wide.back(), 7.f) << "spread wrote past its n values";
        // all_finite: false for an infinity or a NaN at any position, and for -0 only when asked.
        ASSERT_TRUE(k.all_finite(X.data(), n * C, false));
        ASSERT_EQ(k.all_finite(X.data(), n * C, true), std::none_of(X.begin(), X.end(), [](float f) { return bits(f) == 0x80000000u; }));
        for (size_t e = 0; e < nc; e += std::max<size_t>(1, nc / 7)) {
          for (const uint32_t u : {0x7f800000u, 0xff800000u, 0x7fc00000u, 0xff812345u, 0x80000000u, 0x00000000u, 0x00000001u}) {
            auto y = X;
            std::memcpy(&y[e], &u, sizeof u);
            const bool finite = (u & 0x7f800000u) != 0x7f800000u, negzero = u == 0x80000000u;
            ASSERT_EQ(k.all_finite(y.data(), n * C, false), finite) << "all_finite " << std::hex << u << " at " << std::dec << e;
            ASSERT_EQ(k.all_finite(y.data(), n * C, true), finite && !negzero) << "all_finite -0 " << std::hex << u << " at " << std::dec << e;
          }
        }
        ++checked;
      }
  }
  EXPECT_EQ(checked, static_cast<int>(lanes::available().size()) * 3 * 5);
  ASSERT_TRUE(lanes::set_isa(lanes::available().back()));
}

// The one-lane product on every instruction set against its order written out element by
// element: from init (or 0), k ascending. Shapes cover the 4-row tiles and their remainder rows,
// the wide tiles, single-vector tiles and scalar columns of each path.
TEST(LaneKernels, GemmSumsEachElementInKOrderOnEveryInstructionSet) {
  int checked = 0;
  for (const auto& isa : lanes::available()) {
    ASSERT_TRUE(lanes::set_isa(isa));
    for (int64_t M : {1, 3, 4, 5, 8, 13})
      for (int64_t K : {1, 7, 64, 256})
        for (int64_t N : {1, 2, 7, 8, 15, 16, 17, 63, 64, 65, 130})
          for (bool with_init : {false, true}) {
            SCOPED_TRACE(isa + ": M " + std::to_string(M) + ", K " + std::to_string(K) + ", N " + std::to_string(N));
            const auto A = values(M * K, 31), B = values(K * N, 32), init = values(N, 33);
            std::vector<float> C(static_cast<size_t>(M * N)), want(C.size());
            lanes::active().gemm(A.data(), B.data(), C.data(), M, K, N, with_init ? init.data() : nullptr);
            for (int64_t i = 0; i < M; ++i)
              for (int64_t j = 0; j < N; ++j) {
                float s = with_init ? init[static_cast<size_t>(j)] : 0.f;
                for (int64_t k = 0; k < K; ++k) s += A[static_cast<size_t>(i * K + k)] * B[static_cast<size_t>(k * N + j)];
                want[static_cast<size_t>(i * N + j)] = s;
              }
            ASSERT_TRUE(same_bits(C, want));
            ++checked;
          }
  }
  EXPECT_EQ(checked, static_cast<int>(lanes::available().size()) * 6 * 4 * 11 * 2);
  ASSERT_TRUE(lanes::set_isa(lanes::available().back()));
}
