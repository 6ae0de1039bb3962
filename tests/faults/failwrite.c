/* An LD_PRELOAD shim that makes the k-th write of a bnlab process into one folder fail, for
 * tests/faults/test_disk_full.py. Counted as write points: fwrite, write, pwrite/pwrite64 and
 * fsync/fdatasync on a file under BNLAB_FAIL_DIR (stdio's own flushes go through fwrite's
 * return or fflush, so fflush is counted too). Environment:
 *   BNLAB_FAIL_DIR    the folder (absolute path) whose files are counted
 *   BNLAB_FAIL_AT     k: the k-th write point fails, and every later one (a full disk stays
 *                     full); 0 or unset: nothing fails (counting only)
 *   BNLAB_FAIL_ERRNO  the errno to fail with (default ENOSPC)
 *   BNLAB_FAIL_COUNT  a file that receives the number of write points seen, at exit
 * Only the bnlab executable counts (gnuplot, a child, inherits the environment but not the
 * counting). Written for this project. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static const char* fail_dir;
static size_t fail_dir_len;
static long fail_at;
static int fail_errno = ENOSPC;
static int active;
static long counter; /* updated with __atomic builtins: bnlab writes from several threads */

static void report(void) {
  const char* out = getenv("BNLAB_FAIL_COUNT");
  if (!active || out == NULL) return;
  FILE* f = fopen(out, "w");
  if (f == NULL) return;
  fprintf(f, "%ld\n", __atomic_load_n(&counter, __ATOMIC_SEQ_CST));
  fclose(f);
}

__attribute__((constructor)) static void init(void) {
  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return;
  exe[n] = '\0';
  const char* base = strrchr(exe, '/');
  if (strcmp(base ? base + 1 : exe, "bnlab") != 0) return;
  fail_dir = getenv("BNLAB_FAIL_DIR");
  if (fail_dir == NULL || fail_dir[0] != '/') return;
  fail_dir_len = strlen(fail_dir);
  const char* at = getenv("BNLAB_FAIL_AT");
  fail_at = at ? atol(at) : 0;
  const char* e = getenv("BNLAB_FAIL_ERRNO");
  if (e != NULL && strcmp(e, "EIO") == 0) fail_errno = EIO;
  active = 1;
  atexit(report);
}

/* Whether fd is a file under the folder. */
static int counted(int fd) {
  if (!active || fd < 0) return 0;
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  const ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return 0;
  path[n] = '\0';
  return strncmp(path, fail_dir, fail_dir_len) == 0 && path[fail_dir_len] == '/';
}

/* Counts one write point on fd; nonzero when it must fail. */
static int fails(int fd) {
  if (!counted(fd)) return 0;
  const long k = __atomic_add_fetch(&counter, 1, __ATOMIC_SEQ_CST);
  return fail_at > 0 && k >= fail_at;
}

#define REAL(ret, name, ...)                        \
  static ret (*real)(__VA_ARGS__);                  \
  if (real == NULL) real = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, name)

ssize_t write(int fd, const void* buf, size_t len) {
  REAL(ssize_t, "write", int, const void*, size_t);
  if (fails(fd)) { errno = fail_errno; return -1; }
  return real(fd, buf, len);
}
ssize_t pwrite(int fd, const void* buf, size_t len, off_t off) {
  REAL(ssize_t, "pwrite", int, const void*, size_t, off_t);
  if (fails(fd)) { errno = fail_errno; return -1; }
  return real(fd, buf, len, off);
}
ssize_t pwrite64(int fd, const void* buf, size_t len, off_t off) {
  REAL(ssize_t, "pwrite64", int, const void*, size_t, off_t);
  if (fails(fd)) { errno = fail_errno; return -1; }
  return real(fd, buf, len, off);
}
int fsync(int fd) {
  REAL(int, "fsync", int);
  if (fails(fd)) { errno = fail_errno; return -1; }
  return real(fd);
}
int fdatasync(int fd) {
  REAL(int, "fdatasync", int);
  if (fails(fd)) { errno = fail_errno; return -1; }
  return real(fd);
}
size_t fwrite(const void* buf, size_t size, size_t n, FILE* f) {
  REAL(size_t, "fwrite", const void*, size_t, size_t, FILE*);
  if (f != NULL && fails(fileno(f))) { errno = fail_errno; return 0; }
  return real(buf, size, n, f);
}
int fflush(FILE* f) {
  REAL(int, "fflush", FILE*);
  if (f != NULL && fails(fileno(f))) { errno = fail_errno; return EOF; }
  return real(f);
}
