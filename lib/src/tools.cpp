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
#include "html_report.hpp"
#include "tensorboard.hpp"
#include "report.hpp"
#include "store.hpp"
#include "json_input.hpp"
#include "run_dir.hpp"
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
  return parse_json(read_json_file(path, what), path);  // errors: "PATH: ..." or "PATH:LINE:COLUMN: ..."
}

std::vector<Point> points_of(const StudyRecord& study) {
  std::vector<Point> out;
  study.store.for_each([&](const StrategyResult& r) {
    Point base{r.name, r.grid, static_cast<int64_t>(r.seed), r.sample, -1, "", 0};
    if (r.failed) {
      Point p = base;
      p.metric = "failed";
      p.value = 1;
      out.push_back(p);
      return;
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
  });
  // The aggregates a golden pins are the ones summaries have always carried.
  for (const auto& a : aggregate(study.config, study.store))
    for (const auto& [fig, s] : {std::make_pair("final_gap", &a.final_gap), std::make_pair("lag_residual", &a.lag_residual),
                                 std::make_pair("eval_change", &a.eval_change)})
      for (const auto& [st, v] : {std::make_pair("mean", s->mean), std::make_pair("std", s->std),
                                  std::make_pair("median", s->median), std::make_pair("p90", s->p90)})
        out.push_back(Point{a.strategy, a.grid, -1, -1, -1, std::string("aggregate.") + fig + "." + st, v});
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
  check_new_output_file(out_file, "-o", "{\"format\": \"bnlab.golden/1\"");
  const StudyRecord study = open_study(run_dir);
  const auto points = points_of(study);
  const std::string& experiment = study.config.name;
  // One value per line: a changed curve point shows as one changed line in a diff.
  std::string text = "{\"format\": \"bnlab.golden/1\", \"experiment\": " + ojson(experiment).dump() +
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
  if (!o.junit.empty()) check_new_output_file(o.junit, "--junit", "<testsuite name=\"bnlab.check\"");
  const auto run_points = points_of(open_study(run_dir));  // the run directory first: it is the usual mistake
  const ojson golden = load_json(golden_file, "the golden file");
  if (!golden.is_object() || !golden.contains("format") || golden["format"] != "bnlab.golden/1")
    throw InputError(golden_file + ": not a bnlab golden file (an object with \"format\": \"bnlab.golden/1\")");
  if (!golden.contains("values") || !golden["values"].is_array())
    throw InputError(golden_file + ": values: expected an array of values");
  std::map<std::string, Point> expected;
  std::vector<std::string> order;
  const auto& values = golden["values"];
  for (size_t i = 0; i < values.size(); ++i) {
    const auto& v = values[i];
    const std::string at = golden_file + ": values[" + std::to_string(i) + "]";
    if (!v.is_object()) throw InputError(at + ": expected an object");
    const auto field = [&](const char* key) -> const ojson& {
      if (!v.contains(key)) throw InputError(at + ": missing \"" + key + "\"");
      return v[key];
    };
    const auto text = [&](const char* key) {
      const auto& f = field(key);
      if (!f.is_string()) throw InputError(at + "." + key + ": expected a string");
      return f.get<std::string>();
    };
    const auto whole = [&](const char* key) {
      const auto& f = field(key);
      if (!f.is_number_integer()) throw InputError(at + "." + key + ": expected a whole number");
      return f.get<int64_t>();
    };
    Point p;  // field by field, in the order write_golden writes them, so the first fault is named
    p.strategy = text("strategy");
    p.grid = text("grid");
    p.seed = whole("seed");
    p.sample = whole("sample");
    p.epoch = whole("epoch");
    p.metric = text("metric");
    const auto& value = field("value");
    if (!value.is_number()) throw InputError(at + ".value: expected a number");
    p.value = value.get<double>();
    if (expected.count(p.key())) throw InputError(at + ": a second value for " + where(p) + " " + p.metric +
                                                  (p.epoch >= 0 ? " epoch " + std::to_string(p.epoch) : ""));
    order.push_back(p.key());
    expected[p.key()] = p;
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
  std::vector<StudyRecord> shards;
  for (const auto& d : dirs) shards.push_back(open_study(d));
  const Config& config = shards.front().config;
  const std::string identity = study_identity(config), keys = shards.front().store.meta("cache_keys");
  for (size_t i = 1; i < shards.size(); ++i) {
    if (study_identity(shards[i].config) != identity)
      throw InputError(dirs[i] + ": belongs to a different experiment or settings than " + dirs.front() +
                       " (the stores' configs differ); merge only shards of one study");
    // Shards must start from the same weights: the same pretraining settings and engine.
    const std::string k = shards[i].store.meta("cache_keys");
    if (k != keys)
      throw InputError(dirs[i] + ": its pretrained weights differ from " + dirs.front() + "'s (cache keys " + k + " vs " + keys +
                       ": other pretraining settings or another --engine); merge only shards of one study run the same way");
  }
  const std::string out_store = store_path(out_dir);
  if (::access(out_store.c_str(), F_OK) == 0) {
    const Store existing = Store::open(out_store, false);  // a file bnlab did not write stays, --force or not
    // The same merge again (a merge cut short by a full disk or a kill, rerun) rebuilds what it
    // would have written: no --force needed. Any other results need --force.
    const bool same = existing.meta("merged_from") == nlohmann::ordered_json(dirs).dump() &&
                      existing.meta("identity") == shards.front().store.meta("identity") && existing.meta("cache_keys") == keys;
    if (!force && !same)
      throw InputError(out_dir + ": already holds results (not a merge of these shards); pass --force to overwrite");
  }
  check_output_dir(out_dir, config.name, force, "-o");
  own_output_dir(out_dir, "-o");
  check_tensorboard_folders(out_dir, config);
  remove_stale_temps(out_dir);
  // The merged store is complete under a temporary name before it takes the real one.
  const std::string building = temp_name(out_store + ".merge");
  Store::Meta meta;
  for (const char* key : {"experiment", "identity", "config", "cache_keys", "bnlab_version", "git_commit", "libtorch_version"})
    meta.emplace_back(key, shards.front().store.meta(key));
  meta.emplace_back("shard", "1/1");
  meta.emplace_back("merged_from", nlohmann::ordered_json(dirs).dump());
  const auto plan = plan_runs(config);
  meta.emplace_back("runs_planned", std::to_string(plan.size()));
  try {
    {  // the merged store is built and closed (its log checkpointed) before it is renamed
      Store merged = Store::create(building, meta);
      for (const auto& s : shards) merged.absorb(s.store);
      // One divergence rule for the merged study (shards may have been classified under others).
      merged.reclassify(config.report.diverged_factor);
      // Every run of the plan once, each where the plan puts it.
      std::vector<char> seen(plan.size(), 0);
      size_t first_missing = plan.size(), missing = 0;
      merged.for_each([&](const StrategyResult& r) {
        if (r.run >= plan.size()) throw InputError(merged.path() + ": run " + std::to_string(r.run) + " is beyond the study's plan");
        const RunKey& k = plan[r.run];
        if (config.strategies[k.strategy].name != r.name || config.grid[k.grid].label != r.grid || config.seeds[k.seed] != r.seed ||
            config.finetune.samples[k.sample] != r.sample)
          throw InputError("merge: run " + std::to_string(r.run) + " is not the run the study's plan puts there");
        seen[r.run] = 1;
      }, /*curves=*/false);
      for (size_t i = 0; i < plan.size(); ++i)
        if (!seen[i]) first_missing = std::min(first_missing, i), ++missing;
      if (missing > 0)
        throw InputError("merge: " + std::to_string(missing) + " of " + std::to_string(plan.size()) +
                         " runs are in none of the shards (first missing: run " + std::to_string(first_missing) +
                         "); run the missing shards first");
    }
    // The ledger learns the store's names before it takes them (a full disk may stop it here).
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) claim_path(out_store + suffix);
    for (const char* suffix : {"-wal", "-shm"})  // an older store's log would be replayed into the new file
      if (may_remove(out_store + suffix)) std::remove((out_store + suffix).c_str());
    if (std::rename(building.c_str(), out_store.c_str()) != 0)
      throw std::runtime_error(out_store + ": cannot write the merged store (renaming its temporary file: " + errno_text() + ")");
  } catch (...) {  // the store is closed by now; its temporary goes, whatever stopped the merge
    for (const char* suffix : {"", "-journal", "-wal", "-shm"}) std::remove((building + suffix).c_str());
    throw;
  }
  write_file_atomic(out_dir + "/config.resolved.json", to_json(config));
  // Weights, samples and the data's record are identical in every shard (same seeds, same cache
  // key, same data): take the first's.
  if (::access((dirs.front() + "/data.json").c_str(), R_OK) == 0) write_file_atomic(out_dir + "/data.json", read_file(dirs.front() + "/data.json"));
  for (const auto& seed : config.seeds) {
    for (const char* stem : {"pretrained", "sample"}) {
      const std::string name = std::string(stem) + (config.seeds.size() > 1 ? "_seed" + std::to_string(seed) : "") + ".pt";
      const std::string src = dirs.front() + "/" + name;
      if (::access(src.c_str(), R_OK) == 0) write_file_atomic(out_dir + "/" + name, read_file(src));
    }
  }
  Store merged = Store::open(out_store, true);
  const StudyReport report = write_reports(out_dir, config, merged, plots, log, plan.size());
  const std::string& table = report.table;
  merged.seal();
  nlohmann::ordered_json manifest{{"merged_from", dirs}, {"runs", plan.size()}};
  write_file_atomic(out_dir + "/manifest.json", manifest.dump(2) + "\n");
  write_html_report(out_dir, config, report);
  log << table << "\nmerged " << dirs.size() << " shard(s), " << plan.size() << " runs, into " << out_dir << "\n";
}

}  // namespace bnlab
