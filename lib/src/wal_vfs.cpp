// The study store's VFS (wal_vfs.hpp). SQLite writes each frame of a write-ahead log as two
// writes, its 24-byte header and then the page; on this VM a write system call costs about 3.5 us,
// so a transaction of 64 runs (about ten frames) spent 70 us in them, a third of the writer's time
// at that size. Here a log's writes that follow one another in the file are kept in memory and
// reach the operating system as one write when the transaction's commit frame is complete, before
// SQLite publishes the frames in the wal-index: readers, a crash and a kill see what they would
// see without it (the frames of a transaction SQLite reports committed are in the file; any
// others are beyond the log's valid end, as SQLite's own partial writes would be).
//
// Buffered bytes also go out before anything that reads, syncs, sizes, truncates or closes the
// log, before a write elsewhere in it, beyond kMaxBuffered, at the wal-index barrier SQLite
// publishes a commit with (a safety net), and when this thread releases a wal-index lock (a
// transaction rolled back after spilling frames: they go out while its connection still holds
// the write lock, as they would have without the buffer). The commit frame is recognised by
// synchronous=NORMAL's writes (the store's): a header, then its page. (With FULL on a device
// without powersafe overwrite, SQLite pads to a sector with copies of the commit frame and splits
// the last at the sync point; the part after its sync waits for the barrier.)
#include "wal_vfs.hpp"

#include <sqlite3.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

namespace bnlab {
namespace {

std::atomic<uint64_t> g_asked{0}, g_issued{0}, g_at_unlock{0}, g_at_barrier{0}, g_alone{0};
sqlite3_vfs* g_default = nullptr;
sqlite3_vfs g_vfs;

/// A transaction larger than this (SQLite spilling pages from its cache as it goes) writes in
/// parts of this size.
constexpr sqlite3_int64 kMaxBuffered = sqlite3_int64{4} << 20;

struct File {
  sqlite3_file base;   // pMethods: kMethods (this struct is the sqlite3_file SQLite holds)
  sqlite3_file* real;  // the default VFS's file, in the same allocation after this struct
  bool log;            // a write-ahead log: its writes are buffered
  // A log's bytes not yet written, from file offset `at`, buffered by the thread `writer` stands
  // for (the address of its t_token).
  char* data;
  sqlite3_int64 len, cap, at;
  const void* writer;
  // Where the page of the last commit frame header written goes (-1: none): that write
  // completes the commit.
  sqlite3_int64 commit_page_at;
  // Set once a flush failed: frames SQLite counts as written are lost, so no later write, sync or
  // truncate of this log may succeed (the transaction cannot commit; the store is reopened).
  int failed;
};

// The logs with bytes buffered, for a thread to find its own at a wal-index barrier or unlock
// (called on the database's file, not the log's).
std::mutex g_pending_mu;
std::vector<File*> g_pending;
thread_local char t_token;

File* as_file(sqlite3_file* f) { return reinterpret_cast<File*>(f); }
/// The default VFS's file under `f`.
sqlite3_file* real(sqlite3_file* f) { return as_file(f)->real; }
const sqlite3_io_methods& forward(sqlite3_file* f) { return *real(f)->pMethods; }

/// The most one write hands the default VFS: SQLite's unix VFS writes at most 128 KiB - 1 bytes
/// per call (it masks the size with 0x1ffff).
constexpr sqlite3_int64 kMaxWrite = (sqlite3_int64{1} << 17) - 4096;

/// Writes the buffered bytes. If that fails they are lost, and the log fails from then on (see
/// File::failed): whichever call made the flush, read or write, the transaction cannot commit.
int flush(File* f) {
  const sqlite3_int64 n = f->len;
  if (n > 0) {
    f->len = 0;
    std::lock_guard<std::mutex> lock(g_pending_mu);
    const auto it = std::find(g_pending.begin(), g_pending.end(), f);
    if (it != g_pending.end()) g_pending.erase(it);
  }
  if (f->failed != SQLITE_OK) return f->failed;
  for (sqlite3_int64 done = 0; done < n; done += kMaxWrite) {
    g_issued.fetch_add(1, std::memory_order_relaxed);
    const int part = static_cast<int>(std::min(kMaxWrite, n - done));
    if (const int rc = f->real->pMethods->xWrite(f->real, f->data + done, part, f->at + done); rc != SQLITE_OK) {
      f->failed = rc;
      return rc;
    }
  }
  return SQLITE_OK;
}

/// Flushes the logs this thread has bytes buffered in; returns how many. At a wal-index barrier
/// (SQLite is about to publish frames) and unlock (a transaction rolled back after writing frames)
/// there is no error to return: a failure makes the log fail from then on (flush).
size_t flush_mine() {
  std::vector<File*> mine;
  {
    std::lock_guard<std::mutex> lock(g_pending_mu);
    for (File* f : g_pending)
      if (f->writer == &t_token) mine.push_back(f);
  }
  for (File* f : mine) flush(f);
  return mine.size();
}
/// Flushes what `f` has buffered, if anything, before a call that reads the file.
int flush_buffered(File* f) { return f->len > 0 ? flush(f) : SQLITE_OK; }

uint32_t big_endian32(const void* p) {
  unsigned char b[4];
  std::memcpy(b, p, 4);
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
}

int x_close(sqlite3_file* pf) {
  File* f = as_file(pf);
  const int rc = flush(f);
  const int rc_close = f->real->pMethods->xClose(f->real);
  sqlite3_free(f->data);
  f->data = nullptr;
  f->cap = 0;
  return rc != SQLITE_OK ? rc : rc_close;
}
int x_read(sqlite3_file* pf, void* buf, int amt, sqlite3_int64 off) {
  if (const int rc = flush_buffered(as_file(pf)); rc != SQLITE_OK) return rc;
  return forward(pf).xRead(real(pf), buf, amt, off);
}
int x_write(sqlite3_file* pf, const void* buf, int amt, sqlite3_int64 off) {
  File* f = as_file(pf);
  if (!f->log) return f->real->pMethods->xWrite(f->real, buf, amt, off);
  if (f->failed != SQLITE_OK) return f->failed;
  g_asked.fetch_add(1, std::memory_order_relaxed);
  if (f->len > 0 && off != f->at + f->len)
    if (const int rc = flush(f); rc != SQLITE_OK) return rc;
  // A frame header is the only 24-byte write to a log; bytes 4-7 are the database's size in pages
  // after a commit, in a commit frame, and 0 in any other. The write of that frame's page
  // completes the commit. A commit header that follows no buffered frame goes out at once: it may
  // be a rewrite (SQLite rewrites the headers of a transaction that overwrote one of its own
  // frames, the commit frame's last, with no page after it) or a one-frame transaction.
  const bool commit_header = amt == 24 && big_endian32(static_cast<const char*>(buf) + 4) != 0;
  const bool completes_commit = f->commit_page_at >= 0 && off == f->commit_page_at;
  f->commit_page_at = commit_header ? off + amt : -1;
  const bool now = completes_commit || (commit_header && f->len == 0);
  if (commit_header && f->len == 0) g_alone.fetch_add(1, std::memory_order_relaxed);
  if (f->len + amt > f->cap) {
    const sqlite3_int64 cap = std::max<sqlite3_int64>(2 * f->cap, std::max<sqlite3_int64>(f->len + amt, 64 << 10));
    void* grown = sqlite3_realloc64(f->data, static_cast<sqlite3_uint64>(cap));
    if (grown == nullptr) {  // write through
      if (const int rc = flush(f); rc != SQLITE_OK) return rc;
      g_issued.fetch_add(1, std::memory_order_relaxed);
      return f->real->pMethods->xWrite(f->real, buf, amt, off);
    }
    f->data = static_cast<char*>(grown);
    f->cap = cap;
  }
  if (f->len == 0) {
    f->at = off;
    f->writer = &t_token;
    std::lock_guard<std::mutex> lock(g_pending_mu);
    try {
      g_pending.push_back(f);
    } catch (const std::bad_alloc&) {  // not listed, not buffered: written through
      g_issued.fetch_add(1, std::memory_order_relaxed);
      return f->real->pMethods->xWrite(f->real, buf, amt, off);
    }
  }
  std::memcpy(f->data + f->len, buf, static_cast<size_t>(amt));
  f->len += amt;
  if (now || f->len >= kMaxBuffered) return flush(f);
  return SQLITE_OK;
}
int x_truncate(sqlite3_file* pf, sqlite3_int64 size) {
  File* f = as_file(pf);
  if (const int rc = flush(f); rc != SQLITE_OK) return rc;  // also once the log failed
  return f->real->pMethods->xTruncate(f->real, size);
}
int x_sync(sqlite3_file* pf, int flags) {
  File* f = as_file(pf);
  if (const int rc = flush(f); rc != SQLITE_OK) return rc;
  return f->real->pMethods->xSync(f->real, flags);
}
int x_file_size(sqlite3_file* pf, sqlite3_int64* size) {
  if (const int rc = flush_buffered(as_file(pf)); rc != SQLITE_OK) return rc;
  return forward(pf).xFileSize(real(pf), size);
}
int x_lock(sqlite3_file* pf, int lock) { return forward(pf).xLock(real(pf), lock); }
int x_unlock(sqlite3_file* pf, int lock) { return forward(pf).xUnlock(real(pf), lock); }
int x_check_reserved_lock(sqlite3_file* pf, int* out) { return forward(pf).xCheckReservedLock(real(pf), out); }
int x_file_control(sqlite3_file* pf, int op, void* arg) {
  // No flush: SQLite ignores what some of these return (a size hint), and a sync flushes.
  return forward(pf).xFileControl(real(pf), op, arg);
}
int x_sector_size(sqlite3_file* pf) { return forward(pf).xSectorSize(real(pf)); }
int x_device_characteristics(sqlite3_file* pf) { return forward(pf).xDeviceCharacteristics(real(pf)); }
int x_shm_map(sqlite3_file* pf, int region, int size, int extend, void volatile** out) {
  return forward(pf).xShmMap(real(pf), region, size, extend, out);
}
int x_shm_lock(sqlite3_file* pf, int offset, int n, int flags) {
  // Called on the database's file: this thread's logs with bytes waiting (see the top).
  if ((flags & SQLITE_SHM_UNLOCK) != 0 && flush_mine() > 0) g_at_unlock.fetch_add(1, std::memory_order_relaxed);
  return forward(pf).xShmLock(real(pf), offset, n, flags);
}
void x_shm_barrier(sqlite3_file* pf) {
  // SQLite publishes a commit in the wal-index header's two copies with a barrier between them.
  // Every commit's frames have gone out with its commit frame by then; this is a safety net.
  if (flush_mine() > 0) g_at_barrier.fetch_add(1, std::memory_order_relaxed);
  forward(pf).xShmBarrier(real(pf));
}
int x_shm_unmap(sqlite3_file* pf, int del) { return forward(pf).xShmUnmap(real(pf), del); }
int x_fetch(sqlite3_file* pf, sqlite3_int64 off, int amt, void** out) {
  if (const int rc = flush_buffered(as_file(pf)); rc != SQLITE_OK) return rc;
  return forward(pf).xFetch(real(pf), off, amt, out);
}
int x_unfetch(sqlite3_file* pf, sqlite3_int64 off, void* p) { return forward(pf).xUnfetch(real(pf), off, p); }

const sqlite3_io_methods kMethods = {3,
                                     x_close,
                                     x_read,
                                     x_write,
                                     x_truncate,
                                     x_sync,
                                     x_file_size,
                                     x_lock,
                                     x_unlock,
                                     x_check_reserved_lock,
                                     x_file_control,
                                     x_sector_size,
                                     x_device_characteristics,
                                     x_shm_map,
                                     x_shm_lock,
                                     x_shm_barrier,
                                     x_shm_unmap,
                                     x_fetch,
                                     x_unfetch};

constexpr int kRealAt = static_cast<int>((sizeof(File) + 15) / 16 * 16);

int x_open(sqlite3_vfs*, const char* name, sqlite3_file* pf, int flags, int* out_flags) {
  File* f = as_file(pf);
  std::memset(f, 0, sizeof(File));
  f->commit_page_at = -1;
  f->real = reinterpret_cast<sqlite3_file*>(reinterpret_cast<char*>(pf) + kRealAt);
  const int rc = g_default->xOpen(g_default, name, f->real, flags, out_flags);
  if (rc != SQLITE_OK) {
    if (f->real->pMethods != nullptr) f->real->pMethods->xClose(f->real);
    return rc;  // pMethods stays null: SQLite does not close it
  }
  if (f->real->pMethods->iVersion < 3) {  // every method above forwards a version-3 one
    f->real->pMethods->xClose(f->real);
    return SQLITE_CANTOPEN;
  }
  f->log = (flags & SQLITE_OPEN_WAL) != 0;
  f->base.pMethods = &kMethods;
  return SQLITE_OK;
}
int x_delete(sqlite3_vfs*, const char* name, int sync_dir) { return g_default->xDelete(g_default, name, sync_dir); }
int x_access(sqlite3_vfs*, const char* name, int flags, int* out) { return g_default->xAccess(g_default, name, flags, out); }
int x_full_pathname(sqlite3_vfs*, const char* name, int n, char* out) {
  return g_default->xFullPathname(g_default, name, n, out);
}
void* x_dl_open(sqlite3_vfs*, const char* name) { return g_default->xDlOpen(g_default, name); }
void x_dl_error(sqlite3_vfs*, int n, char* msg) { g_default->xDlError(g_default, n, msg); }
void (*x_dl_sym(sqlite3_vfs*, void* lib, const char* sym))(void) { return g_default->xDlSym(g_default, lib, sym); }
void x_dl_close(sqlite3_vfs*, void* lib) { g_default->xDlClose(g_default, lib); }
int x_randomness(sqlite3_vfs*, int n, char* out) { return g_default->xRandomness(g_default, n, out); }
int x_sleep(sqlite3_vfs*, int us) { return g_default->xSleep(g_default, us); }
int x_current_time(sqlite3_vfs*, double* out) { return g_default->xCurrentTime(g_default, out); }
int x_get_last_error(sqlite3_vfs*, int n, char* out) { return g_default->xGetLastError(g_default, n, out); }
int x_current_time_int64(sqlite3_vfs*, sqlite3_int64* out) { return g_default->xCurrentTimeInt64(g_default, out); }
int x_set_system_call(sqlite3_vfs*, const char* name, sqlite3_syscall_ptr p) {
  return g_default->xSetSystemCall(g_default, name, p);
}
sqlite3_syscall_ptr x_get_system_call(sqlite3_vfs*, const char* name) { return g_default->xGetSystemCall(g_default, name); }
const char* x_next_system_call(sqlite3_vfs*, const char* name) { return g_default->xNextSystemCall(g_default, name); }

}  // namespace

const char* store_vfs() {
  static std::once_flag once;
  std::call_once(once, [] {
    g_default = sqlite3_vfs_find(nullptr);
    if (g_default == nullptr || g_default->iVersion < 3) return;  // then SQLite's default is used as it is
    g_vfs = sqlite3_vfs{3,
                        kRealAt + g_default->szOsFile,
                        g_default->mxPathname,
                        nullptr,
                        "bnlab-wal",
                        nullptr,
                        x_open,
                        x_delete,
                        x_access,
                        x_full_pathname,
                        x_dl_open,
                        x_dl_error,
                        x_dl_sym,
                        x_dl_close,
                        x_randomness,
                        x_sleep,
                        x_current_time,
                        x_get_last_error,
                        x_current_time_int64,
                        x_set_system_call,
                        x_get_system_call,
                        x_next_system_call};
    if (sqlite3_vfs_register(&g_vfs, 0) != SQLITE_OK) g_vfs.zName = nullptr;
  });
  return g_vfs.zName;  // nullptr (SQLite's default VFS) if it could not be registered
}

WalWrites wal_writes() {
  return {g_asked.load(), g_issued.load(), g_at_unlock.load(), g_at_barrier.load(), g_alone.load()};
}

}  // namespace bnlab
