"""Building blocks shared by every model family: projections, norms, rotary embeddings, attention, MLP.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and key activations are constrained
with `nn.with_logical_constraint`; `spectral_soup.offline.mesh.LOGICAL_RULES` maps the names to mesh axes.
Outside a mesh both are no-ops.

Logical names: `vocab`, `embed`, `heads` (query heads), `kv_heads`, `kv` (head width), `mlp`, `layers`, `basis`,
`lora_rank`, and for activations `batch`, `length`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_soup.models.config import TransformerConfig

Array = jax.Array
NEG_INF = -1e30  # Finite "minus infinity": fully masked rows give a uniform softmax instead of NaN.


def constrain(x: Array, axes: Sequence[Optional[str]]) -> Array:
  return nn.with_logical_constraint(x, tuple(axes))


def param_with_axes(module: nn.Module, name: str, init_fn, shape, axes, dtype) -> Array:
  return module.param(name, nn.with_logical_partitioning(init_fn, tuple(axes)), shape, dtype)


class Projection(nn.Module):
  """y = x . kernel (+ bias) (+ LoRA update), contracting the trailing `len(in_shape)` axes of x.

  kernel: [*in_shape, *out_shape]. A LoRA adapter `{"a": [in, r], "b": [r, out]}` (flattened in/out sizes;
  any scale already folded into `b`) adds `(x_flat @ a) @ b`. With a leading group axis on `a` and `b`
  (`a: [G, in, r]`) each group of rows gets its own adapter (see `lora_update`).
  """
  in_shape: Sequence[int]
  out_shape: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: Array, lora: Optional[Mapping[str, Array]] = None) -> Array:
    n_in = len(self.in_shape)
    kernel = param_with_axes(self, "kernel", self.kernel_init, (*self.in_shape, *self.out_shape),
                             (*self.in_axes, *self.out_axes), self.weight_dtype)
    x = x.astype(self.dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x, kernel.astype(self.dtype), (contract, ((), ())))
    if self.use_bias:
      bias = param_with_axes(self, "bias", nn.initializers.zeros, tuple(self.out_shape), self.out_axes,
                             self.weight_dtype)
      y = y + bias.astype(self.dtype)
    if lora is not None:
      y = y + lora_update(x, lora, n_in, tuple(self.out_shape)).astype(self.dtype)
    return y


def lora_update(x: Array, adapter: Mapping[str, Array], n_in: int, out_shape) -> Array:
  """(x_flat @ a) [* row_scale] @ b, reshaped to `out_shape`. x: [B, T, *in].

  `a: [in, r]` and `b: [r, out]` are shared by all rows, or carry a leading group axis (`a: [G, in, r]`,
  B % G == 0): rows [g*B/G, (g+1)*B/G) use adapter g. G = B gives every row its own adapter; G = K+1 runs the
  reference (a zero adapter) and K LoRA bases in one batch. An optional `row_scale: [B, r]` multiplies the rank
  dimensions per row: with concatenated adapters `a = [a_1 .. a_K]`, `b = [b_1; ..; b_K]` and
  `row_scale = lam (x) 1_r`, the update is exactly sum_k lam_k a_k b_k per row (per-user parameter soups, with
  nothing materialized per user).
  """

  def grouped(z: Array, w: Array, spec: str) -> Array:
    if w.ndim == 2:
      return jnp.einsum(f"...{spec[0]},{spec}->...{spec[1]}", z, w.astype(z.dtype))
    groups, rows = w.shape[0], z.shape[0]
    if rows % groups:
      raise ValueError(f"LoRA adapters for {groups} groups cannot split a batch of {rows} rows.")
    zg = z.reshape(groups, rows // groups, *z.shape[1:])
    out = jnp.einsum(f"g...{spec[0]},g{spec}->g...{spec[1]}", zg, w.astype(z.dtype))
    return out.reshape(rows, *out.shape[2:])

  x_flat = x.reshape(*x.shape[:x.ndim - n_in], -1)
  h = grouped(x_flat, adapter["a"], "ir")
  if "row_scale" in adapter:
    h = h * adapter["row_scale"].astype(h.dtype)[:, None, :]
  y = grouped(h, adapter["b"], "ro")
  return y.reshape(*y.shape[:-1], *out_shape)


class Norm(nn.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32.

  Gemma's convention (`plus_one`) stores the scale as an offset from 1: y = x_hat * (1 + w).
  """
  kind: str = "rms"
  eps: float = 1e-6
  plus_one: bool = False
  axis_name: str = "embed"
  dtype: Any = jnp.float32
  weight_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
    scale = param_with_axes(self, "scale", init, (dim,), (self.axis_name,), self.weight_dtype)
    xf = x.astype(jnp.float32)
    if self.kind == "layer":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    scale = scale.astype(jnp.float32)
    y = y * (1.0 + scale if self.plus_one else scale)
    if self.kind == "layer":
      bias = param_with_axes(self, "bias", nn.initializers.zeros, (dim,), (self.axis_name,), self.weight_dtype)
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def make_norm(cfg: TransformerConfig, name: str, axis_name: str = "embed") -> Norm:
  return Norm(kind=cfg.norm, eps=cfg.norm_eps, plus_one=cfg.norm_scale_plus_one, axis_name=axis_name, dtype=cfg.dtype,
              weight_dtype=cfg.weight_dtype, name=name)


def apply_rope(x: Array, positions: Array, base: Array, scale: Array) -> Array:
  """Rotary embedding in the half-split ("rotate_half") layout.

  x: [B, T, H, Dh]; positions: int[B, T]; base, scale: scalars (may be traced: they vary per scanned layer).
  """
  head_dim = x.shape[-1]
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (base.astype(jnp.float32)**exponent)  # [Dh/2]
  angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_slot: Array, q_pos: Array, k_slot: Array, k_pos: Array, k_valid: Array, window: Array) -> Array:
  """Which keys each query sees. Returns bool[B, T, S].

  q_slot: int[T] (cache slot of each query), q_pos: int[B, T] (token position), k_slot: int[S],
  k_pos: int[B, S], k_valid: bool[B, S] (slot holds a real token), window: int scalar, 0 = global attention.
  Causality is by slot (so padding never shifts it); the sliding window is by position (so a row's padding never
  changes what its tokens see).
  """
  causal = k_slot[None, None, :] <= q_slot[None, :, None]
  mask = causal & k_valid[:, None, :]
  in_window = (q_pos[:, :, None] - k_pos[:, None, :]) < window
  return mask & ((window <= 0) | in_window)


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                          softcap: Optional[float] = None) -> Array:
  """Grouped-query attention. q: [B, T, H, Dh], k/v: [B, S, Hkv, Dh], mask: bool[B, T, S] -> [B, T, H, Dh]."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


def single_query_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float, softcap: Optional[float] = None,
                           own: Optional[Tuple[Array, Array]] = None) -> Array:
  """Attention of one query per row (a decoding step) over a head-major KV cache.

  q: [B, 1, H, Dh]; k / v: [B, Hkv, S, Dh] (the cache's layout: each (row, KV head) reads one contiguous
  [S, Dh] block); mask: bool[B, 1, S]; own: the query token's own key and value ([B, Hkv, 1, Dh] each), always
  attended, when they are not in k / v. Returns [B, 1, H, Dh].

  A decoding step is a batched matrix-vector product over the cache, bound by reading it: with the slots
  contiguous per head, both products are batched [G, Dh] x [Dh, S] matmuls that read the cache once (on XLA:CPU at
  B=128, S=72, SmolLM2: 3.5x faster than broadcast products over a slot-major [B, S, Hkv, Dh] cache).
  """
  b, _, h, d = q.shape
  hkv = k.shape[1]
  q = q.reshape(b, hkv, h // hkv, d)
  score = lambda keys: jnp.einsum("bkgd,bksd->bkgs", q, keys, preferred_element_type=jnp.float32) * scale
  logits = score(k)  # [B, Hkv, G, S]
  mask = mask[:, :, None, :]  # [B, 1, 1, S]
  if own is not None:
    logits = jnp.concatenate([logits, score(own[0])], axis=-1)  # [B, Hkv, G, S + 1]
    mask = jnp.concatenate([mask, jnp.ones((b, 1, 1, 1), jnp.bool_)], axis=-1)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  probs = jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)
  weigh = lambda p, values: jnp.einsum("bkgs,bksd->bkgd", p.astype(values.dtype), values, preferred_element_type=jnp.
                                       float32)
  out = weigh(probs[..., :k.shape[2]], v)  # [B, Hkv, G, Dh]
  if own is not None:
    out = out + weigh(probs[..., k.shape[2]:], own[1])
  return out.astype(v.dtype).reshape(b, 1, h, d)


ACTIVATION_FNS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class Attention(nn.Module):
  """Multi-head / grouped-query self-attention with rotary or no positions, QK-norm and a functional KV cache."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, ctx: Mapping[str, Array], layer: Mapping[str, Any], lora: Optional[Mapping[str, Any]],
               kv: Optional[Mapping[str, Array]] = None):
    """x: [B, T, D]; kv: this layer's cache {"k", "v": [B, Hkv, S, Dh]} (head-major) or None.

    Returns (out [B, T, D], new_kv): this chunk's keys and values {"k", "v": [B, Hkv, T, Dh]} (None without a
    cache); the caller writes them into slots `ctx["write_index"]...+T`.
    """
    cfg = self.config
    lora = lora or {}
    d, h, hkv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = lambda name, i, o, ia, oa: Projection(i, o, ia, oa, use_bias=cfg.use_bias, dtype=cfg.dtype, weight_dtype=cfg.
                                                 weight_dtype, name=name)
    q = proj("q_proj", (d,), (h, hd), ("embed",), ("heads", "kv"))(x, lora.get("q_proj"))
    k = proj("k_proj", (d,), (hkv, hd), ("embed",), ("kv_heads", "kv"))(x, lora.get("k_proj"))
    v = proj("v_proj", (d,), (hkv, hd), ("embed",), ("kv_heads", "kv"))(x, lora.get("v_proj"))
    if cfg.qk_norm:
      q = make_norm(cfg, "q_norm", axis_name="kv")(q)
      k = make_norm(cfg, "k_norm", axis_name="kv")(k)
    if not cfg.learned_positions:
      is_local = layer["is_local"]
      base = jnp.where(is_local, cfg.rope_local_base, cfg.rope_base)
      scale = jnp.where(is_local, 1.0, cfg.rope_scale)
      q = apply_rope(q, ctx["positions"], base, scale)
      k = apply_rope(k, ctx["positions"], base, scale)
    q = constrain(q, ("batch", "length", "heads", "kv"))

    window = jnp.where(layer["is_local"], cfg.sliding_window or 0, 0)
    mask = attention_mask(ctx["q_slot"], ctx["positions"], ctx["k_slot"], ctx["k_pos"], ctx["k_valid"], window)
    head_major = lambda a: a.transpose(0, 2, 1, 3)  # [B, T, Hkv, Dh] <-> [B, Hkv, T, Dh]
    if kv is not None:
      new_kv = {"k": head_major(k).astype(kv["k"].dtype), "v": head_major(v).astype(kv["v"].dtype)}
    else:
      new_kv = None
    if kv is not None and q.shape[1] == 1:
      # A decoding step: attend over the cache as it is plus this token's own key and value, without writing the
      # layer's cache slice (a written copy costs a full read and write of it per layer and step).
      mask = mask & (ctx["k_slot"] != ctx["write_index"])[None, None, :]  # That slot is this token (`own`).
      own = (new_kv["k"].astype(cfg.dtype), new_kv["v"].astype(cfg.dtype))
      out = single_query_attention(q, kv["k"], kv["v"], mask, scale=cfg.attention_scale, softcap=cfg.attn_logit_softcap,
                                   own=own)
    else:
      if kv is not None:  # A prompt chunk: written into slots index...index+T, then attended with the cache.
        index = ctx["write_index"]
        k = head_major(jax.lax.dynamic_update_slice(kv["k"], new_kv["k"], (0, 0, index, 0))).astype(cfg.dtype)
        v = head_major(jax.lax.dynamic_update_slice(kv["v"], new_kv["v"], (0, 0, index, 0))).astype(cfg.dtype)
      out = dot_product_attention(q, k, v, mask, scale=cfg.attention_scale, softcap=cfg.attn_logit_softcap)
    out = Projection((h, hd), (d,), ("heads", "kv"), ("embed",), use_bias=cfg.use_bias, dtype=cfg.dtype,
                     weight_dtype=cfg.weight_dtype, name="o_proj")(out, lora.get("o_proj"))
    return out, new_kv


class Mlp(nn.Module):
  """Gated (SwiGLU / GeGLU) or plain two-layer MLP."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, lora: Optional[Mapping[str, Any]]) -> Array:
    cfg = self.config
    lora = lora or {}
    d, m = cfg.embed_dim, cfg.mlp_dim
    proj = lambda name, i, o, ia, oa: Projection(
        (i,), (o,), (ia,), (oa,), use_bias=cfg.use_bias, dtype=cfg.dtype, weight_dtype=cfg.weight_dtype, name=name)
    act = ACTIVATION_FNS[cfg.activation]
    up = proj("up_proj", d, m, "embed", "mlp")(x, lora.get("up_proj"))
    if cfg.gated_mlp:
      hidden = act(proj("gate_proj", d, m, "embed", "mlp")(x, lora.get("gate_proj"))) * up
    else:
      hidden = act(up)
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    return proj("down_proj", m, d, "mlp", "embed")(hidden, lora.get("down_proj"))
