"""``benchmarks/suite_profile.py``: the suite's per-test wall, compile, trace and lowering
times from ``jax.monitoring``, as a pytest plugin and a script that summarises them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import suite_profile  # noqa: E402


def test_the_recorder_counts_a_compilation_and_nothing_after_it_is_unregistered():
    import jax

    rec = suite_profile.Recorder().register()
    try:
        n = 17 + int(np.random.default_rng().integers(1000))  # a shape compiled nowhere else
        jax.jit(lambda a: jax.numpy.sin(a) * 2.0 + a.sum())(np.ones((n, 3))).block_until_ready()
    finally:
        rec.unregister()
    got = dict(rec.totals)
    assert got["programs"] == 1 and got["compile"] > 0 and got["trace"] > 0, got
    assert got["lower"] > 0, got
    jax.jit(lambda a: a * 3.0)(np.ones(n + 1)).block_until_ready()
    assert dict(rec.totals) == got


def test_summarise_sums_per_file_and_orders_the_slowest_first():
    rows = [
        {"test": "tests/a.py::t1", "wall": 2.0, "compile": 1.5, "programs": 3},
        {"test": "tests/b.py::t1", "wall": 5.0, "compile": 0.5, "programs": 1, "cache_hits": 2},
        {"test": "tests/a.py::t2", "wall": 4.0, "trace": 0.25, "small_programs": 1},
    ]
    s = suite_profile.summarise(rows)
    assert list(s["files"]) == ["tests/a.py", "tests/b.py"]  # 6 s before 5 s
    assert s["files"]["tests/a.py"]["wall"] == 6.0 and s["files"]["tests/a.py"]["compile"] == 1.5
    assert [r["test"] for r in s["tests"]] == ["tests/b.py::t1", "tests/a.py::t2", "tests/a.py::t1"]
    assert s["totals"]["tests"] == 3 and s["totals"]["cache_hits"] == 2.0
    assert s["totals"]["trace"] == 0.25 and s["totals"]["programs"] == 4.0
    assert "3 tests, 11 s of test time" in suite_profile.report(s, top=5)


TINY = """
import jax, numpy as np
jax.config.update("jax_enable_x64", True)

def test_compiles_one_program():
    assert float(jax.jit(lambda a: (a * a).sum())(np.arange(SIZE.0))) > 0

def test_compiles_nothing():
    assert 1 + 1 == 2
"""


def test_the_script_profiles_a_pytest_run_and_writes_its_json(tmp_path):
    from conftest import fresh_compile_env

    size = 300 + int(np.random.default_rng().integers(1000))
    (tmp_path / "test_tiny.py").write_text(TINY.replace("SIZE", str(size)))
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "suite_profile.py"), "--json",
         str(out), "--", "-n", "0", "-p", "no:cacheprovider", str(tmp_path / "test_tiny.py")],
        capture_output=True, text=True, env=fresh_compile_env(os.environ), timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads(out.read_text())
    tests = {r["test"].split("::")[1]: r for r in s["tests"]}
    assert set(tests) == {"test_compiles_one_program", "test_compiles_nothing"}
    assert tests["test_compiles_one_program"]["programs"] >= 1
    assert tests["test_compiles_one_program"]["compile"] > 0
    assert tests["test_compiles_nothing"].get("programs", 0) == 0
    assert s["totals"]["tests"] == 2 and s["run"]["pytest_status"] == 0
    assert "### files" in proc.stdout and "test_tiny.py" in proc.stdout
    assert not [p.name for p in tmp_path.iterdir() if "tmp" in p.name]  # nothing staged left
