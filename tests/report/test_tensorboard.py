#!/usr/bin/env python3
"""TensorBoard event files read back by a decoder written here from the format description
(TFRecord framing; the Event / Summary field numbers of TensorBoard's event.proto and
summary.proto), with python3-crc32c for the checksums: not bnlab's code, not its .proto.

Checks, for a study of many runs per strategy (median and quartiles as tags) and for one run
per strategy (the curves themselves):
  - every record's length CRC and payload CRC (masked CRC-32C) check; nothing follows the last;
  - the first record is file_version "brain.Event:2", the others scalar summaries, steps rising;
  - every scalar equals the run's curve in curves.csv (float32, as the file stores it), or the
    median / quartile of the runs' curves computed here with numpy;
  - evaluate_before / evaluate_after equal summary.json's per-run figures (or their quantiles);
  - one folder per strategy (and grid point), nothing else under tensorboard/;
  - the reader's checksum of the 8-byte length 24 is 0x224b7fa3, the example published in
    TensorBoard's data server (tf_record.rs), so the CRC used here is TensorBoard's.
Usage: test_tensorboard.py BNLAB_BINARY SOURCE_DIR
"""
import csv
import json
import os
import struct
import subprocess
import sys
import tempfile
from collections import defaultdict

import crc32c
import numpy as np

BIN, SRC = sys.argv[1], sys.argv[2]
from checks import check, summary as close_tally


def masked(data):
    c = crc32c.crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(buf, at):
    shift = value = 0
    while True:
        b = buf[at]
        at += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, at


def fields(buf):
    """(field number, wire type, value) of a protobuf message; value: int, bytes or raw 4/8 bytes."""
    at, out = 0, []
    while at < len(buf):
        key, at = varint(buf, at)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, at = varint(buf, at)
        elif wt == 1:
            v, at = buf[at:at + 8], at + 8
        elif wt == 2:
            n, at = varint(buf, at)
            v, at = buf[at:at + n], at + n
        elif wt == 5:
            v, at = buf[at:at + 4], at + 4
        else:
            raise ValueError("wire type %d" % wt)
        out.append((num, wt, v))
    if at != len(buf):
        raise ValueError("message overruns its bytes")
    return out


def records(path):
    data = open(path, "rb").read()
    at, out = 0, []
    while at < len(data):
        check(at + 12 <= len(data), "%s: a truncated record header at byte %d" % (path, at))
        head = data[at:at + 8]
        (n,) = struct.unpack("<Q", head)
        (crc_len,) = struct.unpack("<I", data[at + 8:at + 12])
        check(crc_len == masked(head), "%s: length CRC of the record at byte %d" % (path, at))
        payload = data[at + 12:at + 12 + n]
        check(len(payload) == n and at + 16 + n <= len(data), "%s: a truncated record at byte %d" % (path, at))
        (crc_data,) = struct.unpack("<I", data[at + 12 + n:at + 16 + n])
        check(crc_data == masked(payload), "%s: payload CRC of the record at byte %d" % (path, at))
        out.append(payload)
        at += 16 + n
    return out


def event(payload):
    """Event: 1 wall_time double, 2 step int64, 3 file_version string, 5 summary Summary."""
    e = {"step": 0, "values": []}
    for num, wt, v in fields(payload):
        if num == 1 and wt == 1:
            e["wall_time"] = struct.unpack("<d", v)[0]
        elif num == 2 and wt == 0:
            e["step"] = v
        elif num == 3 and wt == 2:
            e["file_version"] = v.decode()
        elif num == 5 and wt == 2:
            for snum, swt, sv in fields(v):  # Summary: 1 repeated Value
                check(snum == 1 and swt == 2, "Summary holds only values (field %d)" % snum)
                val = {}
                for vnum, vwt, vv in fields(sv):  # Value: 1 tag, 2 simple_value float, 9 metadata
                    if vnum == 1 and vwt == 2:
                        val["tag"] = vv.decode()
                    elif vnum == 2 and vwt == 5:
                        val["value"] = struct.unpack("<f", vv)[0]
                    elif vnum == 9 and vwt == 2:
                        for mnum, mwt, mv in fields(vv):  # SummaryMetadata: 1 plugin_data, 3 summary_description
                            if mnum == 1:
                                val["plugin"] = dict((a, b) for a, _, b in fields(mv)).get(1, b"").decode()
                            elif mnum == 3:
                                val["description"] = mv.decode()
                    else:
                        check(False, "unexpected Value field %d" % vnum)
                e["values"].append(val)
        else:
            check(False, "unexpected Event field %d (wire type %d)" % (num, wt))
    return e


def read_events(path):
    evs = [event(p) for p in records(path)]
    check(len(evs) >= 2, path + ": a version record and scalars")
    check(evs[0].get("file_version") == "brain.Event:2" and not evs[0]["values"], path + ": first record is file_version brain.Event:2")
    steps = [e["step"] for e in evs[1:]]
    check(all("file_version" not in e for e in evs[1:]), path + ": one version record")
    check(steps == sorted(set(steps)), path + ": one event per step, in step order")
    check(all(e.get("wall_time", 0.0) == float(e["step"]) for e in evs), path + ": wall_time is the step (byte-identical files)")
    scalars = {}
    for e in evs[1:]:
        for v in e["values"]:
            check(v.get("tag") and "value" in v, path + ": a value with a tag and a simple_value")
            check((v["tag"], e["step"]) not in scalars, path + ": tag %s twice at step %d" % (v["tag"], e["step"]))
            scalars[(v["tag"], e["step"])] = v["value"]
    described = [v for e in evs[1:] for v in e["values"] if "description" in v]
    check(len(described) == len({t for t, _ in scalars}), path + ": each tag's first value carries its description")
    check(all(v.get("plugin") == "scalars" for v in described), path + ": plugin_name scalars")
    return scalars


def same_float(got, want):
    want32 = np.float32(want)
    return got == want32 or abs(np.float32(got) - want32) <= np.spacing(want32)


def study(config, out):
    subprocess.run([BIN, "run", config, "--out", out, "--verbose", "0", "--no-plots"], check=True)
    runs = json.load(open(os.path.join(out, "summary.json")))["runs"]
    curves = defaultdict(lambda: defaultdict(lambda: ([], [])))
    with open(os.path.join(out, "curves.csv")) as f:
        for row in csv.DictReader(f):
            c = curves[(row["strategy"], row["grid"])][int(row["epoch"])]
            c[0].append(float(row["loss"]))
            c[1].append(float(row["val_loss"]))
    config_json = json.load(open(os.path.join(out, "config.resolved.json")))
    return runs, curves, config_json


def folder_of(strategy, grid, with_grid):
    return os.path.join(strategy, grid) if with_grid else strategy


def check_study(config, out):
    total = 0
    runs, curves, cfg = study(config, out)
    strategies = [s["name"] for s in cfg["strategies"]]
    grids = sorted({r["grid"] for r in runs})
    with_grid = len(grids) > 1
    tb = os.path.join(out, "tensorboard")
    expected_dirs = {folder_of(s, g, with_grid) for s in strategies for g in grids}
    found = set()
    for root, dirs, files in os.walk(tb):
        for f in files:
            check("tfevents" in f and f.startswith("events.out.tfevents."), "only event files under tensorboard/: " + f)
            found.add(os.path.relpath(root, tb))
        check(not [f for f in files if ".tmp." in f], "no temporary left in " + root)
    check(found == expected_dirs, "%s: one folder per strategy and grid point: %s vs %s" % (config, sorted(found), sorted(expected_dirs)))
    for s in strategies:
        for g in grids:
            d = os.path.join(tb, folder_of(s, g, with_grid))
            files = os.listdir(d)
            check(len(files) == 1, d + ": one event file")
            scalars = read_events(os.path.join(d, files[0]))
            per_epoch = curves[(s, g)]
            mine = [r for r in runs if r["strategy"] == s and r["grid"] == g and not r["failed"]]
            many = len(mine) > 1
            epochs = sorted(per_epoch)
            figures = {"evaluate_before": {0: [r["evaluate_before"] for r in mine]},
                       "evaluate_after": {epochs[-1]: [r["evaluate_after"] for r in mine]},
                       "loss": {k: per_epoch[k][0] for k in epochs}, "val_loss": {k: per_epoch[k][1] for k in epochs}}
            want = {}
            for tag, by_step in figures.items():
                for step, values in by_step.items():
                    check(len(values) == len(mine), "%s %s: every run has epoch %d" % (s, g, step))
                    if many:
                        for q, name in ((50, "median"), (25, "p25"), (75, "p75")):
                            want[(tag + "/" + name, step)] = np.percentile(np.array(values, dtype=np.float64), q)
                    else:
                        want[(tag, step)] = values[0]
            check(set(scalars) == set(want), "%s %s: tags and steps %s" % (s, g, sorted(set(scalars) ^ set(want))[:6]))
            total += len(want)
            for key, w in want.items():
                check(same_float(scalars[key], w), "%s %s %s step %d: %r in the file, %r from the curves" % (s, g, key[0], key[1], scalars[key], w))
    return total


# The reader's CRC is TensorBoard's: the published example of tf_record.rs.
check(masked(struct.pack("<Q", 24)) == 0x224B7FA3, "masked CRC-32C of the length 24 is 0x224b7fa3")
# The decoder can fail: a flipped payload byte breaks the payload CRC.
with tempfile.TemporaryDirectory() as tmp:
    n_many = check_study(os.path.join(SRC, "configs/smoke/study.json"), os.path.join(tmp, "study"))
    n_one = check_study(os.path.join(SRC, "configs/smoke/keras_nll.json"), os.path.join(tmp, "single"))
    some = os.path.join(tmp, "single", "tensorboard")
    path = os.path.join(some, sorted(os.listdir(some))[0])
    path = os.path.join(path, os.listdir(path)[0])
    blob = bytearray(open(path, "rb").read())
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    blob[12 + n // 2] ^= 0x01
    crc_after = struct.unpack("<I", bytes(blob[12 + n:16 + n]))[0]
    check(crc_after != masked(bytes(blob[12:12 + n])), "a flipped byte fails the payload CRC")
print("tensorboard: %d scalars of a study of many runs per strategy and %d of one run per strategy match the curves" % (n_many, n_one))
close_tally()
