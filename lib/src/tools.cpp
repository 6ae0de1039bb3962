// Regression goldens, their check (for CI), and merging sharded studies.
#include "bnlab/tools.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "report.hpp"
#include "text.hpp"

namespace bnlab {

using ojson = nlohmann::ordered_json;

namespace {

/// One compared value: where it is (strategy, grid, seed, sample, epoch; -1 = not applicable)
/// and which figure it is.
struct Point {
  std::string strategy, grid;
  int64_t seed = -1, sample = -1, epoch = -1;
  std::string metric;
  double value = 0;
  std::string key() const {
    return strategy + "|" + grid + "|" + std::to_string(seed) + "|" + std::to_string(sample) + "|" +
           std::to_string(epoch) + "|" + metric;
  }
};

ojson load_json(const std::string& path, const std::string& what) {
  try {
    return ojson::parse(read_file(path));
  } catch (const std::exception& e) {
    std::string why = e.what();
    throw InputError(path + ": cannot read " + what + " (" + why.substr(0, why.find('\n')) + ")");
  }
}

std::vector<Point> points_of(const std::string& run_dir) {
  const std::string path = run_dir + "/summary.json";
  if (::access(path.c_str(), R_OK) != 0) throw InputError(run_dir + ": no summary.json here; is it a finished bnlab run directory?");
  const ojson summary = load_json(path, "the study summary");
  std::vector<Point> out;
  for (const auto& r : read_runs(path)) {
    Point base{r.name, r.grid, static_cast<int64_t>(r.seed), r.sample, -1, "", 0};
    if (r.failed) {
      Point p = base;
      p.metric = "failed";
      p.value = 1;
      out.push_back(p);
      continue;
    }
    const auto add = [&](const std::string& metric, double v, int64_t epoch) {
      Point p = base;
      p.metric = metric;
      p.value = v;
      p.epoch = epoch;
      out.push_back(p);
    };
    for (size_t k = 0; k < r.loss.size(); ++k) {
      add("loss", r.loss[k], static_cast<int64_t>(k + 1));
      add("val_loss", r.val_loss[k], static_cast<int64_t>(k + 1));
      if (!r.accuracy.empty()) {
        add("accuracy", r.accuracy[k], static_cast<int64_t>(k + 1));
        add("val_accuracy", r.val_accuracy[k], static_cast<int64_t>(k + 1));
      }
    }
    add("evaluate_before", r.evaluate_before, -1);
    add("evaluate_after", r.evaluate_after, -1);
    add("lag_residual", r.lag_residual, -1);
  }
  try {
    for (const auto& a : summary.at("aggregates"))
      for (const char* fig : {"final_gap", "lag_residual", "eval_change"})
        for (const char* st : {"mean", "std", "median", "p90"}) {
          Point p{a.at("strategy").get<std::string>(), a.at("grid").get<std::string>(), -1, -1, -1,
                  std::string("aggregate.") + fig + "." + st, a.at(fig).at(st).get<double>()};
          out.push_back(p);
        }
  } catch (const ojson::exception& e) {
    throw InputError(path + ": not a bnlab study summary (" + std::string(e.what()) + ")");
  }
  return out;
}

std::string xml_escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += ch;
    }
  }
  return out;
}

std::string where(const Point& p) {
  std::string s = p.strategy;
  if (!p.grid.empty()) s += " [" + p.grid + "]";
  if (p.seed >= 0) s += " seed " + std::to_string(p.seed);
  if (p.sample >= 0) s += " sample " + std::to_string(p.sample);
  return s;
}

}  // namespace

void write_golden(const std::string& run_dir, const std::string& out_file) {
  const auto points = points_of(run_dir);
  const ojson cfg = load_json(run_dir + "/config.resolved.json", "the resolved config");
  // One value per line: a changed curve point shows as one changed line in a diff.
  std::string text = "{\"format\": \"bnlab.golden/1\", \"experiment\": " + ojson(cfg.value("name", "")).dump() +
                     ", \"values\": [\n";
  for (size_t i = 0; i < points.size(); ++i) {
    const auto& p = points[i];
    text += ojson{{"strategy", p.strategy}, {"grid", p.grid}, {"seed", p.seed}, {"sample", p.sample},
                  {"epoch", p.epoch}, {"metric", p.metric}, {"value", p.value}}.dump();
    text += i + 1 < points.size() ? ",\n" : "\n";
  }
  write_file_atomic(out_file, text + "]}\n");
}

size_t check_golden(const std::string& run_dir, const std::string& golden_file, const CheckOptions& o, std::ostream& out) {
  if (!(o.rtol >= 0) || !(o.atol >= 0)) throw InputError("--rtol and --atol must be >= 0");
  const auto run_points = points_of(run_dir);  // the run directory first: it is the usual mistake
  const ojson golden = load_json(golden_file, "the golden file");
  if (golden.value("format", "") != "bnlab.golden/1") throw InputError(golden_file + ": not a bnlab golden file (format bnlab.golden/1)");
  std::map<std::string, Point> expected;
  std::vector<std::string> order;
  try {
    for (const auto& v : golden.at("values")) {
      Point p{v.at("strategy").get<std::string>(), v.at("grid").get<std::string>(), v.at("seed").get<int64_t>(),
              v.at("sample").get<int64_t>(), v.at("epoch").get<int64_t>(), v.at("metric").get<std::string>(),
              v.at("value").get<double>()};
      order.push_back(p.key());
      expected[p.key()] = p;
    }
  } catch (const ojson::exception& e) {
    throw InputError(golden_file + ": malformed golden file (" + std::string(e.what()) + ")");
  }
  std::map<std::string, Point> got;
  for (const auto& p : run_points) got[p.key()] = p;

  struct Mismatch {
    Point p;
    std::string expected, got, tolerance;
  };
  std::vector<Mismatch> bad;
  std::map<std::string, std::vector<std::string>> failures_by_case;  // JUnit testcase -> messages
  std::map<std::string, size_t> cases;
  char buf[64];
  const auto num = [&](double v) {
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return std::string(buf);
  };
  for (const auto& key : order) {
    const auto& e = expected[key];
    cases[where(e)]++;
    const auto it = got.find(key);
    if (it == got.end()) {
      bad.push_back({e, num(e.value), "(missing)", ""});
      continue;
    }
    const double tol = o.atol + o.rtol * std::abs(e.value);
    if (!(std::abs(it->second.value - e.value) <= tol)) bad.push_back({e, num(e.value), num(it->second.value), num(tol)});
  }
  for (const auto& [key, p] : got)
    if (!expected.count(key)) {
      cases[where(p)]++;
      bad.push_back({p, "(none)", num(p.value), ""});
    }

  if (bad.empty()) {
    out << "check: " << order.size() << " values compared against " << golden_file << ", all within rtol " << o.rtol
        << " / atol " << o.atol << "\n";
  } else {
    out << "check: " << bad.size() << " of " << std::max(order.size(), got.size()) << " values differ from " << golden_file << "\n\n";
    out << "| strategy | grid | seed | sample | epoch | metric | expected | got | tolerance |\n|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& m : bad) {
      const auto opt = [](int64_t v) { return v < 0 ? std::string("-") : std::to_string(v); };
      out << "| " << m.p.strategy << " | " << (m.p.grid.empty() ? "-" : m.p.grid) << " | " << opt(m.p.seed) << " | "
          << opt(m.p.sample) << " | " << opt(m.p.epoch) << " | " << m.p.metric << " | " << m.expected << " | " << m.got
          << " | " << (m.tolerance.empty() ? "-" : m.tolerance) << " |\n";
      failures_by_case[where(m.p)].push_back(m.p.metric + (m.p.epoch >= 0 ? " epoch " + std::to_string(m.p.epoch) : "") +
                                             ": expected " + m.expected + ", got " + m.got +
                                             (m.tolerance.empty() ? "" : " (tolerance " + m.tolerance + ")"));
    }
  }
  if (!o.junit.empty()) {
    std::string xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n<testsuite name=\"bnlab.check\" tests=\"" +
                      std::to_string(cases.size()) + "\" failures=\"" + std::to_string(failures_by_case.size()) + "\">\n";
    for (const auto& [name, count] : cases) {
      xml += "  <testcase classname=\"bnlab.check\" name=\"" + xml_escape(name) + "\">";
      const auto f = failures_by_case.find(name);
      if (f != failures_by_case.end()) {
        xml += "\n    <failure message=\"" + std::to_string(f->second.size()) + " of " + std::to_string(count) +
               " values out of tolerance\">" + xml_escape(join(f->second, "\n")) + "</failure>\n  ";
      }
      xml += "</testcase>\n";
    }
    xml += "</testsuite>\n</testsuites>\n";
    write_file_atomic(o.junit, xml);
  }
  return bad.size();
}

void merge_shards(const std::vector<std::string>& dirs, const std::string& out_dir, bool force, bool plots, std::ostream& log) {
  if (dirs.empty()) throw InputError("merge: name at least one shard directory");
  Config config;
  std::string resolved_text;
  std::map<size_t, StrategyResult> runs;
  std::string cache_keys, keys_from;
  for (const auto& d : dirs) {
    const std::string path = d + "/config.resolved.json";
    if (::access(path.c_str(), R_OK) != 0) throw InputError(d + ": no config.resolved.json; is it a bnlab run directory?");
    const std::string text = read_file(path);
    if (resolved_text.empty()) {
      resolved_text = text;
      config = parse_config(text, path, {}, d);
    } else if (text != resolved_text) {
      throw InputError(d + ": belongs to a different experiment or settings than " + dirs.front() +
                       " (config.resolved.json differs); merge only shards of one study");
    }
    // Shards must start from the same weights: the same pretraining settings and engine.
    const std::string manifest = d + "/manifest.json";
    if (::access(manifest.c_str(), R_OK) == 0) {
      std::string keys;
      try {
        keys = ojson::parse(read_file(manifest)).at("cache_keys").dump();
      } catch (const std::exception&) {
        throw InputError(manifest + ": unreadable or without \"cache_keys\"; rerun that shard");
      }
      if (cache_keys.empty()) {
        cache_keys = keys;
        keys_from = d;
      } else if (keys != cache_keys) {
        throw InputError(d + ": its pretrained weights differ from " + keys_from + "'s (cache keys " + keys + " vs " +
                         cache_keys + ": other pretraining settings or another --engine); merge only shards of one study run the same way");
      }
    }
    for (auto& r : read_runs(d + "/summary.json")) {
      const auto it = runs.find(r.run);
      if (it != runs.end() && (it->second.loss != r.loss || it->second.val_loss != r.val_loss))
        throw InputError(d + ": run " + std::to_string(r.run) + " also appears, with other values, in an earlier shard");
      runs[r.run] = std::move(r);
    }
  }
  const auto plan = plan_runs(config);
  std::vector<size_t> missing;
  for (const auto& k : plan)
    if (!runs.count(k.run)) missing.push_back(k.run);
  if (!missing.empty())
    throw InputError("merge: " + std::to_string(missing.size()) + " of " + std::to_string(plan.size()) +
                     " runs are in none of the shards (first missing: run " + std::to_string(missing.front()) +
                     "); run the missing shards first");
  if (!force && ::access((out_dir + "/summary.json").c_str(), F_OK) == 0)
    throw InputError(out_dir + ": already holds results; pass --force to overwrite");
  ::mkdir(out_dir.c_str(), 0755);
  if (::access(out_dir.c_str(), W_OK) != 0) throw InputError(out_dir + ": cannot create or write the output directory");
  write_file_atomic(out_dir + "/config.resolved.json", resolved_text);
  // Weights and samples are identical in every shard (same seeds, same cache key): take the first's.
  for (const auto& seed : config.seeds) {
    for (const char* stem : {"pretrained", "sample"}) {
      const std::string name = std::string(stem) + (config.seeds.size() > 1 ? "_seed" + std::to_string(seed) : "") + ".pt";
      const std::string src = dirs.front() + "/" + name;
      if (::access(src.c_str(), R_OK) == 0) write_file_atomic(out_dir + "/" + name, read_file(src));
    }
  }
  std::vector<StrategyResult> ordered;
  for (auto& [index, r] : runs) ordered.push_back(r);
  const std::string table = write_reports(out_dir, config, ordered, plots, log, plan.size());
  ojson manifest{{"merged_from", dirs}, {"runs", ordered.size()}};
  write_file_atomic(out_dir + "/manifest.json", manifest.dump(2) + "\n");
  log << table << "\nmerged " << dirs.size() << " shard(s), " << ordered.size() << " runs, into " << out_dir << "\n";
}

}  // namespace bnlab
