#!/usr/bin/env python3
"""Interop: Python PyTorch (Debian's python3-torch) reads bnlab's run directory.

It loads pretrained.pt and sample.pt with torch.load, rebuilds the same model as a plain
torch.nn.Sequential, and recomputes the losses bnlab reported -- an implementation that
shares no code with bnlab:
  * evaluate of the untouched pretrained weights (inference mode), within 1e-5;
  * for Keras semantics, the `train` strategy's first training loss: a batch of one in
    training mode makes every BatchNorm output its beta, so the network output is
    head(act(beta_last)) whatever the input -- computed here by hand from the state dict.
Usage: test_interop.py BNLAB_BINARY CONFIG
"""
import json
import math
import subprocess
import sys
import tempfile

import torch

TOL = 1e-5


def gaussian_nll(out, y):
    t = y.shape[1]
    mean, log_var = out[:, :t], out[:, t:]
    return (0.5 * (log_var + (y - mean) ** 2 / torch.exp(log_var) + math.log(2 * math.pi))).mean()


def loss_fn(name, out, y):
    if name == "gaussian_nll":
        return gaussian_nll(out, y)
    if name == "mse":
        return ((out - y) ** 2).mean()
    return torch.nn.functional.cross_entropy(out, y[:, 0].long())


def activation(name):
    return {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU()}[name]


def build(cfg, inputs, outputs):
    m = cfg["model"]
    bn = m["batchnorm"]
    layers, width = [], inputs
    for h in m["hidden"]:
        layers.append(torch.nn.Linear(width, h))
        if bn["enabled"]:
            layers.append(torch.nn.BatchNorm1d(h, eps=bn["eps"], momentum=bn["momentum"], affine=bn["affine"]))
        layers.append(activation(m["activation"]))
        if m["dropout"] > 0:
            layers.append(torch.nn.Dropout(m["dropout"]))
        width = h
    layers.append(torch.nn.Linear(width, outputs))
    return torch.nn.Sequential(*layers)


def main():
    binary, config = sys.argv[1], sys.argv[2]
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        out = tmp + "/run"
        subprocess.run([binary, "run", config, "--out", out, "--verbose", "0"], check=True)
        cfg = json.load(open(out + "/config.resolved.json"))
        summary = json.load(open(out + "/summary.json"))
        ckpt = torch.load(out + "/pretrained.pt")
        sample = torch.load(out + "/sample.pt")
        sd = ckpt["state_dict"]
        x, y = sample["x"], sample["y"]
        inputs, outputs = x.shape[1], sd[max(sd, key=lambda k: int(k.split(".")[0]))].shape[0]
        model = build(cfg, inputs, outputs)
        model.load_state_dict(sd, strict=True)  # names and shapes must match exactly
        model.eval()
        with torch.no_grad():
            ours = float(loss_fn(cfg["model"]["loss"], model(x), y))
            # sample.x is the standardized x_raw with the checkpoint's statistics
            std_x = (sample["x_raw"] - ckpt["x_mean"]) / ckpt["x_std"]
            if float((std_x - x).abs().max()) > 1e-6:
                failures.append("sample.x is not (x_raw - x_mean) / x_std")
        print(f"python evaluate: {ours:.9g}")
        for s in summary["runs"]:
            diff = abs(s["evaluate_pretrained"] - ours)
            print(f"  {s['strategy']}: bnlab evaluate_pretrained {s['evaluate_pretrained']:.9g}  |diff| {diff:.3g}")
            if diff > TOL:
                failures.append(f"{s['strategy']}: evaluate_pretrained {s['evaluate_pretrained']} vs python {ours}")
        if cfg["model"]["batchnorm"]["semantics"] == "keras" and cfg["model"]["batchnorm"]["enabled"]:
            train = [s for s in summary["runs"] if s["strategy"] == "train"]
            if train and cfg["model"]["dropout"] == 0:
                bns = [i for i, l in enumerate(model) if isinstance(l, torch.nn.BatchNorm1d)]
                h = model[bns[-1]].bias.detach().unsqueeze(0)  # last BN outputs beta
                h = model[bns[-1] + 1](h)                      # its activation
                with torch.no_grad():
                    out_train = model[-1](h)                   # the head
                    want = float(loss_fn(cfg["model"]["loss"], out_train, y))
                got = train[0]["loss"][0]
                print(f"  train loss[1]: bnlab {got:.9g}  python (BN outputs beta) {want:.9g}")
                if abs(got - want) > TOL * max(1.0, abs(want)):
                    failures.append(f"train loss[1] {got} vs hand-derived {want}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("interop OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
