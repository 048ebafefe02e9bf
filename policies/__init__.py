"""Policies behind one interface (see policies/base.py)."""
