"""Hyperparameter search: Ray Tune trials of ``fit`` from a YAML search space, and the search's results."""
