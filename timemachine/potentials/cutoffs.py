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


def cutoff_pair_energy(x, charge, sigma, epsilon, pair_mask, box, cutoff, dielectric,
                       switch_distance=None, alpha=None, block=128):  # fmt: skip
    """The pair sum over full-strength pairs within the cutoff: LJ (switched) plus the
    reaction field (module docstring), or with ``alpha`` PME's direct-space Coulomb
    k_e q_i q_j erfc(α r)/r.

    Args:
      x: (N, 3) nm; charge (e), sigma (nm), epsilon (kJ/mol): (N,).
      pair_mask: (N, N) bool, True for pairs at full strength (not excluded, not 1-4).
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
    mask = jnp.asarray(pair_mask)  # gathered by rows: no padded (N², constant) copy to fold

    def one_block(idx):
        i = jnp.minimum(idx, n - 1)
        m = mask[i] & (idx < n)[:, None]
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


def pme_reciprocal_energy(x, charge, box, alpha, grid, order=5):
    """The smooth-PME reciprocal energy (kJ/mol) of charges in a rectangular box:

        E = k_e / (2π V) Σ_{m ≠ 0} exp(-π² |m|² / α²) / |m|² · |F(Q)(m)|² / (b_x b_y b_z),

    Q the charges spread on the (K_x, K_y, K_z) ``grid`` with B-splines of ``order``,
    F the discrete Fourier transform (``jnp.fft.fftn``), m = (m_x/L_x, m_y/L_y, m_z/L_z)
    over the FFT's frequencies and b the moduli of ``bspline_moduli``. Differentiable in
    x and the charges (forward and reverse mode through the FFT).
    """
    grid = tuple(int(g) for g in grid)
    u = x / box
    u = (u - jnp.floor(u)) * jnp.asarray(grid, x.dtype)  # (N, 3) in [0, K)
    base = jnp.floor(u)
    w = _bspline_weights(u - base, order)  # (N, 3, n)
    base = base.astype(jnp.int32)
    j = jnp.arange(order)
    idx = [(base[:, d, None] - j[None, :]) % grid[d] for d in range(3)]  # (N, n) each
    weight = (charge[:, None, None, None] * w[:, 0, :, None, None] * w[:, 1, None, :, None]
              * w[:, 2, None, None, :])  # fmt: skip
    ix = jnp.broadcast_to(idx[0][:, :, None, None], weight.shape)
    iy = jnp.broadcast_to(idx[1][:, None, :, None], weight.shape)
    iz = jnp.broadcast_to(idx[2][:, None, None, :], weight.shape)
    q_grid = jnp.zeros(grid, x.dtype).at[ix, iy, iz].add(weight)
    f = jnp.fft.fftn(q_grid)
    s2 = f.real**2 + f.imag**2
    freq = [np.fft.fftfreq(g, 1.0 / g) for g in grid]  # integers 0..K/2, -K/2+1..-1
    moduli = [bspline_moduli(g, order) for g in grid]
    m = [jnp.asarray(freq[d]) / box[d] for d in range(3)]
    m2 = m[0][:, None, None] ** 2 + m[1][None, :, None] ** 2 + m[2][None, None, :] ** 2
    b = moduli[0][:, None, None] * moduli[1][None, :, None] * moduli[2][None, None, :]
    nonzero = np.ones(grid, dtype=bool)
    nonzero[0, 0, 0] = False
    m2_safe = jnp.where(nonzero, m2, 1.0)
    kernel = jnp.where(nonzero, jnp.exp(-(np.pi**2) * m2_safe / alpha**2) / (m2_safe * b), 0.0)
    volume = box[0] * box[1] * box[2]
    return COULOMB / (2.0 * np.pi * volume) * jnp.sum(kernel * s2)


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
    cells_np = np.asarray(cells)
    n_cells = int(np.prod(cells_np))
    k_rf, c_rf = reaction_field_constants(cutoff, dielectric)
    cells_j = jnp.asarray(cells_np, jnp.int32)
    wrapped = x - box * jnp.floor(x / box)
    c = jnp.minimum(jnp.floor(wrapped / box * cells_np).astype(jnp.int32), cells_j - 1)
    flat = (c[:, 0] * cells_np[1] + c[:, 1]) * cells_np[2] + c[:, 2]
    order = jnp.argsort(flat)
    sorted_flat = flat[order]
    ids = jnp.arange(n_cells)
    start = jnp.searchsorted(sorted_flat, ids)
    count = jnp.searchsorted(sorted_flat, ids, side="right") - start
    overflow = jnp.max(count) > capacity
    slot = jnp.arange(n) - start[sorted_flat]
    table = jnp.full((n_cells, capacity), n, jnp.int32)
    table = table.at[sorted_flat, slot].set(order.astype(jnp.int32), mode="drop")
    neighbours = jnp.asarray(_neighbour_cells(cells_np), jnp.int32)  # (C, 27)
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
