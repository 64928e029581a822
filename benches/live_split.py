#!/usr/bin/env python3
"""Where a two-core machine's CPU goes at a fixed offered load, process by process.

The throughput harness (benches/throughput.rs) runs the infer stage, the load generator and the
latency reader in one process, so its `machine_busy_cores` cannot say who is busy. This runs them
as the separate programs an operator runs: `payslip-stream run --stage infer` and
`payslip-stream produce --rate R --pool 256`, against the broker of `scripts/kafka`. After a warm-up
it samples, over a window:

- CPU cores used by the stage, the broker, the load generator, and the whole machine (/proc);
- the stage's results/s, batches and transactions (its /metrics);
- the broker's requests/s by type (its RequestMetrics over JMX, read with Kafka's own JmxTool; the
  broker's management agent is started with `jcmd` when nothing answers on the JMX port).

Usage (release build, `scripts/kafka start`, `eval "$(scripts/env)"`):

    python3 benches/live_split.py --rate 1400            # stage and load generator
    python3 benches/live_split.py --rate 1400 --no-stage # the load generator alone

One JSON object on stdout. The topics it creates (prefix `split-<pid>-<ms>.`) are deleted at the end.
Figures and their reading: BENCHMARKS.md, "Who is busy at half load".
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_s(pid):
    """User plus system CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine():
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def broker_pid(port):
    """The `scripts/kafka` broker serving `port` (its command line names server-<port>.properties)."""
    out = subprocess.run(["pgrep", "-f", "kafka.Kafka"], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            with open(f"/proc/{pid}/cmdline") as f:
                if f"server-{port}.properties" in f.read():
                    return int(pid)
        except OSError:
            pass
    sys.exit(f"live_split: no scripts/kafka broker for port {port} (start it: KAFKA_PORT={port} scripts/kafka start)")


def answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def jmx_counts(classpath, port):
    """Requests served so far by type, and the time (ms) of the reading."""
    out = subprocess.run(
        ["java", "-cp", classpath, "org.apache.kafka.tools.JmxTool",
         "--jmx-url", f"service:jmx:rmi:///jndi/rmi://127.0.0.1:{port}/jmxrmi",
         "--object-name", "kafka.network:type=RequestMetrics,name=RequestsPerSec,request=*,version=*",
         "--attributes", "Count", "--one-time", "true", "--report-format", "properties"],
        capture_output=True, text=True, timeout=60).stdout
    counts, at, request = {}, None, None
    for item in out.replace("\n", ",").split(","):
        item = item.strip()
        if item.startswith("time="):
            at = int(item[5:])
        elif item.startswith("request="):
            request = item[8:]
        else:
            m = re.match(r"version=\d+:Count=(\d+)", item)
            if m and request:
                counts[request] = counts.get(request, 0) + int(m.group(1))
    if at is None:
        sys.exit("live_split: JmxTool read nothing from the broker (see --jmx-port)")
    return counts, at


def metric(api, name):
    """One unlabelled counter of the stage's /metrics."""
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1400, help="documents/s offered (default 1400)")
    ap.add_argument("--warm", type=float, default=6, help="seconds before the window (default 6)")
    ap.add_argument("--seconds", type=float, default=10, help="length of the window (default 10)")
    ap.add_argument("--brokers", default="127.0.0.1:19092")
    ap.add_argument("--config", default=os.path.join(ROOT, "pipelines/payslip.yaml"))
    ap.add_argument("--generator-config", help="the load generator's configuration (default: --config)")
    ap.add_argument("--binary", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "payslip-stream"))
    ap.add_argument("--jmx-port", type=int, default=19999)
    ap.add_argument("--no-jmx", action="store_true", help="leave the broker's request counts out")
    ap.add_argument("--no-stage", action="store_true", help="run the load generator alone")
    a = ap.parse_args()

    port = int(a.brokers.rsplit(":", 1)[1])
    bpid = broker_pid(port)
    classpath = None
    if not a.no_jmx:
        with open(os.path.join(ROOT, ".kafka", "classpath.txt")) as f:
            classpath = f.read().strip()
        if not answers(a.jmx_port):
            subprocess.run(["jcmd", str(bpid), "ManagementAgent.start", f"jmxremote.port={a.jmx_port}",
                            f"jmxremote.rmi.port={a.jmx_port}", "jmxremote.authenticate=false", "jmxremote.ssl=false",
                            "jmxremote.host=127.0.0.1"], check=True, capture_output=True)

    env = dict(os.environ, PAYSLIP_BROKERS=a.brokers)
    prefix = f"split-{os.getpid()}-{int(time.time() * 1000)}."
    subprocess.run([a.binary, "topics", "-c", a.config, "--topic-prefix", prefix], env=env, check=True, capture_output=True)
    procs = []

    def stop():
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        api = None
        if not a.no_stage:
            api = f"127.0.0.1:{free_port()}"
            stage = subprocess.Popen([a.binary, "run", "-c", a.config, "--stage", "infer", "--topic-prefix", prefix, "--api-listen", api],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(stage)
            deadline = time.time() + 120
            while True:
                if stage.poll() is not None:
                    sys.exit(f"live_split: the stage exited ({stage.returncode}); run it by hand to see why")
                try:
                    urllib.request.urlopen(f"http://{api}/readyz", timeout=1)
                    break
                except OSError:
                    if time.time() > deadline:
                        sys.exit("live_split: the stage was not ready within 120 s")
                    time.sleep(0.1)
        count = int(a.rate * (a.warm + a.seconds + 20))
        gen = subprocess.Popen([a.binary, "produce", "-c", a.generator_config or a.config, "--topic-prefix", prefix, "--rate", str(a.rate),
                                "--count", str(count), "--pool", "256"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.insert(0, gen)
        time.sleep(a.warm)

        def snap():
            s = {"t": time.time(), "broker": cpu_s(bpid), "gen": cpu_s(gen.pid), "machine": machine()}
            if api:
                s["stage"] = cpu_s(procs[-1].pid)
                for k in ("payslip_infer_results_produced_total", "payslip_infer_batches_total", "payslip_infer_transactions_committed_total"):
                    s[k] = metric(api, k)
            return s

        j0 = jmx_counts(classpath, a.jmx_port) if classpath else None
        s0 = snap()
        time.sleep(a.seconds)
        s1 = snap()
        j1 = jmx_counts(classpath, a.jmx_port) if classpath else None
        if gen.poll() is not None:
            sys.exit("live_split: the load generator ended inside the window; raise its count")
    finally:
        stop()
        if classpath:
            subprocess.run(["java", "-cp", classpath, "org.apache.kafka.tools.TopicCommand", "--bootstrap-server", a.brokers,
                            "--delete", "--topic", re.escape(prefix) + ".*"], capture_output=True)

    w = s1["t"] - s0["t"]
    cores = lambda k: round((s1[k] - s0[k]) / w, 2)
    busy = (s1["machine"][0] - s0["machine"][0]) / max(1, s1["machine"][1] - s0["machine"][1]) * os.cpu_count()
    out = {"offered_docs_per_s": a.rate, "window_s": round(w, 1), "cores": {"broker": cores("broker"), "load_generator": cores("gen"), "machine": round(busy, 2)}}
    if api:
        out["cores"]["stage"] = cores("stage")
        out["results_per_s"] = round((s1["payslip_infer_results_produced_total"] - s0["payslip_infer_results_produced_total"]) / w)
        out["batches_per_s"] = round((s1["payslip_infer_batches_total"] - s0["payslip_infer_batches_total"]) / w, 1)
        out["transactions_per_s"] = round((s1["payslip_infer_transactions_committed_total"] - s0["payslip_infer_transactions_committed_total"]) / w, 1)
    if j0 and j1:
        jw = (j1[1] - j0[1]) / 1000
        rates = {k: round((j1[0][k] - j0[0].get(k, 0)) / jw, 1) for k in j1[0] if j1[0][k] > j0[0].get(k, 0)}
        out["broker_requests_per_s"] = dict(sorted(rates.items(), key=lambda kv: -kv[1]))
        out["broker_requests_per_s_total"] = round(sum(rates.values()), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
