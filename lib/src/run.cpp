// `bnlab run`: a study of strategies x seeds x samples (x grid points), run concurrently with
// results identical to a sequential run, reported as it goes and summarised at the end.
#include "bnlab/run.hpp"

#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
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
#include <optional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "bnlab/errors.hpp"
#include "batched.hpp"
#include "engine.hpp"
#include "keras_io.hpp"
#include "torch_io.hpp"
#include "html_report.hpp"
#include "tensorboard.hpp"
#include "report.hpp"
#include "store.hpp"
#include "layer_kinds.hpp"
#include "optimizers.hpp"
#include "run_dir.hpp"
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
  check_new_output_file(out, "-o");
  if (format == "keras-h5" && !as.empty()) throw InputError("--as: applies to --format torch only");
  const std::string form = as.empty() ? "state_dict" : as;
  if (form != "state_dict" && form != "checkpoint" && form != "torchscript")
    throw InputError("--as: expected state_dict, checkpoint or torchscript, got \"" + as + "\"" +
                     did_you_mean(as, {"state_dict", "checkpoint", "torchscript"}));
  // The study's own record of itself: the store's config, and how the strategy's run ended.
  const StudyRecord study = open_study(run_dir);
  const Config& config = study.config;
  const Store& store = study.store;
  const std::string& resolved = store.path();
  const StrategyConfig* s = nullptr;
  std::vector<std::string> names;
  for (const auto& c : config.strategies) {
    names.push_back(c.name);
    if (c.name == strategy) s = &c;
  }
  if (s == nullptr)
    throw InputError("--strategy: no strategy \"" + strategy + "\" in " + resolved + did_you_mean(strategy, names) +
                     "; strategies: " + join(names, ", "));
  std::string error;
  bool finished = false;
  store.for_each([&](const StrategyResult& r) {
    if (r.name != strategy) return;
    finished = true;
    if (r.failed) error = r.error;
  }, /*curves=*/false);
  if (!error.empty()) throw InputError("--strategy: the run of \"" + strategy + "\" in " + run_dir + " failed (" + error + "); it has no fine-tuned weights");
  if (!finished)
    throw InputError("--strategy: " + resolved + " holds no run of \"" + strategy + "\" (the study stopped before it); run the study again to finish it");
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

namespace {

/// Bytes of memory available to this process: MemAvailable, or less where a cgroup (a
/// container, a Slurm job) limits it; 0 when unknown.
double available_memory() {
  double have = 0;
  {
    std::ifstream in("/proc/meminfo");
    std::string key, unit;
    double kib = 0;
    while (in >> key >> kib >> unit)
      if (key == "MemAvailable:") have = kib * 1024.0;
  }
  std::ifstream limit("/sys/fs/cgroup/memory.max"), used("/sys/fs/cgroup/memory.current");
  double max = 0, current = 0;
  if (limit >> max && used >> current && max > current && (have == 0 || max - current < have)) have = max - current;
  return have;  // "max" (no limit) does not read as a number
}

std::string gib(double bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace

void check_memory(const Config& c, const Dataset& data, int jobs, int lanes) {
  const auto specs = sized_layers(c.model.layers, data.features(), head_width(c.model.loss, data.targets(), data.classes));
  double params = 0, buffers = 0, widths = 0;
  for (const auto& l : specs) {
    widths += static_cast<double>(l.out);
    for (const auto& t : layer_kind(l.kind).state(l)) {
      double n = t.shape.empty() ? 0 : 1;
      for (int64_t d : t.shape) n *= static_cast<double>(d);
      (t.where == StateTensor::kParameter ? params : buffers) += n;
    }
  }
  int slots = 0;
  for (const auto* o : {&c.pretrain.optimizer, &c.finetune.optimizer}) slots = std::max(slots, optimizer_kind(o->kind).slots(*o));
  // Each lane: parameters, gradients and optimizer state, buffers, and a few activations per unit.
  const double lane = 4.0 * (params * (2 + slots) + buffers + 4 * widths * static_cast<double>(c.finetune.set_size()));
  if (jobs <= 0) jobs = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));  // 0: every core
  // Work items: runs of one grid point, strategy and seed, up to `lanes` samples each.
  const auto samples = static_cast<int64_t>(c.finetune.samples.size());
  const int64_t per_item = std::min<int64_t>(std::max(1, lanes), std::max<int64_t>(1, samples));
  const int64_t items = static_cast<int64_t>(c.grid.size() * c.strategies.size() * c.seeds.size()) * ((samples + per_item - 1) / per_item);
  const double in_flight = static_cast<double>(std::min<int64_t>(jobs, std::max<int64_t>(1, items)) * per_item);
  // Pretraining: one copy of the model, its torch module and a checkpoint, and a batch of activations.
  const double models = 4.0 * (params + buffers) * 4 * static_cast<double>(c.seeds.size()) +
                        4.0 * static_cast<double>(c.pretrain.batch_size) * widths * 4;
  const double dataset = 8.0 * static_cast<double>(data.x.numel() + data.y.numel());
  const double total = lane * in_flight + models + dataset;
  const double have = available_memory();
  if (have > 0 && total > have)
    throw InputError("this study needs about " + gib(total) + " of memory and " + gib(have) + " is available: the model has " +
                     fmt_double(params) + " parameters (" + gib(lane) + " per fine-tuned sample, " + fmt_double(in_flight) +
                     " at a time: --jobs x --lanes), the data " + gib(dataset) + "; use fewer --jobs or --lanes, or a smaller model");
}

Workspace open_workspace(const Config& config, const std::string& out_dir, bool force, bool torch_engine, int jobs, int lanes) {
  Workspace w;
  w.torch_engine = torch_engine;
  w.config = config;
  w.dir = out_dir.empty() ? "runs/" + config.name : out_dir;
  check_output_dir(w.dir, config.name, force);  // first: a wrong --out costs nothing
  w.data = load_data(config);
  if (!w.data.class_labels.empty()) w.config.data.class_labels = w.data.class_labels;  // the resolved config records the mapping
  resolve_samples(w.config, w.data.size());
  // Only the fine-tuned rows' raw values are needed (sample.pt); all of them would hold the data
  // a second time (190 MiB for 1,000,000 x 50).
  w.data.sample_x_raw = w.data.x_raw.index_select(0, torch::tensor(fine_tuned_rows(w.config.finetune), torch::kLong));
  w.data.x_raw = torch::Tensor();
  check_memory(w.config, w.data, jobs, lanes);  // before any model is built
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
  own_output_dir(w.dir);
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

namespace {

// ---- the study plan: this shard's runs, what the store already holds, the work items -------

struct StudyPlan {
  std::vector<RunKey> mine;                 ///< this shard's runs, in run order
  std::vector<size_t> todo;                 ///< indices into `mine` still to run
  size_t resumed = 0;                       ///< runs of `mine` the store already holds
  struct Item {
    bool batched;
    std::vector<size_t> runs;               ///< indices into `mine`
  };
  std::vector<Item> items;
  size_t batched_runs = 0, torch_runs = 0;
};

StudyPlan make_plan(const Config& config, const RunOptions& options) {
  StudyPlan plan;
  for (const auto& k : plan_runs(config))
    if (static_cast<int>(k.run % static_cast<size_t>(options.shard_count)) == options.shard_index - 1) plan.mine.push_back(k);
  return plan;
}

/// Marks the runs the store holds as done and packs the rest into work items: the batched
/// engine takes consecutive runs that differ only by sample (the plan orders samples
/// innermost), up to `lanes` at a time; the torch engine takes one run.
void pack_work(StudyPlan& plan, const Config& config, const std::vector<size_t>& completed, int lanes, bool torch_engine) {
  std::vector<char> have;
  for (size_t run : completed) {
    if (have.size() <= run) have.resize(run + 1, 0);
    have[run] = 1;
  }
  for (size_t m = 0; m < plan.mine.size(); ++m) {
    if (plan.mine[m].run < have.size() && have[plan.mine[m].run]) {
      ++plan.resumed;
      continue;
    }
    plan.todo.push_back(m);
    const RunKey& k = plan.mine[m];
    const bool batched = !torch_engine && batched_unsupported(config, config.strategies[k.strategy]).empty();
    (batched ? plan.batched_runs : plan.torch_runs) += 1;
    if (batched && !plan.items.empty() && plan.items.back().batched && plan.items.back().runs.size() < static_cast<size_t>(lanes)) {
      const RunKey& f = plan.mine[plan.items.back().runs.front()];
      if (f.grid == k.grid && f.strategy == k.strategy && f.seed == k.seed) {
        plan.items.back().runs.push_back(m);
        continue;
      }
    }
    plan.items.push_back({batched, {m}});
  }
}

/// The store a study writes into: the one in the directory when it holds this very study (same
/// settings, weights and shard) and may be resumed, else a new one replacing bnlab's old store.
Store open_store(const std::string& dir, const Config& config, const std::vector<std::string>& keys, const RunOptions& options,
                 bool resumable, size_t planned) {
  const std::string path = store_path(dir);
  const std::string shard = std::to_string(options.shard_index) + "/" + std::to_string(options.shard_count);
  const std::string keys_json = ojson(keys).dump();
  std::string exports_written = "[]";  // carried over: the exports in the directory are bnlab's
  if (::access(path.c_str(), F_OK) == 0) {
    Store s = Store::open(path, true);
    const std::string theirs = s.meta("shard");
    if (theirs != shard && !options.force)
      throw InputError(path + ": holds the runs of shard " + theirs + " of this study, not " + shard +
                       "; give each shard its own --out (pass --force to replace them)");
    if (resumable && s.meta("identity") == study_identity(config) && s.meta("cache_keys") == keys_json) {
      s.delete_failed();  // failed runs run again
      s.reclassify(config.report.diverged_factor);
      s.set_meta("config", to_json(config));
      return s;
    }
    if (!s.meta("exports_written").empty()) exports_written = s.meta("exports_written");
  }
  return Store::create(path, {{"experiment", config.name},
                              {"exports_written", exports_written},
                              {"identity", study_identity(config)},
                              {"config", to_json(config)},
                              {"cache_keys", keys_json},
                              {"shard", shard},
                              {"runs_planned", std::to_string(planned)},
                              {"bnlab_version", bnlab_version()},
                              {"git_commit", git_commit()},
                              {"libtorch_version", TORCH_VERSION},
                              {"created_at", iso_now()}});
}

// ---- sinks: where finished runs go -------------------------------------------------------

/// A finished run on its way to the sinks.
struct Finished {
  size_t m = 0;                             ///< index into StudyPlan::mine
  StrategyResult result;
  std::string text;                         ///< its console lines (verbose 2)
  Model tuned{nullptr};                     ///< one-run-per-strategy studies: the fine-tuned (best) weights
};

/// One output of a study. take() is called from the executor's workers, concurrently, with a
/// batch of finished runs; close() once after the last batch (also when the study stops early),
/// and rethrows what went wrong (StoreSink: up to its last commit; see its finish()).
class Sink {
 public:
  virtual ~Sink() = default;
  virtual void take(std::vector<Finished>& batch) = 0;
  virtual void close() {}
};

using RunCounts = std::array<size_t, 3>;  ///< runs that ended ok, diverged, failed

/// progress.json: `counts` finished by this invocation in `elapsed` seconds of its fine-tuning;
/// `last`: the phase is over (finished, or stopped short of the plan).
void write_progress_file(const std::string& dir, size_t planned, size_t resumed, const RunCounts& counts, double elapsed, bool last) {
  const size_t now = counts[0] + counts[1] + counts[2], done = resumed + now;
  const double rate = elapsed > 0 ? static_cast<double>(now) / elapsed : 0.0;
  ojson p{{"runs_planned", planned}, {"runs_done", done},        {"resumed", resumed},      {"ok", counts[0]},
          {"diverged", counts[1]},   {"failed", counts[2]},      {"runs_per_s", rate},      {"elapsed_s", elapsed},
          {"eta_s", rate > 0 ? static_cast<double>(planned - done) / rate : 0.0},
          {"state", last ? (done == planned ? "finished" : "stopped") : "running"}, {"updated_at", iso_now()}};
  write_status_atomic(dir + "/progress.json", p.dump(2) + "\n");
}

/// Inserts runs into the store from a writer thread, in transactions of whatever finished since
/// the last one (every 0.2 s, or once kWakeAt runs are waiting when it looks), and keeps progress.json
/// (counts, rate, ETA) current, from its first state (running, nothing done), written as the
/// sink is made. The last transaction is the writer's, or the closing thread's when the writer
/// sleeps (stop()); progress.json's final state is always the writer's, after that commit:
/// close() returns once the last run is stored, and finish() waits for that final state (the
/// caller writes its reports meanwhile). With `move`, take() moves each result out of the batch
/// (no later sink may read them), else copies it.
class StoreSink : public Sink {
 public:
  StoreSink(Store& store, std::string dir, size_t planned, size_t resumed, bool move)
      : store_(store), dir_(std::move(dir)), planned_(planned), resumed_(resumed), move_(move),
        start_(std::chrono::steady_clock::now()) {
    // The writer starts first and waits for the lock until progress.json's first state is
    // written: a new thread first ran 0.15 to 2.9 ms after its creation on this VM (an idle
    // virtual CPU waking), during which the writer fell behind the study; now up to the write's
    // 0.3 to 0.5 ms of it passes before the study begins.
    std::unique_lock<std::mutex> lock(mu_);
    writer_ = std::thread([this] { loop(); });
    try {
      write_progress_file(dir_, planned_, resumed_, RunCounts{}, 0.0, false);
    } catch (...) {
      stopped_ = closer_inserts_ = true;  // the writer returns, its statements prepared at most
      error_ = std::current_exception();
      lock.unlock();
      cv_.notify_all();
      writer_.join();
      throw;
    }
  }
  ~StoreSink() override {
    stop();
    if (writer_.joinable()) writer_.join();
  }
  void take(std::vector<Finished>& batch) override {
    std::unique_lock<std::mutex> lock(mu_);
    // Back-pressure: workers wait while the writer is behind, so memory stays bounded (a napping
    // writer is woken then: its nap may be long after a change of pace).
    if (queue_.size() >= kMaxQueued && sleeping_) cv_.notify_one();
    drained_.wait(lock, [&] { return queue_.size() < kMaxQueued || error_ || stopped_; });
    if (error_) std::rethrow_exception(error_);
    // The rate runs come at, for the writer's naps: since the end of the first work item (the
    // study's set-up and the threads' start-up left out), over every worker.
    const auto now = std::chrono::steady_clock::now();
    if (first_take_ == std::chrono::steady_clock::time_point{}) first_take_ = now;
    else rate_runs_ += batch.size();
    if (rate_runs_ > 0) per_run_ = std::chrono::duration<double>(now - first_take_).count() / static_cast<double>(rate_runs_);
    for (auto& f : batch) {
      counts_[f.result.failed ? 2 : f.result.diverged ? 1 : 0] += 1;
      if (move_) queue_.push_back(std::move(f.result));
      else queue_.push_back(f.result);
    }
    // No wake-up from here: the writer wakes itself when kWakeAt runs should be waiting (see
    // loop()). Waking it from a worker cost that worker 15 us per wake-up on this VM (a futex
    // system call and an interrupt to the other virtual CPU). (Waking it for each work item near
    // the study's end shortened the last transaction, but made the number of transactions of a
    // small study, hence its writes, depend on thread timing: tests/faults/test_disk_full.py
    // counts them.)
  }
  /// Returns once every run taken is in the store (or the store failed: rethrown). A failure of
  /// the final progress.json that follows the commit is finish()'s.
  void close() override {
    stop();
    std::unique_lock<std::mutex> lock(mu_);
    drained_.wait(lock, [&] { return committed_ || error_; });
    if (!committed_) std::rethrow_exception(error_);
  }
  /// Returns once progress.json holds its final state (or its write failed: rethrown).
  void finish() {
    close();
    if (writer_.joinable()) writer_.join();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void stop() {
    std::unique_lock<std::mutex> lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    // A sleeping writer would first have to be woken (0.05 to 1.7 ms on this VM) before the last
    // transaction: this thread inserts what is left instead, and then wakes the writer for
    // progress.json's final state, which nothing here waits for (see finish()). A writer inside
    // a transaction sees stopped_ when it is done and inserts the rest itself.
    const bool insert_here = sleeping_ && !error_;
    closer_inserts_ = insert_here;
    std::vector<StrategyResult> rest;
    if (insert_here) rest.swap(queue_);
    const RunCounts counts = counts_;
    lock.unlock();
    drained_.notify_all();
    if (!insert_here) {
      cv_.notify_all();
      return;
    }
    try {
      store_.insert(rest);
    } catch (...) {
      fail(std::current_exception());
      cv_.notify_all();
      return;
    }
    committed(counts);
  }
  /// The last transaction is committed: close() may return, and the writer writes progress.json's
  /// final state with these counts and the time of the commit.
  void committed(const RunCounts& counts) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      committed_ = true;
      final_counts_ = counts;
      final_elapsed_ = elapsed();
    }
    drained_.notify_all();
    cv_.notify_all();
  }
  /// How long the kWakeAt - queued runs still to come should take at the rate runs have come
  /// (see take()), from 0.05 ms to 0.2 s; until that rate is known, a quarter of the time since the
  /// sink was made, from 0.1 ms (a first item of a fast study took 0.3 to 0.6 ms; a slow study's
  /// writer wakes about three times per doubling of the time it has waited). With mu_ held.
  std::chrono::steady_clock::duration nap() const {
    const double s = per_run_ > 0 ? std::max(5e-5, per_run_ * static_cast<double>(kWakeAt - std::min(queue_.size(), kWakeAt)))
                                  : std::max(1e-4, elapsed() / 4);
    using seconds = std::chrono::duration<double>;
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(seconds(std::min(s, 0.2)));
  }
  double elapsed() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }
  void loop() {
    pthread_setname_np(pthread_self(), "bnlab-writer");  // for perf and top -H
    // While the constructor writes progress.json and the first work item runs: the statements,
    // and this thread's first allocations (its malloc arena), which made the first transaction
    // 0.5 to 0.85 ms instead of 0.17 to 0.3 (no other thread uses the store until the phase ends).
    try {
      store_.prepare_inserts();
    } catch (...) {
      fail(std::current_exception());
      return;
    }
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<StrategyResult> batch;  // its capacity goes back to the queue after each transaction
    while (!committed_) {
      // It takes the queue once kWakeAt runs wait, at the end (woken by stop()), or 0.2 s after
      // it began to wait; kWakeAt runs that came in while it was inserting are taken at once. It
      // wakes itself to look: when kWakeAt runs should be there at the rate they have come so far.
      const auto ready = [&] { return stopped_ || queue_.size() >= kWakeAt; };
      if (!ready()) {
        sleeping_ = true;
        const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
        while (!ready() && std::chrono::steady_clock::now() < until)
          cv_.wait_until(lock, std::min(until, std::chrono::steady_clock::now() + nap()));
        sleeping_ = false;
      }
      if (closer_inserts_) {  // stop() inserts the rest: its commit, or its failure
        cv_.wait(lock, [&] { return committed_ || error_; });
        break;
      }
      const bool last = stopped_;
      batch.clear();
      batch.swap(queue_);
      const RunCounts counts = counts_;
      lock.unlock();
      drained_.notify_all();
      try {
        store_.insert(batch);
        if (last) {
          committed(counts);
        } else if (elapsed() - last_progress_ >= 1.0) {  // at most once a second while it runs
          last_progress_ = elapsed();
          write_progress_file(dir_, planned_, resumed_, counts, last_progress_, false);
        }
      } catch (...) {
        fail(std::current_exception());
        return;
      }
      lock.lock();
    }
    if (error_) return;
    const RunCounts counts = final_counts_;
    const double at = final_elapsed_;
    lock.unlock();
    try {
      write_progress_file(dir_, planned_, resumed_, counts, at, true);
    } catch (...) {
      fail(std::current_exception());
    }
  }
  /// The writer's or the closing thread's error, for the workers (take), close() and finish() to
  /// rethrow; the writer then stops.
  void fail(std::exception_ptr e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::move(e);
    }
    drained_.notify_all();
  }
  Store& store_;
  std::string dir_;
  size_t planned_, resumed_;
  bool move_;
  std::chrono::steady_clock::time_point start_;
  double last_progress_ = 0;  // the constructor wrote progress.json
  /// Runs waiting for the writer, at most (workers wait beyond it). 8192 runs are
  /// about 8 MB: with the engine at 75,000 runs/s, a queue of 65,536 held 70 MB more at the peak
  /// of a 100,000-sample study than at 10,000 samples (BENCHMARKS-scale.md).
  static constexpr size_t kMaxQueued = 1 << 13;
  /// The writer takes the queue once this many runs wait (or every 200 ms, or at the end), so that
  /// a small study's runs are inserted while the workers compute rather than all after them.
  /// One 16-lane work item: inserting runs costs the writer about what computing them costs a
  /// worker (4 to 5 us per run on this VM), so it begins with the first item; once behind, it
  /// takes what has come meanwhile, in larger transactions (35 us each). A study of fewer runs
  /// that ends within 0.2 s has one transaction, at its end, whatever the timing (tests/faults
  /// counts its writes).
  static constexpr size_t kWakeAt = 16;
  std::mutex mu_;
  std::condition_variable cv_, drained_;
  std::vector<StrategyResult> queue_;
  RunCounts counts_{};  // in this invocation
  std::chrono::steady_clock::time_point first_take_{};  // when the first work item came
  size_t rate_runs_ = 0;  // runs that came after it
  double per_run_ = 0;    // seconds per run since then (0: not known yet)
  bool stopped_ = false;
  bool sleeping_ = false;        // the writer waits on cv_
  bool closer_inserts_ = false;  // stop() (or a failed constructor) stands in for the writer's last transaction
  bool committed_ = false;       // the last transaction is committed
  RunCounts final_counts_{};     // what it stored, and when (for progress.json's final state)
  double final_elapsed_ = 0;
  std::exception_ptr error_;
  std::thread writer_;
};

/// The console: each run's epoch lines in run order at any --jobs (verbose 2), and the progress bar.
class ConsoleSink : public Sink {
 public:
  ConsoleSink(const StudyPlan& plan, int verbose, std::ostream& log) : plan_(plan), verbose_(verbose), log_(log),
      progress_(plan.todo.size(), verbose, log) {
    if (verbose_ >= 2) position_.assign(plan.mine.size(), 0);
    for (size_t i = 0; i < plan.todo.size() && verbose_ >= 2; ++i) position_[plan.todo[i]] = i;
  }
  void take(std::vector<Finished>& batch) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& f : batch) {
      progress_.update(++finished_);
      if (verbose_ < 2) continue;
      waiting_[position_[f.m]] = std::move(f.text);
    }
    while (!waiting_.empty() && waiting_.begin()->first == next_) {
      log_ << waiting_.begin()->second << std::flush;
      waiting_.erase(waiting_.begin());
      ++next_;
    }
  }

 private:
  const StudyPlan& plan_;
  int verbose_;
  std::ostream& log_;
  Progress progress_;
  std::mutex mu_;
  size_t finished_ = 0, next_ = 0;
  std::vector<size_t> position_;            ///< verbose 2: a run's place in the console order
  std::map<size_t, std::string> waiting_;   ///< finished early, printed when its turn comes
};

/// One-run-per-strategy studies: each strategy's fine-tuned (best) weights, for `bnlab export`.
class WeightsSink : public Sink {
 public:
  explicit WeightsSink(std::string dir) : dir_(std::move(dir)) {}
  void take(std::vector<Finished>& batch) override {
    for (auto& f : batch)
      if (f.tuned) export_torch(finetuned_path(dir_, f.result.name), *f.tuned, "state_dict", "", "", {});
  }

 private:
  std::string dir_;
};

/// RunOptions::on_run, called with every finished run.
class CallbackSink : public Sink {
 public:
  explicit CallbackSink(std::function<void(const StrategyResult&)> f) : f_(std::move(f)) {}
  void take(std::vector<Finished>& batch) override {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& b : batch) f_(b.result);
  }

 private:
  std::function<void(const StrategyResult&)> f_;
  std::mutex mu_;
};

// ---- the executor: work items to the engines, finished runs to the sinks -----------------

class Executor {
 public:
  Executor(const Workspace& w, const StudyPlan& plan, int verbose, bool keep_weights, std::vector<Sink*> sinks)
      : w_(w), c_(w.config), plan_(plan), verbose_(verbose), keep_weights_(keep_weights), sinks_(std::move(sinks)),
        cls_(c_.model.loss == LossKind::kCrossEntropy) {
    for (size_t m : plan.todo) prepared_.emplace(std::make_pair(plan.mine[m].seed, plan.mine[m].strategy), nullptr);
    for (auto& entry : prepared_) entry.second = std::make_unique<Prepared>();
  }

  /// Runs every item on `jobs` threads; stops early when asked to (request_stop()). What
  /// escapes an item (not a run's own failure) is rethrown after the workers stop. Returns the
  /// seconds the workers spent in the engines, summed.
  double execute(size_t jobs) {
    std::atomic<size_t> next{0};
    double engine_seconds = 0;
    std::atomic<bool> abandon{false};
    std::exception_ptr error;
    std::mutex mu;
    const auto worker = [&] {
      try {
        BatchedCache cache;  // this worker's laid-out models, reused by its next work items
        std::chrono::steady_clock::duration in_engines{0};
        for (size_t i = next++; i < plan_.items.size() && !stop_requested() && !abandon; i = next++) {
          const auto start = std::chrono::steady_clock::now();
          auto batch = plan_.items[i].batched ? batched(plan_.items[i].runs, cache) : torch(plan_.items[i].runs.front());
          in_engines += std::chrono::steady_clock::now() - start;
          for (Sink* s : sinks_) s->take(batch);
        }
        std::lock_guard<std::mutex> lock(mu);
        engine_seconds += std::chrono::duration<double>(in_engines).count();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        abandon = true;
      }
    };
    std::vector<std::thread> pool;
    for (size_t j = 1; j < jobs; ++j)
      pool.emplace_back([&] {
        pthread_setname_np(pthread_self(), "bnlab-worker");  // for perf and top -H; the first worker is the main thread
        worker();
      });
    worker();
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
    return engine_seconds;
  }

 private:
  /// What each (seed, strategy) fine-tunes from (recalibrated, folded, FrozenBatchNorm1d), made
  /// once for all its samples and grid points (it depends on neither), by whichever thread needs
  /// it first. Recalibration through dropout depends on the sample: then each lane prepares its own.
  struct Prepared {
    std::once_flag once;
    Model model{nullptr};
  };

  /// What one run is, handed to the engines beside the study's config: no copy of either.
  RunSpec spec(const RunKey& key) const {
    return {c_.seeds[key.seed], &c_.grid[key.grid].finetune, c_.finetune.samples[key.sample]};
  }
  std::string header(const RunKey& key) const {
    if (verbose_ < 2) return std::string();
    std::string text = "\nstrategy " + c_.strategies[key.strategy].name + (c_.grid[key.grid].label.empty() ? "" : ", " + c_.grid[key.grid].label);
    if (c_.seeds.size() > 1 || c_.finetune.samples.size() > 1 || c_.finetune.on_sets())
      text += ", seed " + std::to_string(c_.seeds[key.seed]) + ", " + c_.finetune.unit() + " " +
              std::to_string(c_.finetune.samples[key.sample]) + set_members(c_.finetune, c_.finetune.samples[key.sample]);
    return text + "\n";
  }
  std::string epoch_line(const EpochRecord& e) const {
    return verbose_ >= 2 ? keras_line(e.epoch, e.epochs, e.loss, e.val_loss, cls_ ? &e.accuracy : nullptr, cls_ ? &e.val_accuracy : nullptr) + "\n"
                         : std::string();
  }
  std::string footer(const StrategyResult& r) const {
    if (r.failed) return "run failed: " + r.error + "\n";
    if (verbose_ < 2) return std::string();
    char buf[300];
    std::snprintf(buf, sizeof buf, "evaluate before: %.4e  evaluate after (epoch %d weights): %.4e  lag identity: %s (residual %.4e)%s\n",
                  r.evaluate_before, r.best_epoch, r.evaluate_after, r.lag_identity_holds ? "holds" : "broken", r.lag_residual,
                  r.diverged ? "  DIVERGED" : "");
    return std::string(buf);
  }
  static StrategyResult failure(const std::exception& e) {
    std::string what = e.what();
    StrategyResult r;
    r.failed = true;
    r.error = what.substr(0, what.find("\nException raised from"));
    return r;
  }
  /// Names a finished run by its place in the study and classifies it.
  void label(Finished& f, const char* engine) const {
    const RunKey& key = plan_.mine[f.m];
    StrategyResult& r = f.result;
    r.name = c_.strategies[key.strategy].name;
    r.run = key.run;
    r.grid = c_.grid[key.grid].label;
    r.seed = c_.seeds[key.seed];
    r.sample = c_.finetune.samples[key.sample];
    r.engine = engine;
    r.diverged = diverged(r, c_.report.diverged_factor);
    f.text += footer(r);
  }
  std::vector<Finished> torch(size_t m) {
    const RunKey& key = plan_.mine[m];
    const RunSpec run = spec(key);
    const auto rows = torch::tensor(run.finetune->rows_of(run.sample), torch::kLong);
    const auto x = w_.data.x.index_select(0, rows), y = w_.data.y.index_select(0, rows);
    std::vector<Finished> out(1);
    out[0].m = m;
    out[0].text = header(key);
    try {
      out[0].result = finetune(*w_.models[key.seed], c_.strategies[key.strategy], x, y, c_, run,
                               [&](const EpochRecord& e) { out[0].text += epoch_line(e); }, {}, &w_.data,
                               keep_weights_ ? &out[0].tuned : nullptr);
    } catch (const std::exception& e) {
      out[0].result = failure(e);
      out[0].tuned = nullptr;
    }
    label(out[0], "torch");
    return out;
  }
  std::vector<Finished> batched(const std::vector<size_t>& ms, BatchedCache& cache) {
    const RunKey& key = plan_.mine[ms.front()];
    const RunSpec run = spec(key);
    const auto& strategy = c_.strategies[key.strategy];
    std::vector<int64_t> samples;
    std::vector<Finished> out(ms.size());
    for (size_t i = 0; i < ms.size(); ++i) {
      samples.push_back(c_.finetune.samples[plan_.mine[ms[i]].sample]);
      out[i].m = ms[i];
      out[i].text = header(plan_.mine[ms[i]]);
    }
    Model tuned{nullptr};
    std::vector<StrategyResult> rs;
    try {
      rs = finetune_batched(*w_.models[key.seed], strategy, c_, run, w_.data, samples,
                            // Epoch lines are text for the console at verbose 2 only; below it, no call
                            // per lane and epoch (an empty line appended 160 times per 16-lane item).
                            verbose_ >= 2 ? std::function<void(size_t, const EpochRecord&)>(
                                                [&](size_t lane, const EpochRecord& e) { out[lane].text += epoch_line(e); })
                                          : nullptr,
                            keep_weights_ ? &tuned : nullptr, prepared_for(key, run), &cache);
    } catch (const std::exception& e) {
      rs.assign(ms.size(), failure(e));
      tuned = nullptr;
    }
    for (size_t i = 0; i < ms.size(); ++i) {
      out[i].result = std::move(rs[i]);
      label(out[i], "batched");
    }
    if (keep_weights_ && !out[0].result.failed) out[0].tuned = tuned;  // one lane: the study has one sample
    return out;
  }
  const ModelImpl* prepared_for(const RunKey& key, const RunSpec& run) {
    const auto& strategy = c_.strategies[key.strategy];
    if (strategy.recalibrate > 0 && count_kind(c_.model.layers, LayerKind::kDropout) > 0) return nullptr;
    // A preparation that only copies the pretrained model (prepare_copies_only) gives the same
    // layers and state: the batched engine reads the pretrained model itself (the copy took
    // 0.2 ms of torch per strategy, in the phase; the engine never writes the model it reads).
    if (prepare_copies_only(strategy)) return w_.models[key.seed].get();
    Prepared& p = *prepared_.at({key.seed, key.strategy});
    std::call_once(p.once, [&] { p.model = prepare_model(*w_.models[key.seed], strategy, c_, run, &w_.data); });
    return p.model.get();
  }

  const Workspace& w_;
  const Config& c_;
  const StudyPlan& plan_;
  int verbose_;
  bool keep_weights_;
  std::vector<Sink*> sinks_;
  bool cls_;
  std::map<std::pair<size_t, size_t>, std::unique_ptr<Prepared>> prepared_;
};

}  // namespace

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
  // Everything that can be wrong with the input is found before the first file is written,
  // the study store included (another program's database, a damaged store).
  Workspace w = open_workspace(input, options.out_dir, options.force, torch_engine, options.jobs, options.lanes);
  const Config& config = w.config;
  const std::string& dir = w.dir;
  if (::access(store_path(dir).c_str(), F_OK) == 0) Store::open(store_path(dir), false);
  StudyPlan plan = make_plan(config, options);
  const int verbose = options.verbose >= 0 ? options.verbose : (plan.mine.size() <= 20 ? 2 : 1);

  RunResult result;
  result.out_dir = dir;
  make_dirs(dir);
  own_output_dir(dir);  // the lock: a second bnlab on this directory stops here, before writing
  check_tensorboard_folders(dir, config);  // a user's folder under tensorboard/ stops the study now, not after it
  remove_stale_temps(dir);
  write_file_atomic(dir + "/config.resolved.json", to_json(config));
  if (!config.keras_names.empty()) write_file_atomic(dir + "/keras.json", keras_json(config));
  write_file_atomic(dir + "/architecture.json", architecture_json(w.models[0]->layers(), config.model.batchnorm.semantics, config.model.loss));
  if (config.data.source == "csv") {
    write_file_atomic(dir + "/data.json", data_record(config, w.data));
    if (verbose > 0) log << data_line(config, w.data) << "\n";
  }
  const double data_seconds = since(t_start);

  auto t = clock::now();
  result.pretrain_cached = std::all_of(w.cache.begin(), w.cache.end(), [](CacheState s) { return s == CacheState::kLoaded; });
  ensure_pretrained(w, log, verbose);
  result.pretrain_seconds = since(t);

  // The fine-tuned rows of every seed, loadable by torch.load (the data do not depend on the seed,
  // but each seed's file sits beside that seed's weights).
  const auto idx = torch::tensor(fine_tuned_rows(config.finetune), torch::kLong);
  for (size_t i = 0; i < config.seeds.size(); ++i) {
    c10::impl::GenericDict sample(c10::StringType::get(), c10::AnyType::get());
    sample.insert("x", w.data.x.index_select(0, idx));
    sample.insert("y", w.data.y.index_select(0, idx));
    sample.insert("index", idx);
    sample.insert("x_raw", w.data.sample_x_raw);
    if (config.finetune.on_sets()) {  // [sets, k]: the data rows of each set, in its order
      std::vector<int64_t> members;
      for (const auto& set : config.finetune.sets) members.insert(members.end(), set.begin(), set.end());
      sample.insert("sets", torch::tensor(members, torch::kLong).view({static_cast<int64_t>(config.finetune.sets.size()), -1}));
    }
    const auto bytes = torch::pickle_save(c10::IValue(sample));
    write_file_atomic(w.sample_path(i), std::string(bytes.begin(), bytes.end()));
  }

  // Resume: the runs the store holds for this very study (same settings and weights) are kept;
  // only the others run.
  Store store = open_store(dir, config, w.keys, options, !options.force && result.pretrain_cached, plan.mine.size());
  pack_work(plan, config, store.completed_runs(), options.lanes, torch_engine);
  result.resumed = plan.resumed;
  result.batched_runs = plan.batched_runs;
  result.torch_runs = plan.torch_runs;
  if (result.resumed > 0 && verbose > 0)
    log << "resuming: " << result.resumed << " of " << plan.mine.size() << " runs already finished in " << store.path() << "\n";

  // The time this invocation begins fine-tuning, in the store's metadata. It is the store's first
  // commit in write-ahead-log mode: SQLite creates the log and syncs its header (and the directory),
  // 1 to 3 ms on this VM, as part of making the store ready. Done in the phase, the writer thread
  // started behind by that much and a 1,000-sample study's last transaction waited for it.
  store.set_meta("finetune_started_at", iso_now());
  const bool single_run = config.seeds.size() == 1 && config.finetune.samples.size() == 1 && config.grid.size() == 1;
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());  // reads sysfs: 30 us here
  const size_t jobs = std::max<size_t>(1, std::min<size_t>(plan.items.size(), options.jobs > 0 ? static_cast<size_t>(options.jobs) : hw));

  // The store's sink lives on past the phase: its writer writes progress.json's final state after
  // the last commit while this thread writes the reports (finish() below waits for it).
  std::optional<StoreSink> to_store;
  {
    // The store's sink moves the results into its queue (copying them, with the store's lock held,
    // was 5 to 11 us per work item) unless the on_run callback, after it, reads them. The weights
    // file is written before its run can be in the store, and a batch is in the store's queue
    // before a callback can throw.
    // progress.json says "running" once the sink is made (a watcher, a test, a Slurm script waits
    // for it); the writer rewrites it once a second at most, and after the phase's last commit. The writer
    // used to write it after its first transaction: the same 0.3-0.45 ms (creating the file,
    // renaming it over the old one), which in a 1,000-sample train study delayed the writer, and
    // the writer, not the engine, ended that phase. Here it is outside the phase's clock.
    to_store.emplace(store, dir, plan.mine.size(), plan.resumed, /*move=*/!options.on_run);
    t = clock::now();
    ConsoleSink console(plan, verbose, log);
    WeightsSink weights(dir);
    CallbackSink callback(options.on_run);
    std::vector<Sink*> sinks{&weights, &*to_store, &console};
    if (options.on_run) sinks.push_back(&callback);
    Executor executor(w, plan, verbose, single_run, sinks);
    std::exception_ptr error;
    try {
      result.engine_seconds = executor.execute(jobs);
    } catch (...) {
      error = std::current_exception();
    }
    for (Sink* s : sinks) {
      try {
        s->close();  // the store keeps every run that finished, whatever stopped the study
      } catch (...) {
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
  }
  result.finetune_seconds = since(t);
  const size_t stored = store.count();
  result.planned = plan.mine.size();
  result.interrupted = stored < plan.mine.size();

  t = clock::now();
  const StudyReport report = write_reports(dir, config, store, options.plots && !result.interrupted, log, plan.mine.size());
  const std::string& table = report.table;
  // Callers of small studies get the runs; large ones read the store.
  if (plan.mine.size() <= static_cast<size_t>(config.report.export_limit)) result.runs = store.read_all();
  to_store->finish();  // the final progress.json: in the reports' time
  const double report_seconds = since(t);
  store.seal();
  const auto counts = store.status_counts();
  result.failed = counts.failed;
  result.diverged = counts.diverged;
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
                 {"runs", plan.mine.size()},
                 {"finished_runs", stored},
                 {"resumed_runs", result.resumed},
                 {"interrupted", result.interrupted},
                 {"failed_runs", result.failed},
                 {"diverged_runs", result.diverged},
                 {"store", kStoreName},
                 {"finished_at", iso_now()},
                 {"pretrain_cached", result.pretrain_cached},
                 {"cache_keys", w.keys},
                 {"timings_s",
                  {{"data", data_seconds},
                   {"pretrain", result.pretrain_seconds},
                   {"finetune", result.finetune_seconds},
                   {"finetune_engines", result.engine_seconds},
                   {"reports", report_seconds},
                   {"total", since(t_start)}}}};
  write_file_atomic(dir + "/manifest.json", manifest.dump(2) + "\n");
  write_html_report(dir, config, report);  // after the manifest, which it shows
  if (verbose > 0) {
    log << "\n" << table << "\nresults in " << dir << " (every run in " << store.path() << ")\n";
    if (result.failed) log << result.failed << " run(s) failed; see summary.md\n";
    if (result.diverged) log << result.diverged << " run(s) diverged (report.diverged_factor " << fmt_double(config.report.diverged_factor) << "); see summary.md\n";
  }
  if (result.interrupted)
    log << "interrupted: " << stored << " of " << plan.mine.size() << " runs finished and saved in " << store.path()
        << "; run the same command again to resume\n";
  return result;
}

}  // namespace bnlab
