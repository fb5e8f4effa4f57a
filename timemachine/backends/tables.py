"""The kernel tables of a System: ``build_plan(system, wrt)`` turns its terms into the
flat int32 and float64 tables the CUDA kernels read (term atom lists, θ indices, slot and
parameter CSR lists, pair-mask bits), checking every index range on the host before
anything is launched.

Terms are found through the term registry (``timemachine.system``): every term's
coordinate groups go to the term kernels (``tm_terms_*``), by their kind; a term whose
``kernel`` names an entry of ``TABLE_BUILDERS`` gets that table (``tm_nonbonded_*``,
``tm_gb_*``); any other term has no CUDA path.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from timemachine.backends.abi import (
    KIND_ATOMS,
    KIND_CHANNELS,
    KIND_CONSTS,
    KIND_IDS,
    kernels_of,
)
from timemachine.errors import InputError
from timemachine.potentials.gbsa import gb_prefactor

# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class TermTable:
    """One kind of coordinate term: atoms (n, k), θ indices (n, C), constants (n, NC)."""

    kind: int
    idx: np.ndarray
    pidx: np.ndarray
    consts: np.ndarray
    slot_offset: int
    value_offset: int  # first entry of this kind's ∂E/∂θ values
    energy_offset: int  # first entry of this kind's energies


@dataclasses.dataclass
class PairTable:
    """All-pairs LJ + Coulomb: per-atom θ indices and the packed pair mask (N, W) uint32."""

    charge_index: np.ndarray
    sigma_index: np.ndarray
    epsilon_index: np.ndarray
    mask: np.ndarray
    value_offset: int
    energy_offset: int


@dataclasses.dataclass
class GBTable:
    charge_index: np.ndarray
    radius_index: np.ndarray
    scale_index: np.ndarray
    pre: float
    value_offset: int
    energy_offset: int


@dataclasses.dataclass
class KernelPlan:
    """Everything the kernels need that does not change during a run (θ aside)."""

    n_atoms: int
    n_theta: int
    wrt: np.ndarray  # (P,) int64
    inv_wrt: np.ndarray  # (P_all,) int32, p or -1
    terms: list
    pairs: list
    gb: list
    n_slots: int
    atom_ptr: np.ndarray  # (N + 1,) int32
    atom_slots: np.ndarray  # (S,) int32
    n_values: int
    param_ptr: np.ndarray  # (P_all + 1,) int32
    param_entries: np.ndarray  # int32
    n_energies: int

    @property
    def n_params(self) -> int:
        return int(self.wrt.size)


def _int_table(a, name, shape_tail, upper, what, use):
    """``a`` as a C-contiguous int32 table of shape (n, *shape_tail) with values in
    [0, upper); ``use`` = (kernels, argument) that read it, named in the InputError."""
    kernels, arg = use
    where = f"{kernels}: argument {arg!r} ({name})"
    a = np.asarray(a)
    if a.ndim != 1 + len(shape_tail) or tuple(a.shape[1:]) != tuple(shape_tail):
        raise InputError(
            f"{where} must have shape (n,{','.join(map(str, shape_tail))}), got {a.shape}"
        )
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InputError(f"{where} must hold integers, got dtype {a.dtype}")
    if a.size:
        bad = np.flatnonzero((a.reshape(-1) < 0) | (a.reshape(-1) >= upper))
        if bad.size:
            v = int(a.reshape(-1)[bad[0]])
            raise InputError(
                f"{where} holds {v} at flat position {int(bad[0])}: not a valid {what} "
                f"(must be in [0, {upper}))"
            )
    if upper >= 2**31:
        raise InputError(f"{where}: {what} count {upper} does not fit the kernels' int32 indices")
    return np.ascontiguousarray(a, dtype=np.int32)


def coordinate_term_groups(system):
    """The internal-coordinate terms of ``system``, one group per term object in order:
    (kind, idx (T, k) atoms, pidx (T, C) θ indices per channel, consts (T, NC), where).

    The registry's coordinate groups (``System.coordinate_groups``) with the kernels'
    kind numbers: bonds (r0, k), angles (θ0, k), proper and improper torsions (φ0, k;
    periodicity) and the 1-4 exceptions of a Nonbonded term (q_i, q_j, σ_i, σ_j, ε_i,
    ε_j; coulomb_scale, lj_scale), in the channel order of bonded.cuh. Shared by the CUDA
    plan and the CPU custom call (``timemachine.backends.xla_cpu``); indices are not
    checked here.
    """
    return [
        (KIND_IDS[g.kind], g.idx, g.pidx, g.consts, g.where) for g in system.coordinate_groups()
    ]


def _per_atom(term, fields, where, n, p_all, kernels):
    """The per-atom θ index arrays ``fields`` ((attribute, kernel argument) pairs) of an
    all-pairs term, checked: int32, (n,), in [0, p_all)."""
    out = []
    for name, arg in fields:
        a = _int_table(getattr(term, name), f"{where}.{name}", (), p_all, "θ index", (kernels, arg))
        if a.shape != (n,):
            raise InputError(
                f"{kernels}: argument {arg!r} ({where}.{name}) must have shape ({n},), "
                f"got {a.shape}"
            )
        out.append(a)
    return out


def _nonbonded_table(term, where, n, p_all):
    """(charge, sigma, epsilon θ indices, packed pair mask) of a Nonbonded term."""
    nb_k = kernels_of("NonbondedArgs")
    fields = (("charge_index", "charge"), ("sigma_index", "sigma"), ("epsilon_index", "epsilon"))
    ci, si, ei = _per_atom(term, fields, where, n, p_all, nb_k)
    mask = np.asarray(term.pair_mask, dtype=bool)
    if mask.shape != (n, n):
        raise InputError(
            f"{nb_k}: argument 'mask' ({where}.pair_mask) must have shape ({n}, {n}), "
            f"got {mask.shape}"
        )
    # checked here, by name; the 1-4 exceptions come from coordinate_term_groups
    use = (kernels_of("TermArgs"), "idx")
    _int_table(term.exception_idx, f"{where}.exception_idx", (2,), n, "atom index", use)
    return ci, si, ei, pack_mask(mask)


def _gb_table(term, where, n, p_all):
    """(charge, radius, scale θ indices, prefactor) of an OBC2 term."""
    fields = (("charge_index", "charge"), ("radius_index", "radius"), ("scale_index", "scale"))
    idx = _per_atom(term, fields, where, n, p_all, kernels_of("GBArgs"))
    return (*idx, gb_prefactor(term.solute_dielectric, term.solvent_dielectric))


#: term.kernel -> (plan list it joins, builder(term, where, n, p_all) -> table row)
TABLE_BUILDERS = {"nonbonded": ("pairs", _nonbonded_table), "gb": ("gb", _gb_table)}

#: term kinds with kernels for a part of them but no CUDA path yet: why, for the refusal
NOT_WIRED = {
    "nonbonded-cutoff": (
        "its Verlet-list pair kernels (tm_cutoff_primal, tm_cutoff_zeta[_xonly], "
        "tm_cutoff_list; cuda/kernels/cutoff.cuh) exist and are checked on the host build, "
        "but the CUDA step program does not yet keep the list on the device (check and "
        "rebuild), nor run PME's reciprocal sum, the 1-4 exceptions or the dispersion "
        "correction: run explicit solvent with backend='jax'"
    ),
}


def build_plan(system, wrt) -> KernelPlan:
    """The kernel tables of ``system`` for sensitivities to θ[wrt] (wrt may be empty).

    Raises:
        InputError: a term the kernels do not implement (CustomTerm and other new
            functional forms run on the JAX backend only), or any index out of range
            (the table and the value are named).
    """
    n, p_all = system.n_atoms, system.n_params
    terms_k = kernels_of("TermArgs")
    wrt = np.asarray(wrt).reshape(-1)
    wrt_i = _int_table(wrt, "wrt", (), p_all, "parameter index", (terms_k, "inv_wrt"))
    wrt = wrt.astype(np.int64)
    if np.unique(wrt).size != wrt.size:
        raise InputError(f"wrt has repeated indices: {wrt.tolist()}")
    inv_wrt = np.full(p_all, -1, dtype=np.int32)
    inv_wrt[wrt_i] = np.arange(wrt.size, dtype=np.int32)

    rows = {"pairs": [], "gb": []}
    for t_no, term in enumerate(system.terms):
        where = f"system.terms[{t_no}] ({term.kind})"
        if term.kernel in TABLE_BUILDERS:
            kind, builder = TABLE_BUILDERS[term.kernel]
            rows[kind].append(builder(term, where, n, p_all))
        elif term.kind in NOT_WIRED:
            raise InputError(
                f"backend='cuda' has no kernel for {where}, a {type(term).__name__}, yet: "
                f"{NOT_WIRED[term.kind]}"
            )
        elif term.kernel is not None or not term.coordinate_groups(where):
            raise InputError(
                f"backend='cuda' has no kernel for {where}, a {type(term).__name__}: new "
                f"functional forms (CustomTerm) run on backend='jax' only"
            )
    terms, slot_atoms, value_theta = [], [], []
    slot_off = value_off = energy_off = 0
    for kind, idx, pidx, cst, where in coordinate_term_groups(system):
        k, c, nc = KIND_ATOMS[kind], KIND_CHANNELS[kind], KIND_CONSTS[kind]
        idx = _int_table(idx, f"{where} atom indices", (k,), n, "atom index", (terms_k, "idx"))
        pidx = _int_table(
            pidx, f"{where} parameter indices", (c,), p_all, "θ index", (terms_k, "pidx")
        )
        cst = np.ascontiguousarray(np.asarray(cst, dtype=np.float64).reshape(idx.shape[0], nc))
        if idx.shape[0] == 0:
            continue
        terms.append(TermTable(kind, idx, pidx, cst, slot_off, value_off, energy_off))
        slot_atoms.append(idx.reshape(-1))
        value_theta.append(pidx.reshape(-1))
        slot_off += idx.size
        value_off += pidx.size
        energy_off += idx.shape[0]
    # the all-pairs tables: three per-atom θ index arrays and one extra (mask, prefactor) each
    tables = {"pairs": [], "gb": []}
    for kind, table in (("pairs", PairTable), ("gb", GBTable)):
        for *per_atom, extra in rows[kind]:
            tables[kind].append(table(*per_atom, extra, value_off, energy_off))
            value_theta.append(np.stack(per_atom, 1).reshape(-1))
            value_off += 3 * n
            energy_off += n

    atom_ptr, atom_slots = _csr(np.concatenate(slot_atoms + [np.zeros(0, np.int32)]), n)
    param_ptr, param_entries = _csr(np.concatenate(value_theta + [np.zeros(0, np.int32)]), p_all)
    return KernelPlan(
        n_atoms=n,
        n_theta=p_all,
        wrt=wrt,
        inv_wrt=inv_wrt,
        terms=terms,
        pairs=tables["pairs"],
        gb=tables["gb"],
        n_slots=slot_off,
        atom_ptr=atom_ptr,
        atom_slots=atom_slots,
        n_values=value_off,
        param_ptr=param_ptr,
        param_entries=param_entries,
        n_energies=energy_off,
    )


def _csr(keys, n_rows):
    """Rows 0..n_rows-1 of entries grouped by key, in entry order: (ptr (n+1,), entries)."""
    keys = np.asarray(keys, dtype=np.int64)
    order = np.argsort(keys, kind="stable").astype(np.int32)
    counts = np.bincount(keys, minlength=n_rows)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return ptr, order


def pack_mask(mask) -> np.ndarray:
    """(N, N) bool → (N, W) uint32 with bit j % 32 of word j // 32 set where mask[i, j]."""
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[0]
    w = max(1, -(-mask.shape[1] // 32))
    packed = np.packbits(mask, axis=1, bitorder="little")
    out = np.zeros((n, 4 * w), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    return np.ascontiguousarray(out.view("<u4").astype(np.uint32))
