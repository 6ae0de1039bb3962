#!/usr/bin/env python3
"""Golden values for the nine presets under PyTorch semantics, made with Python PyTorch.

Every preset is written the way a PyTorch user writes it, with PyTorch's own API and no bnlab
code: requires_grad_(False), bn.momentum = 0, bn.eval() re-applied after every train(),
torch.optim.swa_utils.update_bn for PreciseBN-style recalibration,
torch.nn.utils.fusion.fuse_linear_bn_eval for folding, and flipping bn.track_running_stats
on the existing module with its buffers dropped (TENT's recipe). Fine-tuning follows Keras' fit semantics
(loss recorded before each update, val_loss in eval mode after the epoch), on a batch of 4
samples in batches of 2, so PyTorch's BatchNorm can run in training mode.

Run:  /usr/bin/python3 tests/golden/make_torch_presets.py > tests/golden/torch_presets.json
"""
import json

import torch
from torch.nn.utils.fusion import fuse_linear_bn_eval
from torch.optim.swa_utils import update_bn

CONFIG = {
    "name": "golden_torch_presets",
    "seed": 11,
    "data": {"source": "synthetic", "samples": 24, "features": 4, "targets": 2},
    "model": {"hidden": [6, 5], "activation": "tanh", "loss": "mse",
              "batchnorm": {"semantics": "torch", "eps": 1e-5, "momentum": 0.1}},
    "pretrain": {"epochs": 1, "batch_size": 5},
    "finetune": {"sample": 0, "epochs": 3, "batch_size": 2,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                 "monitor": "loss", "save_best_only": False},
    "strategies": ["train", "freeze_affine", "momentum_zero", "freeze_affine_momentum_zero",
                   "eval", "frozen", "recalibrate_frozen", "fold", "batch_stats"],
}
RECALIBRATE_BATCHES = 100  # bnlab's recalibrate_frozen default


def build():
    m = CONFIG["model"]
    bn = m["batchnorm"]
    layers, width = [], CONFIG["data"]["features"]
    for h in m["hidden"]:
        layers += [torch.nn.Linear(width, h), torch.nn.BatchNorm1d(h, eps=bn["eps"], momentum=bn["momentum"]),
                   torch.nn.Tanh()]
        width = h
    layers.append(torch.nn.Linear(width, CONFIG["data"]["targets"]))
    return torch.nn.Sequential(*layers)


def bns(model):
    return [l for l in model if isinstance(l, torch.nn.BatchNorm1d)]


def precise_bn_batches(x, batches, batch_size, seed):
    """The shuffled batches bnlab's recalibration draws (fresh permutation, no short batch)."""
    g = torch.Generator().manual_seed(seed)
    n, pos, perm, out = x.shape[0], x.shape[0], None, []
    for _ in range(batches):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        out.append(x[perm[pos:pos + batch_size]])
        pos += batch_size
    return out


def fold(model):
    layers, items, i = [], list(model), 0
    while i < len(items):
        if isinstance(items[i], torch.nn.Linear) and i + 1 < len(items) and isinstance(items[i + 1], torch.nn.BatchNorm1d):
            layers.append(fuse_linear_bn_eval(items[i].eval(), items[i + 1].eval()))
            i += 2
        else:
            layers.append(items[i])
            i += 1
    return torch.nn.Sequential(*layers)


def run(preset, state, x, y, pre_x):
    model = build()
    model.load_state_dict(state)
    loss_fn = lambda out, t: ((out - t) ** 2).mean()
    with torch.no_grad():
        model.eval()
        evaluate_pretrained = float(loss_fn(model(x), y))
    eval_mode = preset in ("eval", "frozen", "recalibrate_frozen")
    if preset == "recalibrate_frozen":
        counts = [b.num_batches_tracked.clone() for b in bns(model)]
        update_bn(precise_bn_batches(pre_x, RECALIBRATE_BATCHES, CONFIG["pretrain"]["batch_size"], CONFIG["seed"] + 2), model)
        for b, c in zip(bns(model), counts):  # bnlab leaves the counters as they were
            b.num_batches_tracked.copy_(c)
    if preset == "fold":
        model = fold(model)
    with torch.no_grad():
        model.eval()
        evaluate_before = float(loss_fn(model(x), y))
    for b in bns(model):
        if preset in ("freeze_affine", "freeze_affine_momentum_zero", "frozen", "recalibrate_frozen"):
            b.weight.requires_grad_(False)
            b.bias.requires_grad_(False)
        if preset in ("momentum_zero", "freeze_affine_momentum_zero"):
            b.momentum = 0.0
        if preset == "batch_stats":
            # TENT's recipe: batch statistics in training AND eval. (Python needs the buffers
            # dropped for eval to use batch statistics; LibTorch's flipped option keeps and
            # updates them instead, which changes no output. See tests/golden/README.md.)
            b.track_running_stats = False
            b.running_mean = None
            b.running_var = None
    opt_cfg = CONFIG["finetune"]["optimizer"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=opt_cfg["lr"], momentum=opt_cfg["momentum"])
    losses, val_losses = [], []
    bs = CONFIG["finetune"]["batch_size"]
    for _ in range(CONFIG["finetune"]["epochs"]):
        model.train()
        if eval_mode:
            for b in bns(model):
                b.eval()
        total = 0.0
        for start in range(0, x.shape[0], bs):
            xb, yb = x[start:start + bs], y[start:start + bs]
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            total += float(loss) * xb.shape[0]
            loss.backward()
            opt.step()
        losses.append(total / x.shape[0])
        model.eval()
        with torch.no_grad():
            val_losses.append(float(loss_fn(model(x), y)))
    return {
        "evaluate_pretrained": evaluate_pretrained,
        "evaluate_before": evaluate_before,
        "loss": losses,
        "val_loss": val_losses,
        "state": {k: v.detach().flatten().tolist() for k, v in model.state_dict().items()},
    }


def main():
    torch.manual_seed(CONFIG["seed"])
    model = build()
    pre_x = torch.randn(CONFIG["data"]["samples"], CONFIG["data"]["features"])
    # Give the BatchNorm layers non-trivial running statistics and affine parameters.
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(pre_x * 2 + 0.5)
        for b in bns(model):
            b.weight.uniform_(0.5, 1.5)
            b.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, CONFIG["data"]["features"])
    y = torch.randn(4, CONFIG["data"]["targets"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {
        "made_by": "tests/golden/make_torch_presets.py with Python torch " + torch.__version__,
        "config": CONFIG,
        "pretrain_x": pre_x.flatten().tolist(),
        "x": x.flatten().tolist(),
        "y": y.flatten().tolist(),
        "initial_state": {k: v.flatten().tolist() for k, v in state.items()},
        "presets": {p: run(p, state, x, y, pre_x) for p in CONFIG["strategies"]},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
