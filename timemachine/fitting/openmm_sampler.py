"""OpenMM as the equilibrium sampler of a fit: chains on any OpenMM System, frames back here.

The fluctuation estimator needs equilibrium frames at θ and ∂E/∂θ on them
(docs/design.md, "Gradients of equilibrium averages"); it does not need the engine's
dynamics. ``OpenMMSampler`` runs the chains in OpenMM instead: an explicitly solvated
System with PME and constraints, on any platform (CUDA when present), and returns the
frames of the solute. θ is carried into OpenMM through the solute's torsions: every
``PeriodicTorsionForce`` torsion on the solute is matched, by its atoms and periodicity,
to a torsion of the solute's ``timemachine.System``, whose θ entries (barrier k, phase)
are written into the OpenMM System before each segment. ∂E/∂θ and the reweighting
energies E(x; θ) - E(x; θ₀) of those parameters depend on the solute's coordinates
alone, so the engine evaluates them on the solute's frames with its own System; every
other parameter (a charge, a Lennard-Jones σ, a bond of a constrained system) would need
the solvent's frames and the OpenMM System's own terms, and is refused.

Chain c of segment s runs ``LangevinMiddleIntegrator`` (temperature, friction and dt of
the fit's integrator) in a fresh ``Context`` seeded from (seed, chain, step), so a run
depends only on (seed, θ per epoch, segment lengths) and a resumed fit continues with the
seeds an uninterrupted one would have used. OpenMM's Reference platform is then bitwise
reproducible; the CPU and GPU platforms accumulate forces in an order that varies from
run to run, so their chains agree only statistically.
"""

from __future__ import annotations

import numpy as np

from timemachine.checks import check_int
from timemachine.errors import ForceFieldError, InputError, SimulationError
from timemachine.fitting.sampling import ChainSampler
from timemachine.integrator.langevin import LangevinIntegrator, LangevinState
from timemachine.system import PeriodicTorsions, System

__all__ = ["OpenMMChains", "OpenMMSampler", "torsion_map"]

#: the parameter kinds the OpenMM sampler carries into OpenMM (the solute's torsions)
SAMPLED_KINDS = ("torsion", "improper")


def _seed(seed, chain, step, purpose=0) -> int:
    """An OpenMM seed in [1, 2^31 - 1] (0 means "pick one at random") from (seed, chain,
    step, purpose: 0 the dynamics, 1 the starting velocities)."""
    entropy = [int(seed), int(chain), int(step), int(purpose)]
    raw = np.random.SeedSequence(entropy).generate_state(1)[0]
    return int(raw) % (2**31 - 2) + 1


def torsion_map(system: System, openmm_system, n_solute: int):
    """Which OpenMM torsion carries which θ entries.

    Args:
        system: the solute's ``timemachine.System`` (its atoms are the first ``n_solute``
            particles of ``openmm_system``, in the same order).
        openmm_system: an ``openmm.System``.
        n_solute: the solute's atoms.

    Returns:
        list of (force index, torsion index, atoms (4,), periodicity, phase θ index, k θ
        index): one per OpenMM torsion on the solute.

    Raises:
        ForceFieldError: an OpenMM torsion on the solute with no torsion of the same atoms
            and periodicity in ``system``, one of ``system``'s torsions with none in
            OpenMM, or parameters that differ between the two (they are not the same
            force field).
    """
    import openmm as mm

    table = {}
    for term in system.terms:
        if not isinstance(term, PeriodicTorsions):
            continue
        idx, per = np.asarray(term.idx), np.asarray(term.periodicity)
        for r in range(idx.shape[0]):
            key = (tuple(int(a) for a in idx[r]), int(per[r]))
            table.setdefault(key, []).append((int(term.phase_index[r]), int(term.k_index[r])))
    n_engine = sum(len(v) for v in table.values())
    theta = np.asarray(system.params)
    out = []
    for f_no, force in enumerate(openmm_system.getForces()):
        if not isinstance(force, mm.PeriodicTorsionForce):
            continue
        for t in range(force.getNumTorsions()):
            a, b, c, d, per, phase, k = force.getTorsionParameters(t)
            atoms = (a, b, c, d)
            if max(atoms) >= n_solute:
                continue  # a solvent or ligand torsion: left as OpenMM has it
            key = (atoms, int(per))
            rows = table.get(key) or table.get((atoms[::-1], int(per)))
            if not rows:
                raise ForceFieldError(
                    f"the OpenMM System's torsion {t} (atoms {atoms}, periodicity {per}) has no "
                    "torsion of the same atoms and periodicity in the System: the two were not "
                    "built from the same force field and solute"
                )
            p_idx, k_idx = rows.pop(0)
            phase_v, k_v = phase.value_in_unit(phase.unit), k.value_in_unit(k.unit)
            if abs(phase_v - theta[p_idx]) > 1e-6 or abs(k_v - theta[k_idx]) > 1e-6 * max(
                1.0, abs(k_v)
            ):
                raise ForceFieldError(
                    f"the OpenMM System's torsion {t} (atoms {atoms}) has phase {phase_v:g}, "
                    f"k {k_v:g} kJ/mol; the System's ({system.param_names[k_idx]}) has "
                    f"{theta[p_idx]:g}, {theta[k_idx]:g}: not the same force field"
                )
            out.append((f_no, t, atoms, int(per), p_idx, k_idx))
    if len(out) != n_engine:
        raise ForceFieldError(
            f"the System has {n_engine} torsions on its {n_solute} atoms, the OpenMM System "
            f"{len(out)}: they are not the same solute under the same force field"
        )
    return out


def _check_masses(sampled, masses) -> None:
    """ForceFieldError unless the OpenMM System's first N masses (amu) are the System's,
    or the same atoms after hydrogen mass repartitioning: every atom that differs is a
    hydrogen made heavier (real mass < 1.1 amu) or a heavy atom made lighter by as much,
    and the solute's total mass is unchanged. Repartitioned masses change the dynamics,
    not the Boltzmann distribution of the positions that the estimators use."""
    if np.allclose(sampled, masses, rtol=1e-6, atol=0):
        return
    diff = sampled - masses
    moved = ~np.isclose(sampled, masses, rtol=1e-6, atol=0)
    hydrogens = masses < 1.1
    repartitioned = (
        abs(diff.sum()) < 1e-6 * masses.sum()
        and np.all(diff[moved & hydrogens] > 0)
        and np.all(diff[moved & ~hydrogens] < 0)
    )
    if not repartitioned:
        bad = int(np.argmax(np.abs(diff)))
        raise ForceFieldError(
            f"particle {bad} has mass {sampled[bad]:g} amu in the OpenMM System and "
            f"{float(masses[bad]):g} in the System, and the difference is not a hydrogen "
            "mass repartitioning: the solute's atoms must come first, in the System's order"
        )


class OpenMMSampler:
    """Where a fit's equilibrium chains run: OpenMM, on any OpenMM System.

    Pass it as ``sampler=`` to ``tm.fit`` / ``fit_equilibrium`` (fluctuation estimator),
    with the solute's ``timemachine.System`` as the fitted system; ``x0`` may be None.

    Args:
        openmm_system: an ``openmm.System`` whose first ``system.n_atoms`` particles are
            the solute, in the System's order (``timemachine.io.solvate`` builds both):
            explicit water, PME, constraints, virtual sites are all OpenMM's business.
        positions: (N_total, 3) nm (or an OpenMM Quantity) of every particle.
        platform: an OpenMM platform name ("CPU", "CUDA", "Reference", ...); default the
            fastest present among CUDA, OpenCL, CPU, Reference.
        properties: platform properties (e.g. ``{"Precision": "mixed"}``).
        minimize: minimise the positions in OpenMM once, before the chains start
            (``LocalEnergyMinimizer``, tolerance 10 kJ/mol/nm); a freshly solvated box
            needs it.
        box: (3, 3) nm periodic box vectors of ``positions`` (default the System's).

    Raises:
        InputError: positions of another shape, non-finite ones, an unknown platform, or a
            barostat (the chains run at constant volume).
    """

    kind = "openmm"

    def __init__(self, openmm_system, positions, platform=None, properties=None,
                 minimize=True, box=None):  # fmt: skip
        import openmm as mm
        import openmm.unit as unit

        if not isinstance(openmm_system, mm.System):
            raise InputError(
                f"openmm_system must be an openmm.System, got {type(openmm_system).__name__}"
            )
        if unit.is_quantity(positions):
            positions = positions.value_in_unit(unit.nanometer)
        x = np.asarray(positions, dtype=np.float64)
        n = openmm_system.getNumParticles()
        if x.shape != (n, 3):
            raise InputError(
                f"positions must be ({n}, 3) nm for the OpenMM System's {n} particles, got "
                f"{x.shape}"
            )
        if not np.isfinite(x).all():
            raise InputError("positions hold non-finite values")
        for force in openmm_system.getForces():
            if "Barostat" in type(force).__name__:
                raise InputError(
                    f"the OpenMM System has a {type(force).__name__}: the OpenMM sampler runs "
                    "the chains in a fixed box (NVT); remove it, after equilibrating the "
                    "box's density with it"
                )
        names = [mm.Platform.getPlatform(i).getName() for i in range(mm.Platform.getNumPlatforms())]
        if platform is None:
            platform = next(p for p in ("CUDA", "OpenCL", "CPU", "Reference") if p in names)
        if platform not in names:
            raise InputError(f"OpenMM platform {platform!r} is not present (present: {names})")
        self.openmm_system = mm.XmlSerializer.clone(openmm_system)  # the caller's is kept
        self.positions = x
        self.platform = platform
        self.properties = dict(properties or {})
        self.minimize = bool(minimize)
        if box is None:
            vecs = openmm_system.getDefaultPeriodicBoxVectors()
            box = [v.value_in_unit(unit.nanometer) for v in vecs]
        self.box = np.asarray([[float(c) for c in v] for v in box], dtype=np.float64)

    def __repr__(self):
        n = self.openmm_system.getNumParticles()
        return f"OpenMMSampler({n} particles, platform={self.platform!r})"

    @classmethod
    def for_system(cls, system: System, x, platform=None, properties=None):
        """The sampler of the engine's own System in OpenMM: its force field exported
        (``timemachine.export_forcefield``, the native GBSAOBCForce for OBC2) and built
        on its topology without constraints, with the System's nonbonded method (NoCutoff,
        or CutoffNonPeriodic with its cutoff and switch: reaction field and, in OBC2, the
        GB pairs within the same cutoff), started at ``x`` (N, 3) nm. This is
        ``sampler="openmm"``. A periodic System is refused: it comes from an OpenMM
        System of its own (``OpenMMSampler(openmm_system, positions)``)."""
        import os
        import tempfile

        import openmm.app as app
        import openmm.unit as unit

        from timemachine.io import export_forcefield

        if system.topology is None:
            raise InputError('sampler="openmm" needs a System with a topology (load_system)')
        options = {"nonbondedMethod": app.NoCutoff}
        for t in system.terms:
            if t.kind != "nonbonded-cutoff":
                continue
            if t.box is not None:
                raise InputError(
                    'sampler="openmm" rebuilds a System without cutoffs or with '
                    "CutoffNonPeriodic; this one is periodic: pass "
                    "sampler=OpenMMSampler(openmm_system, positions) with the OpenMM System "
                    "it came from"
                )
            options = {"nonbondedMethod": app.CutoffNonPeriodic,
                       "nonbondedCutoff": t.cutoff * unit.nanometer}  # fmt: skip
            if t.switch_distance is not None:
                options["switchDistance"] = t.switch_distance * unit.nanometer
        with tempfile.TemporaryDirectory(prefix="timemachine-openmm-") as tmp:
            path = os.path.join(tmp, "forcefield.xml")
            export_forcefield(system, system.params, path)
            omm = app.ForceField(path).createSystem(
                system.topology, constraints=None, rigidWater=False, removeCMMotion=False,
                **options,
            )  # fmt: skip
        return cls(omm, x, platform=platform, properties=properties, minimize=False)

    def chains(self, system, integrator, n_chains, save_every, first_replica=0, params=None):
        """The fit's ``OpenMMChains`` for the solute ``system`` (see ``OpenMMChains``)."""
        return OpenMMChains(self, system, integrator, n_chains=n_chains, save_every=save_every,
                            first_replica=first_replica, params=params)  # fmt: skip


def check_sampled_parameters(system: System, wrt, where="wrt") -> None:
    """InputError naming the first parameter of ``wrt`` the OpenMM sampler cannot carry
    into OpenMM and differentiate on the solute's frames (anything but a torsion's k or
    phase)."""
    for i in np.asarray(wrt).reshape(-1):
        name = system.param_names[int(i)]
        if name.split("/")[0] not in SAMPLED_KINDS:
            raise InputError(
                f"{where}: parameter {name!r} cannot be fitted with the OpenMM sampler: only "
                "the solute's torsion barriers and phases (torsion/*, improper/*) are set in "
                "the OpenMM System each epoch and differentiated on the solute's frames; "
                f"a {name.split('/')[0]} parameter would need the OpenMM System's own terms "
                "on the whole box"
            )


class OpenMMChains(ChainSampler):
    """C persistent OpenMM chains of an ``OpenMMSampler``'s System, continued at each θ.

    Args:
        sampler: the ``OpenMMSampler``.
        system: the solute's ``timemachine.System`` (the first ``system.n_atoms``
            particles of the OpenMM System).
        integrator: ``LangevinIntegrator``: temperature, friction, dt and seed of the
            OpenMM chains (``LangevinMiddleIntegrator``).
        n_chains, save_every, first_replica: as ``EquilibriumChains``'.
        params: (P_all,) θ of the start (default ``system.params``).

    Attributes:
        state: ``LangevinState`` of the whole OpenMM System, (C, N_total, 3) numpy arrays
            (x nm, v nm/ps) and steps (C,).
        frames of ``sample`` are the solute's: (C, F, system.n_atoms, 3) nm.
    """

    def __init__(self, sampler: OpenMMSampler, system: System, integrator: LangevinIntegrator,
                 n_chains: int = 2, save_every: int = 500, first_replica: int = 0,
                 params=None):  # fmt: skip
        import openmm as mm
        import openmm.unit as unit

        if not isinstance(system, System):
            raise InputError(f"system must be a timemachine.System, got {type(system).__name__}")
        if not isinstance(integrator, LangevinIntegrator):
            raise InputError(
                f"integrator must be a LangevinIntegrator, got {type(integrator).__name__}"
            )
        self.sampler, self.system, self.integrator = sampler, system, integrator
        self.n_chains = check_int(n_chains, "n_chains", minimum=1)
        self.save_every = check_int(save_every, "save_every", minimum=1)
        self.first_replica = check_int(first_replica, "first_replica", minimum=0)
        self.executor = None
        # the chains' own copy, into which θ is written (the sampler's stays as given)
        self.openmm_system = omm = mm.XmlSerializer.clone(sampler.openmm_system)
        self.n_solute = system.n_atoms
        if omm.getNumParticles() < self.n_solute:
            raise InputError(
                f"the OpenMM System has {omm.getNumParticles()} particles, fewer than the "
                f"System's {self.n_solute} atoms"
            )
        masses = np.array([omm.getParticleMass(i).value_in_unit(unit.dalton)
                           for i in range(self.n_solute)])  # fmt: skip
        _check_masses(masses, np.asarray(system.masses))
        self.map = torsion_map(system, omm, self.n_solute)
        self._forces = {f for f, *_ in self.map}
        theta = system.resolve_params(params)
        self._set_theta(theta)
        x = sampler.positions
        platform = mm.Platform.getPlatformByName(sampler.platform)
        t, g, dt = integrator.temperature, integrator.friction, integrator.dt
        if sampler.minimize:
            ctx = mm.Context(omm, mm.VerletIntegrator(0.001), platform, sampler.properties)
            ctx.setPositions(x * unit.nanometer)
            mm.LocalEnergyMinimizer.minimize(ctx, 10.0, 1000)
            x = (
                ctx.getState(getPositions=True)
                .getPositions(asNumpy=True)
                .value_in_unit(unit.nanometer)
            )
            del ctx
        # one Context draws every chain's starting velocities (each from its own seed)
        ctx = mm.Context(omm, mm.LangevinMiddleIntegrator(t, g, dt), platform,
                         sampler.properties)  # fmt: skip
        xs, vs = [], []
        for c in range(self.n_chains):
            ctx.setPositions(np.asarray(x) * unit.nanometer)
            ctx.setVelocitiesToTemperature(t, _seed(integrator.seed, first_replica + c, 0, 1))
            st = ctx.getState(getPositions=True, getVelocities=True)
            xs.append(st.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
            vs.append(
                st.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond)
            )
        del ctx
        self.state = LangevinState(np.stack(xs), np.stack(vs), np.zeros(self.n_chains, np.int64))

    def _set_theta(self, theta) -> None:
        """Write θ's torsion barriers and phases into the OpenMM System."""
        forces = self.openmm_system.getForces()
        for f_no, t, atoms, per, p_idx, k_idx in self.map:
            forces[f_no].setTorsionParameters(t, *atoms, per, float(theta[p_idx]),
                                              float(theta[k_idx]))  # fmt: skip

    def _advance(self, params, n_steps, save_every):
        import openmm as mm
        import openmm.unit as unit

        n_steps, theta = self._segment(params, n_steps, save_every)
        self._set_theta(theta)
        sampler, integ = self.sampler, self.integrator
        omm = self.openmm_system
        platform = mm.Platform.getPlatformByName(sampler.platform)
        n_frames = n_steps // save_every
        frames = np.empty((self.n_chains, n_frames, self.n_solute, 3))
        steps = np.empty((self.n_chains, n_frames), np.int64)
        new_x, new_v = np.empty_like(self.state.x), np.empty_like(self.state.v)
        nm_ps = unit.nanometer / unit.picosecond
        for c in range(self.n_chains):
            step0 = int(self.state.step[c])
            lmi = mm.LangevinMiddleIntegrator(integ.temperature, integ.friction, integ.dt)
            lmi.setRandomNumberSeed(_seed(integ.seed, self.first_replica + c, step0))
            ctx = mm.Context(omm, lmi, platform, sampler.properties)
            ctx.setPeriodicBoxVectors(*sampler.box)
            ctx.setPositions(self.state.x[c] * unit.nanometer)
            ctx.setVelocities(self.state.v[c] * nm_ps)
            for f in range(n_frames):
                lmi.step(save_every)
                st = ctx.getState(getPositions=True, getEnergy=True)
                x = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                energy = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
                if not (np.isfinite(energy) and np.isfinite(x).all()):
                    raise SimulationError(
                        f"OpenMM chain {c} went non-finite by step {step0 + (f + 1) * save_every} "
                        f"(potential energy {energy}); the fit's state stays the last good "
                        "one: lower dt, or check the System"
                    )
                frames[c, f] = x[: self.n_solute]
                steps[c, f] = step0 + (f + 1) * save_every
            st = ctx.getState(getPositions=True, getVelocities=True)
            new_x[c] = st.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            new_v[c] = st.getVelocities(asNumpy=True).value_in_unit(nm_ps)
            del ctx
        self.state = LangevinState(new_x, new_v, self.state.step + n_steps)
        return frames, steps, theta
