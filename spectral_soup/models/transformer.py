"""Decoder-only transformer LM (Llama, Gemma 3 and GPT-2 from one module set).

Parameters (plain nested dicts; every leaf has logical axis names, the layer stack a leading `layers` axis):

    embed/embedding            [vocab, embed]
    pos_embed/embedding        [max_len, embed]                   (GPT-2 only)
    layers/pre_attn_norm/{scale, bias}        [L, embed]
    layers/attn/q_proj/kernel  [L, embed, heads, kv]      (+ bias [L, heads, kv] for GPT-2)
    layers/attn/k_proj/kernel  [L, embed, kv_heads, kv]
    layers/attn/v_proj/kernel  [L, embed, kv_heads, kv]
    layers/attn/o_proj/kernel  [L, heads, kv, embed]
    layers/attn/{q_norm, k_norm}/scale        [L, kv]     (Gemma 3)
    layers/post_attn_norm/scale               [L, embed]  (Gemma 3)
    layers/pre_mlp_norm/{scale, bias}         [L, embed]
    layers/mlp/{gate_proj, up_proj}/kernel    [L, embed, mlp]  (gate only when gated)
    layers/mlp/down_proj/kernel               [L, mlp, embed]
    layers/post_mlp_norm/scale                [L, embed]  (Gemma 3)
    final_norm/{scale, bias}   [embed]
    lm_head/kernel             [embed, vocab]                      (untied only)

Calling convention (pure):

    logits, aux = model.apply({"params": params}, tokens, mask=mask, cache=cache, lora=lora)

tokens: int32[B, T]; mask: bool[B, T] (False = padding); logits: float32[B, T, V];
aux["hidden"]: [B, T, D] final-normed hidden state (the spectral features psi(s)); aux["cache"]: updated cache.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_soup.models import layers
from spectral_soup.models.config import TransformerConfig

Array = jax.Array
Cache = dict  # {"k": [L, B, Hkv, S, Dh] (head-major), "v": same, "pos": int32[B, S], "valid": bool[B, S],
#  "index": int32[], "next_pos": int32[B]}


def cache_slots(cache: Any) -> list:
  """[(slots, index)] of every KV cache in `cache` (a Cache, or a dict / list of them): its slot count (static) and
  its fill index (an int32 scalar, possibly traced). A cache full before the decoding's last token overwrites its
  last slot at every step (`dynamic_update_slice` clamps): callers check the room first."""
  if isinstance(cache, dict) and "pos" in cache and "index" in cache:
    return [(int(cache["pos"].shape[-1]), cache["index"])]
  children = cache.values() if isinstance(cache, dict) else cache if isinstance(cache, (list, tuple)) else ()
  return [entry for child in children for entry in cache_slots(child)]


def init_cache(config: TransformerConfig, batch_size: int, max_len: int, dtype: Any = None) -> Cache:
  """An empty KV cache for `batch_size` rows and `max_len` slots (prompt + generated tokens)."""
  if max_len > config.max_len and config.learned_positions:
    raise ValueError(f"cache max_len={max_len} exceeds the model's position table ({config.max_len}).")
  dtype = dtype or config.dtype
  shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
  return {
      "k": jnp.zeros(shape, dtype),
      "v": jnp.zeros(shape, dtype),
      "pos": jnp.zeros((batch_size, max_len), jnp.int32),
      "valid": jnp.zeros((batch_size, max_len), jnp.bool_),
      "index": jnp.zeros((), jnp.int32),
      "next_pos": jnp.zeros((batch_size,), jnp.int32),
  }


def take_cache_rows(cache: Cache, index: Array) -> Cache:
  """The cache rows `index` (int[B']): batch is axis 1 of k / v and axis 0 of pos / valid / next_pos.

  Indices outside [0, B) are clipped (a gather that fills them instead costs a select over the whole copy: 9x the
  time of the copy on CPU).
  """
  out = dict(cache)
  for name in ("k", "v"):
    out[name] = jnp.take(cache[name], index, axis=1, mode="clip")
  for name in ("pos", "valid", "next_pos"):
    out[name] = jnp.take(cache[name], index, axis=0, mode="clip")
  return out


class DecoderBlock(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); Gemma adds post-norms on both branches."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, carry, layer: Mapping[str, Any], ctx: Mapping[str, Array]):
    """carry: x [B, T, D]; layer: this layer's slice of the stacked per-layer inputs (its cache slice under "kv").

    Returns (x, new_kv): new_kv holds this chunk's keys and values {"k", "v": [B, Hkv, T, Dh]} (None without cache).
    """
    cfg = self.config
    x, kv = carry, layer.get("kv")
    lora = layer.get("lora") or {}
    h = layers.make_norm(cfg, "pre_attn_norm")(x)
    h, kv = layers.Attention(cfg, name="attn")(h, ctx, layer, lora.get("attn"), kv)
    if cfg.sandwich_norm:
      h = layers.make_norm(cfg, "post_attn_norm")(h)
    x = x + h
    h = layers.make_norm(cfg, "pre_mlp_norm")(x)
    h = layers.Mlp(cfg, name="mlp")(h, lora.get("mlp"))
    if cfg.sandwich_norm:
      h = layers.make_norm(cfg, "post_mlp_norm")(h)
    x = layers.constrain(x + h, ("batch", "length", "embed"))
    return x, kv


class Transformer(nn.Module):
  """Decoder-only LM. See the module docstring for the parameter tree and calling convention."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: Array, *, mask: Optional[Array] = None, positions: Optional[Array] = None,
               cache: Optional[Cache] = None, lora: Optional[Mapping[str, Any]] = None, return_logits: bool = True):
    """tokens: int[B, T]; mask: bool[B, T]; positions: int[B, T] (default: counts of real tokens);
    cache: from `init_cache` (decoding) or None (full-sequence); lora: adapters with a leading `layers` axis,
    `{"attn": {"q_proj": {"a": [L, in, r], "b": [L, r, out]}, ...}, "mlp": {...}}` (see layers.Projection).

    Returns (logits: float32[B, T, V] or None, aux) with aux = {"hidden": [B, T, D], "cache": Cache or None}.
    """
    cfg = self.config
    batch, length = tokens.shape
    if mask is None:
      mask = jnp.ones((batch, length), jnp.bool_)
    mask = mask.astype(jnp.bool_)
    if positions is None:
      offset = cache["next_pos"][:, None] if cache is not None else 0
      # Padding tokens get the position of the previous real token; they are masked as keys anyway.
      positions = offset + jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    positions = positions.astype(jnp.int32)

    # ---- Embeddings.
    embed = Embed(cfg.vocab_size, cfg.embed_dim, ("vocab", "embed"), cfg.weight_dtype, name="embed")
    x = embed(tokens).astype(cfg.dtype)
    if cfg.embed_scale is not None:
      x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
    if cfg.learned_positions:
      x = x + Embed(cfg.max_len, cfg.embed_dim,
                    (None, "embed"), cfg.weight_dtype, name="pos_embed")(positions).astype(cfg.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))

    # ---- Attention context shared by all layers.
    if cache is None:
      slots = jnp.arange(length, dtype=jnp.int32)
      ctx = dict(positions=positions, q_slot=slots, k_slot=slots, k_pos=positions, k_valid=mask)
      new_cache = None
    else:
      index = cache["index"]
      k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions, (0, index))
      k_valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, index))
      ctx = dict(positions=positions, q_slot=index + jnp.arange(length, dtype=jnp.int32),
                 k_slot=jnp.arange(cache["pos"].shape[1],
                                   dtype=jnp.int32), k_pos=k_pos, k_valid=k_valid, write_index=index)
      new_cache = dict(pos=k_pos, valid=k_valid, index=index + length,
                       next_pos=cache["next_pos"] + jnp.sum(mask, axis=1, dtype=jnp.int32))

    # ---- The layer stack: one scanned block, per-layer inputs stacked on the leading axis.
    # Each layer reads its slice of the KV cache as a scan input and returns only the T new keys / values as a
    # scan output; the cache is updated once, after the stack, in T slots. (A cache in the scan carry is copied
    # whole by every layer on CPU: 30 copies of the full cache per decode step on a 30-layer model.)
    per_layer = {
        "is_local": jnp.asarray(cfg.local_layers, jnp.bool_),
        "index": jnp.arange(cfg.num_layers, dtype=jnp.int32)
    }
    if cache is not None:
      per_layer["kv"] = {"k": cache["k"], "v": cache["v"]}
    if lora is not None:
      per_layer["lora"] = lora
    block = DecoderBlock
    if cfg.remat:
      block = nn.remat(block, prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                    length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, new_kv = stack(cfg, name="layers")(x, per_layer, ctx)
    if cache is not None:
      for name in ("k", "v"):
        new_cache[name] = jax.lax.dynamic_update_slice(cache[name], new_kv[name].astype(cache[name].dtype),
                                                       (0, 0, 0, cache["index"], 0))

    # ---- Output head.
    hidden = layers.make_norm(cfg, "final_norm")(x)
    aux = {"hidden": hidden, "cache": new_cache}
    if not return_logits:
      return None, aux
    if cfg.tie_embeddings:
      logits = embed.attend(hidden, cfg.dtype)
    else:
      logits = layers.Projection((cfg.embed_dim,), (cfg.vocab_size,), ("embed",), ("vocab",), dtype=cfg.dtype,
                                 weight_dtype=cfg.weight_dtype, name="lm_head")(hidden)
    logits = logits.astype(jnp.float32)
    if cfg.final_logit_softcap is not None:
      logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return layers.constrain(logits, ("batch", "length", "vocab")), aux


def output_logits(config: TransformerConfig, params: Any, hidden: Array) -> Array:
  """The output layer of `Transformer` on final hidden states, outside the module: [..., D] -> f32[..., V].

  params: the Transformer's parameters (the tied embedding or `lm_head` is read). Lets callers compute logits at a
  few positions only (e.g. the last prompt token, or response tokens) after a `return_logits=False` pass.
  """
  dtype = config.dtype
  if config.tie_embeddings:
    logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), params["embed"]["embedding"].astype(dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...d,dv->...v", hidden.astype(dtype), params["lm_head"]["kernel"].astype(dtype),
                        preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32)
  if config.final_logit_softcap is not None:
    logits = config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)
  return logits


class Embed(nn.Module):
  """Token (or position) embedding table [num, features]; `attend` is the tied output projection."""
  num: int
  features: int
  axes: tuple = ("vocab", "embed")
  weight_dtype: Any = jnp.float32

  def setup(self):
    self.embedding = layers.param_with_axes(self, "embedding", nn.initializers.normal(0.02), (self.num, self.features),
                                            self.axes, self.weight_dtype)

  def __call__(self, ids: Array) -> Array:
    return jnp.take(self.embedding, ids, axis=0)

  def attend(self, hidden: Array, dtype: Any) -> Array:
    """hidden: [..., features] -> [..., num] scores against every row of the table."""
    return jnp.einsum("...d,vd->...v", hidden.astype(dtype), self.embedding.astype(dtype),
                      preferred_element_type=jnp.float32)
