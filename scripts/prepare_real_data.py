#!/usr/bin/env python3
"""Writes data/breast_cancer.csv from the copy of the Wisconsin Diagnostic Breast Cancer data set
that Debian's python3-sklearn ships (sklearn/datasets/data/breast_cancer.csv): a header row of
feature names plus "label" (0 = malignant, 1 = benign, as scikit-learn codes it).
Run: /usr/bin/python3 scripts/prepare_real_data.py   (needs python3-sklearn; the output is committed)
"""
import csv
import os

from sklearn.datasets import load_breast_cancer

d = load_breast_cancer()
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "breast_cancer.csv")
with open(out, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow([n.replace(" ", "_") for n in d.feature_names] + ["label"])
    for x, y in zip(d.data, d.target):
        w.writerow([repr(float(v)) for v in x] + [int(y)])
print(f"wrote {out}: {d.data.shape[0]} rows, {d.data.shape[1]} features")
