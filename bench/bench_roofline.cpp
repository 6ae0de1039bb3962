// Micro-benchmark: this core's limits, for the roofline line of scripts/bench.sh. Measured here,
// on the machine the benchmark runs on, not copied from a data sheet:
//   peak_gflops ISA X      multiplies and adds on independent registers, no FMA (bnlab never fuses
//                          them: -ffp-contract=off), per instruction set this CPU runs
//   bandwidth_gbs LEVEL X  vector loads summed over a buffer that fits in L1 (32 KiB) or in L2
//                          (512 KiB) ("read"), and a read-modify-write sweep of the L2 buffer
//                          ("update": each element loaded and stored, as an SGD step does)
// Each figure is the best of five runs. Not a test. Usage: bench_roofline
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#if defined(__x86_64__) && defined(__GNUC__)
// Independent multiplies and adds, more chains than latency x ports, so that the loop runs at the
// ports' throughput: ten and ten under AVX-512 (32 registers; seven and seven measured 15% lower
// here), seven and seven under AVX2 (16 registers). One multiply/add pair: registers M and A,
// constants CM and CA.
#define BNLAB_PAIR(R, M, A, CM, CA) \
  "vmulps %%" R CM ", %%" R M ", %%" R M "\n\t vaddps %%" R CA ", %%" R A ", %%" R A "\n\t"
#define BNLAB_PAIRS7(R, CM, CA)                                                                      \
  BNLAB_PAIR(R, "0", "7", CM, CA) BNLAB_PAIR(R, "1", "8", CM, CA) BNLAB_PAIR(R, "2", "9", CM, CA)      \
  BNLAB_PAIR(R, "3", "10", CM, CA) BNLAB_PAIR(R, "4", "11", CM, CA) BNLAB_PAIR(R, "5", "12", CM, CA)   \
  BNLAB_PAIR(R, "6", "13", CM, CA)
#define BNLAB_CLOBBER16 \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13"

__attribute__((target("avx512f"))) double peak_avx512(long iters) {
  const auto t0 = std::chrono::steady_clock::now();
  __asm__ volatile("vxorps %%zmm30, %%zmm30, %%zmm30\n\t vxorps %%zmm31, %%zmm31, %%zmm31\n\t"
                   "1:\n\t" BNLAB_PAIRS7("zmm", "30", "31") BNLAB_PAIR("zmm", "14", "17", "30", "31")
                       BNLAB_PAIR("zmm", "15", "18", "30", "31") BNLAB_PAIR("zmm", "16", "19", "30", "31")
                   "dec %0\n\t jnz 1b\n\t"
                   : "+r"(iters)
                   :
                   : BNLAB_CLOBBER16, "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm30", "xmm31", "cc");
  return seconds_since(t0);
}

__attribute__((target("avx2"))) double peak_avx2(long iters) {
  const auto t0 = std::chrono::steady_clock::now();
  __asm__ volatile("vxorps %%ymm14, %%ymm14, %%ymm14\n\t vxorps %%ymm15, %%ymm15, %%ymm15\n\t"
                   "1:\n\t" BNLAB_PAIRS7("ymm", "14", "15") "dec %0\n\t jnz 1b\n\t"
                   : "+r"(iters)
                   :
                   : BNLAB_CLOBBER16, "xmm14", "xmm15", "cc");
  return seconds_since(t0);
}

double peak_sse(long iters) {  // the portable path's x86-64 baseline: 4-float SSE, two-operand form
  const auto t0 = std::chrono::steady_clock::now();
  __asm__ volatile(
      "xorps %%xmm14, %%xmm14\n\t xorps %%xmm15, %%xmm15\n\t"
      "1:\n\t"
      "mulps %%xmm14, %%xmm0\n\t addps %%xmm15, %%xmm6\n\t mulps %%xmm14, %%xmm1\n\t addps %%xmm15, %%xmm7\n\t"
      "mulps %%xmm14, %%xmm2\n\t addps %%xmm15, %%xmm8\n\t mulps %%xmm14, %%xmm3\n\t addps %%xmm15, %%xmm9\n\t"
      "mulps %%xmm14, %%xmm4\n\t addps %%xmm15, %%xmm10\n\t mulps %%xmm14, %%xmm5\n\t addps %%xmm15, %%xmm11\n\t"
      "mulps %%xmm14, %%xmm12\n\t addps %%xmm15, %%xmm13\n\t"
      "dec %0\n\t jnz 1b\n\t"
      : "+r"(iters)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc");
  return seconds_since(t0);
}

typedef float v16 __attribute__((vector_size(64)));

// Sums a buffer of n floats `reps` times with eight accumulators; returns the seconds.
__attribute__((target("avx512f"))) double read_sweep(const float* a, long n, int reps, float* sink) {
  const auto t0 = std::chrono::steady_clock::now();
  v16 s[8] = {};
  for (int r = 0; r < reps; ++r) {
    for (long k = 0; k + 128 <= n; k += 128)
      for (int j = 0; j < 8; ++j) {
        v16 v;
        std::memcpy(&v, a + k + 16 * j, sizeof v);
        s[j] += v;
      }
    __asm__ volatile("" ::: "memory");
  }
  const double t = seconds_since(t0);
  v16 total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  *sink += total[0];
  return t;
}

// a[k] = a[k] * 0.999 over n floats, `reps` times: each element loaded and stored once a sweep.
__attribute__((target("avx512f"))) double update_sweep(float* a, long n, int reps) {
  const auto t0 = std::chrono::steady_clock::now();
  const v16 m = v16{} + 0.999f;
  for (int r = 0; r < reps; ++r) {
    for (long k = 0; k + 16 <= n; k += 16) {
      v16 v;
      std::memcpy(&v, a + k, sizeof v);
      v *= m;
      std::memcpy(a + k, &v, sizeof v);
    }
    __asm__ volatile("" ::: "memory");
  }
  return seconds_since(t0);
}
#endif

template <class F>
double best_of_five(F f) {
  double best = 1e30;
  for (int i = 0; i < 5; ++i) best = std::min(best, f());
  return best;
}

}  // namespace

int main() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const long iters = 50000000;
  std::printf("peak_gflops portable %.1f\n", 14.0 * 4 * iters / best_of_five([&] { return peak_sse(iters); }) / 1e9);
  if (__builtin_cpu_supports("avx2"))
    std::printf("peak_gflops avx2 %.1f\n", 14.0 * 8 * iters / best_of_five([&] { return peak_avx2(iters); }) / 1e9);
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("# no AVX-512: the bandwidth sweeps are not measured\n");
    return 0;
  }
  std::printf("peak_gflops avx512 %.1f\n", 20.0 * 16 * iters / best_of_five([&] { return peak_avx512(iters); }) / 1e9);
  float sink = 0;
  for (const auto& [level, bytes] : {std::pair<const char*, long>{"L1", 32 << 10}, {"L2", 512 << 10}}) {
    const long n = bytes / 4;
    float* a = static_cast<float*>(std::aligned_alloc(4096, static_cast<size_t>(bytes)));
    for (long k = 0; k < n; ++k) a[k] = 1e-3f * static_cast<float>(k % 97);
    const int reps = static_cast<int>((1L << 32) / bytes);
    const double t = best_of_five([&] { return read_sweep(a, n, reps, &sink); });
    std::printf("bandwidth_gbs %s read %.1f\n", level, static_cast<double>(bytes) * reps / t / 1e9);
    if (level[1] == '2') {
      const double u = best_of_five([&] { return update_sweep(a, n, reps / 4); });
      std::printf("bandwidth_gbs L2 update %.1f\n", 2.0 * static_cast<double>(bytes) * (reps / 4) / u / 1e9);
    }
    std::free(a);
  }
  std::printf("# sink %g\n", static_cast<double>(sink));
#else
  std::printf("# not an x86-64 build: no peak measured\n");
#endif
  return 0;
}
