"""Sequence log-probabilities of preference pairs under the reference and all K bases, with or without cached features.

Two ways to score a batch of pairs (both return {"ref_a", "ref_b": f32[B], "basis_a", "basis_b": f32[K, B]}):

* `pair_logprobs` (any basis kind): one forward of `SpectralPolicy` over [prompt; response] for both responses
  (2B rows; LoRA bases run (K+1) * 2B rows) up to the final hidden states; the output layer then runs at the
  response positions only, a few at a time (`LOGPROB_CHUNK`), so no whole sequence's logits are ever held.
* `cached_pair_logprobs` (head bases): the frozen backbone ran once, ahead of training (`response_features`), and
  left per response token the final hidden state h(s) at the position that predicts it ([B, R, D]) and the
  reference log-prob of the whole response ([B]). A step then only computes, per response token,
  `ref_logits = h E^T` (the tied embedding, or the LM head; one [D, V] matmul), `basis_logits_k = ref_logits +
  psi A_k B_k` and the K log-softmax normalizers: no attention, no MLPs, no prompt tokens. The reference logits
  must be recomputed (caching [R, V] per response would cost V / D times the hidden state), but the reference
  log-prob of the taken token is cached.

Both give the same numbers up to float rounding (tests/test_offline.py checks it).

**Vocabulary support** (`support`: int32[S], `basis.vocab_support` in the training config). Recomputing h E^T over
a 49,152-token vocabulary for every response token dominates a cached step on a real LM. With a support S (the S
most frequent tokens of the training responses) the heads only correct the logits of tokens in S: columns of
B outside S stay exactly zero (they get no gradient, and decoupled weight decay keeps zero at zero). The feature pass
then also caches the reference probabilities of S at every response position ([B, R, S]), and the basis
log-normalizer is exact without the vocabulary:

    log Z_k(s) / Z_ref(s) = log( (1 - sum_{a in S} p_ref(a|s)) + sum_{a in S} p_ref(a|s) exp(delta_k(s, a)) ),
    log pi_k(y|s) = log pi_ref(y|s) + delta_k(s, y) [y in S] - log Z_k(s) / Z_ref(s).

A step then costs O(K r S) per token instead of O(D V). The trained heads are ordinary dense heads (zeros outside
S), served by every souping mode unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from spectral_soup.models import layers
from spectral_soup.models.build import merge_params
from spectral_soup.models import sequences
from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.spectral import SpectralPolicy, head_token_logprobs, support_delta_logits
from spectral_soup.models.spectral import support_log_normalizer
from spectral_soup.models.transformer import Transformer, init_cache, output_logits, take_cache_rows

Array = jax.Array
Batch = Mapping[str, Array]
CACHED_FIELDS = ("hidden_a", "hidden_b", "ref_a", "ref_b")
SUPPORT_FIELDS = ("support_probs_a", "support_probs_b")


def _both_responses(batch: Batch):
  """Responses a and b interleaved on the batch axis (rows a_0, b_0, a_1, b_1, ...), prompts repeated: 2B rows.

  Interleaving keeps every pair's two rows on the device that holds the pair (a concatenation would move rows
  across the batch shards).
  """
  twice = lambda x: jnp.repeat(x, 2, axis=0)
  pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
  mask = pair(batch["response_a_mask"], batch["response_b_mask"]).astype(jnp.bool_)
  # Padding ids are not read (a pad id beyond the vocabulary embedded as NaN, which attention spread to every row).
  response = jnp.where(mask, pair(batch["response_a"], batch["response_b"]), 0)
  return twice(batch["prompt"]), twice(batch["prompt_mask"]), response, mask


def _unpair(x: Array, axis: int = 0) -> Tuple[Array, Array]:
  """Inverse of the interleaving in `_both_responses` along `axis` (of size 2B): (rows of a, rows of b)."""
  x = x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:])
  return jnp.take(x, 0, axis=axis + 1), jnp.take(x, 1, axis=axis + 1)


# Response positions whose [rows, positions, V] logits exist at once in `pair_logprobs` (and, rematerialized, in its
# backward pass). At Gemma 3 1B's 262,144-token vocabulary with K = 30 LoRA bases, one pair's 62 rows x 32
# positions of f32 logits are 2 GiB, against 12 GiB for a 192-token response at once (and several such buffers).
LOGPROB_CHUNK = 32


def pair_logprobs(policy: SpectralPolicy, params: Any, batch: Batch, chunk: int = LOGPROB_CHUNK) -> dict:
  """Scores both responses of B pairs in one policy forward. batch: the pair fields of `input_pipeline`, [B, ...].

  The forward stops at the final hidden states (`SpectralPolicy.hidden_states`); the output layer then runs only
  at the response positions, `chunk` of them at a time under `jax.checkpoint`, so neither the forward nor the
  backward pass holds the logits of a whole sequence (the same numbers as `soup.serving.sequence_logprobs` up to float
  rounding: tests/test_offline.py). Head bases score each piece as the cached path does (`cached_response_logprobs`).
  """
  prompt, prompt_mask, response, response_mask = _both_responses(batch)
  tokens, mask, prev = sequences.join_prompt_response(prompt, prompt_mask, response, response_mask)
  states = policy.apply({"params": params}, tokens, mask=mask, method=SpectralPolicy.hidden_states)
  gather = lambda x: sequences.gather_positions(x, prev)  # [2B, T, ...] -> [2B, R, ...]
  hidden = jax.vmap(gather)(states["hidden"])  # [G, 2B, R, D]
  backbone = params["features"]["backbone"]
  cfg = policy.config

  if policy.basis_kind == "heads":
    psi = gather(states["psi"])

    def score(h, p, y, m):  # [2B, c, D], [2B, c, F], [2B, c] -> ref [2B, c], basis [K, 2B, c]
      ref_logits = layers.constrain(reference_logits(cfg, backbone, h), ("batch", "length", "vocab"))
      return sequences.token_logprobs(ref_logits, y, m), _head_scores(params["heads"], p, ref_logits, y, m, cfg.dtype)

    ref, basis = _by_position_chunks(score, (hidden[0], psi, response, response_mask), chunk)
  else:

    def score(h, y, m):  # [G, 2B, c, D] -> [G, 2B, c]
      logits = layers.constrain(reference_logits(cfg, backbone, h), (None, "batch", "length", "vocab"))
      return jax.vmap(lambda x: sequences.token_logprobs(x, y, m))(logits)

    (logprobs,) = _by_position_chunks(lambda h, y, m: (score(h, y, m),), (hidden, response, response_mask), chunk)
    ref, basis = logprobs[0], logprobs[1:]
  ref_a, ref_b = _unpair(ref.sum(-1))
  basis_a, basis_b = _unpair(basis.sum(-1), axis=1)
  return {"ref_a": ref_a, "ref_b": ref_b, "basis_a": basis_a, "basis_b": basis_b}


def _by_position_chunks(fn, inputs: Tuple[Array, ...], chunk: int) -> Tuple[Array, ...]:
  """fn over the response positions in pieces of `chunk`, each rematerialized in the backward pass.

  inputs: arrays whose position axis is the one before the last for float features ([..., R, D]) and the last for
  the response tokens and mask ([2B, R]); fn maps one piece of each to arrays whose last axis is the piece's
  positions. Returns fn's outputs over all R positions (padding positions, if R is not a multiple of `chunk`, are
  masked out and cut off).
  """
  *features, response, response_mask = inputs
  r = response.shape[-1]
  if chunk <= 0 or r <= chunk:
    return fn(*features, response, response_mask)
  pieces = -(-r // chunk)
  pad = pieces * chunk - r

  def split(x, axis):  # [..., R, ...] -> [pieces, ..., chunk, ...] (axis counted from the end).
    axis = x.ndim + axis
    x = jnp.pad(x, [(0, pad if i == axis else 0) for i in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], pieces, chunk, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)

  xs = tuple(split(x, -2) for x in features) + (split(response, -1), split(response_mask, -1))
  outs = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), xs)

  def join(y):  # [pieces, ..., chunk] -> [..., R]
    y = jnp.moveaxis(y, 0, -2)
    return y.reshape(*y.shape[:-2], pieces * chunk)[..., :r]

  return tuple(join(y) for y in outs)


def response_features(policy: SpectralPolicy, backbone: Any, prompt: Array, prompt_mask: Array, response: Array,
                      response_mask: Array, support: Optional[Array] = None) -> dict:
  """The frozen feature pass: h(s) before each response token and the reference log-prob of the response.

  prompt: int32[B, P], response: int32[B, R] (bool masks), support: int32[S] or None. Returns {"hidden": [B, R, D]
  (compute dtype), "ref": f32[B]} and, with a support, "support_probs": f32[B, R, S] (p_ref of each support token at
  each response position). Logits are computed at the response positions only.
  """
  tokens, mask, prev = sequences.join_prompt_response(prompt, prompt_mask, response, response_mask)
  _, aux = Transformer(policy.config).apply({"params": backbone}, tokens, mask=mask, return_logits=False)
  hidden = sequences.gather_positions(aux["hidden"], prev)
  logits = reference_logits(policy.config, backbone, hidden)
  out = {"hidden": hidden, "ref": sequences.token_logprobs(logits, response, response_mask).sum(-1)}
  if support is not None:
    out["support_probs"] = jnp.take(jax.nn.softmax(logits, axis=-1), support, axis=-1)
  return out


def pair_features(policy: SpectralPolicy, backbone: Any, batch: Batch, support: Optional[Array] = None) -> dict:
  """`response_features` of both responses: {"hidden_a", "hidden_b": [B, R, D], "ref_a", "ref_b": f32[B]} (and
  "support_probs_a", "support_probs_b": f32[B, R, S] with a support).

  The two responses of a pair share their prompt: it runs once into a KV cache, which both responses then
  continue (B x P + 2B x R tokens instead of 2B x (P + R)).
  """
  cfg = policy.config
  model = Transformer(cfg)
  prompt, prompt_mask = sequences.left_pad(batch["prompt"], batch["prompt_mask"])
  num, length = prompt.shape
  response, response_mask = _both_responses(batch)[2:]
  cache = init_cache(cfg, num, length + response.shape[1])
  _, aux = model.apply({"params": backbone}, prompt, mask=prompt_mask, cache=cache, return_logits=False)
  last = jnp.repeat(aux["hidden"][:, -1:], 2, axis=0)  # [2B, 1, D]: predicts each response's first token.
  cache = take_cache_rows(aux["cache"], jnp.repeat(jnp.arange(num), 2))  # Rows a_0, b_0, a_1, b_1, ...
  response_mask = response_mask.astype(jnp.bool_)
  _, aux = model.apply({"params": backbone}, response, mask=response_mask, cache=cache, return_logits=False)
  # The state before response token j: the last real response token before j, else the prompt's last token
  # (column 0 of `states`). Works for any response padding.
  states = jnp.concatenate([last, aux["hidden"]], axis=1)  # [2B, 1 + R, D]
  real = jnp.concatenate([jnp.ones_like(response_mask[:, :1]), response_mask], axis=1)  # Columns of `states`.
  hidden = sequences.gather_positions(states, sequences.previous_real_index(real)[:, 1:])  # [2B, R, D]
  logits = reference_logits(cfg, backbone, hidden)
  feats = {"hidden": hidden, "ref": sequences.token_logprobs(logits, response, response_mask).sum(-1)}
  if support is not None:
    feats["support_probs"] = jnp.take(jax.nn.softmax(logits, axis=-1), support, axis=-1)
  out = {}
  for name, value in feats.items():
    a, b = _unpair(value)
    out[f"{name}_a"], out[f"{name}_b"] = a, b
  return out


def reference_logits(config: TransformerConfig, backbone: Any, hidden: Array) -> Array:
  """The backbone's output layer on final hidden states: [..., D] -> f32[..., V] (as `Transformer` computes it)."""
  return output_logits(config, backbone, hidden)


def _psi(policy: SpectralPolicy, trainable: Any, hidden: Array) -> Array:
  """psi(s) from cached h(s) (through the learned projection, if the policy has one)."""
  cfg = policy.config
  if policy.feature_dim is None:
    return hidden
  projection = layers.Projection((cfg.embed_dim,), (policy.feature_dim,), ("embed",), ("features",), dtype=cfg.dtype,
                                 weight_dtype=cfg.weight_dtype)
  return projection.apply({"params": trainable["features"]["projection"]}, hidden)


def cached_response_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, hidden: Array, response: Array,
                             response_mask: Array) -> Array:
  """Sequence log-probs under each head basis from cached h(s): hidden [B, R, D] -> f32[K, B]."""
  cfg = policy.config
  ref_logits = layers.constrain(reference_logits(cfg, backbone, hidden), ("batch", "length", "vocab"))
  psi = _psi(policy, trainable, hidden)
  return _head_scores(trainable["heads"], psi, ref_logits, response, response_mask, cfg.dtype).sum(-1)


def _head_scores(heads: Any, psi: Array, ref_logits: Array, response: Array, response_mask: Array, dtype) -> Array:
  """Per-token log-probs of the responses under each head basis (`head_token_logprobs`), zero on padding.

  psi: [B, R, F]; ref_logits: [B, R, V]; response, response_mask: [B, R] -> f32[K, B, R].
  """
  logprobs = head_token_logprobs(heads, psi, ref_logits, response, dtype, axes=("basis", "batch", "length", "vocab"))
  return jnp.where(response_mask.astype(jnp.bool_)[None], logprobs, 0.0)


def support_response_logratios(policy: SpectralPolicy, trainable: Any, hidden: Array, support_probs: Array,
                               response: Array, response_mask: Array, support: Array) -> Array:
  """log pi_k(y|x) - log pi_ref(y|x) for heads restricted to `support` (see the module docstring), no [.., V] array.

  hidden: [B, R, D]; support_probs: f32[B, R, S]; response: int32[B, R]; support: int32[S]. Returns f32[K, B].
  Exact when the heads' B columns (and bias entries) outside `support` are zero (training through this function
  keeps them so).
  """
  cfg = policy.config
  heads = trainable["heads"]
  psi = _psi(policy, trainable, hidden)
  delta_support = support_delta_logits(heads, psi, support, cfg.dtype)  # [K, B, R, S]
  delta_support = layers.constrain(delta_support, ("basis", "batch", "length", None))
  # Each response token's correction is its column of delta_support; tokens outside the support have none.
  column = sequences.support_position(support, cfg.vocab_size)[response]
  delta_token = jnp.take_along_axis(delta_support, jnp.maximum(column, 0)[None, ..., None], axis=-1)[..., 0]
  delta_token = jnp.where((column >= 0)[None], delta_token, 0.0)  # [K, B, R]
  log_z = support_log_normalizer(delta_support, support_probs)  # [K, B, R]
  mask = response_mask.astype(jnp.bool_)[None]
  return jnp.sum(jnp.where(mask, delta_token - log_z, 0.0), axis=-1)


def cached_pair_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, batch: Batch,
                         support: Optional[Array] = None) -> dict:
  """Scores B pairs from cached features (batch: `pair_features` outputs + the response fields)."""
  if policy.basis_kind != "heads":
    raise ValueError(f"Cached features serve head bases only; this policy has basis_kind={policy.basis_kind!r}.")
  if support is not None:
    if "support_probs_a" not in batch:
      raise ValueError("A vocabulary support needs features cached with the same support (support_probs_a/_b).")
    logprobs = lambda side: batch[f"ref_{side}"][None] + support_response_logratios(policy, trainable, batch[
        f"hidden_{side}"], batch[f"support_probs_{side}"], batch[f"response_{side}"], batch[f"response_{side}_mask"],
                                                                                    support)
  else:
    logprobs = lambda side: cached_response_logprobs(policy, trainable, backbone, batch[f"hidden_{side}"], batch[
        f"response_{side}"], batch[f"response_{side}_mask"])
  return {"ref_a": batch["ref_a"], "ref_b": batch["ref_b"], "basis_a": logprobs("a"), "basis_b": logprobs("b")}


def batch_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, batch: Batch,
                   support: Optional[Array] = None) -> dict:
  """Cached scoring when the batch carries features (restricted to `support` if given), else the full forward."""
  if "hidden_a" in batch:
    return cached_pair_logprobs(policy, trainable, backbone, batch, support)
  return pair_logprobs(policy, merge_params(trainable, backbone), batch)


def select_support(responses: Any, masks: Any, size: int, vocab_size: int) -> Any:
  """The `size` most frequent tokens of the responses (ties broken by token id), sorted: int32[min(size, V)].

  responses, masks: sequences of int[N, R] / bool[N, R] arrays (host side).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  counts = np.zeros((vocab_size,), np.int64)
  for tokens, mask in zip(responses, masks):
    np.add.at(counts, np.asarray(tokens)[np.asarray(mask, bool)], 1)
  order = np.lexsort((np.arange(vocab_size), -counts))  # Most frequent first, then by id.
  return np.sort(order[:min(size, vocab_size)]).astype(np.int32)
