// Regression goldens, their check (for CI), and merging sharded studies. No torch.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

namespace bnlab {

/// Writes a golden file of every curve point and per-run and aggregate figure of a run
/// directory (atomically). Throws InputError when the directory is not a finished study.
void write_golden(const std::string& run_dir, const std::string& out_file);

struct CheckOptions {
  double rtol = 1e-5;         ///< |got - expected| <= atol + rtol * |expected|
  double atol = 1e-8;
  std::string junit;          ///< also write JUnit XML here when set
};

/// Compares a run directory against a golden file; prints a readable diff of every value
/// out of tolerance, missing or unexpected. Returns the number of mismatches.
size_t check_golden(const std::string& run_dir, const std::string& golden_file, const CheckOptions& options,
                    std::ostream& out);

/// Combines the shard directories of one study into `out_dir`: the same runs, curves,
/// metrics, summaries and plots as a single unsharded run. Throws InputError when the shards
/// belong to different experiments, overlap inconsistently or leave runs missing.
void merge_shards(const std::vector<std::string>& shard_dirs, const std::string& out_dir, bool force, bool plots,
                  std::ostream& log);

/// "" unless the environment's BNLAB_ISA (which forces the batched engine's instruction set:
/// portable, avx2 or avx512) names one this CPU cannot run; then the message saying so.
std::string isa_environment_error();

}  // namespace bnlab
