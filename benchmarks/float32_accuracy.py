"""Float32 against float64: energies, forces, dx/dθ and fit gradients (issue 18, part 6).

    python benchmarks/float32_accuracy.py [--json benchmarks/float32_accuracy.json]
                                          [--quick] [--systems trialanine villin]

Each number is max |float32 − float64| / max |float64| over the entries compared (atoms
and components, parameters, or observables × parameters): the same relative measure as
``timemachine.precision.FLOAT32_TOLERANCES``, which the tests hold float32 to.

Systems (amber99sbildn + OBC2, minimised in float64 first):

* ``trialanine``: Ala-Ala-Ala built by ``tm.build_peptide`` (33 atoms); θ the φ and ψ
  barriers (``torsion/C-N-CT-C/k*``, ``torsion/N-CT-C-N/k*``); targets the seven ³J
  couplings of Graf et al. 2007 (``tm.fitting.graf2007_targets``).
* ``villin``: the HP35 headpiece of ``examples/rg_villin`` (582 atoms, OpenMM's test.pdb
  without its water); the same θ; target the Cα radius of gyration of that example.

Rows:

* ``energy``, ``forces``: one evaluation at a thermal configuration (the end of the
  float64 run below) rounded to float32 (the float32 system's constants, θ and
  positions), against float64 at the same rounded positions, so only the arithmetic
  differs. (At the minimum itself the net forces are the cancellation of terms ~10³
  times larger, and a relative error of them measures that cancellation.)
* ``x``, ``dx/dθ``: ``tm.simulate`` 200 steps of 1.5 fs (0.3 ps, 300 K, γ = 1/ps, exact
  mode, one saved frame) from the same start with the same seed; the final frame.
* ``fit gradient (pathwise)``: ``tm.fit(estimator="pathwise")``, one epoch of 4 replicas
  × 200 steps: the loss gradient dL/dθ of that epoch.
* ``fit gradient (fluctuation)``: ``fit_equilibrium``, one epoch of 2 chains (plain MD in
  float32 or float64 from the same start and seed; the chains part after a few ps, as any
  two chaotic trajectories do): dL/dθ, and its difference in units of the float64
  estimate's standard error (the sampling noise a fit sees), which is the meaningful
  comparison here.

Prints a markdown table and writes JSON atomically (the numbers for docs/float32.md).
"""

import argparse
import json
import os
import platform
import sys
import time
import warnings

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import timemachine as tm  # noqa: E402
from timemachine.files import atomic_write_text  # noqa: E402
from timemachine.fitting.equilibrium import fit_equilibrium  # noqa: E402
from timemachine.fitting.targets import graf2007_targets, targets_from_specs  # noqa: E402
from timemachine.precision import (  # noqa: E402
    FLOAT32_TOLERANCES,
    Float32Warning,
    cast_floats,
    cast_system,
)
from timemachine.structured import gradient_fn  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VILLIN_PDB = os.path.join(HERE, "..", "examples", "rg_villin", "villin_hp35.pdb")
WRT = ["torsion/C-N-CT-C/k*", "torsion/N-CT-C-N/k*"]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / (scale if scale > 0 else 1.0))


def load(name):
    """(system, minimised x (N, 3) nm, targets) of a benchmark system."""
    if name == "trialanine":
        top, x = tm.build_peptide("AAA")
        system, x = tm.load_system((top, x), implicit_solvent="obc2")
        targets = graf2007_targets(system.topology)
    else:
        system, x = tm.load_system(VILLIN_PDB, implicit_solvent="obc2")
        spec = {"name": "Rg(CA)", "type": "Rg", "atoms": "name CA", "mass_weighted": False,
                "value": 0.850, "uncertainty": 0.05}  # fmt: skip
        targets = targets_from_specs([spec], system.topology)
    return system, np.asarray(tm.minimize_system(system, x)), targets


def energy_and_forces(system, x):
    """(relative error of E, of the forces) at x rounded to float32."""
    x32 = np.asarray(x, np.float32)
    theta = np.asarray(system.params)
    e64 = float(system.energy_fn()(x32.astype(np.float64), theta))
    g64 = np.asarray(gradient_fn(system)(x32.astype(np.float64), theta))
    s32 = cast_system(system, np.float32)
    t32 = cast_floats(theta, np.float32)
    e32 = jax.jit(s32.energy_fn())(x32, t32)
    g32 = jax.jit(gradient_fn(s32))(x32, t32)
    assert e32.dtype == np.float32 and g32.dtype == np.float32, (e32.dtype, g32.dtype)
    return abs(float(e32) - e64) / abs(e64), rel(g32, g64), e64


def pathwise(system, x, steps):
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=1)
    out = {}
    for p in ("float64", "float32"):
        t0 = time.perf_counter()
        traj = tm.simulate(system, x, integ, steps, wrt=WRT, save_every=steps, precision=p)
        out[p] = (np.asarray(traj.x[-1]), np.asarray(traj.dx_dtheta[-1]),
                  time.perf_counter() - t0)  # fmt: skip
        assert traj.x.dtype == np.dtype(p), traj.x.dtype
    return out


def fit_gradients(system, x, targets, steps, sample_steps):
    integ = tm.LangevinIntegrator(300.0, 1.0, 0.0015, seed=2)
    out = {}
    for p in ("float64", "float32"):
        res = tm.fit(system, x, integ, targets, wrt=WRT, estimator="pathwise", epochs=1,
                     n_replicas=4, n_steps=steps, progress=False, precision=p)  # fmt: skip
        out[f"pathwise {p}"] = np.asarray(res.history[0]["gradient"])
        res = fit_equilibrium(system, x, integ, targets, WRT, epochs=1, n_chains=2,
                              sample_steps=sample_steps, decorrelation_steps=sample_steps // 5,
                              save_every=50, blocks=5, min_ess=1.0, progress=False,
                              precision=p)  # fmt: skip
        rec = res.history[0]
        out[f"fluct {p}"] = np.asarray(rec["gradient"])
        out[f"fluct se {p}"] = np.asarray(rec["gradient_stderr"])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(HERE, "float32_accuracy.json"))
    ap.add_argument("--quick", action="store_true", help="fewer sampling steps")
    ap.add_argument("--systems", nargs="+", default=["trialanine", "villin"])
    args = ap.parse_args()
    warnings.simplefilter("ignore", Float32Warning)
    sample_steps = 2000 if args.quick else 10000
    rows, record = (
        [],
        {
            "machine": platform.platform(),
            "jax": jax.__version__,
            "cpu_count": os.cpu_count(),
            "tolerances": FLOAT32_TOLERANCES,
            "systems": {},
        },
    )
    for name in args.systems:
        t0 = time.perf_counter()
        system, x, targets = load(name)
        traj = pathwise(system, x, 200)
        e_rel, f_rel, e64 = energy_and_forces(system, traj["float64"][0])
        g = fit_gradients(system, x, targets, 200, sample_steps)
        fl_diff = np.abs(g["fluct float32"] - g["fluct float64"])
        fl_sigma = float(np.max(fl_diff / np.maximum(g["fluct se float64"], 1e-300)))
        r = {
            "n_atoms": system.n_atoms,
            "n_params": int(system.resolve_wrt(WRT).size),
            "energy_kj_mol": e64,
            "energy": e_rel,
            "forces": f_rel,
            "x": rel(traj["float32"][0], traj["float64"][0]),
            "dx_dtheta": rel(traj["float32"][1], traj["float64"][1]),
            "simulate_s": {p: traj[p][2] for p in ("float64", "float32")},
            "fit_gradient_pathwise": rel(g["pathwise float32"], g["pathwise float64"]),
            "fit_gradient_fluctuation": rel(g["fluct float32"], g["fluct float64"]),
            "fit_gradient_fluctuation_max_sigma": fl_sigma,
            "fluctuation_sample_steps": sample_steps,
            "wall_s": time.perf_counter() - t0,
        }
        record["systems"][name] = r
        rows.append((name, r))
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
        print(f"{name}: done in {r['wall_s']:.0f} s", file=sys.stderr)

    print("| system | atoms | P | energy | forces | x (0.3 ps) | dx/dθ (0.3 ps) | "
          "fit grad, pathwise | fit grad, fluctuation (max σ) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['n_atoms']} | {r['n_params']} | {r['energy']:.1e} | "
            f"{r['forces']:.1e} | {r['x']:.1e} | {r['dx_dtheta']:.1e} | "
            f"{r['fit_gradient_pathwise']:.1e} | {r['fit_gradient_fluctuation']:.1e} "
            f"({r['fit_gradient_fluctuation_max_sigma']:.2f} σ) |"
        )
    print(f"tolerances: {FLOAT32_TOLERANCES}; JSON: {args.json}")


if __name__ == "__main__":
    main()
