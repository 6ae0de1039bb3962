// See run_dir.hpp.
#include "run_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <sstream>

#include "bnlab/errors.hpp"
#include "json_input.hpp"
#include "text.hpp"

namespace bnlab {

namespace {

bool starts_with(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
bool ends_with(const std::string& s, const std::string& e) {
  return s.size() >= e.size() && s.compare(s.size() - e.size(), e.size(), e) == 0;
}

std::vector<std::string> entries_of(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) throw InputError(dir + ": cannot list the folder (" + errno_text() + ")");
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::set<std::string> read_ledger(const std::string& dir) {
  std::set<std::string> names;
  const std::string path = dir + "/" + kLedgerName;
  if (!exists(path)) return names;
  std::istringstream in(read_file(path));
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) names.insert(line);
  return names;
}

/// The experiment a run directory's config.resolved.json names; "" when there is none.
std::string experiment_of(const std::string& dir) {
  const std::string path = dir + "/config.resolved.json";
  if (!exists(path)) return "";
  try {
    const auto j = parse_json(read_file(path), path);
    return j.is_object() && j.contains("name") && j["name"].is_string() ? j["name"].get<std::string>() : "(unnamed)";
  } catch (const std::exception&) {
    return "(unreadable)";
  }
}

/// Whether `path` holds `tag` within its first 4 KiB (a file bnlab signed).
bool holds_tag(const std::string& path, const std::string& tag) {
  std::string head(4096, '\0');
  FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) return false;
  head.resize(std::fread(&head[0], 1, head.size(), f));
  std::fclose(f);
  return head.find(tag) != std::string::npos;
}

/// A folder bnlab wrote before it kept a ledger: its resolved config names an experiment, or
/// (what an older `bnlab explain` left) every entry has a name bnlab writes and its weights are
/// a checkpoint of bnlab's own format. Names alone prove nothing: a user's curves.csv is not bnlab's.
bool legacy_run_dir(const std::string& dir, const std::vector<std::string>& entries) {
  const std::string name = experiment_of(dir);
  if (!name.empty() && name != "(unreadable)") return true;
  if (!std::all_of(entries.begin(), entries.end(), [](const std::string& e) { return is_bnlab_output_name(e); })) return false;
  return std::any_of(entries.begin(), entries.end(), [&](const std::string& e) {
    return starts_with(e, "pretrained") && holds_tag(dir + "/" + e, "bnlab.pretrained/1");
  });
}

std::string real_dir(const std::string& dir) {
  char buf[PATH_MAX];
  if (::realpath(dir.empty() ? "." : dir.c_str(), buf) == nullptr) return dir;
  return buf;
}

struct Owned {
  int lock_fd = -1;
  std::set<std::string> ledger;
};
std::mutex g_mutex;
std::map<std::string, Owned>& owned() {
  static std::map<std::string, Owned> m;
  return m;
}

void save_ledger(const std::string& dir, const std::set<std::string>& names) {
  std::string text;
  for (const auto& n : names) text += n + "\n";
  // Written like every output (temporary file and rename), but not through claim_path.
  const std::string path = dir + "/" + kLedgerName, tmp = temp_name(path);
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw std::runtime_error("cannot write " + tmp + ": " + errno_text());
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  const std::string why = errno_text();
  std::fclose(f);
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write " + path + ": " + (ok ? errno_text() : why));
  }
}

void split(const std::string& path, std::string& dir, std::string& name) {
  const auto slash = path.find_last_of('/');
  dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  name = slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

bool is_bnlab_output_name(const std::string& name) {
  static const std::set<std::string> kFixed = {
      "config.resolved.json", "keras.json", "architecture.json", "manifest.json", "progress.json", "summary.json",
      "summary.csv", "summary.md", "curves.csv", "metrics.jsonl", "curves.png", "curves.svg", "gap_distribution.png",
      "gap_distribution.svg", "explain.json", "data.json", "study.sqlite", "study.sqlite-wal", "study.sqlite-shm",
      "study.sqlite-journal", "report.html", "tensorboard", kLedgerName, kLockName};
  if (kFixed.count(name)) return true;
  return ends_with(name, ".pt") && (starts_with(name, "pretrained") || starts_with(name, "sample") || starts_with(name, "finetuned_"));
}

void check_output_dir(const std::string& dir, const std::string& experiment, bool force, const std::string& what) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    if (errno == ENOENT) return;  // a new folder
    throw InputError(what + " " + dir + ": cannot use the folder (" + errno_text() + ")");
  }
  if (!S_ISDIR(st.st_mode))
    throw InputError(what + " " + dir + ": is a file, not a folder; bnlab writes a run directory (a folder) there");
  const auto entries = entries_of(dir);
  if (entries.empty()) return;
  const bool has_ledger = exists(dir + "/" + kLedgerName);
  // The lock file alone: bnlab made the folder and stopped before its ledger (a full disk).
  const bool lock_only = entries.size() == 1 && entries.front() == kLockName;
  if (!has_ledger && !lock_only && !legacy_run_dir(dir, entries)) {
    std::string listed;
    for (size_t i = 0; i < std::min<size_t>(entries.size(), 5); ++i) listed += (i ? ", " : "") + entries[i];
    if (entries.size() > 5) listed += " and " + std::to_string(entries.size() - 5) + " more";
    throw InputError(what + " " + dir + ": the folder is not empty and is not a bnlab run directory (it holds " + listed +
                     "); bnlab writes only into a new folder, an empty one or a run directory of its own; choose another " + what);
  }
  const std::string other = experiment_of(dir);
  if (!other.empty() && other != experiment && !force)
    throw InputError(dir + ": holds results of experiment \"" + other + "\", not \"" + experiment +
                     "\"; choose another " + what + " or pass --force to reuse it");
  // In a folder without a ledger (written before bnlab kept one), bnlab's names are its own.
  const auto ledger = has_ledger ? read_ledger(dir) : std::set<std::string>(entries.begin(), entries.end());
  for (const auto& e : entries)
    if (is_bnlab_output_name(e) && !ledger.count(e))
      throw InputError(dir + "/" + e + ": bnlab would write this file, but it did not write the one there (it is not in " + dir + "/" +
                       kLedgerName + "); bnlab never replaces a file it did not write: move it away or choose another " + what);
}

void own_output_dir(const std::string& dir, const std::string& what) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    throw InputError(dir + ": cannot create the output directory (" + errno_text() + ")");
  const std::string key = real_dir(dir);
  const std::string lock_path = dir + "/" + kLockName;
  std::lock_guard<std::mutex> guard(g_mutex);
  Owned& o = owned()[key];
  // A folder removed and made again since this process locked it has a new lock file.
  struct stat held {}, now {};
  if (o.lock_fd >= 0 && (::fstat(o.lock_fd, &held) != 0 || ::stat(lock_path.c_str(), &now) != 0 || held.st_ino != now.st_ino ||
                         held.st_dev != now.st_dev)) {
    ::close(o.lock_fd);
    o.lock_fd = -1;
    o.ledger.clear();  // a new folder of the same name: what bnlab wrote in the old one is gone
  }
  if (o.lock_fd < 0) {
    const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) throw InputError(lock_path + ": cannot create the lock file (" + errno_text() + ")");
    const int locked = ::flock(fd, LOCK_EX | LOCK_NB);
    const int err = locked == 0 ? 0 : errno;
    if (locked != 0 && (err == ENOSYS || err == ENOLCK || err == EOPNOTSUPP)) {
      // A file system without locks (Lustre mounted without -o flock, some NFS): go on unguarded.
      std::fprintf(stderr, "bnlab: warning: %s: the file system does not support locks (%s); nothing stops a second bnlab "
                   "from writing this run directory at the same time\n", lock_path.c_str(), std::strerror(err));
    } else if (locked != 0) {
      char buf[32] = {0};
      const ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
      ::close(fd);
      owned().erase(key);
      if (err == EWOULDBLOCK) {
        std::string pid = n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
        pid.erase(std::remove(pid.begin(), pid.end(), '\n'), pid.end());
        // The file keeps the pid of the last bnlab that held it; name it only while that one lives.
        const long p = std::strtol(pid.c_str(), nullptr, 10);
        if (p <= 0 || ::kill(static_cast<pid_t>(p), 0) != 0) pid.clear();
        throw InputError(dir + ": another bnlab process" + (pid.empty() ? "" : " (pid " + pid + ")") +
                         " is writing this run directory; wait for it to finish or choose another " + what);
      }
      throw InputError(lock_path + ": cannot lock (" + std::string(std::strerror(err)) + ")");
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      // The pid is only for the message another process prints; the lock itself holds.
    }
    o.lock_fd = fd;
  }
  const bool has_ledger = exists(dir + "/" + kLedgerName);
  std::set<std::string> ledger = read_ledger(dir);
  if (!has_ledger)
    for (const auto& e : entries_of(dir))
      if (is_bnlab_output_name(e)) ledger.insert(e);  // a run directory from before the ledger
  ledger.insert(kLedgerName);
  ledger.insert(kLockName);
  o.ledger.insert(ledger.begin(), ledger.end());
  save_ledger(dir, o.ledger);
}

namespace {

/// The owned run directory `path` lies in (itself or a folder above it) and the path's name
/// relative to it ("summary.md", "tensorboard/train/events..."); nullptr when there is none.
/// Called with g_mutex held.
Owned* owner_of(const std::string& path, std::string& dir, std::string& name) {
  split(path, dir, name);
  std::string d = dir, rel = name;
  for (int depth = 0; depth < 8; ++depth) {
    const auto it = owned().find(real_dir(d));
    if (it != owned().end()) {
      dir = d;
      name = rel;
      return &it->second;
    }
    std::string parent, base;
    split(d, parent, base);
    if (base.empty() || base == "." || base == ".." || parent == d) break;
    rel = base + "/" + rel;
    d = parent;
  }
  return nullptr;
}

}  // namespace

void claim_path(const std::string& path) {
  std::string dir, name;
  split(path, dir, name);
  if (name.size() > 1 && name[0] == '.' && name.find(".tmp.") != std::string::npos) return;  // a temporary, renamed later
  std::lock_guard<std::mutex> guard(g_mutex);
  Owned* o = owner_of(path, dir, name);
  if (o == nullptr) return;
  if (o->ledger.count(name)) return;
  if (exists(path))
    throw InputError(path + ": exists and bnlab did not write it (it is not in " + dir + "/" + kLedgerName +
                     "); bnlab never replaces a file it did not write");
  o->ledger.insert(name);
  save_ledger(dir, o->ledger);
}

bool may_remove(const std::string& path) {
  std::string dir, name;
  std::lock_guard<std::mutex> guard(g_mutex);
  const Owned* o = owner_of(path, dir, name);
  return o == nullptr || o->ledger.count(name) > 0;
}

std::vector<std::string> ledger_names_under(const std::string& dir, const std::string& prefix) {
  std::lock_guard<std::mutex> guard(g_mutex);
  const auto it = owned().find(real_dir(dir));
  std::vector<std::string> out;
  if (it == owned().end()) return out;
  for (const auto& n : it->second.ledger)
    if (starts_with(n, prefix)) out.push_back(n);
  return out;
}

void check_new_output_file(const std::string& path, const std::string& what, const std::string& signature) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISREG(st.st_mode) && !signature.empty() && holds_tag(path, signature)) return;  // bnlab's own file of this kind
  throw InputError(what + " " + path + ": " + (S_ISDIR(st.st_mode) ? "is a folder" : "already exists") +
                   "; bnlab never replaces a file it did not write" + (signature.empty() ? ", and cannot tell whether it wrote this one" : "") +
                   ": remove it or choose another name");
}

}  // namespace bnlab
