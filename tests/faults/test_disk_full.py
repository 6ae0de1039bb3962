#!/usr/bin/python3
"""A full disk and I/O errors at every write point of a run (issue 15).

tests/faults/failwrite.c (built here with cc, loaded with LD_PRELOAD) makes the k-th write of
the bnlab process into the run directory fail with ENOSPC or EIO, and every write after it
(a full disk stays full). For each k this checks:
  - bnlab exits 1, and its message names a file of the run directory and the error, with no
    stack trace;
  - every file the run directory holds is complete: byte-identical to the same file of an
    uninterrupted run (every output but the manifest, progress, store and ledger is
    deterministic), or, for the store, passes SQLite's integrity check; no temporary is left;
  - the same command rerun with space back finishes with exit 0, and its store rows and every
    deterministic output equal the uninterrupted run's.
It first counts the write points of an uninterrupted run (the number it prints), then sweeps k.
Usage: test_disk_full.py BNLAB SOURCE_DIR [--stride N] (default: every write point)
"""
import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("bin")
ap.add_argument("src")
ap.add_argument("--stride", type=int, default=1, help="test every N-th write point (both errors, offset from each other)")
args = ap.parse_args()
CONFIG = os.path.join(args.src, "configs/smoke/keras_nll.json")
VOLATILE = {"manifest.json", "progress.json", "study.sqlite", "study.sqlite-wal", "study.sqlite-shm", "study.sqlite-journal",
            ".bnlab-files", ".bnlab.lock"}
# The error as the message gives it: the operating system's text, or SQLite's for the store
# (which reports a failed write as "disk I/O error" or "database or disk is full" for either).
ERRORS = {"ENOSPC": ("No space left on device", "study.sqlite"), "EIO": ("Input/output error", "study.sqlite")}
SQLITE_TEXTS = ("disk I/O error", "database or disk is full")

tmp = tempfile.mkdtemp(prefix="bnlab_diskfull_")
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def run(out, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([args.bin, "run", CONFIG, "--out", out, "--verbose", "0"], capture_output=True, text=True, env=env)


def rows(d):
    con = sqlite3.connect(f"file:{d}/study.sqlite?mode=ro", uri=True)
    try:
        return (con.execute("SELECT * FROM runs ORDER BY run").fetchall(), con.execute("SELECT * FROM epochs ORDER BY run").fetchall())
    finally:
        con.close()


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


try:
    shim = os.path.join(tmp, "failwrite.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", shim, os.path.join(args.src, "tests/faults/failwrite.c"), "-ldl"], check=True)

    os.makedirs(tmp + "/count")
    p = run(tmp + "/count/r", {"LD_PRELOAD": shim, "BNLAB_FAIL_DIR": tmp + "/count", "BNLAB_FAIL_COUNT": tmp + "/count.txt"})
    if p.returncode != 0:
        sys.exit(f"the counting run failed: {p.stderr}")
    points = int(open(tmp + "/count.txt").read())
    base = os.path.join(tmp, "base")
    p = run(base)
    if p.returncode != 0:
        sys.exit(f"the uninterrupted run failed: {p.stderr}")
    base_rows = rows(base)
    want = {n: open(os.path.join(base, n), "rb").read() for n in files(base) if n not in VOLATILE}
    print(f"an uninterrupted run makes {points} write points in its run directory")

    tested = 0
    for errname, (text, sqlite_text) in ERRORS.items():
        first = 1 if errname == "ENOSPC" else 1 + args.stride // 2
        for k in range(first, points + 1, args.stride):
            case = f"{errname} at write {k}/{points}"
            root = os.path.join(tmp, f"{errname}_{k}")
            os.makedirs(root)
            out = os.path.join(root, "r")
            p = run(out, {"LD_PRELOAD": shim, "BNLAB_FAIL_DIR": root, "BNLAB_FAIL_AT": str(k), "BNLAB_FAIL_ERRNO": errname})
            tested += 1
            err = p.stderr.strip()
            if p.returncode != 1:
                fail(f"{case}: exit {p.returncode}, want 1: {err[-300:]}")
            store_error = sqlite_text in err and any(t in err for t in SQLITE_TEXTS)
            if (text not in err and not store_error) or out not in err:
                fail(f"{case}: the message names no file of the run directory or not the error: {err[-300:]}")
            if "terminate called" in err or "Exception raised from" in err:
                fail(f"{case}: a stack trace: {err[-300:]}")
            for n in files(out):
                path = os.path.join(out, n)
                if re.match(r"^\..*\.tmp\.\d+", n):
                    fail(f"{case}: a temporary was left behind: {n}")
                elif n in want and open(path, "rb").read() != want[n]:
                    fail(f"{case}: {n} is not the complete file")
                elif n == "study.sqlite":
                    # A transaction cut short leaves a hot journal (or log) beside the store, which
                    # SQLite rolls back on the next writable open: check a copy, as bnlab will see it.
                    scratch = os.path.join(tmp, "scratch")
                    shutil.rmtree(scratch, ignore_errors=True)
                    os.makedirs(scratch)
                    for suffix in ("", "-journal", "-wal", "-shm"):
                        if os.path.exists(path + suffix):
                            shutil.copy(path + suffix, os.path.join(scratch, "study.sqlite" + suffix))
                    try:
                        con = sqlite3.connect(os.path.join(scratch, "study.sqlite"))
                        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
                        con.close()
                        if ok != "ok":
                            fail(f"{case}: study.sqlite: integrity_check says {ok}")
                    except sqlite3.Error as e:
                        fail(f"{case}: study.sqlite does not open: {e}")
                elif n not in want and n not in VOLATILE:
                    fail(f"{case}: {n} is not a file an uninterrupted run leaves")
            # Space is back: the same command finishes, identical to the uninterrupted run.
            p = run(out)
            if p.returncode != 0:
                fail(f"{case}: the rerun failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
                continue
            if rows(out) != base_rows:
                fail(f"{case}: the rerun's store differs from the uninterrupted run's")
            for n, data in want.items():
                path = os.path.join(out, n)
                if not os.path.exists(path) or open(path, "rb").read() != data:
                    fail(f"{case}: after the rerun, {n} differs from the uninterrupted run's")
            shutil.rmtree(root)
    print(f"{tested} failure points tested (ENOSPC and EIO, every {args.stride}. of {points} write points), {len(failures)} failures")
    sys.exit(1 if failures else 0)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
