// Study reports: curves, per-run records, aggregates over seeds and samples, plots.
#include "report.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>

#include "bnlab/errors.hpp"
#include "text.hpp"

namespace bnlab {

using ojson = nlohmann::ordered_json;

void compute_lag(StrategyResult& r) {
  const auto relative = [](double a, double b) {
    return std::abs(a - b) / std::max({std::abs(a), std::abs(b), 1e-30});
  };
  r.max_gap = r.lag_first = r.lag_steps = r.lag_relative = 0;
  for (size_t k = 0; k < r.loss.size(); ++k) r.max_gap = std::max(r.max_gap, std::abs(r.loss[k] - r.val_loss[k]));
  if (!r.loss.empty()) {
    r.lag_first = std::abs(r.loss[0] - r.evaluate_before);
    r.lag_relative = relative(r.loss[0], r.evaluate_before);
  }
  for (size_t k = 0; k + 1 < r.loss.size(); ++k) {
    r.lag_steps = std::max(r.lag_steps, std::abs(r.loss[k + 1] - r.val_loss[k]));
    r.lag_relative = std::max(r.lag_relative, relative(r.loss[k + 1], r.val_loss[k]));
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

std::vector<Aggregate> aggregate(const Config& c, const std::vector<StrategyResult>& runs) {
  std::vector<Aggregate> out;
  for (const auto& g : c.grid) {
    for (const auto& s : c.strategies) {
      Aggregate a;
      a.grid = g.label;
      a.strategy = s.name;
      std::vector<double> gap, lag, change;
      for (const auto& r : runs) {
        if (r.grid != g.label || r.name != s.name) continue;
        ++a.runs;
        if (r.failed) {
          ++a.failed;
          continue;
        }
        gap.push_back(r.loss.back() - r.val_loss.back());
        lag.push_back(r.lag_residual);
        change.push_back(r.evaluate_after - r.evaluate_before);
      }
      if (a.runs == 0) continue;  // not in this shard
      a.final_gap = describe(gap);
      a.lag_residual = describe(lag);
      a.eval_change = describe(change);
      out.push_back(a);
    }
  }
  return out;
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

std::string num(double v) { return std::isfinite(v) ? fmt_double(v) : std::string(); }

ojson stats_json(const Stats& s) {
  return ojson{{"n", s.n}, {"mean", s.mean}, {"std", s.std}, {"median", s.median}, {"p90", s.p90}};
}

ojson run_json(const StrategyResult& r) {
  ojson j{{"run", r.run},
          {"grid", r.grid},
          {"strategy", r.name},
          {"seed", r.seed},
          {"sample", r.sample},
          {"failed", r.failed}};
  if (r.failed) {
    j["error"] = r.error;
    return j;
  }
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

std::string curves_csv(const Config& c, const std::vector<StrategyResult>& runs) {
  const bool cls = c.model.loss == LossKind::kCrossEntropy;
  std::string out = std::string("strategy,grid,seed,sample,epoch,loss,val_loss") + (cls ? ",accuracy,val_accuracy" : "") + "\n";
  for (const auto& r : runs) {
    if (r.failed) continue;
    for (size_t k = 0; k < r.loss.size(); ++k) {
      out += r.name + "," + r.grid + "," + std::to_string(r.seed) + "," + std::to_string(r.sample) + "," +
             std::to_string(k + 1) + "," + num(r.loss[k]) + "," + num(r.val_loss[k]);
      if (cls) out += "," + num(r.accuracy[k]) + "," + num(r.val_accuracy[k]);
      out += "\n";
    }
  }
  return out;
}

std::string summary_csv(const std::vector<Aggregate>& aggs) {
  std::string out = "grid,strategy,runs,failed";
  for (const char* fig : {"final_gap", "lag_residual", "eval_change"})
    for (const char* st : {"mean", "std", "median", "p90"}) out += std::string(",") + fig + "_" + st;
  out += "\n";
  for (const auto& a : aggs) {
    out += a.grid + "," + a.strategy + "," + std::to_string(a.runs) + "," + std::to_string(a.failed);
    for (const Stats* s : {&a.final_gap, &a.lag_residual, &a.eval_change})
      out += "," + num(s->mean) + "," + num(s->std) + "," + num(s->median) + "," + num(s->p90);
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
    std::snprintf(buf, sizeof buf, " %.6f | %.6f | %.6f | %.3e | %.3e | %s | %.6f |\n", r.evaluate_before, r.loss.back(),
                  r.val_loss.back(), r.max_gap, r.lag_residual, r.lag_identity_holds ? "holds" : "broken", r.evaluate_after);
    out += "| " + r.name + " |" + (with_grid ? " " + r.grid + " |" : "") + buf;
  }
  return out;
}

std::string aggregate_table(const std::vector<Aggregate>& aggs, bool with_grid) {
  std::string out = std::string("| strategy |") + (with_grid ? " grid |" : "") +
                    " runs | final gap mean ± std | median | p90 | lag residual median | p90 | eval after - before mean | median |\n|---|" +
                    (with_grid ? "---|" : "") + "---|---|---|---|---|---|---|---|\n";
  char buf[512];
  for (const auto& a : aggs) {
    std::snprintf(buf, sizeof buf, " %zu%s | %.4g ± %.3g | %.4g | %.4g | %.3e | %.3e | %.4g | %.4g |\n", a.runs,
                  a.failed ? (" (" + std::to_string(a.failed) + " failed)").c_str() : "", a.final_gap.mean, a.final_gap.std,
                  a.final_gap.median, a.final_gap.p90, a.lag_residual.median, a.lag_residual.p90, a.eval_change.mean,
                  a.eval_change.median);
    out += "| " + a.strategy + " |" + (with_grid ? " " + a.grid + " |" : "") + buf;
  }
  return out;
}

/// gnuplot script: one panel per strategy with the mean loss and val_loss per epoch.
std::string curves_script(const Config& c, const std::vector<StrategyResult>& runs, const std::string& terminal,
                          const std::string& output) {
  std::string s = "set terminal " + terminal + "\nset output '" + output + "'\n";
  const size_t n = c.strategies.size();
  const size_t cols = n <= 1 ? 1 : n <= 4 ? 2 : 3;
  const size_t rows = (n + cols - 1) / cols;
  s += "set multiplot layout " + std::to_string(rows) + "," + std::to_string(cols) + " title '" + c.name +
       ": loss (training, before each update) and val_loss (inference) per epoch'\n";
  int64_t epochs = 0;
  for (const auto& g : c.grid) epochs = std::max(epochs, g.finetune.epochs);
  s += "set key below horizontal maxrows 2 font ',8'\nset xlabel 'epoch'\nset grid\nset format y '%.7g'\n";
  if (epochs <= 20) s += "set xtics 1\n";
  for (const auto& strat : c.strategies) {
    std::string plot;
    std::string blocks;
    size_t line = 0;
    for (const auto& g : c.grid) {
      std::vector<double> loss, val;
      size_t count = 0;
      for (const auto& r : runs) {
        if (r.failed || r.name != strat.name || r.grid != g.label) continue;
        if (loss.empty()) loss.assign(r.loss.size(), 0), val.assign(r.val_loss.size(), 0);
        for (size_t k = 0; k < r.loss.size() && k < loss.size(); ++k) loss[k] += r.loss[k], val[k] += r.val_loss[k];
        ++count;
      }
      if (count == 0) continue;
      const std::string block = "$D" + std::to_string(line++);
      blocks += block + " << EOD\n";
      for (size_t k = 0; k < loss.size(); ++k)
        blocks += std::to_string(k + 1) + " " + fmt_double(loss[k] / count) + " " + fmt_double(val[k] / count) + "\n";
      blocks += "EOD\n";
      const std::string suffix = (g.label.empty() ? "" : " " + g.label) + (count > 1 ? " (mean of " + std::to_string(count) + ")" : "");
      plot += std::string(plot.empty() ? "plot " : ", ") + block + " using 1:2 with linespoints lw 2 title 'loss" + suffix +
              "', " + block + " using 1:3 with linespoints dt 2 lw 2 title 'val_loss" + suffix + "'";
    }
    s += blocks + "set title '" + strat.name + "'\n" + (plot.empty() ? "plot 0 notitle" : plot) + "\n";
  }
  return s + "unset multiplot\n";
}

/// gnuplot script: the distribution of the final gap per strategy (box p25-p75, whiskers
/// p10-p90, median line, every run as a point).
std::string gap_script(const Config& c, const std::vector<StrategyResult>& runs, const std::string& terminal,
                       const std::string& output) {
  std::string s = "set terminal " + terminal + "\nset output '" + output + "'\n";
  s += "set title '" + c.name + ": final gap (loss - val_loss) over seeds and samples'\nset ylabel 'final gap'\n"
       "set grid ytics\nset xtics rotate by -30 font ',9'\nset boxwidth 0.5\nset style fill empty\n";
  std::string box = "$BOX << EOD\n", pts = "$PTS << EOD\n";
  size_t x = 0;
  for (const auto& strat : c.strategies) {
    std::vector<double> gaps;
    for (const auto& r : runs)
      if (!r.failed && r.name == strat.name && r.grid == (c.grid.empty() ? "" : c.grid.front().label))
        gaps.push_back(r.loss.back() - r.val_loss.back());
    ++x;
    if (gaps.empty()) continue;
    std::vector<double> v = gaps;
    std::sort(v.begin(), v.end());
    const auto q = [&](double p) { return quantile(v, p); };
    box += std::to_string(x) + " " + fmt_double(q(0.1)) + " " + fmt_double(q(0.25)) + " " + fmt_double(q(0.5)) + " " +
           fmt_double(q(0.75)) + " " + fmt_double(q(0.9)) + " " + strat.name + "\n";
    for (size_t i = 0; i < gaps.size(); ++i)
      pts += fmt_double(static_cast<double>(x) + 0.3 * ((static_cast<double>(i % 7) / 6.0) - 0.5)) + " " + fmt_double(gaps[i]) + "\n";
  }
  s += box + "EOD\n" + pts + "EOD\n";
  s += "set xrange [0.3:" + std::to_string(x) + ".7]\n";
  s += "plot $BOX using 1:3:2:6:5:xticlabels(7) with candlesticks whiskerbars lw 2 title 'p10 / p25 / p75 / p90', "
       "$BOX using 1:4:4:4:4 with candlesticks lt -1 lw 3 title 'median', "
       "$PTS using 1:2 with points pt 7 ps 0.4 lc rgb '#80404040' title 'runs'\n";
  return s;
}

/// Runs gnuplot on `script`, writing to temporary names that are renamed when it succeeds.
bool run_gnuplot(const std::string& script, std::ostream& log) {
  FILE* p = ::popen("gnuplot >/dev/null 2>&1", "w");
  if (p == nullptr) return false;
  std::fwrite(script.data(), 1, script.size(), p);
  return ::pclose(p) == 0;
}

void render(const std::string& dir, const std::string& stem, const std::string& png_size,
            const std::function<std::string(const std::string&, const std::string&)>& make, std::ostream& log) {
  const std::string tmp_png = temp_name(dir + "/" + stem + ".png"), tmp_svg = temp_name(dir + "/" + stem + ".svg");
  const bool ok = run_gnuplot(make("pngcairo noenhanced size " + png_size + " font ',10'", tmp_png), log) &&
                  run_gnuplot(make("svg noenhanced size " + png_size + " dynamic font ',10'", tmp_svg), log);
  if (!ok) {
    std::remove(tmp_png.c_str());
    std::remove(tmp_svg.c_str());
    log << "warning: gnuplot failed or is not installed; " << stem << ".png/.svg not written (scripts/setup.sh installs gnuplot-nox)\n";
    return;
  }
  std::rename(tmp_png.c_str(), (dir + "/" + stem + ".png").c_str());
  std::rename(tmp_svg.c_str(), (dir + "/" + stem + ".svg").c_str());
}

}  // namespace

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

void write_progress(const std::string& dir, const Config& c, const std::vector<StrategyResult>& runs, size_t planned,
                    const std::function<bool()>& cancelled) {
  const auto stop = [&] { return cancelled && cancelled(); };
  write_file_atomic(dir + "/curves.csv", curves_csv(c, runs));
  if (stop()) return;
  std::string metrics;
  for (const auto& r : runs) metrics += metrics_lines(r);
  write_file_atomic(dir + "/metrics.jsonl", metrics);
  if (stop()) return;
  const auto aggs = aggregate(c, runs);
  ojson runs_json = ojson::array();
  for (const auto& r : runs) runs_json.push_back(run_json(r));
  ojson aggs_json = ojson::array();
  for (const auto& a : aggs)
    aggs_json.push_back(ojson{{"grid", a.grid}, {"strategy", a.strategy}, {"runs", a.runs}, {"failed", a.failed},
                              {"final_gap", stats_json(a.final_gap)}, {"lag_residual", stats_json(a.lag_residual)},
                              {"eval_change", stats_json(a.eval_change)}});
  const ojson summary{{"experiment", c.name}, {"loss", to_string(c.model.loss)},
                      {"semantics", to_string(c.model.batchnorm.semantics)}, {"seeds", c.seeds},
                      {"samples", c.finetune.samples}, {"complete", runs.size() == planned},
                      {"runs_planned", planned}, {"aggregates", aggs_json}, {"runs", runs_json}};
  write_file_atomic(dir + "/summary.json", summary.dump(2) + "\n");
}

std::string write_reports(const std::string& dir, const Config& c, const std::vector<StrategyResult>& runs, bool plots,
                          std::ostream& log, size_t planned) {
  const auto aggs = aggregate(c, runs);
  const bool with_grid = c.grid.size() > 1;
  const bool single = c.seeds.size() == 1 && c.finetune.samples.size() == 1;
  write_progress(dir, c, runs, planned);
  write_file_atomic(dir + "/summary.csv", summary_csv(aggs));

  std::string md = "# " + c.name + "\n\n";
  if (runs.size() != planned)
    md += "**Incomplete:** " + std::to_string(runs.size()) + " of " + std::to_string(planned) +
          " runs finished; rerun the same command to resume.\n\n";
  md += std::to_string(c.strategies.size()) + " strategies x " + std::to_string(c.seeds.size()) + " seed(s) x " +
        std::to_string(c.finetune.samples.size()) + " sample(s)" +
        (with_grid ? " x " + std::to_string(c.grid.size()) + " grid points" : "") + " = " + std::to_string(runs.size()) +
        " runs; loss " + to_string(c.model.loss) + ", BatchNorm semantics " + to_string(c.model.batchnorm.semantics) + ".\n\n";
  std::string console;
  if (single) {
    md += "Sample " + std::to_string(c.finetune.sample) + ", seed " + std::to_string(c.seed) + ".\n\n";
    console = per_run_table(runs, with_grid);
  } else {
    console = aggregate_table(aggs, with_grid);
  }
  md += console;
  md += "\n`loss` is Keras' training loss (forward pass before each update, BatchNorm in whatever mode the strategy "
        "leaves it); `val_loss` is the inference-mode loss after the epoch. Final gap = loss - val_loss at the last "
        "epoch. The lag identity says loss[1] == evaluate before and loss[k+1] == val_loss[k] (relative tolerance " +
        fmt_double(kLagTolerance) + "); it holds exactly when the training-mode forward pass is the inference forward pass.\n";
  write_file_atomic(dir + "/summary.md", md);

  if (plots) {
    render(dir, "curves", c.strategies.size() > 4 ? "1500,1100" : "1100,700",
           [&](const std::string& term, const std::string& out) { return curves_script(c, runs, term, out); }, log);
    if (!single)
      render(dir, "gap_distribution", "1100,650",
             [&](const std::string& term, const std::string& out) { return gap_script(c, runs, term, out); }, log);
  }
  return console;
}

std::vector<StrategyResult> read_runs(const std::string& path) {
  ojson j;
  try {
    j = ojson::parse(read_file(path));
  } catch (const std::exception& e) {
    throw InputError(path + ": cannot read the study summary (" + std::string(e.what()) + ")");
  }
  std::vector<StrategyResult> runs;
  try {
    for (const auto& r : j.at("runs")) {
      StrategyResult s;
      s.run = r.at("run").get<size_t>();
      s.grid = r.at("grid").get<std::string>();
      s.name = r.at("strategy").get<std::string>();
      s.seed = r.at("seed").get<uint64_t>();
      s.sample = r.at("sample").get<int64_t>();
      s.failed = r.at("failed").get<bool>();
      if (s.failed) {
        s.error = r.value("error", "");
      } else {
        s.evaluate_pretrained = r.at("evaluate_pretrained").get<double>();
        s.evaluate_before = r.at("evaluate_before").get<double>();
        s.evaluate_after = r.at("evaluate_after").get<double>();
        s.best_epoch = r.at("best_epoch").get<int>();
        s.loss = r.at("loss").get<std::vector<double>>();
        s.val_loss = r.at("val_loss").get<std::vector<double>>();
        if (r.contains("accuracy")) {
          s.accuracy = r.at("accuracy").get<std::vector<double>>();
          s.val_accuracy = r.at("val_accuracy").get<std::vector<double>>();
        }
        compute_lag(s);
      }
      runs.push_back(std::move(s));
    }
  } catch (const ojson::exception& e) {
    throw InputError(path + ": not a bnlab study summary (" + std::string(e.what()) + ")");
  }
  return runs;
}

}  // namespace bnlab
