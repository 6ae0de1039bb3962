// Small string, path and file helpers shared by the library (no torch, no JSON).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace bnlab {

std::string join(const std::vector<std::string>& parts, const std::string& sep);
/// "; did you mean \"x\"?" when a candidate is within a small edit distance, else "".
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);
/// Shortest text that reads back as the same double.
std::string fmt_double(double v);
/// 1-based line and column of a byte offset.
std::pair<size_t, size_t> line_column(const std::string& text, size_t offset);
std::string errno_text();
std::string parent_dir(const std::string& path);
/// `path` if absolute, else `base/path`.
std::string resolve_path(const std::string& base, const std::string& path);
/// "size:mtime" of a file, or "missing".
std::string file_fingerprint(const std::string& path);
std::string fnv1a_hex(const std::string& data);

/// The temporary name write_file_atomic uses for `path`: hidden, ".NAME.tmp.PID", same directory.
std::string temp_name(const std::string& path);
/// Removes temporaries left in `dir` by a process that was killed mid-write.
void remove_stale_temps(const std::string& dir);

/// Writes `data` to `path` through a temporary file in the same directory and a rename,
/// so readers see the old file or the whole new one, never a part. Throws on failure.
void write_file_atomic(const std::string& path, const std::string& data);
/// The same through the temporary file `tmp` (see AtomicWriter).
void write_file_atomic(const std::string& path, const std::string& data, const std::string& tmp);
/// write_file_atomic without the fsync before the rename, for a status file rewritten while a
/// study runs (progress.json): a kill still leaves the old file or the whole new one; only a
/// crash of the machine itself may leave an older one. Spares the study an fsync (milliseconds
/// on some disks) at each rewrite, one of them when the study ends.
void write_status_atomic(const std::string& path, const std::string& data);

/// write_file_atomic for output made piece by piece (exports streamed from a study store): the
/// pieces go to the temporary file; commit() renames it into place. Destroyed uncommitted (an
/// exception on the way), it removes the temporary and leaves `path` as it was.
class AtomicWriter {
 public:
  explicit AtomicWriter(std::string path);
  /// The same, with the temporary at `tmp` (same file system; for a folder whose readers would
  /// take a temporary for data, as TensorBoard takes any name with "tfevents" in it).
  AtomicWriter(std::string path, std::string tmp);
  ~AtomicWriter();
  AtomicWriter(const AtomicWriter&) = delete;
  AtomicWriter& operator=(const AtomicWriter&) = delete;
  void write(const std::string& piece);
  /// Flushes, fsyncs (unless `durable` is false: see write_status_atomic) and renames into place.
  void commit(bool durable = true);

 private:
  std::string path_, tmp_;
  void* file_ = nullptr;  // FILE*
};
std::string read_file(const std::string& path);

}  // namespace bnlab
