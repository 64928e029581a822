"""A plain Python infer worker: the benchmark's peer for the infer stage (benches/throughput.rs).

It does the stage's job the way a competent Python team would write it in an afternoon:
confluent-kafka for the clients, fastavro for the records, numpy for the preprocessing and
onnxruntime for the three models, in batches. Offsets are committed after the batch's results
are delivered (at least once, as most such workers are; the stage itself is exactly once, which
costs it a transaction per batch).

The preprocessing mirrors src/inference/preprocess.rs (hashed unigram+bigram classifier features,
nearest-neighbour page raster, line rasters cut into glyph cells) and the outputs mirror
src/inference/mod.rs (argmax label, table regions from 4-connected cells, greedy glyph decode),
so the work per document is the same; results are InferenceResult records in Avro with the
stage's headers.

    python benches/peers/python_worker.py --brokers B --documents T --results T2 --group G \
        --expect N [--batch 32]

Stops once N results are delivered and committed (or after --idle-s without a document), then
prints one JSON line: documents, seconds from the first document consumed to the last commit,
docs/s, CPU per document over that span (user + system of this process), peak RSS.
"""

import argparse
import functools
import io
import json
import math
import os
import re
import sys
import time

import fastavro
import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, Producer, TopicPartition
from procstats import cpu_seconds, peak_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLASSIFIER_DIM = 512
PAGE_W, PAGE_H = 48, 64
CELL = 8
GRID_W, GRID_H = PAGE_W // CELL, PAGE_H // CELL
GLYPH_W = GLYPH_H = 8
MAX_LINE_CHARS = 48
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1
TOKEN = re.compile(rb"[A-Za-z0-9]+")


def fnv1a_upper(h, data):
    for b in data.upper():
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


_token_hash = {}
_pair_hash = {}


def classifier_features(doc, out):
    """Hashed unigram and bigram counts of the document's lines, log1p, L2-normalised."""
    out[:] = 0.0
    prev = None
    for page in doc["pages"]:
        for line in page["lines"]:
            for m in TOKEN.finditer(line["text"].encode()):
                tok = m.group(0)
                norm = b"#" if tok.isdigit() else tok
                h = _token_hash.get(norm)
                if h is None:
                    h = _token_hash.setdefault(norm, fnv1a_upper(FNV_OFFSET, norm))
                out[h % CLASSIFIER_DIM] += 1.0
                if prev is not None:
                    key = (prev, norm)
                    ph = _pair_hash.get(key)
                    if ph is None:
                        ph = fnv1a_upper(fnv1a_upper(prev, b"_"), norm)
                        if len(_pair_hash) < 1_000_000:
                            _pair_hash[key] = ph
                    out[ph % CLASSIFIER_DIM] += 1.0
                prev = h
    np.log1p(out, out=out)
    n = float(np.sqrt(np.dot(out, out)))
    if n > 0:
        out /= n


def pixels(raster):
    """The raster as a [height, width] array of its stored type (uint8 or float32)."""
    w, h = raster["width"], raster["height"]
    dtype = np.uint8 if raster["encoding"] == "GRAY8" else np.dtype("<f4")
    return np.frombuffer(raster["pixels"], dtype=dtype, count=w * h).reshape(h, w)


@functools.lru_cache(maxsize=4096)
def grid(h, w, out_w, out_h, cols):
    """Flat source index of each sampled pixel: (y * h / out_h, x * w / out_w), clamped."""
    ys = np.minimum(np.arange(out_h) * h // out_h, h - 1)
    xs = np.minimum(np.arange(cols) * w // out_w, w - 1)
    return (ys[:, None] * w + xs[None, :]).reshape(-1)


def sample(raster, out_w, out_h, cols):
    """Nearest-neighbour samples in [0, 1], [out_h, cols]; only the sampled pixels are converted."""
    img = pixels(raster)
    taken = img.reshape(-1).take(grid(img.shape[0], img.shape[1], out_w, out_h, cols)).reshape(out_h, cols)
    return taken * np.float32(1.0 / 255.0) if img.dtype == np.uint8 else taken


def page_tensor(raster, out):
    out[:] = sample(raster, PAGE_W, PAGE_H, PAGE_W).reshape(-1)


def line_cells(raster, out):
    w, h = raster["width"], raster["height"]
    out_w = w if h == GLYPH_H else max(1, int(math.floor(w * GLYPH_H / h + 0.5)))
    cols = (min(out_w, MAX_LINE_CHARS * GLYPH_W) // GLYPH_W) * GLYPH_W
    out[cols * GLYPH_H:] = 0.0
    if cols:
        cells = sample(raster, out_w, GLYPH_H, cols).reshape(GLYPH_H, cols // GLYPH_W, GLYPH_W).transpose(1, 0, 2)
        out[: cols * GLYPH_H] = cells.reshape(-1)


def regions(probs, page, page_w, page_h, threshold=0.5):
    seen = [False] * (GRID_W * GRID_H)
    found = []
    for start in range(GRID_W * GRID_H):
        if seen[start] or probs[start] < threshold:
            continue
        x0, y0, x1, y1 = GRID_W, GRID_H, 0, 0
        total, n = 0.0, 0
        stack = [start]
        seen[start] = True
        while stack:
            i = stack.pop()
            x, y = i % GRID_W, i // GRID_W
            x0, y0, x1, y1 = min(x0, x), min(y0, y), max(x1, x), max(y1, y)
            total += float(probs[i])
            n += 1
            for j, ok in ((i - 1, x > 0), (i + 1, x + 1 < GRID_W), (i - GRID_W, y > 0), (i + GRID_W, y + 1 < GRID_H)):
                if ok and not seen[j] and probs[j] >= threshold:
                    seen[j] = True
                    stack.append(j)
        cw, ch = page_w / GRID_W, page_h / GRID_H
        found.append({"page": page, "x": x0 * cw, "y": y0 * ch, "w": (x1 - x0 + 1) * cw, "h": (y1 - y0 + 1) * ch, "score": total / n})
    return found


class Models:
    def __init__(self):
        meta = json.load(open(os.path.join(ROOT, "models", "model_metadata.json")))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.sessions, self.labels, self.versions = {}, {}, {}
        for m in meta["models"]:
            if m["role"] != "baseline":
                continue
            path = os.path.join(ROOT, "models", m["file"])
            self.sessions[m["name"]] = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.labels[m["name"]] = m["labels"]
            self.versions[m["name"]] = m["version"]
        self.glyphs = np.array([l[0] if l else " " for l in self.labels["text_recognition"]], dtype="<U1")

    def run(self, name, x):
        s = self.sessions[name]
        t = time.perf_counter()
        y = s.run(None, {s.get_inputs()[0].name: x})[0]
        return y, (time.perf_counter() - t) * 1000.0

    def infer(self, docs):
        n = len(docs)
        feats = np.empty((n, CLASSIFIER_DIM), np.float32)
        for d, row in zip(docs, feats):
            classifier_features(d, row)
        probs, cls_ms = self.run("document_classifier", feats)
        best = probs.argmax(axis=1)

        pages = [(i, p) for i, d in enumerate(docs) for p in d["pages"] if p.get("raster")]
        found = [[] for _ in docs]
        tab_ms = 0.0
        if pages:
            x = np.empty((len(pages), PAGE_W * PAGE_H), np.float32)
            for (_, p), row in zip(pages, x):
                page_tensor(p["raster"], row)
            cells, tab_ms = self.run("table_detection", x)
            for (i, p), row in zip(pages, cells):
                found[i].extend(regions(row, p["number"], p["width"], p["height"]))

        lines = [(i, l) for i, d in enumerate(docs) for p in d["pages"] for l in p["lines"] if l.get("raster")]
        texts = [[] for _ in docs]
        txt_ms = 0.0
        if lines:
            x = np.empty((len(lines), MAX_LINE_CHARS, GLYPH_H * GLYPH_W), np.float32)
            flat = x.reshape(len(lines), -1)
            for (_, l), row in zip(lines, flat):
                line_cells(l["raster"], row)
            out, txt_ms = self.run("text_recognition", x)
            # one string per line: the argmax glyphs viewed as a fixed-width string
            strings = np.ascontiguousarray(self.glyphs[out.argmax(axis=2)]).view(f"<U{MAX_LINE_CHARS}").reshape(-1)
            for (i, _), text in zip(lines, strings):
                texts[i].append(str(text).rstrip())

        labels = self.labels["document_classifier"]
        v = self.versions
        return [
            [
                self.output("document_classifier", cls_ms, n, label=labels[best[i]], confidence=float(probs[i, best[i]])),
                self.output("table_detection", tab_ms, n, regions=found[i]),
                self.output("text_recognition", txt_ms, n, lines=texts[i]),
            ]
            for i in range(n)
        ], sum((cls_ms, tab_ms, txt_ms))

    def output(self, name, ms, n, label=None, confidence=None, regions=(), lines=()):
        return {"model": name, "version": self.versions[name], "provider": "CPUExecutionProvider", "latency_ms": ms,
                "batch_size": n, "error_code": None, "label": label, "confidence": confidence,
                "regions": list(regions), "lines": list(lines), "load_ms": None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--documents", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--idle-s", type=float, default=30.0)
    a = ap.parse_args()

    schemas = os.path.join(ROOT, "schemas")
    doc_schema = fastavro.parse_schema(json.load(open(os.path.join(schemas, "payslip_document.avsc"))))
    res_schema = fastavro.parse_schema(json.load(open(os.path.join(schemas, "inference_result.avsc"))))
    models = Models()

    consumer = Consumer({"bootstrap.servers": a.brokers, "group.id": a.group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    producer = Producer({"bootstrap.servers": a.brokers, "acks": "all", "linger.ms": 5, "enable.idempotence": True})
    consumer.subscribe([a.documents])

    done, first, last_seen, cpu_at_first = 0, None, time.monotonic(), 0.0
    failures = []
    while done < a.expect and time.monotonic() - last_seen < a.idle_s:
        msgs = [m for m in consumer.consume(a.batch, 0.1) if m.error() is None]
        if not msgs:
            continue
        if first is None:
            first = time.monotonic()
            cpu_at_first = cpu_seconds()
        last_seen = time.monotonic()
        docs = [fastavro.schemaless_reader(io.BytesIO(m.value()), doc_schema) for m in msgs]
        outputs, inference_ms = models.infer(docs)
        now = int(time.time() * 1000)
        for m, d, outs in zip(msgs, docs, outputs):
            result = {
                "result_id": d["document_id"] + "/inference", "document_id": d["document_id"], "user_id": d["user_id"],
                "tenant": d["tenant"], "cohort": "baseline", "submitted_at": d["submitted_at"], "processed_at": now,
                "provider": "CPUExecutionProvider", "model_versions": dict(models.versions), "outputs": outs,
                "inference_ms": inference_ms, "end_to_end_ms": float(max(0, now - m.timestamp()[1])), "error_code": None,
                "true_format": (d.get("labels") or {}).get("format"), "source": f"{m.topic()}/{m.partition()}/{m.offset()}",
                "process_rss_bytes": None, "process_cpu_percent": None,
            }
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, res_schema, result)
            producer.produce(a.results, key=d["document_id"].encode(), value=buf.getvalue(),
                             headers=[("content-type", b"application/avro"), ("result-id", result["result_id"].encode())],
                             on_delivery=lambda err, _m: err and failures.append(str(err)))
            producer.poll(0)
        # offsets only after every result of the batch is delivered
        producer.flush()
        if failures:
            sys.exit(f"python worker: delivery failed: {failures[0]}")
        next_offsets = {}
        for m in msgs:
            next_offsets[(m.topic(), m.partition())] = max(next_offsets.get((m.topic(), m.partition()), 0), m.offset() + 1)
        consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in next_offsets.items()], asynchronous=False)
        done += len(msgs)

    seconds = time.monotonic() - (first or time.monotonic())
    cpu = cpu_seconds() - (cpu_at_first if first is not None else cpu_seconds())
    consumer.close()
    print(json.dumps({
        "documents": done,
        "seconds": round(seconds, 2),
        "docs_per_s": round(done / seconds) if seconds > 0 else 0,
        "cpu_ms_per_doc": round(cpu * 1000.0 / max(done, 1), 3),
        "peak_rss_mb": peak_rss_mb(),
        "versions": {"onnxruntime": ort.__version__, "confluent_kafka": __import__("confluent_kafka").version()[0],
                     "fastavro": fastavro.__version__, "numpy": np.__version__},
    }))


if __name__ == "__main__":
    main()
