#!/usr/bin/env python3
"""The study store read from Python, as the README shows it.

Runs configs/smoke/study.json (96 runs), then executes the README's pandas example verbatim
(the ```python block after "In pandas:", pointed at this run's store) and checks what it returns
against an independent reading of the same study: curves.csv parsed with the csv module and
summary.json. Also: every run of curves.csv is in the store with the same values bit for bit,
and a foreign study.sqlite is refused with exit 2 and left untouched.
Usage: test_store_python.py BNLAB_BINARY SOURCE_DIR
"""
import csv
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile

import numpy as np

BIN, SRC = sys.argv[1], sys.argv[2]
failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what)


readme = open(os.path.join(SRC, "README.md")).read()
m = re.search(r"In pandas:\n\n```python\n(.*?)```", readme, re.S)
check(m is not None, "README has no pandas example after 'In pandas:'")
example = m.group(1) if m else ""

with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "run")
    p = subprocess.run([BIN, "run", os.path.join(SRC, "configs/smoke/study.json"), "--out", out, "--verbose", "0",
                        "--no-plots"], capture_output=True, text=True)
    check(p.returncode == 0, f"run: exit {p.returncode}: {p.stderr[-400:]}")
    store = os.path.join(out, "study.sqlite")

    # The README's example, run as written (only the path changed); its last expression is the
    # median loss per epoch of `train`.
    code = example.replace("runs/seed_repro/study.sqlite", store)
    lines = [ln for ln in code.strip().splitlines()]
    body, last = "\n".join(lines[:-1]), lines[-1]
    env = {}
    exec(body, env)  # noqa: S102 - the README's own code
    median_train = eval(last, env)  # noqa: S307

    rows = list(csv.DictReader(open(os.path.join(out, "curves.csv"))))
    summary = json.load(open(os.path.join(out, "summary.json")))
    train = {}
    for r in rows:
        if r["strategy"] == "train":
            train.setdefault((r["grid"], r["seed"], r["sample"]), {})[int(r["epoch"])] = float(r["loss"])
    matrix = np.array([[curve[e] for e in sorted(curve)] for curve in train.values()])
    check(np.array_equal(median_train, np.median(matrix, axis=0)), "README: median train loss per epoch differs from curves.csv's")

    runs = env["runs"]
    check(len(runs) == len(summary["runs"]) == 96, f"README: {len(runs)} runs read, summary.json has {len(summary['runs'])}")
    per_strategy = {}
    for a in summary["aggregates"]:
        per_strategy[a["strategy"]] = per_strategy.get(a["strategy"], 0) + a["runs"]
    got = dict(runs.groupby("strategy").size())
    check(got == per_strategy, f"README: runs per strategy {got}, summary.json {per_strategy}")

    # Every curve point of curves.csv is the store's, bit for bit.
    con = sqlite3.connect(store)
    curves = {}
    for run, grid, strategy, seed, sample, n, loss, val in con.execute(
            "SELECT r.run, grid, strategy, seed, sample, e.epochs, e.loss, e.val_loss FROM runs r JOIN epochs e USING (run)"):
        lv, vv = np.frombuffer(loss, "<f8"), np.frombuffer(val, "<f8")
        check(len(lv) == n, f"run {run}: {len(lv)} losses for {n} epochs")
        for k in range(n):
            curves[(strategy, grid, str(seed), str(sample), k + 1)] = (lv[k], vv[k])
    for r in rows:
        key = (r["strategy"], r["grid"], r["seed"], r["sample"], int(r["epoch"]))
        check(curves.get(key) == (float(r["loss"]), float(r["val_loss"])), f"curves.csv {key} is not the store's")
    check(len(curves) == len(rows), f"the store has {len(curves)} curve points, curves.csv {len(rows)}")
    # final_gap is the last epoch's loss - val_loss.
    for run, gap, loss, val in con.execute("SELECT r.run, final_gap, loss, val_loss FROM runs r JOIN epochs USING (run)"):
        check(gap == np.frombuffer(loss, "<f8")[-1] - np.frombuffer(val, "<f8")[-1], f"run {run}: final_gap")
    meta = dict(con.execute("SELECT key, value FROM meta"))
    check(meta.get("format") == "bnlab.study/1", f"meta.format {meta.get('format')}")
    check(json.loads(meta["config"])["name"] == "smoke_study", "meta.config is not the resolved config")
    started = meta.get("finetune_started_at", "")
    check(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", started) is not None, f"meta.finetune_started_at {started!r}")
    con.close()

    # Another program's database where the store belongs: exit 2, named, untouched.
    other = os.path.join(tmp, "other")
    os.makedirs(other)
    db = sqlite3.connect(os.path.join(other, "study.sqlite"))
    db.execute("CREATE TABLE notes(text)")
    db.execute("INSERT INTO notes VALUES ('mine')")
    db.commit()
    db.close()
    before = open(os.path.join(other, "study.sqlite"), "rb").read()
    for extra in ([], ["--force"]):
        p = subprocess.run([BIN, "run", os.path.join(SRC, "configs/smoke/study.json"), "--out", other, "--verbose", "0",
                            "--no-plots"] + extra, capture_output=True, text=True)
        # The folder is not a bnlab run directory (no ledger, no resolved config): refused as a whole.
        check(p.returncode == 2 and "(it holds study.sqlite)" in p.stderr and "not a bnlab run directory" in p.stderr,
              f"foreign store {extra}: exit {p.returncode}: {p.stderr[-300:]}")
    check(open(os.path.join(other, "study.sqlite"), "rb").read() == before, "the foreign database was changed")
    check(sorted(os.listdir(other)) == ["study.sqlite"], f"files written beside a foreign store: {os.listdir(other)}")

print("store OK" if not failures else f"store: {len(failures)} check(s) FAILED")
sys.exit(1 if failures else 0)
