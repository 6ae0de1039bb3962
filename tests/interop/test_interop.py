#!/usr/bin/env python3
"""Interop: Python PyTorch (Debian's python3-torch) reads bnlab's run directory.

It loads pretrained.pt and sample.pt with torch.load, rebuilds the model as a plain
torch.nn.Sequential of PyTorch's own modules from the recorded layer list (architecture.json),
also checks architecture.json's PyTorch expression, and recomputes the losses bnlab reported -- an implementation that
shares no code with bnlab:
  * evaluate of the untouched pretrained weights (inference mode), within 1e-5;
  * for Keras semantics, the `train` strategy's first training loss: a batch of one in
    training mode makes every BatchNorm output its beta, so the network output is
    the layers after the last BatchNorm applied to its beta, whatever the input -- computed
    here by hand from the state dict.
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


def module(layer):
    """One torch.nn module for one entry of architecture.json, from PyTorch's own classes."""
    kind = layer["kind"]
    if kind == "dense":
        return torch.nn.Linear(layer["in"], layer["out"], bias=layer["use_bias"])
    if kind == "batchnorm":
        assert layer["center"] == layer["scale"], "BatchNorm1d has gamma and beta together or neither"
        return torch.nn.BatchNorm1d(layer["out"], eps=layer["eps"], momentum=layer["momentum"], affine=layer["scale"])
    if kind == "dropout":
        return torch.nn.Dropout(layer["rate"])
    name = layer["activation"]
    return {"relu": torch.nn.ReLU(), "tanh": torch.nn.Tanh(), "gelu": torch.nn.GELU(), "sigmoid": torch.nn.Sigmoid(),
            "silu": torch.nn.SiLU(), "softplus": torch.nn.Softplus(), "linear": torch.nn.Identity(),
            "elu": torch.nn.ELU(alpha=layer.get("alpha", 1.0)),
            "leaky_relu": torch.nn.LeakyReLU(negative_slope=layer.get("negative_slope", 0.0))}[name]


def build(arch):
    return torch.nn.Sequential(*[module(layer) for layer in arch["layers"]])


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
        arch = json.load(open(out + "/architecture.json"))
        sd = ckpt["state_dict"]
        x, y = sample["x"], sample["y"]
        model = build(arch)
        model.load_state_dict(sd, strict=True)  # names and shapes must match exactly
        # The PyTorch expression bnlab records builds the same modules.
        if arch["pytorch"] is not None:
            again = eval(arch["pytorch"], {"torch": torch})  # noqa: S307 (bnlab's own output, under test)
            again.load_state_dict(sd, strict=True)
            if [type(m) for m in again] != [type(m) for m in model]:
                failures.append(f"architecture.json's pytorch expression builds {again}, the layer list {model}")
        model.eval()
        index = torch.as_tensor(sample["index"]).reshape(-1).tolist()
        row = {int(i): k for k, i in enumerate(index)}  # each run's sample is one row of sample.pt
        with torch.no_grad():
            ours = [float(loss_fn(cfg["model"]["loss"], model(x[k:k + 1]), y[k:k + 1])) for k in range(len(index))]
            # sample.x is the standardized x_raw with the checkpoint's statistics
            std_x = (sample["x_raw"] - ckpt["x_mean"]) / ckpt["x_std"]
            if float((std_x - x).abs().max()) > 1e-6:
                failures.append("sample.x is not (x_raw - x_mean) / x_std")
        print(f"python evaluate: {', '.join(f'{v:.9g}' for v in ours)}")
        for s in summary["runs"]:
            want = ours[row[int(s["sample"])]]
            diff = abs(s["evaluate_pretrained"] - want)
            print(f"  {s['strategy']}, sample {s['sample']}: bnlab evaluate_pretrained {s['evaluate_pretrained']:.9g}  |diff| {diff:.3g}")
            if diff > TOL:
                failures.append(f"{s['strategy']}: evaluate_pretrained {s['evaluate_pretrained']} vs python {want}")
        bns = [i for i, m in enumerate(model) if isinstance(m, torch.nn.BatchNorm1d)]
        if cfg["model"]["batchnorm"]["semantics"] == "keras" and bns:
            after = list(model)[bns[-1] + 1:]
            if not any(isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm1d)) for m in after):
                for t in (s for s in summary["runs"] if s["strategy"] == "train"):
                    k = row[int(t["sample"])]
                    with torch.no_grad():
                        h = model[bns[-1]].bias.detach().unsqueeze(0)  # last BN outputs beta
                        for m in after:                                # then what follows it, the head last
                            h = m(h)
                        want = float(loss_fn(cfg["model"]["loss"], h, y[k:k + 1]))
                    got = t["loss"][0]
                    print(f"  train loss[1], sample {t['sample']}: bnlab {got:.9g}  python (BN outputs beta) {want:.9g}")
                    if abs(got - want) > TOL * max(1.0, abs(want)):
                        failures.append(f"train loss[1] {got} vs hand-derived {want}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("interop OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
