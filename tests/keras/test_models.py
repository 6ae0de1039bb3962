#!/usr/bin/env python3
"""The user's own Keras model files (architecture and weights) through `bnlab run`, checked
independently of bnlab.

For every good fixture of tests/keras/fixtures/models/ (made by make_model_fixtures.py with h5py
and numpy), in the given format (keras2: model.save() .h5; keras3: .keras), on both engines:
  * the modules bnlab built (architecture.json) are the ones the file's config describes, derived
    here from expected.json's layer list (Dense with a fused activation is Linear then the
    activation; Dropout, BatchNormalization, Activation/ReLU/LeakyReLU/ELU one module each);
  * evaluate of the untouched weights on rows 0, 5 and 17 equals the numpy prediction from the
    file's own config and weights (expected.json) within 1e-5 relative;
  * every curve point and evaluate figure of train, freeze_affine, momentum_zero, eval and frozen
    matches scripts/reference.py (Python PyTorch from the recorded layer list) within 1e-5 relative.
The bad fixtures, and a config whose model disagrees with the file, exit 2 naming the layer, and
write nothing.
Usage: test_models.py BNLAB_BINARY SOURCE_DIR keras2|keras3
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

TOL = 1e-5


def expected_modules(layers):
    """(kind, units or activation) per bnlab module, from the Keras layer list."""
    out = []
    for cls, _name, units, act in layers:
        if cls == "InputLayer":
            continue
        if cls == "Dense":
            out.append(("dense", units))
            if act not in (None, "linear"):
                out.append(("activation", {"swish": "silu"}.get(act, act)))
        elif cls == "BatchNormalization":
            out.append(("batchnorm", None))
        elif cls == "Activation":
            out.append(("activation", act))
        elif cls == "ReLU":
            out.append(("activation", "relu"))
        elif cls == "LeakyReLU":
            out.append(("activation", "leaky_relu"))
        elif cls == "ELU":
            out.append(("activation", "elu"))
        elif cls == "Dropout":
            out.append(("dropout", None))
        else:
            raise SystemExit(f"test_models: unexpected class {cls} in expected.json")
    return out


def config(models, fixture, extra_model=None):
    c = {"name": "keras_model", "data": {"source": "csv", "path": os.path.join(models, "data.csv"),
                                         "target_columns": ["y"], "standardize": False},
         "model": {"loss": "mse"}, "init": {"keras": os.path.join(models, fixture)},
         "finetune": {"samples": [0, 5, 17], "epochs": 3, "optimizer": {"name": "sgd", "lr": 0.001}},
         "strategies": ["train", "freeze_affine", "momentum_zero", "eval", "frozen"]}
    if extra_model:
        c["model"].update(extra_model)
    return c


def main():
    binary, src, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
    models = os.path.abspath(os.path.join(src, "tests", "keras", "fixtures", "models"))
    expected = json.load(open(os.path.join(models, "expected.json")))
    failures, checked, worst = [], 0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for stem, e in expected.items():
            if stem == "made_by":
                continue
            fixture = e["files"][fmt]
            cfg_path = os.path.join(tmp, stem + ".json")
            json.dump(config(models, fixture), open(cfg_path, "w"))
            for engine in ("batched", "torch"):
                out = os.path.join(tmp, f"{stem}-{engine}")
                subprocess.run([binary, "run", cfg_path, "--out", out, "--engine", engine, "--verbose", "0", "--no-plots"],
                               check=True)
                arch = json.load(open(os.path.join(out, "architecture.json")))
                got = [(m["kind"], m["out"] if m["kind"] == "dense" else m.get("activation")) for m in arch["layers"]]
                want = [(k, v if k != "batchnorm" and k != "dropout" else None) for k, v in expected_modules(e["layers"])]
                got = [(k, v if k in ("dense", "activation") else None) for k, v in got]
                if got != want:
                    failures.append(f"{fixture} ({engine}): bnlab built {got}, the file describes {want}")
                summary = json.load(open(os.path.join(out, "summary.json")))
                for r in summary["runs"]:
                    mse = e["mse"][str(r["sample"])]
                    rel = abs(r["evaluate_pretrained"] - mse) / abs(mse)
                    worst = max(worst, rel)
                    if rel > TOL:
                        failures.append(f"{fixture} ({engine}) sample {r['sample']}: evaluate {r['evaluate_pretrained']} vs numpy {mse}")
                ref = subprocess.run(["/usr/bin/python3", os.path.join(src, "scripts", "reference.py"), out, "--relative",
                                      "--tol", str(TOL)], capture_output=True, text=True)
                last = ref.stdout.strip().splitlines()[-1] if ref.stdout.strip() else ref.stderr
                print(f"{fixture} ({engine}): {len(got)} modules; {last}")
                if ref.returncode != 0:
                    failures.append(f"{fixture} ({engine}): reference {last}")
                checked += 1
        # The file's trainable flags: bn_some_layers saved its BatchNormalization with trainable
        # false, which fit() runs in inference mode with gamma/beta frozen; strategies may name it
        # by its Keras name.
        some = expected["bn_some_layers"]["files"][fmt]
        c = config(models, some)
        c["strategies"] = [{"preset": "frozen", "name": "by_keras_name", "layers": ["batch_normalization"]}]
        json.dump(c, open(os.path.join(tmp, "some.json"), "w"))
        out = os.path.join(tmp, "some")
        subprocess.run([binary, "run", os.path.join(tmp, "some.json"), "--out", out, "--verbose", "0", "--no-plots"], check=True)
        as_saved = json.load(open(os.path.join(out, "keras.json")))["as_saved"]["strategy"]
        resolved = json.load(open(os.path.join(out, "config.resolved.json")))["strategies"][0]["layers"]
        print(f"{some}: as saved {as_saved}; layers [\"batch_normalization\"] resolve to {resolved}")
        if as_saved != {"name": "as_saved", "preset": "frozen", "layers": ["1"]}:
            failures.append(f"{some}: keras.json as_saved is {as_saved}")
        if resolved != ["1"]:
            failures.append(f"{some}: the Keras name batch_normalization resolved to {resolved}, not module 1")
        # Files bnlab must refuse, naming the layer; and a config that describes another model.
        bad = {"keras2": [("unsupported_layernorm.h5", 'layer "layer_normalization" (LayerNormalization)'),
                          ("bn_axis0.h5", "axis 0 is not the feature axis")],
               "keras3": [("unsupported_layernorm.keras", 'layer "layer_normalization" (LayerNormalization)'),
                          ("branch.keras", "not a branching model")]}[fmt]
        cases = [(f, config(models, f), needle) for f, needle in bad]
        if fmt == "keras2":
            # A kernel that declares 2^32 floats (chunked, so the file stays small): refused by its
            # shape before any buffer is sized (a product that overflowed once would have sized it
            # below what HDF5 writes).
            import h5py
            huge = os.path.join(tmp, "huge_kernel.h5")
            shutil.copy(os.path.join(models, expected["dense_relu_bn"]["files"][fmt]), huge)
            with h5py.File(huge, "r+") as f:
                kernels = []
                f["model_weights"].visititems(lambda name, obj: kernels.append(name) if name.endswith("kernel:0") else None)
                del f["model_weights"][kernels[0]]
                f["model_weights"].create_dataset(kernels[0], shape=(65536, 65536), dtype="f4", chunks=(64, 64))
            cases.append(("huge_kernel.h5", config(models, huge), "declares more than 2^31 values"))
        relu_bn = expected["dense_relu_bn"]["files"][fmt]
        cases.append((relu_bn + " with hidden [16, 8]", config(models, relu_bn, {"hidden": [16, 8]}),
                      "module 1 is batchnorm here, activation relu in"))
        for what, c, needle in cases:
            path = os.path.join(tmp, "bad.json")
            json.dump(c, open(path, "w"))
            out = os.path.join(tmp, "bad_out")
            p = subprocess.run([binary, "run", path, "--out", out, "--verbose", "0"], capture_output=True, text=True)
            print(f"{what}: exit {p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
            if p.returncode != 2 or needle not in p.stderr:
                failures.append(f"{what}: exit {p.returncode}, want 2 with {needle!r}: {p.stderr}")
            if os.path.exists(out):
                failures.append(f"{what}: wrote {out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"evaluate against numpy from the files' configs: max relative diff {worst:.3e}")
    print(f"{checked} runs checked, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
