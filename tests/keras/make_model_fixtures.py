#!/usr/bin/env python3
"""Whole-model Keras fixtures (config + weights) in both formats, written with h5py, json and zipfile.

No Keras or TensorFlow is needed (or used): the files are laid out by hand the way Keras writes them,
and what Keras would predict is computed here with numpy from each file's own config and weights.

Run: /usr/bin/python3 tests/keras/make_model_fixtures.py
Output, in tests/keras/fixtures/models/ (reruns are byte-identical):

  <stem>.h5     Keras 2 model.save() HDF5 (tf.keras 2.15, keras_version "2.15.0")
  <stem>.keras  Keras 3 model.save() zip (keras_version "3.5.0")
  data.csv      header f0..f5,y and 64 rows; y = tanh(f0) + 0.5*f1*f2 + normal(0, 0.1)
  expected.json per good network: inference-mode predictions and per-row MSE on rows 0, 5 and 17 of
                data.csv (features used as they are, not standardized), the layer list, the file names

Good networks (input width 6, both formats):
  dense_bn_relu     Dense BN Activation(relu) x2, Dense(1). The plain case. The Keras 2 file writes
                    BN "axis": [1] (the form a built tf.keras layer serializes); the Keras 3 file uses
                    user names (hidden_a, dense, head; the BNs' names swapped) so that a reader must map
                    config order to the snake-case class counters of model.weights.h5, not user names.
  dense_relu_bn     Dense(activation=relu) then BN: BN after a fused activation.
  bn_on_inputs      BN as the first layer (Keras 2 input layer is "batch_normalization_input"); its
                    weightless layer's weight_names is an empty 'S1' array instead of Keras' float64.
  bn_some_layers    BN(epsilon=0.01, momentum=0.9, trainable=False), a ReLU layer, Dense(use_bias=False)
                    (kernel only), Activation(sigmoid).
  fused_tanh_bn     Dense(tanh) then BN(center=False): BN without beta (gamma, mean, variance only).
  dropout_between   Dropout layers (identity at inference) between Dense and BN.
  three_widths      gelu (exact erf), elu, LeakyReLU(0.1: "alpha" in Keras 2, "negative_slope" in
                    Keras 3). Its Keras 2 file uses the newer serialization with "module",
                    "registered_name" and "build_config" keys.
  functional_chain  dense_bn_relu as a Functional model: a single chain Input -> ... -> output.
  eleven_dense      11 Dense layers (BN after the 2nd): Keras 3 names dense .. dense_10 sort as
                    dense, dense_1, dense_10, dense_2, ... in HDF5 (alphabetical), not in model order.
                    Its Keras 2 file also uses the newer serialization.
Bad networks (a reader must refuse them):
  unsupported_layernorm  Dense LayerNormalization Dense (both formats): an unsupported layer class.
  branch                 Keras 3 only, Functional: Dense "a" and Dense "b" both fed by the input,
                         joined by Add, then Dense(1): not a chain.
  bn_axis0               Keras 2 only: BatchNormalization(axis=0), normalizing along the batch axis.

Where the layouts come from (Keras' own sources):
  Keras 2 HDF5, keras/src/legacy/saving/legacy_h5_format.py (the same code as tf.keras 2.x's
  saving/legacy/hdf5_format.py): save_model_to_hdf5 writes root attributes keras_version, backend
  (str) and model_config (json.dumps(...).encode("utf8"), bytes), then save_weights_to_hdf5_group
  writes group model_weights with attributes layer_names (every layer of model.layers, in order),
  backend and keras_version (bytes), one group per layer created in sorted-name order, each with a
  weight_names attribute and datasets at <layer>/<weight name> (weight names such as
  "dense/kernel:0", so the dataset is model_weights/dense/dense/kernel:0), then a group
  top_level_model_weights (not listed in layer_names; empty here). save_attributes_to_hdf5_group
  stores `group.attrs[name] = data`: a list of bytes becomes a fixed-length 'S' array, an empty list
  becomes a float64 array of shape (0,). A Sequential's model.layers leaves the InputLayer out; a
  Functional's includes it. Layer weights are trainable_weights + non_trainable_weights, which keeps
  BN's order gamma, beta, moving_mean, moving_variance even when the layer is frozen.
  Keras 3 zip, keras/src/saving/saving_lib.py: _save_model_to_fileobj writes metadata.json,
  config.json (serialize_keras_object(model)) and model.weights.h5 (H5IOStore in memory, then
  writestr) into a ZipFile opened with the default ZIP_STORED. _save_state walks the model: the
  model's own variables at vars/ (H5Entry with an empty path), then _walk_saveable yields "layers"
  first for Sequential and Functional, and _save_container_state names each layer
  naming.to_snake_case(class name) plus a per-class counter (dense, dense_1, ..., re_lu,
  leaky_re_lu), never layer.name; every layer gets layers/<that name>/vars, even without variables,
  and Layer.save_own_variables stores _trainable_variables + _non_trainable_variables as vars/0, 1,
  .... Sequential.layers leaves the InputLayer out; Functional.layers keeps it (input_layer).
  An empty optimizer/vars group is written too (as a compiled model has one; these are uncompiled).

Weights: kernels normal(0, 0.5), biases normal(0, 0.1), gamma uniform(0.5, 1.5), beta uniform(-0.5,
0.5), moving_mean normal(0, 0.5), moving_variance uniform(0.3, 2.0), float32, from
numpy.random.default_rng with a fixed seed per network; the Keras 2 and Keras 3 file of a network
hold the same values. Predictions are a float64 forward pass over those float32 weights and the
CSV's 6-decimal features. Every written file is read back here (config parsed, weights found the way
Keras finds them) and both formats must give the same predictions.
"""
import io
import json
import math
import os
import re
import zipfile

import h5py
import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "models")
K2_VERSION, K3_VERSION = "2.15.0", "3.5.0"
ZIP_DATE = (2024, 9, 1, 12, 0, 0)
METADATA = {"keras_version": K3_VERSION, "date_saved": "2024-09-01@12:00:00"}
INPUT_WIDTH = 6
ROWS = (0, 5, 17)
f32 = np.float32
K3_DTYPE = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
            "registered_name": None}


def snake(class_name):
    """Keras' naming.to_snake_case: BatchNormalization -> batch_normalization, ReLU -> re_lu."""
    s = re.sub(r"\W+", "", class_name)
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", s)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()


# ---------------------------------------------------------------- network descriptions
def dense(units, activation="linear", use_bias=True, **kw):
    return dict(cls="Dense", units=units, activation=activation, use_bias=use_bias, **kw)


def bn(epsilon=1e-3, momentum=0.99, center=True, scale=True, axis=-1, **kw):
    return dict(cls="BatchNormalization", epsilon=epsilon, momentum=momentum, center=center,
                scale=scale, axis=axis, **kw)


def act(activation, **kw):
    return dict(cls="Activation", activation=activation, **kw)


def relu_layer(**kw):
    return dict(cls="ReLU", **kw)


def leaky(slope, **kw):
    return dict(cls="LeakyReLU", slope=slope, **kw)


def dropout(rate, **kw):
    return dict(cls="Dropout", rate=rate, **kw)


def layernorm(**kw):
    return dict(cls="LayerNormalization", epsilon=1e-3, **kw)


def chain(layers):
    """Nodes of a single chain; node 0 is the input."""
    nodes = [dict(cls="InputLayer")]
    for i, spec in enumerate(layers):
        nodes.append(dict(spec, inputs=[i]))
    return nodes


def net(stem, seed, layers=None, nodes=None, functional=False, formats=("k2", "k3"), good=True,
        k2_modern=False, k2_empty="f8", why=None):
    return dict(stem=stem, seed=seed, nodes=nodes or chain(layers), functional=functional,
                formats=formats, good=good, k2_modern=k2_modern, k2_empty=k2_empty, why=why)


def dense_bn_relu_layers(k3_names=False, k2_axis=None):
    n = (lambda s: {"k3_name": s}) if k3_names else (lambda s: {})
    extra = {"k2_axis": k2_axis} if k2_axis is not None else {}
    return [dense(16, **n("hidden_a")), bn(**n("batch_normalization_1"), **extra), act("relu"),
            dense(8, **n("dense")), bn(**n("batch_normalization"), **extra), act("relu"),
            dense(1, **n("head"))]


def eleven():
    layers = []
    for i in range(10):
        layers.append(dense(8, "relu"))
        if i == 1:
            layers.append(bn())
    return layers + [dense(1)]


BRANCH = [dict(cls="InputLayer"),
          dict(dense(8, k3_name="a"), inputs=[0]),
          dict(dense(8, k3_name="b"), inputs=[0]),
          dict(cls="Add", inputs=[1, 2]),
          dict(dense(1), inputs=[3])]

NETWORKS = [
    net("dense_bn_relu", 101, dense_bn_relu_layers(k3_names=True, k2_axis=[1])),
    net("dense_relu_bn", 102, [dense(16, "relu"), bn(), dense(8, "relu"), bn(), dense(1)]),
    net("bn_on_inputs", 103, [bn(), dense(16), act("tanh"), dense(1)], k2_empty="S"),
    net("bn_some_layers", 104, [dense(16), bn(epsilon=0.01, momentum=0.9, trainable=False),
                                relu_layer(), dense(8, use_bias=False), act("sigmoid"), dense(1)]),
    net("fused_tanh_bn", 105, [dense(12, "tanh"), bn(center=False), dense(1)]),
    net("dropout_between", 106, [dense(16), bn(), act("relu"), dropout(0.25), dense(8),
                                 dropout(0.1), bn(), act("relu"), dense(1)]),
    net("three_widths", 107, [dense(24, "gelu"), bn(), dense(12, "elu"), bn(), dense(6),
                              leaky(0.1), dense(1)], k2_modern=True),
    net("functional_chain", 108, dense_bn_relu_layers(), functional=True),
    net("eleven_dense", 109, eleven(), k2_modern=True),
    net("unsupported_layernorm", 110, [dense(16), layernorm(), dense(1)], good=False,
        why="LayerNormalization is not supported"),
    net("branch", 111, nodes=BRANCH, functional=True, formats=("k3",), good=False,
        why="two Dense layers fed by the input and joined by Add: not a chain"),
    net("bn_axis0", 112, [dense(8), bn(axis=0), dense(1)], formats=("k2",), good=False,
        why="BatchNormalization(axis=0) normalizes along the batch axis"),
]


# ---------------------------------------------------------------- shapes, names, weights
def prepare(network):
    """Widths, Keras 2 names, Keras 3 names, Keras 3 weight-path names and weights per node."""
    rng = np.random.default_rng(network["seed"])
    nodes = network["nodes"]
    k2_count, k3_auto, k3_path = {}, {}, {}
    for i, node in enumerate(nodes):
        node.setdefault("trainable", True)
        cls = node["cls"]
        base = snake(cls)
        # Keras 2 auto names: per-class counters (zero-based); the input follows the model type.
        c = k2_count.get(base, -1) + 1
        k2_count[base] = c
        node["k2_name"] = base if c == 0 else f"{base}_{c}"
        # Keras 3 auto names, unless the network gives the layer a user name.
        c = k3_auto.get(base, -1) + 1
        k3_auto[base] = c
        node["k3_name"] = node.get("k3_name") or (base if c == 0 else f"{base}_{c}")
        # model.weights.h5 path names: snake-case class name + per-class counter, in layer order,
        # over the layers Sequential.layers / Functional.layers returns.
        if cls != "InputLayer" or network["functional"]:
            c = k3_path.get(base, -1) + 1
            k3_path[base] = c
            node["k3_path"] = base if c == 0 else f"{base}_{c}"
        if cls == "InputLayer":
            node["width"] = INPUT_WIDTH
            node["weights"] = []
            continue
        width_in = nodes[node["inputs"][0]]["width"]
        node["width_in"] = width_in
        node["width"] = node["units"] if cls == "Dense" else width_in
        node["weights"] = make_weights(node, width_in, rng)
    if network["functional"]:
        nodes[0]["k2_name"] = "input_1"
    else:
        nodes[0]["k2_name"] = nodes[1]["k2_name"] + "_input"
        nodes[0]["k3_name"] = "input_layer"


def make_weights(node, width_in, rng):
    """[(short name, float32 array)] in Keras' variable order."""
    cls, out = node["cls"], []
    if cls == "Dense":
        out.append(("kernel", rng.normal(0, 0.5, (width_in, node["units"]))))
        if node["use_bias"]:
            out.append(("bias", rng.normal(0, 0.1, node["units"])))
    elif cls in ("BatchNormalization", "LayerNormalization"):
        if node.get("scale", True):
            out.append(("gamma", rng.uniform(0.5, 1.5, width_in)))
        if node.get("center", True):
            out.append(("beta", rng.uniform(-0.5, 0.5, width_in)))
        if cls == "BatchNormalization":
            out.append(("moving_mean", rng.normal(0, 0.5, width_in)))
            out.append(("moving_variance", rng.uniform(0.3, 2.0, width_in)))
    return [(name, value.astype(f32)) for name, value in out]


# ---------------------------------------------------------------- layer configs
def initializer(class_name, modern):
    config = {"seed": None} if class_name == "GlorotUniform" else {}
    if modern:
        return {"module": "keras.initializers", "class_name": class_name, "config": config,
                "registered_name": None}
    return {"class_name": class_name, "config": config}


def layer_config(node, keras3, modern):
    cls = node["cls"]
    ini = lambda name: initializer(name, modern)  # noqa: E731
    if cls == "InputLayer":
        if keras3:
            return {"batch_shape": [None, INPUT_WIDTH], "dtype": "float32", "sparse": False,
                    "name": node["k3_name"]}
        return {"batch_input_shape": [None, INPUT_WIDTH], "dtype": "float32", "sparse": False,
                "ragged": False, "name": node["k2_name"]}
    c = {"name": node["k3_name"] if keras3 else node["k2_name"], "trainable": node["trainable"],
         "dtype": K3_DTYPE if keras3 else "float32"}
    if cls == "Dense":
        c.update(units=node["units"], activation=node["activation"], use_bias=node["use_bias"],
                 kernel_initializer=ini("GlorotUniform"), bias_initializer=ini("Zeros"),
                 kernel_regularizer=None, bias_regularizer=None)
        if not keras3:
            c["activity_regularizer"] = None
        c.update(kernel_constraint=None, bias_constraint=None)
    elif cls == "BatchNormalization":
        axis = node["axis"] if keras3 else node.get("k2_axis", node["axis"])
        c.update(axis=axis, momentum=node["momentum"], epsilon=node["epsilon"],
                 center=node["center"], scale=node["scale"], beta_initializer=ini("Zeros"),
                 gamma_initializer=ini("Ones"), moving_mean_initializer=ini("Zeros"),
                 moving_variance_initializer=ini("Ones"), beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None)
        if keras3:
            c["synchronized"] = False
    elif cls == "Activation":
        c["activation"] = node["activation"]
    elif cls == "ReLU":
        c.update(max_value=None, negative_slope=0.0, threshold=0.0)
    elif cls == "LeakyReLU":
        c["negative_slope" if keras3 else "alpha"] = node["slope"]
    elif cls == "Dropout":
        if keras3:
            c.update(rate=node["rate"], seed=None, noise_shape=None)
        else:
            c.update(rate=node["rate"], noise_shape=None, seed=None)
    elif cls == "LayerNormalization":
        c.update(axis=-1, epsilon=node["epsilon"], center=True, scale=True)
        if keras3:
            c["rms_scaling"] = False
        c.update(beta_initializer=ini("Zeros"), gamma_initializer=ini("Ones"),
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None)
    elif cls != "Add":
        raise ValueError(cls)
    return c


def layer_entry(node, keras3, modern):
    """One element of the model config's "layers" list (without functional wiring)."""
    config = layer_config(node, keras3, modern)
    if not modern:
        return {"class_name": node["cls"], "config": config}
    entry = {"module": "keras.layers", "class_name": node["cls"], "config": config,
             "registered_name": None}
    if node["cls"] != "InputLayer":
        entry["build_config"] = {"input_shape": [None, node["width_in"]]}
    return entry


def keras2_config(network):
    nodes, modern = network["nodes"], network["k2_modern"]
    if not network["functional"]:
        return {"class_name": "Sequential",
                "config": {"name": "sequential",
                           "layers": [layer_entry(n, False, modern) for n in nodes]}}
    layers = []
    for node in nodes:
        entry = layer_entry(node, False, modern)
        entry["name"] = node["k2_name"]
        entry["inbound_nodes"] = ([] if node["cls"] == "InputLayer" else
                                  [[[nodes[i]["k2_name"], 0, 0, {}] for i in node["inputs"]]])
        layers.append(entry)
    return {"class_name": "Functional",
            "config": {"name": "model", "trainable": True, "layers": layers,
                       "input_layers": [[nodes[0]["k2_name"], 0, 0]],
                       "output_layers": [[nodes[-1]["k2_name"], 0, 0]]}}


def keras3_config(network):
    nodes = network["nodes"]
    if not network["functional"]:
        return {"module": "keras", "class_name": "Sequential",
                "config": {"name": "sequential", "trainable": True, "dtype": K3_DTYPE,
                           "layers": [layer_entry(n, True, True) for n in nodes],
                           "build_input_shape": [None, INPUT_WIDTH]},
                "registered_name": None, "build_config": {"input_shape": [None, INPUT_WIDTH]},
                "compile_config": None}

    def tensor(i):
        return {"class_name": "__keras_tensor__",
                "config": {"shape": [None, nodes[i]["width"]], "dtype": "float32",
                           "keras_history": [nodes[i]["k3_name"], 0, 0]}}

    layers = []
    for node in nodes:
        entry = layer_entry(node, True, True)
        entry["name"] = node["k3_name"]
        if node["cls"] == "InputLayer":
            entry["inbound_nodes"] = []
        else:
            ins = node["inputs"]
            arg = tensor(ins[0]) if len(ins) == 1 else [tensor(i) for i in ins]
            entry["inbound_nodes"] = [{"args": [arg], "kwargs": {}}]
        layers.append(entry)
    return {"module": "keras.src.models.functional", "class_name": "Functional",
            "config": {"name": "functional", "trainable": True, "layers": layers,
                       "input_layers": [[nodes[0]["k3_name"], 0, 0]],
                       "output_layers": [[nodes[-1]["k3_name"], 0, 0]]},
            "registered_name": "Functional", "build_config": {"input_shape": None},
            "compile_config": None}


# ---------------------------------------------------------------- writers
def write_keras2(network, path):
    nodes = network["nodes"]
    listed = nodes if network["functional"] else nodes[1:]  # model.layers
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = K2_VERSION
        f.attrs["backend"] = "tensorflow"
        f.attrs["model_config"] = json.dumps(keras2_config(network)).encode("utf8")
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = np.array([n["k2_name"].encode("utf8") for n in listed])
        mw.attrs["backend"] = b"tensorflow"
        mw.attrs["keras_version"] = K2_VERSION.encode("utf8")
        empty = np.array([], dtype="S1") if network["k2_empty"] == "S" else np.array([], np.float64)
        for node in sorted(listed, key=lambda n: n["k2_name"]):
            name = node["k2_name"]
            g = mw.create_group(name)
            full = [f"{name}/{short}:0" for short, _ in node["weights"]]
            g.attrs["weight_names"] = np.array([w.encode("utf8") for w in full]) if full else empty
            for w, (_, value) in zip(full, node["weights"]):
                g.create_dataset(w, data=value)
        mw.create_group("top_level_model_weights").attrs["weight_names"] = empty


def keras3_weights_bytes(network):
    nodes = network["nodes"]
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h:
        h.create_group("vars")  # the model's own variables: none
        for node in nodes:
            if "k3_path" not in node:
                continue
            g = h.create_group(f"layers/{node['k3_path']}").create_group("vars")
            for i, (_, value) in enumerate(node["weights"]):
                g[str(i)] = value
        h.create_group("optimizer").create_group("vars")
    return buf.getvalue()


def write_keras3(network, path):
    entries = [("metadata.json", json.dumps(METADATA).encode()),
               ("config.json", json.dumps(keras3_config(network)).encode()),
               ("model.weights.h5", keras3_weights_bytes(network))]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)


# ---------------------------------------------------------------- read back + Keras inference
def read_keras2(path):
    """[(class_name, config, [arrays], [input layer names])] and whether functional."""
    with h5py.File(path, "r") as f:
        raw = f.attrs["model_config"]
        model = json.loads(raw.decode("utf8") if isinstance(raw, bytes) else raw)
        mw = f["model_weights"]
        listed = [n.decode("utf8") for n in mw.attrs["layer_names"]]
        out = []
        for i, entry in enumerate(model["config"]["layers"]):
            name = entry["config"]["name"]
            arrays = []
            if name in listed:
                g = mw[name]
                names = g.attrs["weight_names"]
                arrays = [np.array(g[w.decode("utf8")]) for w in names] if names.size else []
            else:
                assert entry["class_name"] == "InputLayer"
            if model["class_name"] == "Functional":
                ins = [src[0] for src in entry["inbound_nodes"][0]] if entry["inbound_nodes"] else []
            else:
                ins = [model["config"]["layers"][i - 1]["config"]["name"]] if i else []
            out.append((entry["class_name"], entry["config"], arrays, ins))
    return out


def read_keras3(path):
    with zipfile.ZipFile(path) as zf:
        model = json.loads(zf.read("config.json"))
        weights = zf.read("model.weights.h5")
    functional = model["class_name"] == "Functional"
    out, counters = [], {}
    with h5py.File(io.BytesIO(weights), "r") as h:
        for i, entry in enumerate(model["config"]["layers"]):
            cls = entry["class_name"]
            arrays = []
            if cls != "InputLayer" or functional:
                base = snake(cls)
                c = counters.get(base, -1) + 1
                counters[base] = c
                g = h[f"layers/{base if c == 0 else f'{base}_{c}'}/vars"]
                arrays = [np.array(g[k]) for k in sorted(g.keys(), key=int)]
            if functional:
                ins = []
                for node in entry["inbound_nodes"]:
                    arg = node["args"][0]
                    for t in (arg if isinstance(arg, list) else [arg]):
                        ins.append(t["config"]["keras_history"][0])
            else:
                ins = [model["config"]["layers"][i - 1]["config"]["name"]] if i else []
            out.append((cls, entry["config"], arrays, ins))
    return out


def activation(name, x):
    if name == "linear":
        return x
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-x))
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))
    if name == "gelu":
        erf = np.vectorize(math.erf)
        return x * 0.5 * (1.0 + erf(x / math.sqrt(2.0)))
    raise ValueError(name)


def infer(layers, x):
    """Keras inference-mode forward pass, float64, over a read-back layer list."""
    values = {}
    for cls, c, w, ins in layers:
        w = [a.astype(np.float64) for a in w]
        h = values[ins[0]] if ins else x
        if cls == "InputLayer":
            y = x
        elif cls == "Dense":
            y = h @ w[0] + (w[1] if c["use_bias"] else 0.0)
            y = activation(c["activation"], y)
        elif cls == "BatchNormalization":
            assert c["axis"] in (-1, [1], 1), c["axis"]
            k = 0
            gamma = beta = None
            if c["scale"]:
                gamma, k = w[k], k + 1
            if c["center"]:
                beta, k = w[k], k + 1
            mean, var = w[k], w[k + 1]
            y = (h - mean) / np.sqrt(var + c["epsilon"])
            y = y * (1.0 if gamma is None else gamma) + (0.0 if beta is None else beta)
        elif cls == "Activation":
            y = activation(c["activation"], h)
        elif cls == "ReLU":
            y = np.where(h >= c["threshold"], h, c["negative_slope"] * (h - c["threshold"]))
            if c["max_value"] is not None:
                y = np.minimum(y, c["max_value"])
        elif cls == "LeakyReLU":
            slope = c["negative_slope"] if "negative_slope" in c else c["alpha"]
            y = np.where(h >= 0, h, slope * h)
        elif cls == "Dropout":
            y = h
        else:
            raise ValueError(f"no inference for {cls}")
        values[c["name"]] = y
    return values[layers[-1][1]["name"]]


# ---------------------------------------------------------------- data
def write_data(path):
    rng = np.random.default_rng(20240901)
    x = np.round(rng.normal(0, 1, (64, INPUT_WIDTH)), 6)
    y = np.round(np.tanh(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + rng.normal(0, 0.1, 64), 6)
    with open(path, "w", newline="\n") as f:
        f.write(",".join([f"f{i}" for i in range(INPUT_WIDTH)] + ["y"]) + "\n")
        for row, target in zip(x, y):
            f.write(",".join(f"{v:.6f}" for v in list(row) + [target]) + "\n")
    # Read back so the predictions use exactly the values the CSV holds.
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    return table[:, :INPUT_WIDTH], table[:, INPUT_WIDTH:]


def summary(layers):
    return [[cls, c["name"], c.get("units") if cls == "Dense" else None,
             c.get("activation") if cls in ("Dense", "Activation") else None]
            for cls, c, _, _ in layers]


def main():
    os.makedirs(OUT, exist_ok=True)
    x, y = write_data(os.path.join(OUT, "data.csv"))
    expected = {"made_by": "tests/keras/make_model_fixtures.py (h5py + numpy; Keras inference "
                           "semantics in float64 over the files' float32 weights; rows of data.csv "
                           "unstandardized)"}
    for network in NETWORKS:
        prepare(network)
        stem = network["stem"]
        files, readback = {}, {}
        if "k2" in network["formats"]:
            files["keras2"] = stem + ".h5"
            write_keras2(network, os.path.join(OUT, files["keras2"]))
            readback["keras2"] = read_keras2(os.path.join(OUT, files["keras2"]))
        if "k3" in network["formats"]:
            files["keras3"] = stem + ".keras"
            write_keras3(network, os.path.join(OUT, files["keras3"]))
            readback["keras3"] = read_keras3(os.path.join(OUT, files["keras3"]))
        if not network["good"]:
            print(f"{stem}: bad ({network['why']}): {', '.join(files.values())}")
            continue
        rows = np.array(ROWS)
        pred3 = infer(readback["keras3"], x[rows])
        pred2 = infer(readback["keras2"], x[rows])
        assert np.array_equal(pred2, pred3), stem
        entry = {"files": files,
                 "predictions": {str(r): [float(v) for v in p] for r, p in zip(ROWS, pred3)},
                 "mse": {str(r): float(np.mean((p - y[r]) ** 2)) for r, p in zip(ROWS, pred3)},
                 "layers": summary(readback["keras3"]),
                 "layers_keras2": summary(readback["keras2"])}
        expected[stem] = entry
        print(f"{stem}: {entry['predictions']}")
    with open(os.path.join(OUT, "expected.json"), "w", newline="\n") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
