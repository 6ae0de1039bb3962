// Data sets: the seeded synthetic regression/classification generator and CSV files.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "bnlab/config.hpp"

namespace bnlab {

struct Dataset {
  torch::Tensor x;       ///< [N, F] float32 model inputs (standardized when configured)
  torch::Tensor x_raw;   ///< [N, F] float32 before standardization (open_workspace keeps only sample_x_raw)
  torch::Tensor sample_x_raw;  ///< [K, F] x_raw of the fine-tuned samples, in finetune.samples' order (set by open_workspace)
  torch::Tensor y;       ///< [N, T] float32 targets; class labels as whole numbers for cross_entropy
  torch::Tensor x_mean;  ///< [F] training-set mean used to standardize (0 when not standardized)
  torch::Tensor x_std;   ///< [F] training-set std used to standardize (1 when not standardized)
  std::vector<std::string> feature_names;
  std::vector<std::string> target_names;
  int64_t classes = 0;   ///< cross_entropy: number of classes, else 0
  std::vector<int64_t> class_labels;  ///< CSV cross_entropy: the file's label of each class (y holds class indices)
  int64_t rows_read = 0;              ///< CSV: data rows in the file
  std::vector<size_t> dropped_lines;  ///< CSV with data.missing "drop_rows": the line of each dropped row
  int64_t size() const { return x.size(0); }
  int64_t features() const { return x.size(1); }
  int64_t targets() const { return y.size(1); }
};

/// Builds the configured data set. Synthetic data depends only on (seed, data section).
/// CSV problems (ragged rows, non-numeric, NaN/Inf, missing columns) throw InputError
/// naming file, line and column.
Dataset load_data(const Config& config);

/// data.json of a run directory with a CSV source: the file, its rows read, dropped (with their
/// lines) and used, and each class's original label.
std::string data_record(const Config& config, const Dataset& data);

/// The same in one line for the log.
std::string data_line(const Config& config, const Dataset& data);

/// Synthetic data, exposed for tests.
Dataset make_synthetic(const DataConfig& data, LossKind loss, uint64_t seed);

/// Parses CSV text; `origin` names the file in messages. `consumed`, when given, is told now and
/// then how many bytes of the text are read and no longer needed (load_data lets them go).
Dataset parse_csv(std::string_view text, const std::string& origin, const DataConfig& data,
                  LossKind loss, const std::function<void(size_t)>& consumed = {});

/// Fills x, x_mean and x_std from x_raw: standardized, or unchanged with mean 0 / std 1.
void prepare_inputs(Dataset& d, bool standardized);

/// Standardizes x in place with its own mean/std (std 0 becomes 1) and records them.
void standardize(Dataset& d);

/// Rows ids[0..count) of src, a [n, width] float32 matrix, in that order, into dst (count x
/// width floats): what index_select(0, ids) gives, as row copies. Each id is checked against n.
void copy_rows(const float* src, int64_t n, int64_t width, const int64_t* ids, int64_t count, float* dst);

}  // namespace bnlab
