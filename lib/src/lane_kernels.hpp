// The batched engine's kernels, compiled per instruction set. Dense kernels over a group of
// kWidth lanes whose state is interleaved (element e of lane v of a group sits at
// [e * kWidth + v], so one lane's sum is a vertical SIMD operation with no horizontal step, and
// every lane keeps exactly the scalar summation order of kernels.hpp); the one-lane gemm; and the
// element-wise kernels (BatchNorm, ReLU), which run on plain or interleaved arrays alike.
// Compiled once per instruction set (portable x86-64, AVX2, AVX-512; never with FMA), picked at
// load time from the CPU, or forced with BNLAB_ISA=portable|avx2|avx512 (what the tests compare).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bnlab::lanes {

/// Lanes per group: 16 floats, one AVX-512 register. The layout does not depend on the CPU.
constexpr int64_t kWidth = 16;

/// Plain SGD (no momentum), p <- p + (-lr) * g, with weight decay p + (-lr) * (g + wd * p): the
/// rule SgdDef::update applies (optimizers.cpp) and the one dense_backward_sgd applies in place
/// of writing dW and db when the optimizer allows it (fused: each weight read once, written once).
/// One definition for floats and for vectors of lanes, so both compute the same operations.
struct Sgd {
  float neg_lr = 0.f;  ///< -lr
  float wd = 0.f;      ///< weight decay, applied when `decay` (torch skips it when it is 0)
  bool decay = false;
  /// The rule on T (float, or a vector of lanes). lane_kernels.inc passes a tag type of its own
  /// file as Isa, so that each instruction set's instantiation is a function of its own and the
  /// linker cannot keep one file's copy (AVX-512, say) for another's calls.
  template <class T, class Isa = void>
  T apply(T p, T g) const {
    return decay ? p + neg_lr * (g + wd * p) : p + neg_lr * g;
  }
  float operator()(float p, float g) const { return apply(p, g); }
};

/// One instruction set's kernels. Shapes as in kernels.hpp; the Dense kernels' arrays are
/// interleaved by lane: W [out][in][kWidth], bias [out][kWidth], x [rows][in][kWidth],
/// y [rows][out][kWidth] (gemm's and the element-wise kernels' are not).
struct Kernels {
  const char* isa;
  /// y[r] = W x[r] + bias: with `sequential` in kernels::gemm's order (k ascending from the
  /// bias), else in kernels::gemv's (eight partial sums, combined pairwise, tail, bias).
  void (*dense_forward)(const float* W, const float* bias, const float* x, float* y, int64_t rows, int64_t out,
                        int64_t in, bool sequential);
  /// dense_forward (rows = 1, dot order) of two inputs at once, xa to ya and xb to yb, each weight
  /// loaded once for both: the same values as two calls.
  void (*dense_forward_pair)(const float* W, const float* bias, const float* xa, float* ya, const float* xb,
                             float* yb, int64_t out, int64_t in);
  /// dense_forward (not sequential) and dense_forward_pair when every lane's weights are the same:
  /// W [out][in] and bias|null [out] are one plain copy, each weight broadcast to the lanes, the
  /// same products and sums in the same order, so the same values, bit for bit. One copy of a
  /// 64 x 64 layer is 16 KiB, read from L1, where the lanes' copies are 256 KiB from L2.
  void (*dense_forward_same)(const float* W, const float* bias, const float* x, float* y, int64_t rows, int64_t out,
                             int64_t in);
  void (*dense_forward_pair_same)(const float* W, const float* bias, const float* xa, float* ya, const float* xb,
                                  float* yb, int64_t out, int64_t in);
  /// From g [rows][out]: db (sum over rows), dW (sum of g x^T over rows; `from_zero`: added to 0
  /// as kernels::gemm does, else the first row assigned as kernels::outer does) and dx = W^T g;
  /// each output skipped when its pointer is null.
  void (*dense_backward)(const float* W, const float* x, const float* g, float* dW, float* db, float* dx,
                         int64_t rows, int64_t out, int64_t in, bool from_zero);
  /// dense_backward followed by `sgd` on W and bias (bias may be null), row by row of W (four
  /// rows per sweep with one row of x): dx from each row before its update, dW and db never stored. The same values as
  /// dense_backward then Sgd over dW and db, bit for bit.
  void (*dense_backward_sgd)(float* W, float* bias, const float* x, const float* g, float* dx, int64_t rows,
                             int64_t out, int64_t in, bool from_zero, Sgd sgd);
  /// dense_backward_sgd of one row when every lane's W and bias hold ws [out][in] and bs|null
  /// [out], one plain copy, read broadcast; the lanes' W and bias are only written (the same bits).
  void (*dense_backward_sgd_same)(const float* ws, const float* bs, float* W, float* bias, const float* x,
                                  const float* g, float* dx, int64_t out, int64_t in, bool from_zero, Sgd sgd);

  /// C = init|null (0) + A B, A [M][K], B [K][N], C [M][N], plain (not interleaved): each element
  /// summed from its start with k ascending, kernels::gemm's order (one lane's product of many rows).
  void (*gemm)(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N, const float* init);

  // Element-wise kernels over n rows of C contiguous channels (a lane's channels, or a group's
  // channels x kWidth lanes); "|null" marks a pointer that may be null.
  /// out = 1 / sqrt(v + eps).
  void (*inv_sqrt)(const float* v, float eps, float* out, int64_t n);
  /// Mean and biased variance over the rows, two passes in row order.
  void (*bn_moments)(const float* X, int64_t n, int64_t C, float* mean, float* var);
  /// alpha = gamma|null * istd (istd without gamma), shift = beta|null (0 without) - mean * alpha.
  void (*bn_scale_shift)(const float* gamma, const float* beta, const float* mean, const float* istd, float* alpha,
                         float* shift, int64_t C);
  /// Y = X * alpha + shift|null.
  void (*bn_affine)(const float* X, const float* alpha, const float* shift, float* Y, int64_t n, int64_t C);
  /// xhat = (X - mean) * istd; Y = xhat * gamma|null + beta|null.
  void (*bn_normalize)(const float* X, const float* mean, const float* istd, const float* gamma, const float* beta,
                       float* xhat, float* Y, int64_t n, int64_t C);
  /// The running statistics' update at momentum m: Keras' (r -= (r - batch) * m) or PyTorch's
  /// (r = m * batch (* unbias for the variance) + (1 - m) * r).
  void (*bn_running)(float* rm, float* rv, const float* mean, const float* var, float m, bool keras, float unbias,
                     int64_t C);
  /// A BatchNorm's inference pass on the running statistics (xa to ya) and its fit pass on one
  /// row's own statistics (xb to yb, saving xhat and istd), then, with `update`, bn_running's
  /// update: per element the operations of inv_sqrt, bn_scale_shift and bn_affine, then of
  /// bn_moments (one row), inv_sqrt, bn_normalize and bn_running, in that order, so the same values
  /// as those calls, in one pass over the channels instead of nine.
  void (*bn_pair_one_row)(const float* xa, float* ya, const float* xb, float* yb, float* xhat, float* istd,
                          const float* gamma, const float* beta, float* rm, float* rv, float eps, bool update, float m,
                          bool keras, float unbias, int64_t C);
  /// sum_g = sum of Gy over the rows, sum_gx = sum of Gy * h, h = xhat|null or (X - rm) * istd.
  void (*bn_sums)(const float* Gy, const float* xhat, const float* X, const float* rm, const float* istd, float* sum_g,
                  float* sum_gx, int64_t n, int64_t C);
  /// dx through fixed statistics: Dx = Gy * scale|null (1) * istd.
  void (*bn_dx_fixed)(const float* Gy, const float* scale, const float* istd, float* Dx, int64_t n, int64_t C);
  /// dx through the batch's own statistics: istd * (dh - mean(dh) - xhat * mean(dh * xhat)), dh =
  /// Gy * scale|null (1), the means from sum_g and sum_gx.
  void (*bn_dx_batch)(const float* Gy, const float* xhat, const float* scale, const float* istd, const float* sum_g,
                      const float* sum_gx, float* Dx, int64_t n, int64_t C);
  /// y = max(x, 0) as x > 0 ? x : 0; dx = y > 0 ? g : 0.
  void (*relu_forward)(const float* x, float* y, int64_t n);
  void (*relu_backward)(const float* y, const float* g, float* dx, int64_t n);
  /// dst[e * kWidth + v] = column[e] for every lane v: one lane's n values in every lane of an
  /// interleaved group (a model's state put into every lane; one store per value).
  void (*spread)(const float* column, float* dst, int64_t n);
  /// Whether every one of the n values is finite and, with `no_negative_zero`, none is -0 (bit
  /// tests; what the batched engine's zero-gradient shortcut requires of what it skips).
  bool (*all_finite)(const float* x, int64_t n, bool no_negative_zero);
};

/// The kernels in use: the best the CPU runs, unless BNLAB_ISA or set_isa() chose. Throws
/// std::runtime_error (the message isa_environment_error() gives) when BNLAB_ISA names a path
/// this CPU cannot run and set_isa() has not chosen one.
const Kernels& active();
/// Every instruction set this CPU can run ("portable" first).
std::vector<std::string> available();
/// Uses `isa` from now on; false (and no change) when the CPU cannot run it or it is unknown.
bool set_isa(const std::string& isa);

}  // namespace bnlab::lanes
