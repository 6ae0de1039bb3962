// Arena: the batched engine's float arrays in one page-aligned allocation (and what
// bench_kernels lays its arrays out with, as the engine does). No torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace bnlab {

/// One page-aligned allocation cut into regions whose starts are spread over the 4 KiB
/// page (phases 512 bytes apart, visited 2560 bytes apart), so that arrays a loop walks at the
/// same index never sit a near-multiple of 4 KiB from each other. There a load waits on an
/// unrelated earlier store to the same page offset (4K aliasing); measured on this machine,
/// that cost a one-lane fine-tuning step 15 to 35% depending on where malloc put the arrays.
/// Blocks are reused within a thread (a freed arena's block serves the next one of its size).
/// `first_phase` lets a second arena (the optimizer's state) take the phases the first one's
/// hottest regions do not use.
class Arena {
 public:
  explicit Arena(int first_phase = 0) : phase_(first_phase) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();  ///< the block goes to the thread's spares (see allocate)
  /// Reserves `floats` floats, zeroed unless `zeroed` is false (a region its owner writes whole
  /// before reading); returns the region's id, valid once allocate() ran.
  size_t reserve(int64_t floats, bool zeroed = true);
  void allocate();
  float* at(size_t region) const { return base_ + offsets_[region]; }

 private:
  int phase_;
  std::vector<size_t> offsets_, sizes_;
  std::vector<bool> zeroed_;
  size_t end_ = 0;
  float* base_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace bnlab
