// Dense kernels of the batched engine, torch-free. Each output is summed in a fixed order (k
// ascending, from the initial value), whatever the vector width the CPU offers, so results are
// identical on every x86-64 machine: an AVX2 version is picked at load time where the CPU has
// it, and this file is compiled without floating-point contraction (no FMA).
#pragma once

#include <cstdint>

namespace bnlab::kernels {

/// C[M, N] = init + A[M, K] . B[K, N], all row-major and contiguous; `init` is a row of N
/// added to every row of C (nullptr: zero).
void gemm(const float* A, const float* B, float* C, int64_t M, int64_t K, int64_t N, const float* init);

/// At[cols, rows] = A[rows, cols]^T.
void transpose(const float* A, float* At, int64_t rows, int64_t cols);

/// sum_k a[k] * b[k], in eight interleaved partial sums combined pairwise.
float dot(const float* a, const float* b, int64_t n);

/// y[o] = dot(W[o, :], x) + bias[o] for o < out; W is [out, in] row-major. The same sums as dot().
void gemv(const float* W, const float* x, const float* bias, float* y, int64_t out, int64_t in);

/// dW[o, k] = g[o] * x[k] (accumulate: +=), W-shaped [out, in].
void outer(const float* g, const float* x, float* dW, int64_t out, int64_t in, bool accumulate);

/// dx[k] = sum_o g[o] * W[o, k], o ascending from 0; W is [out, in] row-major.
void gemv_t(const float* W, const float* g, float* dx, int64_t out, int64_t in);


}  // namespace bnlab::kernels
