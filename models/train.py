#!/usr/bin/env python3
"""Trains the three payslip models from the project's own synthetic generator and writes them as
ONNX graphs plus models/model_metadata.json.

Training data comes from `payslip-stream dataset dump`, i.e. the Rust generator and the Rust
preprocessing that the infer stage runs, so features cannot drift between training and serving.
Everything is seeded: the same binary and seeds give the same weights.

For each model three versions are written:
  1.0.0          baseline   small training set, simple model
  1.1.0          candidate  full training set (and for text recognition a hidden layer)
  1.1.1-degraded degraded   deliberately worse, for rollback tests (see each trainer)
Held-out metrics are measured with ONNX Runtime on the written files, on documents from another seed.

Usage: python3 models/train.py [--bin target/debug/payslip-stream] [--train-docs 4000] [--heldout-docs 1500]
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TRAIN_SEED, HELDOUT_SEED = 1001, 2002
OPSET, IR_VERSION = 17, 8


def dump(binary, out, seed, count, lines):
    cmd = binary + ["dataset", "dump", "--out", out, "--seed", str(seed), "--count", str(count), "--lines-per-doc", str(lines)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    n, lines = meta["documents"], meta["lines"]
    dim = meta["classifier_dim"]
    ph, pw = meta["page_raster"]
    gh, gw = meta["table_grid"]
    mc = meta["max_line_chars"]
    cell = meta["glyph"][0] * meta["glyph"][1]
    rd = lambda name, dt: np.fromfile(os.path.join(out, name), dtype=dt)
    return meta, {
        "cx": rd("classifier_x.f32", "<f4").reshape(n, dim),
        "cy": rd("classifier_y.u8", np.uint8).astype(np.int64),
        "tx": rd("table_x.u8", np.uint8).reshape(n, ph * pw).astype(np.float32) / 255.0,
        "ty": rd("table_y.u8", np.uint8).reshape(n, gh * gw).astype(np.float32),
        "gx": rd("text_x.u8", np.uint8).reshape(lines, mc, cell).astype(np.float32) / 255.0,
        "gy": rd("text_y.u8", np.uint8).reshape(lines, mc).astype(np.int64),
    }


class Adam:
    def __init__(self, params, lr):
        self.p, self.lr, self.t = params, lr, 0
        self.m = [np.zeros_like(x) for x in params]
        self.v = [np.zeros_like(x) for x in params]

    def step(self, grads):
        self.t += 1
        for i, (p, g) in enumerate(zip(self.p, grads)):
            self.m[i] = 0.9 * self.m[i] + 0.1 * g
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
            mh = self.m[i] / (1 - 0.9 ** self.t)
            vh = self.v[i] / (1 - 0.999 ** self.t)
            p -= self.lr * mh / (np.sqrt(vh) + 1e-8)


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def train_softmax(x, y, k, epochs, lr, l2, rng, batch=256):
    w = (rng.standard_normal((x.shape[1], k)) * 0.01).astype(np.float32)
    b = np.zeros(k, np.float32)
    opt = Adam([w, b], lr)
    onehot = np.eye(k, dtype=np.float32)[y]
    for _ in range(epochs):
        idx = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            j = idx[s:s + batch]
            p = softmax(x[j] @ w + b)
            g = (p - onehot[j]) / len(j)
            opt.step([x[j].T @ g + l2 * w, g.sum(0)])
    return w, b


def train_mlp(x, y, k, hidden, epochs, lr, rng, batch=512):
    w1 = (rng.standard_normal((x.shape[1], hidden)) * np.sqrt(2.0 / x.shape[1])).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = (rng.standard_normal((hidden, k)) * np.sqrt(1.0 / hidden)).astype(np.float32)
    b2 = np.zeros(k, np.float32)
    opt = Adam([w1, b1, w2, b2], lr)
    onehot = np.eye(k, dtype=np.float32)[y]
    for _ in range(epochs):
        idx = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            j = idx[s:s + batch]
            hpre = x[j] @ w1 + b1
            hact = np.maximum(hpre, 0)
            p = softmax(hact @ w2 + b2)
            g2 = (p - onehot[j]) / len(j)
            gh = (g2 @ w2.T) * (hpre > 0)
            opt.step([x[j].T @ gh, gh.sum(0), hact.T @ g2, g2.sum(0)])
    return w1, b1, w2, b2


def train_logistic(x, y, epochs, lr, l2, rng, batch=256):
    w = np.zeros((x.shape[1], y.shape[1]), np.float32)
    b = np.zeros(y.shape[1], np.float32)
    opt = Adam([w, b], lr)
    for _ in range(epochs):
        idx = rng.permutation(len(x))
        for s in range(0, len(x), batch):
            j = idx[s:s + batch]
            p = 1.0 / (1.0 + np.exp(-(x[j] @ w + b)))
            g = (p - y[j]) / len(j)
            opt.step([x[j].T @ g + l2 * w, g.sum(0)])
    return w, b


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def save(graph, path, doc):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="payslip-stream/models/train.py", doc_string=doc)
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = model.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def classifier_graph(w, b):
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", w.shape[0]])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", w.shape[1]])
    nodes = [helper.make_node("Gemm", ["features", "W", "B"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)]
    return helper.make_graph(nodes, "document_classifier", [x], [y], [init("W", w), init("B", b)])


def table_graph(w, b):
    x = helper.make_tensor_value_info("page", TensorProto.FLOAT, ["batch", w.shape[0]])
    y = helper.make_tensor_value_info("table_cells", TensorProto.FLOAT, ["batch", w.shape[1]])
    nodes = [helper.make_node("Gemm", ["page", "W", "B"], ["logits"]), helper.make_node("Sigmoid", ["logits"], ["table_cells"])]
    return helper.make_graph(nodes, "table_detection", [x], [y], [init("W", w), init("B", b)])


def text_graph(layers, mc, cell, k):
    x = helper.make_tensor_value_info("glyphs", TensorProto.FLOAT, ["batch", mc, cell])
    y = helper.make_tensor_value_info("char_probabilities", TensorProto.FLOAT, ["batch", mc, k])
    nodes, inits, cur = [], [], "glyphs"
    for i, (w, b) in enumerate(layers):
        nodes.append(helper.make_node("MatMul", [cur, f"W{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]))
        inits += [init(f"W{i}", w), init(f"B{i}", b)]
        cur = f"a{i}"
        if i + 1 < len(layers):
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    nodes.append(helper.make_node("Softmax", [cur], ["char_probabilities"], axis=-1))
    return helper.make_graph(nodes, "text_recognition", [x], [y], inits)


def run(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def classifier_metrics(path, held, formats):
    pred = run(path, held["cx"]).argmax(1)
    y = held["cy"]
    pcda = y == formats.index("PCDA")
    out = {"accuracy": float((pred == y).mean()), "pcda_accuracy": float((pred[pcda] == y[pcda]).mean()), "documents": int(len(y))}
    out["per_format_accuracy"] = {f: float((pred[y == i] == i).mean()) for i, f in enumerate(formats) if (y == i).any()}
    return out


def table_metrics(path, held):
    pred = run(path, held["tx"]) >= 0.5
    truth = held["ty"] >= 0.5
    inter = (pred & truth).sum(1)
    union = (pred | truth).sum(1)
    return {"cell_accuracy": float((pred == truth).mean()), "mean_iou": float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))), "pages": int(len(truth))}


def text_metrics(path, held):
    pred = run(path, held["gx"]).argmax(-1)
    y = held["gy"]
    used = y != 0
    return {"char_accuracy": float((pred[used] == y[used]).mean()), "line_exact": float((pred == y).all(1).mean()), "lines": int(len(y))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=None, help="payslip-stream binary (default: cargo run)")
    ap.add_argument("--train-docs", type=int, default=4000)
    ap.add_argument("--heldout-docs", type=int, default=1500)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    binary = [args.bin] if args.bin else ["cargo", "run", "-q", "--bin", "payslip-stream", "--"]
    rng = np.random.default_rng(20261127)
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        meta, tr = dump(binary, os.path.join(tmp, "train"), TRAIN_SEED, args.train_docs, 3)
        _, held = dump(binary, os.path.join(tmp, "heldout"), HELDOUT_SEED, args.heldout_docs, 2)
    formats, charset = meta["formats"], meta["charset"]
    mc, cell = meta["max_line_chars"], meta["glyph"][0] * meta["glyph"][1]
    ncells = meta["table_grid"][0] * meta["table_grid"][1]
    dim, pix = meta["classifier_dim"], meta["page_raster"][0] * meta["page_raster"][1]
    k_fmt, k_chr = len(formats), len(charset)

    def add(name, version, role, graph, desc, metrics_fn, inputs, outputs, labels):
        rel = f"{name}/{version}.onnx"
        sha = save(graph, os.path.join(args.out, rel), desc)
        metrics = metrics_fn(os.path.join(args.out, rel))
        entries.append({"name": name, "version": version, "role": role, "file": rel, "sha256": sha, "inputs": inputs, "outputs": outputs, "labels": labels, "heldout": metrics, "description": desc})
        print(f"{name} {version} ({role}): {json.dumps(metrics)}", file=sys.stderr)

    # document_classifier
    cio = ([{"name": "features", "shape": [-1, dim], "dtype": "float32"}], [{"name": "probabilities", "shape": [-1, k_fmt], "dtype": "float32"}])
    pcda, army = formats.index("PCDA"), formats.index("ARMY")
    small = slice(0, 300)
    w, b = train_softmax(tr["cx"][small], tr["cy"][small], k_fmt, 40, 0.01, 1e-3, rng)
    add("document_classifier", "1.0.0", "baseline", classifier_graph(w, b), "softmax regression on 300 documents", lambda p: classifier_metrics(p, held, formats), *cio, formats)
    w, b = train_softmax(tr["cx"], tr["cy"], k_fmt, 60, 0.01, 1e-4, rng)
    add("document_classifier", "1.1.0", "candidate", classifier_graph(w, b), f"softmax regression on {len(tr['cy'])} documents", lambda p: classifier_metrics(p, held, formats), *cio, formats)
    y_bad = tr["cy"].copy()
    flip = (y_bad == pcda) & (rng.random(len(y_bad)) < 0.45)
    y_bad[flip] = army
    w, b = train_softmax(tr["cx"], y_bad, k_fmt, 60, 0.01, 1e-4, rng)
    add("document_classifier", "1.1.1-degraded", "degraded", classifier_graph(w, b), "trained with 45% of PCDA labels flipped to ARMY: low PCDA accuracy on purpose", lambda p: classifier_metrics(p, held, formats), *cio, formats)

    # table_detection
    tio = ([{"name": "page", "shape": [-1, pix], "dtype": "float32"}], [{"name": "table_cells", "shape": [-1, ncells], "dtype": "float32"}])
    w, b = train_logistic(tr["tx"][:200], tr["ty"][:200], 30, 0.01, 1e-3, rng)
    add("table_detection", "1.0.0", "baseline", table_graph(w, b), "per-cell logistic regression on 200 pages", lambda p: table_metrics(p, held), *tio, [])
    w, b = train_logistic(tr["tx"], tr["ty"], 40, 0.01, 1e-4, rng)
    add("table_detection", "1.1.0", "candidate", table_graph(w, b), f"per-cell logistic regression on {len(tr['tx'])} pages", lambda p: table_metrics(p, held), *tio, [])
    w_bad = w + rng.standard_normal(w.shape).astype(np.float32) * np.abs(w).mean() * 4
    add("table_detection", "1.1.1-degraded", "degraded", table_graph(w_bad, b), "candidate weights with heavy Gaussian noise", lambda p: table_metrics(p, held), *tio, [])

    # text_recognition: one classifier shared by every glyph cell
    gio = ([{"name": "glyphs", "shape": [-1, mc, cell], "dtype": "float32"}], [{"name": "char_probabilities", "shape": [-1, mc, k_chr], "dtype": "float32"}])
    cx, cy = tr["gx"].reshape(-1, cell), tr["gy"].reshape(-1)
    w, b = train_softmax(cx[:20000], cy[:20000], k_chr, 5, 0.01, 1e-4, rng)
    add("text_recognition", "1.0.0", "baseline", text_graph([(w, b)], mc, cell, k_chr), "linear glyph classifier on 20k cells", lambda p: text_metrics(p, held), *gio, charset)
    layers = train_mlp(cx, cy, k_chr, 96, 4, 0.005, rng)
    add("text_recognition", "1.1.0", "candidate", text_graph([(layers[0], layers[1]), (layers[2], layers[3])], mc, cell, k_chr), f"one hidden layer (96) on {len(cy)} cells", lambda p: text_metrics(p, held), *gio, charset)
    w_bad = w + rng.standard_normal(w.shape).astype(np.float32) * np.abs(w).mean() * 3
    add("text_recognition", "1.1.1-degraded", "degraded", text_graph([(w_bad, b)], mc, cell, k_chr), "baseline weights with heavy Gaussian noise", lambda p: text_metrics(p, held), *gio, charset)

    out = {
        "generator_seed_train": TRAIN_SEED,
        "generator_seed_heldout": HELDOUT_SEED,
        "train_documents": args.train_docs,
        "heldout_documents": args.heldout_docs,
        "onnxruntime": ort.__version__,
        "models": entries,
    }
    with open(os.path.join(args.out, "model_metadata.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
