// Torch-free pieces (reports, goldens, check, merge) on hand-made run records. Built twice:
// normally, and with AddressSanitizer + UndefinedBehaviorSanitizer (see tests/CMakeLists.txt).
#include <gtest/gtest.h>
#include <unistd.h>

#include <sqlite3.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "bnlab/config.hpp"
#include "bnlab/errors.hpp"
#include "bnlab/tools.hpp"
#include "report.hpp"
#include "store.hpp"
#include "support.hpp"
#include "text.hpp"
#include "wal_vfs.hpp"

namespace {

using namespace bnlab;
using test::source;
using test::temp_dir;

const char* kStudy = R"({"name": "hand", "seeds": [1, 2], "finetune": {"samples": [3, 4], "epochs": 2},
                         "strategies": ["train", "frozen"]})";

/// Hand-made runs: loss[k] = base + k, val_loss[k] = base - 1 + k, evaluate before = base.
std::vector<StrategyResult> hand_runs(const Config& c) {
  std::vector<StrategyResult> out;
  for (const auto& k : plan_runs(c)) {
    StrategyResult r;
    r.run = k.run;
    r.name = c.strategies[k.strategy].name;
    r.seed = c.seeds[k.seed];
    r.sample = c.finetune.samples[k.sample];
    const double base = static_cast<double>(k.run);
    r.evaluate_pretrained = r.evaluate_before = base;
    r.loss = {base, base + 1};
    r.val_loss = {base + 1, base + 2};
    r.evaluate_after = base + 2;
    r.best_epoch = 2;
    compute_lag(r);
    out.push_back(r);
  }
  return out;
}

TEST(Tools, LagOfHandMadeCurvesHolds) {
  const auto runs = hand_runs(parse_config(kStudy, "hand"));
  ASSERT_EQ(runs.size(), 8u);
  // loss[1] == evaluate before and loss[2] == val_loss[1]: the identity holds, max gap 1.
  EXPECT_TRUE(runs[3].lag_identity_holds);
  EXPECT_EQ(runs[3].lag_residual, 0.0);
  EXPECT_EQ(runs[3].max_gap, 1.0);
  EXPECT_EQ(keras_line(3, 10, -6.0948, -6.0903, nullptr, nullptr), "Epoch 3/10 - loss: -6.0948e+00 - val_loss: -6.0903e+00");
}

TEST(Tools, AggregatesGroupByStrategy) {
  const auto c = parse_config(kStudy, "hand");
  const auto aggs = aggregate(c, hand_runs(c));
  ASSERT_EQ(aggs.size(), 2u);
  EXPECT_EQ(aggs[0].strategy, "train");
  EXPECT_EQ(aggs[0].runs, 4u);
  EXPECT_DOUBLE_EQ(aggs[0].final_gap.mean, -1.0);  // loss - val_loss = -1 for every run
  EXPECT_DOUBLE_EQ(aggs[0].eval_change.mean, 2.0);
}

/// A run directory as bnlab leaves it: the resolved config and a store holding `runs`.
void write_study_dir(const std::string& dir, const Config& c, const std::vector<StrategyResult>& runs,
                     const std::string& cache_keys = R"(["abc-batched"])") {
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  write_file_atomic(dir + "/config.resolved.json", to_json(c));
  Store store = Store::create(store_path(dir), {{"experiment", c.name}, {"identity", study_identity(c)}, {"config", to_json(c)},
                                               {"cache_keys", cache_keys}});
  store.insert(runs);
  std::ostringstream log;
  write_reports(dir, c, store, /*plots=*/false, log, runs.size());
}

TEST(Tools, StoreKeepsEveryFieldBitForBit) {
  const auto c = parse_config(kStudy, "hand");
  auto runs = hand_runs(c);
  runs[1].loss = {0.1 + 0.2, -6.0948123931884766};  // values with no short decimal form
  runs[1].val_loss = {1e-300, -0.0};
  runs[1].engine = "torch";
  runs[2].failed = true;
  runs[2].error = "strategy \"train\": loss is not finite";
  runs[3].loss = {-6, 1e5};  // ends far above where it started
  compute_lag(runs[1]);
  compute_lag(runs[3]);
  for (auto& r : runs) {
    if (r.engine.empty()) r.engine = "batched";
    r.diverged = diverged(r, c.report.diverged_factor);
  }
  EXPECT_TRUE(runs[3].diverged);
  EXPECT_FALSE(runs[1].diverged);
  const auto dir = temp_dir("store");
  Store store = Store::create(store_path(dir), {{"experiment", c.name}});
  store.insert(runs);
  const auto back = Store::open(store_path(dir), false).read_all();
  ASSERT_EQ(back.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& a = runs[i];
    const auto& b = back[i];
    EXPECT_EQ(b.run, a.run);
    EXPECT_EQ(b.name, a.name);
    EXPECT_EQ(b.seed, a.seed);
    EXPECT_EQ(b.sample, a.sample);
    EXPECT_EQ(b.engine, a.engine);
    EXPECT_EQ(b.failed, a.failed);
    EXPECT_EQ(b.diverged, a.diverged);
    EXPECT_EQ(b.error, a.error);
    if (a.failed) continue;
    EXPECT_EQ(b.loss, a.loss) << "run " << i;
    EXPECT_EQ(b.val_loss, a.val_loss) << "run " << i;
    EXPECT_EQ(std::signbit(b.val_loss.back()), std::signbit(a.val_loss.back()));
    EXPECT_EQ(b.evaluate_before, a.evaluate_before);
    EXPECT_EQ(b.evaluate_after, a.evaluate_after);
    EXPECT_EQ(b.best_epoch, a.best_epoch);
    EXPECT_EQ(b.lag_residual, a.lag_residual);
  }
  // The classification in SQL is the same comparison as diverged(): reclassifying under a
  // factor that makes run 3 ordinary and back again follows it exactly.
  store.reclassify(1e9);
  EXPECT_EQ(store.status_counts().diverged, 0u);
  store.reclassify(c.report.diverged_factor);
  EXPECT_EQ(store.status_counts().diverged, 1u);
  EXPECT_EQ(store.status_counts().failed, 1u);
  EXPECT_EQ(store.delete_failed(), 1u);
  EXPECT_EQ(store.completed_runs().size(), runs.size() - 1);
}

// Store::insert binds a run's strings and curves in place and clears the bindings after each
// statement: a run inserted after a failed one (in the same call or a later one) must not take the
// failed run's error, nor a failed run the figures of the run before it, nor a run without
// accuracy curves the curves of the run before it.
TEST(Tools, StoreInsertsLeaveNoBindingBehind) {
  const auto c = parse_config(kStudy, "hand");
  auto runs = hand_runs(c);
  ASSERT_GE(runs.size(), 4u);
  for (auto& r : runs) r.engine = "batched";
  runs[0].accuracy = {0.25, 0.5};
  runs[0].val_accuracy = {0.5, 0.75};
  runs[1].failed = true;
  runs[1].error = "strategy \"train\": loss is not finite";
  // Both calls' runs outlive the checks: a binding left behind would point at live values.
  const std::vector<StrategyResult> first{runs[0], runs[1], runs[2]}, second{runs[3]};
  const auto dir = temp_dir("store_bindings");
  Store store = Store::create(store_path(dir), {{"experiment", c.name}});
  store.insert(first);
  store.insert(second);
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(store.db(),
                               "SELECT r.run, r.error, r.evaluate_before IS NULL, r.final_loss IS NULL, "
                               "e.run IS NULL, e.accuracy IS NULL FROM runs r LEFT JOIN epochs e USING (run) ORDER BY r.run",
                               -1, &st, nullptr),
            SQLITE_OK);
  int rows = 0;
  while (sqlite3_step(st) == SQLITE_ROW) {
    const auto run = static_cast<size_t>(sqlite3_column_int64(st, 0));
    const bool failed = run == runs[1].run;
    const auto* error = reinterpret_cast<const char*>(sqlite3_column_text(st, 1));
    if (failed) {
      EXPECT_STREQ(error, runs[1].error.c_str());
    } else {
      EXPECT_EQ(error, nullptr) << "run " << run << " took another run's error";
    }
    EXPECT_EQ(sqlite3_column_int(st, 2), failed ? 1 : 0) << "run " << run;
    EXPECT_EQ(sqlite3_column_int(st, 3), failed ? 1 : 0) << "run " << run;
    EXPECT_EQ(sqlite3_column_int(st, 4), failed ? 1 : 0) << "run " << run << ": epochs row";
    if (!failed) {
      EXPECT_EQ(sqlite3_column_int(st, 5), run == runs[0].run ? 0 : 1) << "run " << run << ": accuracy";
    }
    ++rows;
  }
  sqlite3_finalize(st);
  EXPECT_EQ(rows, 4);
}

/// `n` ok runs numbered from `first`, 10-epoch curves (as bench_store makes them).
std::vector<StrategyResult> numbered_runs(size_t first, size_t n) {
  std::vector<StrategyResult> out(n);
  for (size_t i = 0; i < n; ++i) {
    StrategyResult& r = out[i];
    r.run = first + i;
    r.name = "frozen";
    r.sample = static_cast<int64_t>(first + i);
    r.engine = "batched";
    r.evaluate_before = 1.0 + 1e-3 * static_cast<double>(first + i);
    for (int e = 0; e < 10; ++e) {
      r.loss.push_back(r.evaluate_before - 1e-5 * e);
      r.val_loss.push_back(r.evaluate_before - 1e-5 * (e + 1));
    }
  }
  return out;
}

/// Runs and the sum of their first losses, as a connection that is not the store's (SQLite's
/// default VFS, as another process would read it) sees the file now.
std::pair<int64_t, double> seen_by_another_reader(const std::string& path) {
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  EXPECT_EQ(sqlite3_prepare_v2(db, "SELECT count(*), total(first_loss) FROM runs", -1, &st, nullptr), SQLITE_OK);
  EXPECT_EQ(sqlite3_step(st), SQLITE_ROW);
  const std::pair<int64_t, double> seen{sqlite3_column_int64(st, 0), sqlite3_column_double(st, 1)};
  sqlite3_finalize(st);
  sqlite3_close(db);
  return seen;
}

double first_losses(const std::vector<StrategyResult>& runs) {
  double sum = 0;
  for (const auto& r : runs) sum += r.loss.front();
  return sum;
}

// The store's VFS (wal_vfs.cpp) hands a transaction's log frames to the operating system as one
// write (in parts of under 128 KiB, the most SQLite's unix VFS writes at once), and before the
// commit is published: another connection sees every committed run at once. A transaction larger
// than SQLite's page cache (which then writes frames as it goes, and may rewrite one) and one
// rolled back after that leave a sound store holding exactly the committed runs.
TEST(Tools, StoreLogReachesTheDiskOnceAPartPerTransaction) {
  const auto dir = temp_dir("store_log");
  const std::string path = store_path(dir);
  std::optional<Store> opened(Store::create(path, {{"experiment", "log"}}));
  Store& store = *opened;
  store.set_meta("finetune_started_at", "now");  // the log exists, as in a study
  std::vector<StrategyResult> all;
  const auto insert = [&](const std::vector<StrategyResult>& runs) {
    const WalWrites before = wal_writes();
    store.insert(runs);
    all.insert(all.end(), runs.begin(), runs.end());
    const WalWrites after = wal_writes();
    // Every commit's frames went out with its commit frame: none waited until SQLite published
    // the commit (its barrier) or released its locks.
    EXPECT_EQ(after.at_barrier, before.at_barrier);
    EXPECT_EQ(after.at_unlock, before.at_unlock);
    const auto seen = seen_by_another_reader(path);
    EXPECT_EQ(seen.first, static_cast<int64_t>(all.size()));
    EXPECT_EQ(seen.second, first_losses(all));
    return std::make_pair(after.asked - before.asked, after.issued - before.issued);
  };
  // 16 runs, a few pages: two writes asked per frame, one issued.
  const auto small = insert(numbered_runs(0, 16));
  EXPECT_GE(small.first, 4u);
  EXPECT_EQ(small.second, 1u);
  // 3,000 runs, about 1 MB of frames: parts of under 128 KiB (written whole, they would fail:
  // the unix VFS masks a write's size with 0x1ffff).
  const auto mid = insert(numbered_runs(16, 3000));
  EXPECT_GE(mid.first, 300u);
  EXPECT_GE(mid.second, 6u);
  EXPECT_LE(mid.second, 12u);
  // 30,000 runs, about 10 MB: beyond the page cache and the VFS's 4 MiB buffer.
  const auto large = insert(numbered_runs(3016, 30000));
  EXPECT_GE(large.first, 3000u);
  EXPECT_LT(large.second, large.first / 20);
  // A transaction that writes pages it already wrote to the log (spilled by the first update,
  // changed again by the second): SQLite overwrites those frames in place and, at the commit,
  // rewrites the header of every frame from the first overwritten one, the commit frame's last
  // (no page follows that write). The commit frame's header must go out before the commit is published.
  {
    const WalWrites before = wal_writes();
    char* error = nullptr;
    // A cache of 50 pages: the first update spills, whatever SQLite's default cache size.
    ASSERT_EQ(sqlite3_exec(store.db(), "PRAGMA cache_size = 50", nullptr, nullptr, nullptr), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(store.db(),
                           "BEGIN; UPDATE runs SET final_loss = first_loss + 1; "
                           "UPDATE runs SET final_loss = first_loss + 2 WHERE run % 7 = 0; COMMIT;",
                           nullptr, nullptr, &error),
              SQLITE_OK)
        << (error != nullptr ? error : "");
    const WalWrites after = wal_writes();
    EXPECT_GE(after.alone, before.alone + 1);  // the rewritten commit header went out at once
    EXPECT_EQ(after.at_barrier, before.at_barrier);
    EXPECT_EQ(after.at_unlock, before.at_unlock);
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr), SQLITE_OK);
    sqlite3_stmt* st = nullptr;
    ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM runs WHERE final_loss = first_loss + (CASE WHEN run % 7 = 0 THEN 2 ELSE 1 END)",
                                 -1, &st, nullptr),
              SQLITE_OK);
    ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
    EXPECT_EQ(sqlite3_column_int64(st, 0), static_cast<int64_t>(all.size()));
    sqlite3_finalize(st);
    sqlite3_close(db);
  }
  // The same run twice at the end of 30,000 new ones: the insert fails after SQLite wrote frames,
  // the transaction rolls back, and the store holds what it held.
  auto twice = numbered_runs(40000, 30000);
  twice.push_back(twice.back());
  const WalWrites before_rollback = wal_writes();
  EXPECT_THROW(store.insert(twice), std::logic_error);
  EXPECT_GT(wal_writes().asked, before_rollback.asked + 1000);  // SQLite wrote frames before the failure
  // The last of them were still buffered: they went out as the write lock was released (as they
  // would have without the buffer, beyond the log's valid end).
  EXPECT_EQ(wal_writes().at_unlock, before_rollback.at_unlock + 1);
  const auto after_rollback = seen_by_another_reader(path);
  EXPECT_EQ(after_rollback.first, static_cast<int64_t>(all.size()));
  EXPECT_EQ(after_rollback.second, first_losses(all));
  insert(numbered_runs(33016, 16));
  opened.reset();  // closed: SQLite copies the log into the file
  Store back = Store::open(path, false);
  EXPECT_EQ(back.count(), all.size());
  const auto read = back.read_all();
  ASSERT_EQ(read.size(), all.size());
  for (size_t i = 0; i < all.size(); i += 997) EXPECT_EQ(read[i].val_loss, all[i].val_loss) << "run " << all[i].run;
  sqlite3_stmt* st = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(back.db(), "PRAGMA integrity_check", -1, &st, nullptr), SQLITE_OK);
  ASSERT_EQ(sqlite3_step(st), SQLITE_ROW);
  EXPECT_STREQ(reinterpret_cast<const char*>(sqlite3_column_text(st, 0)), "ok");
  sqlite3_finalize(st);
}

TEST(Tools, ANewStoreNeverTakesAnOldOnesLog) {
  // A store replaced while the old one's write-ahead log lies beside it (a kill at the wrong
  // moment): SQLite would replay that log into the new file. The log must be gone first.
  const auto c = parse_config(kStudy, "hand");
  const auto dir = temp_dir("stale_wal");
  const std::string path = dir + "/study.sqlite";
  {
    Store old = Store::create(path, {{"experiment", "old"}});
    old.insert(hand_runs(c));
  }
  write_file_atomic(path + "-wal", std::string(4096, '\x5a'));
  Store fresh = Store::create(path, {{"experiment", "new"}});
  EXPECT_EQ(fresh.count(), 0u);
  EXPECT_EQ(fresh.meta("experiment"), "new");
  fresh.seal();
  EXPECT_NE(::access((path + "-wal").c_str(), F_OK), 0) << "a sealed store still has a log beside it";
}

TEST(Tools, ForeignAndCorruptStoresAreRefusedByName) {
  const auto dir = temp_dir("foreign");
  const std::string garbage = dir + "/garbage.sqlite";
  write_file_atomic(garbage, std::string(8192, 'x'));
  try {
    Store::open(garbage, false);
    ADD_FAILURE() << "a file of garbage opened as a store";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find(garbage), std::string::npos) << e.what();
  }
  // A real SQLite database of another program.
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open((dir + "/other.sqlite").c_str(), &db), SQLITE_OK);
    ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE t(x); INSERT INTO t VALUES(1);", nullptr, nullptr, nullptr), SQLITE_OK);
    sqlite3_close(db);
  }
  try {
    Store::open(dir + "/other.sqlite", true);
    ADD_FAILURE() << "another program's database opened as a store";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("did not write"), std::string::npos) << e.what();
  }
  // A store whose pages were damaged after the header.
  const auto c = parse_config(kStudy, "hand");
  {
    Store s = Store::create(dir + "/damaged.sqlite", {{"experiment", "hand"}});
    s.insert(hand_runs(c));
  }
  std::string bytes = read_file(dir + "/damaged.sqlite");
  ASSERT_GT(bytes.size(), 8192u);
  for (size_t i = 4096 + 100; i < bytes.size(); i += 7) bytes[i] = static_cast<char>(0xA5);
  write_file_atomic(dir + "/damaged.sqlite", bytes);
  EXPECT_THROW(
      {
        Store s = Store::open(dir + "/damaged.sqlite", false);
        s.read_all();
      },
      InputError);
}

TEST(Tools, MalformedGoldenFilesAreNamedByTheirValue) {
  // Every structural mistake in a golden file is exit 2 naming the file and the value's place;
  // before, a golden whose top level was an array ended in an uncaught JSON type error (seen
  // while writing the fuzz_golden target), and a repeated value silently replaced the first.
  const auto c = parse_config(kStudy, "hand");
  const auto base = temp_dir("golden_shapes");
  write_study_dir(base + "/m", c, hand_runs(c));
  const std::string head = R"({"format": "bnlab.golden/1", "experiment": "hand", "values": [)";
  const std::string point = R"({"strategy":"train","grid":"","seed":0,"sample":0,"epoch":1,"metric":"loss","value":1})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[1, 2]", "not a bnlab golden file"},
      {R"({"format": "bnlab.golden/1", "values": {"a": 1}})", "values: expected an array"},
      {head + "3]}", "values[0]: expected an object"},
      {head + R"({"strategy":"train"}]})", "values[0]: missing \"grid\""},
      {head + R"({"strategy":"train","grid":"","seed":0.5,"sample":0,"epoch":1,"metric":"loss","value":1}]})",
       "values[0].seed: expected a whole number"},
      {head + R"({"strategy":"train","grid":"","seed":0,"sample":0,"epoch":1,"metric":"loss","value":"1"}]})",
       "values[0].value: expected a number"},
      {head + point + "," + point + "]}", "values[1]: a second value for train seed 0 sample 0 loss epoch 1"}};
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string file = base + "/g" + std::to_string(i) + ".json";
    write_file_atomic(file, cases[i].first);
    std::ostringstream out;
    try {
      check_golden(base + "/m", file, CheckOptions{}, out);
      ADD_FAILURE() << "accepted: " << cases[i].first;
    } catch (const InputError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(file), std::string::npos) << what;
      EXPECT_NE(what.find(cases[i].second), std::string::npos) << what;
    }
  }
}

TEST(Tools, GoldenCheckAndMergeOnHandMadeRunDirectories) {
  const auto c = parse_config(kStudy, "hand");
  auto runs = hand_runs(c);
  for (auto& r : runs) r.engine = "batched";
  const auto base = temp_dir("tools");
  std::ostringstream log;
  // Two shard directories holding the even and the odd runs, then merged.
  for (int shard = 0; shard < 2; ++shard) {
    std::vector<StrategyResult> part;
    for (const auto& r : runs)
      if (static_cast<int>(r.run % 2) == shard) part.push_back(r);
    write_study_dir(base + "/s" + std::to_string(shard), c, part);
  }
  merge_shards({base + "/s0", base + "/s1"}, base + "/m", false, false, log);
  const auto merged = Store::open(store_path(base + "/m"), false).read_all();
  ASSERT_EQ(merged.size(), runs.size());
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_EQ(merged[i].loss, runs[i].loss);
  write_golden(base + "/m", base + "/golden.json");
  std::ostringstream out;
  EXPECT_EQ(check_golden(base + "/m", base + "/golden.json", CheckOptions{}, out), 0u) << out.str();
  EXPECT_THROW(check_golden(base + "/nowhere", base + "/golden.json", CheckOptions{}, out), InputError);
  write_file_atomic(base + "/bad.json", "{\"format\": \"something else\"}");
  EXPECT_THROW(check_golden(base + "/m", base + "/bad.json", CheckOptions{}, out), InputError);
  EXPECT_THROW(merge_shards({base + "/s0"}, base + "/m2", false, false, log), InputError);  // runs missing
  EXPECT_NE(::access((base + "/m2/study.sqlite").c_str(), F_OK), 0) << "a refused merge left a store";
  // The same shard twice is a duplicate, not a merge.
  try {
    merge_shards({base + "/s0", base + "/s1", base + "/s0"}, base + "/m5", false, false, log);
    ADD_FAILURE() << "a shard merged twice";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("also in an earlier shard"), std::string::npos) << e.what();
  }
  // Shards pretrained by another engine or with other settings are refused, naming both key sets.
  std::vector<StrategyResult> odd;
  for (const auto& r : runs)
    if (r.run % 2 == 1) odd.push_back(r);
  write_study_dir(base + "/t1", c, odd, R"(["abc-torch"])");
  try {
    merge_shards({base + "/s0", base + "/t1"}, base + "/m4", false, false, log);
    ADD_FAILURE() << "shards with different cache keys were merged";
  } catch (const InputError& e) {
    EXPECT_NE(std::string(e.what()).find("abc-torch"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("another --engine"), std::string::npos) << e.what();
  }
  EXPECT_NE(::access((base + "/m4/summary.json").c_str(), F_OK), 0) << "a refused merge wrote results";
  // Shards of another experiment are refused too.
  const auto other = parse_config(R"({"name": "other", "seeds": [1, 2], "finetune": {"samples": [3, 4], "epochs": 2},
                                      "strategies": ["train", "frozen"]})", "other");
  write_study_dir(base + "/o1", other, odd);
  EXPECT_THROW(merge_shards({base + "/s0", base + "/o1"}, base + "/m6", false, false, log), InputError);
  // An output directory holding a database bnlab did not write is left alone, --force or not.
  ASSERT_EQ(::mkdir((base + "/m7").c_str(), 0755), 0);
  write_file_atomic(base + "/m7/study.sqlite", "not a database of ours");
  EXPECT_THROW(merge_shards({base + "/s0", base + "/s1"}, base + "/m7", true, false, log), InputError);
  EXPECT_EQ(read_file(base + "/m7/study.sqlite"), "not a database of ours");
}

TEST(Tools, SummariesCountDivergedRunsAndSkipExportsOfLargeStudies) {
  auto c = parse_config(kStudy, "hand", {"report.export_limit=4"});
  auto runs = hand_runs(c);
  runs[0].loss = {1, 50};  // +49 > 10 * max(1, 1): diverged
  compute_lag(runs[0]);
  for (auto& r : runs) r.engine = "batched", r.diverged = diverged(r, c.report.diverged_factor);
  const auto dir = temp_dir("large") + "/run";
  write_study_dir(dir, c, runs);  // 8 runs > export_limit 4
  EXPECT_NE(::access((dir + "/curves.csv").c_str(), F_OK), 0);
  EXPECT_NE(::access((dir + "/metrics.jsonl").c_str(), F_OK), 0);
  const auto summary = nlohmann::json::parse(read_file(dir + "/summary.json"));
  EXPECT_FALSE(summary.contains("runs"));
  ASSERT_EQ(summary["aggregates"].size(), 2u);
  EXPECT_EQ(summary["aggregates"][0]["diverged"].get<int>(), 1);
  EXPECT_EQ(summary["aggregates"][0]["final_gap"]["n"].get<int>(), 4) << "a diverged run is excluded from nothing";
  // train's final gaps: run 0 50 - 2 = 48, runs 1-3 -1: median -1, p25 -1, p75 (-1 + 0.25 * 49) by numpy's interpolation.
  EXPECT_DOUBLE_EQ(summary["aggregates"][0]["final_gap"]["median"].get<double>(), -1.0);
  EXPECT_DOUBLE_EQ(summary["aggregates"][0]["final_gap"]["p75"].get<double>(), -1.0 + 0.25 * 49.0);
  EXPECT_NE(read_file(dir + "/summary.md").find("| 4 | 1 | 0 |"), std::string::npos) << read_file(dir + "/summary.md");
  // Asked for, the exports are written whatever the size.
  auto wanted = parse_config(kStudy, "hand", {"report.export_limit=4", R"(report.export=["curves"])"});
  const auto dir2 = temp_dir("large2") + "/run";
  write_study_dir(dir2, wanted, runs);
  EXPECT_EQ(::access((dir2 + "/curves.csv").c_str(), F_OK), 0);
  EXPECT_NE(::access((dir2 + "/metrics.jsonl").c_str(), F_OK), 0);
  EXPECT_THROW(parse_config(kStudy, "hand", {R"(report.export=["curve"])"}), InputError);
  // An export bnlab wrote and no longer writes is removed; a user's file of that name stays.
  {
    Store store = Store::open(store_path(dir2), true);
    std::ostringstream log;
    write_reports(dir2, parse_config(kStudy, "hand", {R"(report.export=[])"}), store, false, log, runs.size());
  }
  EXPECT_NE(::access((dir2 + "/curves.csv").c_str(), F_OK), 0) << "bnlab's stale curves.csv was kept";
  write_file_atomic(dir + "/metrics.jsonl", "the user's own notes\n");
  {
    Store store = Store::open(store_path(dir), true);
    std::ostringstream log;
    write_reports(dir, c, store, false, log, runs.size());
  }
  EXPECT_EQ(read_file(dir + "/metrics.jsonl"), "the user's own notes\n");
}

TEST(Tools, MergeClassifiesEveryShardUnderOneRule) {
  const auto c = parse_config(kStudy, "hand", {"report.diverged_factor=1"});
  auto runs = hand_runs(c);  // each run's loss rises by 1 from base: diverged under a factor below 1 / max(1, base)
  const auto base = temp_dir("merge_rule");
  for (int shard = 0; shard < 2; ++shard) {
    const auto sc = parse_config(kStudy, "hand", {shard == 0 ? "report.diverged_factor=1e-3" : "report.diverged_factor=1"});
    std::vector<StrategyResult> part;
    for (auto r : runs)
      if (static_cast<int>(r.run % 2) == shard) r.engine = "batched", r.diverged = diverged(r, sc.report.diverged_factor), part.push_back(r);
    write_study_dir(base + "/s" + std::to_string(shard), sc, part);
  }
  std::ostringstream log;
  merge_shards({base + "/s0", base + "/s1"}, base + "/m", false, false, log);
  size_t expected = 0;
  for (const auto& r : runs) expected += diverged(r, 1e-3) ? 1 : 0;  // the first shard's config rules the merge
  ASSERT_GT(expected, 0u);
  EXPECT_EQ(Store::open(store_path(base + "/m"), false).status_counts().diverged, expected);
}

TEST(Tools, AtomicWriteLeavesNoTemporary) {
  const auto dir = temp_dir("atomic");
  write_file_atomic(dir + "/a.txt", "hello");
  EXPECT_EQ(read_file(dir + "/a.txt"), "hello");
  // A temporary of a file bnlab writes, left by a killed process, is removed; one of another
  // name is not bnlab's to remove (RunDir.TheLedgerGuardsEveryWriteAndRemoval).
  write_file_atomic(temp_name(dir + "/summary.md"), "left by a killed process");
  write_file_atomic(temp_name(dir + "/b.txt"), "not bnlab's");
  remove_stale_temps(dir);
  EXPECT_NE(::access(temp_name(dir + "/summary.md").c_str(), F_OK), 0);
  EXPECT_EQ(::access(temp_name(dir + "/b.txt").c_str(), F_OK), 0);
  EXPECT_EQ(::access((dir + "/a.txt").c_str(), F_OK), 0);
  EXPECT_THROW(write_file_atomic(dir + "/no/such/dir/c.txt", "x"), std::runtime_error);
}

}  // namespace
