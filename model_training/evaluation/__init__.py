"""Evaluation: predictions and metrics, calibration, plots, triage and uncertainty operating points, and validation across hospitals (external: leave one source out)."""
