"""Runs that go wrong (issue 18, part 4), on alanine dipeptide (Ala-Ala, 23 atoms, amber99sbildn
in vacuum): a start that cannot run is refused before any dynamics (atoms too close, NaN);
a run that blows up (a parameter that makes a bond unstable, a time step too large,
exploding sensitivities) stops at the first bad saved frame of the chunk or batch it
happens in, naming the step, the atom, the parameter and the replica or chain, and what to
try; and what was written before stays usable: the chunks and checkpoint of ``simulate``'s
``out_dir``, the last epoch's checkpoint of ``tm.fit`` and ``fit_equilibrium``.

Every step, atom, parameter and replica a message names is computed here independently:
from plain Langevin runs of the same seed (``timemachine.integrator.run``, the primal
trajectory of ``simulate`` to round-off, which an exponential blow-up does not move across
a saved frame), from a free run without the guard, or from the molecule's bond graph.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import random
import re

import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.checkpoints import read_checkpoint
from timemachine.errors import InputError, SimulationError, TimemachineError
from timemachine.fitting import JCoupling3HNHA, make_target, run_replicas
from timemachine.fitting.equilibrium import fit_equilibrium
from timemachine.fitting.equilibrium_checkpoint import load_checkpoint as load_equilibrium
from timemachine.fitting.train import load_checkpoint as load_pathwise
from timemachine.integrator import run as plain_run
from timemachine.integrator.langevin import LangevinState
from timemachine.sensitivity import SensitivityTrajectory
from timemachine.sensitivity.frames import STATE_FORMAT
from timemachine.start_checks import MAX_ENERGY, MIN_PAIR_DISTANCE

WRT = "torsion/*/k*"  # what simulate carries (one compilation for every simulate test)
FIT_WRT = "torsion/C-N-CT-C/k*"  # the backbone φ barriers the fits move
UNSTABLE = ("bond/CT-HC/k", 3.3)  # ×3.3: ω δt > 2 for the methyl C-H stretch at 2 fs


@pytest.fixture(scope="module")
def dipeptide():
    """(topology, system, minimised x) of Ala-Ala; the hydrogens placed with a seeded
    ``random`` (OpenMM's Modeller uses it), so every process builds the same bits."""
    state = random.getstate()
    random.seed(2024)
    try:
        top, x = tm.build_peptide("AA")
    finally:
        random.setstate(state)
    system, x = tm.load_system((top, x), forcefield=("amber99sbildn.xml",))
    x = np.asarray(tm.minimize_system(system, x, tolerance=1.0, max_iterations=500, warn=False))
    return top, system, x


def integrator(dt=0.002, seed=3):
    return tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=dt, seed=seed)


def targets(top):
    return [make_target(JCoupling3HNHA(top), [6.0], 0.5, name="3J(HN,HA)")]


def unstable_params(system):
    params = np.array(system.params)
    params[system.param_names.index(UNSTABLE[0])] *= UNSTABLE[1]
    return params


def label(top, i):
    atom = list(top.atoms())[i]
    return f"atom {i} ({atom.residue.name}{atom.residue.id}:{atom.name})"


def first_bad_frame(system, params, traj_x, steps):
    """(frame, step, atom of the largest |∇E|) of the first frame of a plain run whose
    coordinates are non-finite or whose |E| exceeds MAX_ENERGY; None if none is."""
    for f, x in enumerate(np.asarray(traj_x)):
        with np.errstate(all="ignore"):
            e = float(system.energy(x, params)) if np.isfinite(x).all() else math.nan
        if not abs(e) <= MAX_ENERGY:
            assert np.isfinite(x).all(), "expected the energy to overflow before x does"
            with np.errstate(all="ignore"):
                g = np.linalg.norm(np.asarray(system.gradient(x, params)), axis=1)
            return f, int(steps[f]), int(np.argmax(np.where(np.isfinite(g), g, np.inf)))
    return None


_GRADIENTS = {}


def plain(system, params, x0, integ, n_steps, save_every, replica=0):
    """A plain Langevin run of ``n_steps`` (x0 positions or a LangevinState), its frames
    kept even when it ends non-finite; one gradient function per θ, so runs at the same θ
    share a compilation."""
    key = (id(system), np.asarray(params).tobytes())
    if key not in _GRADIENTS:
        g, theta = system.gradient_fn(), np.asarray(params)
        _GRADIENTS[key] = lambda y: g(y, theta)
    try:
        return plain_run(
            _GRADIENTS[key], system.masses, x0, integ, n_steps, replica=replica,
            save_every=save_every,
        )  # fmt: skip
    except SimulationError as err:
        return err.trajectory


def files_sha256(folder):
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(pathlib.Path(folder).iterdir())
    }


def temporaries(folder):
    return [n for n in os.listdir(folder) if n.startswith(".tmp")]


def strip(history):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in history]


# --------------------------------------------------------------------------- bad starts


def test_atoms_too_close_are_refused_before_anything_runs(dipeptide, tmp_path):
    """Two atoms 0.01 nm apart: simulate, run_replicas, the pathwise fit and the
    equilibrium fit all refuse the start with an InputError that names both atoms (index,
    residue and name) and their distance, and says to minimise and check Å against nm;
    nothing is written. A structure converted to nm twice (every distance / 10) is
    refused naming its closest interacting pair, found here from the bond graph."""
    top, system, x = dipeptide
    atoms = list(top.atoms())
    i = next(a.index for a in atoms if a.residue.index == 0 and a.name == "N")
    j = next(a.index for a in atoms if a.residue.index == 1 and a.name == "O")
    bad = x.copy()
    bad[j] = bad[i] + np.array([0.006, 0.008, 0.0])  # 0.01 nm from atom i
    expected = (
        rf"x0: {re.escape(label(top, i))} and {re.escape(label(top, j))} are 0\.01 nm "
        rf"apart, closer than {MIN_PAIR_DISTANCE} nm"
    )
    calls = {
        "simulate": lambda: tm.simulate(
            system, bad, integrator(), 20, wrt=WRT, save_every=10, out_dir=tmp_path / "sim",
            progress=False,
        ),
        "run_replicas": lambda: run_replicas(system, bad, integrator(), 20, wrt=WRT),
        "fit": lambda: tm.fit(
            system, bad, integrator(), targets(top), FIT_WRT, estimator="pathwise", epochs=1,
            n_steps=10, out_dir=tmp_path / "fit", progress=False,
        ),
        "fit_equilibrium": lambda: fit_equilibrium(
            system, bad, integrator(), targets(top), FIT_WRT, epochs=1, sample_steps=200,
            save_every=10, blocks=2, out_dir=tmp_path / "eq", progress=False,
        ),
    }  # fmt: skip
    for name, call in calls.items():
        with pytest.raises(InputError, match=expected) as info:
            call()
        err = info.value
        assert isinstance(err, ValueError) and isinstance(err, TimemachineError), name
        assert err.atoms == (i, j) and err.distance == pytest.approx(0.01, rel=1e-12), name
        assert "minimize" in str(err) and "Å" in str(err) and "nm" in str(err), name
    assert sorted(os.listdir(tmp_path)) == []  # no folder was even created

    # nm converted to nm again: every distance a tenth. The closest pair of atoms that
    # interact (more than two bonds apart: 1-2 and 1-3 pairs are excluded) is named.
    shrunk = x / 10.0
    bonded = {a.index: set() for a in atoms}
    for a, b in top.bonds():
        bonded[a.index].add(b.index)
        bonded[b.index].add(a.index)
    best = None
    for a in range(len(atoms)):
        near = bonded[a] | {c for b in bonded[a] for c in bonded[b]}
        for b in range(a + 1, len(atoms)):
            if b not in near:
                d = float(np.linalg.norm(shrunk[a] - shrunk[b]))
                best = min(best or (d, a, b), (d, a, b))
    d, a, b = best
    assert d < MIN_PAIR_DISTANCE
    with pytest.raises(InputError, match=re.escape(f"{label(top, a)} and {label(top, b)}")) as info:
        tm.simulate(system, shrunk, integrator(), 20, wrt=WRT, save_every=10, progress=False)
    assert info.value.atoms == (a, b) and info.value.distance == pytest.approx(d, rel=1e-9)
    assert "Å read as nm" in str(info.value)


def test_a_periodic_start_is_checked_on_its_verlet_lists_by_minimum_image():
    """A TIP3P box on Verlet lists: the start check's O(N) pass (lists built at x0, the
    plain step's gradient) has the exact sums' energy and gradient, and refuses two
    oxygens 0.02 nm apart across the box's face, a clash only the minimum image sees (the
    raw displacement is a box edge long), naming both atoms and their distance."""
    from conftest import TIP3P_FILES, tip3p_box

    from timemachine import start_checks

    top, x = tip3p_box(2.2)
    system, x = tm.load_system((top, x), forcefield=TIP3P_FILES, nonbonded_method="PME",
                               cutoff=0.9)  # fmt: skip
    x = np.asarray(x)
    e, g, _, _ = start_checks._on_lists(system)(jnp.asarray(x), jnp.asarray(system.params))
    e_ref, g_ref = float(system.energy(x)), np.asarray(system.gradient(x))
    assert abs(float(e) - e_ref) <= 1e-9 * abs(e_ref)
    assert np.abs(np.asarray(g) - g_ref).max() <= 1e-9 * np.abs(g_ref).max()

    edge = float(np.asarray(system.terms[-1].box)[0])
    oxygens = [a.index for a in top.atoms() if a.name == "O"]
    i, j = oxygens[0], oxygens[-1]
    bad = x.copy()
    shift = bad[i] + np.array([edge - 0.02, 0.0, 0.0]) - bad[j]
    bad[[j, j + 1, j + 2]] += shift  # the whole molecule, so its own geometry stays
    with pytest.raises(InputError, match=r"are 0\.02 nm apart, closer than") as info:
        start_checks.check_start(system, bad)
    assert set(info.value.atoms) == {i, j}
    assert info.value.distance == pytest.approx(0.02, rel=1e-9)


def test_nan_in_the_start_is_refused_naming_the_atom(dipeptide):
    """NaN in x0 (or in one replica's x0, or in v0) is refused before any step, naming the
    argument and the atom."""
    top, system, x = dipeptide
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(InputError, match=r"^x0 has a non-finite value at atom 7\b"):
        tm.simulate(system, bad, integrator(), 20, wrt=WRT, save_every=10, progress=False)
    starts = np.stack([x, x, bad])
    with pytest.raises(InputError, match=r"^x0\[2\] has a non-finite value at atom 7\b"):
        run_replicas(system, starts, integrator(), 20, wrt=WRT, n_replicas=3)
    v0 = np.zeros_like(x)
    v0[4, 0] = np.inf
    with pytest.raises(InputError, match=r"^v0 has a non-finite value at atom 4\b"):
        tm.simulate(system, x, integrator(), 20, wrt=WRT, save_every=10, v0=v0, progress=False)


def test_an_enormous_starting_energy_is_refused_naming_the_term_and_atom(dipeptide):
    """A methyl hydrogen 1000 nm out along its bond (a stray coordinate): no pair is too
    close, but the bond term's energy, about ½ k (1000 nm)² > 1e10 kJ/mol, is refused at
    x0, naming the term and the atom of the largest |∇E| (from jax.grad here)."""
    import jax

    top, system, x = dipeptide
    atoms = list(top.atoms())
    h = next(a.index for a in atoms if a.residue.index == 0 and a.name == "HB1")
    (c,) = [b.index for a, b in top.bonds() if a.index == h] + [
        a.index for a, b in top.bonds() if b.index == h
    ]
    far = x.copy()
    unit = (x[h] - x[c]) / np.linalg.norm(x[h] - x[c])
    far[h] = x[c] + 1000.0 * unit
    grad = np.asarray(jax.jit(jax.grad(system.energy_fn()))(far, np.asarray(system.params)))
    atom = int(np.argmax(np.linalg.norm(grad, axis=1)))
    assert atom in (h, c)
    with pytest.raises(InputError, match=r"^x0: the starting energy is 1\.\d+e\+11 kJ/mol") as info:
        tm.simulate(system, far, integrator(), 20, wrt=WRT, save_every=10, progress=False)
    message = str(info.value)
    assert "(from the bond term)" in message and info.value.atoms == (atom,)
    assert f"{label(top, atom)} has |∇E| = " in message and "minimize it first" in message


# --------------------------------------------------------------------------- simulate


def test_blow_up_in_a_later_chunk_names_step_and_atom_and_keeps_the_good_chunks(
    dipeptide, tmp_path
):
    """The methyl C-H bond's k × 3.3 makes its stretch unstable at δt = 2 fs: the energy
    overflows (|E| > 1e10 kJ/mol) a few dozen steps in. simulate stops at that saved frame,
    naming its step and the atom with the largest |∇E| there (both from a plain run of the
    same seed), with what to try. The chunks before it stay in out_dir, checksummed and
    bitwise those of a run that stopped there; a resume continues from their checkpoint
    (and meets the same blow-up), leaving every file as it was."""
    top, system, x = dipeptide
    params = unstable_params(system)
    save_every, chunk = 2, 6
    free = plain(system, params, x, integrator(), 60, save_every)
    found = first_bad_frame(system, params, free.x, np.asarray(free.steps))
    assert found is not None
    _, step, atom = found
    good_chunks = (step - 1) // chunk  # the chunk it happens in is not written
    assert good_chunks >= 2, f"the blow-up at step {step} should come after two chunks"
    last_good = good_chunks * chunk

    out = tmp_path / "run"
    kw = dict(wrt=WRT, save_every=save_every, params=params, chunk_steps=chunk, progress=False)
    with pytest.raises(SimulationError) as info:
        tm.simulate(system, x, integrator(), 60, out_dir=out, **kw)
    err = info.value
    assert isinstance(err, RuntimeError) and isinstance(err, TimemachineError)
    assert (err.step, err.atom, err.parameter) == (step, atom, None)
    assert (err.replica, err.epoch) == (None, None)  # one run, no fit
    message = str(err)
    assert re.match(rf"simulate: the potential energy overflowed at step {step} \(first", message)
    assert f"atom {atom} has the largest |∇E|" in message
    assert "minimize first, use a smaller dt, or check θ" in message
    assert f"keeps the {last_good // save_every} frames up to step {last_good}" in message
    print(message)

    # the folder: the good chunks, their checkpoint, no temporary or half-written file
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("chunk_")] == [
        f"chunk_{c:05d}.npz" for c in range(good_chunks)
    ]
    assert temporaries(out) == []
    ckpt = read_checkpoint(str(out / "state"), STATE_FORMAT)
    assert ckpt.meta["step"] == last_good and not ckpt.previous
    loaded = SensitivityTrajectory.load(out)
    stopped = tm.simulate(system, x, integrator(), last_good, **kw)  # in memory
    np.testing.assert_array_equal(loaded.steps, np.arange(1, last_good // 2 + 1) * 2)
    for name in ("x", "v", "dx_dtheta", "potential_energy", "kinetic_energy"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), getattr(stopped, name))
    for a, b in zip(loaded.final_state, stopped.final_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    before = files_sha256(out)
    with pytest.raises(SimulationError) as again:
        tm.simulate(system, x, integrator(), 60, out_dir=out, resume=True, **kw)
    assert (again.value.step, again.value.atom) == (step, atom)
    assert files_sha256(out) == before


def test_exploding_sensitivities_stop_in_their_chunk_and_resume_bitwise(dipeptide, tmp_path):
    """max_sensitivity set to the largest |dx/dθ| of the first two chunks of a free run: the
    run stops at the first later saved frame above it, naming that step, the parameter and
    the atom of its largest entry. Its out_dir keeps the two chunks; resumed with the
    guard off it finishes, bitwise the free run."""
    top, system, x = dipeptide
    save_every, chunk, n_steps = 10, 40, 200
    kw = dict(wrt=WRT, save_every=save_every, chunk_steps=chunk, progress=False)
    free = tm.simulate(system, x, integrator(), n_steps, max_sensitivity=None, **kw)
    mags = np.abs(free.dx_dtheta).max(axis=(1, 2, 3))
    per_chunk = chunk // save_every
    limit = float(mags[: 2 * per_chunk].max())
    later = np.flatnonzero(mags > limit)
    assert later.size, "the sensitivities should grow beyond those of the first two chunks"
    f = int(later[0])
    table = np.abs(free.dx_dtheta[f]).max(axis=2)  # (P, N)
    p, atom = np.unravel_index(np.argmax(table), table.shape)
    good = f // per_chunk

    out = tmp_path / "run"
    with pytest.raises(SimulationError, match="sensitivity blow-up") as info:
        tm.simulate(system, x, integrator(), n_steps, out_dir=out, max_sensitivity=limit, **kw)
    err = info.value
    assert (err.step, err.parameter, err.atom) == (
        int(free.steps[f]),
        free.param_names[p],
        int(atom),
    )
    assert f"step {err.step}:" in str(err) and f"'{err.parameter}' at atom {atom}" in str(err)
    assert "raise max_sensitivity" in str(err) and "resume=True" in str(err)
    assert [n for n in sorted(os.listdir(out)) if n.startswith("chunk_")] == [
        f"chunk_{c:05d}.npz" for c in range(good)
    ]
    kept = {n: h for n, h in files_sha256(out).items() if n.startswith("chunk_")}

    resumed = tm.simulate(
        system, x, integrator(), n_steps, out_dir=out, resume=True, max_sensitivity=None, **kw
    )
    assert {n: h for n, h in files_sha256(out).items() if n in kept} == kept
    np.testing.assert_array_equal(resumed.steps, free.steps)
    for name in ("x", "v", "dx_dtheta", "potential_energy", "kinetic_energy"):
        np.testing.assert_array_equal(np.asarray(getattr(resumed, name)), getattr(free, name))
    for a, b in zip(resumed.final_state, free.final_state, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- replicas


def test_run_replicas_names_the_replica_that_blew_up_first(dipeptide):
    """A time step too large (4.5 fs, no constraints) overflows every replica's energy at
    some saved frame: run_replicas names the replica that did so at the earliest step
    (the lowest on a tie), with the step and the atom, each from a plain run of that
    replica's seed."""
    top, system, x = dipeptide
    params = np.array(system.params)
    hot = integrator(dt=0.0045)
    replicas = [0, 1, 2]
    firsts = []
    for r in replicas:
        traj = plain(system, params, x, hot, 40, 2, replica=r)
        found = first_bad_frame(system, params, traj.x, np.asarray(traj.steps))
        assert found is not None, f"replica {r} should blow up within 40 steps"
        firsts.append((found[1], r, found[2]))
    step, replica, atom = min(firsts)
    with pytest.raises(SimulationError) as info:
        run_replicas(system, x, hot, 40, wrt=WRT, replicas=replicas, save_every=2)
    err = info.value
    assert (err.replica, err.step, err.atom) == (replica, step, atom)
    assert str(err).startswith(
        f"run_replicas: replica {replica}: the potential energy overflowed at step {step} "
    )
    assert "(3 of 3 replicas bad)" in str(err)  # each blows up within the 40 steps


# --------------------------------------------------------------------------- fits


def test_pathwise_fit_stops_at_the_epoch_whose_sensitivities_explode(dipeptide, tmp_path):
    """tm.fit (pathwise) with max_sensitivity between the largest |dx/dθ| of the epochs
    before epoch e and that of epoch e (both from run_replicas at each epoch's θ and
    replicas, taken from a free fit): it stops in epoch e naming the replica, the step,
    the parameter and the atom. The checkpoint of the epochs before is intact and verified,
    history.json has them, and a resume with the guard off finishes bitwise the free fit."""
    top, system, x = dipeptide
    common = dict(
        estimator="pathwise", epochs=4, n_replicas=4, n_steps=100, learning_rate=0.05,
        progress=False,
    )  # fmt: skip
    free = tm.fit(system, x, integrator(), targets(top), FIT_WRT, max_sensitivity=None, **common)
    wrt = system.resolve_wrt(FIT_WRT)
    names = [system.param_names[i] for i in wrt]
    tops = []  # per epoch: |dx/dθ| max over (x, y, z) of each replica's last frame (M, P, N)
    for record in free.history:
        full = np.array(system.params)
        full[wrt] = record["params"]
        res = run_replicas(
            system, x, integrator(), 100, wrt=wrt, params=full, max_sensitivity=None,
            replicas=np.arange(4) + 4 * record["epoch"],
        )  # fmt: skip
        tops.append(np.abs(res.dx_dtheta).max(axis=3))
    peaks = [float(t.max()) for t in tops]
    epoch = next((e for e in range(1, 4) if peaks[e] > max(peaks[:e])), None)
    assert epoch is not None, f"no epoch after the first exceeds the earlier ones: {peaks}"
    limit = max(peaks[:epoch])
    r = int(np.argmax(tops[epoch].max(axis=(1, 2)) > limit))  # the first replica above
    p, atom = np.unravel_index(np.argmax(tops[epoch][r]), tops[epoch][r].shape)

    out = tmp_path / "fit"
    with pytest.raises(SimulationError) as info:
        tm.fit(
            system, x, integrator(), targets(top), FIT_WRT, max_sensitivity=limit, out_dir=out,
            **common,
        )  # fmt: skip
    err = info.value
    assert (err.epoch, err.replica, err.step, err.parameter, err.atom) == (
        epoch, 4 * epoch + r, 100, names[p], int(atom)
    )  # fmt: skip
    assert str(err).startswith(
        f"epoch {epoch}: run_replicas: replica {4 * epoch + r}: sensitivity blow-up at step 100"
    )
    assert f"(epochs 0-{epoch - 1}) is intact" in str(err)
    print(err)
    ckpt = load_pathwise(out)
    assert ckpt["epoch"] == epoch and not ckpt["previous"]
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == epoch
    assert temporaries(out) == []

    resumed = tm.fit(
        system, x, integrator(), targets(top), FIT_WRT, max_sensitivity=None, out_dir=out,
        resume=True, **common,
    )  # fmt: skip
    assert strip(resumed.history) == strip(free.history)
    np.testing.assert_array_equal(resumed.params, free.params)


EQ = dict(
    n_chains=2, sample_steps=400, decorrelation_steps=100, save_every=20, blocks=4,
    min_ess=1.0, progress=False,
)  # fmt: skip


def test_equilibrium_hybrid_fit_names_the_parameter_whose_sensitivities_explode(dipeptide):
    """The hybrid estimator's replicas with max_sensitivity between the largest and the
    second largest per-parameter |dx/dθ| of a free fit's replicas (its record's
    dx_dtheta_max): only the largest parameter's entries exceed it, so that parameter is
    named, with epoch 0 and the horizon step."""
    top, system, x = dipeptide
    kw = dict(EQ, estimator="hybrid", n_replicas=4, horizon=100, epochs=1)
    free = fit_equilibrium(
        system, x, integrator(), targets(top), FIT_WRT, max_sensitivity=None, **kw
    )
    per_param = np.array(free.history[0]["dx_dtheta_max"])
    order = np.argsort(per_param)
    assert per_param[order[-1]] > per_param[order[-2]]
    limit = 0.5 * (per_param[order[-1]] + per_param[order[-2]])
    names = [system.param_names[i] for i in system.resolve_wrt(FIT_WRT)]
    with pytest.raises(SimulationError, match=r"^epoch 0: run_replicas: replica \d+: sens") as info:
        fit_equilibrium(system, x, integrator(), targets(top), FIT_WRT, max_sensitivity=limit, **kw)
    err = info.value
    assert (err.epoch, err.step, err.parameter) == (0, 100, names[order[-1]])
    assert f"parameter {names[order[-1]]!r}" in str(err)
    assert err.replica >= 1_000_000  # the hybrid estimator's own replica streams


def test_equilibrium_fit_blow_up_in_a_later_epoch_keeps_the_checkpoint(dipeptide, tmp_path):
    """An Adam step of 3 (relative) on the methyl C-H bond's k leaves epoch 0 fine and
    makes epoch 1's θ unstable (k × 4 or × -2): its chains blow up in their decorrelation
    segment. The error names epoch 1, the chain, the step and the atom, each computed here
    by plain runs from the chains' state in the checkpoint of epoch 0 at its θ; that
    checkpoint is intact and loadable, history.json holds epoch 0, and a resume continues
    from it (epoch 0 is not rerun) into the same blow-up."""
    top, system, x = dipeptide
    kw = dict(EQ, optimizer="adam", learning_rate=3.0, epochs=3)
    out = tmp_path / "eq"
    seen = []
    with pytest.raises(SimulationError) as info:
        fit_equilibrium(
            system, x, integrator(), targets(top), UNSTABLE[0], out_dir=out, callback=seen.append,
            **kw,
        )  # fmt: skip
    err = info.value
    assert [r["epoch"] for r in seen] == [0]
    ckpt = load_equilibrium(out)
    assert ckpt["epoch"] == 1 and not ckpt["previous"]
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 1
    assert temporaries(out) == []

    # independently: each chain from the checkpoint's state, at the θ epoch 1 tried
    i = system.param_names.index(UNSTABLE[0])
    theta = np.array(system.params)
    theta[i] *= 1.0 + float(np.asarray(ckpt["u"])[0])
    assert abs(theta[i] / system.params[i] - 1.0) == pytest.approx(3.0, rel=1e-3)
    firsts = []
    chains = ckpt["systems"][0]
    for c in range(EQ["n_chains"]):
        start = LangevinState(chains["chain_x"][c], chains["chain_v"][c], chains["chain_step"][c])
        traj = plain(system, theta, start, integrator(), EQ["decorrelation_steps"], 20, c)
        found = first_bad_frame(system, theta, traj.x, np.asarray(traj.steps))
        if found is not None:
            firsts.append((found[1], c, found[2]))
    assert firsts, "epoch 1's θ should blow a chain up in its decorrelation segment"
    step, chain, atom = min(firsts)
    assert (err.epoch, err.replica, err.step, err.atom) == (1, chain, step, atom)
    assert str(err).startswith(
        f"epoch 1: equilibrium chains: chain {chain}: the potential energy overflowed at "
        f"step {step} "
    )
    assert "check θ" in str(err) and "(epoch 0) is intact" in str(err)
    print(err)

    before = files_sha256(out)
    seen.clear()
    with pytest.raises(SimulationError) as again:
        fit_equilibrium(
            system, x, integrator(), targets(top), UNSTABLE[0], out_dir=out, resume=True,
            callback=seen.append, **kw,
        )  # fmt: skip
    assert seen == [] and str(again.value) == str(err)
    assert files_sha256(out) == before
