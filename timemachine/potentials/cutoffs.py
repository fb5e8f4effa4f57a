"""LJ + Coulomb with a cutoff, as OpenMM's NonbondedForce ``CutoffPeriodic`` and
``CutoffNonPeriodic``: reaction-field electrostatics, the optional LJ switch and the
long-range dispersion correction.

Pairs (i, j) that interact at full strength and lie within the cutoff r_c (in a
rectangular periodic box, the minimum image of x_j - x_i) contribute

    4 ε_ij ((σ_ij/r)¹² - (σ_ij/r)⁶) S(r) + k_e q_i q_j (1/r + k_rf r² - c_rf),
    k_rf = (ε_rf - 1) / ((2 ε_rf + 1) r_c³),   c_rf = 3 ε_rf / ((2 ε_rf + 1) r_c),

with OpenMM's switch S(r) = 1 - 10 t³ + 15 t⁴ - 6 t⁵, t = (r - r_sw)/(r_c - r_sw), for
r > r_sw (S = 1 without it) and ε_rf the reaction-field dielectric (78.3 by default).
The scaled 1-4 exceptions are plain Coulomb + LJ without cutoff, reaction field or
periodic image; the excluded pairs (1-2, 1-3) contribute nothing (as measured against
OpenMM 8's Reference platform, ``tests/test_periodic.py``). In a periodic box the
dispersion correction adds E_disp = 8π N² (⟨ε σ¹²⟩/(9 r_c⁹) - ⟨ε σ⁶⟩/(3 r_c³) + ⟨ε I_sw⟩)/V,
averaged over all N(N+1)/2 atom pairs (self pairs included, as OpenMM's
``NonbondedForceImpl::calcDispersionCorrection``), with I_sw the switch's correction.

The pair sum is evaluated over row blocks of ``block`` atoms against all N (a
``lax.map``), so memory stays O(block · N) while the cost is O(N²): the dense reference,
exact for any box, that a neighbour list must reproduce.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from timemachine.constants import COULOMB
from timemachine.potentials.nonbonded import safe_sqrt


def minimum_image(d, box):
    """d - box · round(d / box): the nearest periodic image of displacements d (..., 3) in
    a rectangular box (3,) nm."""
    return d - box * jnp.round(d / box)


def lj_switch(r, switch_distance, cutoff):
    """OpenMM's switching function S(r) (1 below ``switch_distance``, 0 at ``cutoff``)."""
    t = jnp.clip((r - switch_distance) / (cutoff - switch_distance), 0.0, 1.0)
    return 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t))


def reaction_field_constants(cutoff, dielectric):
    """(k_rf nm⁻³, c_rf nm⁻¹) of OpenMM's reaction field."""
    k_rf = (dielectric - 1.0) / ((2.0 * dielectric + 1.0) * cutoff**3)
    c_rf = 3.0 * dielectric / ((2.0 * dielectric + 1.0) * cutoff)
    return k_rf, c_rf


def _pair_sum(d, allowed, q_i, q_j, sig_i, sig_j, sqrt_eps_i, sqrt_eps_j, cutoff,
              switch_distance, k_rf, c_rf, alpha):  # fmt: skip
    """Σ over the ``allowed`` pairs of displacement d (..., 3) within the cutoff of LJ
    (Lorentz-Berthelot, switched) + Coulomb (reaction field, or PME's erfc with
    ``alpha``); the per-atom arrays broadcast against d's leading axes."""
    r2 = jnp.sum(d * d, axis=-1)
    inside = allowed & (r2 < cutoff * cutoff)
    r = jnp.sqrt(jnp.where(inside, r2, 1.0))
    s6 = (0.5 * (sig_i + sig_j) / r) ** 6
    lj = 4.0 * sqrt_eps_i * sqrt_eps_j * (s6 * s6 - s6)
    if switch_distance is not None:
        lj = lj * lj_switch(r, switch_distance, cutoff)
    qq = COULOMB * q_i * q_j
    if alpha is None:
        coul = qq * (1.0 / r + k_rf * r * r - c_rf)
    else:
        coul = qq * jax.scipy.special.erfc(alpha * r) / r
    return jnp.sum(jnp.where(inside, lj + coul, 0.0))


def _allowed_rows(allowed, i, n):
    """(B, N) bool: which partners rows ``i`` (B,) may take, from ``allowed``: the (N, N)
    bool mask of full-strength pairs, or an (N, M) ``exclusion_table`` (its rows'
    excluded partners set False in a row block of ones: O(B N), no (N, N) array)."""
    if allowed.dtype == jnp.bool_:
        return allowed[i]
    excluded = allowed[i]
    excluded = jnp.where(excluded >= 0, excluded, n)  # padding: dropped
    rows = jnp.ones((i.shape[0], n), bool)
    rows = rows.at[jnp.arange(i.shape[0])[:, None], excluded].set(False, mode="drop")
    return rows & (jnp.arange(n)[None, :] != i[:, None])


def cutoff_pair_energy(x, charge, sigma, epsilon, allowed, box, cutoff, dielectric,
                       switch_distance=None, alpha=None, block=128):  # fmt: skip
    """The pair sum over full-strength pairs within the cutoff: LJ (switched) plus the
    reaction field (module docstring), or with ``alpha`` PME's direct-space Coulomb
    k_e q_i q_j erfc(α r)/r.

    Args:
      x: (N, 3) nm; charge (e), sigma (nm), epsilon (kJ/mol): (N,).
      allowed: the pairs at full strength (not excluded, not 1-4): an (N, N) bool mask
        (True for them), or the (N, M) int ``exclusion_table`` of the others.
      box: (3,) nm edge lengths, or None (``CutoffNonPeriodic``: no images).
      cutoff: r_c, nm; dielectric: ε_rf; switch_distance: r_sw nm or None.
      alpha: the Ewald splitting parameter α (nm⁻¹), or None for the reaction field.
      block: rows per block of the pair sum.

    Returns: scalar energy, kJ/mol.
    """
    n = x.shape[0]
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    sqrt_eps = safe_sqrt(epsilon)
    pad = -n % block
    rows = jnp.arange(n + pad).reshape(-1, block)
    allowed = jnp.asarray(allowed)  # gathered by rows: no padded constant copy to fold

    def one_block(idx):
        i = jnp.minimum(idx, n - 1)
        m = _allowed_rows(allowed, i, n) & (idx < n)[:, None]
        d = x[i][:, None, :] - x[None, :, :]
        if box is not None:
            d = minimum_image(d, box)
        return _pair_sum(d, m, charge[i][:, None], charge[None, :], sigma[i][:, None],
                         sigma[None, :], sqrt_eps[i][:, None], sqrt_eps[None, :], cutoff,
                         switch_distance, k_rf, c_rf, alpha)  # fmt: skip

    # rematerialised per block: reverse mode (forces) and forward-over-reverse (ζ) keep
    # one block's intermediates at a time, not all N² of them
    one_block = jax.checkpoint(one_block)
    return 0.5 * jnp.sum(jax.lax.map(one_block, rows))


def _switch_integral(r, rs, rc, sigma):
    """The indefinite integral over r of 4π r² · 4(σ¹²/r¹² - σ⁶/r⁶)(S(r) - 1), up to the
    constants that ``dispersion_correction`` divides out, written as OpenMM's
    ``NonbondedForceImpl::evalIntegral`` evaluates it (the same expression)."""
    a = 1.0 / (rc - rs)
    a2, a3 = a * a, a * a * a
    sig6 = sigma**6
    rs2, rs3 = rs * rs, rs * rs * rs
    r2, r3 = r * r, r * r * r
    r4, r5, r6 = r3 * r, r3 * r2, r3 * r3
    r9 = r6 * r3
    return sig6 * a3 * (
        (sig6 * (rs3 * 28 * (6 * rs2 * a2 + 15 * rs * a + 10)
                 - r * rs2 * 945 * (rs2 * a2 + 2 * rs * a + 1)
                 + r2 * rs * 1080 * (2 * rs2 * a2 + 3 * rs * a + 1)
                 - r3 * 420 * (6 * rs2 * a2 + 6 * rs * a + 1)
                 + r4 * 756 * (2 * rs * a2 + a) - r5 * 378 * a2)
         - r6 * (rs3 * 84 * (6 * rs2 * a2 + 15 * rs * a + 10)
                 - r * rs2 * 3780 * (rs2 * a2 + 2 * rs * a + 1)
                 + r2 * rs * 7560 * (2 * rs2 * a2 + 3 * rs * a + 1))) / (252 * r9)
        - jnp.log(r) * 10 * (6 * rs2 * a2 + 6 * rs * a + 1)
        + r * 15 * (2 * rs * a2 + a) - r2 * 3 * a2
    )  # fmt: skip


def dispersion_correction(sigma, epsilon, counts, box, cutoff, switch_distance=None):
    """OpenMM's long-range dispersion correction E_disp (kJ/mol) of a periodic box.

    Args:
      sigma, epsilon: (C,) σ (nm) and ε (kJ/mol) of the C atom classes (atoms sharing both
        parameters; θ-dependent, so differentiable).
      counts: (C,) atoms in each class (numpy; N = their sum).
      box: (3,) nm; cutoff: nm; switch_distance: nm or None.

    The average is over all N(N+1)/2 atom pairs i ≤ j with Lorentz-Berthelot mixing:
    n_a(n_a + 1)/2 pairs within class a, n_a n_b between classes a < b, as OpenMM's
    ``NonbondedForceImpl::calcDispersionCorrection`` counts them.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    weight = np.triu(np.outer(counts, counts), 1) + np.diag(counts * (counts + 1) / 2)
    sig = 0.5 * (sigma[:, None] + sigma[None, :])
    sqrt_eps = safe_sqrt(epsilon)
    eps = sqrt_eps[:, None] * sqrt_eps[None, :]
    s6 = sig**6
    total = jnp.sum(weight * eps * s6 * s6) / (9.0 * cutoff**9)
    total = total - jnp.sum(weight * eps * s6) / (3.0 * cutoff**3)
    if switch_distance is not None:
        rs, rc = switch_distance, cutoff
        integral = _switch_integral(rc, rs, rc, sig) - _switch_integral(rs, rs, rc, sig)
        total = total + jnp.sum(weight * eps * integral)
    return 8.0 * n * n * jnp.pi * total / (n * (n + 1) / 2.0) / jnp.prod(box)


# --------------------------------------------------------------------------- PME


def _bspline_weights(frac, order):
    """(..., order) cardinal B-spline values M_n(frac + j), j = 0 .. n-1, for frac in
    [0, 1): the weights of grid points floor(u) - j (Essmann et al., J. Chem. Phys. 103,
    8577 (1995), eq. 4.1), by the recursion M_k(y) = (y M_{k-1}(y) + (k - y) M_{k-1}(y -
    1)) / (k - 1) from M_2(y) = 1 - |y - 1|."""
    w = [frac, 1.0 - frac]  # M_2(frac), M_2(frac + 1)
    for k in range(3, order + 1):
        new = []
        for j in range(k):
            y = frac + j
            left = w[j] if j < k - 1 else 0.0  # M_{k-1}(y)
            right = w[j - 1] if j >= 1 else 0.0  # M_{k-1}(y - 1)
            new.append((y * left + (k - y) * right) / (k - 1))
        w = new
    return jnp.stack(w, axis=-1)


def bspline_moduli(k, order) -> np.ndarray:
    """(k,) |Σ_j M_n(j) exp(2πi m j / k)|² for m = 0 .. k-1, the interpolation's
    correction b(m) of Essmann et al.; where it vanishes (m = k/2 for odd orders and even
    k) it is replaced by the mean of its neighbours, as OpenMM's Reference platform does."""
    from math import comb, factorial

    def m_n(y):  # the cardinal B-spline of order n at y, closed form
        return sum((-1) ** i * comb(order, i) * max(y - i, 0.0) ** (order - 1)
                   for i in range(order + 1)) / factorial(order - 1)  # fmt: skip

    values = np.array([m_n(j) for j in range(1, order)])
    m = np.arange(k)[:, None]
    arg = 2.0 * np.pi * m * np.arange(1, order)[None, :] / k
    mod = (values * np.cos(arg)).sum(1) ** 2 + (values * np.sin(arg)).sum(1) ** 2
    small = mod < 1e-7
    mod[small] = 0.5 * (np.roll(mod, 1)[small] + np.roll(mod, -1)[small])
    return mod


def _pme_stencil(x, box, grid, order):
    """(frac (N, 3) in [0, 1), idx: three (N, order) grid indices): atom i's B-spline
    weights along axis d are ``_bspline_weights(frac[i, d])``, at grid points idx[d][i]
    (floor(u) - j, wrapped), u = K x / L its scaled fractional coordinate."""
    u = x / box
    u = (u - jnp.floor(u)) * jnp.asarray(grid, x.dtype)  # (N, 3) in [0, K)
    base = jnp.floor(u)
    frac = u - base
    base = base.astype(jnp.int32)
    j = jnp.arange(order)
    idx = [(base[:, d, None] - j[None, :]) % grid[d] for d in range(3)]  # (N, n) each
    return frac, idx


def _pme_kernel(box, alpha, grid, order):
    """(K_x, K_y, K_z) exp(-π² |m|² / α²) / (|m|² b_x b_y b_z), zero at m = 0: the
    reciprocal energy's weight of each of the FFT's frequencies."""
    freq = [np.fft.fftfreq(g, 1.0 / g) for g in grid]  # integers 0..K/2, -K/2+1..-1
    moduli = [bspline_moduli(g, order) for g in grid]
    m = [jnp.asarray(freq[d]) / box[d] for d in range(3)]
    m2 = m[0][:, None, None] ** 2 + m[1][None, :, None] ** 2 + m[2][None, None, :] ** 2
    b = moduli[0][:, None, None] * moduli[1][None, :, None] * moduli[2][None, None, :]
    nonzero = np.ones(grid, dtype=bool)
    nonzero[0, 0, 0] = False
    m2_safe = jnp.where(nonzero, m2, 1.0)
    return jnp.where(nonzero, jnp.exp(-(np.pi**2) * m2_safe / alpha**2) / (m2_safe * b), 0.0)


def pme_reciprocal_energy(x, charge, box, alpha, grid, order=5):
    """The smooth-PME reciprocal energy (kJ/mol) of charges in a rectangular box:

        E = k_e / (2π V) Σ_{m ≠ 0} exp(-π² |m|² / α²) / |m|² · |F(Q)(m)|² / (b_x b_y b_z),

    Q the charges spread on the (K_x, K_y, K_z) ``grid`` with B-splines of ``order``,
    F the discrete Fourier transform (``jnp.fft.fftn``), m = (m_x/L_x, m_y/L_y, m_z/L_z)
    over the FFT's frequencies and b the moduli of ``bspline_moduli``. Differentiable in
    x and the charges (forward and reverse mode through the FFT).
    """
    grid = tuple(int(g) for g in grid)
    frac, idx = _pme_stencil(x, box, grid, order)
    w = _bspline_weights(frac, order)  # (N, 3, n)
    weight = (charge[:, None, None, None] * w[:, 0, :, None, None] * w[:, 1, None, :, None]
              * w[:, 2, None, None, :])  # fmt: skip
    ix = jnp.broadcast_to(idx[0][:, :, None, None], weight.shape)
    iy = jnp.broadcast_to(idx[1][:, None, :, None], weight.shape)
    iz = jnp.broadcast_to(idx[2][:, None, None, :], weight.shape)
    q_grid = jnp.zeros(grid, x.dtype).at[ix, iy, iz].add(weight)
    f = jnp.fft.fftn(q_grid)
    s2 = f.real**2 + f.imag**2
    kernel = _pme_kernel(box, alpha, grid, order)
    volume = box[0] * box[1] * box[2]
    return COULOMB / (2.0 * np.pi * volume) * jnp.sum(kernel * s2)


def _pme_weights(x, box, grid, order, second=False):
    """Atom i's B-spline stencil: (w, dw[, ddw], idx) with w (N, 3, order) the weights
    along each axis, dw their x-derivatives (nm⁻¹), ddw the second (nm⁻², with
    ``second``) and idx (three (N, order) grid indices, ``_pme_stencil``'s)."""
    frac, idx = _pme_stencil(x, box, grid, order)
    ones = jnp.ones_like(frac)
    spline = lambda f: _bspline_weights(f, order)  # noqa: E731
    w, dw = jax.jvp(spline, (frac,), (ones,))  # M and dM/du
    scale = jnp.asarray(grid, x.dtype) / box  # du/dx per axis
    out = (w, dw * scale[None, :, None])
    if second:
        ddw = jax.jvp(lambda f: jax.jvp(spline, (f,), (ones,))[1], (frac,), (ones,))[1]
        out = out + (ddw * (scale * scale)[None, :, None],)
    return out + (idx,)


def _pme_potential_fn(box, alpha, grid, order):
    """``potential(Q (..., K_x, K_y, K_z)) -> Ψ = ∂E/∂Q`` (the same shape): the
    convolution of ``pme_reciprocal_energy``'s quadratic form, (k_e N_g / π V)
    F⁻¹(kernel · F(Q)), batched over leading axes.

    One grid: one real FFT pair. A batch (P, K_x, K_y, K_z) of P ≥ 2 (the ζ step's
    tangent grids): two grids per complex FFT pair, Z = Q_a/s_a + i Q_b/s_b. The kernel
    is real and even (kernel(m) = kernel(-m)), so F⁻¹(kernel · F(Z)) = Ψ_a/s_a + i Ψ_b/s_b
    exactly, half the transforms of the real pairs' (and fewer passes than XLA's
    inverse real FFT). s = each grid's largest |Q| puts both parts on one scale, so
    each keeps the round-off of a transform of its own (the other's ~1e-16 of s); a
    zero grid gives exactly zero."""
    volume = box[0] * box[1] * box[2]
    factor = COULOMB * (grid[0] * grid[1] * grid[2]) / (np.pi * volume)
    full = _pme_kernel(box, alpha, grid, order)
    half = full[:, :, : grid[2] // 2 + 1]
    axes = (-3, -2, -1)

    def potential(q_grid):
        if q_grid.ndim != 4 or q_grid.shape[0] < 2:
            return factor * jnp.fft.irfftn(half * jnp.fft.rfftn(q_grid, axes=axes), s=grid,
                                           axes=axes)  # fmt: skip
        p = q_grid.shape[0]
        scale = jnp.max(jnp.abs(q_grid), axis=(1, 2, 3))  # 0: a zero grid, Ψ = 0 exactly
        q = q_grid / jnp.where(scale > 0, scale, 1.0)[:, None, None, None]
        if p % 2:
            q = jnp.concatenate([q, jnp.zeros((1,) + q.shape[1:], q.dtype)])
        z = jax.lax.complex(q[0::2], q[1::2])
        out = jnp.fft.ifftn(full * jnp.fft.fftn(z, axes=axes), axes=axes)
        psi = jnp.stack([out.real, out.imag], axis=1).reshape(q.shape)[:p]
        return (factor * scale)[:, None, None, None] * psi

    return potential


def pme_reciprocal_gradient(x, charge, box, alpha, grid, order=5, host=None):
    """∇_x of ``pme_reciprocal_energy`` (N, 3) kJ/mol/nm for plain MD, written out: the
    charges spread on the grid, Ψ = ∂E/∂Q by one real FFT pair, and ∇_i E = q_i Σ_g Ψ(g)
    ∇W_i(g) (``pme_reciprocal_gradient_and_zeta``'s notation). ``host``: None (XLA's
    scatter and gather; ``jax.grad`` of the energy is the reference), or an object with
    ``pme_charge_spread`` and ``pme_force_gather`` (the CPU custom call,
    ``timemachine.backends.xla_cpu``, passed in from above this layer) that replace them.
    """
    grid = tuple(int(g) for g in grid)
    if host is None:
        return jax.grad(pme_reciprocal_energy)(x, charge, box, alpha, grid, order)
    w, dw, idx = _pme_weights(x, box, grid, order)
    idx = jnp.stack(idx, axis=1)  # (N, 3, n)
    q_grid = host.pme_charge_spread(w, dw, idx, charge, grid)
    psi = _pme_potential_fn(box, alpha, grid, order)(q_grid)
    return host.pme_force_gather(psi, w, dw, idx, charge)


def pme_reciprocal_gradient_and_zeta(x, charge, box, alpha, grid, dx, dq, order=5, host=None,
                                     elements_per_block=1 << 21):  # fmt: skip
    """∇_x of ``pme_reciprocal_energy`` (N, 3) kJ/mol/nm and its derivatives along P
    tangents at once, (P, N, 3): ζ_p = H dx_p + ∂(∇E)/∂q · dq_p, written out rather than
    linearized (one batched spread, FFT and gather for all P, where autodiff runs them
    per tangent).

    With W_i(g) atom i's B-spline stencil (order³ grid points), Q = Σ_j q_j W_j the
    spread charges and Ψ = ∂E/∂Q = (k_e N_g / π V) F⁻¹(kernel · F(Q)) the grid
    potential (the convolution of ``pme_reciprocal_energy``'s quadratic form):

        ∇_i E = q_i Σ_g Ψ(g) ∇W_i(g),
        ζ_p,i = dq_p,i Σ_g Ψ ∇W_i + q_i Σ_g Ψ ∇∇W_i · dx_p,i + q_i Σ_g δΨ_p(g) ∇W_i(g),
        δΨ_p = (k_e N_g / π V) F⁻¹(kernel · F(δQ_p)),  δQ_p = Σ_j dq_p,j W_j + q_j ∇W_j · dx_p,j.

    The spreads are one scatter of (atoms × order³, P) rows, the FFTs real (``rfftn``,
    batched over P) and the gathers one (atoms × order³, P) gather, over blocks of atoms
    of ``elements_per_block`` / (order³ P) (memory O(block · order³ · P + grid · P)).

    Args:
      x: (N, 3) nm; charge: (N,) e; box: (3,) nm; alpha: nm⁻¹; grid: (K_x, K_y, K_z).
      dx: (P, N, 3) position tangents; dq: (P, N) charge tangents (e per unit θ_p).
      host: None, or an object with ``pme_charge_spread``, ``pme_field_gather``,
        ``pme_spread`` and ``pme_gather`` (the CPU custom call,
        ``timemachine.backends.xla_cpu``, passed in from above this layer) that replace
        XLA's scatters and gathers; this function's XLA path is their reference.

    Returns: (grad (N, 3), ζ (P, N, 3)).
    """
    grid = tuple(int(g) for g in grid)
    n, p = x.shape[0], dx.shape[0]
    n_grid = grid[0] * grid[1] * grid[2]
    w, dw, ddw, idx = _pme_weights(x, box, grid, order, second=True)  # (N, 3, n) each
    potential = _pme_potential_fn(box, alpha, grid, order)  # (..., K_x, K_y, K_z) -> Ψ

    if host is not None:
        # the charges' spread, the field and curvature gathers and the tangents' spread
        # and gather in compiled code (separable stencils, no (N, n³) arrays)
        stencil_idx = jnp.stack(idx, axis=1)  # (N, 3, n)
        psi = potential(host.pme_charge_spread(w, dw, stencil_idx, charge, grid))
        g0, h0 = host.pme_field_gather(psi, w, dw, ddw, stencil_idx)
        grad = charge[:, None] * g0
        if p == 0:
            return grad, jnp.zeros((0, n, 3), x.dtype)
        d_grid = host.pme_spread(w, dw, stencil_idx, charge, dq, dx, grid)
        field = host.pme_gather(potential(d_grid), w, dw, stencil_idx)
        return grad, _pme_zeta(charge, field, h0, g0, dx, dq)

    def outer(a, b, c):  # (N, n) × 3 -> (N, n³)
        return (a[:, :, None, None] * b[:, None, :, None] * c[:, None, None, :]).reshape(n, -1)

    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    gx, gy, gz = dw[:, 0], dw[:, 1], dw[:, 2]
    hx, hy, hz = ddw[:, 0], ddw[:, 1], ddw[:, 2]
    stencil = outer(wx, wy, wz)  # (N, S)
    d_stencil = jnp.stack([outer(gx, wy, wz), outer(wx, gy, wz), outer(wx, wy, gz)], -1)
    dd_stencil = jnp.stack([
        jnp.stack([outer(hx, wy, wz), outer(gx, gy, wz), outer(gx, wy, gz)], -1),
        jnp.stack([outer(gx, gy, wz), outer(wx, hy, wz), outer(wx, gy, gz)], -1),
        jnp.stack([outer(gx, wy, gz), outer(wx, gy, gz), outer(wx, wy, hz)], -1),
    ], -2)  # (N, S, 3, 3)  # fmt: skip
    flat = ((idx[0][:, :, None, None] * grid[1] + idx[1][:, None, :, None]) * grid[2]
            + idx[2][:, None, None, :]).reshape(n, -1)  # (N, S)  # fmt: skip

    q_grid = jnp.zeros(n_grid, x.dtype).at[flat].add(charge[:, None] * stencil)
    psi = potential(q_grid.reshape(grid)).reshape(-1)
    patch = psi[flat]  # (N, S)
    # elementwise products and sums: XLA's CPU dots of this shape are far slower
    g0 = jnp.sum(patch[:, :, None] * d_stencil, axis=1)  # Σ Ψ ∇W (N, 3)
    h0 = jnp.sum(patch[:, :, None, None] * dd_stencil, axis=1)  # Σ Ψ ∇∇W (N, 3, 3)
    grad = charge[:, None] * g0
    if p == 0:
        return grad, jnp.zeros((0, n, 3), x.dtype)

    # tangents, atoms in blocks: coefficients of (W, ∂_x W, ∂_y W, ∂_z W) per tangent
    s = stencil.shape[1]
    block = int(max(1, min(n, elements_per_block // (s * p))))
    pad = -n % block
    basis = jnp.concatenate([stencil[..., None], d_stencil], -1)  # (N, S, 4)
    coef = jnp.concatenate([dq[:, :, None], charge[None, :, None] * dx], -1)  # (P, N, 4)
    coef = jnp.moveaxis(coef, 0, -1)  # (N, 4, P)

    def blocks(a):
        a = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
        return a.reshape((-1, block) + a.shape[1:])

    def spread(acc, args):
        b, c, f = args
        values = jnp.einsum("nsc,ncp->nsp", b, c).reshape(-1, p)
        return acc.at[f.reshape(-1)].add(values), None

    d_grid, _ = jax.lax.scan(spread, jnp.zeros((n_grid, p), x.dtype),
                             (blocks(basis), blocks(coef), blocks(flat)))  # fmt: skip
    d_psi = potential(d_grid.T.reshape((p,) + grid)).reshape(p, n_grid).T  # (N_g, P)

    def gather(args):
        ds, f = args
        return jnp.einsum("nsp,nsd->pnd", d_psi[f], ds)

    field = jax.lax.map(gather, (blocks(d_stencil), blocks(flat)))  # (nb, P, B, 3)
    field = jnp.moveaxis(field, 1, 0).reshape(p, -1, 3)[:, :n]
    return grad, _pme_zeta(charge, field, h0, g0, dx, dq)


def _pme_zeta(charge, field, h0, g0, dx, dq):
    """ζ (P, N, 3) from the tangents' field Σ δΨ_p ∇W (P, N, 3), Σ Ψ ∇∇W (N, 3, 3) and
    Σ Ψ ∇W (N, 3)."""
    hessian = sum(h0[None, :, :, e] * dx[:, :, e, None] for e in range(3))  # (P, N, 3)
    return charge[None, :, None] * (field + hessian) + dq[:, :, None] * g0[None]


def ewald_self_energy(charge, alpha):
    """-k_e α/√π Σ q_i²: each charge's interaction with its own screening cloud."""
    return -COULOMB * alpha / np.sqrt(np.pi) * jnp.sum(charge * charge)


def ewald_exclusion_energy(x, charge, pairs, alpha):
    """-Σ k_e q_i q_j erf(α r_ij)/r_ij over excluded pairs (E, 2), the reciprocal sum's
    share of interactions that must not be there (r without periodic images, as OpenMM)."""
    if pairs.shape[0] == 0:
        return 0.0
    i, j = pairs[:, 0], pairs[:, 1]
    d = x[j] - x[i]
    r = jnp.sqrt(jnp.sum(d * d, axis=-1))
    return -COULOMB * jnp.sum(charge[i] * charge[j] * jax.scipy.special.erf(alpha * r) / r)


def ewald_exclusion_gradient_and_zeta(x, charge, pairs, alpha, dx, dq):
    """∇_x of ``ewald_exclusion_energy`` (N, 3) and its ζ (P, N, 3) for position tangents
    dx (P, N, 3) and charge tangents dq (P, N), in closed form: with u = -k_e q_i q_j s(r),
    s = erf(α r)/r, B = u'/r and A = (dB/dr)/r per excluded pair,

        ∇_i E = Σ_j B d_ij,
        ζ_p,i = Σ_j A (d·Δt) d + B Δt + (dq_p,i q_j + q_i dq_p,j) B/(q_i q_j) d,

    d = x_i - x_j, Δt = dx_p,i - dx_p,j (as the energy, no periodic images). One
    scatter of (P, E, 3) per side, where ``jax.linearize`` of the gradient, vmapped over
    P, scatters more (its reference, in the tests)."""
    if pairs.shape[0] == 0:
        return jnp.zeros_like(x), jnp.zeros_like(dx)
    i, j = pairs[:, 0], pairs[:, 1]
    d = x[i] - x[j]
    r2 = jnp.sum(d * d, axis=-1)
    r = jnp.sqrt(r2)
    erf = jax.scipy.special.erf(alpha * r)
    gauss = 2.0 * alpha / np.sqrt(np.pi) * jnp.exp(-alpha * alpha * r2)
    s1 = gauss / r - erf / r2  # s'
    s2 = -2.0 * alpha * alpha * gauss - 2.0 * gauss / r2 + 2.0 * erf / (r2 * r)  # s''
    b_unit = -COULOMB * s1 / r  # B per unit q_i q_j
    a_unit = -COULOMB * (s2 - s1 / r) / r2  # A per unit q_i q_j
    qq = charge[i] * charge[j]
    b, a = qq * b_unit, qq * a_unit
    f = b[:, None] * d
    grad = jnp.zeros_like(x).at[i].add(f).at[j].add(-f)
    dt = dx[:, i] - dx[:, j]  # (P, E, 3)
    z = (a * jnp.sum(d * dt, axis=-1))[..., None] * d + b[None, :, None] * dt
    z = z + ((dq[:, i] * charge[j] + charge[i] * dq[:, j]) * b_unit)[..., None] * d
    return grad, jnp.zeros_like(dx).at[:, i].add(z).at[:, j].add(-z)


# --------------------------------------------------------------------------- cell list


def cell_grid(box, cutoff):
    """Cells per box edge for a cell list of edge ≥ ``cutoff``: (3,) ints, or None when an
    edge holds fewer than 3 (the 27 neighbouring cells would repeat; the dense sum is
    used)."""
    cells = np.floor(np.asarray(box, np.float64) / cutoff).astype(int)
    return None if cells.min() < 3 else tuple(int(c) for c in cells)


def _neighbour_cells(cells) -> np.ndarray:
    """(C, 27) the flat indices of each cell's 27 periodic neighbours (itself included)."""
    cells = np.asarray(cells)
    grid = np.stack(np.meshgrid(*[np.arange(c) for c in cells], indexing="ij"), -1).reshape(-1, 3)
    shifts = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    nb = (grid[:, None, :] + shifts[None, :, :]) % cells
    return (nb[..., 0] * cells[1] + nb[..., 1]) * cells[2] + nb[..., 2]


def cell_list_pair_energy(x, charge, sigma, epsilon, exclusions, box, cutoff,
                          dielectric, cells, capacity, switch_distance=None, alpha=None,
                          block=128):  # fmt: skip
    """``cutoff_pair_energy`` of a periodic box through a cell list: O(N) pairs, not N².

    The atoms are binned into ``cells`` (3,) cells of edge ≥ the cutoff, each holding at
    most ``capacity`` atoms, and each atom meets only the atoms of its 27 neighbouring
    cells; excluded pairs are found by a search in the keys i·N + j of ``exclusions``
    ((X, 2) pairs i < j in lexicographic order, so the keys are sorted). The list is
    rebuilt from x at every call, so it is always exact (no skin, no stale list); a cell
    over capacity makes the energy NaN, which a run reports as a blow-up (raise
    ``capacity``).

    Returns: scalar energy, kJ/mol (the same sum as the dense one, in another order).
    """
    n = x.shape[0]
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    flat, table, neighbours, overflow = _candidates(x, box, cells, capacity)
    sqrt_eps = safe_sqrt(epsilon)
    exclusions = jnp.asarray(exclusions)
    keys = exclusions[:, 0] * n + exclusions[:, 1]
    n_keys = keys.shape[0]
    pad = -n % block
    rows = jnp.arange(n + pad).reshape(-1, block)

    def one_block(idx):
        real = idx < n
        i = jnp.minimum(idx, n - 1)
        j = table[neighbours[flat[i]]].reshape(idx.shape[0], -1)  # (B, 27 cap)
        valid = (j < n) & (j != i[:, None]) & real[:, None]
        j = jnp.where(valid, j, 0)
        if n_keys:
            key = jnp.minimum(i[:, None], j) * n + jnp.maximum(i[:, None], j)
            at = jnp.clip(jnp.searchsorted(keys, key), 0, n_keys - 1)
            valid = valid & (keys[at] != key)
        d = minimum_image(x[i][:, None, :] - x[j], box)
        return _pair_sum(d, valid, charge[i][:, None], charge[j], sigma[i][:, None],
                         sigma[j], sqrt_eps[i][:, None], sqrt_eps[j], cutoff,
                         switch_distance, k_rf, c_rf, alpha)  # fmt: skip

    energy = 0.5 * jnp.sum(jax.lax.map(jax.checkpoint(one_block), rows))  # as the dense sum
    return jnp.where(overflow, jnp.nan, energy)


def cell_capacity(x, box, cells, margin=1.5) -> int:
    """Atoms per cell to allow: the fullest cell of x (N, 3) times ``margin``, plus 8 (the
    density of a liquid fluctuates by a few percent; a cell over capacity is reported)."""
    cells = np.asarray(cells)
    c = np.minimum(np.floor((x - box * np.floor(x / box)) / box * cells).astype(int), cells - 1)
    flat = (c[:, 0] * cells[1] + c[:, 1]) * cells[2] + c[:, 2]
    return int(np.ceil(np.bincount(flat, minlength=int(np.prod(cells))).max() * margin)) + 8


# --------------------------------------------------------------------------- Verlet list


class Neighbours(NamedTuple):
    """A Verlet list: every full-strength pair within ``cutoff + skin`` at ``reference``,
    in both atoms' rows, so that it holds every pair within the cutoff as long as no atom
    has moved more than skin/2 since (then no pair can have closed by more than the skin).

    Attributes:
      idx: (N, K) int32, row i the partners j of atom i, those with j > i first, then
        those with j < i, padded with N. Each pair is in both rows, so a row's sum is the
        whole force on its atom (no scatter, which is slow on XLA's CPU backend) and the
        energy is half the sum over rows; the heads of the rows (j > i) hold every pair
        once (the compiled plain-MD pass, ``tm_neighbour_forces``).
      reference: (N, 3) nm, the positions the list was built at.
      overflow: bool scalar, True when some row had more than K partners (the list is
        then incomplete, and an energy or gradient on it is NaN).
    """

    idx: jax.Array
    reference: jax.Array
    overflow: jax.Array


def _candidates(x, box, cells, capacity):
    """(cell of each atom (N,), table (C, capacity) atoms per cell padded with N, the 27
    neighbour cells of each (C, 27), overflow): atoms binned into ``cells`` of a
    periodic box."""
    n = x.shape[0]
    cells_np = np.asarray(cells)
    n_cells = int(np.prod(cells_np))
    wrapped = x - box * jnp.floor(x / box)
    c = jnp.minimum(jnp.floor(wrapped / box * cells_np).astype(jnp.int32),
                    jnp.asarray(cells_np - 1, jnp.int32))  # fmt: skip
    flat = (c[:, 0] * cells_np[1] + c[:, 1]) * cells_np[2] + c[:, 2]
    order = jnp.argsort(flat)
    sorted_flat = flat[order]
    ids = jnp.arange(n_cells)
    start = jnp.searchsorted(sorted_flat, ids)
    count = jnp.searchsorted(sorted_flat, ids, side="right") - start
    slot = jnp.arange(n) - start[sorted_flat]
    table = jnp.full((n_cells, capacity), n, jnp.int32)
    table = table.at[sorted_flat, slot].set(order.astype(jnp.int32), mode="drop")
    neighbours = jnp.asarray(_neighbour_cells(cells_np), jnp.int32)
    return flat, table, neighbours, jnp.max(count) > capacity


def exclusion_table(exclusions, n) -> np.ndarray:
    """(N, M) int32: row i the atoms excluded from i ((X, 2) pairs, both ways), padded
    with -1; M the most any atom has."""
    exclusions = np.asarray(exclusions, dtype=np.int64).reshape(-1, 2)
    both = np.concatenate([exclusions, exclusions[:, ::-1]])
    counts = np.bincount(both[:, 0], minlength=n)
    table = np.full((n, max(1, int(counts.max(initial=0)))), -1, np.int32)
    order = np.argsort(both[:, 0], kind="stable")
    rows = both[order, 0]
    slot = np.arange(len(rows)) - np.searchsorted(rows, rows)
    table[rows, slot] = both[order, 1]
    return table


def _compact(valid, i, j, capacity, n):
    """(B, capacity) the j of each row's valid entries, padded with n: first those with
    j > i, then those with j < i, each in candidate order (a plain-MD pass can then take
    every pair once from the head of each row), and the rows' counts. The k-th entry's
    position is found by bisection in a running count (a gather, where a scatter would be
    slow on XLA's CPU backend)."""
    upper = valid & (j > i[:, None])
    lower = valid & (j < i[:, None])
    ks = jnp.arange(1, capacity + 1, dtype=jnp.int32)
    c_up = jnp.cumsum(upper, axis=1, dtype=jnp.int32)  # (B, L) non-decreasing
    c_lo = jnp.cumsum(lower, axis=1, dtype=jnp.int32)
    n_up = c_up[:, -1:]
    ks_lo = jnp.maximum(ks[None, :] - n_up, 1)  # the rank among the lower entries
    at_up = jax.vmap(lambda c: jnp.searchsorted(c, ks, side="left"))(c_up)  # (B, capacity)
    at_lo = jax.vmap(lambda c, k: jnp.searchsorted(c, k, side="left"))(c_lo, ks_lo)
    at = jnp.where(ks[None, :] <= n_up, at_up, at_lo)
    count = n_up[:, 0] + c_lo[:, -1]
    inside = ks[None, :] <= count[:, None]
    picked = jnp.take_along_axis(j, jnp.minimum(at, j.shape[1] - 1), axis=1)
    return jnp.where(inside, picked, n).astype(jnp.int32), count


def _scan_candidates(x, allowed, box, radius, cells, cell_capacity, block, row_fn):
    """``row_fn(valid (B, L), i (B,), j (B, L))`` over row blocks of every atom's candidates (its
    27 cells' atoms, or all N), ``valid`` the allowed pairs within ``radius``: the stacked
    results and the cell table's overflow flag."""
    n = x.shape[0]
    x = jax.lax.stop_gradient(x)
    allowed = None if allowed is None else jnp.asarray(allowed)
    overflow = jnp.asarray(False)
    if cells is not None:
        flat, table, neighbour_cells, overflow = _candidates(x, box, cells, cell_capacity)
    pad = -n % block
    rows = jnp.arange(n + pad).reshape(-1, block)

    def one_block(idx):
        real = idx < n
        i = jnp.minimum(idx, n - 1)
        if cells is None:
            j = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (idx.shape[0], n))
        else:
            j = table[neighbour_cells[flat[i]]].reshape(idx.shape[0], -1)
        valid = (j < n) & (j != i[:, None]) & real[:, None]
        j = jnp.where(valid, j, 0)
        if allowed is None:
            pass  # every pair (generalized Born)
        elif cells is None:
            valid = valid & _allowed_rows(allowed, i, n)
        else:
            valid = valid & ~jnp.any(j[:, :, None] == allowed[i][:, None, :], axis=-1)
        r2 = 0.0
        for k in range(3):
            dk = x[i, k][:, None] - x[j, k]
            if box is not None:
                dk = dk - box[k] * jnp.round(dk / box[k])
            r2 = r2 + dk * dk
        return row_fn(valid & (r2 < radius * radius), i, j)

    return jax.lax.map(one_block, rows), overflow


#: the compiled list build (``register_list_builder``), or empty: this module's JAX build
_LIST_BUILDER: list = []


def register_list_builder(builder):
    """Build Verlet lists with ``builder(x, box, radius, capacity, cells, cell_capacity,
    allowed) -> (idx, overflow)`` (float64 x; None where it cannot run) in place of the
    JAX build of ``build_neighbours``: a compiled build registered from above this layer
    (``timemachine.backends.xla_cpu_periodic``), which must give the same partners in
    each row, those j > i first (the tests compare them); None restores the JAX build."""
    _LIST_BUILDER.clear()
    if builder is not None:
        _LIST_BUILDER.append(builder)


def build_neighbours(x, allowed, box, radius, capacity, cells=None, cell_capacity=0,
                     block=256) -> Neighbours:  # fmt: skip
    """The Verlet list of x (N, 3) nm: every allowed pair within ``radius`` nm (cutoff +
    skin; minimum image in a rectangular ``box`` (3,) nm, or no images with box None),
    ``capacity`` partners per row.

    The candidates are the atoms of the 27 cells around each atom's cell (``cells`` (3,)
    per edge, of edge ≥ radius, ``cell_capacity`` atoms each: O(N)), with ``allowed`` the
    ``exclusion_table`` (N, M) of the excluded pairs; or all N (cells None: O(N²), for
    small or non-periodic boxes), with ``allowed`` that table or the (N, N) bool mask of
    full-strength pairs; ``allowed`` None allows every pair (generalized Born's list). Jittable; no
    derivatives (integers). A compiled build registered with
    ``register_list_builder`` runs in its place (the same partners per row; their order
    within the j > i and j < i parts may differ).
    """
    n = x.shape[0]
    built = None
    if _LIST_BUILDER and x.dtype == jnp.float64:
        x = jax.lax.stop_gradient(x)
        built = _LIST_BUILDER[0](x, box, radius, capacity, cells, cell_capacity, allowed)
    if built is not None:
        return Neighbours(built[0], x, built[1])
    (idx, counts), overflow = _scan_candidates(
        x, allowed, box, radius, cells, cell_capacity, block,
        lambda valid, i, j: _compact(valid, i, j, capacity, n),
    )  # fmt: skip
    overflow = overflow | (jnp.max(counts) > capacity)
    return Neighbours(idx.reshape(-1, capacity)[:n], jax.lax.stop_gradient(x), overflow)


def neighbour_counts(x, allowed, box, radius, cells=None, cell_capacity=0) -> np.ndarray:
    """(N,) partners per row of the Verlet list of x (numpy), counted by the list build's
    own scan of the candidates (``allowed`` as ``build_neighbours``'): the reference of
    ``partner_counts``, which sizes the lists. Raises InputError if a cell overflows."""
    from timemachine.errors import InputError

    n = x.shape[0]
    box = None if box is None else jnp.asarray(box)
    counts, overflow = jax.jit(
        lambda y: _scan_candidates(
            y,
            allowed,
            box,
            radius,
            cells,
            cell_capacity,
            256,
            lambda valid, i, j: jnp.sum(valid, axis=1),
        )  # fmt: skip
    )(jnp.asarray(x))
    if bool(overflow):
        raise InputError(f"a cell holds more than {cell_capacity} atoms: raise cell_capacity")
    return np.asarray(counts).reshape(-1)[:n]


def partner_counts(x, box, radius, exclusions=None) -> np.ndarray:
    """(N,) partners per row of the Verlet list of x (N, 3) nm within ``radius`` nm
    (numpy): the atoms closer than it (minimum image in a rectangular ``box``, nm, or
    None), less the ``exclusions`` ((X, 2) pairs, or None) among them. What sizes a
    list's capacity. A k-d tree (scipy's cKDTree, periodic with the box): O(N log N),
    where ``neighbour_counts``' scan of the candidates is O(N²) without cells."""
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float64)
    if box is None:
        tree = cKDTree(x)
    else:
        box = np.asarray(box, dtype=np.float64)
        wrapped = np.mod(x, box)
        wrapped[wrapped >= box] = 0.0  # a tiny negative coordinate rounds to the box edge
        tree = cKDTree(wrapped, boxsize=box)
    counts = tree.query_ball_point(tree.data, radius, return_length=True) - 1  # not itself
    counts = np.asarray(counts, dtype=np.int64)
    if exclusions is not None and len(exclusions):
        pairs = np.asarray(exclusions, dtype=np.int64).reshape(-1, 2)
        d = x[pairs[:, 0]] - x[pairs[:, 1]]
        if box is not None:
            d = d - box * np.round(d / box)
        near = np.einsum("ij,ij->i", d, d) < radius * radius
        counts -= np.bincount(pairs[near].reshape(-1), minlength=len(x))
    return counts


def max_displacement2(x, reference, box):
    """max_i |x_i - reference_i|² (nm², minimum image when ``box`` is given): how far the
    farthest atom has moved since a list was built."""
    d = x - reference
    if box is not None:
        d = minimum_image(d, box)
    return jnp.max(jnp.sum(d * d, axis=-1))


def _row_geometry(x, charge, sigma, sqrt_eps, rows, j, box, cutoff):
    """What a row block of a Verlet list needs of its pairs: the displacement components
    d_k = x_i,k - x_j,k (three (B, K) arrays, minimum image), ``inside`` (listed and
    within the cutoff), r (1 outside), the mixed σ, 4√ε_i√ε_j and k_e q_i q_j, for atoms
    ``rows`` (B,) and partners j (B, K) (n for none)."""
    n = x.shape[0]
    valid = j < n
    j = jnp.where(valid, j, 0)
    d, r2 = [], 0.0
    for k in range(3):
        dk = x[rows, k][:, None] - x[j, k]
        if box is not None:
            dk = dk - box[k] * jnp.round(dk / box[k])
        d.append(dk)
        r2 = r2 + dk * dk
    inside = valid & (r2 < cutoff * cutoff)
    r = jnp.sqrt(jnp.where(inside, r2, 1.0))
    sig = 0.5 * (sigma[rows][:, None] + sigma[j])
    eps4 = 4.0 * sqrt_eps[rows][:, None] * sqrt_eps[j]
    qq = COULOMB * charge[rows][:, None] * charge[j]
    return d, inside, r, sig, eps4, qq


def _row_pairs(x, charge, sigma, sqrt_eps, rows, j, box, cutoff, switch_distance, k_rf,
               c_rf, alpha):  # fmt: skip
    """Pair energies u (B, K) kJ/mol, du/dr (B, K) kJ/mol/nm and the displacement
    components d_k = x_i,k - x_j,k (three (B, K) arrays, minimum image) of atoms
    ``rows`` (B,) with their partners j (B, K) (n for none): LJ (switched) + reaction
    field, or PME's erfc with ``alpha``, zero beyond the cutoff. Three (B, K) arrays for
    the components, not one (B, K, 3): XLA on CPU vectorises 2-D elementwise work far
    better."""
    d, inside, r, sig, eps4, qq = _row_geometry(x, charge, sigma, sqrt_eps, rows, j, box,
                                                cutoff)  # fmt: skip

    def u(r):
        inv_r = 1.0 / r
        s2 = (sig * inv_r) ** 2
        s6 = s2 * s2 * s2
        lj = eps4 * (s6 * s6 - s6)
        if switch_distance is not None:
            lj = lj * lj_switch(r, switch_distance, cutoff)
        if alpha is None:
            coul = qq * (inv_r + k_rf * r * r - c_rf)
        else:
            coul = qq * jax.scipy.special.erfc(alpha * r) * inv_r
        return lj + coul

    # u and du/dr together by forward mode, elementwise (exact, no reverse pass)
    energy, du = jax.jvp(u, (r,), (jnp.ones_like(r),))
    zero = jnp.zeros_like(r)
    return jnp.where(inside, energy, zero), jnp.where(inside, du / r, zero), d


def _row_blocks(neighbours, width, pairs_per_block):
    """(rows (nb, B), partners (nb, B, K)): the list's rows in blocks of B ≈
    pairs_per_block / (K · width) atoms (the last padded with copies of atom N-1 and no
    partners)."""
    n, capacity = neighbours.idx.shape
    block = int(max(1, min(n, pairs_per_block // max(capacity * width, 1))))
    pad = -n % block
    rows = jnp.minimum(jnp.arange(n + pad), n - 1).reshape(-1, block)
    table = jnp.concatenate([neighbours.idx, jnp.full((pad, capacity), n, jnp.int32)])
    return rows, table.reshape(-1, block, capacity)


def neighbour_pair_energy(x, charge, sigma, epsilon, neighbours: Neighbours, box, cutoff,
                          dielectric, switch_distance=None, alpha=None,
                          pairs_per_block=1 << 18):  # fmt: skip
    """``cutoff_pair_energy`` summed over a Verlet list (``build_neighbours``), O(N K):
    half the sum over its rows (each pair is in two). Exact when the list is fresh (no
    atom moved more than skin/2 since it was built: the caller's check); NaN when the
    list overflowed.

    Returns: scalar energy, kJ/mol.
    """
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    sqrt_eps = safe_sqrt(epsilon)
    rows, table = _row_blocks(neighbours, 1, pairs_per_block)

    def one_block(args):
        i, j = args
        u, _, _ = _row_pairs(x, charge, sigma, sqrt_eps, i, j, box, cutoff, switch_distance,
                             k_rf, c_rf, alpha)  # fmt: skip
        return jnp.sum(u)

    energy = 0.5 * jnp.sum(jax.lax.map(jax.checkpoint(one_block), (rows, table)))
    return energy * jnp.where(neighbours.overflow, jnp.nan, 1.0)


def neighbour_pair_gradient(x, charge, sigma, epsilon, neighbours: Neighbours, box, cutoff,
                            dielectric, switch_distance=None, alpha=None,
                            pairs_per_block=1 << 18, host=None):  # fmt: skip
    """∇_x of ``neighbour_pair_energy``, (N, 3) kJ/mol/nm, written out: row i sums
    (du/dr)/r · d_ij over its partners, so no scatter runs (reverse-mode autodiff of the
    energy would scatter the j side). Differentiable in x and the per-atom parameters by
    forward mode (the Hessian-vector products and mixed partials of ζ), all gathers.

    ``host``: None, or the plain-MD pair forces in compiled code
    (``timemachine.backends.xla_cpu.neighbour_forces``, passed in from above this layer;
    not differentiable), this function's XLA path being its reference.
    """
    n = neighbours.idx.shape[0]
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    sqrt_eps = safe_sqrt(epsilon)
    if host is not None:
        atoms = jnp.stack([charge, sigma, sqrt_eps, jnp.zeros_like(sqrt_eps)]).astype(x.dtype)
        consts = jnp.asarray([cutoff, -1.0 if switch_distance is None else switch_distance,
                              k_rf, 0.0 if alpha is None else alpha], x.dtype)  # fmt: skip
        grad = host(x, box, neighbours.idx, atoms, consts)
        return grad * jnp.where(neighbours.overflow, jnp.nan, 1.0)
    rows, table = _row_blocks(neighbours, 1, pairs_per_block)

    def one_block(args):
        i, j = args
        _, du_r, d = _row_pairs(x, charge, sigma, sqrt_eps, i, j, box, cutoff,
                                switch_distance, k_rf, c_rf, alpha)  # fmt: skip
        return jnp.stack([jnp.sum(du_r * dk, axis=1) for dk in d], axis=1)

    grad = jax.lax.map(one_block, (rows, table)).reshape(-1, 3)[:n]
    return grad * jnp.where(neighbours.overflow, jnp.nan, 1.0)


def _pair_scalars(r, sig, cutoff, switch_distance, k_rf, alpha):
    """Closed-form radial derivatives of one pair, elementwise over r (nm) and the mixed
    σ = (σ_i + σ_j)/2: (B_lj, dB_lj/dr, B_c, dB_c/dr, dB_lj/dσ) with B = u'(r)/r, for
    u_lj = ((σ/r)¹² - (σ/r)⁶) S(r) (per unit 4√ε_i√ε_j; OpenMM's switch S) and u_c =
    1/r + k_rf r² - c_rf or erfc(α r)/r (per unit k_e q_i q_j). Written out (not nested
    forward derivatives), as the ζ step evaluates them on every listed pair; the tests
    check them against ``jax.jvp`` of the energy."""
    inv_r = 1.0 / r
    inv_r2 = inv_r * inv_r
    s2 = sig * sig * inv_r2
    s6 = s2 * s2 * s2
    s12 = s6 * s6
    lj = s12 - s6  # L(r)
    d_lj = (-12.0 * s12 + 6.0 * s6) * inv_r  # L'
    dd_lj = (156.0 * s12 - 42.0 * s6) * inv_r2  # L''
    inv_sig = jnp.where(sig > 0, 1.0 / jnp.where(sig > 0, sig, 1.0), 0.0)  # σ = 0: no LJ
    lj_s = (12.0 * s12 - 6.0 * s6) * inv_sig  # ∂L/∂σ
    d_lj_s = (-144.0 * s12 + 36.0 * s6) * inv_r * inv_sig  # ∂L'/∂σ
    if switch_distance is not None:
        w = cutoff - switch_distance
        t = jnp.clip((r - switch_distance) / w, 0.0, 1.0)
        sw = 1.0 + t * t * t * (-10.0 + t * (15.0 - 6.0 * t))
        d_sw = t * t * (-30.0 + t * (60.0 - 30.0 * t)) / w
        dd_sw = t * (-60.0 + t * (180.0 - 120.0 * t)) / (w * w)
        lj, d_lj, dd_lj = (
            lj * sw,
            d_lj * sw + lj * d_sw,
            dd_lj * sw + 2.0 * d_lj * d_sw + lj * dd_sw,
        )
        d_lj_s = d_lj_s * sw + lj_s * d_sw
    if alpha is None:
        d_c = -inv_r2 + 2.0 * k_rf * r
        dd_c = 2.0 * inv_r2 * inv_r + 2.0 * k_rf
    else:
        erfc = jax.scipy.special.erfc(alpha * r)
        gauss = 2.0 * alpha / np.sqrt(np.pi) * jnp.exp(-alpha * alpha * r * r)
        d_c = -erfc * inv_r2 - gauss * inv_r
        dd_c = 2.0 * erfc * inv_r2 * inv_r + gauss * (2.0 * inv_r2 + 2.0 * alpha * alpha)
    # B = u'/r and dB/dr = (u'' - u'/r)/r
    return (d_lj * inv_r, (dd_lj - d_lj * inv_r) * inv_r, d_c * inv_r,
            (dd_c - d_c * inv_r) * inv_r, d_lj_s * inv_r)  # fmt: skip


def neighbour_pair_gradient_and_zeta(x, charge, sigma, epsilon, neighbours: Neighbours, box,
                                     cutoff, dielectric, switch_distance, alpha, tangents,
                                     onehots, host=None, ewald_exclusions=None,
                                     elements_per_block=1 << 22):  # fmt: skip
    """∇_x E (N, 3) and ζ (P, N, 3) of the Verlet-list pair sum, from per-pair scalars
    contracted with all P tangents at once (the all-pairs path's structure, sparse).

    With u the pair energy, B = u'(r)/r and A = (dB/dr)/r, row i sums over its partners j:

        ∇_i E = Σ_j B_ij d_ij,
        (H t)_i = Σ_j A_ij (d_ij · (t_i - t_j)) d_ij + B_ij (t_i - t_j),
        ∂(∇_i E)/∂θ_p = Σ_j (∂B_ij/∂θ_p) d_ij,

    d_ij = x_i - x_j (minimum image); ζ_p = (H dx_p)_i + ∂(∇E)/∂θ_p. B is linear in
    k_e q_i q_j and in 4 √ε_i √ε_j, so its parameter derivatives are the pair's Coulomb and
    LJ parts; the σ part is one forward derivative.

    Args:
      tangents: (P, N, 3) dx/dθ.
      onehots: {"charge", "sigma", "epsilon"} -> (cols, (N, len(cols)) float): the
        positions p in wrt of the parameters of that kind and 1 where atom i's parameter
        of that kind is θ_wrt[p] (None for a kind no wrt parameter is of).
      host: None, or the whole computation in compiled code
        (``timemachine.backends.xla_cpu.neighbour_pairs``, passed in by the caller, which
        sits above this layer): the pair scalars, the contraction and the mixed partials
        in one pass over the list, this function's XLA path being its reference. It is
        used where every atom's parameter of a kind is at most one tangent (no repeated
        wrt entries), else the XLA path runs.
      ewald_exclusions: None, or (PME) the excluded pairs as (table (N, M), pairs (X, 2))
        (``exclusion_table`` of the pairs): ∇E and ζ then also hold Ewald's exclusion
        correction (``ewald_exclusion_gradient_and_zeta``), which the custom call sums
        in the same pass as each row's listed pairs (no scatters).
      elements_per_block: P · rows · K per block, the memory of one (P, B, K) array.

    Returns: (grad (N, 3) kJ/mol/nm, ζ (P, N, 3) kJ/mol/nm/[θ]), NaN on an overflowed list.
    """
    if ewald_exclusions is not None and alpha is None:
        raise ValueError("ewald_exclusions: Ewald's exclusion correction needs PME's alpha")
    n, capacity = neighbours.idx.shape
    p = tangents.shape[0]
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    sqrt_eps = safe_sqrt(epsilon)
    # d√ε/dε, 0 where ε = 0 (as safe_sqrt's derivative)
    dse = jnp.where(epsilon > 0, 0.5 / jnp.where(epsilon > 0, sqrt_eps, 1.0), 0.0)
    bad = jnp.where(neighbours.overflow, jnp.nan, 1.0)
    kinds = {k: (np.asarray(v[0]), jnp.asarray(v[1], x.dtype))
             for k, v in onehots.items() if v is not None}  # fmt: skip
    if host is not None and all(
        np.asarray(v[1]).sum(1).max(initial=0) <= 1 for v in onehots.values() if v is not None
    ):
        # each atom's tangent of its charge, σ and ε (-1: none)
        mix_p = np.full((3, n), -1, np.int32)
        for m, kind in enumerate(("charge", "sigma", "epsilon")):
            if onehots.get(kind) is not None:
                cols, hit = (np.asarray(v) for v in onehots[kind])
                mix_p[m] = np.where(hit.any(1), cols[hit.argmax(1)], -1)
        atoms = jnp.stack([charge, sigma, sqrt_eps, dse]).astype(x.dtype)
        consts = jnp.asarray([cutoff, -1.0 if switch_distance is None else switch_distance,
                              k_rf, 0.0 if alpha is None else alpha], x.dtype)  # fmt: skip
        grad, zeta = host(x, box, neighbours.idx, atoms, consts, tangents,
                          mix_p if kinds else None,
                          None if ewald_exclusions is None else ewald_exclusions[0])  # fmt: skip
        return grad * bad, zeta * bad
    rows, table = _row_blocks(neighbours, max(p, 1), elements_per_block)
    t_k = [tangents[..., k] for k in range(3)]  # (P, N) each

    def one_block(args):
        i, j = args
        d, inside, r, sig, eps4, qq = _row_geometry(x, charge, sigma, sqrt_eps, i, j, box,
                                                    cutoff)  # fmt: skip
        j = jnp.where(j < n, j, 0)
        b_lj, db_lj, b_c, db_c, db_lj_ds = _pair_scalars(r, sig, cutoff, switch_distance,
                                                         k_rf, alpha)  # fmt: skip
        zero = jnp.zeros_like(r)
        b = jnp.where(inside, eps4 * b_lj + qq * b_c, zero)
        a = jnp.where(inside, (eps4 * db_lj + qq * db_c) / r, zero)
        # computed once, in memory: XLA's CPU fusion would otherwise recompute the scalars
        # (erfc and all) inside every consumer below
        a, b, b_lj, b_c, db_lj_ds = jax.lax.optimization_barrier((a, b, b_lj, b_c, db_lj_ds))
        grad = jnp.stack([jnp.sum(b * dk, axis=1) for dk in d], axis=1)  # (B, 3)
        # Hessian-vector products with every tangent: gathers only, no scatter
        ti = [tk[:, i] for tk in t_k]  # (P, B)
        tj = [tk[:, j] for tk in t_k]  # (P, B, K)
        s = sum(d[k][None] * (ti[k][:, :, None] - tj[k]) for k in range(3))  # (P, B, K)
        b_sum = jnp.sum(b, axis=1)  # (B,)
        zeta = [jnp.sum(a[None] * s * d[k][None] - b[None] * tj[k], axis=2) + ti[k] * b_sum
                for k in range(3)]  # fmt: skip
        # mixed partials: ∂B/∂(atom i's and atom j's parameter of each kind)
        deriv = {
            "charge": (b_c * COULOMB * charge[j], b_c * COULOMB * charge[i][:, None]),
            "sigma": (0.5 * eps4 * db_lj_ds, 0.5 * eps4 * db_lj_ds),
            "epsilon": (b_lj * 4.0 * sqrt_eps[j] * dse[i][:, None],
                        b_lj * 4.0 * sqrt_eps[i][:, None] * dse[j]),
        }  # fmt: skip
        for kind, (cols, onehot) in kinds.items():
            d_i, d_j = (jnp.where(inside, v, zero) for v in deriv[kind])
            own = onehot[i].T  # (P_kind, B)
            other = jnp.moveaxis(onehot[j], -1, 0)  # (P_kind, B, K)
            for k in range(3):
                part = own * jnp.sum(d_i * d[k], axis=1)[None]
                part = part + jnp.sum(other * (d_j * d[k])[None], axis=2)
                zeta[k] = zeta[k].at[cols].add(part)
        return grad, jnp.stack(zeta, axis=-1)  # (B, 3), (P, B, 3)

    blocks = jax.lax.map(one_block, (rows, table))
    grad = blocks[0].reshape(-1, 3)[:n] * bad
    zeta = jnp.moveaxis(blocks[1], 1, 0).reshape(p, -1, 3)[:, :n]
    if ewald_exclusions is not None:
        dq = jnp.zeros((p, n), x.dtype)  # each tangent's charge derivatives
        if "charge" in kinds:
            cols, onehot = kinds["charge"]
            dq = dq.at[cols].add(onehot.T)
        g_ex, z_ex = ewald_exclusion_gradient_and_zeta(x, charge, ewald_exclusions[1], alpha,
                                                       tangents, dq)  # fmt: skip
        grad, zeta = grad + g_ex * bad, zeta + z_ex
    return grad, zeta * bad
