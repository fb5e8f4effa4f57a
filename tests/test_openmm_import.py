"""The typed System reproduces OpenMM's Reference platform, term by term and in total."""

import os
import xml.etree.ElementTree as ET

import jax
import numpy as np
import openmm.app as app
import pytest
from openmm_reference import openmm_energies_forces

import timemachine as tm
from timemachine.io import openmm_system_for

# timemachine term kinds -> the OpenMM force they come from
OPENMM_FORCE = {
    "bond": "HarmonicBondForce",
    "angle": "HarmonicAngleForce",
    "torsion": "PeriodicTorsionForce",
    "improper": "PeriodicTorsionForce",
    "nonbonded": "NonbondedForce",
    "gb": "CustomGBForce",
}

CASES = [
    (mol, ff, gb)
    for mol in ("trialanine", "villin")
    for ff in ("amber99sbildn.xml", "amber14-all.xml")
    for gb in (None, "obc2")
]


def _rel_rms(f, ref):
    return np.sqrt(np.mean((f - ref) ** 2)) / np.sqrt(np.mean(ref**2))


@pytest.mark.parametrize("mol,ff,gb", CASES)
def test_energy_and_forces_match_openmm_reference(mol, ff, gb, request):
    top, x = request.getfixturevalue(mol)
    system, x = tm.load_system((top, x), forcefield=(ff,), implicit_solvent=gb)
    ref = openmm_energies_forces(openmm_system_for(top, (ff,), gb), x)

    e_total = float(system.energy(x))
    f_total = -np.asarray(system.gradient(x))
    assert abs(e_total - ref["total"][0]) / abs(ref["total"][0]) <= 1e-7
    assert _rel_rms(f_total, ref["total"][1]) <= 1e-6
    # the closed-form gradient of plain dynamics: OpenMM's forces, and autodiff's to round-off
    params = jax.numpy.asarray(system.params)
    f_fast = -np.asarray(jax.jit(system.gradient_fn())(jax.numpy.asarray(x), params))
    assert _rel_rms(f_fast, ref["total"][1]) <= 1e-6
    assert _rel_rms(f_fast, f_total) <= 1e-12

    # term by term: sum our terms that map onto each OpenMM force
    per_force = {}
    for term in system.terms:
        name = OPENMM_FORCE[term.kind]
        e, g = jax.value_and_grad(term.energy)(jax.numpy.asarray(x), params)
        e0, g0 = per_force.get(name, (0.0, 0.0))
        per_force[name] = (e0 + float(e), g0 + np.asarray(g))
    assert set(per_force) == set(ref) - {"total"}
    for name, (e, g) in per_force.items():
        e_ref, f_ref = ref[name]
        assert abs(e - e_ref) <= 1e-7 * max(abs(e_ref), 1.0), name
        assert _rel_rms(-g, f_ref) <= 1e-6, name


def test_parameters_are_force_field_types(trialanine):
    system, _ = tm.load_system(
        trialanine, forcefield=("amber99sbildn.xml",), implicit_solvent="obc2"
    )
    names = system.param_names
    assert "torsion/X-C-N-X/k2" in names
    assert "torsion/CT-CT-N-C/k1" in names and "torsion/CT-CT-N-C/phase1" in names
    assert "bond/CT-HC/k" in names and "angle/HC-CT-HC/theta0" in names
    assert "sigma/CT/sigma" in names and "epsilon/CT/epsilon" in names
    assert "charge/NALA:N/q" in names
    assert {"gb/H(N)/radius", "gb/H/radius", "gb/C/scale"} <= set(names)
    assert len(set(names)) == len(names)
    # a type is one entry however many terms use it: X-CT-CT-X covers every CA-CB torsion
    i = system.index("torsion/X-CT-CT-X/k3")
    uses = sum(int(np.sum(t.k_index == i)) for t in system.terms if t.kind == "torsion")
    assert uses >= 9  # 3 methyl groups x 3 H x ... (each CA-CB bond has 9 torsions)
    assert system.params[i] == pytest.approx(0.6508444444444444)
    # selection
    sel = system.select("torsion/*/k*")
    assert all(names[j].startswith("torsion/") for j in sel) and len(sel) > 5
    both = system.select(["torsion/*/k*", "improper/*/k*"])
    assert len(both) > len(sel)


def _edit_proper_k(src, dst, classes, periodicity, new_k):
    """Set k of one <Proper> entry (matched by its four classes) in a force-field XML."""
    tree = ET.parse(src)
    hits = 0
    for proper in tree.getroot().iter("Proper"):
        cls = tuple(proper.get(f"class{i}", proper.get(f"type{i}")) for i in range(1, 5))
        if cls != classes:
            continue
        m = 1
        while proper.get(f"periodicity{m}") is not None:
            if int(proper.get(f"periodicity{m}")) == periodicity:
                proper.set(f"k{m}", repr(float(new_k)))
                hits += 1
            m += 1
    assert hits == 1
    tree.write(dst)


@pytest.mark.parametrize(
    "classes,label,n", [(("C", "N", "CT", "C"), "C-N-CT-C", 2), (("", "C", "N", ""), "X-C-N-X", 2)]
)
def test_changing_a_torsion_type_matches_openmm_after_the_same_xml_edit(
    trialanine, tmp_path, classes, label, n
):
    top, x0 = trialanine
    system, x = tm.load_system(trialanine, forcefield=("amber99sbildn.xml",))
    name = f"torsion/{label}/k{n}"
    i = system.index(name)
    new_k = system.params[i] * 1.37 + 0.5
    theta = system.params.copy()
    theta[i] = new_k

    src = os.path.join(os.path.dirname(app.__file__), "data", "amber99sbildn.xml")
    dst = str(tmp_path / "edited.xml")
    _edit_proper_k(src, dst, classes, n, new_k)
    e_before = openmm_energies_forces(openmm_system_for(top, (src,)), x)["total"][0]
    e_after = openmm_energies_forces(openmm_system_for(top, (dst,)), x)["total"][0]
    assert abs(e_after - e_before) > 1e-3  # the edit matters
    ours_before = float(system.energy(x))
    ours_after = float(system.energy(x, theta))
    assert ours_after - ours_before == pytest.approx(e_after - e_before, rel=1e-9, abs=1e-9)
    assert ours_after == pytest.approx(e_after, rel=1e-10)
    # the edited XML parametrises to a System whose θ differs in exactly that entry
    edited, _ = tm.load_system(trialanine, forcefield=(dst,))
    assert edited.param_names == system.param_names
    diff = np.flatnonzero(edited.params != system.params)
    assert diff.tolist() == [i]


def test_from_openmm_matches_load_system(trialanine):
    top, x = trialanine
    omm = openmm_system_for(top, ("amber14-all.xml",), "obc2")
    system = tm.System.from_openmm(
        omm, top, forcefield=("amber14-all.xml",), implicit_solvent="obc2"
    )
    ref, _ = tm.load_system(trialanine, forcefield=("amber14-all.xml",), implicit_solvent="obc2")
    assert system.param_names == ref.param_names
    assert float(system.energy(x)) == pytest.approx(float(ref.energy(x)), rel=1e-14)
    # a System edited after creation is refused, naming the force
    for f in omm.getForces():
        if type(f).__name__ == "HarmonicBondForce":
            p = f.getBondParameters(0)
            f.setBondParameters(0, p[0], p[1], p[2], p[3] * 2)
    with pytest.raises(tm.ForceFieldError, match="HarmonicBondForce"):
        tm.System.from_openmm(omm, top, forcefield=("amber14-all.xml",), implicit_solvent="obc2")


# ---- bad input --------------------------------------------------------------------


def test_residue_without_template_names_the_residue(tmp_path, trialanine):
    top, x = trialanine
    pdb = tmp_path / "odd.pdb"
    import openmm.unit as unit

    # trialanine plus a one-atom ligand "XYZ" that no amber template describes
    extra = app.Topology()
    residue = extra.addResidue("XYZ", extra.addChain())
    extra.addAtom("C1", app.element.carbon, residue)
    modeller = app.Modeller(top, x * unit.nanometer)
    modeller.add(extra, [[2.0, 2.0, 2.0]] * unit.nanometer)
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    with pytest.raises(tm.ForceFieldError, match="XYZ") as err:
        tm.load_system(str(pdb))
    assert isinstance(err.value, ValueError) and isinstance(err.value, tm.TimemachineError)
    assert "odd.pdb" in str(err.value)


def test_unknown_forcefield_file(trialanine):
    with pytest.raises(tm.MissingFileError, match="amber99sbildnX.xml") as err:
        tm.load_system(trialanine, forcefield=("amber99sbildnX.xml",))
    assert isinstance(err.value, FileNotFoundError)


def test_missing_structure_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pdb"):
        tm.load_system(str(tmp_path / "nope.pdb"))


def test_unknown_implicit_solvent(trialanine):
    with pytest.raises(tm.InputError, match="gbsa9"):
        tm.load_system(trialanine, implicit_solvent="gbsa9")


def test_bad_positions(trialanine):
    system, x = tm.load_system(trialanine)
    with pytest.raises(tm.InputError, match=r"shape \(33, 3\).*\(32, 3\)"):
        system.energy(x[:-1])
    bad = x.copy()
    bad[7, 1] = np.nan
    with pytest.raises(tm.InputError, match="nan at atom 7, coordinate y"):
        system.gradient(bad)
    with pytest.raises(tm.InputError, match=r"params must have shape"):
        system.energy(x, system.params[:-1])


def test_non_positive_masses(trialanine):
    system, _ = tm.load_system(trialanine)
    masses = system.masses.copy()
    masses[4] = 0.0
    with pytest.raises(tm.InputError, match="atom 4 has mass 0.0"):
        tm.System(masses, system.terms, system.param_names, system.params)


def test_glob_that_matches_nothing(trialanine):
    system, _ = tm.load_system(trialanine)
    with pytest.raises(tm.InputError, match=r"'torsion/ZZ\*' matches none"):
        system.select("torsion/ZZ*")
