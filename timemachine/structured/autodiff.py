"""Terms without a closed form (CustomTerm, any new functional form): exact autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def autodiff_part(term, wrt):
    """(∇E, ζ) of any term by ``jax.linearize`` of its gradient, vmapped over the P tangents.

    linearize evaluates the primal (and the residuals the tangent map needs) once; only
    the linear map runs P times.
    """
    grad_x = jax.grad(term.energy, argnums=0)

    def part(x, params, dx):
        onehot = jnp.zeros((wrt.shape[0], params.shape[0]), params.dtype)
        onehot = onehot.at[np.arange(wrt.shape[0]), wrt].set(1.0)
        grad, lin = jax.linearize(grad_x, x, params)
        return grad, jax.vmap(lin)(dx, onehot)

    return part
