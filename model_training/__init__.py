"""Training, evaluation and comparison of chest X-ray classifiers.

Import-light on purpose: torch is only imported by the modules that train.
"""
