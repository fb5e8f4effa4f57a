"""New functional forms: Morse bonds and a neural-network dihedral correction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import timemachine as tm
from timemachine.forms import (
    add_backbone_dihedral_network,
    backbone_dihedrals,
    replace_bonds_with_morse,
)


@pytest.fixture(scope="module")
def trialanine_system(trialanine):
    return tm.load_system(trialanine, implicit_solvent="obc2")


def test_morse_replaces_harmonic_bonds_with_same_curvature(trialanine_system):
    system, x = trialanine_system
    morse = replace_bonds_with_morse(system, well_depth=350.0)
    assert "bond" not in [t.kind for t in morse.terms] and "morse" in [t.kind for t in morse.terms]
    i = morse.index("morse/CT-HC/a")
    k = system.params[system.index("bond/CT-HC/k")]
    assert morse.params[i] == pytest.approx(np.sqrt(k / 700.0))
    # closed form for one bond: compare the term energy with D (1 - e^{-a (r - r0)})^2 by hand
    term = [t for t in morse.terms if t.kind == "morse"][0]
    e = float(term.energy(jnp.asarray(x), jnp.asarray(morse.params)))
    bonds = [t for t in system.terms if t.kind == "bond"][0]
    r = np.linalg.norm(x[bonds.idx[:, 1]] - x[bonds.idx[:, 0]], axis=1)
    r0 = system.params[bonds.length_index]
    kk = system.params[bonds.k_index]
    a = np.sqrt(kk / 700.0)
    assert e == pytest.approx(np.sum(350.0 * (1 - np.exp(-a * (r - r0))) ** 2), rel=1e-12)
    # near equilibrium Morse ~ harmonic: energies agree to the cubic anharmonicity
    e_harm = float(bonds.energy(jnp.asarray(x), jnp.asarray(system.params)))
    assert abs(e - e_harm) < 0.05 * e_harm
    # forces are autodiff of the same energy; check against a central difference
    g = np.asarray(morse.gradient(x))
    h = 1e-6
    xp, xm = x.copy(), x.copy()
    xp[5, 2] += h
    xm[5, 2] -= h
    fd = (float(morse.energy(xp)) - float(morse.energy(xm))) / (2 * h)
    assert g[5, 2] == pytest.approx(fd, rel=1e-6)


def test_neural_network_dihedral_term(trialanine_system):
    system, x = trialanine_system
    quads = backbone_dihedrals(system.topology)
    assert quads.shape == (1, 2, 4)  # trialanine: only the middle residue has φ and ψ
    nn = add_backbone_dihedral_network(system, hidden=6, seed=3)
    sel = nn.select("nn_phipsi/*")
    assert len(sel) == 4 * 6 + 6 + 6 + 1
    e_extra = float(nn.energy(x)) - float(system.energy(x))
    # by hand in numpy
    from timemachine.potentials import dihedral_angle

    phi = float(dihedral_angle(jnp.asarray(x), quads[:, 0])[0])
    psi = float(dihedral_angle(jnp.asarray(x), quads[:, 1])[0])
    p = nn.params[sel]
    w1, b1, w2, b2 = p[:24].reshape(4, 6), p[24:30], p[30:36], p[36]
    feats = np.array([np.sin(phi), np.cos(phi), np.sin(psi), np.cos(psi)])
    assert e_extra == pytest.approx(np.tanh(feats @ w1 + b1) @ w2 + b2, rel=1e-9, abs=1e-12)
    # mixed partial d(grad E)/d(b2) is zero (a constant offset), d/dW2 is not
    grad_x = jax.grad(nn.energy_fn(), argnums=0)
    theta = jnp.asarray(nn.params)

    @jax.jit
    def mixed(i):  # ∂(∇_x E)/∂θ_i, one column of the mixed partials
        along = jnp.zeros_like(theta).at[i].set(1.0)
        return jax.jvp(lambda th: grad_x(jnp.asarray(x), th), (theta,), (along,))[1]

    assert float(jnp.abs(mixed(sel[-1])).max()) == 0.0
    assert float(jnp.abs(mixed(sel[30])).max()) > 0.0


def test_bad_input_to_forms(trialanine_system):
    system, _ = trialanine_system
    with pytest.raises(tm.InputError, match="well_depth"):
        replace_bonds_with_morse(system, well_depth=-1.0)
    with pytest.raises(tm.InputError, match="no term of kind"):
        replace_bonds_with_morse(system).without_terms("bond")
