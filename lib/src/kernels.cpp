// Dense kernels of the batched engine; see kernels.hpp.
#include "kernels.hpp"

#include "lane_kernels.hpp"

#include <algorithm>
#include <cmath>

namespace bnlab::kernels {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BNLAB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BNLAB_CLONES
#endif

// Eight floats as one value (GCC/Clang vector extension): one AVX register in the AVX2 clone,
// two SSE registers otherwise. Element-wise + and *, so sums keep their order.
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

}  // namespace

// The tiled product lives with the lane kernels, compiled per instruction set (AVX-512 tiles
// of 4 x 64 floats; the order of every sum is the same on each path).
void gemm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N, const float* init) {
  lanes::active().gemm(A, B, C, M, K, N, init);
}

void transpose(const float* A, float* At, int64_t rows, int64_t cols) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock)
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock)
      for (int64_t r = r0; r < std::min(rows, r0 + kBlock); ++r)
        for (int64_t c = c0; c < std::min(cols, c0 + kBlock); ++c) At[c * rows + r] = A[r * cols + c];
}

namespace {
// Eight partial sums (lane j takes k = j mod 8), combined pairwise, then the tail: the order
// every dot product here uses.
inline float dot8(const float* a, const float* b, int64_t n) {
  v8 acc{};
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) acc += load8(a + k) * load8(b + k);
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}
}  // namespace

BNLAB_CLONES
float dot(const float* a, const float* b, int64_t n) { return dot8(a, b, n); }

namespace {
// Two-input shuffles: element i of the result is element m_i of the concatenation a:b.
#if defined(__clang__)
#define BNLAB_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int v8i __attribute__((vector_size(32)));
#define BNLAB_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// Pairwise sums of adjacent elements of a and b, in 128-bit halves:
// {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7}.
inline v8 pair_sums(v8 a, v8 b) {
  return BNLAB_SHUFFLE(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + BNLAB_SHUFFLE(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Element r of the result is dot8's combination of acc[r]:
// ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) + ((acc[r][4] + acc[r][5]) + (acc[r][6] + acc[r][7])),
// the same additions on the same operands, done for eight rows at once.
inline v8 combine8(const v8* acc) {
  const v8 ab = pair_sums(acc[0], acc[1]), cd = pair_sums(acc[2], acc[3]);
  const v8 ef = pair_sums(acc[4], acc[5]), gh = pair_sums(acc[6], acc[7]);
  const v8 abcd = pair_sums(ab, cd), efgh = pair_sums(ef, gh);  // {A0123, B.., C.., D.., A4567, B.., C.., D..}
  return BNLAB_SHUFFLE(abcd, efgh, 0, 1, 2, 3, 8, 9, 10, 11) + BNLAB_SHUFFLE(abcd, efgh, 4, 5, 6, 7, 12, 13, 14, 15);
}
}  // namespace

BNLAB_CLONES
void gemv(const float* W, const float* x, const float* bias, float* y, int64_t out, int64_t in) {
  int64_t o = 0;
  // Eight rows at a time: eight independent accumulator chains (one chain is bound by the
  // latency of its additions), x loaded once for eight rows, the eight final combinations done
  // as vector additions. Each row's sum is dot8's, operation for operation.
  for (; o + 8 <= out; o += 8) {
    const float* w = W + o * in;
    v8 acc[8] = {};
    int64_t k = 0;
    for (; k + 8 <= in; k += 8) {
      const v8 xv = load8(x + k);
      for (int r = 0; r < 8; ++r) acc[r] += load8(w + r * in + k) * xv;
    }
    v8 s = combine8(acc);
    for (; k < in; ++k) {
      const v8 col = {w[k], w[in + k], w[2 * in + k], w[3 * in + k], w[4 * in + k], w[5 * in + k], w[6 * in + k], w[7 * in + k]};
      s += col * x[k];
    }
    store8(y + o, s + (bias ? load8(bias + o) : v8{}));
  }
  for (; o < out; ++o) y[o] = dot8(W + o * in, x, in) + (bias ? bias[o] : 0.f);
}

BNLAB_CLONES
void outer(const float* g, const float* x, float* dW, int64_t out, int64_t in, bool accumulate) {
  for (int64_t o = 0; o < out; ++o) {
    float* row = dW + o * in;
    const float go = g[o];
    if (accumulate) {
      for (int64_t k = 0; k < in; ++k) row[k] += go * x[k];
    } else {
      for (int64_t k = 0; k < in; ++k) row[k] = go * x[k];
    }
  }
}

BNLAB_CLONES
void gemv_t(const float* W, const float* g, float* dx, int64_t out, int64_t in) {
  // dx[k] = 0, then += g[o] * W[o, k] for o ascending. Up to 64 outputs at a time stay in
  // registers for the whole sum over o instead of going through memory at every o.
  constexpr int64_t kBlock = 64;
  int64_t k0 = 0;
  for (; k0 + kBlock <= in; k0 += kBlock) {
    v8 acc[kBlock / 8] = {};
    for (int64_t o = 0; o < out; ++o) {
      const float go = g[o];
      const float* w = W + o * in + k0;
      for (int j = 0; j < kBlock / 8; ++j) acc[j] += go * load8(w + 8 * j);
    }
    for (int j = 0; j < kBlock / 8; ++j) store8(dx + k0 + 8 * j, acc[j]);
  }
  for (int64_t k = k0; k < in; ++k) dx[k] = 0.f;
  for (int64_t o = 0; o < out; ++o) {
    const float go = g[o];
    const float* w = W + o * in;
    for (int64_t k = k0; k < in; ++k) dx[k] += go * w[k];
  }
}

}  // namespace bnlab::kernels
