"""Using a trained model: load a checkpoint, evaluate, predict, export."""
