"""Float64 is set once, by the package: any submodule imported alone computes in float64."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module", ["timemachine.potentials.bonded", "timemachine.sensitivity.zeta", "timemachine.cli"]
)
def test_a_submodule_imported_first_computes_in_float64(module):
    code = (
        f"import {module}, jax.numpy as jnp\n"
        "x = jnp.asarray(1.0) / 3.0\n"
        "assert x.dtype == jnp.float64, x.dtype\n"
        "assert abs(float(x) - 1.0 / 3.0) < 1e-16\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
