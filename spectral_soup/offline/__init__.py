"""Offline phase: training the K basis policies (losses, mesh and sharding rules, checkpoints, the trainer)."""
