"""Force matching: fit θ to reference energies and forces on a set of structures.

The paper's bootstrap for a new functional form: before fitting ensemble observables,
match quantum-chemistry energies and forces on S structures. With model energies
E_s(θ) and forces F_s(θ) = -∇_x E(x_s; θ)::

    L(θ) = w_E · mean_s ((E_s - E_ref,s - c) / σ_E)²  +  w_F · mean_{s,i,d} ((F_s - F_ref,s) / σ_F)²

where c is the mean of E_s - E_ref,s when ``center_energies`` (reference energies have an
arbitrary zero) and 0 otherwise. Its gradient comes from JAX: dE/dθ for the energy part
and the mixed partials ∂²E/∂x∂θ for the force part, summed over the structures.

Reference data is read from ``.npz`` (positions (S, N, 3) nm, energies (S,) kJ/mol,
forces (S, N, 3) kJ/mol/nm; OpenMM units) or extended XYZ (``.xyz``/``.extxyz``; Å, eV,
eV/Å as written by ASE and most QM codes, converted on reading).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.errors import InputError, MissingFileError
from timemachine.system import System

__all__ = [
    "EV_TO_KJ_PER_MOL",
    "ForceMatchingLoss",
    "ReferenceData",
    "load_reference",
    "read_extxyz",
    "write_extxyz",
]

EV_TO_KJ_PER_MOL = 96.48533212331002  # CODATA 2018: e·N_A / 1000
ANGSTROM = 0.1  # nm


class ReferenceData(NamedTuple):
    """Reference structures in OpenMM units.

    Attributes:
        positions: (S, N, 3) nm.
        energies: (S,) kJ/mol, or None.
        forces: (S, N, 3) kJ/mol/nm, or None.
        source: where it came from (for messages).
    """

    positions: np.ndarray
    energies: np.ndarray | None
    forces: np.ndarray | None
    source: str = "in memory"


def _check_reference(ref: ReferenceData) -> ReferenceData:
    x = np.asarray(ref.positions, dtype=np.float64)
    where = ref.source
    if x.ndim != 3 or x.shape[2] != 3 or x.shape[0] == 0:
        raise InputError(f"{where}: positions must have shape (S, N, 3), got {x.shape}")
    e = None if ref.energies is None else np.asarray(ref.energies, dtype=np.float64)
    f = None if ref.forces is None else np.asarray(ref.forces, dtype=np.float64)
    if e is None and f is None:
        raise InputError(f"{where}: needs energies, forces, or both")
    if e is not None and e.shape != (x.shape[0],):
        raise InputError(f"{where}: energies must have shape ({x.shape[0]},), got {e.shape}")
    if f is not None and f.shape != x.shape:
        raise InputError(f"{where}: forces must have shape {x.shape}, got {f.shape}")
    for name, arr in (("positions", x), ("energies", e), ("forces", f)):
        if arr is not None and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0]
            raise InputError(f"{where}: {name}{list(bad)} is {arr[tuple(bad)]}")
    return ReferenceData(x, e, f, where)


def _read_npz(path) -> ReferenceData:
    with np.load(path) as data:
        if "positions" not in data:
            raise InputError(
                f"{path!r} has no 'positions' array (found {sorted(data.files)}); expected "
                "positions (S, N, 3) nm, energies (S,) kJ/mol, forces (S, N, 3) kJ/mol/nm"
            )
        return ReferenceData(
            data["positions"],
            data["energies"] if "energies" in data else None,
            data["forces"] if "forces" in data else None,
            f"reference file {path!r}",
        )


def _parse_comment(line):
    """key=value pairs of an extended-XYZ comment line (values may be quoted)."""
    out, i, n = {}, 0, len(line)
    while i < n:
        while i < n and line[i].isspace():
            i += 1
        j = i
        while j < n and line[j] not in "= \t":
            j += 1
        key = line[i:j]
        if not key:
            break
        if j < n and line[j] == "=":
            j += 1
            if j < n and line[j] in "\"'":
                q = line[j]
                k = line.index(q, j + 1)
                value, j = line[j + 1 : k], k + 1
            else:
                k = j
                while k < n and not line[k].isspace():
                    k += 1
                value, j = line[j:k], k
        else:
            value = True
        out[key.lower()] = value
        i = j
    return out


def read_extxyz(path, energy_key="energy", forces_key="forces") -> ReferenceData:
    """Read an extended XYZ file (Å, eV, eV/Å, as ASE writes) into OpenMM units.

    Each frame: a line with N, a comment line with ``key=value`` pairs (the energy under
    ``energy_key``; ``Properties=species:S:1:pos:R:3:forces:R:3``), then N atom lines.

    Returns:
        ``ReferenceData`` with positions in nm, energies in kJ/mol, forces in kJ/mol/nm.
    """
    path = os.fspath(path)
    with open(path) as fh:
        lines = fh.read().splitlines()
    xs, es, fs, i, frame = [], [], [], 0, 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        where = f"{path}, frame {frame} (line {i + 1})"
        try:
            n = int(lines[i].split()[0])
        except ValueError:
            raise InputError(f"{where}: expected the number of atoms, got {lines[i]!r}") from None
        info = _parse_comment(lines[i + 1] if i + 1 < len(lines) else "")
        props = info.get("properties", "species:S:1:pos:R:3")
        fields, cols, k = props.split(":"), {}, 0
        for name, kind, width in zip(fields[::3], fields[1::3], fields[2::3], strict=True):
            cols[name.lower()] = (k, int(width), kind)
            k += int(width)
        if "pos" not in cols:
            raise InputError(f"{where}: Properties={props!r} has no 'pos' column")
        rows = [ln.split() for ln in lines[i + 2 : i + 2 + n]]
        if len(rows) != n or any(len(r) < k for r in rows):
            raise InputError(f"{where}: expected {n} atom lines with {k} columns")
        c, w, _ = cols["pos"]
        xs.append(np.array([[float(v) for v in r[c : c + w]] for r in rows]) * ANGSTROM)
        if forces_key in cols:
            c, w, _ = cols[forces_key]
            fs.append(
                np.array([[float(v) for v in r[c : c + w]] for r in rows])
                * EV_TO_KJ_PER_MOL
                / ANGSTROM
            )
        if energy_key in info:
            es.append(float(info[energy_key]) * EV_TO_KJ_PER_MOL)
        i += 2 + n
        frame += 1
    if not xs:
        raise InputError(f"{path!r} holds no extended-XYZ frames")
    if len({x.shape for x in xs}) != 1:
        raise InputError(f"{path!r}: frames have different numbers of atoms")
    if es and len(es) != len(xs):
        raise InputError(f"{path!r}: {len(es)} of {len(xs)} frames have '{energy_key}='")
    if fs and len(fs) != len(xs):
        raise InputError(f"{path!r}: {len(fs)} of {len(xs)} frames have a forces column")
    return ReferenceData(
        np.stack(xs),
        np.array(es) if es else None,
        np.stack(fs) if fs else None,
        f"reference file {path!r}",
    )


def write_extxyz(path, symbols, reference: ReferenceData) -> None:
    """Write ``reference`` (OpenMM units) as extended XYZ in Å, eV, eV/Å (atomically)."""
    from timemachine.files import atomic_write_text

    ref = _check_reference(reference)
    out = []
    for s in range(ref.positions.shape[0]):
        out.append(str(ref.positions.shape[1]))
        props = "Properties=species:S:1:pos:R:3" + (":forces:R:3" if ref.forces is not None else "")
        energy = (
            f" energy={float(ref.energies[s]) / EV_TO_KJ_PER_MOL!r}"
            if ref.energies is not None
            else ""
        )
        out.append(props + energy + ' pbc="F F F"')
        for i, sym in enumerate(symbols):
            row = [sym] + [repr(float(v)) for v in ref.positions[s, i] / ANGSTROM]
            if ref.forces is not None:
                row += [repr(float(v)) for v in ref.forces[s, i] * ANGSTROM / EV_TO_KJ_PER_MOL]
            out.append(" ".join(row))
    atomic_write_text(path, "\n".join(out) + "\n")


def load_reference(path) -> ReferenceData:
    """Reference energies and forces from ``.npz`` (OpenMM units) or extended XYZ (Å, eV)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"reference file {path!r} does not exist")
    if path.endswith(".npz"):
        return _check_reference(_read_npz(path))
    if path.endswith((".xyz", ".extxyz")):
        return _check_reference(read_extxyz(path))
    raise InputError(f"reference file {path!r}: use .npz (nm, kJ/mol) or .xyz/.extxyz (Å, eV)")


class ForceMatchingLoss:
    """L(θ) against reference energies and forces (see the module docstring).

    Args:
        system: a ``timemachine.System`` with the reference's N atoms.
        reference: ``ReferenceData`` or a file path (``load_reference``).
        energy_sigma: σ_E, kJ/mol. force_sigma: σ_F, kJ/mol/nm.
        energy_weight, force_weight: w_E, w_F ≥ 0 (parts missing from the data count 0).
        center_energies: subtract the mean model-minus-reference energy (arbitrary zero).
    """

    def __init__(
        self,
        system: System,
        reference,
        energy_sigma: float = 1.0,
        force_sigma: float = 10.0,
        energy_weight: float = 1.0,
        force_weight: float = 1.0,
        center_energies: bool = True,
    ):
        if not isinstance(system, System):
            raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
        if isinstance(reference, (str, os.PathLike)):
            reference = load_reference(reference)
        ref = _check_reference(reference)
        if ref.positions.shape[1] != system.n_atoms:
            raise InputError(
                f"{ref.source}: {ref.positions.shape[1]} atoms, the system has {system.n_atoms}"
            )
        for name, v in (("energy_sigma", energy_sigma), ("force_sigma", force_sigma)):
            if not v > 0:
                raise InputError(f"{name} must be > 0, got {v!r}")
        for name, v in (("energy_weight", energy_weight), ("force_weight", force_weight)):
            if not v >= 0:
                raise InputError(f"{name} must be >= 0, got {v!r}")
        self.system, self.reference = system, ref
        self.energy_sigma, self.force_sigma = float(energy_sigma), float(force_sigma)
        use_e = ref.energies is not None and energy_weight > 0
        use_f = ref.forces is not None and force_weight > 0
        if not (use_e or use_f):
            raise InputError(f"{ref.source}: nothing to match (no energies/forces with weight > 0)")
        energy_fn = system.energy_fn()
        x = jnp.asarray(ref.positions)
        e_ref = jnp.asarray(ref.energies) if use_e else None
        f_ref = jnp.asarray(ref.forces) if use_f else None
        we, wf = float(energy_weight), float(force_weight)
        se, sf = self.energy_sigma, self.force_sigma

        def loss(params):
            total = 0.0
            if use_e:
                e = jax.vmap(energy_fn, in_axes=(0, None))(x, params)
                d = e - e_ref
                if center_energies:
                    d = d - jnp.mean(d)
                total = total + we * jnp.mean((d / se) ** 2)
            if use_f:
                # -∇_x E; its θ-derivative is the mixed partial ∂²E/∂x∂θ
                f = -jax.vmap(jax.grad(energy_fn), in_axes=(0, None))(x, params)
                total = total + wf * jnp.mean(((f - f_ref) / sf) ** 2)
            return total

        self._loss = jax.jit(loss)
        self._value_and_grad = jax.jit(jax.value_and_grad(loss))

    def __call__(self, params=None) -> float:
        """L at full θ (P_all,), default ``system.params``."""
        return float(self._loss(self.system._params(params)))

    def loss_and_gradient(self, params=None, wrt=None):
        """(L, dL/dθ[wrt]) at full θ; ``wrt`` int indices (default all parameters)."""
        value, grad = self._value_and_grad(self.system._params(params))
        grad = np.asarray(grad)
        return float(value), grad if wrt is None else grad[np.asarray(wrt)]
