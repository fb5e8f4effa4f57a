"""New functional forms in ``simulate``: analytic dx/dθ of the Morse-bond and the
neural-network dihedral systems against central finite differences of the same seeded
trajectory (common random numbers), trialanine in vacuum, and blow-up guards on them."""

import re

import numpy as np
import pytest

import timemachine as tm
from timemachine.errors import SimulationError
from timemachine.forms import add_backbone_dihedral_network, replace_bonds_with_morse

N_STEPS = 200
# relative FD step: the vacuum h-scan (tests/test_finite_difference.py) has its minimum
# between 1e-5 and 1e-6 over 1,000 steps; 200 steps are less chaotic
H = 1e-5
# Morse D, a and r0 of a heavy-atom bond, a C-H and the amide C-N type; one torsion k;
# and a harmonic bond k that stays in θ but that no term uses any more
MORSE_WRT = ["morse/CT-CT/*", "morse/CT-HC/*", "morse/C-N/*", "torsion/N-CT-C-N/k1",
             "bond/CT-CT/k"]  # fmt: skip
# a weight of each layer of the φ/ψ network, a torsion k, and the output bias b2 (a
# constant energy offset: dx/db2 = 0)
NN_WRT = ["nn_phipsi/W1/0", "nn_phipsi/W1/13", "nn_phipsi/b1/2", "nn_phipsi/W2/4",
          "torsion/CT-CT-C-N/k1", "nn_phipsi/b2/0"]  # fmt: skip
# (every test uses the same systems and wrt lists, so simulate compiles once per system)


@pytest.fixture(scope="module")
def vacuum():
    """Minimised trialanine in vacuum (amber99sbildn), bitwise the same in every process."""
    system, x = tm.load_system(tm.build_peptide("AAA"), forcefield=("amber99sbildn.xml",))
    return system, tm.minimize_system(system, x, tolerance=1.0, max_iterations=500, warn=False)


@pytest.fixture(scope="module")
def morse(vacuum):
    return replace_bonds_with_morse(vacuum[0], well_depth=400.0)


@pytest.fixture(scope="module")
def nn(vacuum):
    return add_backbone_dihedral_network(vacuum[0], hidden=6, scale=0.5, seed=1)


def integrator():
    return tm.LangevinIntegrator(temperature=300.0, friction=1.0, dt=0.001, seed=5)


def check_against_fd(system, x0, wrt, h=H):
    traj = tm.simulate(system, x0, integrator(), N_STEPS, wrt=wrt, save_every=100, progress=False)
    fd = tm.finite_difference(system, x0, integrator(), N_STEPS, wrt=wrt, h=h, save_every=100)
    table = tm.compare(traj, fd)
    print(f"\n{table}")
    assert [row["name"] for row in table] == list(traj.param_names)
    return traj, {row["name"]: row for row in table}


def test_morse_bond_sensitivities_match_finite_differences(vacuum, morse):
    """Morse D, a and r0 of three bond types and a torsion k of the same system: each
    within 1e-6 of central FD after 200 steps; the unused harmonic k: exactly 0 in both."""
    x0 = vacuum[1]
    assert "bond" not in [t.kind for t in morse.terms]
    traj, rows = check_against_fd(morse, x0, MORSE_WRT)
    assert len(rows) == 11
    unused = rows.pop("bond/CT-CT/k")
    assert unused["fd_norm"] == 0.0 and unused["analytic_norm"] == 0.0
    for name, row in rows.items():
        assert row["rel_error"] <= 1e-6, name
        assert row["fd_norm"] > 1e-5, name  # every parameter moves the atoms
    # the run is the Morse system's: its energy is the Morse system's at the saved x
    e = float(morse.energy(np.asarray(traj.x[-1])))
    assert traj.potential_energy[-1] == pytest.approx(e, rel=1e-10)
    assert abs(e - float(vacuum[0].energy(np.asarray(traj.x[-1])))) > 1e-3


def test_neural_network_dihedral_sensitivities_match_finite_differences(vacuum, nn):
    """A weight of each layer of the φ/ψ network and a torsion k: within 1e-6 of central
    FD after 200 steps. The output bias b2 shifts the energy by a constant: dx/db2 = 0.

    The network's weights (|w| ~ 0.1-0.3) get an absolute step of 3e-4: the tanh layer is
    smooth on a scale of O(1) in them, so the h² error stays ~1e-8 while the difference
    x⁺ - x⁻ stays well above round-off (measured for this structure and seed: max error
    1.3e-7 at h = 3e-4; 2.3e-6 at h = 1e-5 and 2e-5 at h = 1e-6, from round-off)."""
    x0 = vacuum[1]
    wrt = nn.select(NN_WRT)
    theta = nn.params[wrt]
    h = np.where(
        [nn.param_names[i].startswith("nn_phipsi/") for i in wrt],
        3e-4,
        H * np.maximum(np.abs(theta), 1e-2),
    )
    _, rows = check_against_fd(nn, x0, NN_WRT, h=h)
    assert len(rows) == 6
    bias = rows.pop("nn_phipsi/b2/0")
    assert bias["fd_norm"] == 0.0 and bias["analytic_norm"] == 0.0
    for name, row in rows.items():
        assert row["rel_error"] <= 1e-6, name
        assert row["fd_norm"] > 1e-5, name


def test_custom_term_blow_up_and_nan_name_step_parameter_and_atom(vacuum, morse, nn):
    """The guards hold for new functional forms: a sensitivity above max_sensitivity
    names the step, the parameter and the atom; a Morse wall whose force overflows gives
    non-finite coordinates, named by step and an atom of that bond type."""
    system, x0 = vacuum
    kw = dict(wrt=NN_WRT, save_every=10, progress=False)
    free = tm.simulate(nn, x0, integrator(), 100, max_sensitivity=None, **kw)
    mags = np.abs(free.dx_dtheta).max(axis=3)  # (F, P, N)
    limit = 0.5 * float(mags[-1].max())
    f = int(np.argmax((mags > limit).any(axis=(1, 2))))
    p, atom = np.unravel_index(int(np.argmax(mags[f])), mags[f].shape)
    with pytest.raises(SimulationError, match="sensitivity blow-up") as info:
        tm.simulate(nn, x0, integrator(), 100, max_sensitivity=limit, **kw)
    err = info.value
    assert (err.step, err.parameter, err.atom) == (int(free.steps[f]), free.param_names[p], atom)
    assert f"step {err.step}" in str(err) and repr(err.parameter) in str(err)
    assert f"atom {atom}" in str(err)

    # one Morse type with r0 = 50 nm: its bonds are 50 nm too short, and the repulsive
    # wall D e^{2a(r0 - r)} (2a(r0 - r) ≈ 2400) overflows already at x0, so the start
    # check refuses it before the first step, naming the term and an atom of that type
    params = np.array(morse.params)
    params[morse.index("morse/C-O/r0")] = 50.0
    with pytest.raises(
        tm.InputError, match=r"starting energy is inf .*from the morse term"
    ) as info:
        tm.simulate(
            morse, x0, integrator(), 10, wrt=MORSE_WRT, save_every=1, params=params,
            progress=False,
        )  # fmt: skip
    bonds = [t for t in system.terms if t.kind == "bond"][0]
    types = [system.param_names[i].split("/")[1] for i in np.asarray(bonds.length_index)]
    c_o_atoms = set(np.asarray(bonds.idx)[np.array(types) == "C-O"].ravel().tolist())
    (atom,) = info.value.atoms
    assert atom in c_o_atoms
    assert re.search(rf"atom {atom} \(\w+:\w+\) has \|∇E\| = inf", str(info.value))
