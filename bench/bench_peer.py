#!/usr/bin/python3
"""The strongest Python PyTorch peer for bnlab's per-sample fine-tuning study, for scripts/bench.sh.

Usage:  /usr/bin/python3 bench/bench_peer.py RUN_DIR [--samples N] [--lanes K] [--repeat R] [--tol T]
                                            [--approaches A,B,...] [--no-shortcuts]

RUN_DIR is a bnlab run directory of a per-sample study (finetune.samples, one row per sample,
batch_size 1, plain SGD, Dense/BatchNorm/ReLU blocks with Keras numerics): config.resolved.json,
architecture.json, pretrained.pt, sample.pt, curves.csv. Each approach fine-tunes K samples at once
(chunks of --lanes, default 256, the lanes* approaches' fastest between 32 and 1000; 0: all), each
sample with its own copy of every parameter and running statistic stacked along a lane dimension,
following the run's config (epochs, SGD lr, each strategy's BatchNorm policy as
scripts/reference.py's apply_policy) and Keras' logging (`loss`: the fit pass before the epoch's
update; `val_loss`: inference mode after it):

  autograd            [K, out, in] weights, torch.baddbmm, autograd on the loss summed over lanes,
                      torch.optim.SGD(foreach=True)
  vmap                functorch.vmap(functorch.grad_and_value(...)) of a per-sample functional model
                      (the running statistics come back as aux), torch._foreach_add_ for SGD
  manual              hand-written batched backward (dW, db, BatchNorm, ReLU) with SGD applied as each
                      gradient is formed, [K, B, C] activations and torch.bmm, eager
  manual_jit          the same function under torch.jit.script
  lanes               hand-written, lanes-last ([out, in, K] weights: a lane's matvec is a broadcast
                      multiply and a reduction vectorised over contiguous lanes, several times faster
                      than K tiny bmm calls), preallocated buffers, out= and in-place ops, and bnlab's
                      own float operation order (see the lanes section), so its curves are bnlab's bit
                      for bit
  lanes_jit           the same function under torch.jit.script
  lanes_fastdx        lanes with the input gradient of a wide Dense layer summed by torch.sum (its own
                      order) instead of bnlab's ascending one (64 in-place adds)
  lanes_shortcut      lanes plus two exact shortcuts of this study: (1) with one row, a train-mode
                      BatchNorm's input gradient and gamma gradient are exactly 0 (x - mean is 0), so
                      the backward stops there (SGD without momentum/weight decay leaves the zero-
                      gradient tensors bit for bit unchanged); (2) where the fit pass IS the inference
                      pass (BatchNorm in eval mode, no dropout), the inference pass after an epoch's
                      update is the next epoch's fit pass, so it runs once (11 forwards, not 20)
  lanes_shortcut_jit  the same under torch.jit.script

Each approach is first checked against RUN_DIR/curves.csv (max |diff| over the loss and val_loss of
every sample and epoch must be <= --tol, default 1e-5), then timed: best of --repeat runs of the
whole study (replicating the weights into lanes, fine-tuning, collecting the curves; not loading),
as microseconds per sample-epoch (TorchScript ones after one untimed warm-up run). Approaches in
CAP are timed on at most that many samples (the output says so); rates are per sample-epoch either
way. One intra-op thread. No network, nothing written.

On a large study only an implementation in bnlab's float order passes 1e-5: under frozen a few
samples diverge (seed_repro, 1000 samples: losses up to 1.6e5 by epoch 8), where any other
summation order, or torch.exp's SIMD exp (1 ulp from std::exp at times), grows with every epoch,
and losses near -6 leave 1e-5 about 20 float ulps elsewhere; scripts/reference.py itself is 1.16
away on one such sample. The notes say how many runs fail and how large their losses get.

Output, one line per approach and strategy, then the best (lowest mean over the strategies among the
approaches that pass every strategy; --no-shortcuts leaves the lanes_shortcut* ones out of it):
  peer APPROACH STRATEGY US_PER_SAMPLE_EPOCH MAX_ABS_DIFF ok|FAIL
  peer_best APPROACH US_PER_SAMPLE_EPOCH
  peer_best_no_shortcuts APPROACH US_PER_SAMPLE_EPOCH   (the best of the others, when one passes)
  peer_best_STRATEGY APPROACH US_PER_SAMPLE_EPOCH
Lines starting with '#' are notes. Exit 0; 1 if no approach passes; 2 on bad usage or a study this
script does not cover (strategies it cannot run are skipped with a note).
"""
import argparse
import csv
import json
import math
import os
import sys
import time
from types import SimpleNamespace as NS
from typing import List, Tuple

import torch
from torch import Tensor

torch.set_num_threads(1)
LOG2PI = math.log(2.0 * math.pi)
TOL = 1e-5
CAP = {"vmap": 1000, "autograd": 1000, "manual": 1000, "manual_jit": 1000}  # samples timed (the check uses all)
LANES = 256  # lanes per chunk by default: the fastest measured (32 to 1000) for the lanes* approaches
SHORTCUTS = ("lanes_shortcut", "lanes_shortcut_jit")


def die(msg):
    print(f"bench_peer: error: {msg}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------ the study
def load_study(rd, nsamples):
    def read(name):
        path = os.path.join(rd, name)
        if not os.path.isfile(path):
            die(f"{path}: missing")
        if name.endswith(".pt"):
            return torch.load(path)
        with open(path, newline="") as fh:
            return json.load(fh) if name.endswith(".json") else list(csv.DictReader(fh))

    cfg = read("config.resolved.json")
    seeds = cfg.get("seeds", [cfg.get("seed", 0)])
    if len(seeds) != 1 or cfg.get("grid"):
        die("one seed and no grid only")
    ft = cfg["finetune"]
    o = ft["optimizer"]
    if o["name"] != "sgd" or o.get("momentum", 0) != 0 or o.get("weight_decay", 0) != 0:
        die(f"plain SGD only (the optimizer is {o})")
    if ft.get("set") or ft.get("sets") or not isinstance(ft.get("samples"), list):
        die("a per-sample study (finetune.samples) only")
    if cfg["model"]["batchnorm"].get("semantics", "keras") != "keras":
        die("Keras BatchNorm numerics only")
    loss = cfg["model"]["loss"]
    if loss not in ("gaussian_nll", "mse"):
        die(f"loss {loss!r}: gaussian_nll or mse only")
    ck, smp = read("pretrained.pt"), read("sample.pt")
    sd = ck["state_dict"]
    layers = read("architecture.json")["layers"]
    hidden, head, i = [], None, 0
    while i < len(layers):  # Dense, BatchNorm, ReLU blocks, then the Dense head
        a = layers[i]
        if a["kind"] != "dense" or not a["use_bias"]:
            die(f"layer {a['name']}: a Dense layer with bias expected")
        w = lambda k, n=a["name"]: sd[f"{n}.{k}"].detach().clone().float()  # noqa: E731
        if i == len(layers) - 1:
            head = NS(W=w("weight"), b=w("bias"))
            break
        bn, act = layers[i + 1], layers[i + 2] if i + 2 < len(layers) else {}
        if bn["kind"] != "batchnorm" or not (bn["center"] and bn["scale"]) or act.get("activation") != "relu":
            die(f"layer {a['name']}: Dense, BatchNorm (center, scale), ReLU expected")
        g = lambda k, n=bn["name"]: sd[f"{n}.{k}"].detach().clone().float()  # noqa: E731
        hidden.append(NS(W=w("weight"), b=w("bias"), g=g("weight"), be=g("bias"), rm=g("running_mean"),
                         rv=g("running_var"), eps=float(bn["eps"]), m=float(bn["momentum"])))
        i += 3
    if head is None:
        die("no Dense head")
    index = torch.as_tensor(smp["index"]).reshape(-1).tolist()
    samples = ft["samples"][:nsamples] if nsamples else ft["samples"]
    pos = [index.index(s) for s in samples]
    x = smp["x"].reshape(len(index), -1)[pos].float()
    y = smp["y"].reshape(len(index), -1)[pos].float()
    curves = {}
    for r in read("curves.csv"):
        curves.setdefault((r["strategy"], int(r["sample"])), {})[int(r["epoch"])] = (r["loss"], r["val_loss"])
    E = int(ft["epochs"])
    strategies = []
    for s in cfg["strategies"]:
        why = unsupported(s)
        if why:
            print(f"# strategy {s['name']}: skipped ({why})")
            continue
        exp = torch.full((2, E, len(samples)), math.nan, dtype=torch.float64)
        for k, smp_id in enumerate(samples):
            got = curves.get((s["name"], int(smp_id)), {})
            for e in range(1, E + 1):
                lo, va = got.get(e, ("", ""))
                exp[0, e - 1, k] = float(lo) if lo != "" else math.nan
                exp[1, e - 1, k] = float(va) if va != "" else math.nan
        strategies.append(NS(name=s["name"], pol=policy(s, hidden), expected=exp))
    return NS(hidden=hidden, head=head, x=x, y=y, E=E, lr=float(o["lr"]), gauss=loss == "gaussian_nll",
              strategies=strategies, samples=samples)


KNOWN = {"name", "preset", "bn_mode", "affine", "running_stats", "track_running_stats", "layers",
         "freeze_linear", "recalibrate", "fold", "bn_module", "momentum", "tracking_rule"}


def unsupported(s):
    extra = sorted(set(s) - KNOWN)
    if extra:
        return f"fields {extra}"
    if not s.get("track_running_stats", True) or s.get("layers", "all") != "all" or s.get("recalibrate", 0) \
            or s.get("fold") or s.get("bn_module", "batchnorm") != "batchnorm" or s.get("bn_mode") not in ("train", "eval"):
        return "only bn_mode train/eval on all BatchNorm layers, tracked, no recalibration, fold or module swap"
    return ""


def policy(s, hidden):
    """scripts/reference.py apply_policy for a run on one sample: momentum, mode, what trains."""
    mom = 0.0 if s.get("running_stats") == "freeze" else s.get("momentum")
    return NS(fit_batch=s["bn_mode"] == "train", affine=s["affine"] == "trainable",
              freeze_linear=int(s.get("freeze_linear", 0)),
              mom=[float(mom) if mom is not None else L.m for L in hidden])


def trainable_below(pol, n):
    """below[i]: does any layer under Dense i (Dense j < i, BatchNorm j < i) train? i = n is the head."""
    return [any(j >= pol.freeze_linear for j in range(i)) or (pol.affine and i > 0) for i in range(n + 1)]


# ------------------------------------------------------------------------------------ a. autograd
def run_autograd(st, pol, x, y):
    K, n = x.shape[0], len(st.hidden)
    rep = lambda t, grad: t.expand(K, *t.shape).clone().requires_grad_(grad)  # noqa: E731
    L = [NS(W=rep(h.W, i >= pol.freeze_linear), b=rep(h.b, i >= pol.freeze_linear), g=rep(h.g, pol.affine),
            be=rep(h.be, pol.affine), rm=rep(h.rm, False), rv=rep(h.rv, False), eps=h.eps, m=pol.mom[i])
         for i, h in enumerate(st.hidden)]
    hW, hb = rep(st.head.W, n >= pol.freeze_linear), rep(st.head.b, n >= pol.freeze_linear)
    ps = [p for l in L for p in (l.W, l.b, l.g, l.be) if p.requires_grad] + [p for p in (hW, hb) if p.requires_grad]
    opt = torch.optim.SGD(ps, lr=st.lr, foreach=True) if ps else None
    xb, yb = x.unsqueeze(1), y.unsqueeze(1)  # [K, 1 row, F]

    def forward(h, fit):
        for l in L:
            z = torch.baddbmm(l.b.unsqueeze(1), h, l.W.transpose(1, 2))
            if fit and pol.fit_batch:
                mean = z.mean(1, keepdim=True)
                d = z - mean
                var = d.square().mean(1, keepdim=True)
                u = d * torch.rsqrt(var + l.eps) * l.g.unsqueeze(1) + l.be.unsqueeze(1)
                with torch.no_grad():
                    l.rm.sub_((l.rm - mean.squeeze(1)) * l.m)
                    l.rv.sub_((l.rv - var.squeeze(1)) * l.m)
            else:
                u = (z - l.rm.unsqueeze(1)) * torch.rsqrt(l.rv + l.eps).unsqueeze(1) * l.g.unsqueeze(1) + l.be.unsqueeze(1)
            h = torch.relu(u)
        return torch.baddbmm(hb.unsqueeze(1), h, hW.transpose(1, 2))

    def lane_loss(out):
        if not st.gauss:
            return (out - yb).square().flatten(1).mean(1)
        T = yb.shape[2]
        mu, lv = out[:, :, :T], out[:, :, T:]
        return (0.5 * (lv + (yb - mu).square() / torch.exp(lv) + LOG2PI)).flatten(1).mean(1)

    loss, val = torch.empty(st.E, K), torch.empty(st.E, K)
    for e in range(st.E):
        if opt:
            opt.zero_grad(set_to_none=True)
        lane = lane_loss(forward(xb, True))
        loss[e] = lane.detach()
        if opt:
            lane.sum().backward()  # lanes share nothing: each lane's gradient is its own
            opt.step()
        with torch.no_grad():
            val[e] = lane_loss(forward(xb, False))
    return loss, val


# ------------------------------------------------------------------------------------ b. vmap
def run_vmap(st, pol, x, y):
    import functorch
    K, n = x.shape[0], len(st.hidden)
    rep = lambda t: t.expand(K, *t.shape).clone()  # noqa: E731
    ps = [rep(t) for h in st.hidden for t in (h.W, h.b, h.g, h.be)] + [rep(st.head.W), rep(st.head.b)]
    bufs = [rep(t) for h in st.hidden for t in (h.rm, h.rv)]
    train = [(i // 4 >= pol.freeze_linear) if i % 4 < 2 else pol.affine for i in range(4 * n)]
    train += [n >= pol.freeze_linear] * 2
    ti = [i for i, t in enumerate(train) if t]
    fi = [i for i, t in enumerate(train) if not t]
    eps = [h.eps for h in st.hidden]
    T = y.shape[1]

    def merge(tp, fp):
        out = [None] * len(train)
        for i, t in zip(ti, tp):
            out[i] = t
        for i, t in zip(fi, fp):
            out[i] = t
        return out

    def forward(p, b, xr, fit):  # one sample: xr [1 row, F]; returns the output and the new buffers
        h, nb = xr, []
        for i in range(n):
            W, bias, g, be = p[4 * i:4 * i + 4]
            rm, rv = b[2 * i], b[2 * i + 1]
            z = torch.nn.functional.linear(h, W, bias)
            if fit and pol.fit_batch:
                mean = z.mean(0)
                d = z - mean
                var = d.square().mean(0)
                u = d * torch.rsqrt(var + eps[i]) * g + be
                m = pol.mom[i]
                nb += [rm - (rm - mean.detach()) * m, rv - (rv - var.detach()) * m]
            else:
                u = (z - rm) * torch.rsqrt(rv + eps[i]) * g + be
                nb += [rm, rv]
            h = torch.relu(u)
        return torch.nn.functional.linear(h, p[-2], p[-1]), nb

    def lane_loss(out, yr):
        if not st.gauss:
            return (out - yr).square().mean()
        mu, lv = out[:, :T], out[:, T:]
        return (0.5 * (lv + (yr - mu).square() / torch.exp(lv) + LOG2PI)).mean()

    def fit_loss(tp, fp, b, xr, yr):
        out, nb = forward(merge(tp, fp), b, xr, True)
        return lane_loss(out, yr), nb

    def eval_loss(p, b, xr, yr):
        return lane_loss(forward(p, b, xr, False)[0], yr)

    step = functorch.vmap(functorch.grad_and_value(fit_loss, has_aux=True))
    fit_only = functorch.vmap(fit_loss)
    evaluate = functorch.vmap(eval_loss)
    xb, yb = x.unsqueeze(1), y.unsqueeze(1)
    loss, val = torch.empty(st.E, K), torch.empty(st.E, K)
    for e in range(st.E):
        tp, fp = [ps[i] for i in ti], [ps[i] for i in fi]
        if ti:
            grads, (lane, nb) = step(tp, fp, bufs, xb, yb)
            torch._foreach_add_(tp, list(grads), alpha=-st.lr)
        else:
            lane, nb = fit_only(tp, fp, bufs, xb, yb)
        bufs = list(nb)
        loss[e] = lane
        val[e] = evaluate(ps, bufs, xb, yb)
    return loss, val


# ------------------------------------------------------------------------------------ c/d. manual
def _manual_loss(out: Tensor, y: Tensor, gauss: bool) -> Tuple[Tensor, Tensor]:
    """Per-lane loss [K] and its gradient w.r.t. out [K, B, 2T] (out [K, B, T] for mse)."""
    n = float(y.shape[1] * y.shape[2])
    T = y.shape[2]
    if gauss:
        mu, lv = out[:, :, :T], out[:, :, T:]
        ev = torch.exp(lv)
        r = y - mu
        q = r * r / ev
        lane = (0.5 * (lv + q + math.log(2.0 * math.pi))).flatten(1).mean(1)
        return lane, torch.cat([-(r / ev) / n, (1.0 - q) * (0.5 / n)], 2)
    d = out - y
    return (d * d).flatten(1).mean(1), d * (2.0 / n)


def manual_run(Ws: List[Tensor], bs: List[Tensor], gs: List[Tensor], bes: List[Tensor], rms: List[Tensor],
               rvs: List[Tensor], eps: List[float], mom: List[float], hW: Tensor, hb: Tensor, x: Tensor, y: Tensor,
               epochs: int, lr: float, fit_batch: bool, affine: bool, freeze_linear: int, below: List[bool],
               gauss: bool) -> Tuple[Tensor, Tensor]:
    """Hand-written forward/backward on [K, B, C] activations, SGD applied as each gradient is formed."""
    n = len(Ws)
    K, B = x.shape[0], x.shape[1]
    loss = torch.empty(epochs, K)
    val = torch.empty(epochs, K)
    for e in range(epochs):
        hs = [x]
        xhs: List[Tensor] = []
        istds: List[Tensor] = []
        h = x
        for i in range(n):
            z = torch.baddbmm(bs[i].unsqueeze(1), h, Ws[i].transpose(1, 2))
            if fit_batch:
                mean = z.mean(1, keepdim=True)
                d = z - mean
                var = (d * d).mean(1, keepdim=True)
                istd = torch.rsqrt(var + eps[i])
                xh = d * istd
                rms[i].sub_((rms[i] - mean.squeeze(1)) * mom[i])
                rvs[i].sub_((rvs[i] - var.squeeze(1)) * mom[i])
            else:
                istd = torch.rsqrt(rvs[i] + eps[i]).unsqueeze(1)
                xh = (z - rms[i].unsqueeze(1)) * istd
            h = torch.relu(xh * gs[i].unsqueeze(1) + bes[i].unsqueeze(1))
            hs.append(h)
            xhs.append(xh)
            istds.append(istd)
        out = torch.baddbmm(hb.unsqueeze(1), h, hW.transpose(1, 2))
        lane, gout = _manual_loss(out, y, gauss)
        loss[e] = lane
        gh = torch.bmm(gout, hW) if below[n] else gout
        if n >= freeze_linear:
            hW.add_(torch.bmm(gout.transpose(1, 2), h), alpha=-lr)
            hb.add_(gout.sum(1), alpha=-lr)
        for i in range(n - 1, -1, -1):
            if not below[i + 1]:
                break
            gu = gh * (hs[i + 1] > 0)
            xh = xhs[i]
            dg = (gu * xh).sum(1)
            db = gu.sum(1)
            scale = gs[i].unsqueeze(1) * istds[i]
            if fit_batch:  # through the batch statistics
                gz = scale / B * (B * gu - db.unsqueeze(1) - xh * dg.unsqueeze(1))
            else:
                gz = gu * scale
            if below[i]:
                gh = torch.bmm(gz, Ws[i])
            if i >= freeze_linear:
                Ws[i].add_(torch.bmm(gz.transpose(1, 2), hs[i]), alpha=-lr)
                bs[i].add_(gz.sum(1), alpha=-lr)
            if affine:
                gs[i].add_(dg, alpha=-lr)
                bes[i].add_(db, alpha=-lr)
        h = x
        for i in range(n):
            z = torch.baddbmm(bs[i].unsqueeze(1), h, Ws[i].transpose(1, 2))
            s = gs[i] * torch.rsqrt(rvs[i] + eps[i])
            h = torch.relu(torch.addcmul((bes[i] - rms[i] * s).unsqueeze(1), z, s.unsqueeze(1)))
        out = torch.baddbmm(hb.unsqueeze(1), h, hW.transpose(1, 2))
        val[e] = _manual_loss(out, y, gauss)[0]
    return loss, val


# ------------------------------------------------------------------------------------ e. lanes-last
# Every float operation here is the one bnlab's batched engine does, in its order (no FMA there
# either): a Dense output is eight partial sums (k mod 8) combined pairwise, then the bias; the
# input gradient sums g[o] W[o, k] for o ascending from 0; SGD adds (-lr) * (g x). PyTorch's CPU
# kernels contract a + b * c into one fused multiply-add (addcmul, add/sub with alpha), so those
# are written as a separate multiply and add. So the curves
# can match bit for bit, which matters on the samples whose fine-tuning diverges (there any
# difference in rounding grows with every epoch).
def _lanes_loss(out: Tensor, y: Tensor, gauss: bool, want_grad: bool) -> Tuple[Tensor, Tensor]:
    """out [2T, K] (mse: [T, K]), y [T, K], one row per lane: per-lane loss [K] and d loss / d out."""
    T = y.shape[0]
    if gauss:
        mu, lv = out[:T], out[T:]
        ev = torch.exp(lv.double()).float()  # std::expf's value (torch.exp's float SIMD exp is 1 ulp off at times)
        r = y - mu
        q = r * r / ev
        lane = (0.5 * (lv + q + math.log(2.0 * math.pi))).sum(0) / float(T)
        if not want_grad:
            return lane, lane
        return lane, torch.cat([(-r) / ev / float(T), 0.5 * (1.0 - q) / float(T)], 0)
    d = out - y
    return (d * d).sum(0) / float(out.shape[0]), 2.0 * d / float(out.shape[0])


def _dense(W: Tensor, h: Tensor, b: Tensor, tmp: Tensor, acc: Tensor, s4: Tensor, s2: Tensor, z: Tensor):
    """z = W h + b per lane (W [out, in, K], h [in, K]) in bnlab's dot8 order."""
    torch.mul(W, h.unsqueeze(0), out=tmp)
    o, n, K = W.shape[0], W.shape[1], W.shape[2]
    n8 = n // 8
    if n8 > 0:
        torch.sum(tmp[:, :n8 * 8].reshape(o, n8, 8, K), [1], False, out=acc)  # acc[j]: k = j mod 8, k ascending
        torch.add(acc[:, 0::2], acc[:, 1::2], out=s4)
        torch.add(s4[:, 0::2], s4[:, 1::2], out=s2)
        torch.add(s2[:, 0], s2[:, 1], out=z)
    else:
        z.zero_()
    for k in range(n8 * 8, n):
        z.add_(tmp[:, k])
    z.add_(b)


def _dense_dx(W: Tensor, g: Tensor, tmp: Tensor, dx: Tensor, exact: bool):
    """dx = W^T g per lane, summed over the outputs in ascending order from 0."""
    torch.mul(W, g.unsqueeze(1), out=tmp)
    if not exact or W.shape[0] <= 16:  # torch.sum adds up to 16 terms in order; more in a cascade
        torch.sum(tmp, [0], False, out=dx)
    else:
        dx.copy_(tmp[0])
        for o in range(1, W.shape[0]):
            dx.add_(tmp[o])


def _lanes_forward(Ws: List[Tensor], bs: List[Tensor], gs: List[Tensor], bes: List[Tensor], rms: List[Tensor],
                   rvs: List[Tensor], eps: List[float], mom: List[float], hW: Tensor, hb: Tensor, x: Tensor,
                   batch: bool, shortcuts: bool, refresh: bool, tmps: List[Tensor], accs: List[Tensor],
                   s4s: List[Tensor], s2s: List[Tensor], zs: List[Tensor], xhs: List[Tensor], istds: List[Tensor],
                   acts: List[Tensor], ss: List[Tensor], ts: List[Tensor], var: List[Tensor], dev: List[Tensor],
                   htmp: Tensor, hacc: Tensor, hs4: Tensor, hs2: Tensor, out: Tensor):
    """One forward pass of every lane; batch: train-mode BatchNorm (one row: the batch statistics are
    the row itself) with running-statistic updates; else BatchNorm as x * s + t from the running
    statistics (s, t recomputed when refresh). Fills the buffers the backward pass reads."""
    h = x
    for i in range(len(Ws)):
        z = zs[i]
        _dense(Ws[i], h, bs[i], tmps[i], accs[i], s4s[i], s2s[i], z)
        a = acts[i]
        if batch:
            if shortcuts:  # x - mean is exactly 0: the unit outputs 0 * gamma + beta = beta; the variance is 0
                a.copy_(bes[i])
                var[i].zero_()
                xhs[i].zero_()
            else:
                d = torch.sub(z, z, out=xhs[i])  # x - mean, the mean of one row being the row
                torch.mul(d, d, out=var[i])
                torch.add(var[i], eps[i], out=istds[i]).rsqrt_()
                d.mul_(istds[i])
                torch.mul(d, gs[i], out=a).add_(bes[i])
            if mom[i] != 0.0:  # rm -= (rm - mean) * m
                rms[i].sub_(torch.sub(rms[i], z, out=dev[i]).mul_(mom[i]))
                rvs[i].sub_(torch.sub(rvs[i], var[i], out=dev[i]).mul_(mom[i]))
        else:
            if refresh:
                torch.add(rvs[i], eps[i], out=istds[i]).rsqrt_()
                torch.mul(gs[i], istds[i], out=ss[i])
                torch.sub(bes[i], rms[i] * ss[i], out=ts[i])
            torch.mul(z, ss[i], out=a).add_(ts[i])
        a.relu_()
        h = a
    _dense(hW, h, hb, htmp, hacc, hs4, hs2, out)


def lanes_run(Ws: List[Tensor], bs: List[Tensor], gs: List[Tensor], bes: List[Tensor], rms: List[Tensor],
              rvs: List[Tensor], eps: List[float], mom: List[float], hW: Tensor, hb: Tensor, x: Tensor, y: Tensor,
              epochs: int, lr: float, fit_batch: bool, affine: bool, freeze_linear: int, below: List[bool],
              gauss: bool, shortcuts: bool, exact: bool) -> Tuple[Tensor, Tensor]:
    """Lanes-last state (W [out, in, K], vectors [C, K], x [F, K], y [T, K]), one row per lane."""
    n = len(Ws)
    K = x.shape[1]
    tmps = [torch.empty_like(W) for W in Ws]
    accs = [torch.empty(W.shape[0], 8, K) for W in Ws]
    s4s = [torch.empty(W.shape[0], 4, K) for W in Ws]
    s2s = [torch.empty(W.shape[0], 2, K) for W in Ws]
    zs = [torch.empty_like(b) for b in bs]
    xhs = [torch.empty_like(b) for b in bs]
    istds = [torch.empty_like(b) for b in bs]
    acts = [torch.empty_like(b) for b in bs]
    ss = [torch.empty_like(b) for b in bs]
    ts = [torch.empty_like(b) for b in bs]
    var = [torch.empty_like(b) for b in bs]
    dev = [torch.empty_like(b) for b in bs]
    gx = [torch.empty_like(x)] + [torch.empty_like(b) for b in bs]  # gradient w.r.t. each Dense input
    htmp = torch.empty_like(hW)
    hacc = torch.empty(hW.shape[0], 8, K)
    hs4 = torch.empty(hW.shape[0], 4, K)
    hs2 = torch.empty(hW.shape[0], 2, K)
    out = torch.empty_like(hb)
    loss = torch.empty(epochs, K)
    val = torch.empty(epochs, K)
    # s, t of the inference BatchNorm change only when gamma/beta train or the fit pass moves the statistics.
    moving = affine or (fit_batch and any([m != 0.0 for m in mom]))
    # Shortcut (2): the fit pass is the inference pass, so the one after an update serves both.
    reuse = shortcuts and not fit_batch
    fresh = True
    if reuse:
        _lanes_forward(Ws, bs, gs, bes, rms, rvs, eps, mom, hW, hb, x, False, shortcuts, True, tmps, accs, s4s,
                       s2s, zs, xhs, istds, acts, ss, ts, var, dev, htmp, hacc, hs4, hs2, out)
        fresh = moving
    for e in range(epochs):
        if not reuse:
            _lanes_forward(Ws, bs, gs, bes, rms, rvs, eps, mom, hW, hb, x, fit_batch, shortcuts, fresh, tmps, accs,
                           s4s, s2s, zs, xhs, istds, acts, ss, ts, var, dev, htmp, hacc, hs4, hs2, out)
            if not fit_batch:
                fresh = moving
        lane, gout = _lanes_loss(out, y, gauss, True)
        loss[e] = lane
        h = acts[n - 1] if n > 0 else x
        gh = gx[n]
        if below[n]:
            _dense_dx(hW, gout, htmp, gh, exact)
        if n >= freeze_linear:
            hW.add_(torch.mul(gout.unsqueeze(1), h.unsqueeze(0), out=htmp).mul_(-lr))
            hb.add_(gout * -lr)
        for i in range(n - 1, -1, -1):
            if not below[i + 1]:
                break
            gu = torch.ops.aten.threshold_backward(gh, acts[i], 0.0)
            if fit_batch and shortcuts:  # shortcut (1): only beta gets a gradient, nothing below it
                if affine:
                    bes[i].add_(gu * -lr)
                break
            if fit_batch:  # bnlab's bn_batch_dx for one row: istd (dh - mean(dh) - xhat mean(dh xhat))
                xh = xhs[i]
                dg = gu * xh
                dh = gu * gs[i]
                gz = (dh - dh - xh * (dg * gs[i])).mul_(istds[i])
            else:
                gz = (gu * gs[i]).mul_(istds[i])
                dg = gu * (zs[i] - rms[i]).mul_(istds[i]) if affine else gu
            hin = acts[i - 1] if i > 0 else x
            if below[i]:
                _dense_dx(Ws[i], gz, tmps[i], gx[i], exact)
            if i >= freeze_linear:
                Ws[i].add_(torch.mul(gz.unsqueeze(1), hin.unsqueeze(0), out=tmps[i]).mul_(-lr))
                bs[i].add_(gz * -lr)
            if affine:
                gs[i].add_(dg * -lr)
                bes[i].add_(gu * -lr)
            gh = gx[i]
        _lanes_forward(Ws, bs, gs, bes, rms, rvs, eps, mom, hW, hb, x, False, shortcuts, fresh, tmps, accs, s4s,
                       s2s, zs, xhs, istds, acts, ss, ts, var, dev, htmp, hacc, hs4, hs2, out)
        fresh = moving
        val[e] = _lanes_loss(out, y, gauss, False)[0]
    return loss, val


_JIT = {}


def jitted(fn):
    if fn not in _JIT:
        _JIT[fn] = torch.jit.script(fn)
    return _JIT[fn]


def run_manual(st, pol, x, y, jit=False):
    K, n = x.shape[0], len(st.hidden)
    rep = lambda t: t.expand(K, *t.shape).clone()  # noqa: E731
    H = st.hidden
    fn = jitted(manual_run) if jit else manual_run
    return fn([rep(h.W) for h in H], [rep(h.b) for h in H], [rep(h.g) for h in H], [rep(h.be) for h in H],
              [rep(h.rm) for h in H], [rep(h.rv) for h in H], [h.eps for h in H], pol.mom, rep(st.head.W),
              rep(st.head.b), x.unsqueeze(1), y.unsqueeze(1), st.E, st.lr, pol.fit_batch, pol.affine,
              pol.freeze_linear, trainable_below(pol, n), st.gauss)


def run_lanes(st, pol, x, y, jit=False, shortcuts=False, exact=True):
    K, n = x.shape[0], len(st.hidden)
    rep = lambda t: t.unsqueeze(-1).expand(*t.shape, K).contiguous()  # noqa: E731
    H = st.hidden
    fn = jitted(lanes_run) if jit else lanes_run
    return fn([rep(h.W) for h in H], [rep(h.b) for h in H], [rep(h.g) for h in H], [rep(h.be) for h in H],
              [rep(h.rm) for h in H], [rep(h.rv) for h in H], [h.eps for h in H], pol.mom, rep(st.head.W),
              rep(st.head.b), x.t().contiguous(), y.t().contiguous(), st.E, st.lr, pol.fit_batch, pol.affine,
              pol.freeze_linear, trainable_below(pol, n), st.gauss, shortcuts, exact)


APPROACHES = {
    "autograd": run_autograd,
    "vmap": run_vmap,
    "manual": run_manual,
    "manual_jit": lambda st, pol, x, y: run_manual(st, pol, x, y, jit=True),
    "lanes": run_lanes,
    "lanes_jit": lambda st, pol, x, y: run_lanes(st, pol, x, y, jit=True),
    "lanes_fastdx": lambda st, pol, x, y: run_lanes(st, pol, x, y, exact=False),
    "lanes_shortcut": lambda st, pol, x, y: run_lanes(st, pol, x, y, shortcuts=True),
    "lanes_shortcut_jit": lambda st, pol, x, y: run_lanes(st, pol, x, y, jit=True, shortcuts=True),
}


# ------------------------------------------------------------------------------------ driver
def study(fn, st, pol, count, lanes):
    """The whole study on the first `count` samples in chunks of `lanes`: curves [2, E, count]."""
    lanes = lanes or count
    parts = [fn(st, pol, st.x[a:a + lanes], st.y[a:a + lanes]) for a in range(0, count, lanes)]
    curves = torch.stack([torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)])
    curves.tolist()  # the curves as numbers a study would write out
    return curves


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--samples", type=int, default=0, help="the first N samples of the study (default all)")
    ap.add_argument("--lanes", type=int, default=LANES, help=f"samples fine-tuned at once (default {LANES}; 0: all)")
    ap.add_argument("--tol", type=float, default=TOL, help=f"max |diff| against curves.csv (default {TOL:g})")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, the best is reported")
    ap.add_argument("--approaches", default=",".join(APPROACHES), help="comma-separated subset")
    ap.add_argument("--no-shortcuts", action="store_true", help="lanes_shortcut* not eligible as the peer")
    a = ap.parse_args()
    names = [s for s in a.approaches.split(",") if s]
    if any(s not in APPROACHES for s in names) or a.repeat < 1 or a.samples < 0 or a.lanes < 0:
        die(f"--approaches from {','.join(APPROACHES)}; --repeat >= 1; --samples, --lanes >= 0")
    st = load_study(a.run_dir, a.samples)
    N = len(st.samples)
    if not st.strategies:
        die("no strategy this script can run")
    print(f"# {N} samples x {st.E} epochs, lanes {a.lanes or N}, best of {a.repeat}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread")
    results = {}
    for name in names:
        count = min(N, CAP.get(name, N))
        if count < N:
            print(f"# {name}: checked on all {N} samples, timed on the first {count}")
        for s in st.strategies:
            try:
                got = study(APPROACHES[name], st, s.pol, N, a.lanes)
                diff = (got - s.expected).abs()
                dmax = float(diff.max())  # NaN (a missing row) fails
                ok = dmax <= a.tol
                if not ok:
                    per_run = diff.amax((0, 1))
                    bad = ~(per_run <= a.tol)
                    size = s.expected.abs().amax((0, 1))[bad]
                    rest = float(per_run[~bad].max()) if bool((~bad).any()) else math.nan
                    print(f"# {name} {s.name}: {int(bad.sum())} of {N} runs beyond {a.tol:g} (their largest "
                          f"|loss|, |val_loss|: {float(size.min()):.3g} to {float(size.max()):.3g}); "
                          f"max diff over the other runs {rest:.3e}")
                if name.endswith("_jit"):  # the profiling executor optimises on its second call
                    study(APPROACHES[name], st, s.pol, count, a.lanes)
                best = math.inf
                for _ in range(a.repeat):
                    t0 = time.perf_counter()
                    study(APPROACHES[name], st, s.pol, count, a.lanes)
                    best = min(best, time.perf_counter() - t0)
                us = best * 1e6 / (count * st.E)
            except Exception as e:  # noqa: BLE001 (an approach that cannot run is reported, not fatal)
                print(f"# {name} {s.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                ok, us, dmax = False, math.nan, math.nan
            results[(name, s.name)] = (us, ok)
            print(f"peer {name} {s.name} {us:.3f} {dmax:.3e} {'ok' if ok else 'FAIL'}", flush=True)
    eligible = [n for n in names if not (a.no_shortcuts and n in SHORTCUTS)]
    passing = [n for n in eligible if all(results[(n, s.name)][1] for s in st.strategies)]
    if not passing:
        print("# no approach matches bnlab's curves")
        sys.exit(1)
    mean = {n: sum(results[(n, s.name)][0] for s in st.strategies) / len(st.strategies) for n in passing}
    best = min(passing, key=mean.get)
    print(f"peer_best {best} {mean[best]:.3f}")
    plain = [n for n in passing if n not in SHORTCUTS]
    if plain:
        b = min(plain, key=mean.get)
        print(f"peer_best_no_shortcuts {b} {mean[b]:.3f}")
    for s in st.strategies:
        ok = [n for n in eligible if results[(n, s.name)][1]]
        if ok:
            b = min(ok, key=lambda n: results[(n, s.name)][0])
            print(f"peer_best_{s.name} {b} {results[(b, s.name)][0]:.3f}")


if __name__ == "__main__":
    main()
