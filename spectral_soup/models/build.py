"""A `SpectralPolicy` and its parameters from a config, with no checkpoint, data or mesh needed.

What the trainer, the main job, `spectral_soup.basis`, the benchmarks and the tests share to make a policy:

* `model_config` (the random backbone's architecture from `config.model`) and `build_policy` (the K bases of
  `config.basis` on a backbone architecture);
* the policy's parameter tree split into its trainable part and the frozen backbone (`split_params`, and back with
  `merge_params`); `init_trainable` initializes the trainable part alone;
* a seeded random backbone drawn on the host (`random_backbone`, one leaf at a time by `backbone_leaf_rule`);
* `unboxed` (logical-axis boxes stripped) and `place` (host arrays into given shardings).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spectral_soup.models import config as config_lib
from spectral_soup.models.spectral import SpectralPolicy


def model_config(config: ml_collections.ConfigDict) -> config_lib.TransformerConfig:
  """The random backbone's architecture from `config.model`."""
  m = config.model
  return getattr(config_lib,
                 m.family)(vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim,
                           num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim,
                           max_len=m.max_len, dtype=m.dtype, weight_dtype=m.weight_dtype, remat=m.remat)


def build_policy(model_cfg: config_lib.TransformerConfig, basis: Mapping[str, Any]) -> SpectralPolicy:
  """The K bases of `basis` (the fields of `config.basis`) on a backbone of architecture `model_cfg`."""
  return SpectralPolicy(model_cfg, num_bases=basis["num_bases"], basis_kind=basis["kind"], head_rank=basis["head_rank"],
                        feature_dim=basis["feature_dim"] or None, lora_rank=basis["lora_rank"],
                        lora_targets=tuple(basis["lora_targets"]), logit_bias=bool(basis.get("logit_bias", False)))


def split_params(params: Mapping[str, Any]):
  """SpectralPolicy params -> (trainable, backbone): the bases (and psi's projection, if any) vs the frozen LM."""
  trainable = {name: value for name, value in params.items() if name != "features"}
  features = {name: value for name, value in params["features"].items() if name != "backbone"}
  if features:
    trainable["features"] = features
  return trainable, params["features"]["backbone"]


def merge_params(trainable: Mapping[str, Any], backbone: Any) -> dict:
  """Inverse of `split_params`."""
  params = dict(trainable)
  params["features"] = {**dict(trainable.get("features", {})), "backbone": backbone}
  return params


def init_trainable(policy: SpectralPolicy, key: jax.Array) -> Any:
  """Initial trainable parameters (what `split_params` keeps), without tracing the backbone if possible."""
  if policy.basis_kind == "lora":
    variables = policy.init(key, method=lambda m: m.lora())
  elif policy.feature_dim is None:
    psi = jnp.zeros((1, 1, policy.config.embed_dim), policy.config.dtype)
    variables = policy.init(key, psi, method=lambda m, x: m.heads(x, None))
  else:  # psi's projection lives inside the feature map: initialize everything, keep the trainable part.
    variables = {"params": split_params(policy.init(key, jnp.zeros((1, 4), jnp.int32))["params"])[0]}
  return nn.meta.unbox(variables["params"])


def backbone_leaf_rule(path: Any, model_cfg: config_lib.TransformerConfig) -> Tuple[Optional[float], int]:
  """How `random_backbone` draws one leaf: (constant, 0) for norm scales (1, or 0 with `norm_scale_plus_one`) and
  biases (0), else (None, fan_in) for N(0, 1/fan_in) kernels and embeddings."""
  keys = [getattr(p, "key", None) for p in path]
  if keys[-1] == "scale":
    return (0.0 if model_cfg.norm_scale_plus_one else 1.0), 0
  if keys[-1] == "bias":
    return 0.0, 0
  fan_in = {"o_proj": model_cfg.num_heads * model_cfg.head_dim, "down_proj": model_cfg.mlp_dim}
  if keys[-1] == "embedding":
    return None, model_cfg.embed_dim
  return None, next((fan_in[k] for k in keys if k in fan_in), model_cfg.embed_dim)


def random_backbone(abstract_backbone: Any, model_cfg: config_lib.TransformerConfig, seed: int) -> Any:
  """A seeded random backbone drawn on the host (no compile): N(0, 1/fan_in) kernels, unit norms, zero biases."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    dtype = jnp.dtype(leaf.dtype)
    constant, n_in = backbone_leaf_rule(path, model_cfg)
    if constant is not None:
      return np.full(leaf.shape, constant, dtype)
    return (rng.standard_normal(leaf.shape) / np.sqrt(n_in)).astype(dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_backbone)


def unboxed(tree: Any) -> Any:
  """Strips logical-axis boxes without sharding constraints (`nn.meta.unbox` constrains under a mesh)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays in `shardings` (every host holds the same values; multi-host safe)."""

  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)
