"""Trainers TRL keeps (or kept) under `trl.experimental`, at the same import paths."""
