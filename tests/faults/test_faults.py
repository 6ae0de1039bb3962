#!/usr/bin/env python3
"""Faults during a study: SIGINT/SIGTERM and SIGKILL at random moments.

1. A reference run of tests/faults/kill_study.json (1,800 runs, two seeds) finishes undisturbed.
2. SIGINT during fine-tuning: exit 130, a message saying how to resume, every file complete and
   consistent; rerunning the same command resumes and ends identical to the reference.
3. SIGTERM: exit 143.
4. SIGKILL at several random moments (seeded, so a failure reproduces), resuming each time: after
   every kill, every file present is complete and valid (JSON parses, CSV rows are whole,
   .pt files load with torch.load, study.sqlite passes SQLite's integrity check and every run
   it holds has its epochs, with final_gap equal to its curves' last loss - val_loss); then a
   final rerun completes with the store's rows, curves.csv, metrics.jsonl and summary.json
   identical to the reference.
Usage: test_faults.py BNLAB_BINARY SOURCE_DIR
"""
import csv
import json
import os
import random
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time

import torch

from store_copy import copy_store

BIN, SRC = sys.argv[1], sys.argv[2]
CONFIG = os.path.join(SRC, "tests/faults/kill_study.json")
RESULTS = ("curves.csv", "metrics.jsonl", "summary.json", "summary.csv", "summary.md")
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


def start(out):
    return subprocess.Popen([BIN, "run", CONFIG, "--out", out, "--verbose", "1", "--no-plots", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(out):
    p = subprocess.run([BIN, "run", CONFIG, "--out", out, "--verbose", "1", "--no-plots", "--jobs", "2"],
                       capture_output=True, text=True)
    return p.returncode, p.stderr


def store_rows(out):
    """(runs, epochs) of study.sqlite, read-only, in run order; None when there is no store.
    A kill inside a rollback-journal transaction (the store's first writes, before its log)
    leaves a hot journal, which a read-only connection cannot roll back ("attempt to write a
    readonly database"): then a copy of the store and its journal is read, rolled back as bnlab's
    next writable open does."""
    path = os.path.join(out, "study.sqlite")
    if not os.path.exists(path):
        return None
    if os.path.exists(path + "-journal"):
        path = copy_store(path, os.path.join(tmp, "hot_journal"))
        con = sqlite3.connect(path, timeout=30)
    else:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        check(con.execute("PRAGMA integrity_check").fetchone()[0] == "ok", f"{path}: integrity check failed")
        return (con.execute("SELECT * FROM runs ORDER BY run").fetchall(),
                con.execute("SELECT * FROM epochs ORDER BY run").fetchall())
    finally:
        con.close()


def stored_runs(out):
    rows = store_rows(out)
    return 0 if rows is None else len(rows[0])


def validate_store(out, when):
    rows = store_rows(out)
    if rows is None:
        return
    runs, epochs = rows
    by_run = {e[0]: e for e in epochs}
    for r in runs:
        if r[6] == "failed":
            continue
        e = by_run.get(r[0])
        check(e is not None, f"{when}: run {r[0]} is in the store without its epochs")
        if e is None:
            return
        loss = struct.unpack(f"<{e[1]}d", e[2])
        val = struct.unpack(f"<{e[1]}d", e[3])
        check(r[15] == loss[-1] - val[-1], f"{when}: run {r[0]}: final_gap {r[15]} is not its curves' {loss[-1] - val[-1]}")


def validate_events(folder, when):
    """Every event file under tensorboard/ is whole: records end where the file does, each CRC checks."""
    import crc32c

    def masked(b):
        c = crc32c.crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    for root, _, files in os.walk(folder):
        for f in files:
            check(".tmp." not in f, f"{when}: a temporary inside tensorboard/: {f}")
            data = open(os.path.join(root, f), "rb").read()
            at = 0
            while at < len(data):
                (n,) = struct.unpack("<Q", data[at:at + 8])
                ok = at + 16 + n <= len(data) and struct.unpack("<I", data[at + 8:at + 12])[0] == masked(data[at:at + 8]) \
                    and struct.unpack("<I", data[at + 12 + n:at + 16 + n])[0] == masked(data[at + 12:at + 12 + n])
                check(ok, f"{when}: {os.path.join(root, f)} is torn at byte {at}")
                if not ok:
                    break
                at += 16 + n


def validate(out, when):
    """Every non-temporary file is complete and valid; summary.json's runs are all in curves.csv."""
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith(".") and ".tmp." in name:
            continue  # an in-flight temporary of the killed process; the next run removes it
        try:
            if name.endswith(".json"):
                json.load(open(path))
            elif name.endswith(".jsonl"):
                for line in open(path):
                    json.loads(line)
            elif name.endswith(".csv"):
                rows = list(csv.reader(open(path)))
                check(len(rows) >= 1 and all(len(r) == len(rows[0]) for r in rows), f"{when}: {name} has a torn row")
                if name == "curves.csv":
                    for r in rows[1:]:
                        float(r[5]), float(r[6])  # loss, val_loss
            elif name.endswith(".pt"):
                torch.load(path)
            elif name.endswith(".md"):
                check(open(path).read().endswith("\n"), f"{when}: {name} is cut short")
            elif name == "study.sqlite":
                validate_store(out, when)
            elif name == "report.html":
                check(open(path, encoding="utf-8").read().endswith("</html>\n"), f"{when}: report.html is cut short")
            elif name == "tensorboard":
                validate_events(path, when)
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            check(False, f"{when}: {name} is not valid: {e}")
    summary_path, curves_path = os.path.join(out, "summary.json"), os.path.join(out, "curves.csv")
    if os.path.exists(summary_path):
        check(os.path.exists(curves_path), f"{when}: summary.json without curves.csv")
        curves = {}
        for r in csv.DictReader(open(curves_path)):
            curves[(r["strategy"], r["grid"], int(r["seed"]), int(r["sample"]), int(r["epoch"]))] = (float(r["loss"]), float(r["val_loss"]))
        for run in json.load(open(summary_path))["runs"]:
            for k, (loss, val) in enumerate(zip(run["loss"], run["val_loss"])):
                got = curves.get((run["strategy"], run["grid"], run["seed"], run["sample"], k + 1))
                check(got == (loss, val), f"{when}: run {run['run']} epoch {k + 1} in summary.json but not in curves.csv")
                if got != (loss, val):
                    return


def same_as_reference(out, ref, when):
    check(store_rows(out) == store_rows(ref), f"{when}: study.sqlite's runs or epochs differ from the uninterrupted run")
    for name in ("curves.csv", "metrics.jsonl", "summary.json"):
        check(open(os.path.join(out, name)).read() == open(os.path.join(ref, name)).read(),
              f"{when}: {name} differs from the uninterrupted run")


def wait_for_runs(out, timeout=30):
    """Until the store holds a first run, so the interruption hits fine-tuning."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if stored_runs(out) > 0:
            return True
        time.sleep(0.02)
    return False


with tempfile.TemporaryDirectory() as tmp:
    ref = os.path.join(tmp, "ref")
    rc, err = finish(ref)
    check(rc == 0, f"reference run exit {rc}: {err[-500:]}")
    runs = len(json.load(open(os.path.join(ref, "summary.json")))["runs"])
    check(stored_runs(ref) == runs, f"reference: the store holds {stored_runs(ref)} runs, summary.json {runs}")
    print(f"reference: {runs} runs")

    # SIGINT during fine-tuning, then resume.
    a = os.path.join(tmp, "sigint")
    p = start(a)
    check(wait_for_runs(a), "SIGINT: no results appeared")
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    check(p.returncode == 130, f"SIGINT: exit {p.returncode}, want 130")
    check("run the same command again to resume" in err, f"SIGINT: no resume hint in: {err[-300:]}")
    validate(a, "after SIGINT")
    partial = stored_runs(a)
    check(len(json.load(open(os.path.join(a, "summary.json")))["runs"]) == partial, "SIGINT: summary.json and the store disagree")
    check(0 < partial < runs, f"SIGINT: {partial} of {runs} runs saved")
    rc, err = finish(a)
    check(rc == 0 and f"resuming: {partial} of {runs} runs already finished" in err, f"SIGINT resume: exit {rc}, {err[-300:]}")
    same_as_reference(a, ref, "after SIGINT + resume")
    print(f"SIGINT: {partial} of {runs} runs saved; resumed to identical results")

    # SIGTERM.
    t = os.path.join(tmp, "sigterm")
    p = start(t)
    check(wait_for_runs(t), "SIGTERM: no results appeared")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    check(p.returncode == 143, f"SIGTERM: exit {p.returncode}, want 143")
    validate(t, "after SIGTERM")

    # SIGKILL at random moments, resuming each time.
    rng = random.Random(20261125)
    k = os.path.join(tmp, "sigkill")
    for i in range(5):
        p = start(k)
        delay = rng.uniform(0.05, 2.5)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        done = stored_runs(k)
        print(f"SIGKILL {i + 1} after {delay:.2f}s: {done} runs saved")
        validate(k, f"after SIGKILL {i + 1} ({delay:.2f}s)")
    rc, err = finish(k)
    check(rc == 0, f"SIGKILL final rerun: exit {rc}: {err[-300:]}")
    check(not any(n.startswith(".") and ".tmp." in n for n in os.listdir(k)), "temporaries left after a clean run")
    same_as_reference(k, ref, "after SIGKILLs + resume")

print("faults OK" if not failures else f"faults: {len(failures)} check(s) FAILED")
sys.exit(1 if failures else 0)
