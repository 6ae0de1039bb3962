// Zip archives, read with libzip: Keras 3's .keras files and PyTorch's torch.save/torch.jit.save files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct zip;

namespace bnlab {

/// Whether the file starts like a zip archive ("PK\3\4").
bool is_zip(const std::string& path);

/// An open archive. Every failure is an InputError naming the file and `what` it should be
/// (".keras file", "PyTorch file").
class ZipArchive {
 public:
  ZipArchive(const std::string& path, const std::string& what);
  ~ZipArchive();
  ZipArchive(const ZipArchive&) = delete;
  ZipArchive& operator=(const ZipArchive&) = delete;

  /// Every entry's name, in archive order.
  std::vector<std::string> names() const;
  bool has(const std::string& entry) const;
  /// The entry's bytes; a missing entry, one over `max_bytes` (4 GiB by default) or over what
  /// its compressed size can hold (deflate expands at most 1032 times), or a short read is an
  /// InputError, raised before anything is allocated.
  std::string read(const std::string& entry, uint64_t max_bytes = uint64_t{1} << 32) const;
  /// The entry's uncompressed size as the archive declares it (-1: no such entry).
  int64_t size(const std::string& entry) const;

 private:
  std::string path_, what_;
  struct zip* archive_ = nullptr;
};

}  // namespace bnlab
