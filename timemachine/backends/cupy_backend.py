"""backend="cuda": the CUDA kernels of ``cuda/kernels/``, loaded with CuPy.

``make_program(system, wrt, method)`` returns the chunk program ``tm.simulate`` runs,
with the same call signature and results as the JAX one (``sensitivity.program.make_chunk``): it
runs ``n_blocks`` blocks of ``save_every`` Langevin steps with exact or windowed
propagation of dx/dθ, keeping x, v, dx/dθ, dv/dθ and the window ring on the device
across steps and across chunks, and copies back only the saved frames (and dv/dθ of the
last one, so the returned state can continue a run).

The steps run as captured CUDA graphs (``CudaProgram``; ``TIMEMACHINE_CUDA_GRAPHS=0``
launches kernel by kernel): one graph launch replaces the ~20 kernel launches a step
would otherwise issue from Python, which on a system of villin's size would cost more than
the kernels themselves.

The kernels are float64 and deterministic (every sum in a fixed order; no atomics), so
the same seed gives the same bits on the same GPU. The noise is the counter-based
Philox stream of ``philox.cuh`` (``timemachine.backends.noise.philox_normal``), not
jax.random: with temperature > 0 the CUDA and JAX trajectories differ from the first
step; noise-free runs, or a JAX run fed ``philox_normal``, agree to round-off.

``CupyExecutor`` is the GPU executor of :class:`~timemachine.backends.pipeline.Pipeline`.
Launches are checked before they are issued (kernel name, argument block type, grid
extent), and so, once per chunk, are the uploaded state and the device buffers the
argument blocks point to (``Pipeline.check_buffers``); errors name the kernel and the
argument. Allocation failures and launch errors become ``SimulationError`` naming the
buffer or kernel.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np

from timemachine.backends import kernel_dir, require_cuda
from timemachine.backends.abi import DTYPES, KERNELS, check_array, device_error, struct_bytes
from timemachine.backends.pipeline import Pipeline
from timemachine.backends.tables import build_plan
from timemachine.errors import InputError, SimulationError

THREADS = 128
#: steps per captured CUDA graph at most: a block of save_every steps runs as graphs of
#: 1 step (then v_first is copied), MAX_GRAPH_STEPS steps and the remainder
MAX_GRAPH_STEPS = 128
# CUDA's limit on gridDim.y (tangent chunks, or tangents in the ζ gather)
_MAX_GRID_Y = 65535


def nvrtc_options(src_dir: str, extra=()) -> tuple[str, ...]:
    """The options RawModule hands NVRTC for ``src_dir/tm_kernels.cu`` (CuPy adds the
    architecture, ``-ftz=true`` and ``--device-as-default-execution-space``).
    tests/test_kernels_compile.py compiles the kernels with NVRTC and these options."""
    return ("-std=c++17", f"-I{src_dir}") + tuple(extra)


@functools.lru_cache(maxsize=4)
def _module(options=()):
    import cupy

    src_dir = kernel_dir()
    with open(os.path.join(src_dir, "tm_kernels.cu")) as f:
        code = f.read()
    opts = nvrtc_options(src_dir, options)
    try:
        module = cupy.RawModule(code=code, options=opts)
        module.compile()
    except Exception as exc:
        raise SimulationError(f"NVRTC could not compile {src_dir}/tm_kernels.cu: {exc}") from exc
    return module


class CupyExecutor:
    """Runs Pipeline launches on the current CuPy device."""

    name = "cuda"

    def __init__(self, options=()):
        require_cuda()
        import cupy

        self.cp = cupy
        self.xp = cupy
        self.module = _module(tuple(options))
        self._fns = {}
        self._blocks = {}
        for kernel in KERNELS:  # load every function now, not inside a graph capture
            self._function(kernel)

    def alloc(self, name, shape, dtype):
        try:
            return self.cp.zeros(shape, dtype=dtype)
        except self.cp.cuda.memory.OutOfMemoryError as exc:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            raise SimulationError(
                f"GPU out of memory allocating {name!r} {tuple(shape)} ({nbytes / 2**20:.1f} MiB): "
                f"use fewer parameters (wrt), a smaller window or method='exact'"
            ) from exc

    def upload(self, key, array):
        out = self.alloc(key, array.shape, array.dtype)
        out.set(np.ascontiguousarray(array))
        return out

    def ptr(self, array) -> int:
        if not array.flags.c_contiguous:
            raise InputError("cuda executor: arrays handed to kernels must be C-contiguous")
        return int(array.data.ptr)

    def struct(self, key, name, fields):
        """The argument block ``key`` in device memory: new, or the one made before with
        new contents (a synchronous copy on the null stream, after the launches that read
        the old ones), at the same address, so captured graphs read the new values."""
        host = struct_bytes(name, fields).view(np.uint8)
        old = self._blocks.get(key)
        if old is not None and old[0] == name:
            old[1].set(host)
            return old
        block = (name, self.upload(f"argument block {key}", host))
        self._blocks[key] = block
        return block

    def _function(self, kernel):
        fn = self._fns.get(kernel)
        if fn is None:
            fn = self._fns[kernel] = self.module.get_function(kernel)
        return fn

    def launch(self, kernel, nx, ny, block):
        want = KERNELS.get(kernel)
        if want is None:
            raise InputError(f"unknown kernel {kernel!r}; kernels: {sorted(KERNELS)}")
        name, dev = block
        if name != want:
            raise InputError(f"{kernel}: argument block is a {name}, expected a {want}")
        check_array(kernel, "argument block", dev, (DTYPES[want].itemsize,), np.uint8)
        if not (0 <= nx < 2**31 * THREADS) or not (1 <= ny <= _MAX_GRID_Y):
            raise InputError(f"{kernel}: launch extent ({nx}, {ny}) outside the CUDA grid limits")
        if nx == 0:
            return
        grid = (-(-int(nx) // THREADS), int(ny))
        try:
            self._function(kernel)(grid, (THREADS,), (dev,))
        except Exception as exc:
            raise device_error(kernel, exc) from exc

    def zero(self, array):
        """Set ``array`` to 0: a memset on the current stream (capturable in a graph)."""
        stream = self.cp.cuda.get_current_stream()
        self.cp.cuda.runtime.memsetAsync(int(array.data.ptr), 0, int(array.nbytes), stream.ptr)

    def capture(self, fn):
        """A CUDA graph of the launches ``fn()`` issues, captured on a fresh stream (so a
        failed capture leaves the stream the run uses untouched); ``graph.launch()`` runs
        it on the current stream.

        Raises:
            SimulationError: the capture failed (the message names why).
        """
        stream = self.cp.cuda.Stream(non_blocking=True)
        try:
            with stream:
                stream.begin_capture()
                try:
                    fn()
                finally:
                    graph = stream.end_capture()
            graph.upload(self.cp.cuda.get_current_stream())
        except Exception as exc:
            raise device_error("CUDA graph capture", exc) from exc
        return _CupyGraph(self, graph, stream)

    def to_host(self, array):
        return self.cp.asnumpy(array)

    def synchronize(self, what):
        try:
            self.cp.cuda.get_current_stream().synchronize()
        except Exception as exc:
            raise device_error(what, exc) from exc


class _CupyGraph:
    """A captured CUDA graph; ``launch()`` runs it on the current stream."""

    def __init__(self, executor, graph, stream):
        self.ex, self.graph, self._stream = executor, graph, stream  # the stream outlives it

    def launch(self):
        try:
            self.graph.launch(self.ex.cp.cuda.get_current_stream())
        except Exception as exc:
            raise device_error("CUDA graph launch", exc) from exc


class DeviceRing:
    """The window ring (k, P, N, 3) of a CUDA run, left on the device until asked for.

    ``np.asarray`` copies it to the host while the run it belongs to has not advanced
    past it; afterwards it raises SimulationError (the device buffer moved on).
    """

    def __init__(self, program, version):
        self._program, self._version = program, version
        ring = program.pipeline.ring
        self.shape, self.dtype = tuple(ring.shape), np.dtype(ring.dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ndim = len(self.shape)

    def __len__(self):
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        if self._program.version != self._version:
            raise SimulationError(
                "this window state's ζ ring lives on the GPU and its run has advanced since; "
                "continue from the trajectory's latest final_state"
            )
        out = self._program.pipeline.ex.to_host(self._program.pipeline.ring)
        return out if dtype is None else out.astype(dtype)


def graphs_enabled() -> bool:
    """Whether CudaProgram captures its steps in CUDA graphs by default:
    ``TIMEMACHINE_CUDA_GRAPHS=0`` launches the kernels one by one instead."""
    return os.environ.get("TIMEMACHINE_CUDA_GRAPHS", "1") != "0"


class CudaProgram:
    """The chunk program of ``simulate`` on the kernels (see module docstring).

    With ``graphs`` (default ``graphs_enabled()``) the steps run as captured CUDA graphs,
    one launch for up to ``MAX_GRAPH_STEPS`` steps instead of ~20 launches per step from
    Python; the kernels and their order are the same, so are the bits. A graph holds the
    addresses of the argument blocks, which the pipeline rewrites in place (new θ,
    integrator or replica), so one capture serves the whole life of the program; a graph
    is captured again only if a block were replaced (``Pipeline.blocks``). If a capture
    fails, a RuntimeWarning says why and the program launches kernel by kernel from then
    on.
    """

    def __init__(self, system, wrt, method, executor=None, graphs=None):
        if method not in ("exact", "window"):
            raise InputError(f"method must be 'exact' or 'window', got {method!r}")
        self.plan = build_plan(system, wrt)
        self.method = method
        self.ex = executor if executor is not None else CupyExecutor()
        self.graphs = graphs_enabled() if graphs is None else bool(graphs)
        self.graphs = self.graphs and hasattr(self.ex, "capture")
        self.pipeline = None
        self.version = 0
        self._last = None
        self._theta = None
        self._frames = None
        self._graphs = {}  # steps -> (captured graph, the block handles it was captured with)

    def _ensure_pipeline(self, theta, window):
        if self.pipeline is None or self.pipeline.window != window:
            self.pipeline = Pipeline(self.plan, self.ex, theta, window=window)
            self._graphs = {}
            self._theta = np.array(theta)
        elif not np.array_equal(theta, self._theta):
            self.pipeline.set_params(theta)
            self._theta = np.array(theta)

    def _upload_state(self, state):
        pl, n, p = self.pipeline, self.plan.n_atoms, self.plan.n_params
        # (state field, device buffer, shape, kernel, argument)
        fields = [
            ("x", pl.x, (n, 3), "tm_langevin_primal", "x"),
            ("v", pl.v, (n, 3), "tm_langevin_primal", "v"),
        ]
        sens = "tm_sens_exact" if self.method == "exact" else "tm_sens_window"
        if p:
            fields += [
                ("dx_dtheta", pl.dx, (p, n, 3), sens, "dx"),
                ("dv_dtheta", pl.dv, (p, n, 3), sens, "dv"),
            ]
        if self.method == "window":
            fields += [
                ("zeta_window", pl.ring, (pl.window, p, n, 3), sens, "ring"),
                ("to_fold", pl.to_fold, (p, n, 3), sens, "to_fold"),
                ("folded_last", pl.folded_last, (p, n, 3), sens, "folded_last"),
            ]
        for name, dst, shape, kernel, arg in fields:
            value = np.asarray(getattr(state, name))
            check_array(kernel, f"{arg} (state.{name})", value, shape, value.dtype)
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise InputError(f"{kernel}: argument {arg!r} (state.{name}) must be finite floats")
            _copy_in(self.ex, dst, np.ascontiguousarray(value, dtype=np.float64))
        _copy_in(self.ex, pl.step, np.array([int(np.asarray(state.step))], dtype=np.int64))

    def _steps(self, n):
        """``n`` Langevin steps of the pipeline: graphs of up to MAX_GRAPH_STEPS steps, or
        launch by launch."""
        pl = self.pipeline
        while n > 0:
            k = min(n, MAX_GRAPH_STEPS)
            graph = self._graph(k) if self.graphs else None
            if graph is not None:
                graph.launch()
            else:
                for _ in range(k):
                    pl.step_once(self.method)
            n -= k

    def _graph(self, k):
        pl = self.pipeline
        blocks = pl.blocks()
        cached = self._graphs.get(k)
        # the same handles (kept alive here, so identity is address): the graph is valid
        if cached is not None and len(cached[1]) == len(blocks):
            if all(a is b for a, b in zip(cached[1], blocks, strict=True)):
                return cached[0]
        try:
            graph = self.ex.capture(lambda: [pl.step_once(self.method) for _ in range(k)])
        except SimulationError as exc:
            warnings.warn(
                f"{exc}; launching the kernels one by one from now on "
                f"(TIMEMACHINE_CUDA_GRAPHS=0 skips the capture)",
                RuntimeWarning,
                stacklevel=3,
            )
            self.graphs = False
            return None
        self._graphs[k] = (graph, blocks)
        return graph

    def _frame_buffers(self, capacity):
        if self._frames is None or self._frames[0].shape[0] != capacity:
            n, p = self.plan.n_atoms, self.plan.n_params
            alloc = self.ex.alloc
            self._frames = (
                alloc("frames.x", (capacity, n, 3), np.float64),
                alloc("frames.v", (capacity, n, 3), np.float64),
                alloc("frames.dx_dtheta", (capacity, max(p, 1), n, 3), np.float64),
                alloc("frames.v_first", (capacity, n, 3), np.float64),
                alloc("frames.potential_energy", (capacity,), np.float64),
            )
        return self._frames

    def __call__(
        self, capacity, state, n_blocks, save_every, theta, coeffs, wcoeffs, seed, replica
    ):
        n_blocks, save_every = int(n_blocks), int(save_every)
        window = int(np.shape(state.zeta_window)[0]) if self.method == "window" else None
        self._ensure_pipeline(np.asarray(theta, dtype=np.float64), window)
        pl = self.pipeline
        fold = float(np.asarray(wcoeffs.fold)) if wcoeffs is not None else 0.0
        pl.set_integrator(coeffs, int(np.asarray(seed)), int(np.asarray(replica)), fold)
        if state is not self._last:
            self._upload_state(state)
        pl.check_buffers()
        step0 = int(np.asarray(state.step))
        xs, vs, dxs, v_first, pe = self._frame_buffers(int(capacity))
        p = self.plan.n_params
        xp = self.ex.xp
        for j in range(n_blocks):
            self._steps(1)
            v_first[j] = pl.v
            self._steps(save_every - 1)
            xs[j] = pl.x
            vs[j] = pl.v
            if p:
                dxs[j] = pl.dx
            pl.gradient()
            pe[j] = xp.sum(pl.energies[: self.plan.n_energies])
        v_look = pl.lookahead_v()
        if hasattr(self.ex, "synchronize"):
            self.ex.synchronize(f"the {n_blocks * save_every} steps after step {step0}")
        host = self.ex.to_host
        b = n_blocks
        frames_x, frames_v = host(xs[:b]), host(vs[:b])
        frames_dx = host(dxs[:b]) if p else np.zeros((b, 0, self.plan.n_atoms, 3))
        steps = step0 + save_every * np.arange(1, b + 1, dtype=np.int64)
        frames = (frames_x, frames_v, frames_dx, steps, host(v_first[:b]), host(pe[:b]))
        self.version += 1
        dv = host(pl.dv) if p else np.zeros_like(frames_dx[-1])
        step = np.asarray(steps[-1], dtype=np.int64)
        # the caller's ExactState or WindowState, advanced (the backend does not define them)
        final = state._replace(
            x=frames_x[-1], v=frames_v[-1], dx_dtheta=frames_dx[-1], dv_dtheta=dv, step=step
        )
        if self.method == "window":
            final = final._replace(
                zeta_window=DeviceRing(self, self.version),
                to_fold=host(pl.to_fold),
                folded_last=host(pl.folded_last),
            )
        self._last = final
        return final, frames, host(v_look)


def _copy_in(executor, dst, host):
    if executor.xp is np:
        dst[...] = host.reshape(dst.shape)
    else:
        dst.set(host.reshape(dst.shape))


def make_program(system, wrt, method, executor=None, graphs=None) -> CudaProgram:
    """The ``simulate`` chunk program on the CUDA kernels for θ[wrt] and ``method``.

    ``executor`` defaults to the GPU (CupyExecutor); the host executor
    (``timemachine.backends.host.HostExecutor``) runs the same kernels on the CPU, its
    "graphs" being recorded launch sequences. ``graphs``: see ``CudaProgram``.
    """
    return CudaProgram(system, np.asarray(wrt, dtype=np.int64), method, executor, graphs)
