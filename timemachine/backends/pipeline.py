"""The launch sequence of the CUDA kernels, for any executor: ``Pipeline`` allocates the
buffers of one :class:`~timemachine.backends.tables.KernelPlan` and issues the kernels of
a gradient, a ζ, an energy, ∂E/∂θ, or a whole Langevin step, through an *executor*: the
CuPy one (``cupy_backend``) runs them on a GPU; the host one (``host``) runs the same
kernel bodies compiled for the CPU, in the same order, which is how the CPU test suite
checks the GPU program against the JAX reference.
"""

from __future__ import annotations

import numpy as np

from timemachine.backends.abi import PCHUNK, check_array, first_bad, kernels_of
from timemachine.backends.tables import KernelPlan
from timemachine.errors import InputError
from timemachine.potentials.gbsa import DIELECTRIC_OFFSET

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
            bad = "" if theta.shape != (plan.n_theta,) else f" (non-finite at {first_bad(theta)})"
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
            if not (radius > DIELECTRIC_OFFSET).all():
                bad = int(np.argmin(radius))
                raise InputError(
                    f"OBC2 radius of atom {bad} is {radius[bad]} nm: must exceed the "
                    f"dielectric offset {DIELECTRIC_OFFSET} nm"
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
