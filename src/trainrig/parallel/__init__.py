"""Parallel modes: one strategy class per mode (single, dp, ddp, model_parallel, ...), which owns how its
processes start, how the model is wrapped, how values are reduced and how checkpoints are written; the
launchers that start processes here, under torchrun or on a Ray cluster."""
