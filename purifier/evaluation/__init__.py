"""Evaluation: `purifier eval` (`evaluate`), the attacks (`attacks`), results.md and figures (`report`)."""
