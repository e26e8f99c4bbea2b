"""What a run leaves for people: loggers (CSV, TensorBoard, MLflow, W&B), plots, report.html, ``trainer runs``."""
