// Data sets: the seeded synthetic generator and a strict CSV reader.
#include "data.hpp"

#include <ATen/CPUGeneratorImpl.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

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
  d.x = (d.x_raw - d.x_mean).div_(d.x_std);  // the same operations as (x_raw - mean) / std, one temporary fewer
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

std::string_view trim(std::string_view s) {
  const auto b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  const auto e = s.find_last_not_of(" \t");
  return s.substr(b, e - b + 1);
}

/// The spellings of a missing value: an empty cell, NA, NaN, nan (after trimming spaces).
bool is_missing(std::string_view cell) { return cell.empty() || cell == "NA" || cell == "NaN" || cell == "nan"; }

enum class Cell { kNumber, kMissing, kNotNumber, kNotFinite };

/// A number as users write it: 1e-3, -0.5, +2, 42; surrounding spaces are allowed.
Cell read_number(std::string_view raw, double& v) {
  const std::string_view cell = trim(raw);
  if (is_missing(cell)) return Cell::kMissing;
  std::string_view digits = cell;
  if (digits.size() > 1 && digits[0] == '+' && digits[1] != '-' && digits[1] != '+') digits.remove_prefix(1);
  const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), v);
  if (r.ec == std::errc::result_out_of_range) return Cell::kNotFinite;
  if (r.ec != std::errc() || r.ptr != digits.data() + digits.size()) return Cell::kNotNumber;
  if (!std::isfinite(v) || std::abs(v) > 3.4e38) return Cell::kNotFinite;
  return Cell::kNumber;
}

/// A delimiter as a config writes it: "\t" for tab, else the character.
std::string delimiter_text(char c) { return c == '\t' ? "\\t" : std::string(1, c); }

std::string join_numbers(const std::vector<int64_t>& v) {
  std::vector<std::string> parts;
  for (int64_t x : v) parts.push_back(std::to_string(x));
  return join(parts, ", ");
}

std::string show(const std::string& s) { return "\"" + (s.size() > 40 ? s.substr(0, 40) + "..." : s) + "\""; }

/// Float storage for a tensor that owns it, without a copy.
torch::Tensor adopt(std::vector<float>&& values, int64_t rows, int64_t cols) {
  auto* owned = new std::vector<float>(std::move(values));
  return torch::from_blob(owned->data(), {rows, cols}, [owned](void*) { delete owned; }, torch::kFloat);
}

}  // namespace

Dataset parse_csv(std::string_view text, const std::string& origin, const DataConfig& d, LossKind loss,
                  const std::function<void(size_t)>& consumed) {
  std::vector<std::string> problems;
  const char delimiter = d.delimiter.size() == 1 ? d.delimiter[0] : ',';
  CsvReader reader(text, origin, delimiter);
  std::vector<std::string> header, cells;
  std::vector<CsvPosition> where;
  if (!reader.next(header, where)) throw InputError(origin + ": empty file: expected a header row with column names");
  for (auto& h : header) h = std::string(trim(h));
  const std::string at_header = origin + ":" + std::to_string(reader.line());
  const std::string delimiter_name = "\"" + delimiter_text(delimiter) + "\"";
  // One column whose name holds another common delimiter: the file is delimited differently.
  std::string hint;
  if (header.size() == 1)
    for (const char other : {',', ';', '\t', '|'})
      if (other != delimiter && header[0].find(other) != std::string::npos) {
        hint = "; the header is one column and holds '" + delimiter_text(other) + "': set data.delimiter to \"" + delimiter_text(other) +
               "\" (it is " + delimiter_name + ")";
        break;
      }
  const auto column_of = [&](const std::string& name) -> int64_t {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return static_cast<int64_t>(i);
    return -1;
  };
  std::vector<int64_t> target_idx, feature_idx;
  for (const auto& t : d.target_columns) {
    const int64_t i = column_of(t);
    if (i < 0) problems.push_back(at_header + ": missing target column \"" + t + "\"" + did_you_mean(t, header) + "; columns: " + join(header, ", ") + hint);
    target_idx.push_back(i);
  }
  std::vector<std::string> features = d.feature_columns;
  if (features.empty()) {
    for (const auto& h : header)
      if (std::find(d.target_columns.begin(), d.target_columns.end(), h) == d.target_columns.end()) features.push_back(h);
  }
  for (const auto& f : features) {
    const int64_t i = column_of(f);
    if (i < 0) problems.push_back(at_header + ": missing feature column \"" + f + "\"" + did_you_mean(f, header) + "; columns: " + join(header, ", ") + hint);
    feature_idx.push_back(i);
  }
  if (features.empty()) problems.push_back(at_header + ": no feature columns left after the targets" + hint);
  if (!problems.empty()) throw InputError(problems);

  const bool drop = d.missing == "drop_rows";
  const bool classify = loss == LossKind::kCrossEntropy;
  const int64_t f = static_cast<int64_t>(feature_idx.size()), t = static_cast<int64_t>(target_idx.size());
  // Reserve for every line: the count is an upper bound of the rows, found at memory speed.
  size_t lines = 0;
  for (const char* p = text.data(); (p = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(text.data() + text.size() - p)))); ++p) ++lines;
  std::vector<float> xs, ys;
  xs.reserve((lines + 1) * static_cast<size_t>(f));
  ys.reserve((lines + 1) * static_cast<size_t>(t));
  std::vector<int64_t> labels_read;  // cross_entropy: each row's label as the file writes it
  std::vector<int64_t> non_numeric;  // columns already reported as not numeric
  Dataset out;
  int64_t rows = 0;
  std::vector<double> row(static_cast<size_t>(f + t));
  const auto place = [&](int64_t col) {
    return origin + ":" + std::to_string(where[col].line) + ":" + std::to_string(where[col].column) + ": column " +
           std::to_string(col + 1) + " (\"" + header[col] + "\")";
  };
  while (reader.next(cells, where)) {
    if (++out.rows_read % 65536 == 0 && consumed) consumed(reader.offset());
    if (cells.size() != header.size()) {
      std::string why = origin + ":" + std::to_string(reader.line()) + ": row has " + std::to_string(cells.size()) + " cells, the header has " +
                        std::to_string(header.size());
      for (const char other : {',', ';', '\t', '|'})
        if (other != delimiter && std::any_of(cells.begin(), cells.end(), [&](const std::string& c) { return c.find(other) != std::string::npos; })) {
          why += " (it holds '" + delimiter_text(other) + "': mixed delimiters? data.delimiter is " + delimiter_name + ")";
          break;
        }
      problems.push_back(why);
      if (problems.size() >= 20) break;
      continue;
    }
    bool missing = false;
    for (int64_t k = 0; k < f + t; ++k) {
      const int64_t col = k < f ? feature_idx[k] : target_idx[k - f];
      double v = 0;
      switch (read_number(cells[col], v)) {
        case Cell::kNumber:
          if (classify && k >= f && (v != std::floor(v) || std::abs(v) > 9007199254740992.0)) {
            problems.push_back(place(col) + ": class label " + show(std::string(trim(cells[col]))) +
                               " is not a whole number (cross_entropy takes whole-number labels; they need not start at 0)");
          }
          row[k] = v;
          break;
        case Cell::kMissing:
          if (!drop)
            problems.push_back(place(col) + ": missing value" + (trim(cells[col]).empty() ? "" : " " + show(std::string(trim(cells[col])))) +
                               "; set data.missing to \"drop_rows\" to leave such rows out");
          missing = true;
          break;
        case Cell::kNotFinite:
          problems.push_back(place(col) + ": value " + show(std::string(trim(cells[col]))) + " is not finite in float32");
          break;
        case Cell::kNotNumber:
          if (k < f) {
            if (std::find(non_numeric.begin(), non_numeric.end(), col) == non_numeric.end()) {
              non_numeric.push_back(col);
              std::vector<std::string> others;
              for (const auto& name : features)
                if (name != header[col]) others.push_back("\"" + name + "\"");
              problems.push_back(place(col) + ": feature column \"" + header[col] + "\" is not numeric (its first non-numeric value: " +
                                 show(std::string(trim(cells[col]))) + "); leave it out by listing the features in data.feature_columns" +
                                 (others.size() <= 20 ? ", e.g. [" + join(others, ", ") + "]" : ""));
            }
          } else {
            problems.push_back(place(col) + ": not a number: " + show(std::string(trim(cells[col]))));
          }
          break;
      }
    }
    if (problems.size() >= 20) break;
    if (missing) {
      if (drop) out.dropped_lines.push_back(reader.line());
      continue;
    }
    for (int64_t k = 0; k < f; ++k) xs.push_back(static_cast<float>(row[k]));
    if (classify) labels_read.push_back(static_cast<int64_t>(row[f]));  // exact: a float holds whole numbers only to 2^24
    else
      for (int64_t k = f; k < f + t; ++k) ys.push_back(static_cast<float>(row[k]));
    ++rows;
  }
  if (!problems.empty()) throw InputError(problems);
  if (rows < 2)
    throw InputError(origin + ": needs at least 2 data rows, found " + std::to_string(rows) +
                     (out.dropped_lines.empty() ? "" : " (" + std::to_string(out.dropped_lines.size()) + " dropped for missing values)"));

  if (classify) {
    // Labels map to classes in sorted order (or in data.class_labels' order).
    std::vector<int64_t> labels = d.class_labels;
    if (labels.empty()) {
      const std::set<int64_t> found(labels_read.begin(), labels_read.end());
      labels.assign(found.begin(), found.end());
    }
    std::map<int64_t, float> index;
    for (size_t i = 0; i < labels.size(); ++i) index[labels[i]] = static_cast<float>(i);
    for (const int64_t label : labels_read) {
      const auto it = index.find(label);
      if (it == index.end())
        throw InputError(origin + ": column \"" + d.target_columns[0] + "\" holds the label " + std::to_string(label) +
                         ", which data.class_labels does not list (" + join_numbers(labels) + ")");
      ys.push_back(it->second);
    }
    if (labels.size() < 2)
      throw InputError(origin + ": cross_entropy needs at least 2 classes in column \"" + d.target_columns[0] + "\", found one (" +
                       std::to_string(labels[0]) + ")");
    out.classes = static_cast<int64_t>(labels.size());
    out.class_labels = labels;
  }
  out.x_raw = adopt(std::move(xs), rows, f);
  out.y = adopt(std::move(ys), rows, t);
  out.feature_names = features;
  out.target_names = d.target_columns;
  prepare_inputs(out, d.standardize);
  return out;
}

namespace {

/// A file's bytes, mapped read-only (no copy in memory); unmapped when it goes.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw InputError(path + ": cannot read the data file named by data.path (" + errno_text() + ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw InputError(path + ": data.path must name a regular file");
    }
    size_ = static_cast<size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        ::close(fd);
        throw InputError(path + ": cannot map the data file (" + errno_text() + ")");
      }
      ::madvise(p, size_, MADV_SEQUENTIAL);
      data_ = static_cast<const char*>(p);
    }
    ::close(fd);
  }
  /// The first `bytes` are read: their pages leave this process (they stay in the page cache),
  /// so a file larger than memory reads in a window, not whole.
  void release(size_t bytes) {
    const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
    const size_t upto = bytes / page * page;
    if (data_ != nullptr && upto > released_) {
      ::madvise(const_cast<char*>(data_) + released_, upto - released_, MADV_DONTNEED);
      released_ = upto;
    }
  }
  ~MappedFile() {
    if (data_ != nullptr) ::munmap(const_cast<char*>(data_), size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  std::string_view text() const { return {data_ == nullptr ? "" : data_, size_}; }

 private:
  const char* data_ = nullptr;
  size_t size_ = 0, released_ = 0;
};

}  // namespace

Dataset load_data(const Config& c) {
  if (c.data.source == "csv") {
    const std::string path = resolve_path(c.base_dir, c.data.path);
    MappedFile file(path);
    return parse_csv(file.text(), path, c.data, c.model.loss, [&](size_t bytes) { file.release(bytes); });
  }
  return make_synthetic(c.data, c.model.loss, c.data.seed);
}

std::string data_record(const Config& c, const Dataset& d) {
  nlohmann::ordered_json j{{"format", "bnlab.data/1"},
                           {"path", c.data.path},
                           {"delimiter", c.data.delimiter},
                           {"missing", c.data.missing},
                           {"rows_read", d.rows_read},
                           {"rows_dropped", d.dropped_lines.size()},
                           {"rows_used", d.size()},
                           {"dropped_lines", d.dropped_lines},
                           {"sample_indices", c.data.sample_indices()}};
  if (!d.class_labels.empty()) {
    auto classes = nlohmann::ordered_json::array();
    for (size_t i = 0; i < d.class_labels.size(); ++i) classes.push_back({{"class", i}, {"label", d.class_labels[i]}});
    j["classes"] = classes;
  }
  return j.dump(2) + "\n";
}

std::string data_line(const Config& c, const Dataset& d) {
  std::string s = "data: " + c.data.path + ": " + std::to_string(d.rows_read) + " rows";
  if (!d.dropped_lines.empty()) {
    std::vector<std::string> lines;
    for (size_t i = 0; i < d.dropped_lines.size() && i < 10; ++i) lines.push_back(std::to_string(d.dropped_lines[i]));
    s += ", " + std::to_string(d.dropped_lines.size()) + " dropped for missing values (line" + (lines.size() > 1 ? "s " : " ") +
         join(lines, ", ") + (d.dropped_lines.size() > lines.size() ? ", ..." : "") + "), " + std::to_string(d.size()) +
         " used; sample indices count the rows used";
  }
  if (!d.class_labels.empty()) {
    std::vector<std::string> map;
    for (size_t i = 0; i < d.class_labels.size(); ++i) map.push_back(std::to_string(i) + " = " + std::to_string(d.class_labels[i]));
    s += "; classes (class = label): " + join(map, ", ");
  }
  return s;
}

void copy_rows(const float* src, int64_t n, int64_t width, const int64_t* ids, int64_t count, float* dst) {
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < n, "copy_rows: row ", ids[i], " of ", n);
    std::copy_n(src + ids[i] * width, width, dst + i * width);
  }
}

}  // namespace bnlab
