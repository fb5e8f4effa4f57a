"""The C ABI of the CUDA kernels, mirrored on the host: argument-block layouts, kernel
names and the checks made before any launch.

Struct layouts here mirror ``cuda/kernels/*.cuh``: every field is 8 bytes (pointers as
uint64), so there is no padding; the host library reports ``sizeof`` to check them.
``KERNELS`` maps each entry point to the argument block it takes.
"""

from __future__ import annotations

import numpy as np

from timemachine.errors import InputError, SimulationError

KIND_BOND, KIND_ANGLE, KIND_TORSION, KIND_EXCEPTION = 0, 1, 2, 3
KIND_ATOMS = {KIND_BOND: 2, KIND_ANGLE: 3, KIND_TORSION: 4, KIND_EXCEPTION: 2}
KIND_CHANNELS = {KIND_BOND: 2, KIND_ANGLE: 2, KIND_TORSION: 2, KIND_EXCEPTION: 6}
KIND_CONSTS = {KIND_BOND: 0, KIND_ANGLE: 0, KIND_TORSION: 1, KIND_EXCEPTION: 2}
# the coordinate groups' kinds (timemachine.system.CoordinateGroup.kind) as the kernels number them
KIND_IDS = {"bond": KIND_BOND, "angle": KIND_ANGLE, "torsion": KIND_TORSION,
            "exception": KIND_EXCEPTION}  # fmt: skip
PCHUNK = 8  # tangents per thread, TM_PCHUNK in tm_common.cuh

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
    "CutoffArgs": [
        ("x", "p"),
        ("charge", "p"),
        ("sigma", "p"),
        ("root_eps", "p"),
        ("droot_eps", "p"),
        ("slot_q", "p"),
        ("slot_sig", "p"),
        ("slot_eps", "p"),
        ("nbr", "p"),
        ("dx", "p"),
        ("energy", "p"),
        ("grad", "p"),
        ("dedp", "p"),
        ("zeta", "p"),
        ("box_x", "d"),
        ("box_y", "d"),
        ("box_z", "d"),
        ("cutoff", "d"),
        ("switch_distance", "d"),
        ("k_rf", "d"),
        ("c_rf", "d"),
        ("alpha", "d"),
        ("periodic", "i"),
        ("use_switch", "i"),
        ("pme", "i"),
        ("n_atoms", "i"),
        ("capacity", "i"),
        ("n_params", "i"),
    ],
    "ListArgs": [
        ("x", "p"),
        ("excluded", "p"),
        ("nbr", "p"),
        ("count", "p"),
        ("box_x", "d"),
        ("box_y", "d"),
        ("box_z", "d"),
        ("radius", "d"),
        ("periodic", "i"),
        ("n_atoms", "i"),
        ("n_excluded", "i"),
        ("capacity", "i"),
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
    "tm_cutoff_primal": "CutoffArgs",
    "tm_cutoff_list": "ListArgs",
    "tm_cutoff_zeta": "CutoffArgs",
    "tm_cutoff_zeta_xonly": "CutoffArgs",
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


def kernels_of(struct: str) -> str:
    """The kernels that take a ``struct`` argument block, for error messages (an _xonly
    variant is written ``name[_xonly]``)."""
    names = [k for k, s in KERNELS.items() if s == struct]
    return "/".join(
        k + ("[_xonly]" if k + "_xonly" in KERNELS else "")
        for k in names
        if not k.endswith("_xonly")
    )


def first_bad(a):
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
