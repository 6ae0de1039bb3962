// `bnlab explain`: shows, layer by layer and strategy by strategy, why training loss and
// inference loss differ on one sample.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <ostream>

#include "bnlab/errors.hpp"
#include "bnlab/run.hpp"
#include "engine.hpp"
#include "html_report.hpp"
#include "json_input.hpp"
#include "text.hpp"
#include "store.hpp"
#include "workspace.hpp"

namespace bnlab {

namespace {

using ojson = nlohmann::ordered_json;

std::vector<double> values(const torch::Tensor& t) {
  const auto d = t.detach().to(torch::kDouble).contiguous().view(-1);
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

double max_abs(const torch::Tensor& t) { return t.numel() ? t.abs().max().item<double>() : 0.0; }

/// Runs the model layer by layer on x, recording each BatchNorm's input and output.
struct Trace {
  std::vector<torch::Tensor> bn_in, bn_out;
  torch::Tensor out;
};

Trace trace(ModelImpl& model, const torch::Tensor& x) {
  Trace t;
  torch::NoGradGuard no_grad;
  t.out = model.forward_observed(x, [&](const LayerSpec& layer, const torch::Tensor& in, const torch::Tensor& out) {
    if (layer.kind != LayerKind::kBatchNorm) return;
    t.bn_in.push_back(in.clone());
    t.bn_out.push_back(out.clone());
  });
  return t;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

}  // namespace

std::string explain(const Config& config, const ExplainOptions& options, std::ostream& out, std::ostream& log) {
  torch::set_num_threads(std::max(1, options.threads));
  // explain looks at one sample; with sets, the first member of the first set unless --sample.
  const auto& f = config.finetune;
  if (options.sample < 0 && f.on_sets() && f.sets.empty())
    throw InputError("finetune.sets is a random draw: explain looks at one sample; pass --sample N (a row of one of the sets)");
  const int64_t sample = options.sample >= 0 ? options.sample : f.on_sets() ? f.sets.front().front() : f.sample;
  std::vector<const StrategyConfig*> strategies;
  for (const auto& s : config.strategies)
    if (options.strategy.empty() || s.name == options.strategy) strategies.push_back(&s);
  if (strategies.empty()) {
    std::vector<std::string> names;
    for (const auto& s : config.strategies) names.push_back(s.name);
    throw InputError("--strategy: no strategy \"" + options.strategy + "\" in this config" +
                     did_you_mean(options.strategy, names) + "; strategies: " + join(names, ", "));
  }
  if (options.sample >= 0 && config.data.source == "synthetic" && sample >= config.data.samples)
    throw InputError("--sample: index " + std::to_string(sample) + " is beyond the data (" + std::to_string(config.data.samples) +
                     " samples: 0.." + std::to_string(config.data.samples - 1) + ")");
  Config first = config;  // every seed keeps its file name; explain looks at the first
  first.finetune.samples = {sample};
  first.finetune.sample = sample;
  first.finetune.draw_count = 0;
  first.finetune.sets.clear();
  first.finetune.set_draw_count = first.finetune.set_draw_size = 0;
  for (auto& g : first.grid) {  // each grid point keeps its own settings, not the sets
    g.finetune.samples = first.finetune.samples;
    g.finetune.sets.clear();
    g.finetune.set_draw_count = g.finetune.set_draw_size = 0;
  }
  Workspace w = open_workspace(first, options.out_dir, options.force);
  ensure_pretrained(w, log, options.verbose);
  const Config& cfg = w.config;
  const auto x = w.data.x.narrow(0, sample, 1).clone(), y = w.data.y.narrow(0, sample, 1).clone();
  const LossKind loss = config.model.loss;
  const bool keras = config.model.batchnorm.semantics == BnSemantics::kKeras;

  // Layers: the inference path (running statistics) against the training-mode path (batch
  // statistics of this one sample), each on a copy so no buffer of the real model moves.
  Model inference = clone_model(*w.models[0]);
  inference->eval();
  const Trace inf = trace(*inference, x);
  ojson layers = ojson::array();
  out << "sample " << sample << " (" << to_string(config.model.batchnorm.semantics) << " BatchNorm numerics, batch of one)\n\n";
  out << "| BN layer | module | batch var used in training (max) | running var used in inference (mean) "
         "| |batch mean - running mean| (mean) | training output | max |train - inference| output |\n"
         "|---|---|---|---|---|---|---|\n";
  Trace tr;
  if (keras && !inf.bn_in.empty()) {
    Model training = clone_model(*w.models[0]);
    training->train();
    tr = trace(*training, x);
  }
  const auto bns = inference->batchnorms();
  std::vector<std::string> names;
  for (const auto& l : inference->batchnorm_specs()) names.push_back(l.name);
  for (size_t i = 0; i < bns.size(); ++i) {
    const auto& bn = *bns[i];
    ojson l{{"index", i}, {"module", names[i]}, {"running_mean", values(bn.running_mean)},
            {"running_var", values(bn.running_var)}, {"inference_input", values(inf.bn_in[i])},
            {"inference_output", values(inf.bn_out[i])}};
    std::string var_text = "n/a", mean_gap = "n/a", output = "error", dist = "n/a";
    if (keras) {
      auto [bmean, bvar] = batch_moments(tr.bn_in[i]);
      const double gap = (bmean - bn.running_mean).abs().mean().item<double>();
      const double d = max_abs(tr.bn_out[i] - inf.bn_out[i]);
      const bool is_beta = bn.bias.defined() && torch::equal(tr.bn_out[i].view(-1), bn.bias.detach());
      l["training_input"] = values(tr.bn_in[i]);
      l["batch_mean"] = values(bmean);
      l["batch_var"] = values(bvar);
      l["training_output"] = values(tr.bn_out[i]);
      l["training_output_is_beta"] = is_beta;
      l["max_output_difference"] = d;
      var_text = fmt("%.3g", max_abs(bvar));
      mean_gap = fmt("%.3g", gap);
      output = is_beta ? "beta (input erased)" : "normalised input";
      dist = fmt("%.3g", d);
    } else {
      // PyTorch numerics: the unbiased batch variance of one sample is 0/0, and BatchNorm refuses it.
      l["training_error"] = "Expected more than 1 value per channel when training";
      output = "error: batch of one";
    }
    out << "| " << i << " | " << names[i] << " | " << var_text << " | "
        << fmt("%.3g", bn.running_var.mean().item<double>()) << " | " << mean_gap << " | " << output << " | " << dist << " |\n";
    layers.push_back(l);
  }

  // Strategies: prepared and policed exactly as fine-tuning does, then one training-mode and
  // one inference forward pass on copies.
  out << "\n| strategy | training forward == inference forward | training loss | inference loss (val_loss) "
         "| evaluate before | lag identity |\n|---|---|---|---|---|---|\n";
  ojson strategies_json = ojson::array();
  for (const auto* s : strategies) {
    const Policy policy{*s};
    // Three copies of the model as fine-tuning starts it: plain inference (evaluate before),
    // inference under the policy (val_loss), training mode under the policy (loss).
    Model plain = prepare_model(*w.models[0], *s, cfg, &w.data);
    Model eval_copy = prepare_model(*w.models[0], *s, cfg, &w.data);
    Model train_copy = prepare_model(*w.models[0], *s, cfg, &w.data);
    plain->eval();
    eval_copy->set_policy(policy);
    train_copy->set_policy(policy);
    eval_copy->eval();
    train_copy->train();
    const auto out_plain = trace(*plain, x).out;
    const auto out_eval = trace(*eval_copy, x).out;
    const auto out_train = trace(*train_copy, x).out;
    const double lp = compute_loss(loss, out_plain, y).item<double>();
    const double le = compute_loss(loss, out_eval, y).item<double>();
    const double lt = compute_loss(loss, out_train, y).item<double>();
    const bool same = torch::equal(out_eval, out_train);
    // renorm on one sample: the two forward passes are the same function in another float order.
    const bool within = !same && relative_difference(lt, le) <= kLagTolerance && relative_difference(lt, lp) <= kLagTolerance;
    const bool lag = (same && torch::equal(out_plain, out_eval)) || within;
    std::string verdict;
    if (within) verdict = "holds at the start within the tolerance (" + fmt("%.0e", kLagTolerance) + " relative): the forward passes differ by rounding, " + fmt("%.3g", max_abs(out_train - out_eval)) + " (a later step can break it, e.g. once renorm clips d)";
    else if (lag) verdict = "holds: loss[k+1] == val_loss[k], loss[1] == evaluate before";
    else if (same) verdict = "broken at epoch 1 only: evaluation also uses batch statistics, so val_loss follows loss, both " + fmt("%.3g", std::abs(lt - lp)) + " from evaluate before";
    else verdict = "broken: loss and val_loss differ by " + fmt("%.3g", std::abs(lt - le));
    out << "| " << s->name << " | " << (same ? "yes" : "no") << " | " << fmt("%.6g", lt) << " | " << fmt("%.6g", le)
        << " | " << fmt("%.6g", lp) << " | " << verdict << " |\n";
    strategies_json.push_back(ojson{{"name", s->name}, {"training_forward_equals_inference", same},
                                    {"training_loss", lt}, {"inference_loss", le}, {"evaluate_before", lp},
                                    {"max_output_difference", max_abs(out_train - out_eval)},
                                    {"lag_identity_holds", lag}});
  }
  // What the study in this directory measured on this sample, when it ran it: the prediction
  // above next to the record.
  ojson measured = ojson::array();
  if (::access(store_path(w.dir).c_str(), F_OK) == 0) {
    const Store store = Store::open(store_path(w.dir), false);
    std::string rows;
    // Only a study that started from these very weights measured what this explains.
    const std::string keys_text = store.meta("cache_keys");
    const ojson keys = scan_json(keys_text) ? ojson() : ojson::parse(keys_text.empty() ? "[]" : keys_text, nullptr, false);
    const bool same_weights = keys.is_array() && !keys.empty() && keys[0] == w.keys.front();
    if (!same_weights)
      out << "\n(" << store.path() << " holds a study that started from other pretrained weights; its runs are not shown.)\n";
    if (same_weights && config.finetune.on_sets())
      out << "\n(" << store.path() << " holds a study of sets, each fine-tuned as one batch stream; its runs are not this one sample's.)\n";
    if (same_weights && !config.finetune.on_sets()) store.for_each([&](const StrategyResult& r) {
      if (r.sample != sample || r.seed != cfg.seeds.front()) return;
      if (!options.strategy.empty() && r.name != options.strategy) return;
      char buf[300];
      if (r.failed) std::snprintf(buf, sizeof buf, " failed | | | |");
      else std::snprintf(buf, sizeof buf, " %s | %.6g | %.6g | %.3g | %s |", run_status(r), r.final_gap, r.max_gap,
                         r.lag_residual, r.lag_identity_holds ? "holds" : "broken");
      rows += "| " + r.name + (r.grid.empty() ? "" : " [" + r.grid + "]") + " |" + buf + "\n";
      measured.push_back(ojson{{"strategy", r.name}, {"grid", r.grid}, {"run", r.run}, {"status", run_status(r)},
                               {"final_gap", r.final_gap}, {"max_gap", r.max_gap}, {"lag_residual", r.lag_residual},
                               {"lag_identity_holds", r.lag_identity_holds}});
    }, /*curves=*/false);
    if (!rows.empty())
      out << "\nMeasured by the study in " << store.path() << " (seed " << cfg.seeds.front() << ", sample " << sample << "):\n\n"
          << "| strategy | status | final gap | max gap | lag residual | lag identity |\n|---|---|---|---|---|---|\n" << rows;
  }
  // What each strategy does to each BatchNorm, as the engines read it (resolve_modes).
  out << "\n| strategy | BN module | fit forward normalises with | inference normalises with | running stats in fit "
         "| gamma/beta | momentum |\n|---|---|---|---|---|---|---|\n";
  for (size_t k = 0; k < strategies.size(); ++k) {
    const auto* s = strategies[k];
    ojson per_layer = ojson::array();
    for (const auto& r : batchnorm_mode_rows(cfg.model.layers, *s)) {
      out << "| " << s->name << " | " << r.module << " | " << r.fit << " | " << r.inference << " | "
          << (r.running_statistics_updated ? "updated" : "unchanged") << " | " << r.affine << " | "
          << (r.frozen_module ? std::string("-") : fmt("%g", r.momentum)) << " |\n";
      per_layer.push_back(ojson{{"module", r.module}, {"bn_index", r.bn_index}, {"kind", r.kind},
                                {"selected", r.selected}, {"fit_batch_statistics", r.fit_batch_statistics},
                                {"inference_batch_statistics", r.inference_batch_statistics},
                                {"running_statistics_updated", r.running_statistics_updated}, {"affine", r.affine},
                                {"prior", r.prior >= 0 ? ojson(r.prior) : ojson(nullptr)},
                                {"momentum", r.frozen_module ? ojson(nullptr) : ojson(r.momentum)}});
    }
    if (per_layer.empty()) out << "| " << s->name << " | (none: folded into the Linear layers) | | | | | |\n";
    strategies_json[k]["batchnorm_layers"] = per_layer;
  }
  ojson keras_file;
  if (!cfg.keras_names.empty()) {
    keras_file = ojson::parse(keras_json(cfg));
    out << "\nKeras file " << cfg.init_keras << " as saved: " << keras_file["as_saved"]["explanation"].get<std::string>() << ".\n";
    if (!keras_file["as_saved"]["strategy"].is_null())
      out << "To fine-tune as Keras' fit() would: \"strategies\": [" << keras_file["as_saved"]["strategy"].dump() << "]\n";
  }
  out << "\nIn training mode a BatchNorm normalises with the statistics of the batch. With one sample the batch\n"
         "variance is 0 and the batch mean is the sample itself, so (x - mean) is exactly 0 and the layer outputs\n"
         "beta whatever the input: the training loss measures a constant prediction. Inference normalises with\n"
         "the running statistics and sees the real input. A strategy closes the gap only if its training-mode\n"
         "forward pass is the inference forward pass; then Keras' loss trails val_loss by exactly one epoch.\n";
  if (std::any_of(strategies.begin(), strategies.end(), [](const StrategyConfig* s) { return s->renorm; }))
    out << "renorm normalises one sample as (x - x) / sqrt(0 + eps) * r + d = d, so its training output is\n"
           "gamma * clip((x - renorm_mean) / renorm_stddev, -dmax, dmax) + beta: the input survives, through d, which\n"
           "is a constant in the gradient, and (x - mean) is exactly 0: no gradient reaches the layers below.\n";
  if (std::any_of(strategies.begin(), strategies.end(), [](const StrategyConfig* s) { return s->prior && *s->prior < 1; }))
    out << "prior_bn normalises one sample with mean p*mu + (1-p)*x and variance p*var (the batch variance of one\n"
           "row is 0), so its training output is gamma * p * (x - mu) / sqrt(p * var + eps) + beta: about sqrt(p)\n"
           "times the inference output's deviation from beta, and its gradient reaches the layers below.\n";
  ojson result{{"experiment", config.name}, {"sample", sample},
                     {"semantics", to_string(config.model.batchnorm.semantics)},
                     {"layers", layers}, {"strategies", strategies_json}};
  if (!keras_file.is_null()) result["keras"] = keras_file;
  if (!measured.empty()) result["measured"] = measured;
  const std::string text = result.dump(2) + "\n";
  write_file_atomic(w.dir + "/explain.json", text);
  try {
    refresh_html_report(w.dir);  // the study's report.html, now with the measured layers
  } catch (const std::exception& e) {  // a damaged or unreadable store: explain.json stands, report.html stays as it was
    log << "note: report.html not refreshed: " << e.what() << "\n";
  }
  if (options.verbose > 0) log << "explain.json written to " << w.dir << "\n";
  return text;
}

}  // namespace bnlab
