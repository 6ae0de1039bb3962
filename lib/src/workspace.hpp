// What run and explain share: the data, the run directory and each seed's pretrained model.
#pragma once

#include <iosfwd>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "data.hpp"
#include "engine.hpp"

namespace bnlab {

struct Workspace {
  Config config;                          ///< with the sample draw resolved against the data
  std::string dir;                        ///< run directory
  Dataset data;
  std::vector<Model> models;              ///< one per seed: initialised, or loaded from the cache
  std::vector<std::string> keys;          ///< pretraining cache key per seed
  std::vector<CacheState> cache;
  bool imported = false;                  ///< weights came from init.keras or init.torch, not pretraining
  std::string torch_form;                 ///< init.torch: "state_dict", "checkpoint" or "torchscript"
  std::vector<std::string> outside_prefix;  ///< init.torch: tensor names outside init.prefix (not loaded)
  bool torch_engine = false;              ///< pretrain through torch::nn/autograd instead of the batched engine
  /// pretrained.pt / sample.pt for one seed; pretrained_seed<S>.pt / sample_seed<S>.pt for several.
  std::string pretrained_path(size_t seed_index) const;
  std::string sample_path(size_t seed_index) const;
};

/// The key pretrained.pt is cached under: pretrain_cache_key() plus the engine that pretrains
/// ("-batched" or "-torch"), whose weights differ beyond rounding after many Adam steps.
std::string workspace_cache_key(const Config& config, bool torch_engine);

/// Loads the data, resolves and checks the samples, checks the run directory, builds each
/// seed's model and loads its cached weights when they match. Writes nothing; bad input
/// throws InputError. `torch_engine`: pretrain with the torch engine (its own cache key).
/// Also refuses (InputError) a study whose estimated memory, with `jobs` x `lanes` samples
/// fine-tuned at once, exceeds what the machine has available (check_memory).
Workspace open_workspace(const Config& config, const std::string& out_dir, bool force, bool torch_engine = false, int jobs = 1,
                         int lanes = 1);

/// The estimate open_workspace checks: the model's parameters, gradients, optimizer state and
/// activations per lane, the lanes in flight, the pretrained models and the data.
void check_memory(const Config& config, const Dataset& data, int jobs, int lanes);

/// Creates the run directory and pretrains (then caches) every seed whose cache missed.
void ensure_pretrained(Workspace& w, std::ostream& log, int verbose);

}  // namespace bnlab
