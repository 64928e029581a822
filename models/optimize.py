#!/usr/bin/env python3
"""Quantizes one model version with ONNX Runtime's quantization tooling, measures it against its
source on held-out documents, and adds it to model_metadata.json as a candidate.

`payslip-stream models optimize` runs this (the runbook's POST /models/optimize). Steps:
  1. int8: `onnxruntime.quantization.quantize_dynamic` (weights int8, activations quantized at run
     time: MatMul/Gemm become MatMulInteger), written next to the source as <model>/<new>.onnx;
  2. held-out documents from the metadata's held-out seed, through `payslip-stream dataset dump`
     (the Rust preprocessing the infer stage runs), evaluated with train.py's metrics on the
     source and on the quantized file;
  3. size in bytes and the median ONNX Runtime run time of one batch (32 documents, or 512 text
     lines), single-threaded, for both;
  4. the new entry (role candidate, sha256, held-out metrics, and an "optimization" record with
     the source's figures) is appended to model_metadata.json, written atomically. An existing
     version is never overwritten.
Prints the new entry as JSON on stdout.

Usage: python3 models/optimize.py --metadata models/model_metadata.json --model M --version V
       [--method int8] [--as NEW_VERSION] [--bin payslip-stream] [--heldout-docs 600]
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  (dump and the held-out metrics, shared with training)


def batch_ms(path, x, rows, repeats=15):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    batch = x[:rows]
    s.run(None, {name: batch})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, {name: batch})
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadata", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--method", default="int8", choices=["int8"])
    ap.add_argument("--as", dest="new_version", default=None)
    ap.add_argument("--bin", default=None, help="payslip-stream binary (default: cargo run)")
    ap.add_argument("--heldout-docs", type=int, default=600)
    ap.add_argument("--operator", default=os.environ.get("USER", "unknown"))
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with open(args.metadata) as f:
        meta = json.load(f)
    base = os.path.dirname(os.path.abspath(args.metadata))
    src = next((m for m in meta["models"] if m["name"] == args.model and m["version"] == args.version), None)
    if src is None:
        sys.exit(f"optimize: {args.model} {args.version} is not in {args.metadata}")
    new_version = args.new_version or f"{args.version}-{args.method}"
    if any(m["name"] == args.model and m["version"] == new_version for m in meta["models"]):
        sys.exit(f"optimize: {args.model} {new_version} already exists in {args.metadata}; choose another with --as")
    src_path = os.path.join(base, src["file"])
    with open(src_path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != src["sha256"].lower():
            sys.exit(f"optimize: {src_path} does not match its sha256 in {args.metadata}; refusing to optimize a tampered file")
    rel = f"{args.model}/{new_version}.onnx"
    dst_path = os.path.join(base, rel)
    if os.path.exists(dst_path):
        sys.exit(f"optimize: {dst_path} exists; choose another version with --as")

    tmp_model = dst_path + ".tmp"
    quantize_dynamic(src_path, tmp_model, weight_type=QuantType.QInt8)

    binary = [args.bin] if args.bin else ["cargo", "run", "-q", "--bin", "payslip-stream", "--"]
    with tempfile.TemporaryDirectory() as tmp:
        dmeta, held = train.dump(binary, os.path.join(tmp, "heldout"), meta["generator_seed_heldout"], args.heldout_docs, 2)
    if args.model == "document_classifier":
        metrics = lambda p: train.classifier_metrics(p, held, dmeta["formats"])  # noqa: E731
        x, rows = held["cx"], 32
    elif args.model == "table_detection":
        metrics = lambda p: train.table_metrics(p, held)  # noqa: E731
        x, rows = held["tx"], 32
    elif args.model == "text_recognition":
        metrics = lambda p: train.text_metrics(p, held)  # noqa: E731
        x, rows = held["gx"], 512
    else:
        os.remove(tmp_model)
        sys.exit(f"optimize: no held-out evaluation for {args.model}")
    source_metrics, new_metrics = metrics(src_path), metrics(tmp_model)
    source_ms, new_ms = batch_ms(src_path, x, rows), batch_ms(tmp_model, x, rows)
    os.replace(tmp_model, dst_path)
    with open(dst_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    entry = dict(src)
    entry.update({
        "version": new_version,
        "role": "candidate",
        "file": rel,
        "sha256": sha,
        "heldout": new_metrics,
        "description": f"{args.method} dynamic quantization of {args.version} (ONNX Runtime {ort.__version__})",
        "optimization": {
            "method": args.method,
            "source_version": args.version,
            "size_bytes": os.path.getsize(dst_path),
            "source_size_bytes": os.path.getsize(src_path),
            "batch_rows": rows,
            "batch_ms_p50": round(new_ms, 4),
            "source_batch_ms_p50": round(source_ms, 4),
            "source_heldout": source_metrics,
            "heldout_documents": args.heldout_docs,
            "by": args.operator,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    })
    meta["models"].append(entry)
    tmp_meta = args.metadata + ".tmp"
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_meta, args.metadata)
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
