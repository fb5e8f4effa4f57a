"""Smoke test of benchmarks/estimator_bench.py at a tiny size: it runs, and its JSON has
the machine info, the settings, the horizon and one row per estimator with the comparison
against the reference."""

import importlib.util
import json
import os

import pytest

# about 45 s on 2 shared cores, mostly XLA compiles (chains, pilot, replicas, estimators)
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench():
    path = os.path.join(HERE, "..", "benchmarks", "estimator_bench.py")
    spec = importlib.util.spec_from_file_location("estimator_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimator_bench_tiny_writes_every_field(tmp_path, capsys):
    out = tmp_path / "estimator_bench.json"
    _bench().main(
        [
            "--json", str(out), "--ref-steps", "2000", "--segment-steps", "2000",
            "--decorrelate", "1000", "--chunk", "1000", "--ref-blocks", "4",
            "--segment-blocks", "4", "--replicas", "8", "--pilot-replicas", "2",
            # 0.08 ps stays under the cap: the automatic horizon is 40 too, one program
            "--pilot-steps", "40", "--fixed-horizon", "40",
        ]
    )  # fmt: skip
    assert "| estimator |" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert {"machine", "settings", "horizon", "rows", "labels", "param_names"} <= set(data)
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["cpu_model"]
    assert data["settings"]["replicas"] == 8 and data["settings"]["ref_steps"] == 2000
    assert len(data["labels"]) == 6 and len(data["param_names"]) == 5
    horizon = data["horizon"]
    assert horizon["n_steps"] in horizon["pilot_steps"] and "growth_rate_per_ps" in horizon
    rows = {r["estimator"]: r for r in data["rows"]}
    assert set(rows) == {
        "reference (fluctuation)", "fluctuation", "hybrid (n auto)", "pathwise (n auto)",
        "hybrid (n fixed)", "pathwise (n fixed)",
    }  # fmt: skip
    for name, row in rows.items():
        for key in ("cpu_s", "wall_s", "median_stderr", "fom", "cpu_s_to_target_se"):
            assert row[key] > 0, (name, key)
    hybrid = rows["hybrid (n auto)"]
    cmp = hybrid["vs_reference"]
    assert {"max_abs_z", "threshold", "consistent", "mean_abs_difference", "z"} <= set(cmp)
    assert len(cmp["z"]) == 6 and len(cmp["z"][0]) == 5
    assert hybrid["cpu_s_replicas"] < hybrid["cpu_s"] and hybrid["fom_replicas"] > hybrid["fom"]
    assert rows["hybrid (n fixed)"]["horizon_steps"] == 40
    assert "vs_reference" not in rows["reference (fluctuation)"]
