"""Plain and sensitivity Langevin steps per second: backend="cuda" against JAX on one GPU.

    python benchmarks/cuda_bench.py [--json benchmarks/cuda_bench.json] [--quick]

Needs an NVIDIA GPU with CuPy (``pip install 'timemachine[cuda]'``); without one it exits
with status 2 and says why. JAX runs on its default device: for the comparison the issue
asks for (issue 4, "What it must show") that must be the same GPU (a CUDA build of
jaxlib); if JAX only has a CPU the table says so.

Cases:

* ``villin``: the villin headpiece in vacuum (OpenMM's data/test.pdb, water and the two
  Cl⁻ removed: 582 atoms), amber99sbildn, θ = the first ``--params`` (60) torsion
  parameters (phases and force constants of the torsion types).
* ``protein-obc2``: a ~5,000-atom helical peptide (``tm.build_peptide`` on the 20 amino
  acids repeated, ``--residues`` residues, default 308) under OBC2 implicit solvent,
  the same kind of θ.

Variants, each compiled and warmed up first, then timed interleaved (min over repeats,
one host sync per repeat; every step of a repeat runs on the device):

* ``cuda plain``: the CUDA chunk program with no parameters (gradient + Langevin update),
  its steps captured in CUDA graphs (the default).
* ``cuda sens``: the same with dx/dθ carried (gradient, ζ for P tangents, exact mode).
* ``cuda plain/sens direct`` (villin only): the same launched kernel by kernel from
  Python, no graphs, to show what the graphs save.
* ``jax plain``: ``langevin_step`` in a jitted ``fori_loop`` (θ a runtime argument).
* ``jax sens``: ``simulate``'s own jitted chunk program (exact mode, structured ζ).

Goals (issue 4): CUDA sens ≥ 5× faster than JAX sens on the same GPU, and CUDA sens
≤ 4× CUDA plain. Prints a markdown table and writes JSON (atomically) after each case,
so a run stopped at a time limit keeps the cases it finished. ``gpu_check.sh run`` runs
it after the GPU tests.
"""

import argparse
import os
import platform
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sensitivity_bench import plain_program  # noqa: E402  (this folder)

import timemachine as tm  # noqa: E402
from timemachine.backends import cuda_available  # noqa: E402
from timemachine.files import atomic_json  # noqa: E402
from timemachine.integrator.langevin import (  # noqa: E402
    LangevinState,
    langevin_init,
)
from timemachine.sensitivity.program import chunk_program  # noqa: E402
from timemachine.sensitivity.propagation import exact_init  # noqa: E402

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
GOAL_CUDA_OVER_JAX = 5.0  # CUDA sens at least this many times faster than JAX sens
GOAL_SENS_OVER_PLAIN = 4.0  # CUDA sens at most this many CUDA plain steps
DIRECT_BELOW_ATOMS = 2000  # also time launch-by-launch stepping (no CUDA graphs) below this


def villin_structure():
    """(topology, positions nm): OpenMM's test.pdb without water and ions, 582 atoms."""
    import openmm.app as app

    pdb = app.PDBFile(os.path.join(os.path.dirname(app.__file__), "data", "test.pdb"))
    return tm.strip_solvent(pdb.topology, pdb.positions)


def protein_structure(residues):
    """(topology, positions nm): a helix of ``residues`` residues, ~16 atoms each."""
    seq = (AMINO_ACIDS * (residues // len(AMINO_ACIDS) + 1))[:residues]
    return tm.build_peptide(seq)


def load_case(name, residues):
    """(System, minimised positions (N, 3) nm, note) of one benchmark case."""
    if name == "villin":
        structure, solvent = villin_structure(), None
        note = "villin headpiece, vacuum, 582 atoms (test.pdb without water and 2 Cl⁻)"
    else:
        structure, solvent = protein_structure(residues), "obc2"
        note = f"tm.build_peptide helix of {residues} residues, OBC2"
    system, x = tm.load_system(
        structure, forcefield=("amber99sbildn.xml",), implicit_solvent=solvent
    )
    energy, theta = system.energy_fn(), jnp.asarray(system.params)
    x = tm.minimize(
        jax.jit(lambda y: energy(y, theta)),
        jax.jit(jax.grad(lambda y: energy(y, theta))),
        x,
        tolerance=10.0,
        max_iterations=300,
    )
    return system, np.asarray(x), note


def timed(fn):
    """Seconds of one call of ``fn`` (which returns host arrays or JAX arrays)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def run_case(name, n_params, steps, repeats, residues):
    from timemachine.backends import cupy_backend

    system, x, note = load_case(name, residues)
    wrt = system.select("torsion*")[:n_params]
    p = int(wrt.size)
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=0)
    coeffs = integrator.coefficients(system.masses)
    theta = jnp.asarray(system.params)
    seed, replica = jnp.asarray(0, jnp.int64), jnp.asarray(0, jnp.int64)
    start = langevin_init(x, system.masses, integrator)
    one, n = jnp.asarray(1, jnp.int64), jnp.asarray(steps, jnp.int64)

    cuda = {
        "plain": cupy_backend.make_program(system, np.zeros(0, np.int64), "exact"),
        "sens": cupy_backend.make_program(system, wrt, "exact"),
    }
    # launch by launch as well, where the ~20 launches per step from Python could matter
    direct = system.n_atoms < DIRECT_BELOW_ATOMS
    if direct:
        cuda["plain_direct"] = cupy_backend.make_program(
            system, np.zeros(0, np.int64), "exact", graphs=False
        )
        cuda["sens_direct"] = cupy_backend.make_program(system, wrt, "exact", graphs=False)
    cuda_state = {k: exact_init(start.x, start.v, 0 if k.startswith("plain") else p) for k in cuda}
    jax_plain = plain_program(system)
    jax_sens = chunk_program(system, tuple(int(i) for i in wrt), "structured", "exact")
    plain_state = LangevinState(start.x, start.v, start.step)
    sens_state = exact_init(start.x, start.v, p)

    def cuda_run(kind):
        # one block of `steps` steps, one saved frame copied back (simulate's chunk call)
        return cuda[kind](1, cuda_state[kind], 1, steps, theta, coeffs, None, 0, 0)[0].x

    variants = {
        "cuda_plain": lambda: cuda_run("plain"),
        "cuda_sens": lambda: cuda_run("sens"),
        **{
            f"cuda_{k}": (lambda k=k: cuda_run(k))
            for k in ("plain_direct", "sens_direct")
            if direct
        },
        "jax_plain": lambda: jax_plain(plain_state, n, theta, coeffs, seed, replica).x,
        "jax_sens": lambda: (
            jax_sens(1, sens_state, one, n, theta, coeffs, None, seed, replica)[0].x
        ),
    }
    first_s = {v: timed(fn) for v, fn in variants.items()}  # compile + first run
    best = dict.fromkeys(variants, np.inf)
    for _ in range(repeats):
        for v, fn in variants.items():  # interleaved
            best[v] = min(best[v], timed(fn))
    sps = {v: steps / t for v, t in best.items()}
    return {
        "case": name,
        "note": note,
        "n_atoms": system.n_atoms,
        "P": p,
        "steps": steps,
        "repeats": repeats,
        "steps_per_s": sps,
        "cuda_sens_speedup_over_jax_sens": sps["cuda_sens"] / sps["jax_sens"],
        "cuda_sens_cost_over_cuda_plain": sps["cuda_plain"] / sps["cuda_sens"],
        "jax_sens_cost_over_jax_plain": sps["jax_plain"] / sps["jax_sens"],
        "compile_and_first_run_s": first_s,
    }


def markdown(rows):
    lines = [
        "| case | N | P | CUDA plain steps/s | CUDA sens steps/s | JAX plain steps/s "
        "| JAX sens steps/s | CUDA sens / JAX sens (goal ≥ 5) | CUDA sens cost / CUDA plain "
        "(goal ≤ 4) | without graphs: CUDA plain, sens steps/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["steps_per_s"]
        up, cost = r["cuda_sens_speedup_over_jax_sens"], r["cuda_sens_cost_over_cuda_plain"]
        direct = (
            f"{s['cuda_plain_direct']:.0f}, {s['cuda_sens_direct']:.0f}"
            if "cuda_sens_direct" in s
            else "not timed"
        )
        lines.append(
            f"| {r['case']} | {r['n_atoms']} | {r['P']} | {s['cuda_plain']:.0f} "
            f"| {s['cuda_sens']:.0f} | {s['jax_plain']:.0f} | {s['jax_sens']:.0f} "
            f"| {up:.2f} {'✓' if up >= GOAL_CUDA_OVER_JAX else '✗'} "
            f"| {cost:.2f} {'✓' if cost <= GOAL_SENS_OVER_PLAIN else '✗'} | {direct} |"
        )
    return "\n".join(lines)


def gpu_name():
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(here, "cuda_bench.json"))
    parser.add_argument("--quick", action="store_true", help="villin only, 200 steps, 2 repeats")
    parser.add_argument("--cases", nargs="*", choices=["villin", "protein-obc2"], default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per repeat (1000)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (2 with --quick)")
    parser.add_argument("--params", type=int, default=60, help="P, torsion parameters (60)")
    parser.add_argument("--residues", type=int, default=308, help="protein-obc2 size (308)")
    args = parser.parse_args(argv)

    ok, why = cuda_available()
    if not ok:
        print(
            f"cuda_bench: needs an NVIDIA GPU with CuPy for backend='cuda', and none is "
            f"usable here: {why}. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    names = args.cases or (["villin"] if args.quick else ["villin", "protein-obc2"])
    steps = args.steps or (200 if args.quick else 1000)
    repeats = args.repeats or (2 if args.quick else 3)
    jax_dev = jax.devices()[0]
    if jax_dev.platform != "gpu":
        print(
            f"cuda_bench: warning: JAX runs on {jax_dev.platform}, not the GPU: the JAX "
            f"columns are not a same-GPU comparison (install a CUDA build of jaxlib)",
            file=sys.stderr,
        )
    gpu = gpu_name()
    print(f"GPU: {gpu}; JAX device: {jax_dev.platform} ({jax_dev.device_kind}); float64")
    print(f"Langevin 300 K, γ = 1/ps, δt = 1 fs; exact mode; {steps} steps per repeat, "
          f"best of {repeats}, interleaved")  # fmt: skip
    rows = []
    for name in names:
        rows.append(run_case(name, args.params, steps, repeats, args.residues))
        # the table and the JSON after each case, so a run stopped at a time limit keeps
        # the cases it finished
        print()
        print(markdown(rows[-1:]))
        print(f"- {rows[-1]['case']}: {rows[-1]['note']}")
        atomic_json(
            args.json,
            {
                "gpu": gpu,
                "jax_device": f"{jax_dev.platform} ({jax_dev.device_kind})",
                "host": platform.node(),
                "jax_version": jax.__version__,
                "goals": {
                    "cuda_sens_speedup_over_jax_sens_min": GOAL_CUDA_OVER_JAX,
                    "cuda_sens_cost_over_cuda_plain_max": GOAL_SENS_OVER_PLAIN,
                },
                "rows": rows,
            },
        )
    print()
    print(markdown(rows))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
