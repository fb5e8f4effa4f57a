"""ζ by definition (paper eq. 6): one Jacobian-vector product of ∇_x E per parameter.

ζ_p is the directional derivative of ∇_x E along (dx/dθ_p, e_p). ``zeta_reference``
computes exactly that with ``jax.jvp``, vmapped over the P parameters; it is the
definition every faster path is tested against.
"""

import jax
import jax.numpy as jnp


def zeta_reference(energy_fn, x, params, dx_dtheta, wrt):
    """ζ by one jvp of ∇_x E per parameter (the straightforward, always-correct path).

    Args:
      energy_fn: E(x (N,3), θ (P_all,)) -> kJ/mol, JAX-traceable (``system.energy_fn()``).
      x: (N, 3) positions, nm.
      params: (P_all,) full parameter vector θ.
      dx_dtheta: (P, N, 3) current sensitivities of x to the chosen parameters, nm/[θ].
      wrt: (P,) int indices into θ of the chosen parameters.
    Returns:
      (P, N, 3) ζ, kJ/mol/nm/[θ].
    """
    grad = jax.grad(energy_fn, argnums=0)
    wrt = jnp.asarray(wrt)

    def one(dx, p):
        dtheta = jnp.zeros_like(params).at[p].set(1.0)
        return jax.jvp(grad, (x, params), (dx, dtheta))[1]

    return jax.vmap(one)(dx_dtheta, wrt)


def mixed_partial_reference(energy_fn, x, params, wrt):
    """∂²E/∂x∂θ_p for the chosen parameters, (P, N, 3): ζ with dx/dθ = 0."""
    wrt = jnp.asarray(wrt)
    return zeta_reference(energy_fn, x, params, jnp.zeros((wrt.shape[0],) + x.shape), wrt)
