// TensorBoard's event files (the `TensorBoard` callback's format), written from a study's
// digest: one folder per strategy (and grid point) under the run directory's tensorboard/, one
// events.out.tfevents.* file in each. Torch-free.
//
// A file is a TFRecord stream: per record a little-endian uint64 length, the masked CRC32C of
// those 8 bytes, the payload, the masked CRC32C of the payload. Each payload is an Event proto
// (lib/proto/tensorboard_event.proto, TensorBoard's field numbers), serialized by Debian's
// libprotobuf; the first one carries file_version "brain.Event:2".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "bnlab/config.hpp"
#include "report.hpp"

namespace bnlab {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial and final XOR 0xFFFFFFFF).
uint32_t crc32c(const void* data, size_t size);
/// TensorFlow's mask of a CRC in a record: ((crc >> 15) | (crc << 17)) + 0xa282ead8.
uint32_t masked_crc32c(const void* data, size_t size);
/// One TFRecord: length, its masked CRC, payload, its masked CRC.
std::string tf_record(const std::string& payload);

/// One scalar of an event file: a tag's value at a step (float32 in the file, as Keras writes).
struct TbScalar {
  std::string tag;
  int64_t step = 0;
  double value = 0;
  std::string description;  ///< written with the tag's first value
};

/// The scalars of one group: per epoch (step 1..epochs) `loss` and `val_loss`, and `evaluate_before`
/// (step 0) and `evaluate_after` (step epochs); in a study of several runs per group (seeds x
/// samples) each is the median and the quartiles across the group's runs that did not fail, as
/// tags `loss/median`, `loss/p25`, `loss/p75`, ...
std::vector<TbScalar> tensorboard_scalars(const Config& c, const GroupDigest& g);

/// A whole event file: the file_version record (wall_time 0), then one Event per step (in step
/// order) holding that step's scalars, its wall_time the step in seconds: the same bytes
/// whenever and wherever the study ran.
std::string event_file(const std::vector<TbScalar>& scalars);

/// The folder of a group under tensorboard/: the strategy's name, and below it the grid point's
/// label when the study has a grid; bytes other than letters, digits and _=,+-. (and a leading
/// ".") written %XX, so that different names never share a folder.
std::string tensorboard_folder(const Config& c, const GroupDigest& g);

/// Before a study runs: every folder and event file write_tensorboard would write for `c` in
/// run directory `dir` is absent or bnlab's own (an InputError naming the first that is not),
/// so that a user's folder stops the study up front, not after it.
void check_tensorboard_folders(const std::string& dir, const Config& c);

/// Writes tensorboard/<folder>/events.out.tfevents.0.bnlab for every group with runs
/// that did not fail, each file atomically; event files bnlab wrote there before and did not
/// write this time (another study's strategies, an earlier write) are removed.
void write_tensorboard(const std::string& dir, const Config& c, const std::vector<GroupDigest>& groups);

}  // namespace bnlab
