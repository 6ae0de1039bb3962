#!/usr/bin/python3
"""The PyTorch user's own files, written the way a PyTorch user writes them, with Debian's python3-torch.

Run: /usr/bin/python3 tests/torch/make_fixtures.py
Output, in tests/torch/fixtures/ (torch.manual_seed(0) and numpy's default_rng(0): the tensors are the
same at every rerun; the zip bytes depend on the torch version that writes them):

  data.csv        header f0..f4,y and 64 rows; y = tanh(f0) + 0.5*f1*f2 + normal(0, 0.1)
  <stem>.sd.pt    torch.save(model.state_dict())
  <stem>.ckpt.pt  torch.save({"state_dict": ..., "epoch": 5, "optimizer": opt.state_dict()}): a training checkpoint
  <stem>.ts.pt    torch.jit.save(torch.jit.script(model))
  dense_bn_relu.dp.pt         {"model_state_dict": torch.nn.DataParallel(model).state_dict(), "epoch": 5}:
                              every name under "module."
  dense_bn_relu.lightning.pt  Lightning's layout: "state_dict" with every name under "model." plus a
                              loss module's tensor outside it, "hyper_parameters" an AttributeDict (a
                              dict subclass), "optimizer_states", "pytorch-lightning_version"
  expected.json   per network: its modules (in the form of bnlab's architecture.json, derived here
                  from the torch.nn modules), the prefix to use per file, the fine-tuning rows (pick_rows:
                  residual at least the prediction, squared error >= 0.05) and their eval-mode MSE (features as
                  they are) computed by the module Python loads from each file

Networks (5 inputs, each trained for 30 Adam steps in training mode so that weights and running
statistics are not their initial values):
  dense_bn_relu          Linear(5,8) BatchNorm1d(8, eps=1e-4, momentum=0.2) ReLU Linear(8,6) BatchNorm1d(6)
                         ReLU Linear(6,1): BN after Linear, non-default eps and momentum
  bn_inputs              BatchNorm1d(5) Linear(5,8) Tanh Linear(8,1): BN on the inputs
  dense_relu_bn_dropout  Linear(5,8) ReLU Dropout(0.25) BatchNorm1d(8, momentum=0.05) Linear(8,1): BN after
                         an activation and Dropout (fold puts it into the Linear after it)

Files bnlab must refuse (exit 2, naming what is wrong):
  bad_missing.sd.pt    dense_bn_relu's state dict without "1.running_var"
  bad_shape.sd.pt      dense_bn_relu's with "3.weight" of shape [6, 7] instead of [6, 8]
  bad_layernorm.ts.pt  a scripted Sequential(Linear, LayerNorm, Linear)
  bad_traced.ts.pt     torch.jit.trace of dense_bn_relu: traced modules record no eps/momentum/in_features
  bad_legacy.pt        dense_bn_relu's state dict with _use_new_zipfile_serialization=False
  bad_module.pt        torch.save(model): a whole pickled nn.Module
  bad_expanded.sd.pt   {"0.weight": torch.zeros(1).expand(8, 5)}: 40 elements over a storage of 1 (stride 0)
"""
import csv
import json
import os

import numpy as np
import torch
import torch.nn as nn

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
MIN_MSE = 0.05  # see pick_rows


class AttributeDict(dict):
    """Lightning's hyper_parameters type: a dict subclass, pickled as __main__.AttributeDict."""


def networks():
    return {
        "dense_bn_relu": nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, eps=1e-4, momentum=0.2), nn.ReLU(),
                                       nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 1)),
        "bn_inputs": nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)),
        "dense_relu_bn_dropout": nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.25),
                                               nn.BatchNorm1d(8, momentum=0.05), nn.Linear(8, 1)),
    }


def modules(seq):
    """The modules in the form of bnlab's architecture.json, read off the torch.nn objects."""
    out = []
    linears = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            out.append({"kind": "dense", "in": m.in_features, "out": m.out_features, "use_bias": m.bias is not None,
                        "head": i == linears[-1]})
        elif isinstance(m, nn.BatchNorm1d):
            out.append({"kind": "batchnorm", "out": m.num_features, "eps": m.eps, "momentum": m.momentum,
                        "center": m.affine, "scale": m.affine})
        elif isinstance(m, nn.ReLU):
            out.append({"kind": "activation", "activation": "relu"})
        elif isinstance(m, nn.Tanh):
            out.append({"kind": "activation", "activation": "tanh"})
        elif isinstance(m, nn.Dropout):
            out.append({"kind": "dropout", "rate": m.p})
        else:
            raise SystemExit(f"make_fixtures: no mapping for {type(m).__name__}")
    return out


def mse(model, x, y, rows):
    model.eval()
    with torch.no_grad():
        return {str(r): float((model(x[r:r + 1]) - y[r:r + 1]).square().mean()) for r in rows}


def pick_rows(model, x, y):
    """The first three rows whose eval-mode residual is at least as large as the prediction and whose
    squared error is at least MIN_MSE. The loss of one row is (pred - y)^2: one float32 rounding of
    pred (relative 6e-8) moves it by 2 * 6e-8 * |pred / (pred - y)| relative, so on rows whose residual
    is small next to the prediction two correct engines that sum in different orders differ by more
    than 1e-6; on these rows the amplification is at most 2."""
    model.eval()
    with torch.no_grad():
        pred = model(x)[:, 0]
    res = pred - y[:, 0]
    return [r for r in range(len(x)) if res[r].abs() >= pred[r].abs() and res[r] ** 2 >= MIN_MSE][:3]


def main():
    os.makedirs(HERE, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    f = rng.normal(size=(64, 5)).astype(np.float32)
    target = (np.tanh(f[:, 0]) + 0.5 * f[:, 1] * f[:, 2] + rng.normal(0, 0.1, size=64)).astype(np.float32)
    with open(os.path.join(HERE, "data.csv"), "w", newline="") as out:
        w = csv.writer(out)
        w.writerow([f"f{i}" for i in range(5)] + ["y"])
        for r in range(64):
            w.writerow([repr(float(v)) for v in f[r]] + [repr(float(target[r]))])
    # bnlab reads the CSV as float32, so the reference uses exactly the values written.
    x = torch.tensor(f)
    y = torch.tensor(target).reshape(-1, 1)
    expected = {"made_by": "tests/torch/make_fixtures.py with python3-torch " + torch.__version__}
    path = lambda name: os.path.join(HERE, name)  # noqa: E731
    for stem, model in networks().items():
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model.train()
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            idx = torch.randperm(64, generator=g)[:16]
            opt.zero_grad()
            (model(x[idx]) - y[idx]).square().mean().backward()
            opt.step()
        model.eval()
        rows = pick_rows(model, x, y)
        files = {"sd": f"{stem}.sd.pt", "ckpt": f"{stem}.ckpt.pt", "ts": f"{stem}.ts.pt"}
        torch.save(model.state_dict(), path(files["sd"]))
        torch.save({"state_dict": model.state_dict(), "epoch": 5, "optimizer": opt.state_dict()}, path(files["ckpt"]))
        torch.jit.save(torch.jit.script(model), path(files["ts"]))
        prefixes = {"sd": "", "ckpt": "", "ts": ""}
        if stem == "dense_bn_relu":
            files["dp"] = f"{stem}.dp.pt"
            torch.save({"model_state_dict": nn.DataParallel(model).state_dict(), "epoch": 5}, path(files["dp"]))
            prefixes["dp"] = "module."
            files["lightning"] = f"{stem}.lightning.pt"
            sd = {"model." + k: v for k, v in model.state_dict().items()}
            sd["loss_fn.pos_weight"] = torch.ones(1)
            torch.save({"epoch": 5, "global_step": 120, "pytorch-lightning_version": "2.1.0", "state_dict": sd,
                        "hyper_parameters": AttributeDict(hidden=[8, 6], lr=0.01),
                        "optimizer_states": [opt.state_dict()]}, path(files["lightning"]))
            prefixes["lightning"] = "model."
            bad = dict(model.state_dict())
            del bad["1.running_var"]
            torch.save(bad, path("bad_missing.sd.pt"))
            bad = dict(model.state_dict())
            bad["3.weight"] = torch.zeros(6, 7)
            torch.save(bad, path("bad_shape.sd.pt"))
            torch.save(model.state_dict(), path("bad_legacy.pt"), _use_new_zipfile_serialization=False)
            torch.save(model, path("bad_module.pt"))
            torch.save({"0.weight": torch.zeros(1).expand(8, 5)}, path("bad_expanded.sd.pt"))
            torch.jit.save(torch.jit.trace(model, x[:4]), path("bad_traced.ts.pt"))
        # What Python computes with the module it loads from each file.
        loaded = {}
        for form, name in files.items():
            if form == "ts":
                loaded[form] = mse(torch.jit.load(path(name)), x, y, rows)
                continue
            m = networks()[stem]
            obj = torch.load(path(name))
            sd = obj if form == "sd" else obj["model_state_dict" if form == "dp" else "state_dict"]
            p = prefixes[form]
            m.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
            loaded[form] = mse(m, x, y, rows)
        expected[stem] = {"rows": rows, "files": files, "prefix": prefixes, "modules": modules(model), "mse": loaded}
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 1))), path("bad_layernorm.ts.pt"))
    with open(path("expected.json"), "w") as out:
        json.dump(expected, out, indent=1, sort_keys=True)
        out.write("\n")
    print(f"wrote {len(os.listdir(HERE))} files to {HERE}")


if __name__ == "__main__":
    main()
