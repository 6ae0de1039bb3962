// `bnlab run`: data, pretraining (cached), fine-tuning under each strategy, run directory.
#include "bnlab/run.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "bnlab/errors.hpp"
#include "engine.hpp"
#include "text.hpp"
#include "version.hpp"
#include "workspace.hpp"


namespace bnlab {

using ojson = nlohmann::ordered_json;

std::string version_string() {
  return std::string("bnlab ") + bnlab_version() + " (commit " + git_commit() + ", LibTorch " + TORCH_VERSION + ")";
}

namespace {

double relative(double a, double b) {
  const double scale = std::max({std::abs(a), std::abs(b), 1e-30});
  return std::abs(a - b) / scale;
}

std::string keras_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4e", v);
  return buf;
}

void make_dirs(const std::string& path) {
  std::string partial;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') partial = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    partial += part + "/";
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
      throw InputError(path + ": cannot create the output directory (" + errno_text() + ")");
  }
}

/// Refuses a directory that holds another experiment's results unless --force.
void check_out_dir(const std::string& dir, const Config& config, bool force) {
  const std::string resolved = dir + "/config.resolved.json";
  if (force || ::access(resolved.c_str(), F_OK) != 0) return;
  std::string other;
  try {
    other = ojson::parse(read_file(resolved)).value("name", "");
  } catch (const std::exception&) {
    other = "(unreadable)";
  }
  if (other != config.name)
    throw InputError(dir + ": holds results of experiment \"" + other + "\", not \"" + config.name +
                     "\"; choose another --out or pass --force to overwrite");
}

std::string iso_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buf;
}

std::string format_csv_number(double v) { return std::isfinite(v) ? fmt_double(v) : std::string(); }

std::string curves_csv(const Config& c, const std::vector<StrategyResult>& results) {
  const bool cls = c.model.loss == LossKind::kCrossEntropy;
  std::string out = "strategy,seed,sample,epoch,loss,val_loss";
  if (cls) out += ",accuracy,val_accuracy";
  out += "\n";
  for (const auto& r : results) {
    for (size_t k = 0; k < r.loss.size(); ++k) {
      out += r.name + "," + std::to_string(c.seed) + "," + std::to_string(c.finetune.sample) + "," +
             std::to_string(k + 1) + "," + format_csv_number(r.loss[k]) + "," + format_csv_number(r.val_loss[k]);
      if (cls) out += "," + format_csv_number(r.accuracy[k]) + "," + format_csv_number(r.val_accuracy[k]);
      out += "\n";
    }
  }
  return out;
}

ojson summary_json(const Config& c, const std::vector<StrategyResult>& results) {
  ojson strategies = ojson::array();
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& r = results[i];
    ojson s{{"name", r.name},
            {"preset", c.strategies[i].preset},
            {"evaluate_pretrained", r.evaluate_pretrained},
            {"evaluate_before", r.evaluate_before},
            {"evaluate_after", r.evaluate_after},
            {"best_epoch", r.best_epoch},
            {"final_loss", r.loss.back()},
            {"final_val_loss", r.val_loss.back()},
            {"max_gap", r.max_gap},
            {"lag",
             {{"first", r.lag_first},
              {"steps", r.lag_steps},
              {"residual", r.lag_residual},
              {"relative", r.lag_relative},
              {"tolerance", kLagTolerance},
              {"holds", r.lag_identity_holds}}},
            {"loss", r.loss},
            {"val_loss", r.val_loss}};
    if (!r.accuracy.empty()) {
      s["accuracy"] = r.accuracy;
      s["val_accuracy"] = r.val_accuracy;
    }
    strategies.push_back(s);
  }
  return ojson{{"experiment", c.name},
               {"seed", c.seed},
               {"sample", c.finetune.sample},
               {"loss", to_string(c.model.loss)},
               {"semantics", to_string(c.model.batchnorm.semantics)},
               {"strategies", strategies}};
}

std::string summary_table(const std::vector<StrategyResult>& results) {
  std::string out =
      "| strategy | evaluate before | final loss | final val_loss | max gap | lag residual | lag identity | evaluate after |\n"
      "|---|---|---|---|---|---|---|---|\n";
  char buf[512];
  for (const auto& r : results) {
    std::snprintf(buf, sizeof buf, "| %s | %.6f | %.6f | %.6f | %.3e | %.3e | %s | %.6f |\n", r.name.c_str(),
                  r.evaluate_before, r.loss.back(), r.val_loss.back(), r.max_gap, r.lag_residual,
                  r.lag_identity_holds ? "holds" : "broken", r.evaluate_after);
    out += buf;
  }
  return out;
}

std::string summary_md(const Config& c, const std::vector<StrategyResult>& results) {
  std::string out = "# " + c.name + ": single-sample fine-tuning\n\n";
  out += "Sample " + std::to_string(c.finetune.sample) + ", seed " + std::to_string(c.seed) + ", loss " +
         to_string(c.model.loss) + ", BatchNorm semantics " + to_string(c.model.batchnorm.semantics) + ", " +
         std::to_string(c.finetune.epochs) + " epochs of batch size " + std::to_string(c.finetune.batch_size) + ".\n\n";
  out += summary_table(results);
  out += "\n`loss` is Keras' training loss (forward pass before each update, BatchNorm in whatever mode the strategy "
         "leaves it); `val_loss` is the inference-mode loss after the epoch. The lag identity says loss[1] == evaluate "
         "before and loss[k+1] == val_loss[k] (relative tolerance " + fmt_double(kLagTolerance) +
         "); it holds exactly when the training-mode forward pass is the inference forward pass.\n";
  return out;
}

}  // namespace

void compute_lag(StrategyResult& r) {
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

Workspace open_workspace(const Config& config, const std::string& out_dir, bool force, int64_t sample,
                         const std::string& sample_origin) {
  Workspace w;
  w.dir = out_dir.empty() ? "runs/" + config.name : out_dir;
  w.data = load_data(config);
  if (sample < 0 || sample >= w.data.size())
    throw InputError(sample_origin + ": index " + std::to_string(sample) + " is beyond the data (" + std::to_string(w.data.size()) +
                     " samples: 0.." + std::to_string(w.data.size() - 1) + ")");
  const auto& bn = config.model.batchnorm;
  if (bn.enabled && bn.semantics == BnSemantics::kTorch && w.data.size() % config.pretrain.batch_size == 1)
    throw InputError("pretrain.batch_size: " + std::to_string(config.pretrain.batch_size) + " leaves a last batch of ONE sample out of " +
                     std::to_string(w.data.size()) + " rows, which PyTorch BatchNorm refuses in training mode; pick another batch size");
  check_out_dir(w.dir, config, force);
  torch::manual_seed(config.seed);
  w.model = build_model(config, w.data);
  w.key = pretrain_cache_key(config);
  w.cache = force ? CacheState::kMissing : load_pretrained(w.dir + "/pretrained.pt", *w.model, w.key);
  return w;
}

void ensure_pretrained(Workspace& w, const Config& config, std::ostream& log, int verbose) {
  make_dirs(w.dir);
  const std::string ckpt = w.dir + "/pretrained.pt";
  if (w.cache == CacheState::kLoaded) {
    if (verbose > 0) log << "pretrained weights: reusing " << ckpt << " (cache key " << w.key << ")\n";
    return;
  }
  if (verbose > 0) {
    log << (w.cache == CacheState::kStale ? "pretrained weights: cache key changed, pretraining again\n"
                                          : "pretrained weights: none cached, pretraining\n");
  }
  pretrain(*w.model, w.data, config, log, verbose);
  save_pretrained(ckpt, *w.model, w.data, w.key);
}

RunResult run(const Config& config, const RunOptions& options, std::ostream& log) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  const auto since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
  torch::set_num_threads(std::max(1, options.threads));
  // Everything that can be wrong with the input is found before the first file is written.
  Workspace w = open_workspace(config, options.out_dir, options.force, config.finetune.sample, "finetune.sample");
  RunResult result;
  result.out_dir = w.dir;
  const std::string& dir = w.dir;
  Dataset& data = w.data;
  Model& model = w.model;
  const std::string& key = w.key;
  make_dirs(dir);
  write_file_atomic(dir + "/config.resolved.json", to_json(config));
  const double data_seconds = since(t_start);

  auto t = clock::now();
  result.pretrain_cached = w.cache == CacheState::kLoaded;
  ensure_pretrained(w, config, log, options.verbose);
  result.pretrain_seconds = since(t);

  const int64_t idx = config.finetune.sample;
  const auto x = data.x.narrow(0, idx, 1).clone();
  const auto y = data.y.narrow(0, idx, 1).clone();
  {
    c10::impl::GenericDict sample(c10::StringType::get(), c10::AnyType::get());
    sample.insert("x", x);
    sample.insert("y", y);
    sample.insert("index", idx);
    sample.insert("x_raw", data.x_raw.narrow(0, idx, 1).clone());
    const auto bytes = torch::pickle_save(c10::IValue(sample));
    write_file_atomic(dir + "/sample.pt", std::string(bytes.begin(), bytes.end()));
  }

  t = clock::now();
  for (const auto& strategy : config.strategies) {
    if (options.verbose > 0) log << "\nstrategy " << strategy.name << "\n";
    const auto print = [&](const EpochRecord& r) {
      if (options.verbose <= 0) return;
      log << "Epoch " << r.epoch << "/" << r.epochs << " - loss: " << keras_number(r.loss);
      if (r.classification) log << " - accuracy: " << keras_number(r.accuracy);
      log << " - val_loss: " << keras_number(r.val_loss);
      if (r.classification) log << " - val_accuracy: " << keras_number(r.val_accuracy);
      log << "\n";
    };
    StrategyResult r = finetune(*model, strategy, x, y, config, print, {}, &data);
    if (options.verbose > 0)
      log << "evaluate before: " << keras_number(r.evaluate_before) << "  evaluate after (epoch " << r.best_epoch
          << " weights): " << keras_number(r.evaluate_after) << "  lag identity: "
          << (r.lag_identity_holds ? "holds" : "broken") << " (residual " << keras_number(r.lag_residual) << ")\n";
    result.strategies.push_back(std::move(r));
  }
  result.finetune_seconds = since(t);

  write_file_atomic(dir + "/curves.csv", curves_csv(config, result.strategies));
  write_file_atomic(dir + "/summary.json", summary_json(config, result.strategies).dump(2) + "\n");
  write_file_atomic(dir + "/summary.md", summary_md(config, result.strategies));
  ojson manifest{{"argv", options.argv},
                 {"bnlab_version", bnlab_version()},
                 {"git_commit", git_commit()},
                 {"libtorch_version", TORCH_VERSION},
                 {"seed", config.seed},
                 {"threads", torch::get_num_threads()},
                 {"finished_at", iso_now()},
                 {"pretrain_cached", result.pretrain_cached},
                 {"cache_key", key},
                 {"timings_s",
                  {{"data", data_seconds},
                   {"pretrain", result.pretrain_seconds},
                   {"finetune", result.finetune_seconds},
                   {"total", since(t_start)}}}};
  write_file_atomic(dir + "/manifest.json", manifest.dump(2) + "\n");
  if (options.verbose > 0) log << "\n" << summary_table(result.strategies) << "\nresults in " << dir << "\n";
  return result;
}

}  // namespace bnlab
