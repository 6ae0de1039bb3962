// `bnlab run`: a study of strategies x seeds x samples (x grid points), run concurrently with
// results identical to a sequential run, reported as it goes and summarised at the end.
#include "bnlab/run.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <climits>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <ctime>
#include <exception>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "bnlab/errors.hpp"
#include "batched.hpp"
#include "engine.hpp"
#include "keras_io.hpp"
#include "torch_io.hpp"
#include "report.hpp"
#include "text.hpp"
#include "version.hpp"
#include "workspace.hpp"

namespace bnlab {

using ojson = nlohmann::ordered_json;

std::string version_string() {
  return std::string("bnlab ") + bnlab_version() + " (commit " + git_commit() + ", LibTorch " + TORCH_VERSION + ")";
}

namespace {

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

/// Progress of a study: a bar with rate and ETA on a terminal, a plain line per 10% otherwise.
class Progress {
 public:
  Progress(size_t total, int verbose, std::ostream& log)
      : total_(total), verbose_(verbose), log_(log),
        tty_(&log == &std::cerr && ::isatty(STDERR_FILENO)), start_(std::chrono::steady_clock::now()) {}
  void update(size_t done) {
    if (verbose_ != 1 || total_ == 0) return;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const double rate = static_cast<double>(done) / std::max(elapsed, 1e-9);
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : 0;
    char buf[200];
    if (tty_) {
      if (done != total_ && elapsed - last_draw_ < 0.1) return;  // redraw at most 10 times a second
      last_draw_ = elapsed;
      const size_t width = 30, filled = width * done / total_;
      std::snprintf(buf, sizeof buf, "\r[%s%s] %zu/%zu runs  %.1f runs/s  ETA %.1fs ", std::string(filled, '#').c_str(),
                    std::string(width - filled, ' ').c_str(), done, total_, rate, eta);
      log_ << buf << (done == total_ ? "\n" : "") << std::flush;
    } else if (done == total_ || done * 10 / total_ != (done - 1) * 10 / total_) {
      std::snprintf(buf, sizeof buf, "study: %zu/%zu runs (%zu%%), %.1f runs/s, ETA %.1fs\n", done, total_,
                    100 * done / total_, rate, eta);
      log_ << buf << std::flush;
    }
  }

 private:
  size_t total_;
  int verbose_;
  std::ostream& log_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
  double last_draw_ = -1;
};

std::string pick_file(const std::string& dir, const std::string& stem, const Config& c, uint64_t seed) {
  return dir + "/" + stem + (c.seeds.size() > 1 ? "_seed" + std::to_string(seed) : "") + ".pt";
}

}  // namespace

std::string finetuned_path(const std::string& dir, const std::string& strategy) {
  std::string safe = strategy;
  for (char& ch : safe)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '_' && ch != '-' && ch != '.') ch = '_';
  return dir + "/finetuned_" + safe + ".pt";
}


void export_weights(const std::string& run_dir, const std::string& strategy, const std::string& format,
                    const std::string& out, const std::string& as) {
  if (format != "keras-h5" && format != "torch")
    throw InputError("--format: expected keras-h5 or torch, got \"" + format + "\"");
  if (format == "keras-h5" && !as.empty()) throw InputError("--as: applies to --format torch only");
  const std::string form = as.empty() ? "state_dict" : as;
  if (form != "state_dict" && form != "checkpoint" && form != "torchscript")
    throw InputError("--as: expected state_dict, checkpoint or torchscript, got \"" + as + "\"" +
                     did_you_mean(as, {"state_dict", "checkpoint", "torchscript"}));
  const std::string resolved = run_dir + "/config.resolved.json";
  if (::access(resolved.c_str(), R_OK) != 0) throw InputError(run_dir + ": no config.resolved.json; is it a bnlab run directory?");
  const Config config = parse_config(read_file(resolved), resolved, {}, run_dir);
  const StrategyConfig* s = nullptr;
  std::vector<std::string> names;
  for (const auto& c : config.strategies) {
    names.push_back(c.name);
    if (c.name == strategy) s = &c;
  }
  if (s == nullptr)
    throw InputError("--strategy: no strategy \"" + strategy + "\" in " + resolved + did_you_mean(strategy, names) +
                     "; strategies: " + join(names, ", "));
  const std::string path = finetuned_path(run_dir, strategy);
  if (::access(path.c_str(), R_OK) != 0)
    throw InputError(path + ": missing; fine-tuned weights are kept for studies with one seed, one sample and no grid");
  c10::IValue root;
  try {
    const std::string bytes = read_file(path);
    root = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception& e) {
    throw InputError(path + ": cannot read the fine-tuned weights (truncated or corrupt)");
  }
  if (!root.isGenericDict()) throw InputError(path + ": not a state dict");
  const auto sd = root.toGenericDict();
  // The widths come from the state dict: the first Linear's input is the data's width (the
  // layers before it keep the width), the head's output the loss's.
  const auto layers = prepared_layers(config.model.layers, *s);
  std::string first, head;
  for (const auto& l : layers)
    if (l.kind == LayerKind::kDense) {
      if (first.empty()) first = l.name + ".weight";
      head = l.name + ".weight";
    }
  for (const auto& name : {first, head})
    if (!sd.contains(name) || sd.at(name).toTensor().dim() != 2)
      throw InputError(path + ": no Linear weight \"" + name + "\"; it does not hold the network of " + resolved);
  Model m = strategy_architecture(config, *s, sd.at(first).toTensor().size(1), sd.at(head).toTensor().size(0));
  load_state(*m, sd, path);
  if (format == "keras-h5") {
    export_keras_h5(out, *m);
  } else {
    export_torch(out, *m, form, config.init_key, config.init_prefix,
                 {{"strategy", strategy}, {"run", run_dir}, {"architecture", pytorch_expression(m->layers())},
                  {"source", config.init_torch.empty() ? config.init_keras : config.init_torch}});
  }
}

std::string Workspace::pretrained_path(size_t i) const { return pick_file(dir, "pretrained", config, config.seeds[i]); }
std::string Workspace::sample_path(size_t i) const { return pick_file(dir, "sample", config, config.seeds[i]); }

std::string workspace_cache_key(const Config& config, bool torch_engine) {
  // Each engine has its own key, and weights cached before the batched engine are not reused.
  return pretrain_cache_key(config) + (torch_engine ? "-torch" : "-batched");
}

Workspace open_workspace(const Config& config, const std::string& out_dir, bool force, bool torch_engine) {
  Workspace w;
  w.torch_engine = torch_engine;
  w.config = config;
  w.dir = out_dir.empty() ? "runs/" + config.name : out_dir;
  w.data = load_data(config);
  resolve_samples(w.config, w.data.size());
  const bool keras = !config.init_keras.empty();
  if (keras || !config.init_torch.empty()) {
    const char* field = keras ? "init.keras" : "init.torch";
    std::string& file = keras ? w.config.init_keras : w.config.init_torch;
    char* real = ::realpath(resolve_path(config.base_dir, file).c_str(), nullptr);
    if (real == nullptr)
      throw InputError(std::string(field) + ": " + resolve_path(config.base_dir, file) + ": cannot read the file (" + errno_text() + ")");
    file = real;
    std::free(real);
    if (keras && config.keras_names.empty() && !read_keras_model_config(file).empty())
      throw std::logic_error("init.keras: the config was parsed without reading " + file +
                             "'s architecture (load_config needs model_file_readers())");
    if (!keras && config.torch_types.empty() && read_torch_file_model(file).form == "torchscript")
      throw std::logic_error("init.torch: the config was parsed without reading " + file +
                             "'s architecture (load_config needs model_file_readers())");
    // The file's input width and head must fit the data and the loss.
    const int64_t head = head_width(config.model.loss, w.data.targets(), w.data.classes);
    if (config.init_inputs > 0 && config.init_inputs != w.data.features())
      throw InputError(std::string(field) + ": " + file + " takes " + std::to_string(config.init_inputs) +
                       " input features, the data has " + std::to_string(w.data.features()) + " (data.feature_columns picks them)");
    if (config.init_head_units > 0 && config.init_head_units != head) {
      const std::string last = keras ? "the last Dense of " + file + " (\"" + config.keras_names.back() + "\")"
                                     : "the last Linear of " + file + " (submodule \"" + config.model.layers.back().name + "\")";
      throw InputError(std::string(field) + ": " + last + " has " + std::to_string(config.init_head_units) + " units, but model.loss " +
                       to_string(config.model.loss) + " needs " + std::to_string(head) +
                       (config.model.loss == LossKind::kGaussianNll ? " (a mean and a log-variance per target)"
                        : config.model.loss == LossKind::kMse       ? " (one per target)"
                                                                    : " (one per class)"));
    }
  }
  if (config.data.source == "csv") {
    // The resolved config names the file absolutely, so it still points at it from the run directory.
    char* real = ::realpath(resolve_path(config.base_dir, config.data.path).c_str(), nullptr);
    if (real != nullptr) {
      w.config.data.path = real;
      std::free(real);
    }
  }
  const bool batches = (config.init_keras.empty() && config.init_torch.empty()) ||
                       std::any_of(config.strategies.begin(), config.strategies.end(), [](const StrategyConfig& s) { return s.recalibrate > 0; });
  if (batches && count_kind(config.model.layers, LayerKind::kBatchNorm) > 0 && config.model.batchnorm.semantics == BnSemantics::kTorch &&
      w.data.size() % config.pretrain.batch_size == 1)
    throw InputError("pretrain.batch_size: " + std::to_string(config.pretrain.batch_size) + " leaves a last batch of ONE sample out of " +
                     std::to_string(w.data.size()) + " rows, which PyTorch BatchNorm refuses in training mode; pick another batch size");
  check_out_dir(w.dir, config, force);
  TorchState torch_file;  // the user's PyTorch file, read once for every seed
  if (!w.config.init_torch.empty()) {
    torch_file = read_torch_state(w.config.init_torch, w.config.init_key, w.config.init_prefix);
    w.config.init_key = torch_file.key;  // the resolved config, and every seed's cache key, name the entry found
    w.torch_form = torch_file.form;
    w.outside_prefix = torch_file.outside_prefix;
  }
  for (size_t i = 0; i < w.config.seeds.size(); ++i) {
    Config c = w.config;
    c.seed = c.seeds[i];
    torch::manual_seed(c.seed);  // initialisation; pretraining itself uses its own generators
    w.models.push_back(build_model(c, w.data));
    w.keys.push_back(workspace_cache_key(c, torch_engine));
    if (!c.init_keras.empty()) {  // every seed starts from the user's Keras weights
      if (c.keras_names.empty()) import_keras_h5(c.init_keras, *w.models.back());
      else import_keras_model(c.init_keras, *w.models.back(), c.keras_names, c.keras_weight_keys);
      w.cache.push_back(CacheState::kLoaded);
      w.imported = true;
      continue;
    }
    if (!c.init_torch.empty()) {  // or from the user's PyTorch weights
      load_torch_state(torch_file, c.init_torch, c.init_prefix, *w.models.back());
      w.cache.push_back(CacheState::kLoaded);
      w.imported = true;
      continue;
    }
    w.cache.push_back(force ? CacheState::kMissing : load_pretrained(w.pretrained_path(i), *w.models.back(), w.keys.back()));
  }
  return w;
}

void ensure_pretrained(Workspace& w, std::ostream& log, int verbose) {
  make_dirs(w.dir);
  for (size_t i = 0; i < w.models.size(); ++i) {
    Config c = w.config;
    c.seed = c.seeds[i];
    const std::string path = w.pretrained_path(i);
    const std::string who = w.models.size() > 1 ? " (seed " + std::to_string(c.seed) + ")" : "";
    if (w.imported) {
      if (verbose > 0 && !c.init_keras.empty())
        log << "weights" << who << ": imported from " << c.init_keras
            << (c.keras_names.empty() ? " (weights only: layers matched by kind and order)" : " (architecture and weights)") << "\n";
      if (verbose > 0 && !c.init_torch.empty()) {
        log << "weights" << who << ": imported from " << c.init_torch << " ("
            << (w.torch_form == "torchscript" ? "TorchScript module: architecture and weights"
                : w.torch_form == "checkpoint" ? "checkpoint entry \"" + c.init_key + "\""
                                               : std::string("state dict"))
            << (c.init_prefix.empty() ? "" : ", prefix \"" + c.init_prefix + "\" stripped") << ")\n";
        if (!w.outside_prefix.empty())
          log << "  " << w.outside_prefix.size() << " tensors outside the prefix were not loaded: "
              << join(std::vector<std::string>(w.outside_prefix.begin(), w.outside_prefix.begin() + std::min<size_t>(5, w.outside_prefix.size())), ", ")
              << (w.outside_prefix.size() > 5 ? ", ..." : "") << "\n";
      }
      save_pretrained(path, *w.models[i], w.data, w.keys[i]);  // so Python and the reference see them too
      continue;
    }
    if (w.cache[i] == CacheState::kLoaded) {
      if (verbose > 0) log << "pretrained weights" << who << ": reusing " << path << " (cache key " << w.keys[i] << ")\n";
      continue;
    }
    if (verbose > 0)
      log << "pretrained weights" << who
          << (w.cache[i] == CacheState::kStale ? ": cache key changed, pretraining again\n" : ": none cached, pretraining\n");
    if (w.torch_engine) pretrain(*w.models[i], w.data, c, log, verbose);
    else pretrain_batched(*w.models[i], w.data, c, log, verbose);
    save_pretrained(path, *w.models[i], w.data, w.keys[i]);
    w.cache[i] = CacheState::kLoaded;
  }
}

RunResult run(const Config& input, const RunOptions& options, std::ostream& log) {
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  const auto since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
  torch::set_num_threads(std::max(1, options.threads));
  if (options.shard_count < 1 || options.shard_index < 1 || options.shard_index > options.shard_count)
    throw InputError("--shard: expected I/N with 1 <= I <= N, got " + std::to_string(options.shard_index) + "/" +
                     std::to_string(options.shard_count));
  if (options.engine != "auto" && options.engine != "torch" && options.engine != "batched")
    throw InputError("--engine: expected auto, batched or torch, got \"" + options.engine + "\"");
  if (options.lanes < 1 || options.lanes > 100000)
    throw InputError("--lanes: must be in [1, 100000], got " + std::to_string(options.lanes));
  const bool torch_engine = options.engine == "torch";
  // Everything that can be wrong with the input is found before the first file is written.
  Workspace w = open_workspace(input, options.out_dir, options.force, torch_engine);
  const Config& config = w.config;
  const std::string& dir = w.dir;
  const auto plan = plan_runs(config);
  std::vector<RunKey> mine;
  for (const auto& k : plan)
    if (static_cast<int>(k.run % static_cast<size_t>(options.shard_count)) == options.shard_index - 1) mine.push_back(k);
  const int verbose = options.verbose >= 0 ? options.verbose : (mine.size() <= 20 ? 2 : 1);

  RunResult result;
  result.out_dir = dir;
  make_dirs(dir);
  remove_stale_temps(dir);
  std::string old_resolved;
  if (::access((dir + "/config.resolved.json").c_str(), R_OK) == 0) old_resolved = read_file(dir + "/config.resolved.json");
  write_file_atomic(dir + "/config.resolved.json", to_json(config));
  if (!config.keras_names.empty()) write_file_atomic(dir + "/keras.json", keras_json(config));
  write_file_atomic(dir + "/architecture.json", architecture_json(w.models[0]->layers(), config.model.batchnorm.semantics, config.model.loss));
  const double data_seconds = since(t_start);

  auto t = clock::now();
  result.pretrain_cached = std::all_of(w.cache.begin(), w.cache.end(), [](CacheState s) { return s == CacheState::kLoaded; });
  ensure_pretrained(w, log, verbose);
  result.pretrain_seconds = since(t);

  // The fine-tuned rows of every seed, loadable by torch.load (the data do not depend on the seed,
  // but each seed's file sits beside that seed's weights).
  const auto idx = torch::tensor(config.finetune.samples, torch::kLong);
  for (size_t i = 0; i < config.seeds.size(); ++i) {
    c10::impl::GenericDict sample(c10::StringType::get(), c10::AnyType::get());
    sample.insert("x", w.data.x.index_select(0, idx));
    sample.insert("y", w.data.y.index_select(0, idx));
    sample.insert("index", idx);
    sample.insert("x_raw", w.data.x_raw.index_select(0, idx));
    const auto bytes = torch::pickle_save(c10::IValue(sample));
    write_file_atomic(w.sample_path(i), std::string(bytes.begin(), bytes.end()));
  }

  // Resume: runs an earlier invocation finished with the same resolved config and the same
  // weights are kept as they are; only the others run.
  std::map<size_t, StrategyResult> previous;
  if (!options.force && result.pretrain_cached && ::access((dir + "/summary.json").c_str(), R_OK) == 0 &&
      old_resolved == to_json(config)) {
    try {
      for (auto& r : read_runs(dir + "/summary.json")) {
        const bool in_plan = r.run < plan.size() && config.strategies[plan[r.run].strategy].name == r.name &&
                             config.grid[plan[r.run].grid].label == r.grid && config.seeds[plan[r.run].seed] == r.seed &&
                             config.finetune.samples[plan[r.run].sample] == r.sample;
        if (in_plan && !r.failed) previous[r.run] = std::move(r);
      }
    } catch (const InputError&) {
      previous.clear();  // an unreadable summary is not a result: run everything again
    }
  }

  t = clock::now();
  std::vector<StrategyResult> results(mine.size());
  std::vector<char> done(mine.size(), 0);
  std::vector<size_t> todo;
  for (size_t m = 0; m < mine.size(); ++m) {
    const auto it = previous.find(mine[m].run);
    if (it != previous.end()) {
      results[m] = it->second;
      done[m] = 1;
      ++result.resumed;
    } else {
      todo.push_back(m);
    }
  }
  if (result.resumed > 0 && verbose > 0)
    log << "resuming: " << result.resumed << " of " << mine.size() << " runs already finished in " << dir << "\n";
  std::vector<std::string> console(mine.size());
  size_t next_print = 0, finished = 0;
  std::mutex mu;
  Progress progress(todo.size(), verbose, log);
  const bool cls = config.model.loss == LossKind::kCrossEntropy;
  // Everything finished so far, in run order, rewritten atomically by a writer thread every
  // `flush_interval` seconds, so a crash or a kill leaves complete files describing complete
  // runs and the fine-tuning threads never wait for the disk.
  std::condition_variable flush_cv;
  std::atomic<bool> flush_stop{false};  // set under `mu` (the wait's predicate), read by write_progress without it
  std::exception_ptr writer_error;  // a failed write (disk full, directory gone), rethrown below
  size_t flushed = 0;
  double flush_interval = 0.5;
  std::thread writer([&] {
    std::unique_lock<std::mutex> lock(mu);
    while (true) {
      flush_cv.wait_for(lock, std::chrono::duration<double>(flush_interval), [&] { return flush_stop.load(); });
      if (flush_stop) return;
      if (finished == flushed) continue;
      std::vector<StrategyResult> sofar;
      for (size_t m = 0; m < mine.size(); ++m)
        if (done[m]) sofar.push_back(results[m]);
      flushed = finished;
      lock.unlock();
      const auto t0 = clock::now();
      try {
        write_progress(dir, config, sofar, mine.size(), [&] { return flush_stop.load(); });
      } catch (...) {
        lock.lock();
        writer_error = std::current_exception();
        return;
      }
      const double took = std::chrono::duration<double>(clock::now() - t0).count();
      lock.lock();
      // Rewriting every finished run costs more as a study grows: keep it under a tenth of the time.
      flush_interval = std::max(0.5, 10 * took);
    }
  });
  // Stops and joins the writer on every way out of this scope, exceptions included.
  const auto stop_writer = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      flush_stop = true;
    }
    flush_cv.notify_all();
    if (writer.joinable()) writer.join();
  };
  struct Finally {
    std::function<void()> f;
    ~Finally() { f(); }
  } writer_guard{stop_writer};

  // One run per strategy: keep each strategy's fine-tuned (best) weights for `bnlab export`.
  const bool single_run = config.seeds.size() == 1 && config.finetune.samples.size() == 1 && config.grid.size() == 1;
  const auto run_config = [&](const RunKey& key) {
    Config rc = config;
    rc.seed = config.seeds[key.seed];
    rc.finetune = config.grid[key.grid].finetune;
    rc.finetune.sample = config.finetune.samples[key.sample];
    return rc;
  };
  const auto header = [&](const RunKey& key) {
    if (verbose < 2) return std::string();
    std::string text = "\nstrategy " + config.strategies[key.strategy].name +
                       (config.grid[key.grid].label.empty() ? "" : ", " + config.grid[key.grid].label);
    if (config.seeds.size() > 1 || config.finetune.samples.size() > 1)
      text += ", seed " + std::to_string(config.seeds[key.seed]) + ", sample " + std::to_string(config.finetune.samples[key.sample]);
    return text + "\n";
  };
  const auto epoch_line = [&](const EpochRecord& e) {
    return verbose >= 2 ? keras_line(e.epoch, e.epochs, e.loss, e.val_loss, cls ? &e.accuracy : nullptr, cls ? &e.val_accuracy : nullptr) + "\n"
                        : std::string();
  };
  const auto footer = [&](const StrategyResult& r) {
    if (r.failed) return "run failed: " + r.error + "\n";
    if (verbose < 2) return std::string();
    char buf[300];
    std::snprintf(buf, sizeof buf, "evaluate before: %.4e  evaluate after (epoch %d weights): %.4e  lag identity: %s (residual %.4e)\n",
                  r.evaluate_before, r.best_epoch, r.evaluate_after, r.lag_identity_holds ? "holds" : "broken", r.lag_residual);
    return std::string(buf);
  };
  const auto failure = [](const std::exception& e) {
    std::string what = e.what();
    StrategyResult r;
    r.failed = true;
    r.error = what.substr(0, what.find("\nException raised from"));
    return r;
  };
  const auto finish = [&](const std::vector<size_t>& ms, std::vector<StrategyResult>& rs, std::vector<std::string>& texts) {
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < ms.size(); ++i) {
      const RunKey& key = mine[ms[i]];
      StrategyResult& r = rs[i];
      r.name = config.strategies[key.strategy].name;
      r.run = key.run;
      r.grid = config.grid[key.grid].label;
      r.seed = config.seeds[key.seed];
      r.sample = config.finetune.samples[key.sample];
      results[ms[i]] = std::move(r);
      console[ms[i]] = std::move(texts[i]);
      done[ms[i]] = 1;
      progress.update(++finished);
    }
    // The console reads in run order at any --jobs.
    while (next_print < todo.size() && done[todo[next_print]]) {
      if (verbose >= 2) log << console[todo[next_print]] << std::flush;
      console[todo[next_print]].clear();
      ++next_print;
    }
  };
  // The torch engine: one run through torch::nn and autograd.
  const auto execute_torch = [&](size_t m) {
    const RunKey& key = mine[m];
    const Config rc = run_config(key);
    const auto& strategy = config.strategies[key.strategy];
    const auto x = w.data.x.narrow(0, rc.finetune.sample, 1), y = w.data.y.narrow(0, rc.finetune.sample, 1);
    std::vector<std::string> text{header(key)};
    std::vector<StrategyResult> r(1);
    Model tuned{nullptr};
    try {
      r[0] = finetune(*w.models[key.seed], strategy, x, y, rc, [&](const EpochRecord& e) { text[0] += epoch_line(e); }, {},
                      &w.data, single_run ? &tuned : nullptr);
      if (single_run) export_torch(finetuned_path(dir, strategy.name), *tuned, "state_dict", "", "", {});
    } catch (const std::exception& e) {
      r[0] = failure(e);
    }
    text[0] += footer(r[0]);
    finish({m}, r, text);
  };
  // What each (seed, strategy) fine-tunes from (recalibrated, folded, FrozenBatchNorm1d), made
  // once for all its samples and grid points (it depends on neither), by whichever thread needs
  // it first; others preparing other strategies meanwhile are not held up. Recalibration
  // through dropout depends on the sample: then the engine prepares each lane itself.
  struct Prepared {
    std::once_flag once;
    Model model{nullptr};
  };
  std::map<std::pair<size_t, size_t>, std::unique_ptr<Prepared>> prepared;
  for (size_t m : todo) prepared.emplace(std::make_pair(mine[m].seed, mine[m].strategy), nullptr);
  for (auto& entry : prepared) entry.second = std::make_unique<Prepared>();
  const auto prepared_for = [&](const RunKey& key, const Config& rc) -> const ModelImpl* {
    const auto& strategy = config.strategies[key.strategy];
    if (strategy.recalibrate > 0 && count_kind(config.model.layers, LayerKind::kDropout) > 0) return nullptr;
    Prepared& p = *prepared.at({key.seed, key.strategy});
    std::call_once(p.once, [&] { p.model = prepare_model(*w.models[key.seed], strategy, rc, &w.data); });
    return p.model.get();
  };
  // The batched engine: runs of one grid point, strategy and seed, each sample a lane.
  const auto execute_batched = [&](const std::vector<size_t>& ms) {
    const RunKey& key = mine[ms.front()];
    const Config rc = run_config(key);
    const auto& strategy = config.strategies[key.strategy];
    std::vector<int64_t> samples;
    std::vector<std::string> text;
    for (size_t m : ms) {
      samples.push_back(config.finetune.samples[mine[m].sample]);
      text.push_back(header(mine[m]));
    }
    std::vector<StrategyResult> rs;
    Model tuned{nullptr};
    try {
      rs = finetune_batched(*w.models[key.seed], strategy, rc, w.data, samples,
                            [&](size_t lane, const EpochRecord& e) { text[lane] += epoch_line(e); },
                            single_run ? &tuned : nullptr, prepared_for(key, rc));
      if (single_run && tuned) export_torch(finetuned_path(dir, strategy.name), *tuned, "state_dict", "", "", {});  // none when the run failed
    } catch (const std::exception& e) {
      rs.assign(ms.size(), failure(e));
    }
    for (size_t i = 0; i < ms.size(); ++i) text[i] += footer(rs[i]);
    finish(ms, rs, text);
  };
  // Work items: the batched engine takes consecutive runs that differ only by sample (the plan
  // orders samples innermost), up to `lanes` at a time; the torch engine takes one run.
  struct Item {
    bool batched;
    std::vector<size_t> runs;  // indices into `mine`
  };
  std::vector<Item> items;
  for (size_t m : todo) {
    const RunKey& k = mine[m];
    const bool batched = !torch_engine && batched_unsupported(config, config.strategies[k.strategy]).empty();
    (batched ? result.batched_runs : result.torch_runs) += 1;
    if (batched && !items.empty() && items.back().batched && items.back().runs.size() < static_cast<size_t>(options.lanes)) {
      const RunKey& f = mine[items.back().runs.front()];
      if (f.grid == k.grid && f.strategy == k.strategy && f.seed == k.seed) {
        items.back().runs.push_back(m);
        continue;
      }
    }
    items.push_back({batched, {m}});
  }

  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t jobs = std::max<size_t>(1, std::min<size_t>(items.size(), options.jobs > 0 ? static_cast<size_t>(options.jobs) : hw));
  {
    std::atomic<size_t> next{0};
    std::atomic<bool> abandon{false};
    std::exception_ptr worker_error;  // what escaped a work item (runs' own failures do not)
    const auto worker = [&] {
      try {
        for (size_t i = next++; i < items.size() && !stop_requested() && !abandon; i = next++) {
          if (items[i].batched) execute_batched(items[i].runs);
          else execute_torch(items[i].runs.front());
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!worker_error) worker_error = std::current_exception();
        abandon = true;
      }
    };
    std::vector<std::thread> pool;
    for (size_t j = 1; j < jobs; ++j) pool.emplace_back(worker);
    worker();
    for (auto& th : pool) th.join();
    if (worker_error) std::rethrow_exception(worker_error);  // the writer guard stops the writer
  }
  stop_writer();
  if (writer_error) std::rethrow_exception(writer_error);
  result.finetune_seconds = since(t);
  std::vector<StrategyResult> finished_runs;
  for (size_t m = 0; m < mine.size(); ++m)
    if (done[m]) finished_runs.push_back(results[m]);
  for (const auto& r : finished_runs) result.failed += r.failed ? 1 : 0;
  result.planned = mine.size();
  result.interrupted = finished_runs.size() < mine.size();

  const std::string table = write_reports(dir, config, finished_runs, options.plots && !result.interrupted, log, mine.size());
  ojson manifest{{"argv", options.argv},
                 {"bnlab_version", bnlab_version()},
                 {"git_commit", git_commit()},
                 {"libtorch_version", TORCH_VERSION},
                 {"seeds", config.seeds},
                 {"threads", torch::get_num_threads()},
                 {"jobs", jobs},
                 {"engine", {{"requested", options.engine}, {"lanes", options.lanes}, {"batched_runs", result.batched_runs},
                             {"torch_runs", result.torch_runs}}},
                 {"shard", std::to_string(options.shard_index) + "/" + std::to_string(options.shard_count)},
                 {"runs", mine.size()},
                 {"finished_runs", finished_runs.size()},
                 {"resumed_runs", result.resumed},
                 {"interrupted", result.interrupted},
                 {"failed_runs", result.failed},
                 {"finished_at", iso_now()},
                 {"pretrain_cached", result.pretrain_cached},
                 {"cache_keys", w.keys},
                 {"timings_s",
                  {{"data", data_seconds},
                   {"pretrain", result.pretrain_seconds},
                   {"finetune", result.finetune_seconds},
                   {"total", since(t_start)}}}};
  write_file_atomic(dir + "/manifest.json", manifest.dump(2) + "\n");
  if (verbose > 0) {
    log << "\n" << table << "\nresults in " << dir << "\n";
    if (result.failed) log << result.failed << " run(s) failed; see summary.md\n";
  }
  if (result.interrupted)
    log << "interrupted: " << finished_runs.size() << " of " << mine.size() << " runs finished and saved in " << dir
        << "; run the same command again to resume\n";
  result.runs = std::move(finished_runs);
  return result;
}

}  // namespace bnlab
