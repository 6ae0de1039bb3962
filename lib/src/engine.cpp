// Pretraining, checkpoints and single-sample fine-tuning with Keras' fit semantics.
#include "engine.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <set>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <limits>
#include <ostream>

#include "bnlab/errors.hpp"
#include "optimizers.hpp"
#include "text.hpp"

namespace bnlab {

namespace {
std::string shape_text(const at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

Model build_model(const Config& config, const Dataset& data) {
  const int64_t out = head_width(config.model.loss, data.targets(), data.classes);
  return Model(sized_layers(config.model.layers, data.features(), out));
}

Model strategy_architecture(const Config& config, const StrategyConfig& strategy, int64_t inputs, int64_t outputs) {
  return Model(sized_layers(prepared_layers(config.model.layers, strategy), inputs, outputs));
}

void load_state(ModelImpl& model, const std::vector<std::pair<std::string, torch::Tensor>>& state, const std::string& origin,
                const std::string& hint) {
  torch::NoGradGuard no_grad;
  const auto targets = state_dict(model);
  std::map<std::string, torch::Tensor> given;
  std::vector<std::string> problems;
  for (const auto& [name, t] : state)
    if (!given.emplace(name, t).second) problems.push_back(origin + ": tensor \"" + name + "\" appears twice");
  std::set<std::string> wanted;
  for (const auto& [name, tensor] : targets) {
    wanted.insert(name);
    const auto it = given.find(name);
    if (it == given.end()) {
      problems.push_back(origin + ": no tensor \"" + name + "\" (the model expects " + shape_text(tensor.sizes()) + ")");
      continue;
    }
    const auto& src = it->second;
    if (src.sizes() != tensor.sizes())
      problems.push_back(origin + ": tensor \"" + name + "\" has shape " + shape_text(src.sizes()) + " but the model needs " + shape_text(tensor.sizes()));
    else if (src.scalar_type() != tensor.scalar_type())
      problems.push_back(origin + ": tensor \"" + name + "\" is " + std::string(c10::toString(src.scalar_type())) + ", the model's is " +
                         c10::toString(tensor.scalar_type()) + " (bnlab computes in float32: save model.float()'s state)");
  }
  for (const auto& [name, t] : state)
    if (wanted.count(name) == 0)
      problems.push_back(origin + ": tensor \"" + name + "\" " + shape_text(t.sizes()) + " is not in the model (its tensors: " +
                         targets.front().first + " ... " + targets.back().first + ")");
  if (!problems.empty()) {
    if (!hint.empty()) problems.insert(problems.begin(), origin + ": " + hint);
    if (problems.size() > 12) {
      const size_t more = problems.size() - 10;
      problems.resize(10);
      problems.push_back("... and " + std::to_string(more) + " more");
    }
    throw InputError(problems);
  }
  for (const auto& [name, tensor] : targets) tensor.copy_(given.at(name));
}

void load_state(ModelImpl& model, const c10::impl::GenericDict& sd, const std::string& origin) {
  std::vector<std::pair<std::string, torch::Tensor>> state;
  for (const auto& e : sd) {
    if (!e.key().isString() || !e.value().isTensor()) throw InputError(origin + ": not a state dict (an entry is not a named tensor)");
    state.emplace_back(e.key().toStringRef(), e.value().toTensor());
  }
  load_state(model, state, origin);
}

Model clone_model(const ModelImpl& source) {
  Model m(source.layers());
  m->copy_state_from(source);
  return m;
}

double evaluate(ModelImpl& model, LossKind loss, const torch::Tensor& x, const torch::Tensor& y,
                double* acc) {
  torch::NoGradGuard no_grad;
  const auto out = model.forward(x);
  if (acc != nullptr && loss == LossKind::kCrossEntropy) *acc = accuracy(out, y);
  return compute_loss(loss, out, y).item<double>();
}

double evaluate_inference(ModelImpl& model, LossKind loss, const torch::Tensor& x,
                          const torch::Tensor& y, double* acc) {
  const bool was_training = model.is_training();
  model.eval();
  const double v = evaluate(model, loss, x, y, acc);
  model.train(was_training);
  return v;
}

namespace {
/// t.index_select(0, idx), for the float32 matrices of a Dataset by row copies (index_select's
/// general path cost 8% of a pretraining epoch); the same values either way.
torch::Tensor take_rows(const torch::Tensor& t, const torch::Tensor& idx) {
  if (t.dim() != 2 || t.scalar_type() != torch::kFloat || !t.is_contiguous() || idx.scalar_type() != torch::kLong ||
      !idx.is_contiguous())
    return t.index_select(0, idx);
  auto out = torch::empty({idx.size(0), t.size(1)}, t.options());
  copy_rows(t.data_ptr<float>(), t.size(0), t.size(1), idx.data_ptr<int64_t>(), idx.size(0), out.data_ptr<float>());
  return out;
}
}  // namespace

double pretrain_loop(const Dataset& data, const Config& config, std::ostream& log, int verbose,
                     const PretrainStep& train_step) {
  const auto& p = config.pretrain;
  const int64_t n = data.size();
  const int64_t steps_per_epoch = (n + p.batch_size - 1) / p.batch_size;
  const int64_t total_steps = steps_per_epoch * p.epochs;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(config.seed + 1);
  const bool tty = verbose > 0 && ::isatty(STDERR_FILENO) && &log == &std::cerr;
  const auto t0 = std::chrono::steady_clock::now();
  double epoch_loss = 0;
  int64_t step = 0;
  for (int64_t epoch = 1; epoch <= p.epochs; ++epoch) {
    const auto perm = torch::randperm(n, gen, torch::kLong);
    double sum = 0;
    for (int64_t start = 0; start < n; start += p.batch_size) {
      const double lr = p.schedule == Schedule::kCosine ? p.optimizer.lr * 0.5 * (1 + std::cos(M_PI * step / total_steps))
                                                        : p.optimizer.lr;
      if (stop_requested()) throw Interrupted("interrupted during pretraining (epoch " + std::to_string(epoch) + ")");
      const auto idx = perm.slice(0, start, std::min(start + p.batch_size, n));
      const double v = train_step(take_rows(data.x, idx), take_rows(data.y, idx), lr);
      if (!std::isfinite(v))
        throw std::runtime_error("pretraining diverged: loss is " + fmt_double(v) + " at epoch " +
                                 std::to_string(epoch) + ", step " + std::to_string(step + 1) +
                                 "; lower pretrain.optimizer.lr");
      sum += v * static_cast<double>(idx.size(0));
      ++step;
      if (tty && (step % 20 == 0 || step == total_steps)) {
        const double elapsed = seconds_since(t0);
        const double rate = static_cast<double>(step) * p.batch_size / std::max(elapsed, 1e-9);
        const double eta = elapsed / step * (total_steps - step);
        char buf[160];
        std::snprintf(buf, sizeof buf, "\rpretrain epoch %lld/%lld  step %lld/%lld  %.0f samples/s  ETA %.1fs   ",
                      static_cast<long long>(epoch), static_cast<long long>(p.epochs),
                      static_cast<long long>(step), static_cast<long long>(total_steps), rate, eta);
        log << buf << std::flush;
      }
    }
    epoch_loss = sum / static_cast<double>(n);
    if (verbose > 0) {
      const double elapsed = seconds_since(t0);
      char buf[160];
      std::snprintf(buf, sizeof buf, "%spretrain epoch %lld/%lld - loss: %.4e - %.0f samples/s - %.1fs\n",
                    tty ? "\r" : "", static_cast<long long>(epoch), static_cast<long long>(p.epochs), epoch_loss,
                    static_cast<double>(epoch * n) / std::max(elapsed, 1e-9), elapsed);
      log << buf << std::flush;
    }
  }
  return epoch_loss;
}

double pretrain(ModelImpl& model, const Dataset& data, const Config& config, std::ostream& log,
                int verbose) {
  auto optimizer = make_optimizer(config.pretrain.optimizer, model.parameters());
  model.set_dropout_seed(config.seed + 3);
  model.train();
  return pretrain_loop(data, config, log, verbose, [&](const torch::Tensor& xb, const torch::Tensor& yb, double lr) {
    optimizer->set_lr(lr);
    optimizer->zero_grad();
    auto loss = compute_loss(config.model.loss, model.forward(xb), yb);
    loss.backward();
    optimizer->step();
    return loss.item<double>();
  });
}

void save_pretrained(const std::string& path, const ModelImpl& model, const Dataset& data,
                     const std::string& cache_key) {
  c10::Dict<std::string, torch::Tensor> sd;
  for (const auto& [name, t] : state_dict(model)) sd.insert(name, t.detach().clone());
  c10::impl::GenericDict root(c10::StringType::get(), c10::AnyType::get());
  root.insert("format", std::string("bnlab.pretrained/1"));
  root.insert("cache_key", cache_key);
  root.insert("state_dict", sd);
  root.insert("x_mean", data.x_mean);
  root.insert("x_std", data.x_std);
  const auto bytes = torch::pickle_save(c10::IValue(root));
  write_file_atomic(path, std::string(bytes.begin(), bytes.end()));
}

CacheState load_pretrained(const std::string& path, ModelImpl& model, const std::string& cache_key) {
  if (::access(path.c_str(), F_OK) != 0) return CacheState::kMissing;
  std::string bytes;
  c10::IValue root;
  try {
    bytes = read_file(path);
    root = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end()));
  } catch (const std::exception& e) {
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));
    throw InputError(path + ": cannot read the checkpoint (truncated or corrupt: " + why +
                     "); delete it, or rerun with --force to pretrain again");
  }
  if (!root.isGenericDict()) throw InputError(path + ": not a bnlab checkpoint (expected a dict)");
  const auto dict = root.toGenericDict();
  const auto get = [&](const char* key) -> c10::IValue {
    if (!dict.contains(key)) throw InputError(path + ": not a bnlab checkpoint (no \"" + std::string(key) + "\" entry)");
    return dict.at(key);
  };
  if (!get("format").isString() || get("format").toStringRef() != "bnlab.pretrained/1")
    throw InputError(path + ": unknown checkpoint format");
  if (get("cache_key").toStringRef() != cache_key) return CacheState::kStale;
  load_state(model, get("state_dict").toGenericDict(), path);
  return CacheState::kLoaded;
}

void recalibrate(ModelImpl& model, const Dataset& data, int64_t batches, int64_t batch_size,
                 uint64_t seed, const LayerSelection& selection) {
  auto bns = model.batchnorms();
  const auto specs = model.batchnorm_specs();
  std::vector<std::vector<torch::Tensor>> saved;
  std::vector<double> momenta;
  for (auto& bn : bns) {
    saved.push_back({bn->running_mean.clone(), bn->running_var.clone(), bn->num_batches_tracked.clone()});
    momenta.push_back(bn->options.momentum());
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t n = data.size();
  torch::Tensor perm;
  int64_t pos = n;
  const bool was_training = model.is_training();
  model.train();
  torch::NoGradGuard no_grad;
  for (int64_t k = 1; k <= batches; ++k) {
    if (pos + batch_size > n) {  // a fresh permutation rather than a short batch
      perm = torch::randperm(n, gen, torch::kLong);
      pos = 0;
    }
    const auto idx = perm.slice(0, pos, pos + std::min(batch_size, n));
    pos += batch_size;
    // Momentum 1/k turns the running update into the running average of the k batch statistics.
    for (auto& bn : bns) bn->options.momentum(1.0 / static_cast<double>(k));
    model.forward(data.x.index_select(0, idx));
  }
  for (size_t i = 0; i < bns.size(); ++i) {
    bns[i]->options.momentum(momenta[i]);
    bns[i]->num_batches_tracked.copy_(saved[i][2]);
    if (!layer_selected(selection, specs[i])) {
      bns[i]->running_mean.copy_(saved[i][0]);
      bns[i]->running_var.copy_(saved[i][1]);
    }
  }
  model.train(was_training);
}

std::string not_finite_message(const std::string& strategy, uint64_t seed, int64_t sample, int64_t epoch,
                               double loss, double val_loss) {
  return "strategy \"" + strategy + "\", seed " + std::to_string(seed) + ", sample " + std::to_string(sample) + ", epoch " +
         std::to_string(epoch) + ": loss is not finite (loss " + fmt_double(loss) + ", val_loss " + fmt_double(val_loss) + ")";
}

bool record_epoch(StrategyResult& r, const EpochRecord& rec, const FinetuneConfig& ft, double& best_value) {
  r.loss.push_back(rec.loss);
  r.val_loss.push_back(rec.val_loss);
  if (rec.classification) {
    r.accuracy.push_back(rec.accuracy);
    r.val_accuracy.push_back(rec.val_accuracy);
  }
  const double monitored = ft.monitor == Monitor::kLoss ? rec.loss : rec.val_loss;
  if (ft.save_best_only && !(monitored < best_value)) return false;
  best_value = std::min(best_value, monitored);
  r.best_epoch = static_cast<int>(rec.epoch);
  return true;
}

uint64_t dropout_seed(const RunSpec& run) { return run.seed * 1000003ULL + static_cast<uint64_t>(run.sample); }

Model prepare_model(const ModelImpl& pretrained, const StrategyConfig& strategy, const Config& study, const RunSpec& run,
                    const Dataset* data) {
  Model model = clone_model(pretrained);
  model->set_dropout_seed(dropout_seed(run));
  if (strategy.recalibrate > 0) {
    if (data == nullptr) throw std::runtime_error("strategy \"" + strategy.name + "\" recalibrates but no pretraining data was given");
    recalibrate(*model, *data, strategy.recalibrate, study.pretrain.batch_size, run.seed + 2, strategy.layers);
  }
  if (strategy.fold) model = fold_batchnorm(*model);
  if (strategy.bn_module == BnModule::kFrozen) model->freeze_batchnorm_modules(strategy.layers);
  if (strategy.renorm) model->renorm_batchnorm_modules(strategy);
  return model;
}

bool prepare_copies_only(const StrategyConfig& strategy) {  // each step of prepare_model above left out
  return strategy.recalibrate == 0 && !strategy.fold && strategy.bn_module != BnModule::kFrozen && !strategy.renorm;
}

StrategyResult finetune(const ModelImpl& pretrained, const StrategyConfig& strategy,
                        const torch::Tensor& x, const torch::Tensor& y, const Config& config, const RunSpec& run,
                        const std::function<void(const EpochRecord&)>& on_epoch,
                        const std::function<void(ModelImpl&, int64_t)>& hook, const Dataset* data,
                        Model* finetuned) {
  const auto& ft = *run.finetune;
  const LossKind loss_kind = config.model.loss;
  const bool classification = loss_kind == LossKind::kCrossEntropy;
  StrategyResult r;
  r.name = strategy.name;
  {
    Model untouched = clone_model(pretrained);
    r.evaluate_pretrained = evaluate_inference(*untouched, loss_kind, x, y);
  }
  Model model = prepare_model(pretrained, strategy, config, run, data);
  // The baseline of the lag identity: the model about to be fine-tuned, in plain inference mode.
  r.evaluate_before = evaluate_inference(*model, loss_kind, x, y);

  model->set_policy(Policy{strategy});
  auto optimizer = make_optimizer(ft.optimizer, model->parameters());

  const int64_t n = x.size(0);
  std::vector<std::pair<std::string, torch::Tensor>> best;  // ModelCheckpoint's saved weights
  double best_value = std::numeric_limits<double>::infinity();
  const auto save = [&] {
    best.clear();
    for (const auto& [name, t] : state_dict(*model)) best.emplace_back(name, t.detach().clone());
  };
  // The rows' order in each epoch (Keras' fit(shuffle=True) on a set; one row has one order).
  uint64_t shuffle = shuffle_state(run.seed, run.sample);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t epoch = 1; epoch <= ft.epochs; ++epoch) {
    model->train();  // Model::train re-applies the strategy, as a freeze must survive this call
    epoch_order(ft.shuffle && n > 1, shuffle, order);
    const auto rows = torch::tensor(order, torch::kLong);
    double sum = 0, correct = 0;
    for (int64_t start = 0; start < n; start += ft.batch_size) {
      const int64_t len = std::min(ft.batch_size, n - start);
      const auto idx = rows.narrow(0, start, len);
      const auto xb = x.index_select(0, idx), yb = y.index_select(0, idx);
      if (optimizer) optimizer->zero_grad();
      const auto out = model->forward(xb);
      auto loss = compute_loss(loss_kind, out, yb);
      // Keras logs the loss of the forward pass BEFORE the update.
      sum += loss.item<double>() * static_cast<double>(len);
      if (classification) correct += accuracy(out.detach(), yb) * static_cast<double>(len);
      if (optimizer && loss.requires_grad()) {
        loss.backward();
        optimizer->step();
      }
      if (hook) hook(*model, epoch);
    }
    EpochRecord rec;
    rec.strategy = strategy.name;
    rec.epoch = epoch;
    rec.epochs = ft.epochs;
    rec.classification = classification;
    rec.loss = sum / static_cast<double>(n);
    rec.accuracy = correct / static_cast<double>(n);
    rec.val_loss = evaluate_inference(*model, loss_kind, x, y, &rec.val_accuracy);
    if (!std::isfinite(rec.loss) || !std::isfinite(rec.val_loss))
      throw std::runtime_error(not_finite_message(strategy.name, run.seed, run.sample, epoch, rec.loss, rec.val_loss));
    if (record_epoch(r, rec, ft, best_value)) save();
    if (on_epoch) on_epoch(rec);
  }
  if (!best.empty()) {
    torch::NoGradGuard no_grad;
    auto current = state_dict(*model);
    for (size_t i = 0; i < current.size(); ++i) current[i].second.copy_(best[i].second);
  }
  r.evaluate_after = evaluate_inference(*model, loss_kind, x, y);
  compute_lag(r);
  if (finetuned != nullptr) *finetuned = model;
  return r;
}

}  // namespace bnlab
