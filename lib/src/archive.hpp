// Zip archives, read with libzip: Keras 3's .keras files and PyTorch's torch.save/torch.jit.save files.
#pragma once

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
  /// The entry's bytes; a missing entry, one over 4 GiB, or a short read is an InputError.
  std::string read(const std::string& entry) const;

 private:
  std::string path_, what_;
  struct zip* archive_ = nullptr;
};

}  // namespace bnlab
