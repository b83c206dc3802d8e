"""What the gateway (SNG) adds in front of a server, against nginx doing the same hop.

The same load goes, in the same run, to

* ``direct``  — the fast stub server (bench/stub_server.py), nothing in front;
* ``gateway`` — ``ivp gateway`` powering its own stub (booted by uploading the tiny
  model through it), durable log-before-release on (``--sync FULL``: every pair is in
  the fsynced SQLite WAL before its response leaves), ε = 0.2, sampling draws and
  audit records as in production (no recomputer attached: audit records stay in the
  durable spool);
* ``nginx``   — nginx (Debian package, installed with apt when missing) as a plain
  keep-alive reverse proxy to the direct stub, one worker, access log off.

The load is wrk (Debian package) POSTing one OpenAI completion body, in two phases per
target: ``c=1`` (one connection, closed loop: latency) and ``c=C`` connections
(throughput). Each phase is bounded by time and by request count. Targets are
interleaved over several rounds and the median per figure is reported, because this
machine is shared. Added latency = target − direct. Goals (issue 3): gateway throughput
≥ 50% of nginx's, added p50 ≤ 3 ms. The CPU time each process spends per request is read
from /proc around every phase.

Diagnostics that do not count toward the goals: ``gateway_sync_normal`` (``--sync
NORMAL``, not durable against power loss: what the fsync costs; skip with
``--no-sync-normal``); with ``--baseline-src DIR``, ``gateway_baseline``: the gateway
of another checkout (its ``src`` directory, e.g. from ``git archive REV src``); with
``--python-floor``, ``python_floor``: bench/passthrough_proxy.py, the gateway's HTTP
server and upstream client forwarding and doing nothing else (the floor of a Python
datapath).

    .venv/bin/python bench/gateway_overhead.py [--quick] [--rounds 3] [--seconds 4]
        [--baseline-src DIR]

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH,
    PY,
    Proc,
    cpu_seconds,
    durable_commit_ms,
    emit,
    ensure_apt,
    free_port,
    gateway_args,
    http_json,
    machine,
    median,
    note,
    processes,
    spawn,
    tiny_whitelisted,
    wait_http,
    work_dir,
)

MODEL_ID = "tiny"
BODY = {"model": MODEL_ID, "prompt": "The gateway logs every request it serves",
        "max_tokens": 16, "temperature": 0.7}
GOAL_THROUGHPUT = 0.5  # of nginx's
GOAL_ADDED_P50_MS = 3.0

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
local limit = %(limit)d
local seen = 0
response = function(status, headers, body)
  seen = seen + 1
  if seen >= limit then wrk.thread:stop() end
end
done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests":%%d,"duration_us":%%d,"status_errors":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"mean_us":%%.1f,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""

NGINX_CONF = """
%(user)s
worker_processes 1;
daemon off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %(dir)s/body;
  proxy_temp_path %(dir)s/proxy;
  fastcgi_temp_path %(dir)s/fastcgi;
  uwsgi_temp_path %(dir)s/uwsgi;
  scgi_temp_path %(dir)s/scgi;
  upstream stub { server 127.0.0.1:%(upstream)d; keepalive 128; }
  server {
    listen 127.0.0.1:%(port)d;
    location / {
      proxy_pass http://stub;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
"""


# --- the load ---------------------------------------------------------------------------------
def wrk(wrk_bin: str, url: str, script: Path, connections: int, seconds: float
        ) -> dict[str, Any]:
    """One wrk phase; its done() prints one JSON line with the figures."""
    out = subprocess.run(
        [wrk_bin, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
         "-s", str(script), url], capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in reversed(out.stdout.splitlines()) if ln.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no result: {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    return r


def write_script(path: Path, limit: int) -> Path:
    path.write_text(WRK_SCRIPT % {"body": json.dumps(BODY), "limit": limit})
    return path


# --- the three targets ------------------------------------------------------------------------
def start_stub(procs: list[Proc], logs: Path) -> str:
    port = free_port()
    p = spawn("stub-direct", [PY, str(BENCH / "stub_server.py"), "--port", str(port),
                              "--ready"], logs)
    procs.append(p)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=p.popen)
    return url


def start_nginx(procs: list[Proc], work: Path, upstream: str) -> str:
    binary = ensure_apt("nginx", "nginx-light")
    ndir = work / "nginx"
    ndir.mkdir()
    port = free_port()
    conf = ndir / "nginx.conf"
    conf.write_text(NGINX_CONF % {
        "dir": ndir, "port": port, "upstream": int(upstream.rsplit(":", 1)[1]),
        "user": "user root;" if os.geteuid() == 0 else ""})
    p = spawn("nginx", [binary, "-c", str(conf), "-p", str(ndir)], work)
    procs.append(p)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=p.popen)
    return url


def start_passthrough(procs: list[Proc], work: Path, upstream: str) -> str:
    """bench/passthrough_proxy.py: the gateway's HTTP stack forwarding, nothing else."""
    port = free_port()
    p = spawn("passthrough", [PY, str(BENCH / "passthrough_proxy.py"), "--port", str(port),
                              "--upstream", upstream], work)
    procs.append(p)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health", proc=p.popen)
    return url


def start_gateway(procs: list[Proc], work: Path, sync: str, name: str,
                  src: str | None = None) -> str:
    """``ivp gateway`` (from ``src``, another checkout's src/ directory, when given)."""
    trust = tiny_whitelisted(work / f"{name}-trust", MODEL_ID, src)
    port = free_port()
    env = {"PYTHONPATH": src} if src else None
    p = spawn(name, gateway_args(name, work / f"{name}-state", port, trust, sync), work, env)
    procs.append(p)
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/status", timeout=120, proc=p.popen)
    answer = upload(url, trust["model"])
    if answer.get("state") != "serving":
        raise RuntimeError(f"upload through {name} failed: {answer}\n{p.tail()}")
    status, body = http_json(url + "/v1/completions", json.dumps(BODY).encode())
    if status != 200:
        raise RuntimeError(f"{name} does not serve: {status} {body}")
    return url


def upload(url: str, model: Path) -> dict[str, Any]:
    import asyncio

    from ivp.gateway.upload import upload_model

    return asyncio.run(upload_model(url, model, MODEL_ID))


def gateway_metrics(url: str) -> dict[str, float]:
    """Means of the gateway's own histograms (commit time, pairs per group commit, time
    the gateway spends per request besides the server's)."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()

    def value(name: str) -> float:
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    out = {}
    for key, metric, scale in (("commit_ms", "ivp_gateway_commit_seconds", 1e3),
                               ("pairs_per_commit", "ivp_gateway_commit_batch_pairs", 1.0),
                               ("overhead_ms", "ivp_gateway_overhead_seconds", 1e3),
                               ("server_ms", "ivp_gateway_server_seconds", 1e3)):
        count = value(metric + "_count")
        out[f"mean_{key}"] = round(value(metric + "_sum") / count * scale, 3) if count else 0.0
    out["commits"] = value("ivp_gateway_commit_seconds_count")
    return out


# --- run ----------------------------------------------------------------------------------------
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("rps", "p50_us", "p90_us", "p99_us", "mean_us", "proxy_cpu_us", "stub_cpu_us")
    out: dict[str, Any] = {k: round(median([r[k] for r in runs]), 1) for k in keys}
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["status_errors"] + r["socket_errors"] for r in runs)
    return out


@dataclass
class Target:
    """A URL under load, and whose CPU time to charge: the proxy's and the stub's."""

    url: str
    proxy: int | None  # pid of the proxy (None: the stub itself is the target)
    stub: int | None  # pid of the stub behind it (None: the proxy's only child)
    proxy_children: bool = False  # nginx: the master's workers do the work

    def cpu(self) -> tuple[float, float]:
        """(proxy, stub) CPU seconds so far."""
        if self.proxy is None:
            return 0.0, cpu_seconds(self.stub or 0)
        if self.stub is None:  # the gateway: the stub is its child (its power switch)
            own = cpu_seconds(self.proxy)
            return own, cpu_seconds(self.proxy, children=True) - own
        return cpu_seconds(self.proxy, children=self.proxy_children), cpu_seconds(self.stub)


def phase(wrk_bin: str, target: Target, script: Path, connections: int, seconds: float
          ) -> dict[str, Any]:
    """One wrk phase, with the CPU each process spent per request."""
    before = target.cpu()
    r = wrk(wrk_bin, target.url + "/v1/completions", script, connections, seconds)
    after = target.cpu()
    n = max(1, r["requests"])
    r["proxy_cpu_us"] = (after[0] - before[0]) / n * 1e6
    r["stub_cpu_us"] = (after[1] - before[1]) / n * 1e6
    return r


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk_bin = ensure_apt("wrk", "wrk")
    work = work_dir("gateway")
    note(f"work dir {work}")
    result: dict[str, Any] = {"bench": "gateway_overhead", "quick": args.quick,
                              "machine_before": machine(), "body": BODY,
                              "connections": args.connections, "rounds": args.rounds,
                              "seconds_per_phase": args.seconds,
                              "durable_commit_floor": durable_commit_ms(work)}
    script1 = write_script(work / "c1.lua", args.max_requests)
    scriptn = write_script(work / "cn.lua", args.max_requests)
    with processes() as procs:
        direct = start_stub(procs, work)
        stub_pid = procs[-1].popen.pid
        targets = {"direct": Target(direct, None, stub_pid)}
        targets["gateway"] = Target(start_gateway(procs, work, "FULL", "gateway"),
                                    procs[-1].popen.pid, None)
        targets["nginx"] = Target(start_nginx(procs, work, direct), procs[-1].popen.pid,
                                  stub_pid, proxy_children=True)
        if args.baseline_src:
            targets["gateway_baseline"] = Target(
                start_gateway(procs, work, "FULL", "gateway-baseline", args.baseline_src),
                procs[-1].popen.pid, None)
        if args.python_floor:
            targets["python_floor"] = Target(start_passthrough(procs, work, direct),
                                             procs[-1].popen.pid, stub_pid)
        if args.sync_normal:
            targets["gateway_sync_normal"] = Target(
                start_gateway(procs, work, "NORMAL", "gateway-normal"), procs[-1].popen.pid,
                None)
        for t in targets.values() if not args.quick else ():  # warm-up: first-call paths
            wrk(wrk_bin, t.url + "/v1/completions", scriptn, args.connections, 1)
        lat: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
        tput: dict[str, list[dict[str, Any]]] = {k: [] for k in targets}
        for r in range(args.rounds):
            for name, t in targets.items():
                note(f"round {r + 1}/{args.rounds}: {name}")
                lat[name].append(phase(wrk_bin, t, script1, 1, args.seconds))
                tput[name].append(phase(wrk_bin, t, scriptn, args.connections, args.seconds))
        for name in targets:
            result[name] = {"c1": summarise(lat[name]),
                            f"c{args.connections}": summarise(tput[name])}
        for name in [n for n in targets if n.startswith("gateway")]:
            _, status = http_json(targets[name].url + "/status")
            result[name]["sync"] = "NORMAL" if name.endswith("sync_normal") else "FULL"
            result[name]["status"] = {k: status.get(k) for k in (
                "state", "pairs_served", "audits", "spool_depth", "epsilon")}
            result[name]["metrics"] = gateway_metrics(targets[name].url)
    result["machine_after"] = machine()
    result.update(ratios(result, args.connections))
    return result


def ratios(result: dict[str, Any], connections: int) -> dict[str, Any]:
    cn = f"c{connections}"
    d, g, n = result["direct"], result["gateway"], result["nginx"]
    out: dict[str, Any] = {
        "gateway_added_p50_ms": round((g["c1"]["p50_us"] - d["c1"]["p50_us"]) / 1e3, 3),
        "gateway_added_p99_ms": round((g["c1"]["p99_us"] - d["c1"]["p99_us"]) / 1e3, 3),
        "nginx_added_p50_ms": round((n["c1"]["p50_us"] - d["c1"]["p50_us"]) / 1e3, 3),
        "nginx_added_p99_ms": round((n["c1"]["p99_us"] - d["c1"]["p99_us"]) / 1e3, 3),
        "gateway_vs_nginx_throughput": round(g[cn]["rps"] / n[cn]["rps"], 4)
        if n[cn]["rps"] else None,
        "nginx_vs_direct_throughput": round(n[cn]["rps"] / d[cn]["rps"], 4)
        if d[cn]["rps"] else None,
    }
    out["goal_throughput_met"] = bool(out["gateway_vs_nginx_throughput"] is not None
                                      and out["gateway_vs_nginx_throughput"] >= GOAL_THROUGHPUT)
    out["goal_added_p50_met"] = out["gateway_added_p50_ms"] <= GOAL_ADDED_P50_MS
    if "gateway_sync_normal" in result:
        s = result["gateway_sync_normal"]
        out["sync_normal_added_p50_ms"] = round((s["c1"]["p50_us"] - d["c1"]["p50_us"]) / 1e3,
                                                3)
        out["sync_normal_vs_nginx_throughput"] = round(s[cn]["rps"] / n[cn]["rps"], 4) \
            if n[cn]["rps"] else None
    if "gateway_baseline" in result:
        b = result["gateway_baseline"]
        out["baseline_added_p50_ms"] = round((b["c1"]["p50_us"] - d["c1"]["p50_us"]) / 1e3, 3)
        out["gateway_vs_baseline_throughput"] = round(g[cn]["rps"] / b[cn]["rps"], 2) \
            if b[cn]["rps"] else None
    if "python_floor" in result:
        f = result["python_floor"]
        out["python_floor_vs_nginx_throughput"] = round(f[cn]["rps"] / n[cn]["rps"], 4) \
            if n[cn]["rps"] else None
        out["python_floor_added_p50_ms"] = round((f["c1"]["p50_us"] - d["c1"]["p50_us"]) / 1e3,
                                                 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (smoke test)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per phase and target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="request bound per phase")
    parser.add_argument("--baseline-src", default=None,
                        help="also run the gateway of another checkout (its src/ directory, "
                             "e.g. from `git archive REV src`) as target gateway_baseline")
    parser.add_argument("--python-floor", action="store_true",
                        help="also bench/passthrough_proxy.py (diagnostic): the gateway's "
                             "HTTP server and upstream client forwarding, no gateway work")
    parser.add_argument("--no-sync-normal", dest="sync_normal", action="store_false",
                        help="skip the diagnostic gateway run with --sync NORMAL (that run "
                             "does not count: it is not durable against power loss)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.max_requests, args.sync_normal = 1, 1.0, 500, False
    emit(run(args))


if __name__ == "__main__":
    main()
