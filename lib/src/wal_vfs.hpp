// The study store's SQLite VFS: the platform's default one, except that a write-ahead log's
// frames reach the operating system as one write per transaction instead of two per page (the
// frame's 24-byte header, then the page). No torch.
#pragma once

#include <cstdint>

namespace bnlab {

/// The name to open a database with (sqlite3_open_v2's zVfs); registered on the first call, not
/// as the default VFS.
const char* store_vfs();

/// Write-ahead-log writes through store_vfs() since the process started: those SQLite made, those
/// that reached the operating system, and the times bytes were still waiting when a wal-index lock
/// was released (only a transaction rolled back after SQLite wrote frames leaves any) or when
/// SQLite was publishing a commit (none should: a commit's frames go out with its commit frame).
/// `alone`: commit frame headers written on their own, at once (a rewrite, a one-frame
/// transaction). For tests and benchmarks.
struct WalWrites {
  uint64_t asked = 0, issued = 0, at_unlock = 0, at_barrier = 0, alone = 0;
};
WalWrites wal_writes();

}  // namespace bnlab
