// Helpers shared by the test suites: paths into the source tree and fresh temporary directories.
#pragma once

#include <stdlib.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "bnlab/run.hpp"

namespace bnlab::test {

/// A path inside the source tree (configs, fixtures, goldens).
inline std::string source(const std::string& rel) { return std::string(BNLAB_SOURCE_DIR) + "/" + rel; }

/// A new empty directory under $TMPDIR (or /tmp) for one test.
inline std::string temp_dir(const std::string& tag) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base ? base : "/tmp") + "/bnlab_" + tag + "_XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + tmpl);
  return tmpl;
}

/// Options for an in-process run() into `dir`: silent, no plots, `jobs` workers (0: all cores).
inline RunOptions quiet_options(const std::string& dir, int jobs = 0) {
  RunOptions o;
  o.out_dir = dir;
  o.verbose = 0;
  o.jobs = jobs;
  o.plots = false;
  return o;
}

}  // namespace bnlab::test
