"""TRL's `trl.extras` path: `profiling` (timing of trainer methods, logged to the experiment trackers)."""
