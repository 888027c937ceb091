"""Training: the loop (trainer.py), its data feed, the checkpoint policy (when to save, which
to keep, rollback; the format is ``mom_dist.checkpoint``), metrics and routing telemetry."""
