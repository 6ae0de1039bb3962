#!/usr/bin/env python3
"""Keras weights fixtures in both layouts, and what Keras computes on them, with h5py and numpy.

Writes, next to this script in fixtures/:
  keras2.h5          Keras 2 save_weights layout: root attribute layer_names; one group per layer
                     with a weight_names attribute; datasets such as dense/kernel:0 (kernel [in, out]).
  keras2_model_save.h5  the same under model_weights/, as Keras 2's model.save() writes it.
  keras3.weights.h5  Keras 3 layout: layers/<name>/vars/<i>.
  data.csv           a header row and 6 samples (4 features, target y); sample 0 is fine-tuned.
  expected.json      Keras semantics computed here with numpy, independently of bnlab:
                     evaluate before, and per strategy the per-epoch loss (forward pass before the
                     update) and val_loss (inference after the epoch) of fit(x, y, batch_size=1,
                     validation_data=(x, y)) with SGD(lr), MSE loss.
The model: Dense(5) BatchNormalization ReLU Dense(3) BatchNormalization ReLU Dense(1), Keras'
BatchNormalization defaults (epsilon 1e-3, momentum 0.99). Strategies:
  train   BN trainable, training mode: a batch of one has variance 0, every BN unit outputs beta,
          moving stats move 1% toward the sample with variance 0 (biased), gamma gets no gradient.
  frozen  BN layer.trainable = False (TF2): inference mode, gamma/beta frozen, Dense layers trained.
Run: /usr/bin/python3 tests/keras/make_fixtures.py
"""
import json
import os

import h5py
import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
EPS, MOM, LR, EPOCHS = 1e-3, 0.99, 0.05, 3
f32 = np.float32

rng = np.random.default_rng(7)
sizes = [(4, 5), (5, 3), (3, 1)]
dense = [(rng.normal(0, 0.6, s).astype(f32), rng.normal(0, 0.1, s[1]).astype(f32)) for s in sizes]
bns = []
for width in (5, 3):
    gamma = rng.uniform(0.5, 1.5, width).astype(f32)
    beta = rng.uniform(-0.5, 0.8, width).astype(f32)
    mean = rng.normal(0, 0.5, width).astype(f32)
    var = rng.uniform(0.3, 2.0, width).astype(f32)
    bns.append([gamma, beta, mean, var])
data = rng.normal(0, 1, (6, 4)).astype(f32)
target = rng.normal(0, 1, (6, 1)).astype(f32)


def model_config():
    """The architecture as Keras 2's model.save() records it (the model_config root attribute)."""
    layers = [{"class_name": "InputLayer", "config": {"batch_input_shape": [None, 4], "name": "dense_input"}}]
    for i, (k, _) in enumerate(dense):
        layers.append({"class_name": "Dense", "config": {"name": "dense" if i == 0 else f"dense_{i}", "units": int(k.shape[1]),
                                                         "activation": "linear", "use_bias": True, "trainable": True}})
        if i < 2:
            layers.append({"class_name": "BatchNormalization",
                           "config": {"name": "batch_normalization" if i == 0 else f"batch_normalization_{i}", "axis": -1,
                                      "momentum": MOM, "epsilon": EPS, "center": True, "scale": True, "trainable": True}})
            layers.append({"class_name": "ReLU", "config": {"name": f"re_lu_{i}", "max_value": None, "negative_slope": 0.0,
                                                            "threshold": 0.0, "trainable": True}})
    return json.dumps({"class_name": "Sequential", "config": {"name": "sequential", "layers": layers}})


def write_keras2(path, under_model_weights=False):
    with h5py.File(path, "w") as top:
        # model.save() puts the same layout under model_weights/, next to the model's config.
        f = top.create_group("model_weights") if under_model_weights else top
        if under_model_weights:
            top.attrs["model_config"] = model_config().encode()
        names = []
        for i, (k, b) in enumerate(dense):
            n = "dense" if i == 0 else f"dense_{i}"
            g = f.create_group(n)
            g.attrs["weight_names"] = np.array([f"{n}/kernel:0".encode(), f"{n}/bias:0".encode()])
            g[f"{n}/kernel:0"], g[f"{n}/bias:0"] = k, b
            names.append(n)
            if i < 2:
                m = "batch_normalization" if i == 0 else f"batch_normalization_{i}"
                g = f.create_group(m)
                w = [f"{m}/{v}:0" for v in ("gamma", "beta", "moving_mean", "moving_variance")]
                g.attrs["weight_names"] = np.array([x.encode() for x in w])
                for name, value in zip(w, bns[i]):
                    g[name] = value
                names.append(m)
                r = f"re_lu_{i}"
                f.create_group(r).attrs["weight_names"] = np.array([], dtype="S1")
                names.append(r)
        f.attrs["layer_names"] = np.array([n.encode() for n in names])
        f.attrs["backend"], f.attrs["keras_version"] = b"tensorflow", b"2.15.0"


def write_keras3(path):
    with h5py.File(path, "w") as f:
        layers = f.create_group("layers")
        for i, (k, b) in enumerate(dense):
            v = layers.create_group("dense" if i == 0 else f"dense_{i}").create_group("vars")
            v["0"], v["1"] = k, b
            if i < 2:
                v = layers.create_group("batch_normalization" if i == 0 else f"batch_normalization_{i}").create_group("vars")
                for j, value in enumerate(bns[i]):
                    v[str(j)] = value
        f.create_group("optimizer").create_group("vars")


def bn_infer(h, gamma, beta, mean, var):
    return (h - mean) / np.sqrt(var + EPS) * gamma + beta


def forward_infer(x, d, b):
    h = x
    for i in range(2):
        h = np.maximum(bn_infer(h @ d[i][0] + d[i][1], *b[i]), 0)
    return h @ d[2][0] + d[2][1]


def mse(out, y):
    return float(np.mean((out.astype(np.float64) - y) ** 2))


def fit_train(x, y):
    d = [(k.copy(), b.copy()) for k, b in dense]
    b = [[v.copy() for v in layer] for layer in bns]
    losses, vals = [], []
    for _ in range(EPOCHS):
        # Training mode, batch of one: every BN outputs beta; the moving stats see the sample.
        h1 = x @ d[0][0] + d[0][1]
        a1 = np.maximum(b[0][1], 0)[None, :]
        h2 = a1 @ d[1][0] + d[1][1]
        a2 = np.maximum(b[1][1], 0)[None, :]
        out = a2 @ d[2][0] + d[2][1]
        losses.append(mse(out, y))
        g = 2 * (out - y) / out.size
        grad_k2, grad_b2 = a2.T @ g, g.sum(0)
        grad_beta2 = (g @ d[2][0].T)[0] * (b[1][1] > 0)
        for layer, h in ((b[0], h1), (b[1], h2)):
            layer[2] = (layer[2] * MOM + h[0] * (1 - MOM)).astype(f32)      # batch mean = the sample
            layer[3] = (layer[3] * MOM + 0.0 * (1 - MOM)).astype(f32)       # biased batch variance = 0
        d[2] = ((d[2][0] - LR * grad_k2).astype(f32), (d[2][1] - LR * grad_b2).astype(f32))
        b[1][1] = (b[1][1] - LR * grad_beta2).astype(f32)
        vals.append(mse(forward_infer(x, d, b), y))
    return losses, vals


def fit_frozen(x, y):
    d = [(k.copy(), b.copy()) for k, b in dense]
    losses, vals = [], []
    for _ in range(EPOCHS):
        acts, pre = [x], []
        h = x
        for i in range(2):
            z = h @ d[i][0] + d[i][1]
            n = bn_infer(z, *bns[i])
            pre.append(n)
            h = np.maximum(n, 0)
            acts.append(h)
        out = h @ d[2][0] + d[2][1]
        losses.append(mse(out, y))
        g = 2 * (out - y) / out.size
        grads = [None, None, (acts[2].T @ g, g.sum(0))]
        back = g @ d[2][0].T
        for i in (1, 0):
            gamma, _, _, var = bns[i]
            back = back * (pre[i] > 0) * (gamma / np.sqrt(var + EPS))
            grads[i] = (acts[i].T @ back, back.sum(0))
            back = back @ d[i][0].T
        d = [((k - LR * gk).astype(f32), (b - LR * gb).astype(f32)) for (k, b), (gk, gb) in zip(d, grads)]
        vals.append(mse(forward_infer(x, d, bns), y))
    return losses, vals


os.makedirs(HERE, exist_ok=True)
write_keras2(os.path.join(HERE, "keras2.h5"))
write_keras2(os.path.join(HERE, "keras2_model_save.h5"), under_model_weights=True)
write_keras3(os.path.join(HERE, "keras3.weights.h5"))
with open(os.path.join(HERE, "data.csv"), "w") as f:
    f.write("a,b,c,d,y\n")
    for row, t in zip(data, target):
        f.write(",".join(repr(float(v)) for v in row) + "," + repr(float(t[0])) + "\n")
x, y = data[:1], target[:1]
expected = {"made_by": "tests/keras/make_fixtures.py (h5py + numpy)", "sample": 0,
            "evaluate_before": mse(forward_infer(x, dense, bns), y)}
for name, fit in (("train", fit_train), ("frozen", fit_frozen)):
    losses, vals = fit(x, y)
    expected[name] = {"loss": losses, "val_loss": vals}
with open(os.path.join(HERE, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
print(json.dumps(expected, indent=1))
