"""Tiny randomly initialized models shared by tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_soup.models import config as config_lib
from spectral_soup.models.spectral import SpectralPolicy

VOCAB = 64


def tiny_config(family: str = "llama", **overrides) -> config_lib.TransformerConfig:
  base = dict(vocab_size=VOCAB, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48,
              max_len=128)
  if family == "gemma3":
    base.update(num_layers=3, sliding_window=4)
  if family == "gpt2":
    base.update(num_kv_heads=4)
  base.update(overrides)
  return getattr(config_lib, family)(**base)


def tiny_policy(kind: str = "heads", num_bases: int = 3, family: str = "llama", seed: int = 0, scale: float = 1.0,
                **kw):
  """A SpectralPolicy whose bases differ visibly from the reference (random, non-zero B factors)."""
  cfg = tiny_config(family)
  policy = SpectralPolicy(cfg, num_bases=num_bases, basis_kind=kind, head_rank=4, lora_rank=2,
                          lora_targets=("q_proj", "v_proj", "down_proj"), **kw)
  params = nn.meta.unbox(policy.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32)))["params"]
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  # Sharpen the backbone so greedy decoding is far from ties, and give every basis a non-zero update.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: _perturb(path, x, next(keys), scale), params)
  return policy, params


def _perturb(path, x, key, scale):
  name = jax.tree_util.keystr(path)
  if name.endswith("_b']") or name.endswith("['b']"):
    return 0.5 * scale * jax.random.normal(key, x.shape, x.dtype)
  if "backbone" in name and x.ndim >= 2:
    return x * 3.0
  return x
