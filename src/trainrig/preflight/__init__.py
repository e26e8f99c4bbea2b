"""Before a long run: which learning rate (lr_find.py), what the model is and costs (summary.py), where a
step's time goes (profile.py)."""
