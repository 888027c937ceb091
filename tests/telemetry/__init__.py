"""Tests of routing telemetry, mom-report, TensorBoard output and log lines (issue 11)."""
