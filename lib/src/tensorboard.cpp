// See tensorboard.hpp.
#include "tensorboard.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "bnlab/errors.hpp"
#include "run_dir.hpp"
#include "tensorboard_event.pb.h"
#include "text.hpp"

namespace bnlab {

namespace {

std::array<uint32_t, 256> crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFFu));
}

/// A name as one path component, reversibly: letters, digits and _=,+-. stay, every other byte
/// (and a leading ".", so that no folder is hidden or looks like a temporary) becomes %XX.
/// Different names never share a folder.
std::string safe_component(const std::string& name) {
  static const char* const kHex = "0123456789ABCDEF";
  std::string out;
  for (size_t i = 0; i < name.size(); ++i) {
    const auto ch = static_cast<unsigned char>(name[i]);
    const bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '_' ||
                    ch == '=' || ch == ',' || ch == '+' || ch == '-' || (ch == '.' && i > 0);
    if (ok) {
      out.push_back(static_cast<char>(ch));
    } else {
      out.push_back('%');
      out.push_back(kHex[ch >> 4]);
      out.push_back(kHex[ch & 15]);
    }
  }
  return out.empty() ? "%" : out;
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

constexpr const char* kEventFile = "events.out.tfevents.0.bnlab";
constexpr const char* kEventPrefix = "events.out.tfevents.";

std::string last_component(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

/// Creates `path` (a folder inside the run directory), recording it in the ledger first.
void make_owned_dir(const std::string& path) {
  claim_path(path);
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) throw std::runtime_error("cannot create " + path + ": " + errno_text());
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw InputError(path + ": is not a folder; bnlab writes TensorBoard's event files there");
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  static const std::array<uint32_t, 256> table = crc32c_table();
  const auto* p = static_cast<const unsigned char*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xFFu] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

std::string tf_record(const std::string& payload) {
  std::string out;
  put_le(out, payload.size(), 8);
  put_le(out, masked_crc32c(out.data(), 8), 4);
  out += payload;
  put_le(out, masked_crc32c(payload.data(), payload.size()), 4);
  return out;
}

std::vector<TbScalar> tensorboard_scalars(const Config& c, const GroupDigest& g) {
  std::vector<TbScalar> out;
  if (g.curves == 0) return out;
  // The study's shape, not how many runs of this group failed, decides the tags: every group of
  // a study has the same ones, so TensorBoard overlays them.
  const bool many = c.seeds.size() * c.finetune.samples.size() > 1;
  const std::string of = many ? " over the runs that did not fail (" + std::to_string(g.curves) + " here; seeds x " + c.finetune.unit() + "s)" : "";
  const auto add = [&](const std::string& tag, int64_t step, double median, double p25, double p75, const std::string& what) {
    if (!many) {
      out.push_back({tag, step, median, what});
      return;
    }
    out.push_back({tag + "/median", step, median, "median" + of + " of " + what});
    out.push_back({tag + "/p25", step, p25, "25th percentile" + of + " of " + what});
    out.push_back({tag + "/p75", step, p75, "75th percentile" + of + " of " + what});
  };
  const auto& b = g.evaluate_before;
  add("evaluate_before", 0, b.median, b.p25, b.p75, "model.evaluate() on the fine-tuned data before fine-tuning");
  const size_t epochs = g.loss.median.size();
  for (size_t k = 0; k < epochs; ++k) {
    const auto step = static_cast<int64_t>(k + 1);
    add("loss", step, g.loss.median[k], g.loss.p25[k], g.loss.p75[k],
        "Keras' training loss of the epoch (forward pass before each update)");
    add("val_loss", step, g.val_loss.median[k], g.val_loss.p25[k], g.val_loss.p75[k],
        "the inference-mode loss after the epoch");
  }
  const auto& a = g.evaluate_after;
  add("evaluate_after", static_cast<int64_t>(epochs), a.median, a.p25, a.p75, "model.evaluate() after fine-tuning");
  return out;
}

std::string event_file(const std::vector<TbScalar>& scalars) {
  tensorboard::Event head;
  head.set_wall_time(0);
  head.set_step(0);
  head.set_file_version("brain.Event:2");
  std::string out = tf_record(head.SerializeAsString());
  std::map<int64_t, std::vector<const TbScalar*>> by_step;
  for (const auto& s : scalars) by_step[s.step].push_back(&s);
  std::set<std::string> described;
  for (const auto& [step, values] : by_step) {
    tensorboard::Event e;
    e.set_wall_time(static_cast<double>(step));
    e.set_step(step);
    for (const TbScalar* s : values) {
      auto* v = e.mutable_summary()->add_value();
      v->set_tag(s->tag);
      v->set_simple_value(static_cast<float>(s->value));
      if (described.insert(s->tag).second) {
        auto* m = v->mutable_metadata();
        m->mutable_plugin_data()->set_plugin_name("scalars");
        m->set_summary_description(s->description);
      }
    }
    out += tf_record(e.SerializeAsString());
  }
  return out;
}

namespace {

/// The folder of strategy `strategy` at grid point `grid`, relative to tensorboard/.
std::string folder_of(const Config& c, size_t strategy, size_t grid) {
  std::string f = safe_component(c.strategies[strategy].name);
  if (c.grid.size() > 1) f += "/" + safe_component(c.grid[grid].label);
  return f;
}

/// Each level of a folder, outermost first: "train", "train/lr=1".
std::vector<std::string> levels(const std::string& folder) {
  std::vector<std::string> out;
  for (size_t slash = folder.find('/'); slash != std::string::npos; slash = folder.find('/', slash + 1))
    out.push_back(folder.substr(0, slash));
  out.push_back(folder);
  return out;
}

}  // namespace

std::string tensorboard_folder(const Config& c, const GroupDigest& g) { return folder_of(c, g.strategy, g.grid); }

void check_tensorboard_folders(const std::string& dir, const Config& c) {
  std::vector<std::string> paths{"tensorboard"};
  for (size_t s = 0; s < c.strategies.size(); ++s)
    for (size_t g = 0; g < c.grid.size(); ++g) {
      const std::string leaf = folder_of(c, s, g);
      for (const auto& level : levels(leaf)) paths.push_back("tensorboard/" + level);
      paths.push_back("tensorboard/" + leaf + "/" + kEventFile);
    }
  for (const auto& rel : paths) {
    const std::string path = dir + "/" + rel;
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && !may_remove(path))
      throw InputError(path + ": bnlab would write its TensorBoard files here, but it did not make the " +
                       (S_ISDIR(st.st_mode) ? "folder" : "file") + " there (it is not in " + dir + "/" + kLedgerName +
                       "); bnlab never writes into or replaces what it did not make: move it away or choose another --out");
  }
}

void write_tensorboard(const std::string& dir, const Config& c, const std::vector<GroupDigest>& groups) {
  const std::string root = dir + "/tensorboard";
  // Like every bnlab output, the files are the same bytes on every rerun, resume, --jobs and
  // merge: the name is fixed and each event's wall_time is its step in seconds (TensorBoard's
  // Step axis is the one to read; the manifest holds when the study ran).
  const std::string file = kEventFile;
  // Every event file goes through one temporary in the run directory itself: TensorBoard reads
  // any name holding "tfevents", a half-written temporary beside the real file included.
  const std::string tmp = temp_name(root);
  std::set<std::string> written;  // relative to the run directory
  std::set<std::string> folders;  // relative to tensorboard/, each level
  bool made_root = false;
  for (const auto& g : groups) {
    const auto scalars = tensorboard_scalars(c, g);
    if (scalars.empty()) continue;
    const std::string folder = tensorboard_folder(c, g);
    if (!made_root) make_owned_dir(root), made_root = true;
    for (const auto& level : levels(folder)) {  // each level recorded in the ledger before it is made
      folders.insert(level);
      make_owned_dir(root + "/" + level);
    }
    write_file_atomic(root + "/" + folder + "/" + file, event_file(scalars), tmp);
    written.insert("tensorboard/" + folder + "/" + file);
  }
  // Event files of an earlier write that this one did not replace would show twice (or show
  // strategies the study no longer has): bnlab's own go, a user's file stays; then bnlab's
  // folders that are left empty.
  const auto owned = ledger_names_under(dir, "tensorboard/");
  for (const auto& name : owned) {
    const std::string path = dir + "/" + name;
    if (!written.count(name) && last_component(name).rfind(kEventPrefix, 0) == 0 && is_file(path) && may_remove(path))
      std::remove(path.c_str());
  }
  for (auto it = owned.rbegin(); it != owned.rend(); ++it) {  // deepest first; rmdir takes only empty folders
    const std::string path = dir + "/" + *it;
    if (!folders.count(it->substr(std::string("tensorboard/").size())) && is_dir(path)) ::rmdir(path.c_str());
  }
}

}  // namespace bnlab
