#!/usr/bin/env python3
"""report.html in a real browser: Debian's headless Chromium renders it (--screenshot) and
serialises its DOM (--dump-dom); the test checks that the picture is not blank at desktop and at
phone width, that the DOM holds one verdict row per strategy and grid point with the numbers of
summary.csv (data-v exactly, the text to 4 significant digits), the per-layer tables of
`bnlab explain`, the manifest, and that the page fetches nothing. A study of 50x as many samples
makes a page of about the same size (aggregates, not one element per run).
Chromium runs with its own profile folder and is stopped by pid if it overstays.
Usage: test_report_html.py BNLAB_BINARY SOURCE_DIR [KEEP_DIR]
"""
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser

import numpy as np
from PIL import Image

BIN, SRC = sys.argv[1], sys.argv[2]
KEEP = sys.argv[3] if len(sys.argv) > 3 else None
from checks import check, summary as close_tally


def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    check(False, "chromium is not installed (scripts/setup.sh installs Debian's chromium)")


def browse(page, profile, *args):
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--user-data-dir=" + profile, *args, "file://" + os.path.abspath(page)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the browser and its helpers, by the process group it leads
        proc.communicate()
        check(False, "chromium did not finish within 120 s")
    check(proc.returncode == 0, "chromium exited %d: %s" % (proc.returncode, err.decode()[-500:]))
    return out.decode()


class Dom(HTMLParser):
    """The verdict rows (data-strategy/data-grid, each data-key cell's data-v and text), the ids
    of tables and their row counts, and every URL the page names."""

    def __init__(self):
        super().__init__()
        self.rows, self.tables, self.urls, self.tags = [], {}, [], set()
        self._row = self._cell = self._table = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        for k in ("src", "href", "data", "action", "poster"):
            if k in a and a[k] is not None:
                self.urls.append(a[k])
        if tag == "table":
            self._table = a.get("id")
            self.tables.setdefault(self._table, 0)
        if tag == "tr" and self._table:
            if "data-strategy" in a:
                self._row = {"strategy": a["data-strategy"], "grid": a.get("data-grid", ""), "cells": {}}
            if self._table != "manifest-table":
                self.tables[self._table] += 1
        if tag == "td" and self._row is not None and "data-key" in a:
            self._cell = (a["data-key"], a["data-v"])
            self._text = ""

    def handle_data(self, data):
        if self._cell:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell:
            self._row["cells"][self._cell[0]] = (self._cell[1], self._text.strip())
            self._cell = None
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        if tag == "table":
            self._table = None


def not_blank(png, what):
    im = Image.open(png).convert("RGB")
    w, h = im.size
    small = im.resize((w // 4, h // 4))
    pixels = list(small.getdata())
    inked = sum(1 for p in pixels if sum(p) < 720) / len(pixels)
    colours = len(set(pixels))
    check(inked > 0.03, "%s: only %.1f%% of the screenshot is not white" % (what, 100 * inked))
    check(colours >= 16, "%s: only %d colours in the screenshot" % (what, colours))
    # The curves are drawn: some pixels in the loss/val_loss colours (blue-ish and orange/green strokes).
    strokes = sum(1 for p in pixels if p[2] > p[0] + 60 or p[1] > p[0] + 40)
    check(strokes > 20, "%s: no coloured strokes (curves) in the screenshot" % what)
    return inked, colours


def run_study(out, samples):
    cmd = [BIN, "run", os.path.join(SRC, "configs/smoke/study.json"), "--out", out, "--verbose", "0", "--no-plots"]
    if samples:
        cmd += ["--set", "finetune.samples.count=%d" % samples]
    subprocess.run(cmd, check=True)


with tempfile.TemporaryDirectory() as tmp:
    run = os.path.join(tmp, "study")
    run_study(run, None)
    subprocess.run([BIN, "explain", os.path.join(SRC, "configs/smoke/study.json"), "--out", run, "--sample", "5", "--verbose", "0"],
                   check=True, stdout=subprocess.DEVNULL)
    page = os.path.join(run, "report.html")
    text = open(page, encoding="utf-8").read()
    profile = os.path.join(tmp, "profile")
    desktop, phone = os.path.join(tmp, "desktop.png"), os.path.join(tmp, "phone.png")
    browse(page, profile, "--window-size=1100,2400", "--screenshot=" + desktop)
    browse(page, profile, "--window-size=390,1600", "--screenshot=" + phone)
    d_ink, d_col = not_blank(desktop, "desktop")
    p_ink, p_col = not_blank(phone, "phone width")
    check(Image.open(phone).size == (390, 1600), "the phone screenshot has the window's size")
    dom_text = browse(page, profile, "--dump-dom")
    dom = Dom()
    dom.feed(dom_text)

    # Every (grid, strategy) of summary.csv: one row, the same numbers.
    with open(os.path.join(run, "summary.csv")) as f:
        summary = list(csv.DictReader(f))
    check(len(summary) == 6, "summary.csv has 3 strategies x 2 grid points")
    keys = ["runs", "failed", "diverged", "final_gap_median", "final_gap_p25", "final_gap_p75", "lag_residual_median", "eval_change_median"]
    for s in summary:
        rows = [r for r in dom.rows if r["strategy"] == s["strategy"] and r["grid"] == s["grid"]]
        check(len(rows) == 1, "one verdict row for %s %s (found %d)" % (s["strategy"], s["grid"], len(rows)))
        for k in keys:
            check(k in rows[0]["cells"], "%s %s: a %s cell" % (s["strategy"], s["grid"], k))
            exact, shown = rows[0]["cells"][k]
            check(exact == s[k], "%s %s %s: data-v %r, summary.csv %r" % (s["strategy"], s["grid"], k, exact, s[k]))
            want = s[k] if k in ("runs", "failed", "diverged") else "%.4g" % float(s[k])
            check(shown == want, "%s %s %s: shows %r, want %r" % (s["strategy"], s["grid"], k, shown, want))
    check(len(dom.rows) == len(summary), "no verdict row beyond summary.csv's")
    # evaluate before / after (not in summary.csv): the medians of summary.json's per-run figures.
    runs = json.load(open(os.path.join(run, "summary.json")))["runs"]
    for r in dom.rows:
        mine = [x for x in runs if x["strategy"] == r["strategy"] and x["grid"] == r["grid"] and not x["failed"]]
        for k in ("evaluate_before", "evaluate_after"):
            want = float(np.median([x[k] for x in mine]))
            got = float(r["cells"][k + "_median"][0])
            check(abs(got - want) <= 1e-12 * max(1.0, abs(want)), "%s %s %s median: %r, from summary.json %r" % (r["strategy"], r["grid"], k, got, want))
    # The per-layer tables: explain's two BatchNorm layers, and strategy x BN module.
    explain = json.load(open(os.path.join(run, "explain.json")))
    check(dom.tables.get("explain-layers") == 1 + len(explain["layers"]), "explain's layers table: one row per BatchNorm layer")
    check(dom.tables.get("explain-strategies") == 1 + len(explain["strategies"]), "explain's strategies table")
    check(dom.tables.get("bn-modes") == 1 + 3 * len(explain["layers"]), "the mode table: strategy x BatchNorm module")
    manifest = json.load(open(os.path.join(run, "manifest.json")))
    check(manifest["git_commit"] in dom_text and manifest["bnlab_version"] in dom_text, "the manifest's version and commit")
    check("config.resolved.json" in dom_text and '"smoke_study"' in dom_text.replace("&quot;", '"'), "the resolved config")
    # Nothing fetched: no URL but in-page anchors, no scripts, styles or images from anywhere.
    check(all(u.startswith("#") for u in dom.urls), "only in-page links: %s" % [u for u in dom.urls if not u.startswith("#")][:5])
    check(not ({"script", "link", "img", "iframe", "object", "embed"} & dom.tags), "no script/link/img/iframe tags")
    check("url(" not in text and "@import" not in text, "no CSS fetches")

    # Aggregates only: 50x the samples (4,800 runs), about the same page.
    big = os.path.join(tmp, "big")
    run_study(big, 400)
    subprocess.run([BIN, "explain", os.path.join(SRC, "configs/smoke/study.json"), "--out", big, "--sample", "5", "--verbose", "0"],
                   check=True, stdout=subprocess.DEVNULL)  # the same sections as the small page
    size_small, size_big = os.path.getsize(page), os.path.getsize(os.path.join(big, "report.html"))
    check(size_big <= size_small + 1024, "report.html grows with the runs: %d vs %d bytes" % (size_big, size_small))
    check(size_small < 100_000, "report.html of the smoke study is %d bytes" % size_small)
    if KEEP:
        os.makedirs(KEEP, exist_ok=True)
        for f in (desktop, phone, page):
            shutil.copy(f, KEEP)
    print("report.html: %d bytes (%d at 50x the runs); desktop %.0f%% inked, %d colours; phone %.0f%% inked, %d colours"
          % (size_small, size_big, 100 * d_ink, d_col, 100 * p_ink, p_col))
close_tally()
