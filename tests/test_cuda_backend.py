"""backend="cuda" (the CUDA kernels through CuPy) against backend="jax", and its input checks.

GPU tests (``@pytest.mark.gpu``, skipped by conftest.py without CuPy and a GPU): the steps
captured in CUDA graphs give the bits of the same kernels launched one by one; bad shapes,
out-of-range indices and a device out of memory raise TimemachineErrors naming the kernel
(or buffer) and the argument. The GPU against the JAX reference (ζ, E, ∂E/∂θ, 1,000-step
noise-free and thermal runs, run_replicas, repeated runs bit for bit) is the ``cuda-gpu``
row of test_backend_matrix.py.

CPU tests (no GPU needed): the validation in backends.tables, backends.pipeline and
cupy_backend runs before any launch, and its errors name the kernel and the argument.
"""

import numpy as np
import pytest

import timemachine as tm
from timemachine.backends import cuda_available, cupy_backend
from timemachine.backends.abi import STRUCTS, struct_bytes
from timemachine.backends.host import HostExecutor
from timemachine.backends.pipeline import Pipeline
from timemachine.backends.tables import build_plan
from timemachine.errors import InputError, SimulationError, TimemachineError
from timemachine.sensitivity.propagation import (
    exact_init,
    window_coefficients,
    window_init,
)
from timemachine.system import HarmonicBonds, Nonbonded, System


@pytest.fixture(scope="module")
def trialanine_obc2(trialanine):
    return tm.load_system(trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2")


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_graphs_give_the_bits_of_launch_by_launch(trialanine_obc2):
    import warnings

    system, x = trialanine_obc2
    wrt = system.select("torsion*")
    integ = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=4)
    coeffs = integ.coefficients(system.masses)
    v = np.asarray(tm.integrator.langevin.maxwell_boltzmann_velocities(system.masses, 300.0, 4))
    out = {}
    for graphs in (True, False):
        program = cupy_backend.make_program(system, wrt, "exact", graphs=graphs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture fails the test
            _, frames, _ = program(
                2, exact_init(x, v, wrt.size), 2, 300, system.params, coeffs, None, 4, 0
            )
        assert program.graphs == graphs
        out[graphs] = frames
    for a, b in zip(out[True], out[False], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_gpu_errors_name_the_kernel_and_argument(trialanine_obc2):
    system, x = trialanine_obc2
    ex = cupy_backend.CupyExecutor()
    wrt = system.select("torsion*")
    pl = Pipeline(build_plan(system, wrt), ex, system.params)
    with pytest.raises(InputError, match=r"tm_nonbonded_zeta: launch extent"):
        ex.launch("tm_nonbonded_zeta", 33, 0, pl.pair_blocks[0])
    with pytest.raises(InputError, match=r"tm_gb_psi: argument block is a NonbondedArgs"):
        ex.launch("tm_gb_psi", 33, 1, pl.pair_blocks[0])
    with pytest.raises(SimulationError, match=r"GPU out of memory allocating 'huge'"):
        ex.alloc("huge", (2**44,), np.float64)
    program = cupy_backend.make_program(system, wrt, "exact")
    integ = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=4)
    bad = exact_init(x[:-1], x[:-1], wrt.size)
    with pytest.raises(InputError, match=r"tm_langevin_primal: argument 'x \(state\.x\)'"):
        program(1, bad, 1, 10, system.params, integ.coefficients(system.masses), None, 0, 0)
    # the interpreter survives and the device still works
    pl.x.set(x)
    assert np.isfinite(pl.energy())


# --------------------------------------------------------------------------- CPU


class NoLaunchExecutor(HostExecutor):
    """The host executor's numpy buffers, without the compiled library: any launch fails
    the test (the validation must run before anything is launched)."""

    def __init__(self):
        self._blocks = {}
        self.launched = []

    def launch(self, kernel, nx, ny, block):
        raise AssertionError(f"{kernel} was launched")


def small_system():
    """4 atoms: two bonds (θ 0-3) and a nonbonded term (θ 4-6)."""
    names = ["bond/a/length", "bond/a/k", "bond/b/length", "bond/b/k", "charge/q", "sigma/s"]
    names += ["epsilon/e"]
    values = [0.1, 1e4, 0.15, 2e4, 0.2, 0.3, 0.5]
    bonds = HarmonicBonds(np.array([[0, 1], [2, 3]]), np.array([0, 2]), np.array([1, 3]))
    mask = ~np.eye(4, dtype=bool)
    nb = Nonbonded(
        np.full(4, 4), np.full(4, 5), np.full(4, 6), mask, np.zeros((0, 2), int),
        np.zeros(0), np.zeros(0),
    )  # fmt: skip
    x = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.3, 0], [0, 0.3, 0.15]], dtype=np.float64)
    return System(np.ones(4), [bonds, nb], names, values), x


def replace_term(system, k, **changes):
    import dataclasses

    terms = list(system.terms)
    terms[k] = dataclasses.replace(terms[k], **changes)
    return System(system.masses, terms, system.param_names, system.params)


def test_every_error_is_a_timemachine_error():
    assert issubclass(InputError, TimemachineError)
    assert issubclass(SimulationError, TimemachineError)


@pytest.mark.parametrize(
    "term, changes, pattern",
    [
        (
            0,
            dict(idx=np.array([[0, 1], [2, 9]])),
            r"tm_terms_primal/tm_terms_zeta: argument 'idx' \(system\.terms\[0\] \(bond\) atom "
            r"indices\) holds 9 at flat position 3: not a valid atom index \(must be in \[0, 4\)\)",
        ),
        (
            0,
            dict(k_index=np.array([1, 70])),
            r"tm_terms_primal/tm_terms_zeta: argument 'pidx' .* holds 70 .*θ index",
        ),
        (
            0,
            dict(idx=np.array([[0, 1, 2], [1, 2, 3]])),
            r"tm_terms_primal/tm_terms_zeta: argument 'idx' .* must have shape \(n,2\), "
            r"got \(2, 3\)",
        ),
        (
            1,
            dict(charge_index=np.array([4, 4, 4, -1])),
            r"tm_nonbonded_primal/tm_nonbonded_zeta\[_xonly\]: argument 'charge' "
            r"\(system\.terms\[1\] \(nonbonded\)\.charge_index\) holds -1",
        ),
        (
            1,
            dict(sigma_index=np.array([5, 5, 5])),
            r"tm_nonbonded_primal/tm_nonbonded_zeta\[_xonly\]: argument 'sigma' .* "
            r"must have shape \(4,\)",
        ),
        (
            1,
            dict(pair_mask=np.ones((4, 3), bool)),
            r"tm_nonbonded_primal/tm_nonbonded_zeta\[_xonly\]: argument 'mask' .* "
            r"must have shape \(4, 4\)",
        ),
        (
            1,
            dict(exception_idx=np.array([[0, 4]]), coulomb_scale=np.ones(1), lj_scale=np.ones(1)),
            r"tm_terms_primal/tm_terms_zeta: argument 'idx' .*exception_idx\) holds 4",
        ),
        (
            1,
            dict(epsilon_index=np.array([6.0, 6.0, 6.0, 6.0])),
            r"argument 'epsilon' .* must hold integers, got dtype float64",
        ),
    ],
)
def test_bad_tables_name_the_kernel_and_argument(term, changes, pattern):
    system, _ = small_system()
    bad = replace_term(system, term, **changes)
    with pytest.raises(InputError, match=pattern):
        build_plan(bad, np.arange(3))
    build_plan(system, np.arange(3))  # the unmodified system is fine


def test_bad_wrt_names_the_kernel_argument():
    system, _ = small_system()
    with pytest.raises(InputError, match=r"argument 'inv_wrt' \(wrt\) holds 7 .*\[0, 7\)"):
        build_plan(system, np.array([0, 7]))
    with pytest.raises(InputError, match=r"wrt has repeated indices"):
        build_plan(system, np.array([1, 1]))


def test_bad_pipeline_inputs_name_the_kernel_and_argument():
    system, x = small_system()
    plan = build_plan(system, np.arange(4))
    ex = NoLaunchExecutor()
    with pytest.raises(InputError, match=r"tm_terms_primal.*argument 'theta' .*\(7,\).*\(6,\)"):
        Pipeline(plan, ex, system.params[:-1])
    nan_theta = np.array(system.params)
    nan_theta[2] = np.nan
    with pytest.raises(InputError, match=r"argument 'theta' .*non-finite at 2"):
        Pipeline(plan, ex, nan_theta)
    negative_eps = np.array(system.params)
    negative_eps[6] = -0.5  # epsilon/e: every atom's ε
    with pytest.raises(InputError, match=r"tm_nonbonded_primal: .*ε of atom 0\) is -0.5"):
        Pipeline(plan, ex, negative_eps)
    pl = Pipeline(plan, ex, system.params)
    integ = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    coeffs = integ.coefficients(np.ones(5))
    with pytest.raises(InputError, match=r"tm_langevin_primal: argument 'b' .*\(4,\), got \(5,\)"):
        pl.set_integrator(coeffs, 0, 0)
    pl.check_buffers()  # as built: fine
    pl.x[...] = x  # in place: fine
    pl.check_buffers()
    orig = pl.x
    pl.x = np.zeros((4, 3))  # a new buffer the argument blocks do not point to
    with pytest.raises(InputError, match=r"tm_langevin_primal: argument 'x' .*assign in place"):
        pl.check_buffers()
    pl.x = np.zeros((5, 3))
    with pytest.raises(
        InputError, match=r"tm_langevin_primal: argument 'x \(Pipeline\.x\)' has shape"
    ):
        pl.check_buffers()
    pl.x = orig
    pl.check_buffers()
    pl.dx = pl.dx.astype(np.float32)
    with pytest.raises(
        InputError, match=r"tm_sens_exact: argument 'dx \(Pipeline\.dx\)' has dtype"
    ):
        pl.check_buffers()


@pytest.mark.parametrize("method", ["exact", "window"])
def test_bad_state_names_the_kernel_and_argument(method):
    system, x = small_system()
    wrt = np.arange(4)
    program = cupy_backend.make_program(system, wrt, method, NoLaunchExecutor())
    integ = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    coeffs = integ.coefficients(system.masses)
    wco = None
    sens = "tm_sens_exact"
    if method == "window":
        wco = window_coefficients(integ, 3)
        sens = "tm_sens_window"

    def init(xx, p, k=3):
        return exact_init(xx, xx, p) if method == "exact" else window_init(xx, xx, p, k)

    def call(state):
        program(1, state, 1, 5, system.params, coeffs, wco, 0, 0)

    with pytest.raises(
        InputError, match=r"tm_langevin_primal: argument 'x \(state\.x\)' has shape"
    ):
        call(init(x[:3], 4))
    with pytest.raises(InputError, match=rf"{sens}: argument 'dx \(state\.dx_dtheta\)' has shape"):
        call(init(x, 3))
    bad = init(x, 4)._replace(v=np.full((4, 3), np.inf))
    with pytest.raises(InputError, match=r"tm_langevin_primal: argument 'v' .* must be finite"):
        call(bad)
    if method == "window":
        bad = init(x, 4)._replace(to_fold=np.zeros((4, 4, 2)))
        with pytest.raises(InputError, match=r"tm_sens_window: argument 'to_fold"):
            call(bad)


def test_cupy_executor_checks_launches_before_touching_the_gpu():
    # the checks in CupyExecutor.launch are Python-side: exercise them without CuPy
    ex = object.__new__(cupy_backend.CupyExecutor)
    ex._fns, ex._blocks = {}, {}

    def block(name):
        fields = dict.fromkeys((f for f, _ in STRUCTS[name]), 0)
        return (name, struct_bytes(name, fields).view(np.uint8))

    with pytest.raises(InputError, match=r"unknown kernel 'tm_nope'"):
        ex.launch("tm_nope", 1, 1, block("TermArgs"))
    with pytest.raises(InputError, match=r"tm_gb_psi: argument block is a TermArgs, expected"):
        ex.launch("tm_gb_psi", 1, 1, block("TermArgs"))
    with pytest.raises(InputError, match=r"tm_terms_primal: argument 'argument block' has shape"):
        ex.launch("tm_terms_primal", 1, 1, ("TermArgs", np.zeros(3, np.uint8)))
    with pytest.raises(InputError, match=r"tm_gather_zeta: launch extent \(10, 70000\)"):
        ex.launch("tm_gather_zeta", 10, 70000, block("GatherArgs"))
    with pytest.raises(InputError, match=r"tm_terms_zeta: launch extent \(-1, 1\)"):
        ex.launch("tm_terms_zeta", -1, 1, block("TermArgs"))
    ex.launch("tm_terms_zeta", 0, 1, block("TermArgs"))  # empty: nothing to launch


@pytest.mark.skipif(cuda_available()[0], reason="CuPy and a GPU are available here")
def test_cuda_backend_without_gpu_says_why(trialanine_obc2):
    system, x = trialanine_obc2
    integ = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    with pytest.raises(InputError, match=r"backend='cuda' is not available .*: (CuPy|no CUDA)"):
        tm.simulate(system, x, integ, 10, save_every=10, backend="cuda", progress=False)


def test_cuda_bench_runs_end_to_end_on_the_host_build(
    host_cuda_backend, monkeypatch, tmp_path, capsys
):
    # benchmarks/cuda_bench.py is only ever timed on a GPU; run its whole path here with the
    # host build of the kernels standing in for CuPy (a small OBC2 helix, 3 steps), so that
    # a GPU session does not spend its minutes finding a broken script
    import json
    import os
    import sys

    bench_dir = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")
    monkeypatch.syspath_prepend(bench_dir)
    import cuda_bench

    monkeypatch.setattr(cuda_bench, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(cuda_bench, "gpu_name", lambda: "host build")
    out = tmp_path / "cuda_bench.json"
    argv = ["--cases", "protein-obc2", "--residues", "12", "--steps", "3", "--repeats", "1"]
    assert cuda_bench.main(argv + ["--params", "8", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["case"], row["P"], row["steps"]) == ("protein-obc2", 8, 3)
    assert row["n_atoms"] > 150
    variants = {"cuda_plain", "cuda_sens", "jax_plain", "jax_sens"}
    assert set(row["steps_per_s"]) == variants | {"cuda_plain_direct", "cuda_sens_direct"}
    assert all(np.isfinite(v) and v > 0 for v in row["steps_per_s"].values())
    assert "| protein-obc2 |" in capsys.readouterr().out
    sys.modules.pop("cuda_bench", None)
