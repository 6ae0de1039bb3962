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

    def forward(self, h):
        if self.training:
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

# 3. Per-sample study: every sample fine-tuned separately for 10 epochs under each strategy, Keras
# fit semantics (loss before the update, val_loss in eval mode after each epoch).
samples = int(sys.argv[1]) if len(sys.argv) > 1 else 200
strategies = ("train", "frozen")
t0 = time.perf_counter()
for s in range(samples):
    xs, ys = x[s:s + 1], y[s:s + 1]
    for strategy in strategies:
        net, bns, opt = prepare(strategy)
        for epoch in range(10):
            train_mode(net, bns, strategy)
            opt.zero_grad()
            loss = nll(net(xs), ys)
            loss.item()
            loss.backward()
            opt.step()
            net.eval()
            with torch.no_grad():
                nll(net(xs), ys).item()
print(f"study_sample_epochs_per_s {samples * len(strategies) * 10 / (time.perf_counter() - t0):.1f}")
