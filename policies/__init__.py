"""Policies behind one interface (see policies/base.py)."""

# Importing the modules registers their classes in policies.base.POLICIES.
from policies import autoregressive, diffusion, gaussian, scripted  # noqa: F401
