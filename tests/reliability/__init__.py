"""Reliability suite: faults injected into training, checkpoints, inputs and the online updates."""
