// Study reports from the study store: aggregates, exports, summaries and plots, each in one
// streaming pass that holds a group's figures, never every run.
#include "report.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <thread>

#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "run_dir.hpp"
#include "tensorboard.hpp"
#include "text.hpp"

namespace bnlab {

using ojson = nlohmann::ordered_json;

double relative_difference(double a, double b) { return std::abs(a - b) / std::max({std::abs(a), std::abs(b), 1e-30}); }

void compute_lag(StrategyResult& r) {
  r.max_gap = r.lag_first = r.lag_steps = r.lag_relative = 0;
  r.final_gap = r.loss.empty() ? 0 : r.loss.back() - r.val_loss.back();
  for (size_t k = 0; k < r.loss.size(); ++k) r.max_gap = std::max(r.max_gap, std::abs(r.loss[k] - r.val_loss[k]));
  if (!r.loss.empty()) {
    r.lag_first = std::abs(r.loss[0] - r.evaluate_before);
    r.lag_relative = relative_difference(r.loss[0], r.evaluate_before);
  }
  for (size_t k = 0; k + 1 < r.loss.size(); ++k) {
    r.lag_steps = std::max(r.lag_steps, std::abs(r.loss[k + 1] - r.val_loss[k]));
    r.lag_relative = std::max(r.lag_relative, relative_difference(r.loss[k + 1], r.val_loss[k]));
  }
  r.lag_residual = std::max(r.lag_first, r.lag_steps);
  r.lag_identity_holds = r.lag_relative <= kLagTolerance;
}

double quantile(const std::vector<double>& sorted, double q) {
  // Linear interpolation between the closest ranks (numpy's default).
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const auto lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - static_cast<double>(lo));
}

Stats describe(std::vector<double> v) {
  Stats s;
  s.n = v.size();
  if (v.empty()) return s;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  s.mean = sum / static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.std = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0;
  s.median = quantile(v, 0.5);
  s.p25 = quantile(v, 0.25);
  s.p75 = quantile(v, 0.75);
  s.iqr = s.p75 - s.p25;
  s.p90 = quantile(v, 0.9);
  return s;
}

std::vector<RunKey> plan_runs(const Config& c) {
  std::vector<RunKey> keys;
  for (size_t g = 0; g < c.grid.size(); ++g)
    for (size_t s = 0; s < c.strategies.size(); ++s)
      for (size_t k = 0; k < c.seeds.size(); ++k)
        for (size_t i = 0; i < c.finetune.samples.size(); ++i) keys.push_back({keys.size(), g, s, k, i});
  return keys;
}

std::string keras_line(int64_t epoch, int64_t epochs, double loss, double val_loss, const double* accuracy,
                       const double* val_accuracy) {
  char buf[256];
  int n = std::snprintf(buf, sizeof buf, "Epoch %lld/%lld - loss: %.4e", static_cast<long long>(epoch),
                        static_cast<long long>(epochs), loss);
  if (accuracy) n += std::snprintf(buf + n, sizeof buf - n, " - accuracy: %.4e", *accuracy);
  n += std::snprintf(buf + n, sizeof buf - n, " - val_loss: %.4e", val_loss);
  if (val_accuracy) std::snprintf(buf + n, sizeof buf - n, " - val_accuracy: %.4e", *val_accuracy);
  return buf;
}

namespace {

std::string num(double v) { return csv_number(v); }

/// Points per strategy the gap distribution draws at most (evenly strided in run order), so
/// the SVG stays small however many runs there are.
constexpr size_t kGapPoints = 1000;

using Group = GroupDigest;

/// Feeds runs one by one (in run order, where each group's runs are consecutive) and keeps only
/// the current group's figures; a finished group becomes a Group.
class Digest {
 public:
  Digest(const Config& c, bool bands) : c_(c), bands_(bands) {}

  void add(const StrategyResult& r) {
    if (!open_ || r.grid != cur_.agg.grid || r.name != cur_.agg.strategy) start(r);
    Aggregate& a = cur_.agg;
    ++a.runs;
    if (r.failed) {
      ++a.failed;
      return;
    }
    a.diverged += r.diverged ? 1 : 0;
    cur_.lag_holds += r.lag_identity_holds ? 1 : 0;
    before_.push_back(r.evaluate_before);
    after_.push_back(r.evaluate_after);
    gap_.push_back(r.final_gap);
    lag_.push_back(r.lag_residual);
    change_.push_back(r.evaluate_after - r.evaluate_before);
    if (!bands_) return;
    ++cur_.curves;
    if (loss_.size() < r.loss.size()) loss_.resize(r.loss.size()), val_.resize(r.loss.size());
    for (size_t k = 0; k < r.loss.size(); ++k) loss_[k].push_back(r.loss[k]), val_[k].push_back(r.val_loss[k]);
  }

  /// The groups in config order (grid point, then strategy); groups without runs are absent.
  std::vector<Group> finish() {
    if (open_) close();
    std::vector<Group> out;
    for (size_t g = 0; g < c_.grid.size(); ++g)
      for (size_t s = 0; s < c_.strategies.size(); ++s) {
        const auto it = done_.find({g, s});
        if (it != done_.end()) out.push_back(std::move(it->second));
      }
    return out;
  }

 private:
  void start(const StrategyResult& r) {
    if (open_) close();
    size_t g = 0, s = 0;
    while (g < c_.grid.size() && c_.grid[g].label != r.grid) ++g;
    while (s < c_.strategies.size() && c_.strategies[s].name != r.name) ++s;
    if (g == c_.grid.size() || s == c_.strategies.size())
      throw InputError("run " + std::to_string(r.run) + " (strategy \"" + r.name + "\", grid \"" + r.grid +
                       "\") is not part of experiment \"" + c_.name + "\"");
    if (done_.count({g, s}))
      throw std::logic_error("runs of strategy " + r.name + " are not consecutive in run order");
    cur_ = Group{};
    cur_.grid = g;
    cur_.strategy = s;
    cur_.agg.grid = r.grid;
    cur_.agg.strategy = r.name;
    open_ = true;
  }

  /// quantile() of `v` as if sorted, in linear time (the two order statistics it interpolates).
  static double selected_quantile(std::vector<double>& v, double q) {
    const double pos = q * static_cast<double>(v.size() - 1);
    const auto lo = static_cast<size_t>(std::floor(pos));
    std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(lo), v.end());
    const double a = v[lo];
    const double b = lo + 1 < v.size() ? *std::min_element(v.begin() + static_cast<std::ptrdiff_t>(lo) + 1, v.end()) : a;
    return a + (b - a) * (pos - static_cast<double>(lo));
  }

  static Band band(std::vector<std::vector<double>>& per_epoch) {
    Band b;
    for (auto& v : per_epoch) {
      b.median.push_back(v.empty() ? NAN : selected_quantile(v, 0.5));
      b.p25.push_back(v.empty() ? NAN : selected_quantile(v, 0.25));
      b.p75.push_back(v.empty() ? NAN : selected_quantile(v, 0.75));
    }
    return b;
  }

  void close() {
    if (cur_.grid == 0 && !gap_.empty()) {
      const size_t stride = (gap_.size() + kGapPoints - 1) / kGapPoints;
      for (size_t i = 0; i < gap_.size(); i += stride) cur_.shown.push_back(gap_[i]);
      cur_.gaps = gap_;
      std::sort(cur_.gaps.begin(), cur_.gaps.end());
    }
    cur_.agg.final_gap = describe(std::move(gap_));
    cur_.agg.lag_residual = describe(std::move(lag_));
    cur_.agg.eval_change = describe(std::move(change_));
    cur_.evaluate_before = describe(std::move(before_));
    cur_.evaluate_after = describe(std::move(after_));
    cur_.loss = band(loss_);
    cur_.val_loss = band(val_);
    gap_.clear(), lag_.clear(), change_.clear(), before_.clear(), after_.clear(), loss_.clear(), val_.clear();
    done_.emplace(std::make_pair(cur_.grid, cur_.strategy), std::move(cur_));
    open_ = false;
  }

  const Config& c_;
  bool bands_;
  bool open_ = false;
  Group cur_;
  std::vector<double> gap_, lag_, change_, before_, after_;
  std::vector<std::vector<double>> loss_, val_;
  std::map<std::pair<size_t, size_t>, Group> done_;
};

std::vector<Aggregate> aggregates_of(std::vector<Group> groups) {
  std::vector<Aggregate> out;
  for (auto& g : groups) out.push_back(std::move(g.agg));
  return out;
}

ojson stats_json(const Stats& s) {
  return ojson{{"n", s.n},     {"mean", s.mean}, {"std", s.std}, {"median", s.median},
               {"p25", s.p25}, {"p75", s.p75},   {"iqr", s.iqr}, {"p90", s.p90}};
}

ojson run_json(const StrategyResult& r) {
  ojson j{{"run", r.run},   {"grid", r.grid},       {"strategy", r.name}, {"seed", r.seed},
          {"sample", r.sample}, {"engine", r.engine}, {"status", run_status(r)}, {"failed", r.failed}};
  if (r.failed) {
    j["error"] = r.error;
    return j;
  }
  j["diverged"] = r.diverged;
  j["evaluate_pretrained"] = r.evaluate_pretrained;
  j["evaluate_before"] = r.evaluate_before;
  j["evaluate_after"] = r.evaluate_after;
  j["best_epoch"] = r.best_epoch;
  j["final_loss"] = r.loss.back();
  j["final_val_loss"] = r.val_loss.back();
  j["final_gap"] = r.loss.back() - r.val_loss.back();
  j["max_gap"] = r.max_gap;
  j["lag"] = ojson{{"first", r.lag_first},     {"steps", r.lag_steps},         {"residual", r.lag_residual},
                   {"relative", r.lag_relative}, {"tolerance", kLagTolerance}, {"holds", r.lag_identity_holds}};
  j["loss"] = r.loss;
  j["val_loss"] = r.val_loss;
  if (!r.accuracy.empty()) {
    j["accuracy"] = r.accuracy;
    j["val_accuracy"] = r.val_accuracy;
  }
  return j;
}

std::string curves_rows(const StrategyResult& r, bool cls) {
  std::string out;
  if (r.failed) return out;
  const std::string head = r.name + "," + r.grid + "," + std::to_string(r.seed) + "," + std::to_string(r.sample) + ",";
  for (size_t k = 0; k < r.loss.size(); ++k) {
    out += head + std::to_string(k + 1) + "," + num(r.loss[k]) + "," + num(r.val_loss[k]);
    if (cls) out += "," + num(r.accuracy[k]) + "," + num(r.val_accuracy[k]);
    out += "\n";
  }
  return out;
}

const char* const kFigures[] = {"final_gap", "lag_residual", "eval_change"};
const char* const kStats[] = {"mean", "std", "median", "p25", "p75", "iqr", "p90"};

std::vector<double> stat_values(const Stats& s) { return {s.mean, s.std, s.median, s.p25, s.p75, s.iqr, s.p90}; }

std::string summary_csv(const std::vector<Aggregate>& aggs) {
  std::string out = "grid,strategy,runs,failed,diverged";
  for (const char* fig : kFigures) {
    out += std::string(",") + fig + "_n";
    for (const char* st : kStats) out += std::string(",") + fig + "_" + st;
  }
  out += "\n";
  for (const auto& a : aggs) {
    out += a.grid + "," + a.strategy + "," + std::to_string(a.runs) + "," + std::to_string(a.failed) + "," + std::to_string(a.diverged);
    for (const Stats* s : {&a.final_gap, &a.lag_residual, &a.eval_change}) {
      out += "," + std::to_string(s->n);
      for (double v : stat_values(*s)) out += "," + num(v);
    }
    out += "\n";
  }
  return out;
}

std::string per_run_table(const std::vector<StrategyResult>& runs, bool with_grid) {
  std::string out = std::string("| strategy |") + (with_grid ? " grid |" : "") +
                    " evaluate before | final loss | final val_loss | max gap | lag residual | lag identity | evaluate after |\n|---|" +
                    (with_grid ? "---|" : "") + "---|---|---|---|---|---|---|\n";
  char buf[512];
  for (const auto& r : runs) {
    if (r.failed) {
      out += "| " + r.name + " |" + (with_grid ? " " + r.grid + " |" : "") + " failed: " + r.error + " | | | | | | |\n";
      continue;
    }
    std::snprintf(buf, sizeof buf, " %.6f | %.6f%s | %.6f | %.3e | %.3e | %s | %.6f |\n", r.evaluate_before, r.loss.back(),
                  r.diverged ? " (diverged)" : "", r.val_loss.back(), r.max_gap, r.lag_residual,
                  r.lag_identity_holds ? "holds" : "broken", r.evaluate_after);
    out += "| " + r.name + " |" + (with_grid ? " " + r.grid + " |" : "") + buf;
  }
  return out;
}

std::string aggregate_table(const std::vector<Aggregate>& aggs, bool with_grid) {
  std::string out = std::string("| strategy |") + (with_grid ? " grid |" : "") +
                    " runs | diverged | failed | final gap median [IQR] | p90 | mean ± std | lag residual median | p90 |"
                    " eval after - before median | mean |\n|---|" +
                    (with_grid ? "---|" : "") + "---|---|---|---|---|---|---|---|---|---|\n";
  char buf[512];
  for (const auto& a : aggs) {
    std::snprintf(buf, sizeof buf, " %zu | %zu | %zu | %.4g [%.4g, %.4g] | %.4g | %.4g ± %.3g | %.3e | %.3e | %.4g | %.4g |\n",
                  a.runs, a.diverged, a.failed, a.final_gap.median, a.final_gap.p25, a.final_gap.p75, a.final_gap.p90,
                  a.final_gap.mean, a.final_gap.std, a.lag_residual.median, a.lag_residual.p90, a.eval_change.median,
                  a.eval_change.mean);
    out += "| " + a.strategy + " |" + (with_grid ? " " + a.grid + " |" : "") + buf;
  }
  return out;
}

/// gnuplot script: one panel per strategy, per grid point the loss and val_loss per epoch; for
/// groups of several runs the median with its interquartile band (diverged runs move the
/// median only as far as they are many).
std::string curves_script(const Config& c, const std::vector<Group>& groups, const std::string& terminal,
                          const std::string& output) {
  std::string s = "set terminal " + terminal + "\nset output '" + output + "'\n";
  const size_t n = c.strategies.size();
  const size_t cols = n <= 1 ? 1 : n <= 4 ? 2 : 3;
  const size_t rows = (n + cols - 1) / cols;
  s += "set multiplot layout " + std::to_string(rows) + "," + std::to_string(cols) + " title '" + c.name +
       ": loss (training, before each update) and val_loss (inference) per epoch'\n";
  int64_t epochs = 0;
  for (const auto& g : c.grid) epochs = std::max(epochs, g.finetune.epochs);
  s += "set key below horizontal maxrows 3 font ',8'\nset xlabel 'epoch'\nset grid\nset format y '%.7g'\n"
       "set style fill transparent solid 0.18 noborder\n";
  if (epochs <= 20) s += "set xtics 1\n";
  for (size_t si = 0; si < n; ++si) {
    std::string plot, blocks;
    size_t line = 0, diverged = 0;
    for (const auto& gr : groups) {
      if (gr.strategy != si || gr.curves == 0) continue;
      diverged += gr.agg.diverged;
      const std::string block = "$D" + std::to_string(line++);
      blocks += block + " << EOD\n";
      for (size_t k = 0; k < gr.loss.median.size(); ++k)
        blocks += std::to_string(k + 1) + " " + fmt_double(gr.loss.median[k]) + " " + fmt_double(gr.val_loss.median[k]) + " " +
                  fmt_double(gr.loss.p25[k]) + " " + fmt_double(gr.loss.p75[k]) + " " + fmt_double(gr.val_loss.p25[k]) + " " +
                  fmt_double(gr.val_loss.p75[k]) + "\n";
      blocks += "EOD\n";
      const std::string& label = c.grid[gr.grid].label;
      const bool many = gr.curves > 1;
      const std::string suffix = (label.empty() ? "" : " " + label) + (many ? " (median of " + std::to_string(gr.curves) + ")" : "");
      const std::string lc = " lc " + std::to_string(2 * line - 1), vc = " lc " + std::to_string(2 * line);
      if (many)
        plot += std::string(plot.empty() ? "plot " : ", ") + block + " using 1:4:5 with filledcurves" + lc + " title 'loss IQR" +
                (label.empty() ? "" : " " + label) + "', " + block + " using 1:6:7 with filledcurves" + vc + " title 'val_loss IQR" +
                (label.empty() ? "" : " " + label) + "'";
      plot += std::string(plot.empty() ? "plot " : ", ") + block + " using 1:2 with linespoints lw 2" + lc + " title 'loss" + suffix +
              "', " + block + " using 1:3 with linespoints dt 2 lw 2" + vc + " title 'val_loss" + suffix + "'";
    }
    const std::string title = c.strategies[si].name + (diverged > 0 ? " (" + std::to_string(diverged) + " diverged runs)" : "");
    s += blocks + "set title '" + title + "'\n" + (plot.empty() ? "plot 0 notitle" : plot) + "\n";
  }
  return s + "unset multiplot\n";
}

/// gnuplot script: the final gap per strategy at the first grid point, one panel per strategy
/// on its own scale (the strategies' gaps differ by orders of magnitude): box p25-p75, whiskers
/// p10-p90, median, at most kGapPoints runs as points. Each axis spans that strategy's 1st to
/// 99th percentile; the runs beyond it are counted on the panel instead of stretching it.
std::string gap_script(const Config& c, const std::vector<Group>& groups, const std::string& terminal,
                       const std::string& output) {
  const size_t n = c.strategies.size();
  const size_t cols = n <= 1 ? 1 : n <= 4 ? 2 : 3;
  const size_t rows = (n + cols - 1) / cols;
  std::string s = "set terminal " + terminal + "\nset output '" + output + "'\n";
  s += "set multiplot layout " + std::to_string(rows) + "," + std::to_string(cols) + " title '" + c.name +
       ": final gap (loss - val_loss) over seeds and samples" + (c.grid.size() > 1 ? ", " + c.grid.front().label : "") +
       "; each panel spans its 1st-99th percentile'\n";
  s += "set grid ytics\nset boxwidth 0.5\nset style fill empty\nunset xtics\nset xrange [0.3:1.7]\nset key off\n"
       "set format y '%.4g'\nset ytics font ',8'\n";
  for (size_t si = 0; si < n; ++si) {
    const Group* g = nullptr;
    for (const auto& gr : groups)
      if (gr.grid == 0 && gr.strategy == si) g = &gr;
    std::string title = c.strategies[si].name;
    if (g == nullptr || g->gaps.empty()) {
      s += "set title '" + title + " (no runs)'\nunset label\nplot 0 notitle\n";
      continue;
    }
    const auto q = [&](double p) { return quantile(g->gaps, p); };
    double lo = q(0.01), hi = q(0.99);
    const double pad = hi > lo ? 0.08 * (hi - lo) : std::max(1e-12, 0.1 * std::abs(hi));
    lo -= pad, hi += pad;
    const size_t below = static_cast<size_t>(std::lower_bound(g->gaps.begin(), g->gaps.end(), lo) - g->gaps.begin());
    const size_t above = static_cast<size_t>(g->gaps.end() - std::upper_bound(g->gaps.begin(), g->gaps.end(), hi));
    title += " (" + std::to_string(g->gaps.size()) + " runs" + (g->agg.diverged > 0 ? ", " + std::to_string(g->agg.diverged) + " diverged" : "") + ")";
    const std::string block = "$G" + std::to_string(si);
    s += block + " << EOD\n1 " + fmt_double(q(0.1)) + " " + fmt_double(q(0.25)) + " " + fmt_double(q(0.5)) + " " +
         fmt_double(q(0.75)) + " " + fmt_double(q(0.9)) + "\nEOD\n";
    s += block + "P << EOD\n";
    for (size_t i = 0; i < g->shown.size(); ++i)
      if (g->shown[i] >= lo && g->shown[i] <= hi) s += fmt_double(1.0 + 0.3 * ((static_cast<double>(i % 7) / 6.0) - 0.5)) + " " + fmt_double(g->shown[i]) + "\n";
    s += "EOD\nunset label\n";
    if (above > 0) s += "set label '" + std::to_string(above) + " above' at graph 0.5, graph 0.95 center font ',8' tc rgb '#b00000'\n";
    if (below > 0) s += "set label '" + std::to_string(below) + " below' at graph 0.5, graph 0.05 center font ',8' tc rgb '#b00000'\n";
    s += "set title '" + title + "' font ',9'\nset yrange [" + fmt_double(lo) + ":" + fmt_double(hi) + "]\n";
    s += "plot " + block + " using 1:3:2:6:5 with candlesticks whiskerbars lw 2, " + block + " using 1:4:4:4:4 with candlesticks lt -1 lw 3, " +
         block + "P using 1:2 with points pt 7 ps 0.4 lc rgb '#80404040'\n";
  }
  return s + "unset multiplot\n";
}

/// Runs gnuplot on `script`.
bool run_gnuplot(const std::string& script) {
  FILE* p = ::popen("gnuplot >/dev/null 2>&1", "w");
  if (p == nullptr) return false;
  std::fwrite(script.data(), 1, script.size(), p);
  return ::pclose(p) == 0;
}

/// A plot to render: its file stem, PNG size and script maker (terminal, output) -> script.
struct Plot {
  std::string stem, png_size;
  std::function<std::string(const std::string&, const std::string&)> make;
};

/// Renders every plot as PNG and SVG, all gnuplot processes at once (each is single-threaded),
/// to temporary names renamed into place when gnuplot succeeds.
void render(const std::string& dir, const std::vector<Plot>& plots, std::ostream& log) {
  struct Job {
    std::string tmp, script;
    bool ok = false;
  };
  std::vector<Job> jobs;
  for (const auto& p : plots) {
    const std::string png = temp_name(dir + "/" + p.stem + ".png"), svg = temp_name(dir + "/" + p.stem + ".svg");
    jobs.push_back({png, p.make("pngcairo noenhanced size " + p.png_size + " font ',10'", png)});
    jobs.push_back({svg, p.make("svg noenhanced size " + p.png_size + " dynamic font ',10'", svg)});
  }
  std::vector<std::thread> threads;
  for (auto& j : jobs) threads.emplace_back([&j] { j.ok = run_gnuplot(j.script); });
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < plots.size(); ++i) {
    const Job &png = jobs[2 * i], &svg = jobs[2 * i + 1];
    if (!png.ok || !svg.ok) {
      std::remove(png.tmp.c_str());
      std::remove(svg.tmp.c_str());
      log << "warning: gnuplot failed or is not installed; " << plots[i].stem
          << ".png/.svg not written (scripts/setup.sh installs gnuplot-nox)\n";
      continue;
    }
    try {
      for (const Job* j : {&png, &svg}) {
        const std::string path = dir + "/" + plots[i].stem + (j == &png ? ".png" : ".svg");
        claim_path(path);
        if (std::rename(j->tmp.c_str(), path.c_str()) != 0)
          throw std::runtime_error("cannot write " + path + " (renaming its temporary file: " + errno_text() + ")");
      }
    } catch (...) {  // no plot's temporary outlives the failure (a full disk, say)
      for (const auto& j : jobs) std::remove(j.tmp.c_str());
      throw;
    }
  }
}

/// Streams the exports a study gets and summary.json (whose per-run records are one of them)
/// from the store, and removes an export file not written this time.
void write_exports(const std::string& dir, const Config& c, Store& store, const std::vector<Aggregate>& aggs,
                   const std::vector<std::string>& exports, size_t planned, size_t stored) {
  const auto wanted = [&](const char* name) { return std::find(exports.begin(), exports.end(), name) != exports.end(); };
  const bool cls = c.model.loss == LossKind::kCrossEntropy;
  std::unique_ptr<AtomicWriter> curves, metrics, summary;
  if (wanted("curves")) {
    curves = std::make_unique<AtomicWriter>(dir + "/curves.csv");
    curves->write(std::string("strategy,grid,seed,sample,epoch,loss,val_loss") + (cls ? ",accuracy,val_accuracy" : "") + "\n");
  }
  if (wanted("metrics")) metrics = std::make_unique<AtomicWriter>(dir + "/metrics.jsonl");
  ojson aggs_json = ojson::array();
  for (const auto& a : aggs)
    aggs_json.push_back(ojson{{"grid", a.grid}, {"strategy", a.strategy}, {"runs", a.runs}, {"failed", a.failed},
                              {"diverged", a.diverged}, {"final_gap", stats_json(a.final_gap)},
                              {"lag_residual", stats_json(a.lag_residual)}, {"eval_change", stats_json(a.eval_change)}});
  ojson head{{"experiment", c.name},
             {"loss", to_string(c.model.loss)},
             {"semantics", to_string(c.model.batchnorm.semantics)},
             {"seeds", c.seeds},
             {"samples", c.finetune.samples},
             {"complete", stored == planned},
             {"runs_planned", planned},
             {"runs_finished", stored},
             {"store", kStoreName},
             {"diverged_rule", "final loss - first loss > " + fmt_double(c.report.diverged_factor) + " * max(1, |first loss|)"},
             {"aggregates", aggs_json}};
  if (c.finetune.on_sets()) head["sets"] = c.finetune.sets;  // each run's "sample" is then its set's position in "sets"
  summary = std::make_unique<AtomicWriter>(dir + "/summary.json");
  std::string text = head.dump(2);
  text.pop_back();  // the closing brace: the runs follow, one record per line
  text.erase(text.find_last_not_of(" \n") + 1);
  summary->write(text + (wanted("runs") ? ",\n  \"runs\": [\n" : "\n}\n"));
  bool first = true;
  if (curves || metrics || wanted("runs")) {
    store.for_each([&](const StrategyResult& r) {
      if (curves) curves->write(curves_rows(r, cls));
      if (metrics) metrics->write(metrics_lines(r));
      if (wanted("runs")) {
        summary->write(std::string(first ? "" : ",\n") + "    " + run_json(r).dump());
        first = false;
      }
    });
  }
  if (wanted("runs")) summary->write("\n  ]\n}\n");
  summary->commit();
  // An export not written this time is removed when bnlab wrote it (the store records which it
  // wrote), so that none disagrees with the store; a file of that name that is not bnlab's stays.
  std::string before = store.meta("exports_written");
  ojson written = ojson::array();
  for (const auto& [writer, name] : {std::make_pair(curves.get(), "curves.csv"), std::make_pair(metrics.get(), "metrics.jsonl")}) {
    if (writer != nullptr) {
      writer->commit();
      written.push_back(name);
    } else if (before.find(std::string("\"") + name + "\"") != std::string::npos && may_remove(dir + "/" + name)) {
      std::remove((dir + "/" + name).c_str());
    }
  }
  store.set_meta("exports_written", written.dump());
}

}  // namespace

std::string csv_number(double v) { return std::isfinite(v) ? fmt_double(v) : std::string(); }

StudyReport digest_study(const Config& c, const Store& store, size_t planned) {
  Digest d(c, /*bands=*/true);
  size_t stored = 0;
  store.for_each([&](const StrategyResult& r) { d.add(r), ++stored; }, /*curves=*/true);
  return StudyReport{"", d.finish(), stored, planned};
}

std::vector<Aggregate> aggregate(const Config& c, const std::vector<StrategyResult>& runs) {
  Digest d(c, false);
  for (const auto& r : runs) d.add(r);
  return aggregates_of(d.finish());
}

std::vector<Aggregate> aggregate(const Config& c, const Store& store) {
  Digest d(c, false);
  store.for_each([&](const StrategyResult& r) { d.add(r); }, /*curves=*/false);
  return aggregates_of(d.finish());
}

std::vector<std::string> exports_for(const Config& c, size_t runs) {
  if (!c.report.export_auto) return c.report.exports;
  if (runs <= static_cast<size_t>(c.report.export_limit)) return report_export_names();
  return {};
}

std::string metrics_lines(const StrategyResult& r) {
  std::string out;
  if (r.failed) {
    out += ojson{{"run", r.run}, {"grid", r.grid}, {"strategy", r.name}, {"seed", r.seed}, {"sample", r.sample},
                 {"failed", true}, {"error", r.error}}.dump() + "\n";
    return out;
  }
  // The same bytes as dumping an object per epoch, without building one: the run's fields are
  // serialized once, each number by nlohmann's own formatter.
  const std::string head = "{\"run\":" + std::to_string(r.run) + ",\"grid\":" + ojson(r.grid).dump() +
                           ",\"strategy\":" + ojson(r.name).dump() + ",\"seed\":" + std::to_string(r.seed) +
                           ",\"sample\":" + std::to_string(r.sample) + ",\"epoch\":";
  for (size_t k = 0; k < r.loss.size(); ++k) {
    out += head + std::to_string(k + 1) + ",\"loss\":" + ojson(r.loss[k]).dump() + ",\"val_loss\":" + ojson(r.val_loss[k]).dump();
    if (!r.accuracy.empty())
      out += ",\"accuracy\":" + ojson(r.accuracy[k]).dump() + ",\"val_accuracy\":" + ojson(r.val_accuracy[k]).dump();
    out += "}\n";
  }
  return out;
}

namespace {

/// summary.md's account of a CSV source, from the run directory's data.json (bnlab's own file:
/// anything else in it is damage, exit 2).
std::string data_paragraph(const std::string& dir, const Config& c) {
  const std::string path = dir + "/data.json";
  if (c.data.source != "csv" || ::access(path.c_str(), R_OK) != 0) return "";
  const auto j = parse_json(read_json_file(path, "the data record"), path);
  try {
    std::string s = "Data: `" + j.at("path").get<std::string>() + "`, " + std::to_string(j.at("rows_read").get<int64_t>()) + " rows";
    if (j.at("rows_dropped").get<int64_t>() > 0)
      s += ", " + std::to_string(j.at("rows_dropped").get<int64_t>()) + " dropped for missing values (data.missing drop_rows; lines in data.json), " +
           std::to_string(j.at("rows_used").get<int64_t>()) + " used; sample indices count the rows used";
    s += ".";
    if (j.contains("classes")) {
      std::vector<std::string> map;
      for (const auto& k : j.at("classes")) map.push_back(std::to_string(k.at("class").get<int64_t>()) + " = " + std::to_string(k.at("label").get<int64_t>()));
      s += " Classes (class = label in the file): " + join(map, ", ") + ".";
    }
    return s + "\n\n";
  } catch (const nlohmann::json::exception& e) {
    throw InputError(path + ": damaged data record (" + e.what() + ")");
  }
}

}  // namespace

StudyReport write_reports(const std::string& dir, const Config& c, Store& store, bool plots, std::ostream& log,
                          size_t planned) {
  const bool with_grid = c.grid.size() > 1;
  const bool single = c.seeds.size() == 1 && c.finetune.samples.size() == 1;
  Digest digest(c, /*bands=*/true);  // the curves of tensorboard/ and report.html, with or without plots
  size_t stored = 0;
  std::vector<StrategyResult> few;  // single-run-per-strategy studies: their table lists every run
  store.for_each([&](const StrategyResult& r) {
    digest.add(r);
    ++stored;
    if (single) few.push_back(r);
  }, /*curves=*/true);
  std::vector<Group> groups = digest.finish();
  std::vector<Aggregate> aggs;
  for (const auto& g : groups) aggs.push_back(g.agg);
  write_exports(dir, c, store, aggs, exports_for(c, planned), planned, stored);
  write_file_atomic(dir + "/summary.csv", summary_csv(aggs));

  size_t failed = 0, diverged = 0;
  for (const auto& a : aggs) failed += a.failed, diverged += a.diverged;
  std::string md = "# " + c.name + "\n\n";
  if (stored != planned)
    md += "**Incomplete:** " + std::to_string(stored) + " of " + std::to_string(planned) +
          " runs finished; rerun the same command to resume.\n\n";
  md += std::to_string(c.strategies.size()) + " strategies x " + std::to_string(c.seeds.size()) + " seed(s) x " +
        std::to_string(c.finetune.samples.size()) + " " + c.finetune.unit() + "(s)" +
        (c.finetune.on_sets() ? " of " + std::to_string(c.finetune.set_size()) + " samples fine-tuned together (batch_size " +
                                    std::to_string(c.finetune.batch_size) + ", " + (c.finetune.shuffle ? "shuffled" : "not shuffled") + ")"
                              : std::string()) +
        (with_grid ? " x " + std::to_string(c.grid.size()) + " grid points" : "") + " = " + std::to_string(stored) +
        " runs (" + std::to_string(stored - failed - diverged) + " ok, " + std::to_string(diverged) + " diverged, " +
        std::to_string(failed) + " failed); loss " + to_string(c.model.loss) + ", BatchNorm semantics " +
        to_string(c.model.batchnorm.semantics) + ". Every run is in " + kStoreName + ".\n\n";
  md += data_paragraph(dir, c);
  std::string console;
  if (single) {
    md += (c.finetune.on_sets() ? "Set " : "Sample ") + std::to_string(c.finetune.sample) + set_members(c.finetune, c.finetune.sample) +
          ", seed " + std::to_string(c.seed) + ".\n\n";
    console = per_run_table(few, with_grid);
  } else {
    console = aggregate_table(aggs, with_grid);
  }
  md += console;
  md += "\n`loss` is Keras' training loss (forward pass before each update, BatchNorm in whatever mode the strategy "
        "leaves it); `val_loss` is the inference-mode loss after the epoch. Final gap = loss - val_loss at the last "
        "epoch. The lag identity says loss[1] == evaluate before and loss[k+1] == val_loss[k] (relative tolerance " +
        fmt_double(kLagTolerance) + "); it holds exactly when the training-mode forward pass is the inference forward pass.\n";
  if (!single)
    md += "\nEach figure covers the runs that did not fail (runs minus failed); diverged runs are included and counted. "
          "A run is diverged when its final loss exceeds its first by more than " + fmt_double(c.report.diverged_factor) +
          " x max(1, |first loss|) (report.diverged_factor). Median [IQR] and p90 describe the typical run; mean ± std "
          "is pulled by the diverged ones.\n";
  write_file_atomic(dir + "/summary.md", md);

  if (plots) {
    std::vector<Plot> todo{{"curves", c.strategies.size() > 4 ? "1500,1100" : "1100,700",
                            [&](const std::string& term, const std::string& out) { return curves_script(c, groups, term, out); }}};
    if (!single)
      todo.push_back({"gap_distribution", c.strategies.size() > 4 ? "1300,1000" : "1000,700",
                      [&](const std::string& term, const std::string& out) { return gap_script(c, groups, term, out); }});
    render(dir, todo, log);
  }
  write_tensorboard(dir, c, groups);
  return StudyReport{console, std::move(groups), stored, planned};
}

}  // namespace bnlab
