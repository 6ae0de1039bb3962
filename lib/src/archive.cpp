#include "archive.hpp"

#include <zip.h>

#include <cstdint>
#include <cstdio>

#include "bnlab/errors.hpp"

namespace bnlab {

bool is_zip(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  char magic[4] = {0, 0, 0, 0};
  const size_t n = std::fread(magic, 1, 4, f);
  std::fclose(f);
  return n == 4 && magic[0] == 'P' && magic[1] == 'K' && magic[2] == 3 && magic[3] == 4;
}

ZipArchive::ZipArchive(const std::string& path, const std::string& what) : path_(path), what_(what) {
  int error = 0;
  archive_ = zip_open(path.c_str(), ZIP_RDONLY, &error);
  if (archive_ == nullptr) {
    zip_error_t e;
    zip_error_init_with_code(&e, error);
    const std::string why = zip_error_strerror(&e);
    zip_error_fini(&e);
    throw InputError(path + ": not a readable " + what + " (zip: " + why + ")");
  }
}

ZipArchive::~ZipArchive() { zip_discard(archive_); }

std::vector<std::string> ZipArchive::names() const {
  std::vector<std::string> out;
  const zip_int64_t n = zip_get_num_entries(archive_, 0);
  for (zip_int64_t i = 0; i < n; ++i)
    if (const char* name = zip_get_name(archive_, static_cast<zip_uint64_t>(i), 0)) out.emplace_back(name);
  return out;
}

bool ZipArchive::has(const std::string& entry) const { return zip_name_locate(archive_, entry.c_str(), 0) >= 0; }

int64_t ZipArchive::size(const std::string& entry) const {
  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_stat(archive_, entry.c_str(), 0, &st) != 0 || (st.valid & ZIP_STAT_SIZE) == 0) return -1;
  return st.size > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(st.size);
}

std::string ZipArchive::read(const std::string& entry, uint64_t max_bytes) const {
  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_stat(archive_, entry.c_str(), 0, &st) != 0 || (st.valid & ZIP_STAT_SIZE) == 0)
    throw InputError(path_ + ": the archive has no " + entry + "; is it a " + what_ + "?");
  if (st.size > max_bytes)
    throw InputError(path_ + ": " + entry + " declares " + std::to_string(st.size) + " bytes, more than the " + std::to_string(max_bytes) +
                     " it can hold");
  if ((st.valid & ZIP_STAT_COMP_SIZE) != 0 && st.size / 1032 > st.comp_size + 1024)
    throw InputError(path_ + ": " + entry + " declares " + std::to_string(st.size) + " bytes from " + std::to_string(st.comp_size) +
                     " compressed, more than deflate can expand to (corrupt archive)");
  std::string data(static_cast<size_t>(st.size), '\0');
  zip_file_t* file = zip_fopen(archive_, entry.c_str(), 0);
  const zip_int64_t got = file != nullptr ? zip_fread(file, data.data(), st.size) : -1;
  if (file != nullptr) zip_fclose(file);
  if (got != static_cast<zip_int64_t>(st.size))
    throw InputError(path_ + ": cannot read " + entry + " from the archive (truncated or corrupt)");
  return data;
}

}  // namespace bnlab
