// Dense kernels over a group of kWidth lanes whose state is interleaved: element e of lane v of
// a group sits at [e * kWidth + v], so one lane's sum is a vertical SIMD operation with no
// horizontal step, and every lane keeps exactly the scalar summation order of kernels.hpp.
// Compiled once per instruction set (portable x86-64, AVX2, AVX-512; never with FMA), picked at
// load time from the CPU, or forced with BNLAB_ISA=portable|avx2|avx512 (what the tests compare).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bnlab::lanes {

/// Lanes per group: 16 floats, one AVX-512 register. The layout does not depend on the CPU.
constexpr int64_t kWidth = 16;

/// One instruction set's kernels. Shapes as in kernels.hpp, every array interleaved by lane:
/// W [out][in][kWidth], bias [out][kWidth], x [rows][in][kWidth], y [rows][out][kWidth].
struct Kernels {
  const char* isa;
  /// y[r] = W x[r] + bias: with `sequential` in kernels::gemm's order (k ascending from the
  /// bias), else in kernels::gemv's (eight partial sums, combined pairwise, tail, bias).
  void (*dense_forward)(const float* W, const float* bias, const float* x, float* y, int64_t rows, int64_t out,
                        int64_t in, bool sequential);
  /// From g [rows][out]: db (sum over rows), dW (sum of g x^T over rows; `from_zero`: added to 0
  /// as kernels::gemm does, else the first row assigned as kernels::outer does) and dx = W^T g;
  /// each output skipped when its pointer is null.
  void (*dense_backward)(const float* W, const float* x, const float* g, float* dW, float* db, float* dx,
                         int64_t rows, int64_t out, int64_t in, bool from_zero);
};

/// The kernels in use: the best the CPU runs, unless BNLAB_ISA or set_isa() chose.
const Kernels& active();
/// Every instruction set this CPU can run ("portable" first).
std::vector<std::string> available();
/// Uses `isa` from now on; false (and no change) when the CPU cannot run it or it is unknown.
bool set_isa(const std::string& isa);

}  // namespace bnlab::lanes
