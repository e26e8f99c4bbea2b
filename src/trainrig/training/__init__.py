"""The training core: the loop (``fit``), the optimizer step, the training state and its checkpoints, the
one rule that chooses the best epoch, and the callbacks that observe a run."""
