"""Training: the loop (trainer.py), its data feed, checkpoints, metrics and routing telemetry."""
