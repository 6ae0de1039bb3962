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

}  // namespace bnlab::kernels
