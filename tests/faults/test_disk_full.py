#!/usr/bin/python3
"""A full disk and I/O errors at every write point of each command that writes (issue 15).

tests/faults/failwrite.c (built here with cc, loaded with LD_PRELOAD) makes the k-th write of
the bnlab process into one folder fail with ENOSPC or EIO, and every write after it (a full disk
stays full). The commands, each writing into that folder:
  run       a study's run directory (configs/smoke/keras_nll.json)
  explain   explain's run directory
  golden    golden -o FILE
  check     check --junit FILE
  export    export -o FILE, as Keras HDF5, a PyTorch state dict and TorchScript
  merge     merge -o DIR of two shards
For each command it first counts the write points of an uninterrupted call (the number it
prints), then, for each k, checks:
  - bnlab exits 1, and its message names a file in the folder and the error, with no stack trace;
  - every file the folder holds is complete: equal to the same file of an uninterrupted call
    (byte for byte; an HDF5 file by its content, as h5py reads it) unless it is one that differs
    between calls anyway (manifest, progress, store, ledger), and a store passes SQLite's
    integrity check; no temporary is left;
  - the same command rerun with space back exits 0 and leaves every file equal to the
    uninterrupted call's (the store by its rows).
Usage: test_disk_full.py BNLAB SOURCE_DIR [--stride N] [--points N] [--commands run,explain,...]
(default: every write point of every command)
"""
import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import h5py
import numpy as np

from store_copy import copy_store

COMMANDS = ("run", "explain", "golden", "check", "export", "merge")
ap = argparse.ArgumentParser()
ap.add_argument("bin")
ap.add_argument("src")
ap.add_argument("--stride", type=int, default=1, help="test every N-th write point (both errors, offset from each other)")
ap.add_argument("--points", type=int, default=0,
                help="at most about N write points per command and error: the stride grows for commands with more (0: no limit)")
ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
args = ap.parse_args()
CONFIG = os.path.join(args.src, "configs/smoke/keras_nll.json")
# Files that differ between two uninterrupted calls (times, pids, SQLite's page layout;
# report.html shows the manifest's times).
VOLATILE = {"manifest.json", "report.html", "progress.json", "study.sqlite", "study.sqlite-wal", "study.sqlite-shm", "study.sqlite-journal",
            ".bnlab-files", ".bnlab.lock"}
# The error as the message gives it: the operating system's text, or SQLite's for the store
# (which reports a failed write as "disk I/O error" or "database or disk is full" for either).
ERRORS = {"ENOSPC": "No space left on device", "EIO": "Input/output error"}
SQLITE_TEXTS = ("disk I/O error", "database or disk is full")

tmp = tempfile.mkdtemp(prefix="bnlab_diskfull_")
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def bnlab(argv, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([args.bin] + argv, capture_output=True, text=True, env=env)


def must(argv):
    p = bnlab(argv)
    if p.returncode != 0:
        sys.exit(f"bnlab {' '.join(argv)} failed: {p.stderr}")


def rows(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (con.execute("SELECT * FROM runs ORDER BY run").fetchall(), con.execute("SELECT * FROM epochs ORDER BY run").fetchall())
    finally:
        con.close()


def h5_content(path):
    """Every attribute and dataset of an HDF5 file, by name (HDF5's bytes hold object times)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            for k, v in obj.attrs.items():
                out[f"{name}@{k}"] = v.tolist() if isinstance(v, np.ndarray) else v
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()].tolist()
        visit("/", f)
        f.visititems(visit)
    return out


def content(path):
    """What must be equal between two complete calls: the bytes, or for HDF5 what h5py reads."""
    if path.endswith(".h5"):
        try:
            return h5_content(path)
        except OSError as e:
            return f"unreadable HDF5: {e}"
    with open(path, "rb") as f:
        return f.read()


def walk(root):
    """Every file under root, as paths relative to it."""
    found = []
    for d, _, names in os.walk(root):
        found += [os.path.relpath(os.path.join(d, n), root) for n in names]
    return sorted(found)


def store_ok(path):
    """SQLite's integrity check on a copy of the store with its journal or log: a transaction cut
    short leaves a hot journal, which SQLite rolls back on the next writable open, as bnlab's."""
    copy = copy_store(path, os.path.join(tmp, "scratch"))
    try:
        con = sqlite3.connect(copy)
        ok = con.execute("PRAGMA integrity_check").fetchone()[0]
        con.close()
        return None if ok == "ok" else f"integrity_check says {ok}"
    except sqlite3.Error as e:
        return f"does not open: {e}"


def sweep(name, argv_of, shim):
    """Counts the write points of `bnlab argv_of(folder)` into folder, then fails each in turn."""
    count = os.path.join(tmp, name, "count")
    os.makedirs(count)
    p = bnlab(argv_of(count), {"LD_PRELOAD": shim, "BNLAB_FAIL_DIR": count, "BNLAB_FAIL_COUNT": count + ".txt"})
    if p.returncode != 0:
        sys.exit(f"{name}: the counting call failed: {p.stderr}")
    points = int(open(count + ".txt").read())
    base = os.path.join(tmp, name, "base")
    os.makedirs(base)
    p = bnlab(argv_of(base))
    if p.returncode != 0:
        sys.exit(f"{name}: the uninterrupted call failed: {p.stderr}")
    stores = [n for n in walk(base) if os.path.basename(n) == "study.sqlite"]
    base_rows = {n: rows(os.path.join(base, n)) for n in stores}
    want = {n: content(os.path.join(base, n)) for n in walk(base) if os.path.basename(n) not in VOLATILE}
    unreadable = [n for n, v in want.items() if isinstance(v, str)]
    if unreadable:
        sys.exit(f"{name}: the uninterrupted call wrote files h5py cannot read: {unreadable}: {want[unreadable[0]]}")
    if points == 0 or not want:
        sys.exit(f"{name}: an uninterrupted call wrote nothing the shim saw ({points} write points)")
    tested = 0
    stride = max(args.stride, -(-points // args.points) if args.points > 0 else 1)
    for errname, text in ERRORS.items():
        first = 1 if errname == "ENOSPC" else 1 + stride // 2
        for k in range(first, points + 1, stride):
            case = f"{name}: {errname} at write {k}/{points}"
            root = os.path.join(tmp, name, f"{errname}_{k}")
            os.makedirs(root)
            p = bnlab(argv_of(root), {"LD_PRELOAD": shim, "BNLAB_FAIL_DIR": root, "BNLAB_FAIL_AT": str(k), "BNLAB_FAIL_ERRNO": errname})
            tested += 1
            err = p.stderr.strip()
            if p.returncode != 1:
                fail(f"{case}: exit {p.returncode}, want 1: {err[-300:]}")
            store_error = "study.sqlite" in err and any(t in err for t in SQLITE_TEXTS)
            if (text not in err and not store_error) or root + "/" not in err:
                fail(f"{case}: the message names no file of {root} or not the error: {err[-300:]}")
            if "terminate called" in err or "Exception raised from" in err:
                fail(f"{case}: a stack trace: {err[-300:]}")
            for n in walk(root):
                path = os.path.join(root, n)
                if re.match(r"^\..*\.tmp\.\d+", os.path.basename(n)):
                    fail(f"{case}: a temporary was left behind: {n}")
                elif n in want and content(path) != want[n]:
                    fail(f"{case}: {n} is not the complete file")
                elif os.path.basename(n) == "study.sqlite":
                    why = store_ok(path)
                    if why:
                        fail(f"{case}: {n}: {why}")
                elif n not in want and os.path.basename(n) not in VOLATILE:
                    fail(f"{case}: {n} is not a file an uninterrupted call leaves")
            # Space is back: the same command finishes, equal to the uninterrupted call.
            p = bnlab(argv_of(root))
            if p.returncode != 0:
                fail(f"{case}: the rerun failed (exit {p.returncode}): {p.stderr.strip()[-300:]}")
                continue
            for n in stores:
                if rows(os.path.join(root, n)) != base_rows[n]:
                    fail(f"{case}: after the rerun, {n}'s rows differ from the uninterrupted call's")
            for n, data in want.items():
                path = os.path.join(root, n)
                if not os.path.exists(path) or content(path) != data:
                    fail(f"{case}: after the rerun, {n} differs from the uninterrupted call's")
            shutil.rmtree(root)
    print(f"{name}: {points} write points; {tested} failure points tested (ENOSPC and EIO, every {stride}.)")
    return tested


try:
    chosen = [c for c in args.commands.split(",") if c]
    for c in chosen:
        if c not in COMMANDS:
            sys.exit(f"--commands: unknown command \"{c}\" ({', '.join(COMMANDS)})")
    shim = os.path.join(tmp, "failwrite.so")
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", shim, os.path.join(args.src, "tests/faults/failwrite.c"), "-ldl"], check=True)
    quiet = ["--verbose", "0"]
    # The finished studies the other commands read (outside the failing folder).
    study = os.path.join(tmp, "study")
    if set(chosen) - {"run", "explain"}:
        must(["run", CONFIG, "--out", study] + quiet)
        must(["golden", study, "-o", os.path.join(tmp, "golden.json")])
    shards = [os.path.join(tmp, f"shard{i}") for i in (1, 2)]
    if "merge" in chosen:
        for i, d in enumerate(shards):
            must(["run", CONFIG, "--out", d, "--shard", f"{i + 1}/2"] + quiet)
    calls = {
        "run": lambda d: ["run", CONFIG, "--out", d + "/r"] + quiet,
        "explain": lambda d: ["explain", CONFIG, "--out", d + "/r"] + quiet,
        "golden": lambda d: ["golden", study, "-o", d + "/golden.json"],
        "check": lambda d: ["check", study, "--golden", os.path.join(tmp, "golden.json"), "--junit", d + "/junit.xml"],
        "export": None,  # three formats, below
        "merge": lambda d: ["merge"] + shards + ["-o", d + "/merged"],
    }
    tested = 0
    for c in chosen:
        if c == "export":
            for fmt, extra, out in (("keras-h5", [], "model.h5"), ("torch", [], "model.pt"), ("torch", ["--as", "torchscript"], "model.ts")):
                tested += sweep(f"export {fmt} {' '.join(extra)}".strip(),
                                lambda d, fmt=fmt, extra=extra, out=out: ["export", study, "--strategy", "frozen", "--format", fmt] + extra + ["-o", d + "/" + out],
                                shim)
        else:
            tested += sweep(c, calls[c], shim)
    print(f"{tested} failure points tested in all, {len(failures)} failures")
    if tested == 0:
        sys.exit("no failure point was tested")
    sys.exit(1 if failures else 0)
finally:
    shutil.rmtree(tmp, ignore_errors=True)
