#include "arena.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

namespace bnlab {

size_t Arena::reserve(int64_t floats, bool zeroed) {
  constexpr size_t kPage = 1024, kStep = 128, kVisit = 5;  // in floats: 4 KiB, 512 bytes, 2560 bytes apart
  const size_t phase = (static_cast<size_t>(phase_++) * kVisit % (kPage / kStep)) * kStep;
  size_t start = end_ - end_ % kPage + phase;
  if (start < end_) start += kPage;
  offsets_.push_back(start);
  sizes_.push_back(static_cast<size_t>(std::max<int64_t>(floats, 0)));
  zeroed_.push_back(zeroed);
  end_ = start + sizes_.back();
  return offsets_.size() - 1;
}

namespace {
constexpr size_t kSpareBlocks = 4;
constexpr size_t kSpareBytes = size_t{64} << 20;  // a larger block goes back to the system
/// Blocks a thread's arenas gave back, kept for the next ones: a study builds several arenas per
/// work item, and fresh pages from the system cost a fault each on first touch (measured: 5 to 10%
/// of a 32-lane, 10-epoch work item). Per thread, so no lock; at most kSpareBlocks blocks of at
/// most kSpareBytes each, in a fixed array (giving a block back allocates nothing). An Arena must
/// not outlive its thread (Nets are locals of the functions that run them).
struct SpareBlocks {
  struct Block {
    float* base = nullptr;
    size_t bytes = 0;
  };
  Block blocks[kSpareBlocks];
  size_t count = 0;
  ~SpareBlocks() {
    for (size_t i = 0; i < count; ++i) std::free(blocks[i].base);
  }
};
thread_local SpareBlocks spare;
}  // namespace

Arena::~Arena() {
  if (base_ == nullptr) return;
  if (bytes_ > kSpareBytes) {
    std::free(base_);
    return;
  }
  if (spare.count == kSpareBlocks) {  // the oldest goes
    std::free(spare.blocks[0].base);
    for (size_t i = 1; i < kSpareBlocks; ++i) spare.blocks[i - 1] = spare.blocks[i];
    --spare.count;
  }
  spare.blocks[spare.count++] = {base_, bytes_};
}

void Arena::allocate() {
  size_t bytes = std::max<size_t>((end_ * sizeof(float) + 4095) / 4096 * 4096, 4096);
  // From half a huge page up, whole transparent huge pages: an arena of 1 MiB or more (two 16-lane
  // groups of seed_repro, 1.4 MB) then costs one page fault instead of 350, which a virtual
  // machine charges dearly (about 10 us per 4 KiB page touched first here). Not below: one
  // 16-lane group's 0.7 MB stays in small pages, because a huge page's first touch measured 0.15
  // ms in a test program but 5 to 6 ms inside bnlab in 4 of 6 runs (the host backing 2 MiB at once).
  constexpr size_t kHuge = size_t{2} << 20;
  const bool huge = bytes >= kHuge / 2;
  if (huge) bytes = (bytes + kHuge - 1) / kHuge * kHuge;
  // The smallest spare block that holds it and is at most twice its size, else a new one.
  size_t best = kSpareBlocks;
  for (size_t i = 0; i < spare.count; ++i) {
    const size_t b = spare.blocks[i].bytes;
    if (b >= bytes && b <= 2 * bytes && (best == kSpareBlocks || b < spare.blocks[best].bytes)) best = i;
  }
  if (best != kSpareBlocks) {
    base_ = spare.blocks[best].base;
    bytes_ = spare.blocks[best].bytes;
    for (size_t i = best + 1; i < spare.count; ++i) spare.blocks[i - 1] = spare.blocks[i];
    --spare.count;
  } else {
    base_ = static_cast<float*>(std::aligned_alloc(huge ? kHuge : 4096, bytes));
    if (base_ == nullptr) throw std::bad_alloc();
    bytes_ = bytes;
#ifdef MADV_HUGEPAGE
    if (huge) ::madvise(base_, bytes, MADV_HUGEPAGE);  // advice only: without it, small pages
#endif
  }
  for (size_t r = 0; r < offsets_.size(); ++r)
    if (zeroed_[r]) std::memset(base_ + offsets_[r], 0, sizes_[r] * sizeof(float));
}

}  // namespace bnlab
