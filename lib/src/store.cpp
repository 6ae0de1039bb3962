// The study store on SQLite (Debian's libsqlite3): schema, inserts in transactions, reads in
// run order, merge.
#include "store.hpp"

#include <sqlite3.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "bnlab/errors.hpp"
#include "report.hpp"
#include "run_dir.hpp"
#include "text.hpp"
#include "wal_vfs.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the store writes curves as little-endian float64 blobs by copying doubles"
#endif

namespace bnlab {

namespace {

/// PRAGMA application_id of a bnlab store: "bnlb".
constexpr int kApplicationId = 0x626e6c62;

// Curves are one row per run holding each per-epoch series as a little-endian float64 blob
// (numpy: np.frombuffer(blob, "<f8")). One row per epoch was measured on this machine at 900,000
// runs x 10 epochs: 14.2 s to insert and 388 MB, against 3.95 s and 263 MB for the blobs.
constexpr const char* kSchema = R"sql(
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs(
  run INTEGER PRIMARY KEY,        -- position in the study's run order (grid, strategy, seed, sample)
  grid TEXT NOT NULL,             -- grid point label, '' without a grid
  strategy TEXT NOT NULL,
  seed INTEGER NOT NULL,
  sample INTEGER NOT NULL,        -- row index of the fine-tuned sample
  engine TEXT NOT NULL,           -- 'batched' or 'torch'
  status TEXT NOT NULL,           -- 'ok', 'diverged' or 'failed'
  error TEXT,                     -- failed runs: why
  evaluate_pretrained REAL, evaluate_before REAL, evaluate_after REAL,
  best_epoch INTEGER,
  first_loss REAL, final_loss REAL, final_val_loss REAL,
  final_gap REAL,                 -- final_loss - final_val_loss
  max_gap REAL,                   -- max over epochs of |loss - val_loss|
  lag_residual REAL, lag_relative REAL, lag_holds INTEGER);
CREATE TABLE epochs(
  run INTEGER PRIMARY KEY REFERENCES runs(run),
  epochs INTEGER NOT NULL,
  loss BLOB NOT NULL, val_loss BLOB NOT NULL,   -- float64 little-endian, one per epoch
  accuracy BLOB, val_accuracy BLOB);            -- cross_entropy only
)sql";

/// A text column; "" for NULL (a damaged or hand-edited store may hold one anywhere).
/// Whether `s` is well-formed UTF-8 (no overlong forms, surrogates or code points past U+10FFFF).
bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || i + len > s.size()) return false;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < len; ++k) {
      const auto d = static_cast<unsigned char>(s[i + k]);
      if ((d >> 6) != 0x2) return false;
      cp = (cp << 6) | (d & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

/// A text cell; text bnlab did not write (not UTF-8) is damage, named like any other.
std::string text_of(sqlite3_stmt* st, int col, const std::string& path) {
  const unsigned char* t = sqlite3_column_text(st, col);
  std::string s = t == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(t), static_cast<size_t>(sqlite3_column_bytes(st, col)));
  if (!valid_utf8(s))
    throw InputError(path + ": damaged study store: a text value (column \"" + std::string(sqlite3_column_name(st, col)) +
                     "\") is not UTF-8; bnlab writes only UTF-8");
  return s;
}

std::vector<double> doubles_of(sqlite3_stmt* st, int col) {
  const int bytes = sqlite3_column_bytes(st, col);
  const void* p = sqlite3_column_blob(st, col);
  std::vector<double> v(static_cast<size_t>(bytes) / sizeof(double));
  if (!v.empty() && p != nullptr) std::memcpy(v.data(), p, v.size() * sizeof(double));
  return v;
}

/// A prepared statement finalized on every way out.
struct Statement {
  sqlite3_stmt* st = nullptr;
  Statement(sqlite3* db, const char* sql, const std::string& path) {
    if (sqlite3_prepare_v2(db, sql, -1, &st, nullptr) != SQLITE_OK)
      throw InputError(path + ": not a bnlab study store (" + sqlite3_errmsg(db) + ")");
  }
  ~Statement() { sqlite3_finalize(st); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
};

[[noreturn]] void fail(sqlite3* db, const std::string& path, const std::string& doing) {
  const int code = sqlite3_extended_errcode(db);
  std::string why = sqlite3_errmsg(db);
  // SQLite reports a failed write as "disk I/O error" or "database or disk is full"; the
  // operating system's error says which (No space left on device, Input/output error).
  const int sys = sqlite3_system_errno(db);
  const int primary = code & 0xff;
  if (sys != 0 && (primary == SQLITE_IOERR || primary == SQLITE_FULL || primary == SQLITE_CANTOPEN)) why += " (" + std::string(std::strerror(sys)) + ")";
  // A file with bnlab's tag whose tables are not what bnlab writes (SQLITE_ERROR: no such table
  // or column; a value of another type) is as damaged as a corrupt one.
  if (code == SQLITE_CORRUPT || code == SQLITE_NOTADB || (code & 0xff) == SQLITE_CORRUPT || code == SQLITE_ERROR ||
      code == SQLITE_MISMATCH || code == SQLITE_FORMAT || code == SQLITE_RANGE)
    throw InputError(path + ": corrupt study store (" + why + "); move it away to start the study afresh");
  throw std::runtime_error(path + ": " + doing + ": " + why);
}

void bind_text(sqlite3_stmt* st, int i, const std::string& s) {
  sqlite3_bind_text(st, i, s.data(), static_cast<int>(s.size()), SQLITE_TRANSIENT);
}

// Store::insert's binds, which SQLite reads in place (SQLITE_STATIC, no copy): the run's strings
// and series outlive the statement's step, and the bindings are cleared right after it.
void bind_text_in_place(sqlite3_stmt* st, int i, const std::string& s) {
  sqlite3_bind_text(st, i, s.data(), static_cast<int>(s.size()), SQLITE_STATIC);
}
/// A series as its doubles' bytes (the schema's float64 blob on this little-endian target), an
/// empty one as an empty blob (not NULL).
void bind_series_in_place(sqlite3_stmt* st, int i, const std::vector<double>& v) {
  if (v.empty())
    sqlite3_bind_zeroblob(st, i, 0);
  else
    sqlite3_bind_blob(st, i, v.data(), static_cast<int>(v.size() * sizeof(double)), SQLITE_STATIC);
}

}  // namespace

bool diverged(const StrategyResult& r, double factor) {
  if (r.failed || r.loss.empty()) return false;
  const double first = r.loss.front();
  return r.loss.back() - first > factor * std::max(1.0, std::abs(first));
}

const char* run_status(const StrategyResult& r) { return r.failed ? "failed" : r.diverged ? "diverged" : "ok"; }

std::string store_path(const std::string& dir) { return dir + "/" + kStoreName; }

StudyRecord open_study(const std::string& run_dir) {
  const std::string path = store_path(run_dir);
  if (::access(path.c_str(), F_OK) != 0)
    throw InputError(run_dir + ": no " + std::string(kStoreName) + " here; is it a bnlab run directory?");
  Store store = Store::open(path, false);
  Config config = parse_config(store.meta("config"), path + " (meta.config)", {}, run_dir);
  return {std::move(config), std::move(store)};
}

Store::Store(Store&& o) noexcept : db_(o.db_), path_(std::move(o.path_)), insert_run_(o.insert_run_), insert_epochs_(o.insert_epochs_) {
  o.db_ = nullptr;
  o.insert_run_ = o.insert_epochs_ = nullptr;
}

Store& Store::operator=(Store&& o) noexcept {
  if (this != &o) {
    close();
    db_ = o.db_;
    path_ = std::move(o.path_);
    insert_run_ = o.insert_run_;
    insert_epochs_ = o.insert_epochs_;
    o.db_ = nullptr;
    o.insert_run_ = o.insert_epochs_ = nullptr;
  }
  return *this;
}

Store::~Store() { close(); }

void Store::close() {
  sqlite3_finalize(insert_run_);
  sqlite3_finalize(insert_epochs_);
  insert_run_ = insert_epochs_ = nullptr;
  if (db_ != nullptr) sqlite3_close(db_);
  db_ = nullptr;
}

void Store::exec(const char* sql) const {
  if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) fail(db_, path_, "cannot update the study store");
}

namespace {

/// Whether SQLite's last error on db is the system failing to write (a full disk, an I/O error
/// on write, sync or the shared-memory file): a failure (exit 1), not damage in the file.
bool write_failed(sqlite3* db) {
  const int ext = sqlite3_extended_errcode(db);
  return (ext & 0xff) == SQLITE_FULL || ((ext & 0xff) == SQLITE_IOERR && ext != SQLITE_IOERR_READ && ext != SQLITE_IOERR_SHORT_READ);
}

}  // namespace

Store Store::open(const std::string& path, bool writable) {
  sqlite3* db = nullptr;
  // NOMUTEX: one thread at a time uses a Store (the study's writer thread between its start and
  // its join, or the thread that takes its last transaction over: see store.hpp), so SQLite need
  // not lock the connection around every call (about a sixth of the writer's time in a profile
  // of a 20,000-run study).
  const int flags = (writable ? SQLITE_OPEN_READWRITE : SQLITE_OPEN_READONLY) | SQLITE_OPEN_NOMUTEX;
  // Through store_vfs(): each transaction's log frames reach the disk as one write (wal_vfs.cpp).
  if (sqlite3_open_v2(path.c_str(), &db, flags, store_vfs()) != SQLITE_OK) {
    const std::string why = db != nullptr ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    throw InputError(path + ": cannot open the study store (" + why + ")");
  }
  Store s(db, path);
  sqlite3_busy_timeout(db, 10000);
  // Reading the header is where a file that is not SQLite, or a damaged one, shows.
  int app = 0;
  {
    sqlite3_stmt* st = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA application_id", -1, &st, nullptr) != SQLITE_OK) {
      const std::string why = sqlite3_errmsg(db);
      if (write_failed(db)) throw std::runtime_error(path + ": cannot open the study store (" + why + ")");
      throw InputError(path + ": not a bnlab study store (" + why + ")");
    }
    const int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) app = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    // A store left by a crash or a full disk in the middle of a transaction has a hot journal
    // (or an unrecovered log) that only a writable connection may roll back: open it so, once.
    if (!writable && (sqlite3_extended_errcode(db) & 0xff) == SQLITE_READONLY && rc != SQLITE_ROW && rc != SQLITE_DONE) {
      s.close();
      return open(path, true);
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
      if (write_failed(db)) throw std::runtime_error(path + ": cannot open the study store (" + sqlite3_errmsg(db) + ")");
      throw InputError(path + ": not a bnlab study store (" + sqlite3_errmsg(db) + ")");
    }
  }
  if (app != kApplicationId)
    throw InputError(path + ": an SQLite database that bnlab did not write (application_id " + std::to_string(app) +
                     "); bnlab leaves it alone: choose another --out or move the file");
  const std::string format = s.meta("format");
  if (format != kStoreFormat)
    throw InputError(path + ": a study store of format \"" + format + "\", this bnlab reads \"" + kStoreFormat + "\"");
  // The whole file must be sound before a study builds on it (readers meet damage as they read).
  if (writable) {
    Statement check(db, "PRAGMA quick_check", path);
    const int rc = sqlite3_step(check.st);
    const char* first = rc == SQLITE_ROW ? reinterpret_cast<const char*>(sqlite3_column_text(check.st, 0)) : nullptr;
    if (rc != SQLITE_ROW || first == nullptr || std::strcmp(first, "ok") != 0)
      throw InputError(path + ": corrupt study store (" + (first != nullptr ? std::string(first) : sqlite3_errmsg(db)) +
                       "); move it away to start the study afresh");
  }
  // SQLite's own checkpoint interval (1,000 pages) stays: 16,384 halved bench_store's inserts at
  // 20,000 runs but only moved the log's copy to seal(), and in a 900,000-run study at one job
  // each 64 MiB copy stalled the writer long enough to fill its queue and hold the worker up
  // (fine-tuning phase 6.0-7.4 s against 4.8-6.1; docs/performance.md).
  if (writable) s.exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;");
  return s;
}

Store Store::create(const std::string& path, const Meta& meta) {
  // In a run directory: the store and the logs SQLite keeps beside it enter the ledger first.
  for (const char* suffix : {"", "-wal", "-shm", "-journal"}) claim_path(path + suffix);
  const std::string tmp = temp_name(path);
  std::remove(tmp.c_str());
  {
    sqlite3* db = nullptr;
    if (sqlite3_open_v2(tmp.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nullptr) != SQLITE_OK) {
      const std::string why = db != nullptr ? sqlite3_errmsg(db) : "out of memory";
      sqlite3_close(db);
      for (const char* suffix : {"", "-journal"}) std::remove((tmp + suffix).c_str());
      throw std::runtime_error(path + ": cannot create the study store (" + why + ")");
    }
    Store s(db, path);  // errors name the store, not its temporary
    try {
      s.exec(("PRAGMA application_id=" + std::to_string(kApplicationId) + "; PRAGMA journal_mode=DELETE; BEGIN;").c_str());
      s.exec(kSchema);
      s.set_meta("format", kStoreFormat);
      for (const auto& [k, v] : meta) s.set_meta(k, v);
      s.exec("COMMIT;");
    } catch (...) {
      s.close();
      for (const char* suffix : {"", "-journal", "-wal", "-shm"}) std::remove((tmp + suffix).c_str());
      throw;
    }
  }
  // The temporary is closed (a rollback journal, nothing beside it): renaming it is atomic. An
  // older store's log goes first: SQLite would replay it into whatever file takes the name.
  for (const char* suffix : {"-wal", "-shm"})
    if (may_remove(path + suffix)) std::remove((path + suffix).c_str());
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot create the study store (renaming its temporary file: " + why + ")");
  }
  return open(path, true);
}

std::string Store::meta(const std::string& key) const {
  Statement q(db_, "SELECT value FROM meta WHERE key = ?", path_);
  bind_text(q.st, 1, key);
  const int rc = sqlite3_step(q.st);
  if (rc == SQLITE_ROW) return text_of(q.st, 0, path_);
  if (rc != SQLITE_DONE) fail(db_, path_, "cannot read the metadata");
  return "";
}

void Store::set_meta(const std::string& key, const std::string& value) {
  Statement q(db_, "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", path_);
  bind_text(q.st, 1, key);
  bind_text(q.st, 2, value);
  if (sqlite3_step(q.st) != SQLITE_DONE) fail(db_, path_, "cannot write the metadata");
}

void Store::prepare_inserts() {
  if (insert_run_ == nullptr) {
    // Both statements or neither: a guard finalizes what was prepared when fail() throws (after it
    // has read SQLite's error), so a failed prepare leaves no half-made pair for the next call.
    sqlite3_stmt* run_st = nullptr;
    sqlite3_stmt* epochs_st = nullptr;
    struct Finalize {
      sqlite3_stmt*& a;
      sqlite3_stmt*& b;
      ~Finalize() {
        sqlite3_finalize(a);
        sqlite3_finalize(b);
      }
    } guard{run_st, epochs_st};
    if (sqlite3_prepare_v2(db_, "INSERT INTO runs VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", -1, &run_st, nullptr) != SQLITE_OK ||
        sqlite3_prepare_v2(db_, "INSERT INTO epochs VALUES(?,?,?,?,?,?)", -1, &epochs_st, nullptr) != SQLITE_OK)
      fail(db_, path_, "cannot prepare inserts");
    insert_run_ = run_st;
    insert_epochs_ = epochs_st;
    run_st = epochs_st = nullptr;
  }
}

void Store::insert(const std::vector<StrategyResult>& runs) {
  if (runs.empty()) return;
  prepare_inserts();
  // In run order: the work items of several workers arrive in any order, and a row inserted
  // before the last one of its table splits a page where appending fills it (a 90,000-run study
  // at --jobs 2: 28.0 to 28.7 MB by arrival order, 27.6 at --jobs 1).
  thread_local std::vector<const StrategyResult*> order;
  order.clear();
  for (const auto& r : runs) order.push_back(&r);
  std::sort(order.begin(), order.end(), [](const StrategyResult* a, const StrategyResult* b) { return a->run < b->run; });
  exec("BEGIN IMMEDIATE;");
  try {
    for (const StrategyResult* p : order) {
      const StrategyResult& r = *p;
      sqlite3_stmt* st = insert_run_;
      sqlite3_reset(st);
      sqlite3_bind_int64(st, 1, static_cast<sqlite3_int64>(r.run));
      bind_text_in_place(st, 2, r.grid);
      bind_text_in_place(st, 3, r.name);
      sqlite3_bind_int64(st, 4, static_cast<sqlite3_int64>(r.seed));
      sqlite3_bind_int64(st, 5, r.sample);
      bind_text_in_place(st, 6, r.engine);
      sqlite3_bind_text(st, 7, run_status(r), -1, SQLITE_STATIC);  // a string literal
      if (r.failed) {
        bind_text_in_place(st, 8, r.error);
      } else {
        const double figures[] = {r.evaluate_pretrained, r.evaluate_before, r.evaluate_after};
        for (int i = 0; i < 3; ++i) sqlite3_bind_double(st, 9 + i, figures[i]);
        sqlite3_bind_int(st, 12, r.best_epoch);
        const double more[] = {r.loss.front(), r.loss.back(), r.val_loss.back(), r.loss.back() - r.val_loss.back(),
                               r.max_gap, r.lag_residual, r.lag_relative};
        for (int i = 0; i < 7; ++i) sqlite3_bind_double(st, 13 + i, more[i]);
        sqlite3_bind_int(st, 20, r.lag_identity_holds ? 1 : 0);
      }
      const int rc = sqlite3_step(st);
      sqlite3_clear_bindings(st);  // no binding points into this run once it is stored
      if (rc != SQLITE_DONE) {
        if ((sqlite3_extended_errcode(db_) & 0xff) == SQLITE_CONSTRAINT)
          throw std::logic_error(path_ + ": run " + std::to_string(r.run) + " stored twice");
        fail(db_, path_, "cannot insert run " + std::to_string(r.run));
      }
      if (r.failed) continue;
      st = insert_epochs_;
      sqlite3_reset(st);
      sqlite3_bind_int64(st, 1, static_cast<sqlite3_int64>(r.run));
      sqlite3_bind_int64(st, 2, static_cast<sqlite3_int64>(r.loss.size()));
      bind_series_in_place(st, 3, r.loss);
      bind_series_in_place(st, 4, r.val_loss);
      if (!r.accuracy.empty()) {
        bind_series_in_place(st, 5, r.accuracy);
        bind_series_in_place(st, 6, r.val_accuracy);
      }
      const int rc_epochs = sqlite3_step(st);
      sqlite3_clear_bindings(st);
      if (rc_epochs != SQLITE_DONE) fail(db_, path_, "cannot insert the epochs of run " + std::to_string(r.run));
    }
    exec("COMMIT;");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK;", nullptr, nullptr, nullptr);
    throw;
  }
}

void Store::seal() {
  // Best effort: with another connection open the mode stays WAL, which is still a sound store.
  sqlite3_exec(db_, "PRAGMA journal_mode=DELETE;", nullptr, nullptr, nullptr);
}

size_t Store::count() const {
  Statement q(db_, "SELECT count(*) FROM runs", path_);
  if (sqlite3_step(q.st) != SQLITE_ROW) fail(db_, path_, "cannot count the runs");
  return static_cast<size_t>(sqlite3_column_int64(q.st, 0));
}

Store::Counts Store::status_counts() const {
  Statement q(db_, "SELECT status, count(*) FROM runs GROUP BY status", path_);
  Counts c;
  int rc;
  while ((rc = sqlite3_step(q.st)) == SQLITE_ROW) {
    const std::string status = text_of(q.st, 0, path_);
    const auto n = static_cast<size_t>(sqlite3_column_int64(q.st, 1));
    (status == "failed" ? c.failed : status == "diverged" ? c.diverged : c.ok) += n;
  }
  if (rc != SQLITE_DONE) fail(db_, path_, "cannot count the runs");
  return c;
}

std::vector<size_t> Store::completed_runs() const {
  Statement q(db_, "SELECT run FROM runs WHERE status != 'failed' ORDER BY run", path_);
  std::vector<size_t> out;
  int rc;
  while ((rc = sqlite3_step(q.st)) == SQLITE_ROW) out.push_back(static_cast<size_t>(sqlite3_column_int64(q.st, 0)));
  if (rc != SQLITE_DONE) fail(db_, path_, "cannot read the runs");
  return out;
}

size_t Store::delete_failed() {
  exec("DELETE FROM runs WHERE status = 'failed';");
  return static_cast<size_t>(sqlite3_changes(db_));
}

void Store::reclassify(double factor) {
  // The same comparison, in the same double arithmetic, as diverged().
  Statement q(db_,
              "UPDATE runs SET status = CASE WHEN final_loss - first_loss > ?1 * max(1.0, abs(first_loss)) "
              "THEN 'diverged' ELSE 'ok' END WHERE status != 'failed'",
              path_);
  sqlite3_bind_double(q.st, 1, factor);
  if (sqlite3_step(q.st) != SQLITE_DONE) fail(db_, path_, "cannot classify the runs");
}

void Store::for_each(const std::function<void(const StrategyResult&)>& visit, bool curves) const {
  const char* sql = curves
      ? "SELECT r.run, grid, strategy, seed, sample, engine, status, error, evaluate_pretrained, evaluate_before, "
        "evaluate_after, best_epoch, e.loss, e.val_loss, e.accuracy, e.val_accuracy, final_gap, max_gap, lag_residual, "
        "lag_relative, lag_holds FROM runs r LEFT JOIN epochs e ON e.run = r.run ORDER BY r.run"
      : "SELECT run, grid, strategy, seed, sample, engine, status, error, evaluate_pretrained, evaluate_before, "
        "evaluate_after, best_epoch, NULL, NULL, NULL, NULL, final_gap, max_gap, lag_residual, lag_relative, lag_holds "
        "FROM runs ORDER BY run";
  Statement q(db_, sql, path_);
  StrategyResult r;
  int rc;
  const auto text = [&](int col) { return text_of(q.st, col, path_); };
  while ((rc = sqlite3_step(q.st)) == SQLITE_ROW) {
    r = StrategyResult{};
    r.run = static_cast<size_t>(sqlite3_column_int64(q.st, 0));
    r.grid = text(1);
    r.name = text(2);
    r.seed = static_cast<uint64_t>(sqlite3_column_int64(q.st, 3));
    r.sample = sqlite3_column_int64(q.st, 4);
    r.engine = text(5);
    const std::string status = text(6);
    r.failed = status == "failed";
    r.diverged = status == "diverged";
    if (r.failed) {
      r.error = text(7);
    } else {
      // SQLite stores a NaN as NULL; it reads back as NaN, not as 0.
      const auto real = [&](int col) { return sqlite3_column_type(q.st, col) == SQLITE_NULL ? NAN : sqlite3_column_double(q.st, col); };
      r.evaluate_pretrained = real(8);
      r.evaluate_before = real(9);
      r.evaluate_after = real(10);
      r.best_epoch = sqlite3_column_int(q.st, 11);
      if (curves) {
        r.loss = doubles_of(q.st, 12);
        r.val_loss = doubles_of(q.st, 13);
        r.accuracy = doubles_of(q.st, 14);
        r.val_accuracy = doubles_of(q.st, 15);
        if (r.loss.empty() || r.val_loss.size() != r.loss.size())
          throw InputError(path_ + ": run " + std::to_string(r.run) + " has no epochs or mismatched curves; the store is damaged");
        compute_lag(r);
      } else {
        r.final_gap = real(16);
        r.max_gap = real(17);
        r.lag_residual = real(18);
        r.lag_relative = real(19);
        r.lag_identity_holds = sqlite3_column_int(q.st, 20) != 0;
      }
    }
    visit(r);
  }
  if (rc != SQLITE_DONE) fail(db_, path_, "cannot read the runs");
}

std::vector<StrategyResult> Store::read_all() const {
  std::vector<StrategyResult> out;
  for_each([&](const StrategyResult& r) { out.push_back(r); });
  return out;
}

void Store::absorb(const Store& other) {
  Statement attach(db_, "ATTACH DATABASE ? AS other", path_);
  bind_text(attach.st, 1, other.path());
  if (sqlite3_step(attach.st) != SQLITE_DONE) fail(db_, path_, "cannot read " + other.path());
  try {
    {
      Statement dup(db_, "SELECT min(o.run) FROM other.runs o JOIN main.runs m ON m.run = o.run", path_);
      if (sqlite3_step(dup.st) != SQLITE_ROW) fail(db_, path_, "cannot compare with " + other.path());
      if (sqlite3_column_type(dup.st, 0) != SQLITE_NULL)
        throw InputError(other.path() + ": run " + std::to_string(sqlite3_column_int64(dup.st, 0)) +
                         " is also in an earlier shard's store; merge each shard once");
    }
    exec("BEGIN; INSERT INTO main.runs SELECT * FROM other.runs; INSERT INTO main.epochs SELECT * FROM other.epochs; COMMIT;");
  } catch (...) {
    sqlite3_exec(db_, "ROLLBACK;", nullptr, nullptr, nullptr);
    sqlite3_exec(db_, "DETACH DATABASE other", nullptr, nullptr, nullptr);
    throw;
  }
  exec("DETACH DATABASE other;");
}

}  // namespace bnlab
