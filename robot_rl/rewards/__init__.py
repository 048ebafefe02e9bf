"""Learned rewards: a success classifier that proposes labels for real-robot episodes."""
