// The study store: every run of a study, its epochs and the study's metadata in one SQLite file
// (study.sqlite in the run directory). Runs are inserted as they finish, in transactions, so a
// kill at any moment leaves every committed run readable; resume, reports, goldens and merge
// read it. No torch.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "bnlab/config.hpp"
#include "bnlab/run.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace bnlab {

/// The store's file name inside a run directory.
inline constexpr const char* kStoreName = "study.sqlite";
/// meta.format of every store this version writes.
inline constexpr const char* kStoreFormat = "bnlab.study/1";

/// Whether `r` ended far above where it started: its final training loss exceeds the first by
/// more than factor * max(1, |first loss|) (report.diverged_factor). Failed runs never are.
bool diverged(const StrategyResult& r, double factor);
/// "ok", "diverged" or "failed".
const char* run_status(const StrategyResult& r);

/// A connection to one store. One thread at a time may use a Store (its connection is opened
/// without SQLite's mutex): the study's writer thread from its start to its last commit (or the
/// thread that closes the study's sink, when it takes the last transaction over from a sleeping
/// writer; the hand-overs are ordered by the sink's mutex), the caller before and after.
class Store {
 public:
  using Meta = std::vector<std::pair<std::string, std::string>>;

  /// Opens an existing store; anything that is not one (not SQLite, corrupt, another
  /// application's database, another format) is an InputError naming the file.
  static Store open(const std::string& path, bool writable);
  /// Makes a new store at `path`, replacing the file there (callers check that it is bnlab's):
  /// the schema and `meta` are complete in a temporary file before it is renamed to `path`, so
  /// `path` is always absent or a whole store.
  static Store create(const std::string& path, const Meta& meta);

  Store(Store&& other) noexcept;
  Store& operator=(Store&& other) noexcept;
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;
  ~Store();

  const std::string& path() const { return path_; }
  /// A metadata value, "" when absent.
  std::string meta(const std::string& key) const;
  void set_meta(const std::string& key, const std::string& value);

  /// Ends the write-ahead log: the file alone is the whole store (copies, read-only directories).
  void seal();

  /// Inserts finished runs (their `engine` and curves included) in one transaction.
  void insert(const std::vector<StrategyResult>& runs);
  /// Prepares insert()'s statements now (else its first call does), e.g. on a thread that waits
  /// for runs anyway.
  void prepare_inserts();
  /// Runs of every status, in the store.
  size_t count() const;
  struct Counts {
    size_t ok = 0, diverged = 0, failed = 0;
  };
  Counts status_counts() const;
  /// The run numbers of runs that did not fail, ascending.
  std::vector<size_t> completed_runs() const;
  /// Deletes failed runs (resume runs them again); returns how many.
  size_t delete_failed();
  /// Classifies every run that did not fail as diverged or ok under `factor` (as diverged()).
  void reclassify(double factor);

  /// Every run in run order; with `curves`, its epochs too and the lag figures recomputed from
  /// them (bit for bit what the engine reported). Memory: one run at a time.
  void for_each(const std::function<void(const StrategyResult&)>& visit, bool curves = true) const;
  std::vector<StrategyResult> read_all() const;

  /// Copies every run of `other` (a store of the same study) into this one in one transaction;
  /// a run already here is an InputError naming both files.
  void absorb(const Store& other);

  sqlite3* db() const { return db_; }

 private:
  Store(sqlite3* db, std::string path) : db_(db), path_(std::move(path)) {}
  void exec(const char* sql) const;
  void close();
  sqlite3* db_ = nullptr;
  std::string path_;
  sqlite3_stmt* insert_run_ = nullptr;
  sqlite3_stmt* insert_epochs_ = nullptr;
};

/// The store of a run directory: `dir`/study.sqlite.
std::string store_path(const std::string& dir);

/// A run directory's store, opened read-only, and the study's config from its metadata (what
/// golden, check, merge and export read). No store there is an InputError naming the directory.
struct StudyRecord {
  Config config;
  Store store;
};
StudyRecord open_study(const std::string& run_dir);

}  // namespace bnlab
