// Micro-benchmark of the interleaved Dense kernels (lib/src/lane_kernels.inc) on one group of
// lanes::kWidth lanes of a model's Dense shapes, state laid out as the engine lays it (every
// layer's weights of the group in one block, which is larger than L1 and fits L2): nanoseconds
// per call and per weight vector (one weight of the 16 lanes, 64 bytes), and the bytes per second
// that makes, so each kernel can be set against bench_roofline's L2 bandwidth. The arrays are
// regions of one Arena, as the engine's are (aligned, their starts spread over the 4 KiB page).
// malloc's 16-byte alignment, which this program had before, split every 64-byte load over two
// cache lines whenever an array did not happen to start on a 64-byte boundary: measured here,
// that doubled the time of a layer in L1. Not a test.
// Usage: bench_kernels [REPEAT] [IN:OUT ...]   (default: seed_repro's 8:64 64:64 64:2)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "arena.hpp"
#include "lane_kernels.hpp"

namespace {

struct Shape {
  long long in, out;
};

template <class F>
double ns_per_call(long long repeat, F&& f) {
  for (long long i = 0; i < repeat / 10 + 1; ++i) f();
  double best = 1e30;
  for (int trial = 0; trial < 5; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    for (long long i = 0; i < repeat; ++i) f();
    const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, ns / static_cast<double>(repeat));
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  using bnlab::lanes::kWidth;
  const long long repeat = argc > 1 ? std::atoll(argv[1]) : 2000;
  std::vector<Shape> shapes;
  for (int i = 2; i < argc; ++i) {
    Shape s{};
    if (std::sscanf(argv[i], "%lld:%lld", &s.in, &s.out) != 2 || s.in < 1 || s.out < 1) {
      std::fprintf(stderr, "bench_kernels: expected IN:OUT, got \"%s\"\n", argv[i]);
      return 2;
    }
    shapes.push_back(s);
  }
  if (shapes.empty()) shapes = {{8, 64}, {64, 64}, {64, 2}};
  long long floats = 0, width = 0;
  for (const auto& s : shapes) {
    floats += (s.in + 1) * s.out * kWidth;
    width = std::max({width, s.in, s.out});
  }
  // Weights and biases of every layer in one block, as a group's parameters sit in the engine.
  const long long n = width * kWidth;
  bnlab::Arena arena;
  const size_t block_id = arena.reserve(floats);
  size_t vec_id[6];
  for (auto& id : vec_id) id = arena.reserve(n);
  arena.allocate();
  float* block = arena.at(block_id);
  float *xa = arena.at(vec_id[0]), *xb = arena.at(vec_id[1]), *ya = arena.at(vec_id[2]), *yb = arena.at(vec_id[3]),
        *g = arena.at(vec_id[4]), *dx = arena.at(vec_id[5]);
  unsigned seed = 12345;
  for (long long i = 0; i < floats; ++i) {
    seed = seed * 1103515245u + 12345u;
    block[i] = (static_cast<float>((seed >> 8) & 0xffff) / 65536.f - 0.5f) * 0.1f;
  }
  for (long long i = 0; i < n; ++i) {
    xa[i] = static_cast<float>(i % 7) * 0.25f;
    xb[i] = static_cast<float>(i % 5) * 0.5f;
    g[i] = 1e-3f * static_cast<float>(i % 3);  // small updates (lr 1e-8): repeats stay finite, nothing subnormal
  }
  const auto& k = bnlab::lanes::active();
  bnlab::lanes::Sgd sgd;
  sgd.neg_lr = -1e-8f;
  std::printf("# isa %s, %lld lanes per group, state %.0f KB\n", k.isa, static_cast<long long>(kWidth),
              static_cast<double>(floats) * 4 / 1e3);
  long long at = 0;
  double total_fwd = 0, total_bwd = 0;
  long long total_w = 0;
  for (const auto& s : shapes) {
    float* W = block + at;
    float* b = W + s.in * s.out * kWidth;
    at += (s.in + 1) * s.out * kWidth;
    const double fwd = ns_per_call(repeat, [&] { k.dense_forward_pair(W, b, xa, ya, xb, yb, s.out, s.in); });
    const double one = ns_per_call(repeat, [&] { k.dense_forward(W, b, xa, ya, 1, s.out, s.in, false); });
    // The weights every lane shares (train's layers below its topmost BatchNorm): one plain copy,
    // here the block's first in x out floats, broadcast to the lanes.
    const double same = ns_per_call(repeat, [&] { k.dense_forward_same(W, b, xa, ya, 1, s.out, s.in); });
    const double bwd = ns_per_call(repeat, [&] {
      k.dense_backward_sgd(W, b, xa, g, dx, 1, s.out, s.in, false, sgd);
    });
    const double w = static_cast<double>(s.in * s.out);
    std::printf("kernel forward_pair %lldx%lld ns %.1f ns_per_wvec %.3f gbs %.1f\n", s.in, s.out, fwd, fwd / w, w * 64 / fwd);
    std::printf("kernel forward %lldx%lld ns %.1f ns_per_wvec %.3f gbs %.1f\n", s.in, s.out, one, one / w, w * 64 / one);
    std::printf("kernel forward_same %lldx%lld ns %.1f ns_per_wvec %.3f gbs %.1f\n", s.in, s.out, same, same / w,
                w * 4 / same);
    std::printf("kernel backward_sgd %lldx%lld ns %.1f ns_per_wvec %.3f gbs %.1f\n", s.in, s.out, bwd, bwd / w,
                w * 128 / bwd);
    total_fwd += fwd;
    total_bwd += bwd;
    total_w += s.in * s.out;
  }
  std::printf("total forward_pair ns %.1f backward_sgd ns %.1f per_lane_ns %.1f\n", total_fwd, total_bwd,
              (total_fwd + total_bwd) / static_cast<double>(kWidth));
  return 0;
}
