// report.html: one self-contained page per run directory (inline CSS and SVG, nothing fetched)
// with the verdict per strategy, the per-layer BatchNorm table, the curves, the gap
// distribution, the resolved config and the manifest. Torch-free; drawn from the study's digest
// (aggregates only, so it stays small however many runs the study has).
#pragma once

#include <string>

#include "bnlab/config.hpp"
#include "report.hpp"

namespace bnlab {

/// The page for `r` (write_reports' digest of the study in `dir`). Reads, when they are there,
/// the directory's manifest.json and explain.json (bnlab's own files: damage is an InputError).
std::string html_report(const std::string& dir, const Config& c, const StudyReport& r);

/// Writes report.html into `dir` atomically.
void write_html_report(const std::string& dir, const Config& c, const StudyReport& r);

/// After `bnlab explain` wrote explain.json into a run directory that holds a study: report.html
/// again, from the store and the config it records, with the measured layers. Nothing when
/// there is no store.
void refresh_html_report(const std::string& dir);

}  // namespace bnlab
