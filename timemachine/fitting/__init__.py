"""The fitting layer: observables, reservoir sampling, replicas, gradient estimators, losses
and the fitting loop (above ``timemachine.sensitivity``).

Building blocks:

* ``observables``: differentiable O(x) -> (K,) with ``labels`` (Rg, NOE, ³J, dihedrals);
  ``observable_from_spec`` builds one from a target-file dict.
* ``reservoir``: Vitter's Algorithm R; ``reservoir_sample_trajectory`` draws R frames
  (x, dx/dθ, step) uniformly from a trajectory for time averages.
* ``replicas``: ``run_replicas`` runs M independent trajectories as one vmapped program;
  their last frames give ensemble averages.
* ``executor``: where replicas run: in-process (sharded over the JAX devices) or as tasks
  on Dask (``open_executor``).
* ``openmm_sampler``: ``OpenMMSampler``, the equilibrium chains run by OpenMM on any
  OpenMM System (explicit water, PME), the solute's frames coming back.
* ``estimators``: ``pathwise_gradient`` (⟨∂O/∂x · dx/dθ⟩) and ``fluctuation_gradient``
  (-β cov(O, ∂E/∂θ)) of averaged observables, each a ``GradientEstimate`` with standard
  errors; ``compare_estimators`` says how far apart the two are.
"""

from timemachine.fitting.estimators import (
    EstimatorComparison,
    GradientEstimate,
    compare_estimators,
    fluctuation_gradient,
    pathwise_gradient,
)
from timemachine.fitting.executor import Executor, open_executor
from timemachine.fitting.force_matching import (
    ForceMatchingLoss,
    ReferenceData,
    load_reference,
    read_extxyz,
    write_extxyz,
)
from timemachine.fitting.loss import (
    LossResult,
    SampleSet,
    TargetVector,
    loss_and_gradient,
    observable_samples,
    target_vector,
)
from timemachine.fitting.observables import (
    COUPLINGS,
    KARPLUS,
    Dihedral,
    JCoupling1NCA,
    JCoupling2NCA,
    JCoupling3HAC,
    JCoupling3HNC,
    JCoupling3HNCA,
    JCoupling3HNCB,
    JCoupling3HNHA,
    NOEDistance,
    Observable,
    ObservableFunction,
    ObservableSet,
    RadiusOfGyration,
    ScalarCoupling,
    observable_from_spec,
    select_atoms,
)
from timemachine.fitting.openmm_sampler import OpenMMSampler
from timemachine.fitting.replicas import ReplicaResult, run_replicas
from timemachine.fitting.reservoir import Reservoir, reservoir_sample_trajectory
from timemachine.fitting.systems import FitSystem
from timemachine.fitting.targets import (
    Target,
    graf2007_targets,
    load_targets,
    make_target,
    save_targets,
    targets_from_specs,
)
from timemachine.fitting.train import FitResult, fit, load_checkpoint

__all__ = [
    "COUPLINGS",
    "Dihedral",
    "EstimatorComparison",
    "Executor",
    "FitResult",
    "FitSystem",
    "ForceMatchingLoss",
    "GradientEstimate",
    "JCoupling1NCA",
    "JCoupling2NCA",
    "JCoupling3HAC",
    "JCoupling3HNC",
    "JCoupling3HNCA",
    "JCoupling3HNCB",
    "JCoupling3HNHA",
    "KARPLUS",
    "LossResult",
    "NOEDistance",
    "Observable",
    "ObservableFunction",
    "ObservableSet",
    "OpenMMSampler",
    "RadiusOfGyration",
    "ReferenceData",
    "ReplicaResult",
    "Reservoir",
    "SampleSet",
    "ScalarCoupling",
    "Target",
    "TargetVector",
    "compare_estimators",
    "fit",
    "fluctuation_gradient",
    "graf2007_targets",
    "load_checkpoint",
    "load_reference",
    "load_targets",
    "loss_and_gradient",
    "make_target",
    "observable_from_spec",
    "open_executor",
    "observable_samples",
    "pathwise_gradient",
    "read_extxyz",
    "reservoir_sample_trajectory",
    "run_replicas",
    "save_targets",
    "select_atoms",
    "target_vector",
    "targets_from_specs",
    "write_extxyz",
]
