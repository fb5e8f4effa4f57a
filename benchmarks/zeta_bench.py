"""Cost of ζ = H·dx/dθ + ∂²E/∂x∂θ against one gradient, structured and reference paths.

    python benchmarks/zeta_bench.py [--json benchmarks/zeta_bench.json] [--repeats 20]

Cases: villin headpiece (OpenMM's data/test.pdb, solvent stripped, 582 atoms) in vacuum
with every proper-torsion k; trialanine (33 atoms) under OBC2 with every torsion k;
``--all`` adds villin under OBC2. ``gradient+ζ`` is ``make_gradient_and_zeta`` (both at
one x: the core of a sensitivity step, whose plain counterpart is the gradient). Each
time is the median of ``--repeats`` calls of a jitted function after a warm-up call, with
``block_until_ready``. Prints a markdown table and writes the numbers (with the device
and |ζ_structured - ζ_reference| / |ζ_reference|) as JSON.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timemachine as tm  # noqa: E402
from timemachine.sensitivity.zeta import make_gradient_and_zeta, make_zeta  # noqa: E402


def villin_structure():
    import openmm.app as app

    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    return tm.strip_solvent(pdb.topology, pdb.positions)


CASES = {
    "villin-vacuum": (villin_structure, None, "torsion/*/k*"),
    "trialanine-obc2": (lambda: tm.build_peptide("AAA"), "obc2", "torsion/*/k*"),
    "villin-obc2": (villin_structure, "obc2", "torsion/*/k*"),
}


def median_ms(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run_case(name, repeats, reference_repeats):
    build, solvent, pattern = CASES[name]
    system, x = tm.load_system(build(), forcefield=("amber99sbildn.xml",), implicit_solvent=solvent)
    wrt = system.select(pattern)
    x = jnp.asarray(x)
    theta = jnp.asarray(system.params)
    dx = jnp.asarray(np.random.default_rng(0).normal(scale=1e-3, size=(len(wrt),) + x.shape))
    gradient = jax.jit(jax.grad(system.energy_fn()))
    structured = jax.jit(make_zeta(system, wrt))
    reference = jax.jit(make_zeta(system, wrt, method="reference"))
    joint = jax.jit(make_gradient_and_zeta(system, wrt))
    row = {
        "case": name,
        "n_atoms": system.n_atoms,
        "P": int(len(wrt)),
        "wrt": pattern,
        "gradient_ms": median_ms(gradient, x, theta, repeats=repeats),
        "structured_ms": median_ms(structured, x, theta, dx, repeats=repeats),
        "gradient_and_zeta_ms": median_ms(joint, x, theta, dx, repeats=repeats),
        "reference_ms": median_ms(reference, x, theta, dx, repeats=reference_repeats),
    }
    zs, zr = structured(x, theta, dx), reference(x, theta, dx)
    row["rel_err"] = float(jnp.linalg.norm(zs - zr) / jnp.linalg.norm(zr))
    row["structured_over_gradient"] = row["structured_ms"] / row["gradient_ms"]
    row["gradient_and_zeta_over_gradient"] = row["gradient_and_zeta_ms"] / row["gradient_ms"]
    row["reference_over_gradient"] = row["reference_ms"] / row["gradient_ms"]
    row["reference_over_structured"] = row["reference_ms"] / row["structured_ms"]
    return row


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(here, "zeta_bench.json"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--all", action="store_true", help="also villin under OBC2")
    parser.add_argument("--cases", nargs="*", choices=sorted(CASES), default=None)
    args = parser.parse_args(argv)
    names = args.cases or (list(CASES) if args.all else ["villin-vacuum", "trialanine-obc2"])
    rows = [run_case(n, args.repeats, args.reference_repeats) for n in names]
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, float64\n")
    print(
        "| case | N | P | gradient ms | structured ζ ms | reference ζ ms "
        "| structured/gradient | (gradient+ζ)/gradient | reference/gradient | rel err |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['n_atoms']} | {r['P']} | {r['gradient_ms']:.3f} "
            f"| {r['structured_ms']:.3f} | {r['reference_ms']:.3f} "
            f"| {r['structured_over_gradient']:.2f} "
            f"| {r['gradient_and_zeta_over_gradient']:.2f} | {r['reference_over_gradient']:.1f} "
            f"| {r['rel_err']:.1e} |"
        )
    out = {
        "device": f"{device.platform} ({device.device_kind})",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "repeats": args.repeats,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
