"""New functional forms added to a force field (the paper's first goal).

Each builder returns a new :class:`~timemachine.System` with a :class:`CustomTerm`: any
JAX-traceable energy with its own named parameters. Forces, Hessian products and mixed
partials then come from autodiff, so the term works in ``simulate``, finite differences
and fitting without further code.

* :func:`replace_bonds_with_morse` — Morse bonds D (1 - exp(-a (r - r0)))² typed like the
  harmonic bonds they replace, with a = sqrt(k / 2D) so the curvature at r0 is unchanged.
* :func:`add_backbone_dihedral_network` — a small neural network correction E_NN(φ, ψ)
  summed over residues, on (sin, cos) of the backbone dihedrals.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError
from timemachine.potentials.bonded import dihedral_angle
from timemachine.system import System


def morse_bond(x, idx, well_depth, a, length):
    """Morse bond energy Σ D (1 - exp(-a (r - r0)))², kJ/mol.

    Args:
      x: (N, 3) nm; idx: (B, 2) atom pairs; well_depth: (B,) D, kJ/mol;
      a: (B,) steepness, 1/nm; length: (B,) r0, nm.
    """
    d = x[idx[:, 1]] - x[idx[:, 0]]
    r = jnp.sqrt(jnp.sum(d * d, axis=-1))
    return jnp.sum(well_depth * (1.0 - jnp.exp(-a * (r - length))) ** 2)


def replace_bonds_with_morse(system: System, well_depth: float = 400.0) -> System:
    """Replace every harmonic bond by a Morse bond of the same type.

    Each bond type ``bond/T/...`` becomes three parameters ``morse/T/D`` (kJ/mol),
    ``morse/T/a`` (1/nm) and ``morse/T/r0`` (nm), initialised from the harmonic (k, r0)
    with a = sqrt(k / (2 D)). The harmonic bond parameters stay in θ but no term uses them.
    """
    if not well_depth > 0:
        raise InputError(f"well_depth must be > 0 kJ/mol, got {well_depth!r}")
    bonds = [t for t in system.terms if t.kind == "bond"]
    if not bonds:
        raise InputError("replace_bonds_with_morse: the system has no harmonic bonds")
    idx = np.concatenate([np.asarray(t.idx) for t in bonds])
    length_index = np.concatenate([np.asarray(t.length_index) for t in bonds])
    k_index = np.concatenate([np.asarray(t.k_index) for t in bonds])
    types, bond_type = np.unique(length_index, return_inverse=True)
    names, values = [], []
    for ti in types:
        key = system.param_names[ti].split("/")[1]
        k = system.params[k_index[length_index == ti][0]]
        names += [f"morse/{key}/D", f"morse/{key}/a", f"morse/{key}/r0"]
        values += [well_depth, np.sqrt(k / (2.0 * well_depth)), system.params[ti]]
    n_types = len(types)

    def energy(x, p):
        p = p.reshape(n_types, 3)[bond_type]
        return morse_bond(x, idx, p[:, 0], p[:, 1], p[:, 2])

    return system.without_terms("bond").add_term(energy, names, values, kind="morse")


def backbone_dihedrals(topology):
    """(φ, ψ) atom quadruplets (R, 2, 4) for residues that have both, in chain order."""
    out = []
    for chain in topology.chains():
        residues = list(chain.residues())
        for prev, res, nxt in zip(residues, residues[1:], residues[2:], strict=False):
            atoms = [{a.name: a.index for a in r.atoms()} for r in (prev, res, nxt)]
            try:
                phi = (atoms[0]["C"], atoms[1]["N"], atoms[1]["CA"], atoms[1]["C"])
                psi = (atoms[1]["N"], atoms[1]["CA"], atoms[1]["C"], atoms[2]["N"])
            except KeyError:
                continue
            out.append((phi, psi))
    return np.array(out, dtype=np.int64).reshape(-1, 2, 4)


def add_backbone_dihedral_network(
    system: System, hidden: int = 8, scale: float = 0.1, seed: int = 0, name: str = "nn_phipsi"
) -> System:
    """Add E_NN = Σ_residues MLP(sin φ, cos φ, sin ψ, cos ψ), a tanh network with one hidden
    layer of ``hidden`` units; weights are parameters ``{name}/W1/i``, ``{name}/b1/i``,
    ``{name}/W2/i``, ``{name}/b2/0`` initialised N(0, scale²) (kJ/mol scale at the output).

    Needs a topology with backbone atoms named N, CA, C (residues with both φ and ψ).
    """
    if system.topology is None:
        raise InputError("add_backbone_dihedral_network needs a System with a topology")
    quads = backbone_dihedrals(system.topology)
    if quads.shape[0] == 0:
        raise InputError("no residue has both backbone dihedrals φ and ψ (need >= 3 residues)")
    shapes = {"W1": (4, hidden), "b1": (hidden,), "W2": (hidden,), "b2": (1,)}
    rng = np.random.default_rng(seed)
    names, values, offsets = [], [], {}
    for part, shape in shapes.items():
        size = int(np.prod(shape))
        offsets[part] = (len(values), shape)
        names += [f"{name}/{part}/{i}" for i in range(size)]
        values += list(rng.normal(scale=scale, size=size))
    phi_idx, psi_idx = quads[:, 0], quads[:, 1]

    def unpack(p, part):
        start, shape = offsets[part]
        return p[start : start + int(np.prod(shape))].reshape(shape)

    def energy(x, p):
        phi, psi = dihedral_angle(x, phi_idx), dihedral_angle(x, psi_idx)
        feats = jnp.stack([jnp.sin(phi), jnp.cos(phi), jnp.sin(psi), jnp.cos(psi)], axis=-1)
        h = jnp.tanh(feats @ unpack(p, "W1") + unpack(p, "b1"))
        return jnp.sum(h @ unpack(p, "W2") + unpack(p, "b2")[0])

    return system.add_term(energy, names, values, kind=name)
