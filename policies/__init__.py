"""Policies behind one interface (see policies/base.py)."""

# Importing the modules registers their classes in policies.base.POLICIES. openvla and octo
# import their heavy dependencies (transformers, JAX) only when a policy is built.
from policies import autoregressive, diffusion, gaussian, octo, openvla, scripted  # noqa: F401
