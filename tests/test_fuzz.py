"""Property-based tests (issue 18, part 3): random input to the configuration loader, the
target-file reader and the public entry points raises nothing but the project's own errors.

Each property calls with a random input and accepts either a result or a
``TimemachineError``; any other exception (a raw ValueError, KeyError or TypeError from
numpy, OpenMM, mdtraj or JAX, a traceback the user cannot act on) fails the test, and
hypothesis shrinks it to the smallest input that shows it.

The examples are few and derandomized (the same inputs on every run, so CI is
reproducible), the deadline is off (the first call compiles with JAX) and runs are 1-5
steps of trialanine in vacuum, so the file takes well under two minutes on two cores.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import timemachine as tm  # noqa: E402
from timemachine.config import COMMANDS, SCHEMA, load_config  # noqa: E402
from timemachine.fitting.observables.specs import TARGET_KEYS  # noqa: E402
from timemachine.fitting.targets import load_targets, make_target  # noqa: E402

# a silent cast (complex to real) is a wrong answer, not an error: fail on it
pytestmark = pytest.mark.filterwarnings("error::numpy.exceptions.ComplexWarning")

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def few(n):
    return settings(FUZZ, max_examples=n)


def mostly(valid, odd):
    """``valid`` four times in five, else ``odd``: most examples then carry one or two
    bad arguments among good ones, which is how a user's mistakes arrive."""
    return st.integers(0, 4).flatmap(lambda k: odd if k == 0 else valid)


def _ours(call, *args, **kwargs):
    """Call; a TimemachineError is a fine answer to bad input, anything else fails."""
    name = getattr(call, "__name__", "call")
    try:
        out = call(*args, **kwargs)
    except tm.TimemachineError as e:  # --hypothesis-show-statistics counts these
        event(f"{name}: {type(e).__name__}")
        return None
    event(f"{name}: accepted")
    return out


@pytest.fixture(scope="module")
def ala3():
    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x))
    return top, system, x


def _scratch(suffix, data):
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


# ----------------------------------------------------------------- values, as TOML and JSON

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
    st.sampled_from(["AAA", "amber99sbildn.xml", "obc2", "none", "exact", "all", "name CA"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)  # beyond 64 bits is a TOML error: the loader must say so
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return '""'  # None: TOML has no null


toml_values = st.recursive(
    scalars.filter(lambda v: v is not None),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=6,
)
sections = st.sampled_from(sorted(SCHEMA) + ["integrater", "targets.entry"])


@st.composite
def config_dicts(draw):
    """{section: {key: value}}: the schema's own names mostly, a few misspelt ones."""
    out = {}
    for section in draw(st.lists(sections, max_size=5, unique=True)):
        known = sorted(SCHEMA.get(section, {})) or ["x"]
        keys = draw(st.lists(st.sampled_from(known) | text, max_size=4, unique=True))
        out[section] = {k: draw(toml_values) for k in keys}
    return out


def _toml(config):
    lines = []
    for section, keys in config.items():
        table = "[[targets.entry]]" if section == "targets.entry" else f"[{json.dumps(section)}]"
        lines.append(table)
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


@FUZZ
@given(st.text(max_size=200), st.sampled_from(sorted(COMMANDS)))
def test_fuzz_config_text(body, command):
    path = _scratch(".toml", body)
    try:
        _ours(load_config, path, command)
    finally:
        os.remove(path)


@few(150)
@given(config_dicts(), st.sampled_from(sorted(COMMANDS)))
def test_fuzz_config_sections_keys_and_values(config, command):
    path = _scratch(".toml", _toml(config))
    try:
        _ours(load_config, path, command)
    finally:
        os.remove(path)


# ------------------------------------------------------------------------- target files

TYPES = ["Rg", "NOE", "dihedral", "J3_HN_HA", "J3_HN_C", "J1_N_CA", "J2_N_CA", "Foo"]
spec_keys = sorted(TARGET_KEYS | {"type", "atoms", "model", "residues", "pairs", "indices",
                                  "power", "mass_weighted"})  # fmt: skip


@st.composite
def target_entries(draw):
    entry = {k: draw(json_values) for k in draw(st.lists(st.sampled_from(spec_keys), max_size=5))}
    if draw(st.booleans()):
        entry["type"] = draw(st.sampled_from(TYPES))
    if draw(st.booleans()):
        entry["value"] = draw(st.floats() | st.lists(st.floats(-10, 10), max_size=4))
        entry["uncertainty"] = draw(st.floats() | st.lists(st.floats(-1, 1), max_size=4))
    return entry


target_files = st.one_of(
    json_values,
    st.lists(target_entries(), max_size=3),
    st.builds(lambda e: {"targets": e}, st.lists(target_entries(), max_size=3)),
)


@few(150)
@given(content=target_files, with_topology=st.booleans())
def test_fuzz_target_files(content, with_topology, ala3):
    path = _scratch(".json", json.dumps(content))
    try:
        _ours(load_targets, path, ala3[0] if with_topology else None)
    finally:
        os.remove(path)


@FUZZ
@given(st.binary(max_size=60))
def test_fuzz_target_file_bytes(data):
    path = _scratch(".json", data)
    try:
        _ours(load_targets, path)
    finally:
        os.remove(path)


# ---------------------------------------------------------------- the public entry points

N = 33  # atoms of trialanine
odd_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, -1, 1e300, -1e-300, True, None, "1", "abc", 1 + 1j]),
)
dtypes = st.sampled_from([np.float64, np.float32, np.int64, np.complex128, np.bool_, object])
shapes = st.sampled_from([(N, 3), (N, 3), (N, 2), (N - 1, 3), (3,), (0, 3), (N, 3, 1), ()])


@st.composite
def positions(draw, x):
    """Trialanine's positions perturbed, or an array of a random shape and dtype."""
    kind = draw(mostly(st.just("perturbed"), st.sampled_from(["random", "scalar"])))
    if kind == "scalar":
        return draw(odd_numbers)
    if kind == "random":
        dtype, shape = draw(dtypes), draw(shapes)
        if dtype is object:
            return np.array([draw(odd_numbers) for _ in range(int(np.prod(shape)))],
                            dtype=object).reshape(shape)  # fmt: skip
        elements = st.floats(-1e3, 1e3) if dtype is not np.bool_ else st.booleans()
        if dtype is np.int64:
            elements = st.integers(-5, 5)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    y = np.array(x)
    for _ in range(draw(mostly(st.just(0), st.integers(1, 3)))):
        i, c = draw(st.integers(0, N - 1)), draw(st.integers(0, 2))
        y[i, c] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e8, y[i, c] + 0.01, 0.0]))
    return y


@st.composite
def parameters(draw, theta):
    kind = draw(mostly(st.sampled_from(["none", "scaled"]), st.just("random")))
    if kind == "none":
        return None
    if kind == "random":
        return draw(st.one_of(odd_numbers, st.lists(odd_numbers, max_size=4),
                              hnp.arrays(np.float64, draw(st.integers(0, 200)))))  # fmt: skip
    p = np.array(theta)
    for _ in range(draw(mostly(st.just(0), st.integers(1, 2)))):
        i = draw(st.integers(0, p.size - 1))
        p[i] = draw(st.sampled_from([np.nan, -p[i], 0.0, 10 * p[i], 1e30, -1e-3]))
    return p


odd_wrts = st.sampled_from(["nosuch", [], [-1], [0.5], None, 3, [0, 0], ["bond*", 2], b"bond"])
wrts = mostly(st.sampled_from(["bond/*/k", [0, 1]]), odd_wrts)
steps = mostly(st.integers(1, 5), st.sampled_from([0, -1, 2.5, "3", None, True, 10**40]))


@st.composite
def integrators(draw):
    if draw(mostly(st.just(True), st.just(False))):
        return tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    kwargs = {
        name: draw(mostly(st.just(default), odd_numbers))
        for name, default in (
            ("temperature", 300.0),
            ("friction", 1.0),
            ("dt", 0.001),
            ("seed", 0),
        )  # fmt: skip
    }
    return _ours(tm.LangevinIntegrator, **kwargs) or draw(st.sampled_from([None, "langevin"]))


@few(80)
@given(data=st.data())
def test_fuzz_simulate(data, ala3, tmp_path_factory):
    _, system, x = ala3
    kwargs = dict(
        wrt=data.draw(wrts),
        save_every=data.draw(mostly(st.just(1), st.sampled_from([2, 0, -3, 10**12, 1.5]))),
        method=data.draw(mostly(st.just("exact"), st.sampled_from(["window", "leapfrog", None]))),
        params=data.draw(parameters(system.params)),
        progress=False,
    )
    if data.draw(mostly(st.just(False), st.just(True))):
        kwargs["v0"] = data.draw(positions(np.zeros_like(x)))
    if data.draw(mostly(st.just(False), st.just(True))):
        kwargs["replica"] = data.draw(odd_numbers)
    out = None
    if data.draw(st.booleans()):
        out = tmp_path_factory.mktemp("fuzz") / "out"
        kwargs["out_dir"] = out
    n_steps = data.draw(steps)
    traj = _ours(tm.simulate, system, data.draw(positions(x)), data.draw(integrators()),
                 n_steps, **kwargs)  # fmt: skip
    if traj is None and out is not None and out.exists():
        assert not [f for f in os.listdir(out) if f.startswith("chunk_")], os.listdir(out)


@few(60)
@given(data=st.data())
def test_fuzz_energy_gradient_and_minimize(data, ala3):
    _, system, x = ala3
    y, params = data.draw(positions(x)), data.draw(parameters(system.params))
    _ours(system.energy, y, params)
    _ours(system.gradient, y, params)
    if data.draw(st.booleans()):
        tolerance = data.draw(st.sampled_from([10.0, 0.0, -1.0, np.nan, "1"]))
        _ours(tm.minimize_system, system, y, tolerance=tolerance, max_iterations=5)


@few(25)
@given(data=st.data())
def test_fuzz_select_and_targets(data, ala3):
    _, system, _ = ala3
    _ours(system.select, data.draw(json_values))
    _ours(system.resolve_wrt, data.draw(json_values | wrts))
    obs = data.draw(st.sampled_from([tm.fitting.RadiusOfGyration(), None, "Rg", 3]))
    _ours(make_target, obs, data.draw(json_values), data.draw(json_values),
          weight=data.draw(odd_numbers))  # fmt: skip


@few(25)
@given(
    mostly(st.sampled_from(["A", "GW", "ap"]), st.text(max_size=6) | odd_numbers),
    mostly(st.just(-60.0), odd_numbers),
)
def test_fuzz_build_peptide(sequence, phi):
    _ours(tm.build_peptide, sequence, phi=phi)


@few(30)
@given(data=st.data())
def test_fuzz_finite_difference_and_replicas(data, ala3):
    _, system, x = ala3
    integrator = data.draw(integrators())
    wrt = data.draw(mostly(st.just("bond/*/k"), odd_wrts))
    n_steps = data.draw(mostly(st.integers(1, 3), steps))
    params = data.draw(parameters(system.params))
    h = data.draw(mostly(st.sampled_from([1e-4, 1e-3]), odd_numbers | hnp.arrays(np.float64, 3)))
    _ours(tm.finite_difference, system, data.draw(positions(x)), integrator, n_steps, wrt=wrt,
          h=h, params=params)  # fmt: skip
    starts = data.draw(mostly(st.just(x), st.sampled_from([np.stack([x, x]), x[None], x[:4]])))
    _ours(tm.fitting.run_replicas, system, starts, integrator, n_steps, wrt=wrt,
          n_replicas=data.draw(mostly(st.integers(1, 3), odd_numbers)),
          first_replica=data.draw(mostly(st.just(0), odd_numbers)), params=params)  # fmt: skip


FIT_SETTINGS = {
    "epochs": 1,
    "n_chains": 2,
    "sample_steps": 400,
    "decorrelation_steps": 40,
    "save_every": 20,
    "blocks": 4,
    "min_ess": 1.0,
    "reweight_threshold": 0.5,
    "max_reuse": 3,
    "max_extend": 3,
    "trust_radius": 0.2,
    "max_trust_radius": 1.0,
    "tolerance_sigma": 2.0,
    "patience": 2,
    "learning_rate": 0.05,
    "optimizer": "gauss-newton",
    "parametrization": "relative",
    "estimator": "fluctuation",
    "prior_sigma": None,
    "stop_chi2": None,
    "reservoir_size": 2000,
    "n_replicas": 32,
    "horizon": "auto",
    "max_horizon": 500,
    "horizon_cap": 0.05,
}


@few(100)
@given(
    bad=st.dictionaries(
        st.sampled_from(sorted(FIT_SETTINGS)),
        odd_numbers | st.sampled_from(["adam", "log", "hybrid", "pathwise", [], [1.0, -1.0]]),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_fit_settings(bad, ala3):
    """Odd values for one to three of the fit's settings, with targets that are not
    Targets: either the settings are refused, or (valid after all) the targets are, so
    no fit ever runs."""
    _, system, x = ala3
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    kwargs = dict(FIT_SETTINGS, **bad, progress=False)
    assert _ours(tm.fit, system, x, integrator, ["not a target"], "torsion/C-N-CT-C/k*",
                 **kwargs) is None  # fmt: skip
