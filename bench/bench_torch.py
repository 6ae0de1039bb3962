#!/usr/bin/env python3
"""The obvious Python PyTorch eager version of bnlab's work, for scripts/bench.sh.

Same model as configs/seed_repro.json (8-64-64-2, BatchNorm with Keras numerics, ReLU, Gaussian
NLL), same thread setting (1 intra-op thread), Debian's python3-torch (the same LibTorch
underneath). Prints one `name value` line per measurement.
Usage: bench_torch.py [STUDY_SAMPLES]
"""
import copy
import math
import sys
import time

import torch

torch.set_num_threads(1)
torch.manual_seed(0)
N, F, H = 100000, 8, 64
x = torch.randn(N, F)
y = (0.0005 * torch.randn(N, 1))


class KerasBN(torch.nn.Module):
    """BatchNorm1d with Keras numerics: biased variance, a batch of one outputs beta."""

    def __init__(self, c, eps=1e-3, m=0.01):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.ones(c)), torch.nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.eps, self.m = eps, m

    batch_stats_always = False  # track_running_stats=False: batch statistics in eval too

    def forward(self, h):
        if self.training or self.batch_stats_always:
            mean = h.mean(0)
            var = (h - mean).square().mean(0)
            with torch.no_grad():
                self.running_mean.sub_((self.running_mean - mean) * self.m)
                self.running_var.sub_((self.running_var - var) * self.m)
            return (h - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return torch.nn.functional.batch_norm(h, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def model():
    return torch.nn.Sequential(torch.nn.Linear(F, H), KerasBN(H), torch.nn.ReLU(), torch.nn.Linear(H, H), KerasBN(H),
                               torch.nn.ReLU(), torch.nn.Linear(H, 2))


def nll(out, t):
    mean, log_var = out[:, :1], out[:, 1:]
    return (0.5 * (log_var + (t - mean).square() / torch.exp(log_var) + math.log(2 * math.pi))).mean()


# 1. Pretraining throughput: one epoch of shuffled batches of 256 with Adam.
m = model()
opt = torch.optim.Adam(m.parameters(), lr=3e-3)
m.train()
t0 = time.perf_counter()
perm = torch.randperm(N)
for i in range(0, N, 256):
    idx = perm[i:i + 256]
    opt.zero_grad()
    loss = nll(m(x[idx]), y[idx])
    loss.item()
    loss.backward()
    opt.step()
print(f"pretrain_samples_per_s {N / (time.perf_counter() - t0):.1f}")
pretrained = copy.deepcopy(m.state_dict())


def prepare(strategy):
    net = model()
    net.load_state_dict(pretrained)
    bns = [l for l in net if isinstance(l, KerasBN)]
    if strategy == "frozen":
        for b in bns:
            b.weight.requires_grad_(False)
            b.bias.requires_grad_(False)
    return net, bns, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-8)


def train_mode(net, bns, strategy):
    net.train()
    if strategy == "frozen":
        for b in bns:
            b.eval()


# 2. Single-sample fine-tuning step latency.
for strategy in ("frozen", "train"):
    net, bns, opt = prepare(strategy)
    train_mode(net, bns, strategy)
    xs, ys = x[:1], y[:1]

    def step():
        opt.zero_grad()
        loss = nll(net(xs), ys)
        loss.item()
        loss.backward()
        opt.step()

    for _ in range(200):
        step()
    steps = 3000
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"step_us_{strategy} {(time.perf_counter() - t0) / steps * 1e6:.2f}")

# 3. Per-sample study: every sample fine-tuned separately for 10 epochs under each of the nine
# presets, Keras fit semantics (loss read before the update, val_loss in eval mode after each
# epoch). Written the way a researcher would: each strategy's starting model (recalibrated,
# folded) is prepared once, then copied for every sample.
PRESETS = ("train", "freeze_affine", "momentum_zero", "freeze_affine_momentum_zero", "eval", "frozen",
           "recalibrate_frozen", "fold", "batch_stats")


def recalibrated():
    net = model()
    net.load_state_dict(pretrained)
    bns = [l for l in net if isinstance(l, KerasBN)]
    net.train()
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(N, generator=g)
    with torch.no_grad():
        for k in range(1, 101):  # momentum 1/k: the exact average of 100 batch statistics
            for b in bns:
                b.m = 1.0 / k
            net(x[perm[(k - 1) * 256:k * 256]])
    for b in bns:
        b.m = 0.01
    return net.state_dict()


def folded():
    net = model()
    net.load_state_dict(pretrained)
    net.eval()
    layers = list(net)
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, KerasBN):
            continue
        if isinstance(layer, torch.nn.Linear) and i + 1 < len(layers) and isinstance(layers[i + 1], KerasBN):
            bn = layers[i + 1]
            layer = torch.nn.utils.fusion.fuse_linear_bn_eval(layer, torch.nn.BatchNorm1d(H, eps=bn.eps).eval())
            with torch.no_grad():  # fuse with the KerasBN's own statistics and affine parameters
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                base = layers[i]
                layer.weight.copy_(base.weight * scale[:, None])
                layer.bias.copy_((base.bias - bn.running_mean) * scale + bn.bias)
        out.append(layer)
    return torch.nn.Sequential(*out)


starts = {p: pretrained for p in PRESETS}
starts["recalibrate_frozen"] = recalibrated()
fold_net = folded()


def prepare_study(preset):
    if preset == "fold":
        net = copy.deepcopy(fold_net)
        bns = []
    else:
        net = model()
        net.load_state_dict(starts[preset])
        bns = [l for l in net if isinstance(l, KerasBN)]
    for b in bns:
        if "freeze_affine" in preset or preset in ("frozen", "recalibrate_frozen"):
            b.weight.requires_grad_(False)
            b.bias.requires_grad_(False)
        if "momentum_zero" in preset:
            b.m = 0.0
        b.batch_stats_always = preset == "batch_stats"
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-8)
    return net, bns, opt


def fit_mode(net, bns, preset):
    net.train()
    if preset in ("eval", "frozen", "recalibrate_frozen"):
        for b in bns:
            b.eval()


samples = int(sys.argv[1]) if len(sys.argv) > 1 else 200
t0 = time.perf_counter()
for s in range(samples):
    xs, ys = x[s:s + 1], y[s:s + 1]
    for preset in PRESETS:
        net, bns, opt = prepare_study(preset)
        for epoch in range(10):
            fit_mode(net, bns, preset)
            opt.zero_grad()
            loss = nll(net(xs), ys)
            loss.item()
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                nll(net(xs), ys).item()
print(f"study_sample_epochs_per_s {samples * len(PRESETS) * 10 / (time.perf_counter() - t0):.1f}")
