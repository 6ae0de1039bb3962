#!/usr/bin/env python3
"""Exported Keras weights, read back the way a Keras user's tooling would (h5py + numpy).

Runs bnlab on the Keras 2 fixture, exports every strategy with `bnlab export --format keras-h5`,
reads each file with h5py following the Keras 2 layout (layer_names, weight_names), evaluates the
sample with numpy in Keras inference semantics (epsilon 1e-3), and requires the loss to equal
bnlab's evaluate_after for that strategy (its best weights) within 1e-5.
Usage: test_export.py BNLAB_BINARY SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np

BIN, SRC = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
FIX = os.path.join(SRC, "tests/keras/fixtures")
EPS = 1e-3

config = {"name": "keras_export", "init": {"keras_h5": os.path.join(FIX, "keras2.h5")},
          "data": {"source": "csv", "path": os.path.join(FIX, "data.csv"), "target_columns": ["y"], "standardize": False},
          "model": {"hidden": [5, 3], "activation": "relu", "loss": "mse",
                    "batchnorm": {"semantics": "keras", "eps": EPS, "momentum": 0.01}},
          "pretrain": {"batch_size": 4},
          "finetune": {"sample": 0, "epochs": 3, "batch_size": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
          "strategies": ["train", "frozen", "eval", "fold", "freeze_affine"]}
failures = []
with tempfile.TemporaryDirectory() as tmp:
    cfg = os.path.join(tmp, "c.json")
    json.dump(config, open(cfg, "w"))
    subprocess.run([BIN, "run", cfg, "--out", tmp + "/run", "--verbose", "0", "--no-plots"], check=True)
    rows = np.loadtxt(os.path.join(FIX, "data.csv"), delimiter=",", skiprows=1, dtype=np.float32)
    x, y = rows[:1, :4], rows[:1, 4:]
    summary = json.load(open(tmp + "/run/summary.json"))
    for run in summary["runs"]:
        out = f"{tmp}/{run['strategy']}.h5"
        subprocess.run([BIN, "export", tmp + "/run", "--strategy", run["strategy"], "--format", "keras-h5", "-o", out], check=True)
        with h5py.File(out) as f:
            h = x
            names = [n.decode() for n in f.attrs["layer_names"]]
            for i, name in enumerate(names):
                g = f[name]
                w = {n.decode().split("/")[-1].split(":")[0]: np.array(g[n.decode()]) for n in g.attrs["weight_names"]}
                if "kernel" in w:
                    h = h @ w["kernel"] + w["bias"]
                    followed_by_bn = i + 1 < len(names) and names[i + 1].startswith("batch_normalization")
                    if i + 1 < len(names) and not followed_by_bn:
                        h = np.maximum(h, 0)  # folded model: Dense then the model's ReLU
                else:  # BatchNormalization in inference mode, then the model's ReLU
                    h = np.maximum((h - w["moving_mean"]) / np.sqrt(w["moving_variance"] + EPS) * w["gamma"] + w["beta"], 0)
        loss = float(np.mean((h.astype(np.float64) - y) ** 2))
        diff = abs(loss - run["evaluate_after"])
        print(f"{run['strategy']}: numpy on exported Keras file {loss:.9g}, bnlab evaluate_after {run['evaluate_after']:.9g}, |diff| {diff:.2g}")
        if diff > 1e-5:
            failures.append(run["strategy"])
print("export OK" if not failures else f"export FAILED: {failures}")
sys.exit(1 if failures else 0)
