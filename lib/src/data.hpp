// Data sets: the seeded synthetic regression/classification generator and CSV files.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "bnlab/config.hpp"

namespace bnlab {

struct Dataset {
  torch::Tensor x;       ///< [N, F] float32 model inputs (standardized when configured)
  torch::Tensor x_raw;   ///< [N, F] float32 before standardization
  torch::Tensor y;       ///< [N, T] float32 targets; class labels as whole numbers for cross_entropy
  torch::Tensor x_mean;  ///< [F] training-set mean used to standardize (0 when not standardized)
  torch::Tensor x_std;   ///< [F] training-set std used to standardize (1 when not standardized)
  std::vector<std::string> feature_names;
  std::vector<std::string> target_names;
  int64_t classes = 0;   ///< cross_entropy: number of classes, else 0
  int64_t size() const { return x.size(0); }
  int64_t features() const { return x.size(1); }
  int64_t targets() const { return y.size(1); }
};

/// Builds the configured data set. Synthetic data depends only on (seed, data section).
/// CSV problems (ragged rows, non-numeric, NaN/Inf, missing columns) throw InputError
/// naming file, line and column.
Dataset load_data(const Config& config);

/// Synthetic data, exposed for tests.
Dataset make_synthetic(const DataConfig& data, LossKind loss, uint64_t seed);

/// Parses CSV text; `origin` names the file in messages.
Dataset parse_csv(const std::string& text, const std::string& origin, const DataConfig& data,
                  LossKind loss);

/// Fills x, x_mean and x_std from x_raw: standardized, or unchanged with mean 0 / std 1.
void prepare_inputs(Dataset& d, bool standardized);

/// Standardizes x in place with its own mean/std (std 0 becomes 1) and records them.
void standardize(Dataset& d);

}  // namespace bnlab
