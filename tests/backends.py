"""The backends of the consistency matrix (test_backend_matrix.py), behind one interface.

Each backend gives ``gradient_and_zeta(system, wrt, x, theta, dx)`` -> (∇E, ζ) and, where
it has them, ``energy_and_dedtheta(system, wrt, x, theta)`` -> (E, ∂E/∂θ) and the
dynamics entry points ``simulate``, ``run_replicas`` (``tm.simulate`` and
``fitting.run_replicas`` with ``backend="cuda"``). ``tol`` holds the tolerances its
checks used before the matrix, and ``dynamics`` the run lengths and settings of its
dynamics checks (a 1,000-step run is a GPU's budget, not the host build's).

* ``reference``: the JAX definitions (``jax.value_and_grad`` of the energy, ζ by one jvp
  of ∇E per parameter, ``make_zeta(method="reference")``): what every other row is
  compared to.
* ``structured``: ``make_gradient_and_zeta(bonded="jax")``, the pure-JAX production path.
* ``structured-host``: the same with the C++ XLA CPU custom call (``bonded="host"``);
  skipped where ``xla_cpu.available()`` says it cannot run.
* ``cuda-host``: the CUDA kernels built for the CPU (``backends.host``) through
  ``backends.pipeline.Pipeline``; ``backend="cuda"`` runs them instead of CuPy. Skipped
  without a C++ compiler.
* ``cuda-gpu``: the same kernels through CuPy on a GPU (marked ``gpu``).
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import timemachine as tm
from timemachine.backends import noise
from timemachine.integrator import langevin_update
from timemachine.sensitivity.propagation import (
    sensitivity_update,
    window_coefficients,
    window_source,
)
from timemachine.sensitivity.zeta import make_gradient_and_zeta, make_zeta

# XLA compile options for the references: compilation, not arithmetic, is their cost
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_COMPILED = {}


def compiled_call(fn, *args):
    """fn(*args) through jax.jit, compiled once per (fn, pytree structure, leaf shapes)."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (fn, tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(fn).lower(*args).compile(FAST_COMPILE)
    return _COMPILED[key](*args)


def _to_host(a):
    return a.get() if hasattr(a, "get") else np.array(a)  # CuPy arrays have .get()


def kernel_results(executor, system, x, wrt, dx):
    """(E, ∇E, ∂E/∂θ, ζ), numpy, from the CUDA kernels on ``executor`` (host or CuPy)."""
    from timemachine.backends.pipeline import Pipeline
    from timemachine.backends.tables import build_plan

    pl = Pipeline(build_plan(system, wrt), executor, system.params)
    xp = executor.xp
    pl.x[...] = xp.asarray(x)
    pl.dx[...] = xp.asarray(dx)
    e = float(pl.energy())
    g = _to_host(pl.grad)
    pl.zeta_pass()
    z = _to_host(pl.zeta)
    pl.dedtheta_pass()
    return e, g, _to_host(pl.dedtheta), z


@dataclasses.dataclass(frozen=True)
class Dynamics:
    """One backend's settings for one dynamics check."""

    n_steps: int
    save_every: int
    friction: float = 5.0
    window: int | None = None
    wrt: object = "torsion*"
    extra: dict = dataclasses.field(default_factory=dict)  # more keyword arguments


class Backend:
    """The interface; a method a backend does not have raises NotImplementedError."""

    id = ""
    checks = frozenset()  # names of the matrix checks this backend takes part in
    tol = {}  # quantity -> {metric: tolerance} (metrics in test_backend_matrix.METRICS)
    dynamics = {}  # dynamics check -> Dynamics

    def __init__(self):
        self._cache = {}

    def available(self):
        return True, ""

    def _compiled(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key][-1]

    def gradient_and_zeta(self, system, wrt, x, theta, dx):
        raise NotImplementedError

    def energy_and_dedtheta(self, system, wrt, x, theta):
        raise NotImplementedError

    def simulate(self, system, x, integrator, n_steps, **kw):
        raise NotImplementedError

    def run_replicas(self, system, x, integrator, n_steps, **kw):
        raise NotImplementedError


@contextlib.contextmanager
def host_build_as_cuda():
    """backend="cuda" (simulate, run_replicas, fit, cuda_bench) running the host build of
    the kernels instead of CuPy, on the CPU, while the context is open."""
    import pytest

    from timemachine import backends
    from timemachine.backends import cupy_backend
    from timemachine.backends.host import HostExecutor

    real = cupy_backend.make_program
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "require_cuda", lambda: None)
        mp.setattr(
            cupy_backend,
            "make_program",
            lambda system, wrt, method, executor=None, **kw: real(
                system, wrt, method, HostExecutor(), **kw
            ),
        )
        yield


def _key(system, wrt, *more):
    # the system is kept in the cached value, so that its id stays unique
    return (id(system), tuple(int(i) for i in wrt)) + more


class ReferenceBackend(Backend):
    id = "reference"
    checks = frozenset({"nontrivial"})

    def energy_and_dedtheta(self, system, wrt, x, theta):
        e, _, d = self.energy_gradient_dedtheta(system, x, theta)
        return e, d

    def energy_gradient_dedtheta(self, system, x, theta):
        fn = self._compiled(
            _key(system, ()),
            lambda: (system, jax.value_and_grad(system.energy_fn(), argnums=(0, 1))),
        )
        e, (g, d) = compiled_call(fn, jnp.asarray(x), jnp.asarray(theta))
        return float(e), np.asarray(g), np.asarray(d)

    def gradient_and_zeta(self, system, wrt, x, theta, dx):
        fn = self._compiled(
            _key(system, wrt, "zeta"), lambda: (system, make_zeta(system, wrt, method="reference"))
        )
        z = compiled_call(fn, jnp.asarray(x), jnp.asarray(theta), jnp.asarray(dx))
        return self.energy_gradient_dedtheta(system, x, theta)[1], np.asarray(z)


class StructuredBackend(Backend):
    """make_gradient_and_zeta with the bonded terms in JAX or in the CPU custom call."""

    checks = frozenset({"gradient_and_zeta"})

    def __init__(self, bonded):
        super().__init__()
        self.bonded = bonded
        self.id = "structured" if bonded == "jax" else "structured-host"
        if bonded == "jax":  # test_zeta's tolerances, against the reference
            self.tol = {
                "gradient": {"norm": 1e-13},
                "zeta": {"norm": 1e-10, "per_param": (1e-9, 1e-12)},
            }
        else:  # test_xla_cpu's, which were against the pure-JAX structured path
            self.tol = {
                "gradient": {"norm": 1e-13},
                "zeta": {"norm": 1e-12, "per_param": (1e-11, 1e-12)},
            }

    def available(self):
        if self.bonded == "jax":
            return True, ""
        from timemachine.backends import xla_cpu

        ok, why = xla_cpu.available()
        return ok, f"CPU custom call unavailable: {why}"

    def gradient_and_zeta(self, system, wrt, x, theta, dx):
        fn = self._compiled(
            _key(system, wrt),
            lambda: (system, jax.jit(make_gradient_and_zeta(system, wrt, bonded=self.bonded))),
        )
        g, z = fn(jnp.asarray(x), jnp.asarray(theta), jnp.asarray(dx))
        return np.asarray(g), np.asarray(z)


class CudaBackend(Backend):
    """The CUDA kernels: built for the host (``gpu=False``) or on a GPU through CuPy."""

    checks = frozenset(
        {
            "gradient_and_zeta",
            "energy_and_dedtheta",
            "noise_free_simulate",
            "thermal_simulate",
            "repeated_simulate",
            "noise_free_run_replicas",
        }
    )
    # test_kernels_host's: each of E, ∇E, ∂E/∂θ and ζ to 1e-12, max-abs relative
    tol = {q: {"max": 1e-12} for q in ("energy", "gradient", "dedtheta", "zeta")}

    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu
        self.id = "cuda-gpu" if gpu else "cuda-host"
        self._executor = None
        if gpu:  # test_cuda_backend's: 1,000 steps, 1e-9
            self.tol = dict(self.tol, dynamics=1e-9)
            self.dynamics = {
                "noise_free_simulate": Dynamics(1000, 250, friction=5.0, window=50),
                "thermal_simulate": Dynamics(
                    1000,
                    1000,
                    extra=dict(
                        replica=1, moved=1e-2, systems=("trialanine_obc2", "villin_minimized")
                    ),
                ),
                "repeated_simulate": Dynamics(1000, 100, friction=1.0),
                "noise_free_run_replicas": Dynamics(1000, 250, extra=dict(n_replicas=3, v0_seed=5)),
            }
        else:  # test_kernels_host's: tens of steps, 1e-10
            wrt = ["torsion/*", "gb/*/radius"]
            self.tol = dict(self.tol, dynamics=1e-10)
            self.dynamics = {
                "noise_free_simulate": Dynamics(
                    40, 10, friction=50.0, window=7, wrt=wrt, extra=dict(chunk_steps=20)
                ),
                "thermal_simulate": Dynamics(
                    30, 30, wrt=wrt, extra=dict(replica=2, moved=1e-3, systems=("trialanine_obc2",))
                ),
                "repeated_simulate": Dynamics(20, 10, friction=1.0, wrt="charge/*"),
                "noise_free_run_replicas": Dynamics(
                    30, 15, friction=20.0, wrt=wrt, extra=dict(n_replicas=2, v0_seed=1)
                ),
            }

    def available(self):
        if self.gpu:
            from timemachine.backends import cuda_available

            ok, why = cuda_available()
            return ok, f"needs an NVIDIA GPU with CuPy: {why}"
        from timemachine.backends.host import host_compiler

        return host_compiler() is not None, "needs a host C++ compiler"

    def executor(self):
        if self._executor is None:
            if self.gpu:
                from timemachine.backends.cupy_backend import CupyExecutor

                self._executor = CupyExecutor()
            else:
                from timemachine.backends.host import HostExecutor, load_host_library

                self._executor = HostExecutor(load_host_library())
        return self._executor

    def _results(self, system, wrt, x, theta, dx):
        if not np.array_equal(theta, system.params):
            system = system.with_params(theta)
        return kernel_results(self.executor(), system, x, wrt, dx)

    def gradient_and_zeta(self, system, wrt, x, theta, dx):
        _, g, _, z = self._results(system, wrt, x, theta, dx)
        return g, z

    def energy_and_dedtheta(self, system, wrt, x, theta):
        e, _, d, _ = self._results(system, wrt, x, theta, np.zeros((len(wrt),) + x.shape))
        return e, d

    def _backend_cuda(self):
        """backend="cuda" on this backend's kernels: the host build stands in for CuPy."""
        return contextlib.nullcontext() if self.gpu else host_build_as_cuda()

    def simulate(self, system, x, integrator, n_steps, **kw):
        with self._backend_cuda():
            return tm.simulate(system, x, integrator, n_steps, backend="cuda", **kw)

    def run_replicas(self, system, x, integrator, n_steps, **kw):
        from timemachine.fitting import run_replicas

        with self._backend_cuda():
            return run_replicas(system, x, integrator, n_steps, backend="cuda", **kw)


BACKENDS = {
    b.id: b
    for b in (
        ReferenceBackend(),
        StructuredBackend("jax"),
        StructuredBackend("host"),
        CudaBackend(gpu=False),
        CudaBackend(gpu=True),
    )
}


# --------------------------------------------------------------------------- dynamics


_STEPS = {}


def _step_fn(system, wrt, window):
    """One step of the engine's equations around JAX's (∇E, ζ), compiled (FAST_COMPILE)
    once per (system, wrt, window)."""
    key = _key(system, wrt, window)
    if key not in _STEPS:
        gz = make_gradient_and_zeta(system, np.asarray(wrt))

        def step(carry, t, n, theta, co, wco):
            x, v, dx, dv, ring, to_fold, folded_last = carry
            g, z = gz(x, theta, dx)
            x, v = langevin_update(co, x, v, g, n)  # eqs. 3-4, the noise as an input
            if window is None:
                source = z
            else:  # eq. 9: a ring of the last k ζ's, each evicted one folded in
                ring = ring.at[t % window].set(z)
                source = window_source(wco, z, to_fold, folded_last)
                folded_last, to_fold = to_fold, ring[(t + 1) % window]
            dx, dv = sensitivity_update(co, dx, dv, source)
            return x, v, dx, dv, ring, to_fold, folded_last

        _STEPS[key] = (system, lambda *args: compiled_call(step, *args))
    return _STEPS[key][1]


def equation_run(system, x, v, integrator, wrt, n_steps, save_every, window=None, replica=0):
    """The reference trajectory: ``langevin_update`` (eqs. 3-4) and ``sensitivity_update``
    with ζ (exact, ``window`` None) or ``window_source`` (eq. 9), around JAX's ∇E and ζ,
    fed the CUDA backend's noise stream (``noise.philox_normal``) above zero temperature.

    Returns (xs, vs, dxs): x and v after each of steps 0..n_steps + 1 (one step past the
    end, for the on-step velocity), and dx/dθ at steps save_every, ..., n_steps.
    """
    wrt = np.asarray(wrt)
    co = integrator.coefficients(system.masses)
    wco = window_coefficients(integrator, window) if window is not None else None
    step = _step_fn(system, wrt, window)
    theta = jnp.asarray(system.params)
    zeros = jnp.zeros((wrt.size,) + np.shape(x))
    ring = jnp.zeros(((window or 1),) + zeros.shape)
    carry = (jnp.asarray(x), jnp.asarray(v), zeros, zeros, ring, zeros, zeros)
    xs, vs, dxs = [np.asarray(x)], [np.asarray(v)], []
    for t in range(n_steps + 1):
        n = np.zeros(np.shape(x))
        if integrator.temperature > 0:
            n = noise.philox_normal(integrator.seed, t, system.n_atoms, replica)
        carry = step(carry, t, jnp.asarray(n), theta, co, wco)
        xs.append(np.asarray(carry[0]))
        vs.append(np.asarray(carry[1]))
        if (t + 1) % save_every == 0 and t < n_steps:
            dxs.append(np.asarray(carry[2]))
    return np.array(xs), np.array(vs), np.array(dxs)
