#!/usr/bin/python3
"""Independent Python re-implementation of bnlab's single-sample fine-tuning, checked against a run.

Usage:  /usr/bin/python3 scripts/reference.py RUN_DIR [--tol 1e-5] [--relative]
                                            [--layers JSON:KEY --weights FILE [--prefix P]]

From RUN_DIR it reads config.resolved.json, architecture.json (the module list), the pretrained weights (pretrained.pt or
pretrained_seed<S>.pt), the samples (sample.pt or sample_seed<S>.pt) and curves.csv. For every
(grid point, strategy, seed, sample) it rebuilds the network from the recorded layer list and the
state dict with plain tensor ops (F.linear, its own Keras/Torch BatchNorm, FrozenBatchNorm, the
activations through torch.nn.functional, dropout drawn from
Generator(S*1000003 + i)); prepares it (PreciseBN recalibration over the regenerated pretraining
data, folding, frozen BN modules); and fine-tunes it with Keras fit semantics (loss of the
forward pass before each update, val_loss in inference mode with the strategy applied) using
torch.optim. It shares no code with bnlab. It prints max |diff| of loss and val_loss per run
against curves.csv, and compares evaluate_before/evaluate_after with summary.json where it finds
the run there. Extra checks: the regenerated data set reproduces sample.pt's rows (x_raw, x, y).
Exit 0 if every diff <= tol, 1 otherwise, 2 on bad usage or missing/unreadable files.
Also reads bnlab's older layout (`seed`, `finetune.sample`, no `grid` column, [1,F] sample.pt, no
architecture.json: the network then comes from the config's `model.hidden` shorthand).
Integer `layers` are positions among the model's BatchNorm layers as built, also after some of them
became FrozenBatchNorm (bn_module: frozen). Uses one intra-op thread, bnlab's default.
With --layers and --weights the network does not come from the run directory at all: the module list
is entry KEY's "modules" of the JSON file (e.g. tests/torch/fixtures/expected.json), and the weights
are the user's own PyTorch file as Python loads it: torch.jit.load for a TorchScript module,
torch.load otherwise (a dict of tensors, or its "state_dict"/"model_state_dict"/"model" entry), with
--prefix stripped from the names.
"""
import argparse
import copy
import csv
import itertools
import json
import math
import os
import pickle
import sys
from types import SimpleNamespace as NS

import numpy as np
import torch
import torch.nn.functional as F

LOG2PI = math.log(2.0 * math.pi)


def die(msg):
    print(f"reference: error: {msg}", file=sys.stderr)
    sys.exit(2)


def loss_fn(kind, out, y):
    if kind == "gaussian_nll":
        mean, log_var = out.chunk(2, 1)  # first T outputs: mean, next T: log variance
        return (0.5 * (log_var + (y - mean).square() / torch.exp(log_var) + LOG2PI)).mean()
    if kind == "mse":
        return (out - y).square().mean()
    return F.cross_entropy(out, y[:, 0].long())


# ---------------------------------------------------------------- data (for recalibration)
def synthetic(d, loss, seed):
    """lib/src/data.cpp make_synthetic: one generator, fixed draw order. Returns x_raw, y."""
    g = torch.Generator().manual_seed(int(seed))
    n, f = d["samples"], d["features"]
    x = torch.randn(n, f, generator=g)
    col = lambda i: x[:, i % f]  # noqa: E731
    nonlinear = (0.5 * torch.tanh(col(0) * col(1)) + 0.25 * torch.sin(col(2))).unsqueeze(1)
    if loss == "cross_entropy":
        w = torch.randn(f, d["classes"], generator=g) / math.sqrt(f)
        logits = torch.matmul(x, w) + nonlinear + d["noise"] * torch.randn(n, d["classes"], generator=g)
        return x, logits.argmax(1, keepdim=True).float()
    w = torch.randn(f, d["targets"], generator=g) / math.sqrt(f)
    mean = d["scale"] * (torch.matmul(x, w) + nonlinear)
    sigma = d["noise"] * torch.exp(0.5 * torch.tanh(col(3))).unsqueeze(1)
    return x, mean + sigma * torch.randn(n, d["targets"], generator=g)


def csv_data(d, run_dir):
    """The CSV file, standardized later; a relative path is tried from the cwd, the run directory and the
    directory of the config named in manifest.json's argv (bnlab resolves it from the config's directory)."""
    manifest = os.path.join(run_dir, "manifest.json")
    argv = load(manifest).get("argv", []) if os.path.isfile(manifest) else []
    cands = [d["path"], os.path.join(run_dir, d["path"])]
    cands += [os.path.join(os.path.dirname(a), d["path"]) for a in argv if a.endswith(".json")]
    path = next((p for p in cands if os.path.isfile(p)), None)
    if path is None:
        return None
    with open(path, newline="") as fh:
        rows = [[c.strip() for c in r] for r in csv.reader(fh) if any(c.strip() for c in r)]
    header, body = rows[0], rows[1:]
    tcols = d["target_columns"]
    fcols = d.get("feature_columns") or [h for h in header if h not in tcols]
    pick = lambda cols: np.array([[float(r[header.index(c)]) for c in cols] for r in body],  # noqa: E731
                                 dtype=np.float64).astype(np.float32)
    return torch.from_numpy(pick(fcols)), torch.from_numpy(pick(tcols))


# ---------------------------------------------------------------- model
ACT = {"relu": lambda x, a: torch.relu(x), "tanh": lambda x, a: torch.tanh(x), "gelu": lambda x, a: F.gelu(x),
       "sigmoid": lambda x, a: torch.sigmoid(x), "elu": lambda x, a: F.elu(x, alpha=a),
       "leaky_relu": lambda x, a: F.leaky_relu(x, negative_slope=a), "silu": lambda x, a: F.silu(x),
       "softplus": lambda x, a: F.softplus(x), "linear": lambda x, a: x}


def recorded_layers(rd, cfg):
    """The module list: architecture.json as bnlab records it, or, for older run directories, the
    shorthand of their config (per width: Linear, BatchNorm if enabled, activation, Dropout if > 0)."""
    path = os.path.join(rd, "architecture.json")
    if os.path.isfile(path):
        return load(path)["layers"]
    m, b = cfg["model"], cfg["model"]["batchnorm"]
    out = []
    for h in list(m["hidden"]) + [None]:
        out.append({"kind": "dense", "use_bias": True, "head": h is None})
        if h is None:
            break
        if b["enabled"]:
            out.append({"kind": "batchnorm", "eps": b["eps"], "momentum": b["momentum"], "center": b["affine"],
                        "scale": b["affine"]})
        out.append({"kind": "activation", "activation": m["activation"]})
        if m["dropout"] > 0:
            out.append({"kind": "dropout", "rate": m["dropout"]})
    return out


def build(arch, sd):
    """Modules from the recorded list; a module's name is its position, as in torch.nn.Sequential."""
    layers = []
    par = lambda k: sd[f"{len(layers)}.{k}"].detach().clone().requires_grad_(True)  # noqa: E731
    buf = lambda k: sd[f"{len(layers)}.{k}"].detach().clone()  # noqa: E731
    for a in arch:
        kind = a["kind"]
        if kind == "dense":
            layers.append(NS(kind="linear", w=par("weight"), b=par("bias") if a["use_bias"] else None))
        elif kind == "batchnorm":
            layers.append(NS(kind="bn", name=str(len(layers)), pos=sum(L.kind == "bn" for L in layers),
                             eps=a["eps"], momentum=a["momentum"], base_m=a["momentum"], track=True, force_eval=False,
                             gamma=par("weight") if a["scale"] else None, beta=par("bias") if a["center"] else None,
                             rm=buf("running_mean"), rv=buf("running_var"), nbt=buf("num_batches_tracked")))
        elif kind == "activation":
            layers.append(NS(kind="act", fn=ACT[a["activation"]], alpha=a.get("negative_slope", a.get("alpha", 0.0))))
        elif kind == "dropout":
            layers.append(NS(kind="dropout", p=a["rate"]))
        else:
            die(f"unknown layer kind {kind!r} in the recorded architecture")
    return layers


def bn_forward(L, x, training, semantics):
    """LibTorch's rule: batch statistics when training OR not tracking; counter only when both."""
    use_batch = training or not L.track
    if training and L.track:
        L.nbt += 1
    if not use_batch or semantics == "torch":
        return F.batch_norm(x, L.rm, L.rv, L.gamma, L.beta, use_batch, L.momentum, L.eps)
    mean = x.mean(0)
    var = (x - mean).square().mean(0)  # biased, also stored biased (Keras)
    out = (x - mean) * torch.rsqrt(var + L.eps)
    if L.gamma is not None:
        out = out * L.gamma
    if L.beta is not None:
        out = out + L.beta
    with torch.no_grad():
        L.rm.sub_((L.rm - mean) * L.momentum)
        L.rv.sub_((L.rv - var) * L.momentum)
    return out


def forward(layers, x, train, ctx):
    for L in layers:
        if L.kind == "linear":
            x = F.linear(x, L.w, L.b)
        elif L.kind == "bn":
            x = bn_forward(L, x, train and not L.force_eval, ctx.semantics)
        elif L.kind == "frozen":
            scale = L.gamma * torch.rsqrt(L.rv + L.eps)
            x = x * scale + (L.beta - L.rm * scale)
        elif L.kind == "act":
            x = L.fn(x, L.alpha)
        elif L.kind == "dropout" and train:
            mask = torch.empty_like(x).bernoulli_(1 - L.p, generator=ctx.gen)
            x = x * mask / (1 - L.p)
    return x


def selected(s, L):
    sel = s.get("layers", "all")
    # ints: position among the model's BatchNorm layers; strings: module names
    return sel == "all" or any(v == (L.pos if isinstance(v, int) else L.name) for v in sel)


def apply_policy(layers, s):
    mom = 0.0 if s.get("running_stats") == "freeze" else s.get("momentum")
    nlin = 0
    for L in layers:
        if L.kind == "bn":
            sel = selected(s, L)
            L.momentum = mom if sel and mom is not None else L.base_m
            L.track = s["track_running_stats"] if sel else True
            for p in (q for q in (L.gamma, L.beta) if q is not None):
                p.requires_grad_(not sel or s["affine"] == "trainable")
            L.force_eval = sel and s["bn_mode"] == "eval"
        elif L.kind == "linear":
            for p in (q for q in (L.w, L.b) if q is not None):
                p.requires_grad_(nlin >= s["freeze_linear"])
            nlin += 1


def params(layers, buffers=False):
    """Parameters in registration order (and, with buffers, every tensor ModelCheckpoint saves)."""
    names = {"linear": "w b", "bn": "gamma beta" + " rm rv nbt" * buffers, "frozen": "gamma beta rm rv" * buffers}
    return [t for L in layers for t in (getattr(L, k) for k in names.get(L.kind, "").split()) if t is not None]


def recalibrate(layers, s, ctx, x, batches, bs, seed):
    bns = [L for L in layers if L.kind == "bn"]
    saved = [(L.rm.clone(), L.rv.clone(), L.nbt.clone(), L.momentum) for L in bns]
    n = x.shape[0]
    bs = min(bs, n)
    g2 = torch.Generator().manual_seed(int(seed))
    pos = n
    with torch.no_grad():
        for k in range(1, batches + 1):
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=g2), 0
            for L in bns:  # momentum 1/k: the running average of the k batch statistics
                L.momentum = 1.0 / k
            forward(layers, x.index_select(0, perm[pos:pos + bs]), True, ctx)
            pos += bs
    for L, (rm, rv, nbt, m) in zip(bns, saved):
        L.momentum = m
        L.nbt.copy_(nbt)
        if not selected(s, L):
            L.rm.copy_(rm), L.rv.copy_(rv)


def fold(layers):
    """A BatchNorm right after a Linear folds into it (W' = diag(s) W, b' = (b - mean) s + beta); one
    right before a Linear folds into that one (W' = W diag(s), b' = b + W (beta - mean s))."""
    def coeffs(L):
        c = L.rm.shape[0]
        gamma = L.gamma.detach().double() if L.gamma is not None else torch.ones(c, dtype=torch.float64)
        beta = L.beta.detach().double() if L.beta is not None else torch.zeros(c, dtype=torch.float64)
        return gamma / torch.sqrt(L.rv.double() + L.eps), beta, L.rm.double()

    def wb(lin):
        b = lin.b.detach().double() if lin.b is not None else torch.zeros(lin.w.shape[0], dtype=torch.float64)
        return lin.w.detach().double(), b

    out = []
    for L in layers:  # after a Linear (consecutive BatchNorms fold one after another)
        if L.kind == "bn" and out and out[-1].kind == "linear":
            (w, b), (scale, beta, mean) = wb(out[-1]), coeffs(L)
            out[-1].w, out[-1].b = w * scale.unsqueeze(1), (b - mean) * scale + beta
        else:
            out.append(L)
    res = []
    for L in reversed(out):  # before a Linear
        if L.kind == "bn":
            if not res or res[-1].kind != "linear":
                die(f"fold: BatchNorm {L.name} has no Linear beside it")
            (w, b), (scale, beta, mean) = wb(res[-1]), coeffs(L)
            res[-1].w, res[-1].b = w * scale.unsqueeze(0), b + w @ (beta - mean * scale)
        else:
            res.append(L)
    res.reverse()
    for L in res:
        if L.kind == "linear" and L.w.dtype == torch.float64:
            L.w, L.b = L.w.float().requires_grad_(True), L.b.float().requires_grad_(True)
    return res


def freeze_modules(layers, s):
    """FrozenBatchNorm1d: x * scale + shift from buffers only (no parameters, mode-independent)."""
    for L in [L for L in layers if L.kind == "bn" and selected(s, L)]:
        L.kind = "frozen"
        L.gamma = L.gamma.detach().clone() if L.gamma is not None else torch.ones_like(L.rm)
        L.beta = L.beta.detach().clone() if L.beta is not None else torch.zeros_like(L.rm)


class KerasRMSprop:
    """Keras' RMSprop (keras/src/optimizers/rmsprop.py): v = rho v + (1 - rho) g^2, increment =
    lr g / sqrt(v + eps) (centered: v - a^2 + eps), momentum m = momentum m + increment."""

    def __init__(self, ps, o):
        self.ps, self.o = ps, o
        self.v = [torch.zeros_like(p) for p in ps]
        self.a = [torch.zeros_like(p) for p in ps]
        self.m = [torch.zeros_like(p) for p in ps]

    def zero_grad(self):
        for p in self.ps:
            p.grad = None

    @torch.no_grad()
    def step(self):
        o = self.o
        for i, p in enumerate(self.ps):
            if p.grad is None:
                continue
            g = p.grad
            self.v[i] = o["rho"] * self.v[i] + (1 - o["rho"]) * g * g
            den = self.v[i] + o["eps"]
            if o["centered"]:
                self.a[i] = o["rho"] * self.a[i] + (1 - o["rho"]) * g
                den = self.v[i] - self.a[i] * self.a[i] + o["eps"]
            inc = o["lr"] * g / torch.sqrt(den)
            if o["momentum"] > 0:
                self.m[i] = o["momentum"] * self.m[i] + inc
                inc = self.m[i]
            p.sub_(inc)


def make_optimizer(o, ps):
    if not ps:
        return None
    name = o["name"]
    if name == "sgd":
        return torch.optim.SGD(ps, lr=o["lr"], momentum=o["momentum"], nesterov=o["nesterov"],
                               weight_decay=o["weight_decay"])
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(ps, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"], weight_decay=o["weight_decay"])
    if name == "rmsprop":
        return torch.optim.RMSprop(ps, lr=o["lr"], alpha=o["alpha"], eps=o["eps"], weight_decay=o["weight_decay"],
                                   momentum=o["momentum"], centered=o["centered"])
    if name == "rmsprop_keras":
        return KerasRMSprop(ps, o)
    die(f"unknown optimizer {name!r}")


def evaluate(layers, x, y, ctx):
    with torch.no_grad():
        return float(loss_fn(ctx.loss, forward(layers, x, False, ctx), y))


def run_one(cfg, arch, ft, s, seed, i, ck, x, y, data_x):
    m = cfg["model"]
    layers = build(arch, ck["state_dict"])
    ctx = NS(semantics=m["batchnorm"]["semantics"], loss=m["loss"],
             gen=torch.Generator().manual_seed((int(seed) * 1000003 + int(i)) % 2**64))  # uint64 as in C++
    if s.get("recalibrate", 0) > 0:
        recalibrate(layers, s, ctx, data_x(), s["recalibrate"], cfg["pretrain"]["batch_size"], int(seed) + 2)
    if s.get("fold"):
        layers = fold(layers)
    if s.get("bn_module", "batchnorm") == "frozen":
        freeze_modules(layers, s)
    r = NS(before=evaluate(layers, x, y, ctx), loss=[], val_loss=[])
    apply_policy(layers, s)
    opt = make_optimizer(ft["optimizer"], [p for p in params(layers) if p.requires_grad])
    n, bs = x.shape[0], ft["batch_size"]
    best, best_v = None, math.inf
    for _ in range(ft["epochs"]):
        apply_policy(layers, s)  # model.train() re-applies the strategy
        total = 0.0
        for start in range(0, n, bs):
            xb, yb = x[start:start + bs], y[start:start + bs]
            if opt:
                opt.zero_grad()
            loss = loss_fn(ctx.loss, forward(layers, xb, True, ctx), yb)
            total += loss.item() * xb.shape[0]  # Keras logs the loss before the update
            if opt and loss.requires_grad:
                loss.backward()
                opt.step()
        r.loss.append(total / n)
        r.val_loss.append(evaluate(layers, x, y, ctx))
        monitored = r.loss[-1] if ft["monitor"] == "loss" else r.val_loss[-1]
        if not ft["save_best_only"] or monitored < best_v:
            best_v = min(best_v, monitored)
            best = [t.detach().clone() for t in params(layers, True)]
    with torch.no_grad():
        [t.copy_(b) for t, b in zip(params(layers, True), best)]
    r.after = evaluate(layers, x, y, ctx)
    return r


# ---------------------------------------------------------------- driver
def load(path):
    if not os.path.isfile(path):
        die(f"{path}: missing")
    try:
        if path.endswith(".pt"):
            return torch.load(path)
        with open(path, newline="") as fh:
            return json.load(fh) if path.endswith(".json") else list(csv.DictReader(fh))
    except Exception as e:  # noqa: BLE001
        die(f"{path}: unreadable ({e})")


RELATIVE = False  # --relative: |a - b| / max(|a|, 1e-6) instead of |a - b|


def diff(a, b):
    """|a - b| for bnlab's b (relative to |a| with --relative): None (no such row) never matches;
    "" (non-finite) matches only a non-finite a."""
    if b is None:
        return math.inf
    if b == "" or not math.isfinite(a):
        return 0.0 if b == "" and not math.isfinite(a) else math.inf
    d = abs(a - float(b))
    return d / max(abs(a), 1e-6) if RELATIVE else d


def grid_points(cfg, rows):
    """(label, finetune settings) per grid point, in product order; labels as curves.csv spells them."""
    grid = cfg.get("grid") or {}
    points = [dict(zip(grid, vals)) for vals in itertools.product(*grid.values())]
    labels = list(dict.fromkeys(r.get("grid", "") for r in rows)) if grid else [""]
    if len(labels) != len(points):
        die(f"curves.csv has {len(labels)} grid labels, the config's grid has {len(points)} points")
    out = []
    for label, point in zip(labels, points):
        ft = copy.deepcopy(cfg["finetune"])
        for path, value in point.items():
            *parents, leaf = path.split(".")
            node = ft
            for k in parents:
                node = node[k]
            node[leaf] = value
        out.append((label, ft))
    return out


class _AnyClass(pickle.Unpickler):
    """Unpickles a class that only the user's training code defines (Lightning's AttributeDict
    under "hyper_parameters") as a plain dict: none of them holds the model's tensors."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (AttributeError, ModuleNotFoundError):
            return dict


def user_weights(path, prefix):
    """The state dict of the user's own file, loaded the way a PyTorch user loads it."""
    try:
        sd = torch.jit.load(path).state_dict()
    except RuntimeError:
        # Debian's torch 1.13 ignores torch.load's pickle_module (it always takes pickle's), so the
        # lenient Unpickler stands in for pickle's own while the file loads.
        original, pickle.Unpickler = pickle.Unpickler, _AnyClass
        try:
            obj = torch.load(path)
        finally:
            pickle.Unpickler = original
        if all(torch.is_tensor(v) for v in obj.values()):
            sd = obj
        else:
            sd = next(obj[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(obj.get(k), dict))
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--relative", action="store_true", help="compare |a - b| / max(|a|, 1e-6) with --tol")
    ap.add_argument("--layers", help="JSON:KEY: the module list is KEY's \"modules\" in JSON, not architecture.json")
    ap.add_argument("--weights", help="the user's PyTorch file whose state dict replaces pretrained.pt's")
    ap.add_argument("--prefix", default="", help="stripped from --weights' tensor names")
    a = ap.parse_args()
    if bool(a.layers) != bool(a.weights):
        die("--layers and --weights go together")
    global RELATIVE
    RELATIVE = a.relative
    torch.set_num_threads(1)  # bnlab's default --threads
    rd = a.run_dir
    cfg = load(os.path.join(rd, "config.resolved.json"))
    rows = load(os.path.join(rd, "curves.csv"))
    curves, summary = {}, {}
    for r in rows:
        key = (r.get("grid", ""), r["strategy"], int(r["seed"]), int(r["sample"]))
        curves.setdefault(key, {})[int(r["epoch"])] = (r["loss"], r["val_loss"])
    if os.path.isfile(os.path.join(rd, "summary.json")):  # evaluate before/after, where the run is found
        sj = load(os.path.join(rd, "summary.json"))
        for e in sj.get("runs", sj.get("strategies", [])):
            summary[(e.get("grid", ""), e.get("strategy", e.get("name")), e.get("seed", sj.get("seed")),
                     e.get("sample", sj.get("sample")))] = e
    d, seeds = cfg["data"], cfg.get("seeds", [cfg.get("seed", 0)])
    arch = recorded_layers(rd, cfg)
    if a.layers:
        file, _, key = a.layers.rpartition(":")
        arch = load(file)[key]["modules"]
    cache = []

    def dataset():  # (x_raw, y) of the whole pretraining set, or None for a CSV file not found
        if not cache:
            cache.append(synthetic(d, cfg["model"]["loss"], d.get("seed", cfg.get("seed", 0)))
                         if d["source"] == "synthetic" else csv_data(d, rd))
        return cache[0]

    worst, nruns, seen = 0.0, 0, set()
    for seed in seeds:
        sfx = f"_seed{seed}" if len(seeds) > 1 else ""
        ck, smp = load(os.path.join(rd, f"pretrained{sfx}.pt")), load(os.path.join(rd, f"sample{sfx}.pt"))
        if a.weights:
            ck["state_dict"] = user_weights(a.weights, a.prefix)
        index = torch.as_tensor(smp["index"]).reshape(-1).tolist()
        sx, sy, sraw = (smp[k].reshape(len(index), -1) for k in ("x", "y", "x_raw"))
        std = lambda xr: (xr - ck["x_mean"]) / ck["x_std"]  # noqa: E731
        if dataset() is not None:  # the regenerated data set must reproduce sample.pt's rows exactly
            xr, yr = (t[torch.tensor(index)] for t in dataset())
            dd = max(float((xr - sraw).abs().max()), float((std(xr) - sx).abs().max()), float((yr - sy).abs().max()))
            worst = max(worst, dd)
            print(f"data seed={seed}: regenerated rows {index} vs sample{sfx}.pt: max |diff| {dd:.3e}")
        data_x = lambda: std(dataset()[0]) if dataset() is not None else die(  # noqa: E731
            f"recalibration needs the pretraining data: {d.get('path')} not found")
        for label, ft in grid_points(cfg, rows):
            for s, i in itertools.product(cfg["strategies"], ft.get("samples", [ft.get("sample")])):
                if i not in index:
                    die(f"sample {i} is not in sample{sfx}.pt (index {index})")
                k = index.index(i)
                r = run_one(cfg, arch, ft, s, seed, i, ck, sx[k:k + 1], sy[k:k + 1], data_x)
                key = (label, s["name"], int(seed), int(i))
                seen.add(key)
                got = curves.get(key, {})
                dl = dv = 0.0 if len(got) == len(r.loss) else math.inf
                for e, (lo, va) in enumerate(zip(r.loss, r.val_loss), 1):
                    cl, cv = got.get(e, (None, None))
                    dl, dv = max(dl, diff(lo, cl)), max(dv, diff(va, cv))
                line = f"loss {dl:.3e}  val_loss {dv:.3e}"
                if key in summary:
                    e = summary[key]
                    de = max(diff(r.before, e.get("evaluate_before")), diff(r.after, e.get("evaluate_after")))
                    line, worst = line + f"  evaluate before/after {de:.3e}", max(worst, de)
                worst, nruns = max(worst, dl, dv), nruns + 1
                print(f"grid={label!r} strategy={s['name']} seed={seed} sample={i} epochs={len(r.loss)}: {line}"
                      + ("" if got else "  (missing from curves.csv)"))
    for key in sorted(set(curves) - seen):
        print(f"curves.csv run {key} has no counterpart in the config")
        worst = math.inf
    ok = worst <= a.tol
    what = "relative" if RELATIVE else "abs"
    print(f"reference: {nruns} runs, max {what} diff {worst:.3e} (tolerance {a.tol:g}): {'OK' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    try:
        main()
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a file that does not have the expected layout
        die(f"{type(e).__name__}: {e} (is this a bnlab run directory?)")
