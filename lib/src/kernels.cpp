// Dense kernels of the batched engine; see kernels.hpp.
#include "kernels.hpp"

#include <algorithm>

namespace bnlab::kernels {

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BNLAB_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define BNLAB_CLONES
#endif

constexpr int64_t kRows = 4;   // rows of C per micro-tile
constexpr int64_t kCols = 16;  // columns of C per micro-tile: two 8-float vectors per row

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

BNLAB_CLONES
void gemm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N, const float* init) {
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows) {
    int64_t j = 0;
    for (; j + kCols <= N; j += kCols) {
      // A 4 x 16 tile of C in registers; each B row slice is loaded once for four rows of A.
      v8 acc[kRows][2];
      const v8 i0 = init ? load8(init + j) : v8{}, i1 = init ? load8(init + j + 8) : v8{};
      for (int64_t r = 0; r < kRows; ++r) {
        acc[r][0] = i0;
        acc[r][1] = i1;
      }
      for (int64_t k = 0; k < K; ++k) {
        const v8 b0 = load8(B + k * N + j), b1 = load8(B + k * N + j + 8);
        for (int64_t r = 0; r < kRows; ++r) {
          const float a = A[(i + r) * K + k];
          acc[r][0] += a * b0;
          acc[r][1] += a * b1;
        }
      }
      for (int64_t r = 0; r < kRows; ++r) {
        store8(C + (i + r) * N + j, acc[r][0]);
        store8(C + (i + r) * N + j + 8, acc[r][1]);
      }
    }
    for (; j < N; ++j)
      for (int64_t r = 0; r < kRows; ++r) {
        float s = init ? init[j] : 0.f;
        for (int64_t k = 0; k < K; ++k) s += A[(i + r) * K + k] * B[k * N + j];
        C[(i + r) * N + j] = s;
      }
  }
  for (; i < M; ++i) {
    float* c = C + i * N;
    for (int64_t j = 0; j < N; ++j) c[j] = init ? init[j] : 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = A[i * K + k];
      const float* b = B + k * N;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
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

BNLAB_CLONES
void gemv(const float* W, const float* x, const float* bias, float* y, int64_t out, int64_t in) {
  for (int64_t o = 0; o < out; ++o) y[o] = dot8(W + o * in, x, in) + (bias ? bias[o] : 0.f);
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
  for (int64_t k = 0; k < in; ++k) dx[k] = 0.f;
  for (int64_t o = 0; o < out; ++o) {
    const float go = g[o];
    const float* w = W + o * in;
    for (int64_t k = 0; k < in; ++k) dx[k] += go * w[k];
  }
}

}  // namespace bnlab::kernels
