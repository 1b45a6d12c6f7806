"""Test-wide setup: 8 fake CPU devices for mesh tests (must be set before JAX is imported), no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("SPECTRAL_SOUP_PROGRESS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
