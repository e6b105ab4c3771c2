"""Scaling laws of familial models: laws, Huber/L-BFGS fits, bootstrap CIs, Efficiency Leverage.

Everything here is float64 JAX. The public entry points switch 64-bit mode on for their own work
(`jax.enable_x64`); to jit, vmap or grad them inside your own code, do the same around it.
"""
