"""Tiny randomly initialized models shared by tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def tiny_policy(kind: str = "heads", num_bases: int = 3, family: str = "llama", seed: int = 0, **kw):
  """A SpectralPolicy and parameters whose bases differ visibly from the reference.

  Parameters are drawn with numpy into the shapes from `jax.eval_shape(policy.init)`: compiling a threefry
  initializer per parameter costs seconds on CPU, and tests only need well-conditioned random weights.
  """
  cfg = tiny_config(family)
  policy = SpectralPolicy(cfg, num_bases=num_bases, basis_kind=kind, head_rank=4, lora_rank=2,
                          lora_targets=("q_proj", "v_proj", "down_proj"), **kw)
  shapes = nn.meta.unbox(jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return policy, random_params(shapes, seed, plus_one=cfg.norm_scale_plus_one)


def random_params(shapes, seed: int = 0, plus_one: bool = False):
  """Random parameters for a tree of ShapeDtypeStructs: sharp attention, non-trivial norms and basis factors."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.asarray((0.0 if plus_one else 1.0) + 0.1 * rng.normal(size=s.shape), s.dtype)
    if name.endswith("['bias']"):
      return jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)
    if name.endswith("_b']") or name.endswith("['b']"):  # Basis factors: every basis differs from the reference.
      return jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype)
    if name.endswith("['embedding']"):
      return jnp.asarray(rng.normal(size=s.shape), s.dtype)
    fan_in = s.shape[-2] if len(s.shape) >= 2 else 1
    if "['o_proj']" in name:
      fan_in = s.shape[-3] * s.shape[-2]
    return jnp.asarray(2.0 * rng.normal(size=s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
