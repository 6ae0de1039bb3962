#!/usr/bin/env python3
"""Golden values for bnlab's presets under PyTorch semantics, made with Python PyTorch.

Every preset is written the way a PyTorch user writes it, with PyTorch's own API and no bnlab
code: requires_grad_(False), bn.momentum = 0, bn.eval() re-applied after every train(),
torch.optim.swa_utils.update_bn for PreciseBN-style recalibration,
torch.nn.utils.fusion.fuse_linear_bn_eval for folding, and flipping bn.track_running_stats
on the existing module with its buffers dropped (TENT's recipe), Lightning's
BaseFinetuning.freeze_module (track_running_stats flipped on the module, buffers kept),
torchvision's FrozenBatchNorm2d formula for 1-D, bn.eval() undone by model.train(), and
prior-weighted BatchNorm written after bethgelab/robusta's BayesianBatchNorm (a momentum-1
BatchNorm for the batch statistics, mixed with the running ones by the prior p). A second
section ("keras") runs prior_bn under Keras numerics (biased batch variance) on ONE sample in
batches of one. Fine-tuning follows Keras' fit semantics
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
    "finetune": {"sample": 0, "epochs": 3, "batch_size": 2, "shuffle": False,
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                 "monitor": "loss", "save_best_only": False},
    "strategies": ["train", "freeze_affine", "momentum_zero", "freeze_affine_momentum_zero",
                   "eval", "frozen", "recalibrate_frozen", "fold", "batch_stats",
                   "prior_bn", {"name": "prior_half", "preset": "prior_bn", "prior": 0.5},
                   "lightning_freeze", "frozen_bn_module", "torch_eval_then_train"],
}
# Keras numerics, one sample, batches of one: the case prior_bn is for.
KERAS_CONFIG = json.loads(json.dumps(CONFIG))
KERAS_CONFIG["name"] = "golden_keras_prior"
KERAS_CONFIG["model"]["batchnorm"] = {"semantics": "keras", "eps": 1e-3, "momentum": 0.01}
KERAS_CONFIG["finetune"].update({"epochs": 4, "batch_size": 1})
KERAS_CONFIG["strategies"] = ["prior_bn", {"name": "prior_half", "preset": "prior_bn", "prior": 0.5},
                              {"name": "prior_quarter", "preset": "prior_bn", "prior": 0.25}]
KERAS_CONFIG["strategies"] += ["renorm", {"name": "renorm_unclipped", "preset": "renorm", "renorm_clipping": {}},
                               {"name": "renorm_keras_init", "preset": "renorm", "renorm_init": "keras",
                                "renorm_momentum": 0.3}]
# Keras numerics on the four samples in batches of two: renorm with real batches.
KERAS_ROWS_CONFIG = json.loads(json.dumps(KERAS_CONFIG))
KERAS_ROWS_CONFIG["name"] = "golden_keras_rows"
KERAS_ROWS_CONFIG["finetune"].update({"epochs": 3, "batch_size": 2})
KERAS_ROWS_CONFIG["strategies"] = ["renorm", {"name": "renorm_unclipped", "preset": "renorm", "renorm_clipping": {}},
                                   {"name": "renorm_tight", "preset": "renorm", "renorm_momentum": 0.5,
                                    "renorm_clipping": {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}}]
# The four samples as one set in ONE batch of four (finetune.sets with batch_size = k), under
# torch numerics for every preset that numerics allow, and renorm under Keras numerics.
SETS_B4_CONFIG = json.loads(json.dumps(CONFIG))
SETS_B4_CONFIG["name"] = "golden_sets_b4"
SETS_B4_CONFIG["finetune"]["batch_size"] = 4
KERAS_ROWS_B4_CONFIG = json.loads(json.dumps(KERAS_ROWS_CONFIG))
KERAS_ROWS_B4_CONFIG["name"] = "golden_keras_rows_b4"
KERAS_ROWS_B4_CONFIG["finetune"]["batch_size"] = 4
# Batches of two, each epoch in the order bnlab's finetune.shuffle draws (epoch_orders below).
SHUFFLED_CONFIG = json.loads(json.dumps(CONFIG))
SHUFFLED_CONFIG["name"] = "golden_shuffled"
SHUFFLED_CONFIG["finetune"]["shuffle"] = True
MASK64 = (1 << 64) - 1
PRIOR_BN_DEFAULT = 16.0 / 17.0  # bnlab's prior_bn preset: N = 16 against n = 1
RENORM_CLIPPING = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}  # bnlab's renorm preset
RECALIBRATE_BATCHES = 100  # bnlab's recalibrate_frozen default


def splitmix64(state):
    """One step of splitmix64 (Steele, Lea and Flood 2014): (new state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def epoch_orders(seed, run_id, k, epochs):
    """The rows' order in each epoch as docs/config.md specifies finetune.shuffle: a stream
    started at (seed * 1000003 + id) XOR 0x53485546464C45, each epoch a Fisher-Yates shuffle
    of 0..k-1 (j = next % (i + 1) for i = k-1 down to 1)."""
    state = ((seed * 1000003 + run_id) & MASK64) ^ 0x53485546464C45
    orders = []
    for _ in range(epochs):
        order = list(range(k))
        for i in range(k - 1, 0, -1):
            state, v = splitmix64(state)
            j = v % (i + 1)
            order[i], order[j] = order[j], order[i]
        orders.append(order)
    return orders


def name_of(strategy):
    return strategy if isinstance(strategy, str) else strategy["name"]


def prior_of(strategy):
    if isinstance(strategy, dict) and "prior" in strategy:
        return strategy["prior"]
    return PRIOR_BN_DEFAULT


class PriorBatchNorm(torch.nn.Module):
    """Prior-weighted BatchNorm (Schneider et al. 2020) after robusta's BayesianBatchNorm: the
    batch statistics come from a momentum-1 BatchNorm1d (PyTorch: unbiased variance) or, for
    Keras numerics, from the biased moments; both are buffers, so constants in the gradient.
    In eval mode it is the wrapped layer's inference (bnlab's definition: evaluation uses the
    running statistics, which prior_bn never updates)."""

    def __init__(self, layer, prior, keras):
        super().__init__()
        self.layer, self.prior, self.keras = layer, prior, keras
        self.norm = torch.nn.BatchNorm1d(layer.num_features, affine=False, momentum=1.0)

    def train(self, mode=True):
        super().train(mode)
        self.layer.eval()  # the wrapped layer's buffers never move
        return self

    def forward(self, x):
        if not self.training:
            return self.layer(x)
        if self.keras:
            bm, bv = x.detach().mean(0), x.detach().var(0, unbiased=False)
        else:
            self.norm(x)
            bm, bv = self.norm.running_mean, self.norm.running_var
        p = self.prior
        mean = p * self.layer.running_mean + (1 - p) * bm
        var = p * self.layer.running_var + (1 - p) * bv
        return torch.nn.functional.batch_norm(x, mean, var, self.layer.weight, self.layer.bias, False, 0.0, self.layer.eps)


class BatchRenorm1d(torch.nn.Module):
    """Batch renormalization written from Ioffe (2017) and Keras 3.14's BatchNormalization
    (renorm=True) with its torch backend: x-hat = (x - mean) / sqrt(var + eps) with the batch's
    biased moments; r = sigma_B / max(renorm_stddev, sqrt(eps)), d = (mean - renorm_mean) / the
    same, clipped, without gradient; y = (x - mean) * (rsqrt(var + eps) * r * gamma) + d * gamma
    + beta. Then Keras' moving averages (momentum K = 1 - m): renorm_mean/renorm_stddev with the
    renorm momentum, moving mean/stddev with the layer's, moving variance = relu(stddev^2 - eps).
    The renorm statistics start from the moving ones (renorm_init "moving") or at 0, 1, 1."""

    def __init__(self, bn, clipping, renorm_momentum, keras_init):
        super().__init__()
        self.weight, self.bias = bn.weight, bn.bias
        self.eps, self.m, self.mr, self.clip = bn.eps, bn.momentum, renorm_momentum, clipping
        std = (bn.running_var + bn.eps).sqrt()
        for k, v in (("running_mean", bn.running_mean), ("running_var", bn.running_var),
                     ("num_batches_tracked", bn.num_batches_tracked),
                     ("renorm_mean", torch.zeros_like(std) if keras_init else bn.running_mean),
                     ("renorm_stddev", torch.ones_like(std) if keras_init else std),
                     ("moving_stddev", torch.ones_like(std) if keras_init else std)):
            self.register_buffer(k, v.detach().clone())

    def forward(self, x):
        if not self.training:
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                                  False, 0.0, self.eps)
        mean = x.mean(0)
        var = ((x - mean) ** 2).mean(0)
        with torch.no_grad():
            std = torch.sqrt(var + self.eps)
            s = torch.maximum(self.renorm_stddev, torch.sqrt(torch.tensor(self.eps, dtype=torch.float32)))
            r, d = std / s, (mean - self.renorm_mean) / s
            if "rmin" in self.clip:
                r = torch.clamp_min(r, self.clip["rmin"])
            if "rmax" in self.clip:
                r = torch.clamp_max(r, self.clip["rmax"])
            if "dmax" in self.clip:
                d = torch.clamp(d, -self.clip["dmax"], self.clip["dmax"])
        out = (x - mean) * (torch.rsqrt(var + self.eps) * (r * self.weight)) + (d * self.weight + self.bias)
        with torch.no_grad():
            k, kr = 1.0 - self.m, 1.0 - self.mr
            self.num_batches_tracked += 1
            self.renorm_mean.copy_(self.renorm_mean * kr + mean * (1.0 - kr))
            self.renorm_stddev.copy_(self.renorm_stddev * kr + std * (1.0 - kr))
            self.running_mean.copy_(self.running_mean * k + mean * (1.0 - k))
            self.moving_stddev.copy_(self.moving_stddev * k + std * (1.0 - k))
            self.running_var.copy_(torch.relu(self.moving_stddev * self.moving_stddev - self.eps))
        return out


class FrozenBatchNorm1d(torch.nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's formula (also timm's and detectron2's) for [N, C]."""

    def __init__(self, bn):
        super().__init__()
        for k in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(k, getattr(bn, k).detach().clone())
        self.eps = bn.eps

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale + (self.bias - self.running_mean * scale)


def build(config=None):
    m = (config or CONFIG)["model"]
    bn = m["batchnorm"]
    layers, width = [], CONFIG["data"]["features"]
    for h in m["hidden"]:
        layers += [torch.nn.Linear(width, h), torch.nn.BatchNorm1d(h, eps=bn["eps"], momentum=bn["momentum"]),
                   torch.nn.Tanh()]
        width = h
    layers.append(torch.nn.Linear(width, (config or CONFIG)["data"]["targets"]))
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


def run(strategy, state, x, y, pre_x, config=None):
    config = config or CONFIG
    preset = name_of(strategy)
    keras = config["model"]["batchnorm"]["semantics"] == "keras"
    model = build(config)
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
    if preset.startswith("prior"):
        model = torch.nn.Sequential(*[PriorBatchNorm(l, prior_of(strategy), keras) if isinstance(l, torch.nn.BatchNorm1d)
                                      else l for l in model])
    if preset.startswith("renorm"):
        clipping = strategy.get("renorm_clipping", RENORM_CLIPPING) if isinstance(strategy, dict) else RENORM_CLIPPING
        momentum = strategy.get("renorm_momentum") if isinstance(strategy, dict) else None
        keras_init = isinstance(strategy, dict) and strategy.get("renorm_init") == "keras"
        model = torch.nn.Sequential(*[BatchRenorm1d(l, clipping, l.momentum if momentum is None else momentum, keras_init)
                                      if isinstance(l, torch.nn.BatchNorm1d) else l for l in model])
    if preset == "frozen_bn_module":
        model = torch.nn.Sequential(*[FrozenBatchNorm1d(l) if isinstance(l, torch.nn.BatchNorm1d) else l for l in model])
    if preset == "torch_eval_then_train":
        for b in bns(model):
            b.eval()  # undone by the model.train() each epoch starts with: the trap
    for b in bns(model):
        if preset == "lightning_freeze":
            # Lightning's BaseFinetuning.freeze_module on a BatchNorm (freeze(train_bn=False)).
            b.track_running_stats = False
            for param in b.parameters(recurse=False):
                param.requires_grad = False
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
    opt_cfg = config["finetune"]["optimizer"]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=opt_cfg["lr"], momentum=opt_cfg["momentum"])
    losses, val_losses = [], []
    bs = config["finetune"]["batch_size"]
    epochs = config["finetune"]["epochs"]
    k = x.shape[0]
    if config["finetune"]["shuffle"] and k > 1:
        orders = epoch_orders(config["seed"], config["finetune"]["sample"], k, epochs)
    else:
        orders = [list(range(k))] * epochs
    for epoch in range(epochs):
        model.train()
        if eval_mode:
            for b in bns(model):
                b.eval()
        total = 0.0
        xs, ys = x[orders[epoch]], y[orders[epoch]]
        for start in range(0, k, bs):
            xb, yb = xs[start:start + bs], ys[start:start + bs]
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
        # Named as bnlab names them: a PriorBatchNorm's wrapped layer is the BatchNorm itself.
        "state": {k.replace(".layer.", "."): v.detach().flatten().tolist() for k, v in model.state_dict().items()
                  if ".norm." not in k},
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
        "presets": {name_of(p): run(p, state, x, y, pre_x) for p in CONFIG["strategies"]},
        # Keras numerics: the first sample alone, batches of one.
        "keras": {"config": KERAS_CONFIG,
                  "presets": {name_of(p): run(p, state, x[:1], y[:1], pre_x, KERAS_CONFIG) for p in KERAS_CONFIG["strategies"]}},
        # Keras numerics: all four samples in batches of two.
        "keras_rows": {"config": KERAS_ROWS_CONFIG,
                       "presets": {name_of(p): run(p, state, x, y, pre_x, KERAS_ROWS_CONFIG)
                                   for p in KERAS_ROWS_CONFIG["strategies"]}},
        # One set of the four samples in one batch of four.
        "sets_b4": {"config": SETS_B4_CONFIG,
                    "presets": {name_of(p): run(p, state, x, y, pre_x, SETS_B4_CONFIG) for p in SETS_B4_CONFIG["strategies"]}},
        "keras_rows_b4": {"config": KERAS_ROWS_B4_CONFIG,
                          "presets": {name_of(p): run(p, state, x, y, pre_x, KERAS_ROWS_B4_CONFIG)
                                      for p in KERAS_ROWS_B4_CONFIG["strategies"]}},
        # Batches of two in the shuffled order of each epoch.
        "shuffled": {"config": SHUFFLED_CONFIG,
                     "orders": epoch_orders(SHUFFLED_CONFIG["seed"], 0, 4, SHUFFLED_CONFIG["finetune"]["epochs"]),
                     "presets": {name_of(p): run(p, state, x, y, pre_x, SHUFFLED_CONFIG) for p in SHUFFLED_CONFIG["strategies"]}},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
