"""Architecture description of a decoder-only language model.

One frozen dataclass describes the three supported families (Llama, Gemma 3, GPT-2). The families share every
building block and differ only in the fields below; `llama()`, `gemma3()` and `gpt2()` give their defaults.
Per-layer variation (Gemma 3's local/global attention pattern) is expressed as tuples with one entry per layer, so
that the layer stack stays a single `nn.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax.numpy as jnp

FAMILIES = ("llama", "gemma3", "gpt2")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
NORMS = ("rms", "layer")
# Fields of earlier versions that no longer configure anything: `from_dict` accepts and drops them, so that a saved
# `to_dict()` still loads (the layers are always stacked and scanned).
RETIRED_FIELDS = ("scan_layers",)


def _dtype_name(dtype: Any) -> str:
  return jnp.dtype(dtype).name


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a decoder-only transformer LM."""

  family: str = "llama"  # One of FAMILIES; only used for messages and import/export.
  vocab_size: int = 49_152  # Rows of the token embedding (and of the output projection).
  num_layers: int = 30  # Number of decoder blocks.
  embed_dim: int = 576  # Width of the residual stream (d_model).
  num_heads: int = 9  # Query heads.
  num_kv_heads: int = 3  # Key/value heads (grouped-query attention when < num_heads).
  head_dim: int = 64  # Width of one attention head.
  mlp_dim: int = 1_536  # Hidden width of the MLP.
  max_len: int = 8_192  # Longest sequence (learned position table size for GPT-2).
  norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias).
  norm_eps: float = 1e-5  # Epsilon inside the norms.
  norm_scale_plus_one: bool = False  # Gemma convention: scale parameter w is applied as (1 + w).
  sandwich_norm: bool = False  # Gemma: extra norms after attention and after the MLP (pre and post norms).
  qk_norm: bool = False  # Gemma 3: RMSNorm over head_dim on queries and keys before rotary.
  activation: str = "silu"  # MLP non-linearity, one of ACTIVATIONS.
  gated_mlp: bool = True  # act(gate(x)) * up(x) (SwiGLU / GeGLU) instead of act(up(x)).
  use_bias: bool = False  # Biases on the attention and MLP projections (GPT-2).
  learned_positions: bool = False  # GPT-2 absolute position table instead of rotary embeddings.
  rope_base: float = 100_000.0  # Rotary base for global-attention layers.
  rope_local_base: float = 10_000.0  # Rotary base for sliding-window layers (Gemma 3).
  rope_scale: float = 1.0  # Linear position scaling ("linear" rope_type) for global layers.
  sliding_window: Optional[int] = None  # Window of local layers (a key is seen iff q_pos - k_pos < window).
  layer_is_local: Optional[Tuple[bool, ...]] = None  # Per layer: True for sliding-window attention.
  query_scale: Optional[float] = None  # Multiplier of q.k; None means head_dim ** -0.5.
  attn_logit_softcap: Optional[float] = None  # tanh soft-capping of attention logits.
  final_logit_softcap: Optional[float] = None  # tanh soft-capping of the output logits.
  embed_scale: Optional[float] = None  # Multiply token embeddings by this (Gemma: sqrt(embed_dim)).
  tie_embeddings: bool = True  # Output projection is the transposed token embedding.
  dtype: str = "float32"  # Compute dtype of activations and matmuls.
  weight_dtype: str = "float32"  # Storage dtype of the parameters.
  remat: bool = False  # Rematerialize each block in the backward pass.

  def __post_init__(self):
    object.__setattr__(self, "dtype", _dtype_name(self.dtype))
    object.__setattr__(self, "weight_dtype", _dtype_name(self.weight_dtype))
    if self.layer_is_local is not None:
      object.__setattr__(self, "layer_is_local", tuple(bool(x) for x in self.layer_is_local))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first inconsistent field."""

    def need(cond, field, expected):
      if not cond:
        raise ValueError(f"TransformerConfig.{field}={getattr(self, field)!r} is invalid: expected {expected}.")

    need(self.family in FAMILIES, "family", f"one of {FAMILIES}")
    need(self.norm in NORMS, "norm", f"one of {NORMS}")
    need(self.activation in ACTIVATIONS, "activation", f"one of {ACTIVATIONS}")
    for field in ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                  "max_len"):
      need(isinstance(getattr(self, field), int) and getattr(self, field) > 0, field, "a positive integer")
    need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", f"a divisor of num_heads={self.num_heads}")
    need(self.head_dim % 2 == 0 or self.learned_positions, "head_dim", "even (rotary embeddings)")
    need(self.norm_eps > 0, "norm_eps", "> 0")
    need(self.rope_base > 0 and self.rope_local_base > 0, "rope_base", "> 0")
    need(self.rope_scale >= 1.0, "rope_scale", ">= 1")
    if self.layer_is_local is not None:
      need(len(self.layer_is_local) == self.num_layers, "layer_is_local", f"one entry per layer ({self.num_layers})")
      need(not any(self.layer_is_local) or (self.sliding_window or 0) > 0, "sliding_window",
           "a positive window when some layer is local")
    need(self.sliding_window is None or self.sliding_window > 0, "sliding_window", "None or > 0")
    for field in ("query_scale", "attn_logit_softcap", "final_logit_softcap", "embed_scale"):
      value = getattr(self, field)  # A complex or negative scale (a config's negative scalar) ran silently.
      need(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf),
           field, "None or a finite number > 0")

  @property
  def local_layers(self) -> Tuple[bool, ...]:
    return self.layer_is_local or (False,) * self.num_layers

  @property
  def attention_scale(self) -> float:
    return self.head_dim**-0.5 if self.query_scale is None else self.query_scale

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TransformerConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    d = {name: value for name, value in d.items() if name not in RETIRED_FIELDS}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown TransformerConfig fields {unknown}; known fields: {sorted(known)}.")
    return cls(**d)

  def num_params(self) -> int:
    """Parameter count (tied embeddings counted once)."""
    d, h, kv, hd, m = self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    attn = d * hd * (h + 2 * kv) + h * hd * d
    mlp = d * m * (3 if self.gated_mlp else 2)
    norms = d * (4 if self.sandwich_norm else 2) + (2 * hd if self.qk_norm else 0)
    if self.use_bias:
      attn += hd * (h + 2 * kv) + d
      mlp += m + d
    if self.norm == "layer":
      norms *= 2
    total = self.num_layers * (attn + mlp + norms) + self.vocab_size * d + d * (2 if self.norm == "layer" else 1)
    if self.learned_positions:
      total += self.max_len * d
    if not self.tie_embeddings:
      total += self.vocab_size * d
    return total


def llama(**overrides) -> TransformerConfig:
  """SmolLM2-135M shaped Llama defaults."""
  return TransformerConfig(family="llama", **overrides)


def gemma3(**overrides) -> TransformerConfig:
  """Gemma 3 (270M-shaped) defaults: sandwich norms, QK-norm, GeGLU, 5 local : 1 global layers."""
  base = dict(family="gemma3", vocab_size=262_144, num_layers=18, embed_dim=640, num_heads=4, num_kv_heads=1,
              head_dim=256, mlp_dim=2_048, max_len=32_768, norm="rms", norm_eps=1e-6, norm_scale_plus_one=True,
              sandwich_norm=True, qk_norm=True, activation="gelu_tanh", gated_mlp=True, rope_base=1_000_000.0,
              rope_local_base=10_000.0, sliding_window=512, query_scale=256**-0.5)
  base.update(overrides)
  base["embed_scale"] = base.get("embed_scale") or float(base["embed_dim"])**0.5
  if base.get("layer_is_local") is None:
    base["layer_is_local"] = tuple((i + 1) % 6 != 0 for i in range(base["num_layers"]))
  return TransformerConfig(**base)


def gpt2(**overrides) -> TransformerConfig:
  """GPT-2 small defaults: learned positions, LayerNorm, GELU, biases."""
  base = dict(family="gpt2", vocab_size=50_257, num_layers=12, embed_dim=768, num_heads=12, num_kv_heads=12,
              head_dim=64, mlp_dim=3_072, max_len=1_024, norm="layer", norm_eps=1e-5, activation="gelu_tanh",
              gated_mlp=False, use_bias=True, learned_positions=True)
  base.update(overrides)
  return TransformerConfig(**base)
