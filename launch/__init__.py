"""Launchers: local runs, Cloud TPU VMs and pod slices, GPU VMs (each with --dry-run)."""
