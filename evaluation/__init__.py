"""Evaluation: metrics and checks of reconstructions and generated objects."""
