"""Trialanine in TIP3P water, fitted to the Graf et al. 2007 couplings with OpenMM as the
equilibrium sampler, and validated in OpenMM on independent seeds.

    python examples/ala3_tip3p/fit_tip3p.py [--epochs 3] [--chains 4] [--sample-ps 100]
        [--validate-ns 0.4] [--platform CPU] [--out tip3p-out]

The box: ``tm.solvate`` puts amber99sbildn trialanine (zwitterionic, built by
PeptideBuilder) in TIP3P with 1 nm padding (a 2.0 nm box, 227 waters); PME with a 0.9 nm
cutoff, HBond constraints, rigid water, 2 fs steps, 300 K, γ = 1/ps. The fit: the φ/ψ
torsion barriers (``timemachine.nmr_fit.NMR_TORSIONS``, 11 k's) against the 3J and 1J/2J
couplings of Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007), with the
fluctuation estimator, the trust-region Gauss-Newton step and a Gaussian prior of 2 kJ/mol
on each k; each epoch's chains run in OpenMM (``OpenMMSampler``) with θ's torsions written
into the box's System, and ∂E/∂θ is evaluated by the engine on the solute's frames. The
validation: ``validate_sampler`` runs new OpenMM chains (other noise streams) at the
original and at the fitted θ and reports χ²/N with block-jackknife errors. Both numbers
are averages over short chains (a fraction of a ns each at the defaults), estimates of the
equilibrium χ²/N with the standard errors shown; longer ``--validate-ns`` shrinks them.

Writes ``OUT/summary.json`` (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import timemachine as tm
from timemachine.files import atomic_write_text
from timemachine.fitting import OpenMMSampler, graf2007_targets
from timemachine.fitting.validation import validate_sampler
from timemachine.nmr_fit import NMR_TORSIONS


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--sample-ps", type=float, default=100.0, help="production per chain")
    ap.add_argument("--decorrelation-ps", type=float, default=10.0)
    ap.add_argument("--validate-ns", type=float, default=0.4, help="per model, all chains")
    ap.add_argument("--platform", default=None, help="OpenMM platform (default: fastest)")
    ap.add_argument("--threads", type=int, default=None, help="CPU platform threads")
    ap.add_argument("--dt", type=float, default=0.002, help="ps; 0.004 with --hydrogen-mass 4")
    ap.add_argument("--hydrogen-mass", type=float, default=None, help="amu (repartitioning)")
    ap.add_argument("--max-extend", type=int, default=2, help="chain extensions for low ESS")
    ap.add_argument("--save-every", type=int, default=250, help="steps between kept frames")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="tip3p-out")
    args = ap.parse_args()

    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    top, x = tm.build_peptide("AAA")
    box = tm.solvate((top, x), padding=1.0, cutoff=0.9, hydrogen_mass=args.hydrogen_mass)
    n_water = (box.positions.shape[0] - box.solute.n_atoms) // 3
    hmr = "" if args.hydrogen_mass is None else f", H mass {args.hydrogen_mass:g} amu"
    log(f"trialanine in {n_water} TIP3P waters, box {box.box[0]:.2f} nm, PME 0.9 nm, HBonds"
        f"{hmr}, dt {args.dt * 1000:g} fs")  # fmt: skip
    props = {} if args.threads is None else {"Threads": str(args.threads)}
    sampler = OpenMMSampler(box.openmm_system, box.positions, platform=args.platform,
                            properties=props)  # fmt: skip
    integ = tm.LangevinIntegrator(300.0, 1.0, args.dt, seed=args.seed)
    targets = graf2007_targets(box.solute.topology)
    save_every = args.save_every  # 0.5 ps between kept frames at 2 fs
    steps = int(round(args.sample_ps / integ.dt / save_every)) * save_every
    decor = int(round(args.decorrelation_ps / integ.dt / save_every)) * save_every
    log(f"fit on OpenMM ({sampler.platform}): {args.epochs} epochs × {args.chains} chains × "
        f"({decor} + {steps}) steps")  # fmt: skip
    result = tm.fit(box.solute, None, integ, targets, list(NMR_TORSIONS), sampler=sampler,
                    epochs=args.epochs, n_chains=args.chains, sample_steps=steps,
                    decorrelation_steps=decor, save_every=save_every, min_ess=5.0,
                    max_extend=args.max_extend, reservoir_size=1000, prior_sigma=2.0,
                    progress=True)  # fmt: skip
    history = result.history
    log(f"fit done: χ²/N {history[0]['chi2']:.3f} -> {history[-1]['chi2']:.3f} (engine, "
        "the chains' frames)")  # fmt: skip
    validation = {}
    for name, theta in (("original", box.solute.params), ("fitted", result.params)):
        log(f"OpenMM validation of the {name} torsions: {args.validate_ns:g} ns")
        v = validate_sampler(sampler, box.solute, theta, targets,
                             tm.LangevinIntegrator(300.0, 1.0, args.dt, seed=args.seed + 1),
                             time_ns=args.validate_ns, n_seeds=4,
                             equilibration_ps=10.0)  # fmt: skip
        validation[name] = v.to_dict()
    names = [box.solute.param_names[i] for i in box.solute.select(list(NMR_TORSIONS))]
    summary = {
        "system": f"trialanine + {n_water} TIP3P, amber99sbildn, PME 0.9 nm, HBonds{hmr}, "
        f"{args.dt * 1000:g} fs, 300 K",
        "data": "Graf, Nguyen, Stock & Schwalbe, J. Am. Chem. Soc. 129, 1179 (2007)",
        "sampler": f"OpenMM {sampler.platform}",
        "parameters": names,
        "original": result.theta_initial.tolist(),
        "fitted": result.theta.tolist(),
        "engine_chi2_per_n": [r["chi2"] for r in history],
        "engine_chi2_per_n_stderr": [r["chi2_stderr"] for r in history],
        "openmm_validation": validation,
        "settings": vars(args),
        "wall_s": time.perf_counter() - t0,
    }
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))
    print("\n| model | OpenMM χ²/N | ± | ns |")
    print("|---|---|---|---|")
    for name, v in validation.items():
        print(f"| {name} | {v['chi2_per_n']:.3f} | {v['chi2_per_n_stderr']:.3f} | "
              f"{v['simulated_ns']:.2f} |")  # fmt: skip
    width = max(map(len, names))
    for n, a, b in zip(names, result.theta_initial, result.theta, strict=True):
        print(f"  {n:<{width}}  {a:8.4f} -> {b:8.4f}")
    print(f"wrote {args.out}/summary.json; {np.round(summary['wall_s'] / 60, 1)} min")


if __name__ == "__main__":
    main()
