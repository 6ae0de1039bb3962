#!/usr/bin/env python3
"""Exported Keras weights, read back the way a Keras user's tooling would (h5py + numpy).

Runs bnlab on the Keras 2 fixture, exports every strategy with `bnlab export --format keras-h5`,
reads each file with h5py as a Keras 2 model.save() file (the architecture from its model_config,
the weights from model_weights/ by layer_names and weight_names), evaluates the sample with numpy
in Keras inference semantics, and requires the loss to equal bnlab's evaluate_after for that
strategy (its best weights) within 1e-5. Then it imports each exported file again through
init.keras and requires the same tensors, bit for bit.
Usage: test_export.py BNLAB_BINARY SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

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
    for run in summary["runs"]:  # noqa: C901
        out = f"{tmp}/{run['strategy']}.h5"
        subprocess.run([BIN, "export", tmp + "/run", "--strategy", run["strategy"], "--format", "keras-h5", "-o", out], check=True)
        with h5py.File(out) as f:
            # The architecture from the exported file's own model_config, the weights from model_weights/.
            h = x
            layers = json.loads(f.attrs["model_config"])["config"]["layers"]
            mw = f["model_weights"]
            names = [n.decode() for n in mw.attrs["layer_names"]]
            if names != [l["config"]["name"] for l in layers if l["class_name"] != "InputLayer"]:
                failures.append(f"{run['strategy']}: layer_names {names} do not follow model_config")
            for layer in layers:
                cls, c = layer["class_name"], layer["config"]
                if cls == "InputLayer":
                    continue
                g = mw[c["name"]]
                w = {n.decode().split("/")[-1].split(":")[0]: np.array(g[n.decode()]) for n in g.attrs["weight_names"]}
                if cls == "Dense":
                    h = h @ w["kernel"] + (w["bias"] if c["use_bias"] else 0)
                    h = {"linear": lambda v: v, "relu": lambda v: np.maximum(v, 0)}[c["activation"]](h)
                elif cls == "BatchNormalization":  # inference mode
                    h = (h - w["moving_mean"]) / np.sqrt(w["moving_variance"] + c["epsilon"])
                    h = h * w.get("gamma", 1) + w.get("beta", 0)
                elif cls == "Activation" and c["activation"] == "relu":
                    h = np.maximum(h, 0)
                else:
                    failures.append(f"{run['strategy']}: unexpected layer {cls} {c}")
        # The round trip: the exported file imported again holds the same tensors, bit for bit.
        back = dict(config, name="keras_export_back", init={"keras": out}, strategies=["frozen"])
        back.pop("model")
        back["model"] = {"loss": "mse"}
        json.dump(back, open(os.path.join(tmp, "back.json"), "w"))
        subprocess.run([BIN, "run", os.path.join(tmp, "back.json"), "--out", f"{tmp}/back_{run['strategy']}", "--verbose", "0",
                        "--no-plots"], check=True)
        tuned = torch.load(f"{tmp}/run/finetuned_{run['strategy']}.pt")
        again = torch.load(f"{tmp}/back_{run['strategy']}/pretrained.pt")["state_dict"]
        float_names = sorted(k for k in tuned if not k.endswith("num_batches_tracked"))
        if sorted(k for k in again if not k.endswith("num_batches_tracked")) != float_names or \
                not all(torch.equal(tuned[k], again[k]) for k in float_names):
            failures.append(f"{run['strategy']}: import(export) does not give back the same tensors")
        loss = float(np.mean((h.astype(np.float64) - y) ** 2))
        diff = abs(loss - run["evaluate_after"])
        print(f"{run['strategy']}: numpy on exported Keras file {loss:.9g}, bnlab evaluate_after {run['evaluate_after']:.9g}, |diff| {diff:.2g}")
        if diff > 1e-5:
            failures.append(run["strategy"])
print("export OK" if not failures else f"export FAILED: {failures}")
sys.exit(1 if failures else 0)
