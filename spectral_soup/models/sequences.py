"""Token sequences around a model: padding, [prompt; response] layout and per-token log-probabilities.

Shared by decoding (`soup/`), the offline features (`offline/features.py`) and sequence scoring
(`soup/serving.sequence_logprobs`): a response token is always scored at the last real column before it, whatever
side the prompt and response are padded on.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from spectral_soup.utils import reductions

Array = jax.Array


def left_pad(tokens: Array, mask: Array, pad_id: int = 0) -> Tuple[Array, Array]:
  """Moves every row's real tokens to the right end. tokens: int[B, T], mask: bool[B, T] (any padding side)."""
  mask = mask.astype(jnp.bool_)
  length = tokens.shape[1]
  # Stable order: padding first, then real tokens in their original order.
  order = jnp.argsort(mask.astype(jnp.int32) * length + jnp.arange(length)[None, :], axis=1)
  tokens = jnp.take_along_axis(tokens, order, axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  return jnp.where(mask, tokens, pad_id), mask


def previous_real_index(mask: Array) -> Array:
  """For each column t, the index of the last real token strictly before t (0 if none). mask: bool[B, T]."""
  t = mask.shape[1]
  idx = jnp.where(mask, jnp.arange(t)[None, :], -1)
  running = jax.lax.cummax(idx, axis=1)
  prev = jnp.concatenate([jnp.full_like(running[:, :1], -1), running[:, :-1]], axis=1)
  return jnp.maximum(prev, 0)


def join_prompt_response(prompt: Array, prompt_mask: Array, response: Array,
                         response_mask: Array) -> Tuple[Array, Array, Array]:
  """[prompt; response] as one left-padded-prompt sequence and where each response token is predicted.

  prompt: int32[B, P], response: int32[B, R] (any padding, any id on padding, bool masks). Returns (tokens:
  int32[B, P + R], mask: bool[B, P + R], prev: int32[B, R]): the logits at column prev[b, j] predict response[b, j].
  """
  prompt, prompt_mask = left_pad(prompt, prompt_mask)
  # Padding ids are not read: a tokenizer's pad id beyond the model's vocabulary embedded as NaN, which attention
  # spread to every row.
  response = jnp.where(response_mask.astype(jnp.bool_), response, 0)
  tokens = jnp.concatenate([prompt, response], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask.astype(jnp.bool_)], axis=1)
  p, r = prompt.shape[1], response.shape[1]
  # The token at column p + j is predicted at the last real column before it.
  return tokens, mask, previous_real_index(mask)[:, p:p + r]


def gather_positions(x: Array, prev: Array) -> Array:
  """x: [B, T, ...] at the columns prev: int[B, R] -> [B, R, ...]."""
  return jnp.take_along_axis(x, prev.reshape(prev.shape + (1,) * (x.ndim - 2)), axis=1)


def token_logprobs(logits: Array, response: Array, response_mask: Array) -> Array:
  """log softmax(logits)[response], zero on padding. logits: [B, R, V], response: int[B, R] -> f32[B, R]."""
  out = reductions.log_softmax_at(logits.astype(jnp.float32), response)
  return jnp.where(response_mask.astype(jnp.bool_), out, 0.0)


def support_position(support: Array, vocab_size: int) -> Array:
  """int32[V]: each token's index in `support` (int[S], distinct ids), -1 for tokens outside it."""
  support = jnp.asarray(support, jnp.int32)
  return jnp.full((vocab_size,), -1, jnp.int32).at[support].set(jnp.arange(support.shape[0], dtype=jnp.int32))
