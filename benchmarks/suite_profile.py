"""Where the test suite's time goes: per test, its wall time and the part of it that JAX
spent tracing, lowering and compiling (XLA) in the test's own process.

    python benchmarks/suite_profile.py [--json benchmarks/suite_profile.json] [--top 40]
                                       [-- PYTEST ARGS]

runs ``pytest -q -n 2 --dist loadfile`` (the README's test command; other arguments after
``--`` replace ``-n 2 --dist loadfile``) with this file as a pytest plugin, then prints a
markdown table of the totals, the files and the slowest tests, and writes the numbers as
JSON. The plugin (``-p suite_profile`` with ``benchmarks/`` on ``PYTHONPATH``) listens to
``jax.monitoring``'s duration events:

- ``compile``: ``/jax/core/compile/backend_compile_duration`` (XLA's HLO passes, its MLIR
  fusion emitters and LLVM), for programs that missed the persistent cache;
- ``trace`` and ``lower``: ``jaxpr_trace_duration`` and ``jaxpr_to_mlir_module_duration``;
- ``programs``: backend compilations, and ``small_programs`` those under 0.05 s (mostly
  eager ``jnp`` operations, each compiled once per shape);
- ``cache_hits``: programs taken from the session's persistent compilation cache.

A test's wall time covers its setup (module fixtures built for it) and teardown. Time
spent in subprocesses (command-line jobs, Dask workers, the kill/resume and thread-count
workers, the sanitizer runs) counts in ``wall`` only.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))  # benchmarks/, on the plugin's path
ROOT = os.path.dirname(HERE)
FOLDER_ENV = "TM_SUITE_PROFILE_DIR"  # where each pytest process writes its records

EVENTS = {
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
}
SMALL_S = 0.05  # a "small" program: under this many seconds of backend compile


class Recorder:
    """Running sums of ``jax.monitoring`` events since it was registered (the plugin takes
    each test's share as the difference across the test)."""

    def __init__(self):
        self.totals = collections.Counter()

    def on_duration(self, event, seconds, **_):
        name = EVENTS.get(event)
        if name is None:
            return
        self.totals[name] += seconds
        if name == "compile":
            self.totals["programs"] += 1
            self.totals["small_programs"] += seconds < SMALL_S

    def on_event(self, event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.totals["cache_hits"] += 1

    def register(self):
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self.on_duration)
        monitoring.register_event_listener(self.on_event)
        return self

    def unregister(self):
        from jax import monitoring

        monitoring.unregister_event_duration_listener(self.on_duration)
        monitoring.unregister_event_listener(self.on_event)


# --------------------------------------------------------------------------- the plugin

_RECORDER = None


def pytest_configure(config):
    global _RECORDER
    if os.environ.get(FOLDER_ENV):
        _RECORDER = Recorder().register()


def _record_path():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return os.path.join(os.environ[FOLDER_ENV], f"{worker}-{os.getpid()}.jsonl")


try:
    import pytest

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        if _RECORDER is None:
            yield
            return
        before, t0 = dict(_RECORDER.totals), time.perf_counter()
        yield
        row = {"test": item.nodeid, "wall": time.perf_counter() - t0}
        for key, value in _RECORDER.totals.items():
            row[key] = value - before.get(key, 0)
        with open(_record_path(), "a") as fh:
            fh.write(json.dumps(row) + "\n")

except ImportError:  # the script's own process needs no pytest to summarise
    pass


# --------------------------------------------------------------------------- summary

KEYS = ("wall", "compile", "trace", "lower", "programs", "small_programs", "cache_hits")


def summarise(rows):
    """{totals, files, tests} from the plugin's rows: sums over the whole run and per
    file (seconds, counts), and the rows themselves, slowest first."""
    totals = {k: float(sum(r.get(k, 0) for r in rows)) for k in KEYS}
    totals["tests"] = len(rows)
    files = collections.defaultdict(lambda: dict.fromkeys(KEYS, 0.0))
    for r in rows:
        f = files[r["test"].split("::")[0]]
        for k in KEYS:
            f[k] += r.get(k, 0)
    order = sorted(files, key=lambda name: -files[name]["wall"])
    tests = sorted(rows, key=lambda r: -r["wall"])
    return {"totals": totals, "files": {name: files[name] for name in order}, "tests": tests}


def _table(title, named_rows, top):
    lines = [f"### {title}", "", "| wall (s) | compile | trace | lower | programs | name |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in list(named_rows)[:top]:
        lines.append(
            f"| {r['wall']:.1f} | {r.get('compile', 0):.1f} | {r.get('trace', 0):.1f} | "
            f"{r.get('lower', 0):.1f} | {int(r.get('programs', 0))} | {name} |"
        )
    return "\n".join(lines)


def report(summary, top):
    t = summary["totals"]
    jax_s = t["compile"] + t["trace"] + t["lower"]
    head = (
        f"{t['tests']} tests, {t['wall']:.0f} s of test time over the processes; JAX in "
        f"them: {t['compile']:.0f} s compiling {int(t['programs'])} programs "
        f"({int(t['small_programs'])} under {SMALL_S} s), {t['trace']:.0f} s tracing, "
        f"{t['lower']:.0f} s lowering: {100 * jax_s / max(t['wall'], 1e-9):.0f}% of the "
        f"test time; {int(t['cache_hits'])} persistent-cache hits"
    )
    return "\n\n".join([
        head,
        _table("files", summary["files"].items(), top),
        _table("tests", ((r["test"], r) for r in summary["tests"]), top),
    ])  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=os.path.join(HERE, "suite_profile.json"))
    parser.add_argument("--top", type=int, default=40, help="rows of each table")
    parser.add_argument("pytest_args", nargs="*", help="after --: replaces -n 2 --dist loadfile")
    args = parser.parse_args(argv)
    extra = args.pytest_args or ["-n", "2", "--dist", "loadfile"]
    with tempfile.TemporaryDirectory(prefix="tm-suite-profile-") as folder:
        env = dict(os.environ, **{FOLDER_ENV: folder})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "suite_profile",
                               *extra], cwd=ROOT, env=env)  # fmt: skip
        elapsed = time.perf_counter() - t0
        rows = []
        for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
            with open(path) as fh:
                rows += [json.loads(line) for line in fh if line.strip()]
    if not rows:
        sys.exit(f"pytest ran no test (exit status {proc.returncode})")
    summary = summarise(rows)
    summary["run"] = {
        "elapsed_s": elapsed, "pytest_args": extra, "pytest_status": proc.returncode,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    print(f"pytest took {elapsed:.0f} s (exit status {proc.returncode})\n")
    print(report(summary, args.top))
    sys.path.insert(0, ROOT)
    from timemachine.files import atomic_json

    atomic_json(args.json, summary)  # never a half-written file
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
