"""A Quix Streams tumbling-window app: the benchmark's peer for the monitor stage (benches/throughput.rs).

On the results topic the infer stage wrote, it computes what the monitor's pipeline windows hold at
their core: per cohort and tumbling window of event time (the result's submitted_at), the number of
results, the number with an error, the number whose predicted format matches the golden label, and
the p95 of end_to_end_ms (from a log-bucket histogram kept in the window state, as the monitor keeps
an HDR histogram), published to an output topic when the window closes. Results are keyed by
document id, so the app regroups them by cohort first (Quix Streams' group_by, through a
repartition topic), as the monitor regroups by subject. State is Quix Streams' RocksDB store with
its changelog topics; exactly once, as the monitor is.

    python benches/peers/quix_window.py --brokers B --results T --output T2 --group G \
        --expect N --window-ms W [--grace-ms G] [--state-dir DIR]

Stops once N results went through the window, then prints one JSON line: results, results the
window refused as late, seconds from the first result to the last, results/s, CPU per result over
that span (user + system), peak RSS.

The grace period (default ten minutes, the spread of the harness's event times) keeps windows open
for every result of the input. Without it Quix Streams refused about two thirds of them as late:
the regrouping interleaves the source partitions unevenly and each window judges lateness by its
own partition's stream time, while the monitor holds its windows until the watermark over every
partition passes them. With a grace period both count the same results.
"""

import argparse
import json
import math
import os
import tempfile
import time

from quixstreams import Application
from quixstreams.models.serializers.avro import AvroDeserializer
from procstats import cpu_seconds, peak_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# histogram buckets: 2 % wide, from 0.1 ms
BUCKET_BASE = 1.02


def bucket(ms):
    return 0 if ms < 0.1 else int(math.log(ms / 0.1, BUCKET_BASE)) + 1


def bucket_value(b):
    return 0.0 if b == 0 else 0.1 * BUCKET_BASE ** b


def p95(hist, count):
    rank, seen = math.ceil(0.95 * count), 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen >= rank:
            return round(bucket_value(int(b)), 2)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--expect", type=int, required=True)
    ap.add_argument("--window-ms", type=int, required=True)
    ap.add_argument("--grace-ms", type=int, default=600_000)
    ap.add_argument("--state-dir", default=None)
    a = ap.parse_args()

    schema = json.load(open(os.path.join(ROOT, "schemas", "inference_result.avsc")))
    app = Application(
        broker_address=a.brokers,
        consumer_group=a.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        state_dir=a.state_dir or tempfile.mkdtemp(prefix="quix-state-"),
        loglevel="WARNING",
    )
    results = app.topic(a.results, value_deserializer=AvroDeserializer(schema),
                        timestamp_extractor=lambda value, headers, ts, ts_type: int(value["submitted_at"].timestamp() * 1000))
    output = app.topic(a.output, value_serializer="json")

    seen = {"n": 0, "first": None, "cpu_first": 0.0, "last": None, "late": 0}

    def first(value):
        if seen["first"] is None:
            seen["first"], seen["cpu_first"] = time.monotonic(), cpu_seconds()

    def count(value):
        seen["n"] += 1
        if seen["n"] >= a.expect:
            seen["last"] = time.monotonic()
            app.stop()

    def late(value, key, timestamp_ms, late_by_ms, start, end, name, topic, partition, offset):
        """Counts a result the window refused (and keeps Quix Streams from logging each one)."""
        seen["late"] += 1
        return False

    def initializer(r):
        return reducer({"count": 0, "errors": 0, "correct": 0, "golden": 0, "hist": {}}, r)

    def slim(r):
        """What the window needs of a result (the rest is not sent through the repartition topic)."""
        label = next((o["label"] for o in r["outputs"] if o["model"] == "document_classifier"), None)
        golden = r["true_format"] is not None
        return {"cohort": r["cohort"], "error": r["error_code"] is not None, "golden": golden,
                "correct": golden and label == r["true_format"], "e2e_ms": r["end_to_end_ms"]}

    def reducer(agg, r):
        agg["count"] += 1
        agg["errors"] += r["error"]
        agg["golden"] += r["golden"]
        agg["correct"] += r["correct"]
        b = str(bucket(r["e2e_ms"]))
        agg["hist"][b] = agg["hist"].get(b, 0) + 1
        return agg

    sdf = app.dataframe(results)
    sdf = sdf.update(first).apply(slim)
    sdf = sdf.group_by(lambda r: r["cohort"], name="cohort")
    # counted after the regrouping, where the window sees them
    sdf = sdf.update(count)
    sdf = sdf.tumbling_window(duration_ms=a.window_ms, grace_ms=a.grace_ms, on_late=late).reduce(reducer, initializer).final()
    sdf = sdf.apply(lambda w: {
        "start": w["start"], "end": w["end"], "count": w["value"]["count"], "errors": w["value"]["errors"],
        "accuracy": w["value"]["correct"] / w["value"]["golden"] if w["value"]["golden"] else None,
        "p95_end_to_end_ms": p95(w["value"]["hist"], w["value"]["count"]),
    })
    sdf.to_topic(output)
    app.run()

    seconds = (seen["last"] or time.monotonic()) - (seen["first"] or time.monotonic())
    cpu = cpu_seconds() - seen["cpu_first"]
    print(json.dumps({
        "results": seen["n"],
        "late": seen["late"],
        "grace_ms": a.grace_ms,
        "seconds": round(seconds, 2),
        "results_per_s": round(seen["n"] / seconds) if seconds > 0 else 0,
        "cpu_ms_per_result": round(cpu * 1000.0 / max(seen["n"], 1), 3),
        "peak_rss_mb": peak_rss_mb(),
        "quixstreams": __import__("quixstreams").__version__,
    }))


if __name__ == "__main__":
    main()
