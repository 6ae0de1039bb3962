#!/usr/bin/python3
"""The PyTorch user's own files (init.torch) through `bnlab run` and `bnlab export`, checked
independently of bnlab.

For every network of tests/torch/fixtures/ (made by make_fixtures.py with python3-torch) and every
file form of it (state dict, training checkpoint, TorchScript; DataParallel and Lightning
checkpoints with init.prefix), on both engines:
  * the modules bnlab built (architecture.json) are the ones make_fixtures.py read off torch.nn;
  * evaluate of the untouched weights on each fine-tuning row equals the MSE of the module Python
    loads from the same file (expected.json) within 1e-6 relative;
  * every curve point and evaluate figure of eval, frozen, recalibrate_frozen and fold matches
    scripts/reference.py run on the module list of expected.json and the file as Python loads it
    (--layers/--weights: nothing from bnlab's architecture.json or pretrained.pt) within 1e-6
    relative.
Round trip, per file: a run whose only strategy changes nothing (frozen BN, every Linear frozen)
exported --as state_dict, checkpoint and torchscript reloads in Python (torch.load, torch.jit.load)
to tensors bit-for-bit equal to the file's own, under the file's key and prefix for a checkpoint;
the exported TorchScript module computes what the original computes; a fine-tuned strategy's export
equals bnlab's finetuned_<strategy>.pt bit for bit; and bnlab reads its own TorchScript export back.
The bad fixtures and a config whose model disagrees with a TorchScript file exit 2 naming the tensor
or submodule, and write nothing.
Usage: test_torch_files.py BNLAB_BINARY SOURCE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts"))
import reference  # noqa: E402  the user's file as Python loads it (reference.user_weights)

TOL = 1e-6
# The batched engine sums in its own order, so its predictions differ from PyTorch's by a few float32
# roundings; three SGD steps at lr 1e-3 carry that to 1.01e-6 relative on dense_bn_relu (measured),
# at 5e-4 to about half of it. The torch engine reproduces Python PyTorch bit for bit at either.
LR = 5e-4
PRESETS = ["eval", "frozen", "recalibrate_frozen", "fold"]


def config_layers(modules):
    """expected.json's modules as a bnlab config's model.layers (the head Linear is bnlab's)."""
    out = []
    for m in modules:
        if m["kind"] == "dense" and not m["head"]:
            out.append({"dense": m["out"], "use_bias": m["use_bias"]})
        elif m["kind"] == "batchnorm":
            out.append({"batchnorm": {"eps": m["eps"], "momentum": m["momentum"], "affine": m["scale"]}})
        elif m["kind"] == "activation":
            out.append({"activation": m["activation"]})
        elif m["kind"] == "dropout":
            out.append({"dropout": m["rate"]})
    return out


def config(fx, e, form, strategies, samples):
    init = {"torch": os.path.join(fx, e["files"][form])}
    if e["prefix"][form]:
        init["prefix"] = e["prefix"][form]
    model = {"loss": "mse"}
    if form != "ts":  # a TorchScript module brings its architecture; a state dict needs the config's
        model["layers"] = config_layers(e["modules"])
    return {"name": "torch_file", "data": {"source": "csv", "path": os.path.join(fx, "data.csv"), "target_columns": ["y"],
                                           "standardize": False},
            "model": model, "init": init, "pretrain": {"batch_size": 8},
            "finetune": {"samples": samples, "epochs": 3, "optimizer": {"name": "sgd", "lr": LR}},
            "strategies": strategies}


def run(binary, cfg, tmp, name, extra=()):
    path = os.path.join(tmp, name + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    out = os.path.join(tmp, name)
    p = subprocess.run([binary, "run", path, "--out", out, "--verbose", "0", "--no-plots", *extra], capture_output=True, text=True)
    return p, out


def main():
    binary, src = sys.argv[1], sys.argv[2]
    fx = os.path.abspath(os.path.join(src, "tests", "torch", "fixtures"))
    expected_path = os.path.join(fx, "expected.json")
    expected = json.load(open(expected_path))
    ref_script = os.path.join(src, "scripts", "reference.py")
    failures, checked, worst = [], 0, 0.0
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        for stem, e in expected.items():
            if stem == "made_by":
                continue
            x_all = None
            for form, file in e["files"].items():
                for engine in ("batched", "torch"):
                    tag = f"{file} ({engine})"
                    p, out = run(binary, config(fx, e, form, PRESETS, e["rows"]), tmp, f"{stem}-{form}-{engine}", ["--engine", engine])
                    if p.returncode != 0:
                        failures.append(f"{tag}: exit {p.returncode}: {p.stderr}")
                        continue
                    arch = json.load(open(os.path.join(out, "architecture.json")))["layers"]
                    got = [(m["kind"], m.get("out") if m["kind"] in ("dense", "batchnorm") else m.get("activation", m.get("rate")))
                           for m in arch]
                    want = [(m["kind"], m.get("out") if m["kind"] in ("dense", "batchnorm") else m.get("activation", m.get("rate")))
                            for m in e["modules"]]
                    if got != want:
                        failures.append(f"{tag}: bnlab built {got}, the file holds {want}")
                    bn_got = [(m["eps"], m["momentum"]) for m in arch if m["kind"] == "batchnorm"]
                    bn_want = [(m["eps"], m["momentum"]) for m in e["modules"] if m["kind"] == "batchnorm"]
                    if bn_got != bn_want:
                        failures.append(f"{tag}: BatchNorm eps/momentum {bn_got}, the file's {bn_want}")
                    resolved = json.load(open(os.path.join(out, "config.resolved.json")))
                    if resolved["model"]["batchnorm"]["semantics"] != "torch":
                        failures.append(f"{tag}: semantics {resolved['model']['batchnorm']['semantics']}, not torch by default")
                    summary = json.load(open(os.path.join(out, "summary.json")))
                    for r in summary["runs"]:
                        mse = e["mse"][form][str(r["sample"])]
                        rel = abs(r["evaluate_pretrained"] - mse) / abs(mse)
                        worst = max(worst, rel)
                        if rel > TOL:
                            failures.append(f"{tag} sample {r['sample']}: evaluate {r['evaluate_pretrained']} vs Python {mse}")
                    ref = subprocess.run(["/usr/bin/python3", ref_script, out, "--relative", "--tol", str(TOL),
                                          "--layers", f"{expected_path}:{stem}", "--weights", os.path.join(fx, file),
                                          "--prefix", e["prefix"][form]], capture_output=True, text=True)
                    last = ref.stdout.strip().splitlines()[-1] if ref.stdout.strip() else ref.stderr
                    print(f"{tag}: {len(arch)} modules; {last}")
                    if ref.returncode != 0:
                        failures.append(f"{tag}: reference {last}")
                    checked += 1
                # Round trip: nothing changes under `untouched`, so every export is the file's tensors.
                before = len(failures)
                linears = sum(m["kind"] == "dense" for m in e["modules"])
                untouched = {"name": "untouched", "preset": "frozen", "freeze_linear": linears}
                p, out = run(binary, config(fx, e, form, [untouched, "eval"], [e["rows"][0]]), tmp, f"{stem}-{form}-export")
                if p.returncode != 0:
                    failures.append(f"{file} export run: exit {p.returncode}: {p.stderr}")
                    continue
                key = {"sd": None, "ts": None, "dp": "model_state_dict"}.get(form, "state_dict")
                original = reference.user_weights(os.path.join(fx, file), e["prefix"][form])
                for strategy in ("untouched", "eval"):
                    want = original if strategy == "untouched" else torch.load(os.path.join(out, f"finetuned_{strategy}.pt"))
                    for as_ in ("state_dict", "checkpoint", "torchscript"):
                        dst = os.path.join(tmp, f"{stem}-{form}-{strategy}.{as_}.pt")
                        q = subprocess.run([binary, "export", out, "--strategy", strategy, "--format", "torch", "--as", as_, "-o", dst],
                                           capture_output=True, text=True)
                        if q.returncode != 0:
                            failures.append(f"{file} export {strategy} --as {as_}: exit {q.returncode}: {q.stderr}")
                            continue
                        if as_ == "torchscript":
                            loaded = torch.jit.load(dst)
                            back = loaded.state_dict()
                            if not all(p.requires_grad for p in loaded.parameters()):
                                failures.append(f"{file} export {strategy} --as torchscript: parameters do not require grad")
                        elif as_ == "checkpoint":
                            ck = torch.load(dst)
                            k = key or "state_dict"
                            pre = e["prefix"][form]
                            if k not in ck or not all(n.startswith(pre) for n in ck[k]):
                                failures.append(f"{file} --as checkpoint: entries {sorted(ck)}, want \"{k}\" with prefix \"{pre}\"")
                                continue
                            back = {n[len(pre):]: t for n, t in ck[k].items()}
                        else:
                            back = torch.load(dst)
                        same = set(back) == set(want) and all(torch.equal(back[n], want[n]) and back[n].dtype == want[n].dtype
                                                              for n in want)
                        if not same:
                            failures.append(f"{file} export {strategy} --as {as_}: tensors differ from "
                                            f"{'the file' if strategy == 'untouched' else 'finetuned_eval.pt'}")
                        if as_ == "torchscript" and strategy == "untouched":
                            # What the exported module computes, against the module Python builds from the file.
                            if x_all is None:
                                import csv
                                rows = list(csv.DictReader(open(os.path.join(fx, "data.csv"))))
                                x_all = torch.tensor([[float(r[f"f{i}"]) for i in range(5)] for r in rows])
                            mine = torch.jit.load(dst)
                            theirs = torch.jit.load(os.path.join(fx, e["files"]["ts"]))
                            mine.eval()
                            theirs.eval()
                            with torch.no_grad():
                                d = float((mine(x_all) - theirs(x_all)).abs().max())
                            print(f"{file}: exported TorchScript vs the user's module on 64 rows: max |diff| {d:.3e}")
                            if d != 0.0:
                                failures.append(f"{file}: the exported TorchScript module computes differently (max |diff| {d})")
                            # bnlab reads its own export back, architecture included.
                            back_cfg = config(fx, e, "ts", ["eval"], [e["rows"][0]])
                            back_cfg["init"] = {"torch": dst}
                            r2, out2 = run(binary, back_cfg, tmp, f"{stem}-{form}-reimport")
                            if r2.returncode != 0:
                                failures.append(f"{file}: bnlab cannot read its own TorchScript export: {r2.stderr}")
                            else:
                                again = torch.load(os.path.join(out2, "pretrained.pt"))["state_dict"]
                                if not all(torch.equal(again[n], original[n]) for n in original):
                                    failures.append(f"{file}: reimported TorchScript export differs from the file")
                print(f"{file}: export --as state_dict, checkpoint, torchscript of untouched and eval: "
                      f"{'bit for bit' if len(failures) == before else 'MISMATCH'}")
        # Files and configs bnlab must refuse, naming the tensor or submodule; nothing is written.
        e = expected["dense_bn_relu"]
        good = config(fx, e, "sd", ["eval"], [e["rows"][0]])
        cases = []
        for file, needle in [("bad_missing.sd.pt", 'no tensor "1.running_var" (the model expects [8])'),
                             ("bad_shape.sd.pt", 'tensor "3.weight" has shape [6, 7] but the model needs [6, 8]'),
                             ("bad_legacy.pt", "legacy torch.save format"),
                             ("bad_module.pt", "pickled torch.nn.modules.container.Sequential object"),
                             ("bad_expanded.sd.pt", 'tensor "0.weight": its size declares more elements than its storage of 1 holds'),
                             ("dense_bn_relu.dp.pt", 'set init.prefix to "module."')]:
            c = json.loads(json.dumps(good))
            c["init"] = {"torch": os.path.join(fx, file)}
            cases.append((file, c, needle))
        for file, needle in [("bad_layernorm.ts.pt", 'submodule "1" (torch.nn.LayerNorm)'),
                             ("bad_traced.ts.pt", 'submodule "0" (torch.nn.Linear): no constant "in_features"')]:
            c = json.loads(json.dumps(good))
            c["init"] = {"torch": os.path.join(fx, file)}
            del c["model"]["layers"]
            cases.append((file, c, needle))
        c = json.loads(json.dumps(good))
        c["init"] = {"torch": os.path.join(fx, e["files"]["ts"])}
        c["model"]["layers"][0] = {"dense": 7}
        cases.append(("dense_bn_relu.ts.pt with a Dense of 7", c, 'module 0 has 7 units here, 8 in'))
        c = json.loads(json.dumps(good))
        c["init"] = {"torch": os.path.join(fx, e["files"]["ckpt"]), "key": "optimizer"}
        cases.append(("dense_bn_relu.ckpt.pt with init.key optimizer", c, 'entry "state" of entry "optimizer"'))
        c = json.loads(json.dumps(good))
        c["init"]["keras"] = "model.h5"
        cases.append(("init.torch with init.keras", c, "names both a Keras file (keras) and a PyTorch file (torch)"))
        c = json.loads(json.dumps(good))
        c["init"] = {"torch": os.path.join(fx, e["files"]["ts"]), "prefix": "module."}
        del c["model"]["layers"]
        cases.append(("init.prefix with a TorchScript file", c, "init.prefix: applies to a state dict or checkpoint"))
        c = json.loads(json.dumps(good))
        c["init"] = {"torch": os.path.join(fx, e["files"]["ts"])}
        del c["model"]["layers"]
        c["model"]["batchnorm"] = {"eps": 0.001}
        cases.append(("model.batchnorm.eps against a TorchScript file", c, "model.batchnorm.eps: is 0.001, but submodule \"1\""))
        for what, c, needle in cases:
            p, out = run(binary, c, tmp, "bad")
            print(f"{what}: exit {p.returncode}: {p.stderr.strip().splitlines()[1 if 'problems' in p.stderr.splitlines()[0] else 0] if p.stderr.strip() else ''}")
            if p.returncode != 2 or needle not in p.stderr:
                failures.append(f"{what}: exit {p.returncode}, want 2 with {needle!r}: {p.stderr}")
            if os.path.exists(out):
                failures.append(f"{what}: wrote {out}")
        # export's --as: only with --format torch, one of the three forms.
        p, out = run(binary, good, tmp, "for_export")
        for args, needle in [(["--format", "torch", "--as", "onnx"], '--as: expected state_dict, checkpoint or torchscript, got "onnx"'),
                             (["--format", "keras-h5", "--as", "checkpoint"], "--as: applies to --format torch only")]:
            q = subprocess.run([binary, "export", out, "--strategy", "eval", *args, "-o", os.path.join(tmp, "x.pt")],
                               capture_output=True, text=True)
            print(f"export {' '.join(args)}: exit {q.returncode}: {q.stderr.strip()}")
            if q.returncode != 2 or needle not in q.stderr or os.path.exists(os.path.join(tmp, "x.pt")):
                failures.append(f"export {args}: exit {q.returncode}, want 2 with {needle!r} and no file: {q.stderr}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print(f"evaluate against the modules Python loads from the files: max relative diff {worst:.3e}")
    print(f"{checked} runs checked against scripts/reference.py at {TOL:g} relative, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
