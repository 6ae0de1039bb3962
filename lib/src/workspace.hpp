// What run and explain share: the data, the run directory and the pretrained model.
#pragma once

#include <iosfwd>
#include <string>

#include "bnlab/config.hpp"
#include "data.hpp"
#include "engine.hpp"

namespace bnlab {

struct Workspace {
  std::string dir;                        ///< run directory
  Dataset data;
  Model model{nullptr};                   ///< initialised, or loaded from the cache
  std::string key;                        ///< pretraining cache key
  CacheState cache = CacheState::kMissing;
};

/// Loads the data, checks `sample` and the run directory, builds the model and loads the
/// cached pretrained weights when they match. Writes nothing; bad input throws InputError.
/// `sample_origin` names where the sample index came from in the message ("finetune.sample").
Workspace open_workspace(const Config& config, const std::string& out_dir, bool force, int64_t sample,
                         const std::string& sample_origin);

/// Creates the run directory and pretrains (then caches) unless the cache was loaded.
void ensure_pretrained(Workspace& w, const Config& config, std::ostream& log, int verbose);

}  // namespace bnlab
