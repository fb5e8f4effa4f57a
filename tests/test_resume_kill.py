"""Kill a run with SIGKILL at random moments, resume it until it finishes, and get the bits
of an uninterrupted run (issue 18): ``tm.simulate(..., out_dir=D, resume=True)``,
``tm.fit(..., resume=True)`` (pathwise) and ``fit_equilibrium(..., resume=True)`` (its
chains and stored frames included), on trialanine in vacuum on the JAX CPU backend.

Each job runs in a subprocess: this file is also the worker (``python
tests/test_resume_kill.py JOB OUT HOME``); job ``cli`` is ``timemachine simulate CONFIG
--resume`` and job ``fitcli`` is ``timemachine fit CONFIG --resume`` (the whole fit job:
checkpoints, fitted.xml, history, summary), both through ``timemachine.cli.main``. The
worker prints ``READY`` once it has built the system (the command-line jobs: before they
build it), then runs the job with ``resume=True`` and writes what it produced to
``HOME/JOB-result.npz``. The driver kills it at seeded random times after ``READY``, and
also, with ``TIMEMACHINE_SLOW_WRITES`` set (every rename waits), the moment a temporary
file appears in ``OUT``: inside a checkpoint or chunk write, between its staging and its
rename, and between the renames of a checkpoint's npz and its JSON record. It then runs
the worker again until it exits cleanly and compares every array with ``np.array_equal``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_WRITES = "0.15"  # s each rename waits in the killed runs: a window to kill inside


# --------------------------------------------------------------------------- worker


def _system(cache):
    import timemachine as tm

    top, x = tm.build_peptide("AAA")
    system, x = tm.load_system((top, x))
    if os.path.isfile(cache):
        x = np.load(cache)
    else:
        x = np.asarray(tm.minimize_system(system, x))
        np.save(cache + ".tmp.npy", x)
        os.replace(cache + ".tmp.npy", cache)
    return tm, top, system, x


def _save(path, **arrays):
    np.savez(path + ".tmp.npz", **arrays)
    os.replace(path + ".tmp.npz", path)


def _history_arrays(history):
    """The epoch records without their wall times, as one JSON string array."""
    stripped = [{k: v for k, v in r.items() if k != "wall_s"} for r in history]
    return np.array(json.dumps(stripped, sort_keys=True))


CONFIG = """
[system]
sequence = "AAA"
forcefield = ["amber99sbildn.xml"]

[integrator]
temperature = 300.0
dt = 0.002
seed = 7

[parameters]
wrt = ["torsion/*/k*"]

[simulate]
steps = 800
save_every = 10

[output]
dir = "{dir}"
"""


FIT_CONFIG = """
[system]
sequence = "AAA"

[integrator]
seed = 3

[parameters]
wrt = ["torsion/C-N-CT-C/k*"]

[[targets.entry]]
name = "Rg"
type = "Rg"
atoms = "name CA"
value = 0.35
uncertainty = 0.02

[sampling]
chains = 2
sample_steps = 1000
decorrelation_steps = 200
save_every = 50
min_ess = 2.0

[optimizer]
epochs = 5

[validation]
ns = 0.0

[output]
dir = "{dir}"
"""


def _without_wall_times(value):
    """A JSON value with every ``wall_s`` / ``fit_wall_s`` entry removed, at any depth."""
    if isinstance(value, dict):
        return {
            k: _without_wall_times(v) for k, v in value.items() if k not in ("wall_s", "fit_wall_s")
        }
    if isinstance(value, list):
        return [_without_wall_times(v) for v in value]
    return value


def _fit_cli(out, home, result):
    """``timemachine fit CONFIG --resume`` into ``out``; its result: the history and the
    checkpoint's record without wall times, the fitted θ, fitted.xml and the checkpoint's
    arrays."""
    from timemachine.cli import main

    config = os.path.join(home, os.path.basename(out) + "-fit.toml")
    with open(config, "w") as fh:
        fh.write(FIT_CONFIG.format(dir=out))
    print("READY", flush=True)
    assert main(["fit", config, "--resume", "--quiet"]) in (0, None)

    def read_json(name):
        with open(os.path.join(out, name)) as fh:
            return _without_wall_times(json.load(fh))

    summary = read_json("summary.json")
    with open(os.path.join(out, "fitted.xml")) as fh:
        fitted_xml = fh.read()
    with np.load(os.path.join(out, "checkpoint.npz")) as z:
        arrays = {f"checkpoint_{k}": z[k] for k in z.files}
    _save(
        result, fitted=np.asarray(summary["fitted"]), fitted_xml=np.array(fitted_xml),
        history=np.array(json.dumps(read_json("history.json"), sort_keys=True)),
        checkpoint_meta=np.array(json.dumps(read_json("checkpoint.json")["meta"], sort_keys=True)),
        **arrays,
    )  # fmt: skip


def worker(job, out, home):
    result = os.path.join(home, f"{job}-result.npz")
    if job == "fitcli":
        return _fit_cli(out, home, result)
    if job == "cli":  # timemachine simulate CONFIG --resume; out is its sensitivity/ folder
        from timemachine.cli import main
        from timemachine.sensitivity.frames import SensitivityTrajectory

        config = os.path.join(home, os.path.basename(os.path.dirname(out)) + ".toml")
        with open(config, "w") as fh:
            fh.write(CONFIG.format(dir=os.path.dirname(out)))
        print("READY", flush=True)
        assert main(["simulate", config, "--resume", "--quiet"]) in (0, None)
        traj = SensitivityTrajectory.load(out)
        _save(result, x=np.asarray(traj.x), dx_dtheta=np.asarray(traj.dx_dtheta),
              steps=traj.steps, final_dx=np.asarray(traj.final_state.dx_dtheta))  # fmt: skip
        return
    tm, top, system, x = _system(os.path.join(home, "x0.npy"))
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.002, seed=7)
    print("READY", flush=True)
    if job == "simulate":
        traj = tm.simulate(
            system, x, integrator, 1200, wrt="torsion/*/k*", save_every=10, chunk_steps=50,
            out_dir=out, resume=True, progress=False,
        )  # fmt: skip
        s = traj.final_state
        _save(
            result, x=np.asarray(traj.x), v=np.asarray(traj.v),
            dx_dtheta=np.asarray(traj.dx_dtheta), steps=traj.steps,
            potential_energy=traj.potential_energy, kinetic_energy=traj.kinetic_energy,
            final_x=np.asarray(s.x), final_v=np.asarray(s.v),
            final_dx=np.asarray(s.dx_dtheta), final_dv=np.asarray(s.dv_dtheta),
            final_step=np.asarray(s.step),
        )  # fmt: skip
        return
    from timemachine.fitting import JCoupling3HNHA, make_target

    targets = [make_target(JCoupling3HNHA(top), [5.68, 6.52], 0.36, name="3J(HN,HA)")]
    if job == "fit":
        r = tm.fit(
            system, x, integrator, targets, "torsion/C-N-CT-C/k*", estimator="pathwise",
            epochs=8, n_replicas=4, n_steps=100, learning_rate=0.05, out_dir=out,
            resume=True, progress=False,
        )  # fmt: skip
    else:
        from timemachine.fitting.equilibrium import fit_equilibrium

        r = fit_equilibrium(
            system, x, integrator, targets, "torsion/C-N-CT-C/k*", epochs=5, n_chains=2,
            sample_steps=2_000, decorrelation_steps=200, save_every=20, blocks=5,
            min_ess=1.0, reweight_threshold=0.5, trust_radius=0.5, out_dir=out,
            resume=True, progress=False,
        )  # fmt: skip
    _save(result, params=r.params, theta=r.theta, history=_history_arrays(r.history))


# --------------------------------------------------------------------------- driver


def _env(slow):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("TIMEMACHINE_SLOW_WRITES", None)
    if slow:
        env["TIMEMACHINE_SLOW_WRITES"] = SLOW_WRITES
    return env


def _start(job, out, slow, log, home):
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), job, str(out), str(home)],
        stdout=subprocess.PIPE,
        stderr=open(log, "w"),  # noqa: SIM115 (closed with the process)
        text=True,
        env=_env(slow),
        cwd=ROOT,
    )


def _wait_ready(proc, log):
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.wait()
        raise AssertionError(f"worker did not start: {open(log).read()[-3000:]}")
    return time.perf_counter()


def _finish(proc, log, timeout=300):
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"worker failed (rc {rc}):\n{open(log).read()[-4000:]}"


def reference(job, workdir):
    """The uninterrupted run: (its result arrays, seconds of work after READY)."""
    out = workdir / "reference" / ("sensitivity" if job == "cli" else "")
    log = workdir / "reference.log"
    proc = _start(job, out, slow=False, log=log, home=workdir)
    t0 = _wait_ready(proc, log)
    _finish(proc, log)
    work = time.perf_counter() - t0
    os.replace(workdir / f"{job}-result.npz", workdir / "reference-result.npz")
    with np.load(workdir / "reference-result.npz") as z:
        return {k: z[k] for k in z.files}, work


def _snapshot(out):
    """{name: mtime} of the folder's files, temporary ones and meta.json left out."""
    if not out.exists():
        return {}
    names = [n for n in os.listdir(out) if not n.startswith(".tmp-") and n != "meta.json"]
    out_ = {}
    for n in names:
        try:
            out_[n] = os.stat(out / n).st_mtime_ns
        except FileNotFoundError:
            pass
    return out_


def _temporaries(out, stale=()):
    """The temporary files in ``out`` (a write under way), less the ``stale`` ones that a
    killed attempt left."""
    try:
        return [n for n in os.listdir(out) if n.startswith(".tmp-") and n not in stale]
    except FileNotFoundError:
        return []


def _wait(proc, until, timeout=60.0):
    deadline = time.perf_counter() + timeout
    while proc.poll() is None and time.perf_counter() < deadline and not until():
        time.sleep(0.003)


def _inside(out, stale, name):
    """Whether the write of ``name`` is under way: its temporary file is there. For a
    checkpoint's JSON (``*.json`` beside ``*.npz``): between the renames of the two, its
    temporary there and the npz's gone (both are staged before either is renamed)."""
    fresh = _temporaries(out, stale)
    if not any(name in n for n in fresh):
        return False
    if name.endswith(".json"):
        npz = name[: -len(".json")] + ".npz"
        return not any(npz in n for n in fresh)
    return True


def killed_then_resumed(job, workdir, n_kills, seed, span, plan=None):
    """Run ``job`` into one folder, SIGKILL it ``n_kills`` times (seeded), then let it
    finish; returns (its result arrays, one dict per kill: how, when and what the folder
    held, the stderr of every attempt).

    Each attempt first waits for the run's first progress on disk (a chunk or checkpoint
    written by this attempt: the compilation is behind it), then kills either after a
    random delay of up to ``span`` seconds ("time") or, after a random number of further
    writes, the moment a temporary file appears ("write": inside a write). ``plan``, one
    entry per kill, names the moments instead: "time", or the file whose write to kill
    (``_inside``: "state.npz" inside a checkpoint before its renames, "state.json"
    between them, "chunk_" inside a chunk's)."""
    rng = random.Random(seed)
    out = workdir / "killed" / ("sensitivity" if job == "cli" else "")
    events, logs = [], []
    if plan is not None:
        n_kills = len(plan)
    for i in range(n_kills):
        log = workdir / f"attempt-{i}.log"
        logs.append(log)
        mode = "write" if i % 2 else "time"  # alternate: random moments, and inside writes
        if plan is not None:
            mode = plan[i]
        proc = _start(job, out, slow=True, log=log, home=workdir)
        t0 = _wait_ready(proc, log)
        before, stale = _snapshot(out), set(_temporaries(out))
        if i:  # the first attempt may die anywhere, even before its first write
            _wait(proc, lambda before=before: _snapshot(out) != before)
        if mode == "time":
            time.sleep(rng.uniform(0.0, span))
        elif mode != "write":  # the moment the named write is under way
            _wait(proc, lambda stale=stale, mode=mode: _inside(out, stale, mode))
        else:
            for _ in range(rng.randrange(0, 4)):  # let a few writes pass
                _wait(proc, lambda stale=stale: _temporaries(out, stale))
                _wait(proc, lambda stale=stale: not _temporaries(out, stale))
            _wait(proc, lambda stale=stale: _temporaries(out, stale))
        held = sorted(os.listdir(out)) if out.exists() else []
        if proc.poll() is not None:  # it finished before the kill
            _finish(proc, log)
            events.append({"mode": mode, "killed": False})
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        events.append(
            {
                "mode": mode,
                "killed": True,
                "after_s": round(time.perf_counter() - t0, 3),
                "in_write": bool([n for n in held if n.startswith(".tmp-") and n not in stale]),
                "held": held,
            }
        )
    log = workdir / "final.log"
    logs.append(log)
    proc = _start(job, out, slow=False, log=log, home=workdir)
    _wait_ready(proc, log)
    _finish(proc, log)
    with np.load(workdir / f"{job}-result.npz") as z:
        result = {k: z[k] for k in z.files}
    return result, events, [open(p).read() for p in logs]


def _check(job, tmp_path, n_kills, seed, span, plan=None):
    ref, work = reference(job, tmp_path)
    got, events, stderr = killed_then_resumed(job, tmp_path, n_kills, seed, span, plan)
    n_kills = len(plan) if plan is not None else n_kills
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert np.array_equal(got[key], ref[key]), f"{job}: {key} differs after the kills"
    killed = [e for e in events if e["killed"]]
    fallbacks = sum("resuming from the previous checkpoint" in e for e in stderr)
    print(f"{job}: {len(killed)} kills ({sum(e['in_write'] for e in killed)} inside a write, "
          f"{fallbacks} resumes from the previous checkpoint), uninterrupted work {work:.1f} s: "
          f"{json.dumps(events)}")  # fmt: skip
    # the kills did happen, and some inside a write
    assert len(killed) >= n_kills - 1, events
    assert any(e["in_write"] for e in killed), events
    return killed, stderr


# simulate's kills, each at a distinct moment: anywhere (the first attempt: even before its
# first write), inside a chunk's write, inside a checkpoint's before either rename,
# between the renames of its npz and its JSON, and at a random moment after progress
SIMULATE_PLAN = ("time", "chunk_", "state.npz", "state.json", "time")


def _check_plan(job, tmp_path, seed, span, plan, record):
    """Run ``job`` killed once at each moment of ``plan`` (``_check``), then check that
    each write-targeted kill landed inside the write it was meant for, that the run was
    continued rather than restarted (some kill came after a ``record`` JSON was written),
    and that the kill between the renames left a torn pair the resume fell back from."""
    killed, stderr = _check(job, tmp_path, None, seed=seed, span=span, plan=plan)
    assert len(killed) == len(plan), killed
    for e, want in zip(killed, plan, strict=True):
        if want != "time":  # killed inside the write it was meant for
            fresh = [n for n in e["held"] if n.startswith(".tmp-") and want in n]
            assert e["in_write"] and fresh, (want, e)
    assert any(f"{record}.json" in e["held"] for e in killed)
    assert any("resuming from the previous checkpoint" in e for e in stderr), stderr[-1][-3000:]


def test_simulate_killed_at_each_kind_of_moment_resumes_bitwise(tmp_path):
    _check_plan("simulate", tmp_path, 18, 1.5, SIMULATE_PLAN, "state")


# a fit's kills, each at a distinct moment (as simulate's): anywhere, inside a checkpoint's
# write before either rename, and between the renames of its npz and its JSON
FIT_PLAN = ("time", "checkpoint.npz", "checkpoint.json")


@pytest.mark.slow
def test_pathwise_fit_killed_at_each_kind_of_moment_resumes_bitwise(tmp_path):
    _check_plan("fit", tmp_path, 19, 1.0, FIT_PLAN, "checkpoint")


@pytest.mark.slow
def test_equilibrium_fit_killed_at_each_kind_of_moment_resumes_bitwise(tmp_path):
    _check_plan("equilibrium", tmp_path, 20, 2.0, FIT_PLAN, "checkpoint")


@pytest.mark.slow
def test_the_command_line_killed_twice_resumes_bitwise(tmp_path):
    killed, _ = _check("cli", tmp_path, n_kills=2, seed=21, span=1.0)


@pytest.mark.slow
def test_the_fit_command_line_killed_three_times_resumes_bitwise(tmp_path):
    killed, _ = _check("fitcli", tmp_path, n_kills=3, seed=22, span=3.0)
    # the fit was continued, not restarted: some kill landed after an epoch's checkpoint
    assert any("checkpoint.npz" in e["held"] for e in killed)


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3])
