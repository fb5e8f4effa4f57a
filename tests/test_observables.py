"""Observables against mdtraj, closed forms and finite differences."""

import jax
import jax.numpy as jnp
import mdtraj as md
import numpy as np
import pytest
from mdtraj.nmr import scalar_couplings as mdsc

import timemachine as tm
from timemachine.fitting import (
    KARPLUS,
    Dihedral,
    JCoupling3HNC,
    JCoupling3HNCB,
    JCoupling3HNHA,
    NOEDistance,
    ObservableSet,
    RadiusOfGyration,
    observable_from_spec,
)

COUPLINGS = [
    (JCoupling3HNHA, md.compute_J3_HN_HA, mdsc.J3_HN_HA_coefficients),
    (JCoupling3HNC, md.compute_J3_HN_C, mdsc.J3_HN_C_coefficients),
    (JCoupling3HNCB, md.compute_J3_HN_CB, mdsc.J3_HN_CB_coefficients),
]


@pytest.fixture(scope="module")
def trialanine_frames():
    """Trialanine at φ = -150°, -60°, 60°, 170° (ψ = 120°), plus thermal-size noise: (8, 33, 3)."""
    frames = []
    for phi in (-150.0, -60.0, 60.0, 170.0):
        top, x = tm.build_peptide("AAA", phi=phi, psi=120.0)
        frames.append(x)
    rng = np.random.default_rng(1)
    frames = np.array(frames)
    frames = np.concatenate([frames, frames + 0.01 * rng.normal(size=frames.shape)])
    return top, frames


@pytest.fixture(scope="module")
def villin_frames(villin):
    top, x = villin
    rng = np.random.default_rng(2)
    return top, x[None] + 0.01 * rng.normal(size=(3,) + x.shape)


def _phi64(frames, indices):
    """mdtraj's dihedral formula (mdtraj.geometry.dihedral._dihedral) in float64."""
    b1 = frames[:, indices[:, 1]] - frames[:, indices[:, 0]]
    b2 = frames[:, indices[:, 2]] - frames[:, indices[:, 1]]
    b3 = frames[:, indices[:, 3]] - frames[:, indices[:, 2]]
    c1 = np.cross(b2, b3)
    c2 = np.cross(b1, b2)
    p1 = (b1 * c1).sum(-1) * (b2 * b2).sum(-1) ** 0.5
    return np.arctan2(p1, (c1 * c2).sum(-1))


@pytest.mark.parametrize("system", ["trialanine_frames", "villin_frames"])
@pytest.mark.parametrize("cls, md_fn, md_table", COUPLINGS)
def test_j_couplings_match_mdtraj(system, cls, md_fn, md_table, request):
    top, frames = request.getfixturevalue(system)
    mtop = md.Topology.from_openmm(top)
    traj = md.Trajectory(frames, mtop)
    models = list(md_table) if cls is JCoupling3HNHA else ["Bax2007"]
    # every set mdtraj has is ours too (we also carry Hu & Bax 1997 for HN-C' and HN-Cβ)
    assert set(models) <= set(KARPLUS[cls.coupling])
    for model in models:
        obs = cls(top, model=model)
        idx, j_md = md_fn(traj, model=model)
        np.testing.assert_array_equal(obs.indices, idx)  # same residues, same order, same atoms
        assert obs.n_values == idx.shape[0] == len(obs.labels)
        # mdtraj computes in float32 from float32 coordinates: on the same (float32) frames
        # the two agree to float32 round-off
        ours32 = np.asarray(jax.vmap(obs)(traj.xyz.astype(np.float64)))
        assert np.abs(ours32 - j_md).max() < 2e-5
        # to 1e-8: mdtraj's Karplus function and published coefficients on φ in float64
        ref = mdsc._J3_function(_phi64(frames, idx), **md_table[model])
        ours = np.asarray(jax.vmap(obs)(frames))
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
    # same result from an mdtraj Topology
    np.testing.assert_array_equal(cls(mtop)(frames[0]), cls(top)(frames[0]))


def test_j_coupling_labels_and_models(trialanine):
    top, x = trialanine
    obs = JCoupling3HNHA(top)
    assert obs.labels == ("J3_HN_HA ALA2", "J3_HN_HA ALA3")
    with pytest.raises(tm.InputError, match="Bax2007, Bax1997, Ruterjans1999"):
        JCoupling3HNHA(top, model="Karplus1959")
    with pytest.raises(tm.InputError, match="'Karplus1959'.*valid models: Bax2007, Bax1997"):
        JCoupling3HNC(top, model="Karplus1959")
    values = [float(JCoupling3HNHA(top, model=m)(x)[0]) for m in KARPLUS["J3_HN_HA"]]
    assert len(set(values)) == 3  # the three sets give different couplings


def test_observables_compose_with_jit_vmap_jvp(trialanine_frames):
    top, frames = trialanine_frames
    mtop = md.Topology.from_openmm(top)
    obs = ObservableSet(
        [
            JCoupling3HNHA(top),
            RadiusOfGyration(masses=[a.element.mass for a in mtop.atoms]),
            NOEDistance([[1, 2, 3]], [[22]]),
            Dihedral([[4, 6, 12, 14]]),
        ]
    )
    assert obs.n_values == 5
    x = jnp.asarray(frames[1])
    jitted = jax.jit(obs)
    np.testing.assert_allclose(jitted(x), obs(x), rtol=1e-14)
    assert jax.vmap(obs)(jnp.asarray(frames)).shape == (len(frames), 5)
    rng = np.random.default_rng(3)
    tangent = jnp.asarray(rng.normal(size=x.shape))
    _, jvp = jax.jit(lambda y, t: jax.jvp(obs, (y,), (t,)))(x, tangent)
    h = 1e-6
    fd = (jitted(x + h * tangent) - jitted(x - h * tangent)) / (2 * h)
    np.testing.assert_allclose(jvp, fd, rtol=1e-7, atol=1e-8)


def test_radius_of_gyration(villin):
    top, x = villin
    mtop = md.Topology.from_openmm(top)
    masses = np.array([a.element.mass for a in mtop.atoms])
    ca = mtop.select("name CA")
    sel, m = x[ca], masses[ca]
    centre = (m[:, None] * sel).sum(0) / m.sum()
    ref = np.sqrt((m * ((sel - centre) ** 2).sum(1)).sum() / m.sum())
    np.testing.assert_allclose(RadiusOfGyration(masses, atoms=ca)(x), [ref], rtol=1e-13)
    np.testing.assert_allclose(RadiusOfGyration(m, atoms=ca)(x), [ref], rtol=1e-13)
    spec = observable_from_spec({"type": "Rg", "atoms": "name CA"}, top)
    np.testing.assert_allclose(spec(x), [ref], rtol=1e-13)
    # unweighted: mdtraj's compute_rg (float32)
    traj = md.Trajectory(x, mtop)
    ours = RadiusOfGyration()(traj.xyz[0].astype(np.float64))
    assert abs(float(ours[0]) - float(md.compute_rg(traj)[0])) < 1e-5
    assert 0.8 < ref < 1.2  # villin's CA Rg is ~0.95 nm


def test_noe_distance(villin):
    top, x = villin
    rng = np.random.default_rng(4)
    groups_a = [[0], [5, 6, 7], [10, 11]]
    groups_b = [[100], [200], [300, 301, 302]]
    for power in (6, 3):
        obs = NOEDistance(groups_a, groups_b, power=power)
        ref = []
        for a, b in zip(groups_a, groups_b, strict=True):
            r = np.linalg.norm(x[a][:, None] - x[b][None], axis=-1)
            ref.append(np.mean(r ** (-power)) ** (-1 / power))
        np.testing.assert_allclose(obs(x), ref, rtol=1e-13)
    # one pair: the distance itself, as mdtraj measures it (float32)
    traj = md.Trajectory(x, md.Topology.from_openmm(top))
    pairs = rng.integers(0, x.shape[0], size=(4, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    obs = NOEDistance(pairs[:, :1].tolist(), pairs[:, 1:].tolist())
    d_md = md.compute_distances(traj, pairs)[0]
    assert np.abs(np.asarray(obs(traj.xyz[0].astype(np.float64))) - d_md).max() < 1e-6
    assert obs.labels[0] == f"NOE {pairs[0, 0]}-{pairs[0, 1]}"
    with pytest.raises(tm.InputError, match="power must be 6 or 3"):
        NOEDistance([[0]], [[1]], power=4)
    with pytest.raises(tm.InputError, match="atom 3 is in both groups"):
        NOEDistance([[3]], [[3]])


def test_dihedral_matches_mdtraj(trialanine_frames):
    top, frames = trialanine_frames
    quartets = np.array([[4, 6, 12, 14], [6, 12, 14, 16], [0, 4, 8, 9]])
    traj = md.Trajectory(frames, md.Topology.from_openmm(top))
    ref = md.compute_dihedrals(traj, quartets)
    ours = jax.vmap(Dihedral(quartets))(traj.xyz.astype(np.float64))
    assert np.abs(np.asarray(ours) - ref).max() < 1e-5
    np.testing.assert_allclose(
        jax.vmap(Dihedral(quartets))(frames), _phi64(frames, quartets), atol=1e-12
    )


def test_specs_and_errors(trialanine):
    top, x = trialanine
    j = observable_from_spec({"type": "J3_HN_HA", "model": "Bax1997", "value": [6.0]}, top)
    np.testing.assert_array_equal(j(x), JCoupling3HNHA(top, model="Bax1997")(x))
    noe = observable_from_spec(
        {"type": "NOE", "pairs": [["resid 0 and name H2", [22]]], "power": 3}, top
    )
    np.testing.assert_allclose(noe(x), [np.linalg.norm(x[2] - x[22])], rtol=1e-13)
    d = observable_from_spec({"type": "dihedral", "indices": [[4, 6, 12, 14]]}, top)
    assert d.labels == ("dihedral 4-6-12-14",)
    with pytest.raises(tm.InputError, match="'SAXS'.*known types: J3_HN_HA, J3_HN_C"):
        observable_from_spec({"type": "SAXS"}, top)
    with pytest.raises(tm.InputError, match="'name CZ' matches no atom"):
        observable_from_spec({"type": "Rg", "atoms": "name CZ"}, top)
    with pytest.raises(tm.InputError, match="unknown key.*'atom'"):
        observable_from_spec({"type": "Rg", "atom": "name CA"}, top)
    with pytest.raises(tm.InputError, match="invalid atom selection"):
        observable_from_spec({"type": "Rg", "atoms": "name CA and and"}, top)
    with pytest.raises(tm.InputError, match="uses atom 40 but the positions have only 33"):
        Dihedral([[0, 1, 2, 40]])(x)
    with pytest.raises(tm.InputError, match="Dihedral.indices is empty"):
        Dihedral(np.zeros((0, 4), int))
