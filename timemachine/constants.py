"""Physical constants in OpenMM units (nm, ps, kJ/mol, amu, K, e)."""

BOLTZMANN = 0.008314462618  # kJ / (mol K)
# kJ nm / (mol e^2): OpenMM 8's ONE_4PI_EPS0 (CODATA 2018); the design brief's 138.935456 is
# the older rounding, 1.2e-8 relative away. We use OpenMM's so energies agree to round-off.
COULOMB = 138.93545764438198
COULOMB_GB = 138.935485  # the constant OpenMM's customgbforces writes into the OBC2 energy
DEFAULT_CUTOFF = 1.0  # nm: OpenMM's ForceField.createSystem nonbondedCutoff default
