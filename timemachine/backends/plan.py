"""Host-side preparation and the launch sequence of the CUDA kernels, for any executor.

``build_plan(system, wrt)`` turns a :class:`~timemachine.System` into the flat int32 and
float64 tables the kernels read (term atom lists, θ indices, slot and parameter CSR
lists, pair-mask bits), checking every index range on the host before anything is
launched. ``Pipeline`` allocates the buffers and issues the kernels of a gradient, a ζ,
an energy, ∂E/∂θ, or a whole Langevin step, through an *executor*: the CuPy one
(``cupy_backend``) runs them on a GPU; the host one (``host``) runs the same kernel
bodies compiled for the CPU, in the same order, which is how the CPU test suite checks
the GPU program against the JAX reference.

Struct layouts here mirror ``cuda/kernels/*.cuh``: every field is 8 bytes (pointers as
uint64), so there is no padding; the host library reports ``sizeof`` to check them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from timemachine.errors import InputError, SimulationError
from timemachine.system import OBC2, HarmonicAngles, HarmonicBonds, Nonbonded, PeriodicTorsions

KIND_BOND, KIND_ANGLE, KIND_TORSION, KIND_EXCEPTION = 0, 1, 2, 3
KIND_ATOMS = {KIND_BOND: 2, KIND_ANGLE: 3, KIND_TORSION: 4, KIND_EXCEPTION: 2}
KIND_CHANNELS = {KIND_BOND: 2, KIND_ANGLE: 2, KIND_TORSION: 2, KIND_EXCEPTION: 6}
KIND_CONSTS = {KIND_BOND: 0, KIND_ANGLE: 0, KIND_TORSION: 1, KIND_EXCEPTION: 2}
PCHUNK = 8  # tangents per thread, TM_PCHUNK in tm_common.cuh
GB_DIELECTRIC_OFFSET = 0.009

# (field, "p" pointer | "i" int64 | "u" uint64 | "d" double), in C declaration order
STRUCTS = {
    "TermArgs": [
        ("idx", "p"),
        ("pidx", "p"),
        ("consts", "p"),
        ("theta", "p"),
        ("inv_wrt", "p"),
        ("x", "p"),
        ("dx", "p"),
        ("energy", "p"),
        ("grad_slots", "p"),
        ("dedp", "p"),
        ("zeta_slots", "p"),
        ("n_terms", "i"),
        ("n_atoms", "i"),
        ("n_params", "i"),
        ("n_slots", "i"),
        ("slot_offset", "i"),
        ("kind", "i"),
    ],
    "NonbondedArgs": [
        ("x", "p"),
        ("charge", "p"),
        ("sigma", "p"),
        ("epsilon", "p"),
        ("root_eps", "p"),
        ("droot_eps", "p"),
        ("slot_q", "p"),
        ("slot_sig", "p"),
        ("slot_eps", "p"),
        ("mask", "p"),
        ("dx", "p"),
        ("energy", "p"),
        ("grad", "p"),
        ("dedp", "p"),
        ("zeta", "p"),
        ("n_atoms", "i"),
        ("n_words", "i"),
        ("n_params", "i"),
    ],
    "GBArgs": [
        ("x", "p"),
        ("charge", "p"),
        ("radius", "p"),
        ("scale", "p"),
        ("slot_q", "p"),
        ("slot_rad", "p"),
        ("slot_scale", "p"),
        ("dx", "p"),
        ("psi", "p"),
        ("born", "p"),
        ("b1", "p"),
        ("beta", "p"),
        ("cfac", "p"),
        ("dborn", "p"),
        ("db1", "p"),
        ("dcfac", "p"),
        ("energy", "p"),
        ("grad", "p"),
        ("dedp", "p"),
        ("zeta", "p"),
        ("pre", "d"),
        ("n_atoms", "i"),
        ("n_params", "i"),
    ],
    "LangevinArgs": [
        ("x", "p"),
        ("v", "p"),
        ("grad", "p"),
        ("b", "p"),
        ("c", "p"),
        ("x_out", "p"),
        ("v_out", "p"),
        ("zeta", "p"),
        ("dx", "p"),
        ("dv", "p"),
        ("ring", "p"),
        ("to_fold", "p"),
        ("folded_last", "p"),
        ("step", "p"),
        ("a", "d"),
        ("dt", "d"),
        ("fold", "d"),
        ("seed", "u"),
        ("replica", "u"),
        ("n_atoms", "i"),
        ("n_params", "i"),
        ("window", "i"),
    ],
    "GatherArgs": [
        ("atom_ptr", "p"),
        ("atom_slots", "p"),
        ("grad_slots", "p"),
        ("zeta_slots", "p"),
        ("grad", "p"),
        ("zeta", "p"),
        ("param_ptr", "p"),
        ("param_entries", "p"),
        ("values", "p"),
        ("dedtheta", "p"),
        ("n_atoms", "i"),
        ("n_slots", "i"),
        ("n_params", "i"),
        ("n_theta", "i"),
    ],
}
_CODE = {"p": np.uint64, "i": np.int64, "u": np.uint64, "d": np.float64}
DTYPES = {name: np.dtype([(f, _CODE[c]) for f, c in fields]) for name, fields in STRUCTS.items()}

# the argument struct of each kernel, and whether it runs over (atoms, tangent chunks)
KERNELS = {
    "tm_terms_primal": "TermArgs",
    "tm_terms_zeta": "TermArgs",
    "tm_nonbonded_primal": "NonbondedArgs",
    "tm_nonbonded_zeta": "NonbondedArgs",
    "tm_nonbonded_zeta_xonly": "NonbondedArgs",
    "tm_gb_psi": "GBArgs",
    "tm_gb_beta": "GBArgs",
    "tm_gb_grad": "GBArgs",
    "tm_gb_dpsi": "GBArgs",
    "tm_gb_dpsi_xonly": "GBArgs",
    "tm_gb_dbeta": "GBArgs",
    "tm_gb_dbeta_xonly": "GBArgs",
    "tm_gb_zeta": "GBArgs",
    "tm_gb_zeta_xonly": "GBArgs",
    "tm_gather_grad": "GatherArgs",
    "tm_gather_zeta": "GatherArgs",
    "tm_gather_params": "GatherArgs",
    "tm_langevin_primal": "LangevinArgs",
    "tm_sens_exact": "LangevinArgs",
    "tm_sens_window": "LangevinArgs",
    "tm_step_advance": "LangevinArgs",
}


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


def kernels_of(struct: str) -> str:
    """The kernels that take a ``struct`` argument block, for error messages (an _xonly
    variant is written ``name[_xonly]``)."""
    names = [k for k, s in KERNELS.items() if s == struct]
    return "/".join(
        k + ("[_xonly]" if k + "_xonly" in KERNELS else "")
        for k in names
        if not k.endswith("_xonly")
    )


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

    Bonds (r0, k), angles (θ0, k), proper and improper torsions (φ0, k; periodicity) and
    the 1-4 exceptions of a Nonbonded term (q_i, q_j, σ_i, σ_j, ε_i, ε_j; coulomb_scale,
    lj_scale), in the channel order of bonded.cuh. Shared by the CUDA plan and the CPU
    custom call (``timemachine.backends.xla_cpu``); indices are not checked here.
    """
    groups = []
    for t_no, term in enumerate(system.terms):
        where = f"system.terms[{t_no}] ({term.kind})"
        if isinstance(term, HarmonicBonds):
            pidx = np.stack([term.length_index, term.k_index], 1)
            groups.append((KIND_BOND, term.idx, pidx, np.zeros((len(term.idx), 0)), where))
        elif isinstance(term, HarmonicAngles):
            pidx = np.stack([term.theta0_index, term.k_index], 1)
            groups.append((KIND_ANGLE, term.idx, pidx, np.zeros((len(term.idx), 0)), where))
        elif isinstance(term, PeriodicTorsions):
            pidx = np.stack([term.phase_index, term.k_index], 1)
            per = np.asarray(term.periodicity, dtype=np.float64).reshape(-1, 1)
            groups.append((KIND_TORSION, term.idx, pidx, per, where))
        elif isinstance(term, Nonbonded) and np.asarray(term.exception_idx).shape[0]:
            exc = np.asarray(term.exception_idx)
            i, j = exc[:, 0], exc[:, 1]
            per_atom = [
                np.asarray(getattr(term, f"{k}_index")) for k in ("charge", "sigma", "epsilon")
            ]
            pidx = np.stack([a[k] for a in per_atom for k in (i, j)], 1)
            scales = (term.coulomb_scale, term.lj_scale)
            cst = np.stack([np.broadcast_to(np.asarray(c, np.float64), i.shape) for c in scales], 1)
            groups.append((KIND_EXCEPTION, exc, pidx, cst, f"{where} exceptions"))
    return groups


def build_plan(system, wrt) -> KernelPlan:
    """The kernel tables of ``system`` for sensitivities to θ[wrt] (wrt may be empty).

    Raises:
        InputError: a term the kernels do not implement (CustomTerm and other new
            functional forms run on the JAX backend only), or any index out of range
            (the table and the value are named).
    """
    n, p_all = system.n_atoms, system.n_params
    terms_k, nb_k, gb_k = kernels_of("TermArgs"), kernels_of("NonbondedArgs"), kernels_of("GBArgs")
    wrt = np.asarray(wrt).reshape(-1)
    wrt_i = _int_table(wrt, "wrt", (), p_all, "parameter index", (terms_k, "inv_wrt"))
    wrt = wrt.astype(np.int64)
    if np.unique(wrt).size != wrt.size:
        raise InputError(f"wrt has repeated indices: {wrt.tolist()}")
    inv_wrt = np.full(p_all, -1, dtype=np.int32)
    inv_wrt[wrt_i] = np.arange(wrt.size, dtype=np.int32)

    pairs, gbs = [], []
    for t_no, term in enumerate(system.terms):
        where = f"system.terms[{t_no}] ({term.kind})"
        if isinstance(term, (HarmonicBonds, HarmonicAngles, PeriodicTorsions)):
            pass  # coordinate_term_groups below
        elif isinstance(term, Nonbonded):
            per_atom = []
            for name, arg in (("charge_index", "charge"), ("sigma_index", "sigma"),
                              ("epsilon_index", "epsilon")):  # fmt: skip
                a = _int_table(
                    getattr(term, name), f"{where}.{name}", (), p_all, "θ index", (nb_k, arg)
                )
                if a.shape != (n,):
                    raise InputError(
                        f"{nb_k}: argument {arg!r} ({where}.{name}) must have shape ({n},), "
                        f"got {a.shape}"
                    )
                per_atom.append(a)
            ci, si, ei = per_atom
            mask = np.asarray(term.pair_mask, dtype=bool)
            if mask.shape != (n, n):
                raise InputError(
                    f"{nb_k}: argument 'mask' ({where}.pair_mask) must have shape ({n}, {n}), "
                    f"got {mask.shape}"
                )
            pairs.append((ci, si, ei, pack_mask(mask)))
            # checked here, by name; the 1-4 exceptions come from coordinate_term_groups
            _int_table(
                term.exception_idx,
                f"{where}.exception_idx",
                (2,),
                n,
                "atom index",
                (terms_k, "idx"),
            )
        elif isinstance(term, OBC2):
            idx = []
            for name, arg in (("charge_index", "charge"), ("radius_index", "radius"),
                              ("scale_index", "scale")):  # fmt: skip
                a = _int_table(
                    getattr(term, name), f"{where}.{name}", (), p_all, "θ index", (gb_k, arg)
                )
                if a.shape != (n,):
                    raise InputError(
                        f"{gb_k}: argument {arg!r} ({where}.{name}) must have shape ({n},), "
                        f"got {a.shape}"
                    )
                idx.append(a)
            pre = -138.935485 * (1.0 / term.solute_dielectric - 1.0 / term.solvent_dielectric)
            gbs.append((*idx, pre))
        else:
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
    pair_tables = []
    for ci, si, ei, mask in pairs:
        pair_tables.append(PairTable(ci, si, ei, mask, value_off, energy_off))
        value_theta.append(np.stack([ci, si, ei], 1).reshape(-1))
        value_off += 3 * n
        energy_off += n
    gb_tables = []
    for qi, ri, si, pre in gbs:
        gb_tables.append(GBTable(qi, ri, si, pre, value_off, energy_off))
        value_theta.append(np.stack([qi, ri, si], 1).reshape(-1))
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
        pairs=pair_tables,
        gb=gb_tables,
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


# --------------------------------------------------------------------------- pipeline


class Pipeline:
    """Device buffers of one system and the launch sequence of its kernels.

    The executor supplies ``xp`` (numpy or cupy), ``ptr(array)``, ``struct(name, dict)``
    (an argument block in device memory), ``launch(kernel, nx, ny, block)``,
    ``zero(array)`` and ``alloc(name, shape, dtype)``. Buffers are allocated once; θ is
    uploaded by ``set_params``. Shapes, dtypes and index ranges of every array handed to a
    kernel are checked here, before the launch (``check_array``).

    The argument blocks keep their device addresses for the life of the pipeline:
    ``set_params`` and ``set_integrator`` rewrite them in place (the executor's ``struct``
    does, for a key it has seen), and the kernels read them when they run. A recorded
    launch sequence (a CUDA graph) therefore stays valid across new θ, integrators and
    replicas; ``blocks()`` lists the handles it depends on.
    """

    def __init__(self, plan: KernelPlan, executor, theta, *, window: int | None = None):
        self.plan, self.ex = plan, executor
        n, p, s = plan.n_atoms, plan.n_params, plan.n_slots
        alloc = executor.alloc
        f8 = np.float64
        self.x = alloc("x", (n, 3), f8)
        self.v = alloc("v", (n, 3), f8)
        self.x_tmp = alloc("x_tmp", (n, 3), f8)
        self.v_tmp = alloc("v_tmp", (n, 3), f8)
        self.grad = alloc("grad", (n, 3), f8)
        self.dx = alloc("dx_dtheta", (max(p, 1), n, 3), f8)
        self.dv = alloc("dv_dtheta", (max(p, 1), n, 3), f8)
        self.zeta = alloc("zeta", (max(p, 1), n, 3), f8)
        self.grad_slots = alloc("grad_slots", (max(s, 1), 3), f8)
        self.zeta_slots = alloc("zeta_slots", (max(p, 1), max(s, 1), 3), f8)
        self.values = alloc("dE/dθ values", (max(plan.n_values, 1),), f8)
        self.energies = alloc("energies", (max(plan.n_energies, 1),), f8)
        self.dedtheta = alloc("dE/dθ", (plan.n_theta,), f8)
        self.step = alloc("step", (1,), np.int64)
        self.window = window
        self._integrator_key = None
        self.langevin_block = self.lookahead_block = None  # set_integrator
        # the ζ entry points of each pair term: with mixed partials, or _xonly
        self._pair_zeta = [
            "tm_nonbonded_zeta"
            + _tangent_pass_suffix(plan, t.charge_index, t.sigma_index, t.epsilon_index)
            for t in plan.pairs
        ]
        self._gb_tangent = [
            tuple(
                kernel + _tangent_pass_suffix(plan, t.charge_index, t.radius_index, t.scale_index)
                for kernel in ("tm_gb_dpsi", "tm_gb_dbeta", "tm_gb_zeta")
            )
            for t in plan.gb
        ]
        if window is not None:
            self.ring = alloc("zeta_window", (window, max(p, 1), n, 3), f8)
            self.to_fold = alloc("to_fold", (max(p, 1), n, 3), f8)
            self.folded_last = alloc("folded_last", (max(p, 1), n, 3), f8)
            for a in (self.ring, self.to_fold, self.folded_last):
                a.fill(0)
        self.energies.fill(0)
        self.values.fill(0)
        self._up = {}  # uploaded constant tables, kept alive
        # buffer attribute -> (kernel, argument) that reads it, for check_buffers()
        uses = {
            "x": ("tm_langevin_primal", "x"),
            "v": ("tm_langevin_primal", "v"),
            "x_tmp": ("tm_langevin_primal", "x_out"),
            "v_tmp": ("tm_langevin_primal", "v_out"),
            "grad": ("tm_gather_grad", "grad"),
            "dx": ("tm_sens_exact", "dx"),
            "dv": ("tm_sens_exact", "dv"),
            "zeta": ("tm_gather_zeta", "zeta"),
            "grad_slots": ("tm_terms_primal", "grad_slots"),
            "zeta_slots": ("tm_terms_zeta", "zeta_slots"),
            "values": ("tm_gather_params", "values"),
            "energies": ("tm_terms_primal", "energy"),
            "dedtheta": ("tm_gather_params", "dedtheta"),
            "step": ("tm_step_advance", "step"),
        }
        if window is not None:
            uses.update(
                ring=("tm_sens_window", "ring"),
                to_fold=("tm_sens_window", "to_fold"),
                folded_last=("tm_sens_window", "folded_last"),
            )
        self._buffers = {
            attr: (use, tuple(getattr(self, attr).shape), np.dtype(getattr(self, attr).dtype),
                   executor.ptr(getattr(self, attr)))
            for attr, use in uses.items()
        }  # fmt: skip
        self.set_params(theta)

    def check_buffers(self):
        """Raise InputError naming the kernel and argument if a device buffer was replaced
        (``pl.x = ...`` instead of ``pl.x[...] = ...``) or changed shape or dtype since the
        argument blocks were built: the kernels would read the old memory."""
        for attr, ((kernel, arg), shape, dtype, ptr) in self._buffers.items():
            a = getattr(self, attr)
            check_array(kernel, f"{arg} (Pipeline.{attr})", a, shape, dtype)
            if self.ex.ptr(a) != ptr:
                raise InputError(
                    f"{kernel}: argument {arg!r} (Pipeline.{attr}) is not the buffer its "
                    f"argument block points to: assign in place (Pipeline.{attr}[...] = ...)"
                )

    # -- helpers
    def _const(self, key, array, dtype):
        arr = self.ex.upload(key, np.ascontiguousarray(np.asarray(array, dtype=dtype)))
        self._up[key] = arr
        return self.ex.ptr(arr)

    def _zero_or(self, a, enabled):
        return self.ex.ptr(a) if enabled else 0

    def set_params(self, theta):
        """Upload θ (P_all,) and rebuild the per-atom parameter arrays and argument blocks."""
        plan, ex = self.plan, self.ex
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (plan.n_theta,) or not np.isfinite(theta).all():
            bad = "" if theta.shape != (plan.n_theta,) else f" (non-finite at {_first_bad(theta)})"
            raise InputError(
                f"{kernels_of('TermArgs')}: argument 'theta' (params) must be a finite "
                f"({plan.n_theta},) array, got shape {theta.shape}{bad}"
            )
        self.theta = theta
        n, p, s = plan.n_atoms, plan.n_params, plan.n_slots
        P = ex.ptr
        theta_ptr = self._const("theta", theta, np.float64)
        inv_ptr = self._const("inv_wrt", plan.inv_wrt, np.int32)
        self.term_blocks = []
        for k, t in enumerate(plan.terms):
            fields = dict(
                idx=self._const(f"term{k}.idx", t.idx, np.int32),
                pidx=self._const(f"term{k}.pidx", t.pidx, np.int32),
                consts=self._const(
                    f"term{k}.consts", t.consts if t.consts.size else np.zeros(1), np.float64
                ),
                theta=theta_ptr,
                inv_wrt=inv_ptr,
                x=P(self.x),
                dx=P(self.dx),
                energy=P(self.energies) + 8 * t.energy_offset,
                grad_slots=P(self.grad_slots),
                dedp=P(self.values) + 8 * t.value_offset,
                zeta_slots=P(self.zeta_slots),
                n_terms=t.idx.shape[0],
                n_atoms=n,
                n_params=p,
                n_slots=s,
                slot_offset=t.slot_offset,
                kind=t.kind,
            )
            self.term_blocks.append((t.idx.shape[0], ex.struct(f"term{k}", "TermArgs", fields)))
        self.pair_blocks = []
        for k, t in enumerate(plan.pairs):
            eps = theta[t.epsilon_index]
            if (eps < 0).any():
                bad = int(np.argmin(eps))
                raise InputError(
                    f"tm_nonbonded_primal: argument 'epsilon' (Lennard-Jones ε of atom {bad}) "
                    f"is {eps[bad]} kJ/mol: must be >= 0"
                )
            root = np.sqrt(eps)  # correctly rounded, as the kernels' sqrt
            with np.errstate(divide="ignore"):
                droot = np.where(eps > 0, 0.5 / root, 0.0)
            fields = dict(
                x=P(self.x),
                charge=self._const(f"nb{k}.q", theta[t.charge_index], np.float64),
                sigma=self._const(f"nb{k}.sig", theta[t.sigma_index], np.float64),
                epsilon=self._const(f"nb{k}.eps", eps, np.float64),
                root_eps=self._const(f"nb{k}.root_eps", root, np.float64),
                droot_eps=self._const(f"nb{k}.droot_eps", droot, np.float64),
                slot_q=self._const(f"nb{k}.sq", plan.inv_wrt[t.charge_index], np.int32),
                slot_sig=self._const(f"nb{k}.ss", plan.inv_wrt[t.sigma_index], np.int32),
                slot_eps=self._const(f"nb{k}.se", plan.inv_wrt[t.epsilon_index], np.int32),
                mask=self._const(f"nb{k}.mask", t.mask, np.uint32),
                dx=P(self.dx),
                energy=P(self.energies) + 8 * t.energy_offset,
                grad=P(self.grad),
                dedp=P(self.values) + 8 * t.value_offset,
                zeta=P(self.zeta),
                n_atoms=n,
                n_words=t.mask.shape[1],
                n_params=p,
            )
            self.pair_blocks.append(ex.struct(f"nb{k}", "NonbondedArgs", fields))
        self.gb_blocks = []
        for k, t in enumerate(plan.gb):
            scratch = {
                name: ex.alloc(f"gb{k}.{name}", (n,), np.float64)
                for name in ("psi", "born", "b1", "beta", "cfac")
            }
            scratch.update(
                {
                    name: ex.alloc(f"gb{k}.{name}", (max(p, 1), n), np.float64)
                    for name in ("dborn", "db1", "dcfac")
                }
            )
            self._up[f"gb{k}.scratch"] = scratch
            radius = theta[t.radius_index]
            if not (radius > GB_DIELECTRIC_OFFSET).all():
                bad = int(np.argmin(radius))
                raise InputError(
                    f"OBC2 radius of atom {bad} is {radius[bad]} nm: must exceed the "
                    f"dielectric offset {GB_DIELECTRIC_OFFSET} nm"
                )
            fields = dict(
                x=P(self.x),
                charge=self._const(f"gb{k}.q", theta[t.charge_index], np.float64),
                radius=self._const(f"gb{k}.rad", radius, np.float64),
                scale=self._const(f"gb{k}.scale", theta[t.scale_index], np.float64),
                slot_q=self._const(f"gb{k}.sq", plan.inv_wrt[t.charge_index], np.int32),
                slot_rad=self._const(f"gb{k}.sr", plan.inv_wrt[t.radius_index], np.int32),
                slot_scale=self._const(f"gb{k}.ss", plan.inv_wrt[t.scale_index], np.int32),
                dx=P(self.dx),
                energy=P(self.energies) + 8 * t.energy_offset,
                grad=P(self.grad),
                dedp=P(self.values) + 8 * t.value_offset,
                zeta=P(self.zeta),
                pre=t.pre,
                n_atoms=n,
                n_params=p,
                **{name: P(a) for name, a in scratch.items()},
            )
            self.gb_blocks.append(ex.struct(f"gb{k}", "GBArgs", fields))
        self.gather_block = ex.struct(
            "gather",
            "GatherArgs",
            dict(
                atom_ptr=self._const("atom_ptr", plan.atom_ptr, np.int32),
                atom_slots=self._const(
                    "atom_slots", plan.atom_slots if plan.atom_slots.size else np.zeros(1), np.int32
                ),
                grad_slots=P(self.grad_slots),
                zeta_slots=P(self.zeta_slots),
                grad=P(self.grad),
                zeta=P(self.zeta),
                param_ptr=self._const("param_ptr", plan.param_ptr, np.int32),
                param_entries=self._const(
                    "param_entries",
                    plan.param_entries if plan.param_entries.size else np.zeros(1),
                    np.int32,
                ),
                values=P(self.values),
                dedtheta=P(self.dedtheta),
                n_atoms=n,
                n_slots=s,
                n_params=p,
                n_theta=plan.n_theta,
            ),
        )

    def set_integrator(self, coeffs, seed, replica, fold=0.0):
        """Langevin coefficients (a, b (N,), c (N,), dt), noise stream and window fold.

        The blocks are rewritten (in place) only when a value changed."""
        plan, ex = self.plan, self.ex
        n = plan.n_atoms
        b = np.asarray(coeffs.b, dtype=np.float64)
        c = np.asarray(coeffs.c, dtype=np.float64)
        for arg, a in (("b", b), ("c", c)):
            if a.shape != (n,):
                raise InputError(
                    f"tm_langevin_primal: argument {arg!r} (Langevin coefficient {arg}) must "
                    f"have shape ({n},), got {a.shape}"
                )
        key = (float(coeffs.a), float(coeffs.dt), float(fold), int(seed), int(replica))
        key += (b.tobytes(), c.tobytes())
        if key == self._integrator_key:
            return
        P = ex.ptr
        common = dict(
            grad=P(self.grad),
            b=self._const("b", b, np.float64),
            c=self._const("c", c, np.float64),
            zeta=P(self.zeta),
            dx=P(self.dx),
            dv=P(self.dv),
            ring=P(self.ring) if self.window else 0,
            to_fold=P(self.to_fold) if self.window else 0,
            folded_last=P(self.folded_last) if self.window else 0,
            step=P(self.step),
            a=float(coeffs.a),
            dt=float(coeffs.dt),
            fold=float(fold),
            seed=int(seed),
            replica=int(replica),
            n_atoms=n,
            n_params=plan.n_params,
            window=int(self.window or 0),
        )
        self.langevin_block = ex.struct(
            "langevin",
            "LangevinArgs",
            dict(common, x=P(self.x), v=P(self.v), x_out=P(self.x), v_out=P(self.v)),
        )
        # the same step into scratch buffers: v_{t+1} for the kinetic energy, x, v unchanged
        self.lookahead_block = ex.struct(
            "lookahead",
            "LangevinArgs",
            dict(common, x=P(self.x), v=P(self.v), x_out=P(self.x_tmp), v_out=P(self.v_tmp)),
        )
        self._integrator_key = key

    def blocks(self) -> tuple:
        """Every argument-block handle the launches use (what a captured graph holds)."""
        terms = tuple(b for _, b in self.term_blocks)
        rest = (self.gather_block, self.langevin_block, self.lookahead_block)
        return terms + tuple(self.pair_blocks) + tuple(self.gb_blocks) + rest

    # -- evaluations
    def gradient(self):
        """∇E at self.x into self.grad; per-term energies and ∂E/∂θ values as a by-product."""
        ex, n = self.ex, self.plan.n_atoms
        ex.zero(self.grad)
        for block in self.pair_blocks:
            ex.launch("tm_nonbonded_primal", n, 1, block)
        for block in self.gb_blocks:
            ex.launch("tm_gb_psi", n, 1, block)
            ex.launch("tm_gb_beta", n, 1, block)
            ex.launch("tm_gb_grad", n, 1, block)
        for n_terms, block in self.term_blocks:
            ex.launch("tm_terms_primal", n_terms, 1, block)
        if self.term_blocks:
            ex.launch("tm_gather_grad", n, 1, self.gather_block)

    def zeta_pass(self):
        """ζ at (self.x, self.dx) into self.zeta; needs ``gradient()`` at the same x first
        (the OBC2 tangent passes read its Born radii)."""
        ex, n, p = self.ex, self.plan.n_atoms, self.plan.n_params
        if p == 0:
            return
        chunks = -(-p // PCHUNK)
        ex.zero(self.zeta)
        for kernel, block in zip(self._pair_zeta, self.pair_blocks, strict=True):
            ex.launch(kernel, n, chunks, block)
        for kernels, block in zip(self._gb_tangent, self.gb_blocks, strict=True):
            for kernel in kernels:
                ex.launch(kernel, n, chunks, block)
        for n_terms, block in self.term_blocks:
            ex.launch("tm_terms_zeta", n_terms, 1, block)
        if self.term_blocks:
            ex.launch("tm_gather_zeta", n, p, self.gather_block)

    def energy(self) -> float:
        """E at self.x (runs the gradient pass), kJ/mol: a fixed-order sum of the parts."""
        self.gradient()
        return float(self.ex.xp.sum(self.energies[: self.plan.n_energies]))

    def dedtheta_pass(self):
        """∂E/∂θ (P_all,) at self.x into self.dedtheta (runs the gradient pass)."""
        self.gradient()
        self.ex.launch("tm_gather_params", self.plan.n_theta, 1, self.gather_block)

    def step_once(self, method: str):
        """One Langevin step of x, v (and dx/dθ, dv/dθ) at the device step counter."""
        ex, n, p = self.ex, self.plan.n_atoms, self.plan.n_params
        self.gradient()
        self.zeta_pass()
        ex.launch("tm_langevin_primal", n, 1, self.langevin_block)
        if p:
            kernel = "tm_sens_exact" if method == "exact" else "tm_sens_window"
            ex.launch(kernel, p * n * 3, 1, self.langevin_block)
        ex.launch("tm_step_advance", 1, 1, self.langevin_block)

    def lookahead_v(self):
        """v_{t+1} of the next step from the current state (x, v, counter unchanged)."""
        self.gradient()
        self.ex.launch("tm_langevin_primal", self.plan.n_atoms, 1, self.lookahead_block)
        return self.v_tmp


def _tangent_pass_suffix(plan, *param_indices) -> str:
    """ "" if any of a pair term's per-atom parameters (θ indices) is a tangent, so that its
    ζ passes add the mixed partials, else "_xonly" (the entry points without them)."""
    return "" if any((plan.inv_wrt[ix] >= 0).any() for ix in param_indices) else "_xonly"


def _first_bad(a):
    return int(np.flatnonzero(~np.isfinite(a))[0])


def struct_bytes(name: str, fields: dict) -> np.ndarray:
    """One argument block as a (1,) structured array; every field must be given."""
    dtype = DTYPES[name]
    missing = set(dtype.names) - set(fields)
    extra = set(fields) - set(dtype.names)
    if missing or extra:
        raise InputError(
            f"{name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}"
        )
    block = np.zeros(1, dtype=dtype)
    for key, value in fields.items():
        block[key] = value
    return block


def check_array(kernel: str, name: str, array, shape, dtype) -> None:
    """Raise InputError naming the kernel and argument unless ``array`` has ``shape``
    (None entries match anything), ``dtype`` and C-contiguous layout."""
    got = tuple(getattr(array, "shape", ()))
    if len(got) != len(shape) or any(
        s is not None and s != g for s, g in zip(shape, got, strict=False)
    ):
        raise InputError(f"{kernel}: argument {name!r} has shape {got}, expected {tuple(shape)}")
    if np.dtype(array.dtype) != np.dtype(dtype):
        raise InputError(
            f"{kernel}: argument {name!r} has dtype {array.dtype}, expected {np.dtype(dtype)}"
        )
    flags = getattr(array, "flags", None)
    if flags is not None and not flags["C_CONTIGUOUS"]:
        raise InputError(f"{kernel}: argument {name!r} must be C-contiguous")


def device_error(kernel: str, exc: Exception) -> SimulationError:
    """A launch or allocation failure as a SimulationError naming the kernel."""
    return SimulationError(f"CUDA kernel {kernel} failed: {type(exc).__name__}: {exc}")
