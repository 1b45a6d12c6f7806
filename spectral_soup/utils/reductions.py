"""Max, min, argmax and log-softmax over the last axis, as exact trees of elementwise maxima.

Every decoding step and every training step of a head basis reduces over the vocabulary: the log-softmax's max,
greedy decoding's argmax, the sampler's normalizer. XLA's own CPU max-reduction (the package keeps YNNPACK for dots
only, see `_xla_cpu.py`) runs at about 2.5 G elements/s on two AVX-512 cores and its argmax at 0.4 G/s, while
elementwise code runs at 5-10 G/s. Here the last axis is first folded in halves by elementwise maxima (`max(x[:h],
x[h:])`, up to `MAX_LEVELS` times; XLA fuses the folds into one loop that reads `x` once), and only the remaining
`V / 2^levels` columns go through `jnp.max`: 4-5x faster at [32-4,096, 1,024-49,152] on that CPU, 1.5-2.3x for the
log-softmax and 5-11x for the argmax.

A maximum is exact in any order, so every function returns bit for bit what its `jnp` / `jax.nn` counterpart
returns, NaN included (`jnp.maximum` propagates NaN; `argmax` returns the first NaN's index, as `jnp.argmax` does),
and the gradients are the same up to float rounding (the max is under `stop_gradient`, as in `jax.nn.log_softmax`).
The speedups above are measured on CPU; on accelerators the folds are exact too, and their speed is what the GPU
decode benchmark (`experiments/benchmarks/gpu.sh`) measures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# Halvings of the last axis before the native reduction: each output element of the fused fold reads 2^levels
# inputs, so the fused loop's code grows as 2^levels; 8 leaves 192 columns of a 49,152-token vocabulary.
MAX_LEVELS = 8
# The folds stop at this width (a narrower axis goes to the native reduction as it is).
MIN_WIDTH = 8


def _fold(x: Array, op, levels: int = MAX_LEVELS) -> Array:
  """Folds the last axis in halves with `op` (associative, commutative, exact) while it is wider than MIN_WIDTH.

  An odd width first sets its last column aside; set-aside columns are folded into the result at the end.
  """
  rest = None
  for _ in range(levels):
    width = x.shape[-1]
    if width <= MIN_WIDTH:
      break
    if width % 2:
      rest = x[..., -1:] if rest is None else op(rest, x[..., -1:])
      x = x[..., :-1]
      width -= 1
    half = width // 2
    x = op(x[..., :half], x[..., half:])
  if rest is not None:
    x = jnp.concatenate([x, rest], axis=-1)
  return x


def max_last(x: Array, keepdims: bool = False) -> Array:
  """`jnp.max(x, axis=-1, keepdims=keepdims)`, bit for bit (NaN propagates)."""
  return jnp.max(_fold(x, jnp.maximum), axis=-1, keepdims=keepdims)


def min_last(x: Array, keepdims: bool = False) -> Array:
  """`jnp.min(x, axis=-1, keepdims=keepdims)`, bit for bit (NaN propagates)."""
  return jnp.min(_fold(x, jnp.minimum), axis=-1, keepdims=keepdims)


def argmax_last(x: Array) -> Array:
  """`jnp.argmax(x, axis=-1)` as int32: the first index of the maximum (of the first NaN, if any).

  Two folded passes: the maximum m, then the smallest index where x == m (or x is NaN: m is NaN exactly when x
  holds a NaN, and then x == m nowhere).
  """
  m = max_last(x, keepdims=True)
  width = x.shape[-1]
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  hit = (x == m) | jnp.isnan(x) if jnp.issubdtype(x.dtype, jnp.floating) else x == m
  return min_last(jnp.where(hit, index, width))


def log_softmax(x: Array) -> Array:
  """`jax.nn.log_softmax(x, axis=-1)` with the folded max: the same values, gradients up to float rounding."""
  shifted = x - jax.lax.stop_gradient(max_last(x, keepdims=True))
  return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


def log_softmax_at(x: Array, index: Array) -> Array:
  """`jnp.take_along_axis(jax.nn.log_softmax(x), index[..., None], -1)[..., 0]` without the [..., V] log-probs.

  x: [..., V]; index: int[...]. The same float operations on the picked entries, so the same values bit for bit,
  and the same gradients; only the normalizer is reduced over V (where `log_softmax` then writes every entry).
  """
  return log_softmax_at_and_normalizer(x, index)[0]


def log_softmax_at_and_normalizer(x: Array, index: Array):
  """(`log_softmax_at(x, index)`, the log-normalizer logsumexp(x) [...]): the same values, one pass for both.

  A row's non-finite maximum shifts by 0 instead (as `jax.nn.logsumexp` does): an all -inf row's normalizer is -inf
  and a row holding +inf has +inf, where x - max made them NaN. Finite rows: the same bits.
  """
  top = jax.lax.stop_gradient(max_last(x, keepdims=True))
  top = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))
  log_z = jnp.log(jnp.sum(jnp.exp(x - top), axis=-1))
  picked = jnp.take_along_axis(x, index[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return (picked - top[..., 0]) - log_z, top[..., 0] + log_z
