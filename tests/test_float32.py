"""The float32 mode (issue 18, part 6): single-precision dynamics held to the bounds of
``timemachine.precision.FLOAT32_TOLERANCES`` against float64 at the same inputs, and
refused or warned about where it cannot meet them."""

import os
import warnings

import jax
import numpy as np
import pytest
from conftest import rel

import timemachine as tm
from timemachine.errors import InputError
from timemachine.fitting.equilibrium import fit_equilibrium
from timemachine.fitting.replicas import run_replicas
from timemachine.fitting.targets import graf2007_targets
from timemachine.precision import (
    FLOAT32_TOLERANCES,
    Float32Warning,
    cast_floats,
    cast_system,
    check_precision,
)
from timemachine.structured import gradient_fn

WRT = ["torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"]
VILLIN_HP35 = os.path.join(
    os.path.dirname(__file__), "..", "examples", "rg_villin", "villin_hp35.pdb"
)


@pytest.fixture(scope="module")
def ala3(trialanine):
    system, x = tm.load_system(trialanine, implicit_solvent="obc2")
    return system, np.asarray(tm.minimize_system(system, x))


@pytest.fixture(scope="module")
def both(ala3):
    """float64 and float32 runs of 200 steps (0.3 ps) from the same start and seed."""
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=3)
    kw = dict(wrt=WRT, save_every=100)
    return {
        p: tm.simulate(system, x, integ, 200, precision=p, **kw) for p in ("float64", "float32")
    }


def _energy_and_gradient(system, x, dtype):
    theta = cast_floats(np.asarray(system.params), dtype)
    s = cast_system(system, dtype)
    x = np.asarray(x, dtype)
    energy, gradient = s.energy_fn(), gradient_fn(s)
    return jax.jit(lambda y, t: (energy(y, t), gradient(y, t)))(x, theta)


def test_a_float32_trajectory_is_float32_and_within_its_tolerance_of_float64(both):
    f64, f32 = both["float64"], both["float32"]
    for name in ("x", "v", "dx_dtheta"):
        assert getattr(f64, name).dtype == np.float64
        assert getattr(f32, name).dtype == np.float32, name
    err_x, err_dx = rel(f32.x[-1], f64.x[-1]), rel(f32.dx_dtheta[-1], f64.dx_dtheta[-1])
    assert err_dx < FLOAT32_TOLERANCES["dx_dtheta"], err_dx
    assert err_x < 1e-4, err_x
    # it really ran in float32: float64 would agree with itself to ~1e-13 or better
    assert err_x > 1e-9 and err_dx > 1e-9, (err_x, err_dx)
    assert np.isfinite(f32.potential_energy).all()
    assert rel(f32.potential_energy, f64.potential_energy) < 1e-4


def test_a_float32_run_repeats_bitwise(ala3, both):
    # float32 is reproducible with itself, as float64 is (test_reproducibility), though
    # it agrees with float64 only to its tolerances
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=3)
    again = tm.simulate(system, x, integ, 200, wrt=WRT, save_every=100, precision="float32")
    for name in ("x", "v", "dx_dtheta", "potential_energy"):
        assert np.array_equal(getattr(again, name), getattr(both["float32"], name)), name


@pytest.mark.parametrize("where", ["trialanine", "villin"])
def test_float32_energies_and_forces_meet_the_stated_tolerances(where, ala3, both):
    if where == "trialanine":
        system, x = ala3[0], both["float64"].x[-1]  # a thermal configuration
    else:
        system, x = tm.load_system(VILLIN_HP35, implicit_solvent="obc2")
    e64, g64 = _energy_and_gradient(system, np.asarray(x, np.float32), np.float64)
    e32, g32 = _energy_and_gradient(system, x, np.float32)
    assert e32.dtype == np.float32 and g32.dtype == np.float32
    # the independent reference: OpenMM's energy of the same float64 system agrees with
    # ours elsewhere (test_energies); here float64 is the reference of float32
    e_err = abs(float(e32) - float(e64)) / abs(float(e64))
    f_err = rel(g32, g64)
    assert e_err < FLOAT32_TOLERANCES["energy"], e_err
    assert f_err < FLOAT32_TOLERANCES["forces"], f_err
    assert f_err > 1e-10  # float32 arithmetic, not float64 in disguise


def test_float32_fit_gradients_meet_the_stated_tolerance(ala3, trialanine):
    system, x = ala3
    targets = graf2007_targets(system.topology)
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=4)
    grads, states = {}, {}
    for p in ("float64", "float32"):
        res = tm.fit(system, x, integ, targets, wrt=WRT, estimator="pathwise", epochs=1,
                     n_replicas=2, n_steps=100, progress=False, precision=p)  # fmt: skip
        grads[p] = np.asarray(res.history[0]["gradient"])
        eq = fit_equilibrium(system, x, integ, targets, WRT, epochs=1, n_chains=2,
                             sample_steps=1000, decorrelation_steps=200, save_every=50,
                             blocks=5, min_ess=1.0, progress=False, precision=p)  # fmt: skip
        grads["eq " + p] = np.asarray(eq.history[0]["gradient"])
        states[p] = eq
    err = rel(grads["float32"], grads["float64"])
    assert err < FLOAT32_TOLERANCES["fit_gradient"], err
    assert 0 < err
    err = rel(grads["eq float32"], grads["eq float64"])
    assert err < FLOAT32_TOLERANCES["fit_gradient"], err
    assert 0 < err


def test_run_replicas_in_float32_gives_float32_states(ala3):
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=5)
    res = run_replicas(system, x, integ, 20, wrt=WRT, n_replicas=2, precision="float32")
    assert res.x.dtype == np.float32 and res.dx_dtheta.dtype == np.float32
    ref = run_replicas(system, x, integ, 20, wrt=WRT, n_replicas=2)
    assert rel(res.dx_dtheta, ref.dx_dtheta) < FLOAT32_TOLERANCES["dx_dtheta"]


@pytest.mark.parametrize("bad", ["float16", "double", "", None, True, 32, np.int32])
def test_a_precision_other_than_float64_or_float32_is_named(bad, ala3):
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.001, seed=0)
    with pytest.raises(InputError, match=r"precision must be 'float64' or 'float32', got"):
        tm.simulate(system, x, integ, 10, wrt=WRT, precision=bad)
    with pytest.raises(InputError, match=r"precision must be"):
        check_precision(bad)


def test_float32_is_refused_where_it_cannot_meet_its_tolerance(ala3, tmp_path):
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.001, seed=0)
    # the CUDA kernels are float64 only (refused before any GPU is looked for)
    with pytest.raises(InputError, match=r"precision='float32' is refused: the CUDA"):
        tm.simulate(system, x, integ, 10, wrt=WRT, precision="float32", backend="cuda")
    with pytest.raises(InputError, match=r"precision='float32' is refused: the CUDA"):
        run_replicas(system, x, integ, 10, wrt=WRT, backend="cuda", precision="float32")
    # a window tolerance below float32's resolution
    with pytest.raises(InputError, match=r"window_tol = 1e-08 is below float32"):
        tm.simulate(system, x, integ, 10, wrt=WRT, method="window", precision="float32")
    # a custom term's constants are closures
    custom = system.add_term(lambda y, p: p[0] * y[0, 0], ["restraint/x/k"], [1.0], "restraint")
    with pytest.raises(InputError, match=r"custom terms \('restraint'\)"):
        tm.simulate(custom, x, integ, 10, wrt=WRT, precision="float32", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing written
    with pytest.raises(InputError, match=r"precision must be"):
        tm.fit(system, x, integ, graf2007_targets(system.topology), wrt=WRT,
               precision="half", progress=False)  # fmt: skip


def test_a_long_float32_sensitivity_run_warns(ala3):
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=3)
    with pytest.warns(Float32Warning, match=r"1.5 ps is longer than 1 ps"):
        tm.simulate(system, x, integ, 1000, wrt=WRT, save_every=100, precision="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Float32Warning)  # 0.3 ps: no warning
        tm.simulate(system, x, integ, 200, wrt=WRT, save_every=100, precision="float32")


def test_a_float32_run_does_not_resume_a_float64_folder(ala3, tmp_path):
    system, x = ala3
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=3)
    tm.simulate(system, x, integ, 100, wrt=WRT, save_every=100, out_dir=tmp_path)
    with pytest.raises(InputError, match=r"precision"):
        tm.simulate(system, x, integ, 200, wrt=WRT, save_every=100, out_dir=tmp_path,
                    resume=True, precision="float32")  # fmt: skip


def test_the_config_takes_a_precision_and_names_a_bad_one(tmp_path):
    from timemachine.config import ConfigError, load_config

    path = tmp_path / "sim.toml"
    body = (
        '[system]\nsequence = "AAA"\n[parameters]\nwrt = ["torsion/*/k*"]\n'
        "[simulate]\nsteps = 100\nsave_every = 10\nprecision = {!r}\n"
    )
    path.write_text(body.format("float32").replace("'", '"'))
    assert load_config(path, "simulate")["simulate"]["precision"] == "float32"
    path.write_text(body.format("float16").replace("'", '"'))
    with pytest.raises(ConfigError, match=r"\[simulate\]\.precision"):
        load_config(path, "simulate")
