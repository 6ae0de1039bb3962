// Data sets: the seeded synthetic generator and a strict CSV reader.
#include "data.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "bnlab/errors.hpp"
#include "csv.hpp"
#include "text.hpp"

namespace bnlab {

Dataset make_synthetic(const DataConfig& d, LossKind loss, uint64_t seed) {
  // Everything is drawn from one generator in a fixed order, so the data depend only on
  // (seed, data settings). The target has a linear part and two smooth nonlinear parts;
  // the noise is heteroscedastic: its std varies by a factor e between samples.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t n = d.samples, f = d.features;
  Dataset out;
  out.x_raw = torch::randn({n, f}, gen);
  const auto col = [&](int64_t i) { return out.x_raw.select(1, i % f); };
  const auto nonlinear = (0.5 * torch::tanh(col(0) * col(1)) + 0.25 * torch::sin(col(2))).unsqueeze(1);
  for (int64_t i = 0; i < f; ++i) out.feature_names.push_back("x" + std::to_string(i));
  if (loss == LossKind::kCrossEntropy) {
    const auto w = torch::randn({f, d.classes}, gen) / std::sqrt(static_cast<double>(f));
    const auto logits = torch::matmul(out.x_raw, w) + nonlinear + d.noise * torch::randn({n, d.classes}, gen);
    out.y = logits.argmax(1, /*keepdim=*/true).to(torch::kFloat);
    out.classes = d.classes;
    out.target_names = {"label"};
  } else {
    const auto w = torch::randn({f, d.targets}, gen) / std::sqrt(static_cast<double>(f));
    const auto mean = d.scale * (torch::matmul(out.x_raw, w) + nonlinear);
    const auto sigma = d.noise * torch::exp(0.5 * torch::tanh(col(3))).unsqueeze(1);
    out.y = mean + sigma * torch::randn({n, d.targets}, gen);
    for (int64_t t = 0; t < d.targets; ++t) out.target_names.push_back("y" + std::to_string(t));
  }
  prepare_inputs(out, d.standardize);
  return out;
}

void standardize(Dataset& d) {
  d.x_mean = d.x_raw.mean(0);
  d.x_std = d.x_raw.std(0);
  d.x_std = torch::where(d.x_std > 0, d.x_std, torch::ones_like(d.x_std));
  d.x = (d.x_raw - d.x_mean) / d.x_std;
}

void prepare_inputs(Dataset& d, bool standardized) {
  if (standardized) {
    standardize(d);
  } else {
    d.x = d.x_raw.clone();
    d.x_mean = torch::zeros({d.x_raw.size(1)});
    d.x_std = torch::ones({d.x_raw.size(1)});
  }
}

namespace {

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

}  // namespace

Dataset parse_csv(const std::string& text, const std::string& origin, const DataConfig& d,
                  LossKind loss) {
  std::vector<std::string> problems;
  CsvReader reader(text, origin);
  std::vector<std::string> header, cells;
  std::vector<CsvPosition> where;
  if (!reader.next(header, where)) throw InputError(origin + ": empty file: expected a header row with column names");
  for (auto& h : header) h = trim(h);
  const auto column_of = [&](const std::string& name) -> int64_t {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return static_cast<int64_t>(i);
    return -1;
  };
  const std::string at_header = origin + ":" + std::to_string(reader.line());
  std::vector<int64_t> target_idx, feature_idx;
  for (const auto& t : d.target_columns) {
    const int64_t i = column_of(t);
    if (i < 0) problems.push_back(at_header + ": missing target column \"" + t + "\"" + did_you_mean(t, header) + "; columns: " + join(header, ", "));
    target_idx.push_back(i);
  }
  std::vector<std::string> features = d.feature_columns;
  if (features.empty()) {
    for (const auto& h : header)
      if (std::find(d.target_columns.begin(), d.target_columns.end(), h) == d.target_columns.end()) features.push_back(h);
  }
  for (const auto& f : features) {
    const int64_t i = column_of(f);
    if (i < 0) problems.push_back(at_header + ": missing feature column \"" + f + "\"" + did_you_mean(f, header) + "; columns: " + join(header, ", "));
    feature_idx.push_back(i);
  }
  if (features.empty()) problems.push_back(at_header + ": no feature columns left after the targets");
  if (!problems.empty()) throw InputError(problems);

  std::vector<float> xs, ys;
  int64_t rows = 0;
  while (reader.next(cells, where)) {
    const std::string line = std::to_string(reader.line());
    if (cells.size() != header.size()) {
      problems.push_back(origin + ":" + line + ": row has " + std::to_string(cells.size()) +
                         " cells, the header has " + std::to_string(header.size()));
      if (problems.size() >= 20) break;
      continue;
    }
    const auto number = [&](int64_t col) -> float {
      const std::string cell = trim(cells[col]);
      const std::string place = origin + ":" + std::to_string(where[col].line) + ":" + std::to_string(where[col].column) +
                                ": column " + std::to_string(col + 1) + " (\"" + header[col] + "\")";
      char* end = nullptr;
      errno = 0;
      const double v = std::strtod(cell.c_str(), &end);
      if (cell.empty() || end != cell.c_str() + cell.size()) {
        problems.push_back(place + ": not a number: \"" + cell + "\"");
        return 0.f;
      }
      if (!std::isfinite(v) || std::abs(v) > 3.4e38) {
        problems.push_back(place + ": value \"" + cell + "\" is not finite in float32");
        return 0.f;
      }
      return static_cast<float>(v);
    };
    for (int64_t c : feature_idx) xs.push_back(number(c));
    for (int64_t c : target_idx) ys.push_back(number(c));
    ++rows;
    if (problems.size() >= 20) break;
  }
  if (!problems.empty()) throw InputError(problems);
  if (rows < 2) throw InputError(origin + ": needs at least 2 data rows, found " + std::to_string(rows));

  Dataset out;
  const int64_t f = static_cast<int64_t>(feature_idx.size()), t = static_cast<int64_t>(target_idx.size());
  out.x_raw = torch::from_blob(xs.data(), {rows, f}, torch::kFloat).clone();
  out.y = torch::from_blob(ys.data(), {rows, t}, torch::kFloat).clone();
  out.feature_names = features;
  out.target_names = d.target_columns;
  if (loss == LossKind::kCrossEntropy) {
    const auto labels = out.y.select(1, 0);
    if (!labels.eq(labels.round()).all().item<bool>() || labels.min().item<float>() < 0)
      throw InputError(origin + ": cross_entropy needs whole, non-negative class labels in column \"" + d.target_columns[0] + "\"");
    out.classes = static_cast<int64_t>(labels.max().item<float>()) + 1;
    if (out.classes < 2) throw InputError(origin + ": cross_entropy needs at least 2 classes in column \"" + d.target_columns[0] + "\"");
  }
  prepare_inputs(out, d.standardize);
  return out;
}

Dataset load_data(const Config& c) {
  if (c.data.source == "csv") {
    const std::string path = resolve_path(c.base_dir, c.data.path);
    std::ifstream in(path, std::ios::binary);
    if (!in) throw InputError(path + ": cannot read the data file named by data.path (" + errno_text() + ")");
    std::stringstream ss;
    ss << in.rdbuf();
    return parse_csv(ss.str(), path, c.data, c.model.loss);
  }
  return make_synthetic(c.data, c.model.loss, c.data.seed);
}

}  // namespace bnlab
