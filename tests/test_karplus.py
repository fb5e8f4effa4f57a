"""Backbone scalar couplings against their published Karplus relations, mdtraj, finite
differences; the residue bookkeeping; the shipped Graf et al. 2007 trialanine targets."""

import json
import math

import jax
import jax.numpy as jnp
import mdtraj as md
import numpy as np
import pytest

import timemachine as tm
from timemachine.fitting import (
    COUPLINGS,
    KARPLUS,
    JCoupling1NCA,
    JCoupling2NCA,
    JCoupling3HAC,
    JCoupling3HNC,
    JCoupling3HNCA,
    JCoupling3HNCB,
    JCoupling3HNHA,
    ScalarCoupling,
    graf2007_targets,
    load_targets,
    observable_from_spec,
)

D = math.pi / 180.0
cos, sin = np.cos, np.sin

# The published relations, written out here from the papers' equations (angles in radians).
PUBLISHED = {
    ("J3_HN_HA", "Bax2007"): lambda p: 8.4 * cos(p - 60 * D) ** 2 - 1.36 * cos(p - 60 * D) + 0.33,
    ("J3_HN_HA", "Bax1997"): lambda p: 7.09 * cos(p - 60 * D) ** 2 - 1.42 * cos(p - 60 * D) + 1.55,
    ("J3_HN_HA", "Ruterjans1999"): lambda p: (
        7.90 * cos(p - 60 * D) ** 2 - 1.05 * cos(p - 60 * D) + 0.65
    ),
    ("J3_HN_C", "Bax2007"): lambda p: 4.36 * cos(p + 180 * D) ** 2 - 1.08 * cos(p + 180 * D) - 0.01,
    ("J3_HN_C", "Bax1997"): lambda p: 4.29 * cos(p + 180 * D) ** 2 - 1.01 * cos(p - 60 * D),
    ("J3_HN_CB", "Bax2007"): lambda p: 3.71 * cos(p + 60 * D) ** 2 - 0.59 * cos(p + 60 * D) + 0.08,
    ("J3_HN_CB", "Bax1997"): lambda p: 3.06 * cos(p + 60 * D) ** 2 - 0.74 * cos(p + 60 * D) + 0.13,
    ("J3_HA_C", "Bax1997"): lambda p: 3.72 * cos(p + 120 * D) ** 2 - 2.18 * cos(p + 120 * D) + 1.28,
    ("J1_N_CA", "Wirmer2002"): lambda s: 1.70 * cos(s) ** 2 - 0.98 * cos(s) + 9.51,
    ("J2_N_CA", "Ding2004"): lambda s: -0.66 * cos(s) ** 2 - 1.52 * cos(s) + 7.85,
    ("J3_HN_CA", "Hennig2000"): lambda p, s: (
        -0.23 * cos(p)
        - 0.20 * cos(s)
        + 0.07 * sin(p)
        + 0.08 * sin(s)
        + 0.07 * cos(p) * cos(s)
        + 0.12 * cos(p) * sin(s)
        - 0.08 * sin(p) * cos(s)
        - 0.14 * sin(p) * sin(s)
        + 0.54
    ),
}
SIGMA = {
    ("J3_HN_HA", "Bax2007"): 0.36,
    ("J3_HN_C", "Bax2007"): 0.30,
    ("J3_HN_C", "Bax1997"): 0.32,
    ("J3_HN_CB", "Bax2007"): 0.22,
    ("J3_HN_CB", "Bax1997"): 0.21,
    ("J3_HA_C", "Bax1997"): 0.24,
    ("J1_N_CA", "Wirmer2002"): 0.53,
    ("J2_N_CA", "Ding2004"): 0.48,
}
CLASSES = {
    "J3_HN_HA": JCoupling3HNHA,
    "J3_HN_C": JCoupling3HNC,
    "J3_HN_CB": JCoupling3HNCB,
    "J3_HA_C": JCoupling3HAC,
    "J1_N_CA": JCoupling1NCA,
    "J2_N_CA": JCoupling2NCA,
    "J3_HN_CA": JCoupling3HNCA,
}


@pytest.fixture(scope="module")
def ala3():
    """Trialanine at five (φ, ψ), each also with 0.02 nm noise on every atom: (10, 33, 3)."""
    frames = []
    for phi, psi in [(-150, 150), (-65, -40), (60, 45), (-75, 145), (170, -170)]:
        top, x = tm.build_peptide("AAA", phi=phi, psi=psi)
        frames.append(x)
    frames = np.array(frames)
    rng = np.random.default_rng(7)
    frames = np.concatenate([frames, frames + 0.02 * rng.normal(size=frames.shape)])
    return top, frames


def _atom(top, residue, name):
    (a,) = [a.index for a in top.atoms() if a.residue.index == residue and a.name == name]
    return a


def _dihedral_np(frames, q):
    """IUPAC dihedral (radians) of quartet q over frames, float64 numpy."""
    p0, p1, p2, p3 = (frames[:, i] for i in q)
    b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
    b1n = b1 / np.linalg.norm(b1, axis=-1, keepdims=True)
    v = b0 - (b0 * b1n).sum(-1, keepdims=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdims=True) * b1n
    return np.arctan2((np.cross(b1n, v) * w).sum(-1), (v * w).sum(-1))


def _backbone(top):
    """φ_i and ψ_i quartets by residue index (0-based), from atom names."""
    n = top.getNumResidues()
    phi = {i: [_atom(top, i - 1, "C"), *(_atom(top, i, a) for a in ("N", "CA", "C"))]
           for i in range(1, n)}  # fmt: skip
    psi = {i: [*(_atom(top, i, a) for a in ("N", "CA", "C")), _atom(top, i + 1, "N")]
           for i in range(n - 1)}  # fmt: skip
    return phi, psi


def _expected(top, frames, coupling, model):
    """(residue indices, (F, K) values) of a coupling from the published formula."""
    phi, psi = _backbone(top)
    f = PUBLISHED[(coupling, model)]
    kind = COUPLINGS[coupling]["dihedral"]
    if kind == "phi":
        res = sorted(phi)
        vals = [f(_dihedral_np(frames, phi[i])) for i in res]
    elif kind == "psi":
        res = sorted(psi)
        vals = [f(_dihedral_np(frames, psi[i])) for i in res]
    elif kind == "psi_prev":
        res = [i for i in sorted(phi) if i - 1 in psi]
        vals = [f(_dihedral_np(frames, psi[i - 1])) for i in res]
    else:
        res = [i for i in sorted(phi) if i - 1 in psi]
        vals = [f(_dihedral_np(frames, phi[i]), _dihedral_np(frames, psi[i - 1])) for i in res]
    return res, np.stack(vals, axis=1)


ALL_SETS = [(c, m) for c in KARPLUS for m in KARPLUS[c]]


def test_table_holds_every_published_set():
    assert set(ALL_SETS) == set(PUBLISHED)
    for (c, m), sigma in SIGMA.items():
        assert KARPLUS[c][m]["sigma"] == sigma
    for c, m in ALL_SETS:
        s = KARPLUS[c][m]
        assert s["sigma"] > 0 and s["citation"]
        assert COUPLINGS[c]["default"] in KARPLUS[c]
    # Hennig 2000's RMS was not found: the module says its σ is a stand-in
    from timemachine.fitting import observables

    assert "Hennig et al.'s RMS was not found" in observables.__doc__


@pytest.mark.parametrize("coupling, model", ALL_SETS)
def test_couplings_match_published_formula(ala3, coupling, model):
    top, frames = ala3
    obs = ScalarCoupling(top, coupling, model)
    res, ref = _expected(top, frames, coupling, model)
    names = [f"ALA{i + 1}" for i in res]
    assert obs.labels == tuple(f"{coupling} {r}" for r in names)
    assert obs.residues == tuple(names)
    ours = np.asarray(jax.vmap(obs)(frames))
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert obs.sigma == KARPLUS[coupling][model]["sigma"]
    # the class of that coupling, and the spec, give the same
    np.testing.assert_array_equal(CLASSES[coupling](top, model=model)(frames[3]), ours[3])
    spec = observable_from_spec({"type": coupling, "model": model}, top)
    np.testing.assert_array_equal(spec(frames[3]), ours[3])


@pytest.mark.parametrize(
    "cls, md_fn, models",
    [
        (JCoupling3HNHA, md.compute_J3_HN_HA, ["Bax2007", "Bax1997", "Ruterjans1999"]),
        (JCoupling3HNC, md.compute_J3_HN_C, ["Bax2007"]),
        (JCoupling3HNCB, md.compute_J3_HN_CB, ["Bax2007"]),
    ],
)
def test_couplings_match_mdtraj(ala3, cls, md_fn, models):
    top, frames = ala3
    traj = md.Trajectory(frames, md.Topology.from_openmm(top))
    for model in models:
        obs = cls(top, model=model)
        idx, j_md = md_fn(traj, model=model)
        np.testing.assert_array_equal(obs.indices, idx)
        ours = np.asarray(jax.vmap(obs)(traj.xyz.astype(np.float64)))  # mdtraj is float32
        assert np.abs(ours - j_md).max() < 2e-5


@pytest.mark.parametrize("coupling", list(KARPLUS))
def test_gradient_matches_central_differences(ala3, coupling):
    top, frames = ala3
    obs = ScalarCoupling(top, coupling)
    x = jnp.asarray(frames[8])
    w = jnp.arange(1.0, obs.n_values + 1.0)
    f = jax.jit(lambda y: jnp.dot(w, obs(y)))
    g = jax.grad(f)(x)
    rng = np.random.default_rng(11)
    for _ in range(3):
        t = rng.normal(size=x.shape)
        t = jnp.asarray(t / np.linalg.norm(t))  # a unit direction: steps of 1e-6 nm
        h = 1e-6
        fd = (f(x + h * t) - f(x - h * t)) / (2 * h)
        assert abs(float(jnp.sum(g * t)) - float(fd)) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize(
    "coupling, residue, needs",
    [
        ("J3_HA_C", 2, lambda phi, psi: phi[2]),
        ("J1_N_CA", 1, lambda phi, psi: psi[1]),  # the same residue's ψ
        ("J2_N_CA", 2, lambda phi, psi: psi[1]),  # the previous residue's ψ
        ("J3_HN_CA", 2, lambda phi, psi: phi[2] + psi[1]),
    ],
)
def test_each_value_reads_its_own_dihedrals(ala3, coupling, residue, needs):
    top, frames = ala3
    phi, psi = _backbone(top)
    obs = ScalarCoupling(top, coupling, residues=[residue])
    assert obs.labels == (f"{coupling} ALA{residue + 1}",)
    g = np.asarray(jax.grad(lambda y: obs(y)[0])(jnp.asarray(frames[6])))
    moved = set(np.flatnonzero(np.abs(g).sum(1) > 0))
    assert moved == set(needs(phi, psi))


def test_residue_selection(ala3):
    top, frames = ala3
    full = JCoupling2NCA(top)
    assert full.labels == ("J2_N_CA ALA2", "J2_N_CA ALA3")
    rev = JCoupling2NCA(top, residues=["ALA3", 1])  # names or 0-based indices, in that order
    assert rev.labels == ("J2_N_CA ALA3", "J2_N_CA ALA2")
    np.testing.assert_array_equal(rev(frames[1]), full(frames[1])[::-1])
    assert JCoupling1NCA(top).labels == ("J1_N_CA ALA1", "J1_N_CA ALA2")
    spec = observable_from_spec({"type": "J3_HN_CA", "residues": ["ALA3"]}, top)
    assert spec.labels == ("J3_HN_CA ALA3",)
    assert spec.model == "Hennig2000"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda t: JCoupling1NCA(t, residues=["ALA3"]), r"ALA3 has no J1_N_CA.*own ψ"),
        (lambda t: JCoupling2NCA(t, residues=["ALA1"]), r"ALA1 has no J2_N_CA.*previous"),
        (lambda t: JCoupling3HNCA(t, residues=[0]), r"ALA1 has no J3_HN_CA"),
        (lambda t: JCoupling3HNHA(t, residues=["ALA1"]), r"ALA1 has no J3_HN_HA"),
        (lambda t: JCoupling3HAC(t, residues=["GLY7"]), r"'GLY7' is not in the topology"),
        (lambda t: JCoupling3HAC(t, residues=[5]), r"residue index 5 is not in the topology"),
        (lambda t: JCoupling3HAC(t, residues=["ALA2", "ALA2"]), r"ALA2 is selected twice"),
        (lambda t: JCoupling3HAC(t, residues=[]), r"selects no residue"),
        (lambda t: JCoupling3HAC(t, model="Bax2007"), r"'Bax2007'.*valid models: Bax1997"),
        (lambda t: ScalarCoupling(t, "J3_CP_CP"), r"'J3_CP_CP'.*J3_HN_HA, J3_HN_C"),
        (
            lambda t: observable_from_spec({"type": "J3_CP_CP"}, t),
            r"'J3_CP_CP'.*no Karplus set.*J3_HA_C",
        ),
        (
            lambda t: observable_from_spec({"type": "J1_N_CA", "residues": ["ALA3"]}, t),
            r"ALA3 has no J1_N_CA",
        ),
    ],
)
def test_bad_couplings_raise_input_error(ala3, make, match):
    top, _ = ala3
    with pytest.raises(tm.InputError, match=match):
        make(top)


def test_graf2007_targets(ala3):
    top, frames = ala3
    targets = graf2007_targets(top)
    got = {
        lab: (v, s)
        for t in targets
        for lab, v, s in zip(t.labels, t.value, t.uncertainty, strict=True)
    }
    assert got == {
        "3J(HN,HA):J3_HN_HA ALA2": (5.68, 0.36),
        "3J(HN,HA):J3_HN_HA ALA3": (6.52, 0.36),
        "3J(HN,C'):J3_HN_C ALA2": (1.13, 0.30),
        "3J(HA,C'):J3_HA_C ALA2": (1.84, 0.24),
        "3J(HN,CB):J3_HN_CB ALA2": (2.39, 0.22),
        "1J(N,CA):J1_N_CA ALA2": (11.34, 0.53),
        "2J(N,CA):J2_N_CA ALA3": (8.45, 0.48),
    }
    for t in targets:  # σ is the Karplus set's RMS
        assert np.all(t.uncertainty == t.observable.sigma)
        assert t.observable(frames[0]).shape == (t.n_values,)
    # the same from an mdtraj topology
    assert [t.labels for t in graf2007_targets(md.Topology.from_openmm(top))] == [
        t.labels for t in targets
    ]


def test_graf2007_file_documents_what_is_missing():
    import importlib.resources

    text = importlib.resources.files("timemachine.data").joinpath("graf2007_ala3.json")
    data = json.loads(text.read_text())
    assert "129, 1179" in data["citation"]
    assert "Karplus" in data["note"] and "Missing" in data["note"]


def _write(tmp_path, entries):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"citation": "test", "targets": entries}))
    return str(path)


GOOD = {"type": "J3_HA_C", "residues": ["ALA2"], "value": [1.84], "uncertainty": 0.24}


def test_skipped_entries_are_not_loaded(ala3, tmp_path):
    top, _ = ala3
    c_terminal = {"type": "J1_N_CA", "residues": ["ALA3"], "value": [11.0], "uncertainty": 0.53}
    path = _write(tmp_path, [GOOD, {**c_terminal, "skip": True, "skip_reason": "no ψ3"}])
    (t,) = load_targets(path, top)
    assert t.labels == ("J3_HA_C#0:J3_HA_C ALA2",)
    with pytest.raises(tm.InputError, match=r"targets\.json.*ALA3 has no J1_N_CA"):
        load_targets(_write(tmp_path, [GOOD, c_terminal]), top)
    with pytest.raises(tm.InputError, match="'skip' must be true or false"):
        load_targets(_write(tmp_path, [{**GOOD, "skip": "yes"}]), top)
    with pytest.raises(tm.InputError, match="every target is marked 'skip'"):
        load_targets(_write(tmp_path, [{**GOOD, "skip": True}]), top)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"residues": ["ALA9"]}, r"'ALA9' is not in the topology"),
        ({"type": "J3_CP_CP"}, r"'J3_CP_CP'.*no Karplus set"),
        ({"model": "Karplus1959"}, r"'Karplus1959'.*valid models: Bax1997"),
        ({"uncertainty": 0.0}, r"uncertainty\[0\] = 0\.0 must be > 0"),
        ({"uncertainty": -0.24}, r"uncertainty\[0\] = -0\.24 must be > 0"),
        ({"value": [1.0, 2.0]}, r"value has 2 numbers but the observable returns 1"),
    ],
)
def test_load_targets_rejects_bad_couplings(ala3, tmp_path, change, match):
    top, _ = ala3
    path = _write(tmp_path, [{**GOOD, **change}])
    with pytest.raises(tm.InputError, match=match) as info:
        load_targets(path, top)
    assert path in str(info.value)
