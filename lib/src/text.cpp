// Small string, path and file helpers shared by the library.
#include "text.hpp"

#include <cctype>
#include <charconv>
#include <cmath>

#include "bnlab/errors.hpp"
#include "run_dir.hpp"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace bnlab {

namespace {
std::atomic<bool> g_stop{false};
}  // namespace

void request_stop() { g_stop.store(true, std::memory_order_relaxed); }
bool stop_requested() { return g_stop.load(std::memory_order_relaxed); }

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out += sep;
    out += parts[i];
  }
  return out;
}

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}
}  // namespace

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::string::npos;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  const size_t limit = std::max<size_t>(2, word.size() / 3);
  if (best.empty() || best_d > limit || best_d == 0) return "";
  return "; did you mean \"" + best + "\"?";
}

std::string fmt_double(double v) {
  char buf[64];
  int precision = 1;
  if (std::isfinite(v)) {
    // The fewest significant digits that read back as v: std::to_chars finds them directly
    // (the shortest round trip); %g then writes them in the usual notation.
    char digits[64];
    const auto res = std::to_chars(digits, digits + sizeof digits, v, std::chars_format::scientific);
    precision = 0;
    for (const char* p = digits; p < res.ptr && *p != 'e'; ++p) precision += std::isdigit(static_cast<unsigned char>(*p)) ? 1 : 0;
  }
  for (; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (!std::isfinite(v) || std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::pair<size_t, size_t> line_column(const std::string& text, size_t offset) {
  size_t line = 1, column = 1;
  for (size_t i = 0; i < offset && i < text.size(); ++i) {
    if (text[i] == '\n') {
      ++line;
      column = 1;
    } else {
      ++column;
    }
  }
  return {line, column};
}

std::string errno_text() { return std::strerror(errno); }

std::string parent_dir(const std::string& path) {
  const auto pos = path.find_last_of('/');
  if (pos == std::string::npos) return ".";
  if (pos == 0) return "/";
  return path.substr(0, pos);
}

std::string resolve_path(const std::string& base, const std::string& path) {
  if (path.empty() || path[0] == '/' || base.empty() || base == ".") return path;
  return base + "/" + path;
}

std::string file_fingerprint(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return std::to_string(static_cast<long long>(st.st_size)) + ":" +
         std::to_string(static_cast<long long>(st.st_mtime));
}

std::string fnv1a_hex(const std::string& data) {
  uint64_t h = 1469598103934665603ULL;
  for (unsigned char ch : data) {
    h ^= ch;
    h *= 1099511628211ULL;
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

std::string temp_name(const std::string& path) {
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "" : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  return dir + "." + base + ".tmp." + std::to_string(::getpid());
}

void remove_stale_temps(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    // ".NAME.tmp.PID", of a file bnlab writes here: a user's file of that shape stays.
    const auto tmp = name.find(".tmp.");
    if (name.size() > 1 && name[0] == '.' && tmp != std::string::npos && tmp > 1) {
      std::string target = name.substr(1, tmp - 1);
      if (target.size() > 6 && target.compare(target.size() - 6, 6, ".merge") == 0) target.resize(target.size() - 6);  // merge's store
      if (is_bnlab_output_name(target) && may_remove(dir + "/" + target)) std::remove((dir + "/" + name).c_str());
    }
  }
  ::closedir(d);
}

AtomicWriter::AtomicWriter(std::string path) : AtomicWriter(path, temp_name(path)) {}

AtomicWriter::AtomicWriter(std::string path, std::string tmp) : path_(std::move(path)), tmp_(std::move(tmp)) {
  claim_path(path_);  // in a run directory: refused if the file there is not bnlab's
  FILE* f = std::fopen(tmp_.c_str(), "wb");
  if (f == nullptr) throw std::runtime_error("cannot write " + path_ + ": " + errno_text());
  file_ = f;
}

AtomicWriter::~AtomicWriter() {
  if (file_ == nullptr) return;
  std::fclose(static_cast<FILE*>(file_));
  std::remove(tmp_.c_str());
}

void AtomicWriter::write(const std::string& piece) {
  if (std::fwrite(piece.data(), 1, piece.size(), static_cast<FILE*>(file_)) != piece.size())
    throw std::runtime_error("cannot write " + path_ + ": " + errno_text());
}

void AtomicWriter::commit(bool durable) {
  FILE* f = static_cast<FILE*>(file_);
  const bool ok = std::fflush(f) == 0 && (!durable || ::fsync(fileno(f)) == 0);
  const int saved = errno;
  std::fclose(f);
  file_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    throw std::runtime_error("cannot write " + path_ + ": " + std::strerror(saved));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const std::string why = errno_text();
    std::remove(tmp_.c_str());
    throw std::runtime_error("cannot write " + path_ + " (renaming its temporary file: " + why + ")");
  }
}

void write_file_atomic(const std::string& path, const std::string& data) { write_file_atomic(path, data, temp_name(path)); }

void write_file_atomic(const std::string& path, const std::string& data, const std::string& tmp) {
  AtomicWriter w(path, tmp);
  w.write(data);
  w.commit();
}

void write_status_atomic(const std::string& path, const std::string& data) {
  AtomicWriter w(path, temp_name(path));
  w.write(data);
  w.commit(/*durable=*/false);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path + ": " + errno_text());
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace bnlab
