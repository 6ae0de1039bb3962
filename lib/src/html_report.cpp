// See html_report.hpp.
#include "html_report.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "store.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

using json = nlohmann::ordered_json;

std::string esc(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (const char ch : s) {
    switch (ch) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o.push_back(ch);
    }
  }
  return o;
}

/// The resolved config as the page shows it: a list of more than 12 values (a study's 100,000
/// sample indices) becomes its first 8 and a count, so that the page does not grow with the
/// study; config.resolved.json holds every value.
void abridge(json& j) {
  if (j.is_array() && j.size() > 12) {
    json short_list = json::array();
    for (size_t i = 0; i < 8; ++i) short_list.push_back(j[i]);
    short_list.push_back("... " + std::to_string(j.size() - 8) + " more (config.resolved.json has them all)");
    j = std::move(short_list);
    return;
  }
  if (j.is_structured())
    for (auto& v : j) abridge(v);
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

/// A figure as shown: 4 significant digits ("n/a" when not finite).
std::string g4(double v) { return std::isfinite(v) ? fmt("%.4g", v) : "n/a"; }

/// A table cell holding a figure: shown to 4 digits, the exact summary.csv text in data-v.
/// `none`: the figure covers no run (every run failed): shown as n/a (summary.csv's text stays).
std::string cell(const std::string& key, double v, bool none = false) {
  return "<td class=\"n\" data-key=\"" + key + "\" data-v=\"" + csv_number(v) + "\">" + (none ? "n/a" : g4(v)) + "</td>";
}
std::string count_cell(const std::string& key, size_t v) {
  return "<td class=\"n\" data-key=\"" + key + "\" data-v=\"" + std::to_string(v) + "\">" + std::to_string(v) + "</td>";
}

/// In words: what the runs of a group say about the strategy.
std::string verdict(const GroupDigest& g) {
  if (g.curves == 0) return "<span class=\"bad\">every run failed</span>";
  std::string v = g.lag_holds == g.curves ? "<span class=\"good\">frozen</span>"
                  : g.lag_holds == 0      ? "<span class=\"bad\">not frozen</span>"
                                          : "<span class=\"mixed\">mixed</span>";
  v += g.lag_holds == g.curves ? ": loss trails val_loss by one epoch" : g.lag_holds == 0 ? ": training forward is not inference" : "";
  if (g.agg.diverged > 0) v += "; <span class=\"bad\">" + std::to_string(g.agg.diverged) + " diverged</span>";
  if (g.agg.failed > 0) v += "; <span class=\"bad\">" + std::to_string(g.agg.failed) + " failed</span>";
  return v;
}

const char* const kColors[] = {"#1f5fa8", "#2a9d4b", "#8e44ad", "#a0522d", "#c2185b", "#00838f"};
constexpr size_t kMaxLines = 6;  // grid points drawn per curves panel (the table has them all)

struct Scale {
  double lo = 0, hi = 1;
  double at(double v, double top, double height) const { return top + height * (1.0 - (v - lo) / (hi - lo)); }
};

Scale scale_of(const std::vector<const std::vector<double>*>& series) {
  double lo = INFINITY, hi = -INFINITY;
  for (const auto* s : series)
    for (double v : *s)
      if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  if (!std::isfinite(lo)) return {};
  const double pad = hi > lo ? 0.06 * (hi - lo) : std::max(1e-12, 0.05 * std::abs(hi));
  return {lo - pad, hi + pad};
}

/// The x position of epoch k + 1 on a panel of `epochs` epochs (every line of a panel shares it:
/// grid points may differ in epochs).
double x_at(size_t k, size_t epochs, double left, double width) {
  return epochs <= 1 ? left + width / 2 : left + width * static_cast<double>(k) / static_cast<double>(epochs - 1);
}

/// SVG points of `v` (epoch order), forwards or backwards; non-finite values are left out.
std::string points(const std::vector<double>& v, size_t epochs, bool backwards, const Scale& s, double left, double width,
                   double top, double height) {
  std::string p;
  for (size_t i = 0; i < v.size(); ++i) {
    const size_t k = backwards ? v.size() - 1 - i : i;
    if (!std::isfinite(v[k])) continue;
    p += fmt("%.1f", x_at(k, epochs, left, width)) + "," + fmt("%.1f", s.at(v[k], top, height)) + " ";
  }
  if (!p.empty()) p.pop_back();
  return p;
}

/// The y axis of a panel: three labelled grid lines.
std::string y_axis(const Scale& s, double left, double width, double top, double height) {
  std::string o;
  for (int i = 0; i <= 2; ++i) {
    const double v = s.lo + (s.hi - s.lo) * (0.06 + 0.44 * i);
    const double y = s.at(v, top, height);
    o += "<line x1=\"" + fmt("%.1f", left) + "\" x2=\"" + fmt("%.1f", left + width) + "\" y1=\"" + fmt("%.1f", y) + "\" y2=\"" +
         fmt("%.1f", y) + "\" class=\"grid\"/><text x=\"" + fmt("%.1f", left - 3) + "\" y=\"" + fmt("%.1f", y + 3) +
         "\" class=\"yl\">" + esc(fmt("%.4g", v)) + "</text>";
  }
  return o;
}

/// One panel per strategy: loss (solid) and val_loss (dashed) per epoch, median and
/// interquartile band for groups of several runs, one colour per grid point.
std::string curves_svg(const Config& c, const std::vector<GroupDigest>& groups, size_t strategy) {
  std::vector<const GroupDigest*> mine;
  for (const auto& g : groups)
    if (g.strategy == strategy && g.curves > 0 && mine.size() < kMaxLines) mine.push_back(&g);
  if (mine.empty()) return "<p>No curves: every run failed.</p>";
  std::vector<const std::vector<double>*> series;
  size_t epochs = 0;
  for (const auto* g : mine) {
    for (const Band* b : {&g->loss, &g->val_loss}) series.insert(series.end(), {&b->median, &b->p25, &b->p75});
    epochs = std::max(epochs, g->loss.median.size());
  }
  const Scale s = scale_of(series);
  const double W = 320, H = 190, L = 52, R = 8, T = 10, B = 26, w = W - L - R, h = H - T - B;
  std::string o = "<svg viewBox=\"0 0 320 190\" role=\"img\" aria-label=\"loss and val_loss per epoch, " +
                  esc(c.strategies[strategy].name) + "\">";
  o += y_axis(s, L, w, T, h);
  const size_t step = epochs <= 10 ? 1 : (epochs + 4) / 5;
  for (size_t k = 0; k < epochs; k += step) {
    const double x = x_at(k, epochs, L, w);
    o += "<text x=\"" + fmt("%.1f", x) + "\" y=\"" + fmt("%.1f", H - B + 13) + "\" class=\"xl\">" + std::to_string(k + 1) + "</text>";
  }
  o += "<text x=\"" + fmt("%.1f", L + w / 2) + "\" y=\"" + fmt("%.1f", H - 2) + "\" class=\"xl\">epoch</text>";
  for (size_t i = 0; i < mine.size(); ++i) {
    const auto& g = *mine[i];
    const std::string loss_color = mine.size() == 1 ? "#1f5fa8" : kColors[i];
    const std::string val_color = mine.size() == 1 ? "#d35400" : kColors[i];
    for (const auto& [band, color] : {std::make_pair(&g.loss, loss_color), std::make_pair(&g.val_loss, val_color)}) {
      if (g.curves > 1)  // the band: p75 forwards, p25 backwards
        o += "<polygon points=\"" + points(band->p75, epochs, false, s, L, w, T, h) + " " +
             points(band->p25, epochs, true, s, L, w, T, h) + "\" fill=\"" + color + "\" fill-opacity=\"0.15\" stroke=\"none\"/>";
      o += "<polyline points=\"" + points(band->median, epochs, false, s, L, w, T, h) + "\" fill=\"none\" stroke=\"" + color +
           "\" stroke-width=\"2\"" + (band == &g.val_loss ? " stroke-dasharray=\"5,3\"" : "") + "/>";
    }
  }
  o += "</svg><p class=\"legend\">";
  for (size_t i = 0; i < mine.size(); ++i) {
    const auto& g = *mine[i];
    const std::string label = c.grid.size() > 1 ? esc(c.grid[g.grid].label) + ": " : "";
    const std::string lc = mine.size() == 1 ? "#1f5fa8" : kColors[i], vc = mine.size() == 1 ? "#d35400" : kColors[i];
    o += "<span><i style=\"border-color:" + lc + "\"></i>" + label + "loss</span> <span><i class=\"dash\" style=\"border-color:" + vc +
         "\"></i>" + label + "val_loss</span>" + (g.curves > 1 ? " (median and IQR of " + std::to_string(g.curves) + " runs)" : "") + "<br>";
  }
  size_t more = 0;
  for (const auto& g : groups) more += g.strategy == strategy && g.curves > 0 ? 1 : 0;
  if (more > mine.size()) o += std::to_string(more - mine.size()) + " more grid points in the table above";
  return o + "</p>";
}

/// The final gaps of one strategy at the first grid point: a histogram between the 1st and
/// 99th percentiles, the quartiles marked, the runs beyond counted.
std::string gap_svg(const GroupDigest& g) {
  const auto& v = g.gaps;
  double lo = quantile(v, 0.01), hi = quantile(v, 0.99);
  if (!(hi > lo)) {
    const double pad = std::max(1e-12, 0.05 * std::abs(hi));
    lo -= pad, hi += pad;
  }
  constexpr int kBins = 24;
  std::vector<size_t> bins(kBins, 0);
  size_t below = 0, above = 0, peak = 1;
  for (double x : v) {
    if (!(x >= lo)) { ++below; continue; }
    if (x > hi) { ++above; continue; }
    const int b = std::min(kBins - 1, static_cast<int>((x - lo) / (hi - lo) * kBins));
    peak = std::max(peak, ++bins[static_cast<size_t>(b)]);
  }
  const double W = 320, H = 130, L = 10, R = 10, T = 8, B = 18, w = W - L - R, h = H - T - B;
  std::string o = "<svg viewBox=\"0 0 320 130\" role=\"img\" aria-label=\"final gap distribution\">";
  for (int b = 0; b < kBins; ++b) {
    const double bh = h * static_cast<double>(bins[static_cast<size_t>(b)]) / static_cast<double>(peak);
    o += "<rect x=\"" + fmt("%.1f", L + w * b / kBins) + "\" y=\"" + fmt("%.1f", T + h - bh) + "\" width=\"" +
         fmt("%.1f", w / kBins - 1) + "\" height=\"" + fmt("%.1f", bh) + "\" class=\"bar\"/>";
  }
  const auto x_of = [&](double x) { return L + w * (x - lo) / (hi - lo); };
  for (const auto& [q, cls] : {std::make_pair(0.25, "q"), std::make_pair(0.5, "med"), std::make_pair(0.75, "q")}) {
    const double x = x_of(quantile(v, q));
    o += "<line x1=\"" + fmt("%.1f", x) + "\" x2=\"" + fmt("%.1f", x) + "\" y1=\"" + fmt("%.1f", T) + "\" y2=\"" +
         fmt("%.1f", T + h) + "\" class=\"" + cls + "\"/>";
  }
  o += "<text x=\"" + fmt("%.1f", L) + "\" y=\"" + fmt("%.1f", H - B + 13) + "\" class=\"xs\">" + esc(g4(lo)) + "</text>";
  o += "<text x=\"" + fmt("%.1f", W - R) + "\" y=\"" + fmt("%.1f", H - B + 13) + "\" class=\"xe\">" + esc(g4(hi)) + "</text>";
  std::string note = "median " + g4(quantile(v, 0.5)) + ", IQR [" + g4(quantile(v, 0.25)) + ", " + g4(quantile(v, 0.75)) + "]";
  if (below + above > 0) note += "; " + std::to_string(below) + " below, " + std::to_string(above) + " above the range";
  return o + "</svg><p class=\"legend\">" + esc(note) + "</p>";
}

json read_own_json(const std::string& path, const char* what) {
  if (::access(path.c_str(), R_OK) != 0) return json();
  return parse_json(read_json_file(path, what), path);
}

/// The per-layer tables: what each strategy does to each BatchNorm (from the config, as the
/// engines read it) and, once `bnlab explain` has run here, what one sample measured.
std::string layers_section(const Config& c, const json& ex) {
  std::string o = "<section id=\"layers\"><h2>Layer by layer</h2>";
  if (ex.is_object() && ex.contains("layers")) {
    try {
      o += "<p>Measured by <code>bnlab explain</code> on sample " + esc(ex.at("sample").dump()) +
           " (batch of one; " + esc(ex.at("semantics").get<std::string>()) + " numerics).</p>"
           "<div class=\"scroll\"><table id=\"explain-layers\"><thead><tr><th>BN layer</th><th>module</th>"
           "<th>batch var in training (max)</th><th>running var in inference (mean)</th><th>|batch mean - running mean| (mean)</th>"
           "<th>training output</th><th>max |train - inference| output</th></tr></thead><tbody>";
      for (const auto& l : ex.at("layers")) {
        const auto vals = [&](const char* k) { return l.contains(k) ? l.at(k).get<std::vector<double>>() : std::vector<double>(); };
        const auto bvar = vals("batch_var"), rvar = vals("running_var"), bmean = vals("batch_mean"), rmean = vals("running_mean");
        double vmax = 0, rv = 0, gap = 0;
        for (double x : bvar) vmax = std::max(vmax, std::abs(x));
        for (double x : rvar) rv += x / static_cast<double>(rvar.size());
        for (size_t i = 0; i < bmean.size() && i < rmean.size(); ++i) gap += std::abs(bmean[i] - rmean[i]) / static_cast<double>(bmean.size());
        const bool keras = l.contains("training_output");
        o += "<tr><td>" + esc(l.at("index").dump()) + "</td><td>" + esc(l.at("module").get<std::string>()) + "</td><td class=\"n\">" +
             (keras ? g4(vmax) : "n/a") + "</td><td class=\"n\">" + g4(rv) + "</td><td class=\"n\">" + (keras ? g4(gap) : "n/a") +
             "</td><td>" +
             (keras ? (l.at("training_output_is_beta").get<bool>() ? "beta (input erased)" : "normalised input")
                    : esc(l.value("training_error", std::string("error")))) +
             "</td><td class=\"n\">" + (keras ? g4(l.at("max_output_difference").get<double>()) : "n/a") + "</td></tr>";
      }
      o += "</tbody></table></div>";
      o += "<div class=\"scroll\"><table id=\"explain-strategies\"><thead><tr><th>strategy</th><th>training forward == inference</th>"
           "<th>training loss</th><th>inference loss</th><th>evaluate before</th><th>lag identity at the start</th></tr></thead><tbody>";
      for (const auto& s : ex.at("strategies"))
        o += "<tr><td>" + esc(s.at("name").get<std::string>()) + "</td><td>" +
             (s.at("training_forward_equals_inference").get<bool>() ? "yes" : "no") + "</td><td class=\"n\">" +
             g4(s.at("training_loss").get<double>()) + "</td><td class=\"n\">" + g4(s.at("inference_loss").get<double>()) +
             "</td><td class=\"n\">" + g4(s.at("evaluate_before").get<double>()) + "</td><td>" +
             (s.at("lag_identity_holds").get<bool>() ? "holds" : "broken") + "</td></tr>";
      o += "</tbody></table></div>";
    } catch (const nlohmann::json::exception& e) {
      throw InputError("explain.json: damaged (" + std::string(e.what()) + "); run bnlab explain again");
    }
  } else {
    o += "<p>Run <code>bnlab explain CONFIG --out DIR</code> on this directory to add what one sample measures in each "
         "BatchNorm (batch against running statistics).</p>";
  }
  o += "<div class=\"scroll\"><table id=\"bn-modes\"><thead><tr><th>strategy</th><th>BN module</th><th>fit forward normalises with</th>"
       "<th>inference normalises with</th><th>running stats in fit</th><th>gamma/beta</th><th>momentum</th></tr></thead><tbody>";
  for (const auto& s : c.strategies) {
    const auto rows = batchnorm_mode_rows(c.model.layers, s);
    if (rows.empty()) o += "<tr><td>" + esc(s.name) + "</td><td colspan=\"6\">(none: folded into the Linear layers)</td></tr>";
    for (const auto& r : rows)
      o += "<tr><td>" + esc(s.name) + "</td><td>" + esc(r.module) + "</td><td>" + esc(r.fit) + "</td><td>" + esc(r.inference) +
           "</td><td>" + (r.running_statistics_updated ? "updated" : "unchanged") + "</td><td>" + esc(r.affine) + "</td><td class=\"n\">" +
           (r.frozen_module ? "-" : fmt("%g", r.momentum)) + "</td></tr>";
  }
  return o + "</tbody></table></div></section>";
}

std::string manifest_section(const json& m) {
  std::string o = "<section id=\"manifest\"><h2>Manifest</h2>";
  if (!m.is_object()) return o + "<p>No manifest.json yet.</p></section>";
  o += "<div class=\"scroll\"><table id=\"manifest-table\"><tbody>";
  for (const char* k : {"bnlab_version", "git_commit", "libtorch_version", "threads", "jobs", "runs", "finished_runs", "resumed_runs",
                        "failed_runs", "diverged_runs", "finished_at", "merged_from"}) {
    if (!m.contains(k)) continue;
    json v = m.at(k);
    abridge(v);
    o += "<tr><th>" + std::string(k) + "</th><td>" + esc(v.is_string() ? v.get<std::string>() : v.dump()) + "</td></tr>";
  }
  if (m.contains("timings_s") && m.at("timings_s").is_object())
    for (const auto& [k, v] : m.at("timings_s").items())
      o += "<tr><th>time: " + esc(k) + "</th><td>" + (v.is_number() ? fmt("%.3f s", v.get<double>()) : esc(v.dump())) + "</td></tr>";
  json shown = m;
  abridge(shown);
  o += "</tbody></table></div><details><summary>manifest.json (long lists shortened)</summary><pre>" + esc(shown.dump(2)) +
       "</pre></details>";
  return o + "</section>";
}

const char* const kStyle =
    "body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1100px;"
    "padding:12px;color:#1b1b1b;background:#fff}"
    "h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd}"
    "nav a{margin-right:.8em}.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}"
    "table{border-collapse:collapse;margin:.4em 0;font-size:.9em}th,td{border:1px solid #d5d5d5;padding:3px 6px;"
    "vertical-align:top;text-align:left}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums;"
    "white-space:nowrap}.good{color:#16713a;font-weight:600}.bad{color:#b00020;font-weight:600}.mixed{color:#9a6700;"
    "font-weight:600}td.v{min-width:13em}.warn{background:#fff4d6;padding:6px;border:1px solid #e6c200}"
    ".panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:10px}"
    ".panel{border:1px solid #e2e2e2;padding:6px;border-radius:4px}.panel h3{font-size:1em;margin:0 0 4px}"
    "svg{width:100%;height:auto;display:block}svg text{font:9px sans-serif;fill:#333}svg .yl{text-anchor:end}"
    "svg .xl{text-anchor:middle}svg .xs{text-anchor:start}svg .xe{text-anchor:end}svg .grid{stroke:#e6e6e6}"
    "svg .bar{fill:#7a9cc6}svg .med{stroke:#b00020;stroke-width:2}svg .q{stroke:#555;stroke-dasharray:3,2}"
    ".legend{font-size:.8em;margin:2px 0}.legend i{display:inline-block;width:18px;border-top:2px solid;"
    "vertical-align:middle;margin-right:3px}.legend i.dash{border-top-style:dashed}"
    "pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:.8em}"
    "@media (max-width:600px){body{font-size:14px;padding:6px}th,td{padding:2px 4px}}";

/// The page, from the digest and the manifest already read.
std::string page(const std::string& dir, const Config& c, const StudyReport& r, const json& manifest) {
  const json ex = read_own_json(dir + "/explain.json", "explain's record");
  const bool with_grid = c.grid.size() > 1;
  size_t failed = 0, diverged = 0;
  for (const auto& g : r.groups) failed += g.agg.failed, diverged += g.agg.diverged;
  std::string o = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                  "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
                  "<meta name=\"generator\" content=\"bnlab\"><title>bnlab: " + esc(c.name) + "</title><style>" + kStyle +
                  "</style></head><body>\n";
  o += "<header><h1>" + esc(c.name) + "</h1><p id=\"counts\">" + std::to_string(c.strategies.size()) + " strategies &times; " +
       std::to_string(c.seeds.size()) + " seed(s) &times; " + std::to_string(c.finetune.samples.size()) + " " + c.finetune.unit() +
       "(s)" + (with_grid ? " &times; " + std::to_string(c.grid.size()) + " grid points" : "") + "; " + std::to_string(r.stored) +
       " runs in this directory (" + std::to_string(r.stored - failed - diverged) + " ok, " + std::to_string(diverged) + " diverged, " +
       std::to_string(failed) + " failed); loss " + esc(to_string(c.model.loss)) + ", BatchNorm semantics " +
       esc(to_string(c.model.batchnorm.semantics)) + ".</p>";
  if (r.stored != r.planned)
    o += "<p class=\"warn\"><b>Incomplete:</b> " + std::to_string(r.stored) + " of " + std::to_string(r.planned) +
         " runs finished; rerun the same command to resume.</p>";
  o += "<nav><a href=\"#verdict\">verdict</a><a href=\"#curves\">curves</a><a href=\"#gaps\">gaps</a><a href=\"#layers\">layers</a>"
       "<a href=\"#config\">config</a><a href=\"#manifest\">manifest</a></nav></header>\n";

  o += "<section id=\"verdict\"><h2>Verdict per strategy</h2><div class=\"scroll\"><table id=\"verdict-table\"><thead><tr>"
       "<th>strategy</th>" + std::string(with_grid ? "<th>grid</th>" : "") +
       "<th>verdict</th><th>runs</th><th>failed</th><th>diverged</th><th>final gap median</th><th>p25</th><th>p75</th>"
       "<th>lag residual median</th><th>lag identity holds</th><th>evaluate before (median)</th><th>evaluate after (median)</th>"
       "<th>after - before (median)</th></tr></thead><tbody>\n";
  for (const auto& g : r.groups) {
    const auto& a = g.agg;
    const bool none = g.curves == 0;
    o += "<tr data-strategy=\"" + esc(a.strategy) + "\" data-grid=\"" + esc(a.grid) + "\"><td>" + esc(a.strategy) + "</td>" +
         (with_grid ? "<td>" + esc(a.grid) + "</td>" : "") + "<td class=\"v\">" + verdict(g) + "</td>" + count_cell("runs", a.runs) +
         count_cell("failed", a.failed) + count_cell("diverged", a.diverged) + cell("final_gap_median", a.final_gap.median, none) +
         cell("final_gap_p25", a.final_gap.p25, none) + cell("final_gap_p75", a.final_gap.p75, none) +
         cell("lag_residual_median", a.lag_residual.median, none) + "<td class=\"n\">" + std::to_string(g.lag_holds) + " of " +
         std::to_string(g.curves) + "</td>" + cell("evaluate_before_median", g.evaluate_before.median, none) +
         cell("evaluate_after_median", g.evaluate_after.median, none) + cell("eval_change_median", a.eval_change.median, none) + "</tr>\n";
  }
  o += "</tbody></table></div><p><b>frozen</b>: the lag identity holds in every run, so the training forward pass is "
       "the inference pass; <b>not frozen</b>: it holds in none (BatchNorm still normalises with the batch, or updates "
       "its statistics); <b>mixed</b>: in some. Final gap = loss - val_loss at the last epoch: <code>loss</code> is Keras' training loss (forward "
       "pass before each update, BatchNorm in whatever mode the strategy leaves it), <code>val_loss</code> the inference loss after "
       "the epoch. The lag identity (loss[1] == evaluate before, loss[k+1] == val_loss[k], relative tolerance " +
       fmt_double(kLagTolerance) + ") holds exactly when the training forward pass is the inference pass; the gap left then is one "
       "epoch of progress. Figures cover the runs that did not fail (n/a: every run failed); each cell's data-v holds the "
       "exact value, summary.csv's text for its columns (evaluate before and after are the medians of summary.json's "
       "per-run figures).</p></section>\n";

  o += "<section id=\"curves\"><h2>Curves</h2><div class=\"panels\">";
  for (size_t s = 0; s < c.strategies.size(); ++s)
    o += "<div class=\"panel\"><h3>" + esc(c.strategies[s].name) + "</h3>" + curves_svg(c, r.groups, s) + "</div>";
  o += "</div></section>\n";

  o += "<section id=\"gaps\"><h2>Final gap distribution</h2>";
  bool any = false;
  std::string panels;
  for (const auto& g : r.groups) {
    if (g.grid != 0 || g.gaps.size() < 2) continue;
    any = true;
    panels += "<div class=\"panel\"><h3>" + esc(g.agg.strategy) + " (" + std::to_string(g.gaps.size()) + " runs" +
              (g.agg.diverged ? ", " + std::to_string(g.agg.diverged) + " diverged" : "") + ")</h3>" + gap_svg(g) + "</div>";
  }
  if (any)
    o += "<p>Loss - val_loss at the last epoch over seeds and " + std::string(c.finetune.unit()) + "s" +
         (with_grid ? " at " + esc(c.grid.front().label) : "") +
         "; each panel on its own scale (1st to 99th percentile), quartiles dashed, median red.</p><div class=\"panels\">" + panels + "</div>";
  else
    o += "<p>One run per strategy: its gap is in the verdict table.</p>";
  o += "</section>\n";

  o += layers_section(c, ex) + "\n";
  json shown = json::parse(to_json(c));
  abridge(shown);
  o += "<section id=\"config\"><h2>Resolved config</h2><details><summary>config.resolved.json (long lists shortened)</summary><pre>" +
       esc(shown.dump(2)) + "</pre></details></section>\n";
  o += manifest_section(manifest) + "\n</body></html>\n";
  return o;
}

}  // namespace

std::string html_report(const std::string& dir, const Config& c, const StudyReport& r) {
  return page(dir, c, r, read_own_json(dir + "/manifest.json", "the run manifest"));
}

void write_html_report(const std::string& dir, const Config& c, const StudyReport& r) {
  write_file_atomic(dir + "/report.html", html_report(dir, c, r));
}

void refresh_html_report(const std::string& dir) {
  if (::access(store_path(dir).c_str(), F_OK) != 0) return;
  const StudyRecord study = open_study(dir);  // the study's own resolved config, as its runs were planned
  const json manifest = read_own_json(dir + "/manifest.json", "the run manifest");
  StudyReport r = digest_study(study.config, study.store, 0);
  r.planned = manifest.is_object() && manifest.contains("runs") && manifest.at("runs").is_number_unsigned()
                  ? manifest.at("runs").get<size_t>() : r.stored;
  write_file_atomic(dir + "/report.html", page(dir, study.config, r, manifest));
}

}  // namespace bnlab
