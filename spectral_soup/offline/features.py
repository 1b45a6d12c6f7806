"""Sequence log-probabilities of preference pairs under the reference and all K bases, with or without cached features.

Two ways to score a batch of pairs (both return {"ref_a", "ref_b": f32[B], "basis_a", "basis_b": f32[K, B]}):

* `pair_logprobs` (any basis kind): one forward of `SpectralPolicy` over [prompt; response] for both responses
  (2B rows; LoRA bases run (K+1) * 2B rows), through `serving.sequence_logprobs`.
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
from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.spectral import SpectralPolicy, head_delta_logits, support_delta_logits
from spectral_soup.models.spectral import support_log_normalizer
from spectral_soup.models.transformer import Transformer, init_cache, output_logits, take_cache_rows
from spectral_soup.soup import decoding
from spectral_soup.soup import serving

Array = jax.Array
Batch = Mapping[str, Array]
CACHED_FIELDS = ("hidden_a", "hidden_b", "ref_a", "ref_b")
SUPPORT_FIELDS = ("support_probs_a", "support_probs_b")


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


def _both_responses(batch: Batch):
  """Responses a and b interleaved on the batch axis (rows a_0, b_0, a_1, b_1, ...), prompts repeated: 2B rows.

  Interleaving keeps every pair's two rows on the device that holds the pair (a concatenation would move rows
  across the batch shards).
  """
  twice = lambda x: jnp.repeat(x, 2, axis=0)
  pair = lambda a, b: jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])
  return (twice(batch["prompt"]), twice(batch["prompt_mask"]), pair(batch["response_a"], batch["response_b"]),
          pair(batch["response_a_mask"], batch["response_b_mask"]))


def _unpair(x: Array, axis: int = 0) -> Tuple[Array, Array]:
  """Inverse of the interleaving in `_both_responses` along `axis` (of size 2B): (rows of a, rows of b)."""
  x = x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:])
  return jnp.take(x, 0, axis=axis + 1), jnp.take(x, 1, axis=axis + 1)


def pair_logprobs(policy: SpectralPolicy, params: Any, batch: Batch) -> dict:
  """Scores both responses of B pairs in one policy forward. batch: the pair fields of `input_pipeline`, [B, ...]."""
  out = serving.sequence_logprobs(policy, params, *_both_responses(batch))
  ref_a, ref_b = _unpair(out["ref"])
  basis_a, basis_b = _unpair(out["basis"], axis=1)
  return {"ref_a": ref_a, "ref_b": ref_b, "basis_a": basis_a, "basis_b": basis_b}


def response_features(policy: SpectralPolicy, backbone: Any, prompt: Array, prompt_mask: Array,
                      response: Array, response_mask: Array, support: Optional[Array] = None) -> dict:
  """The frozen feature pass: h(s) before each response token and the reference log-prob of the response.

  prompt: int32[B, P], response: int32[B, R] (bool masks), support: int32[S] or None. Returns {"hidden": [B, R, D]
  (compute dtype), "ref": f32[B]} and, with a support, "support_probs": f32[B, R, S] (p_ref of each support token at
  each response position). Logits are computed at the response positions only.
  """
  tokens, mask, prev = serving.join_prompt_response(prompt, prompt_mask, response, response_mask)
  _, aux = Transformer(policy.config).apply({"params": backbone}, tokens, mask=mask, return_logits=False)
  hidden = serving.gather_positions(aux["hidden"], prev)
  logits = reference_logits(policy.config, backbone, hidden)
  out = {"hidden": hidden, "ref": serving.token_logprobs(logits, response, response_mask).sum(-1)}
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
  prompt, prompt_mask = decoding.left_pad(batch["prompt"], batch["prompt_mask"])
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
  columns = jnp.arange(response.shape[1])[None]
  before = jax.lax.cummax(jnp.where(response_mask, columns, -1), axis=1)
  before = jnp.concatenate([jnp.full_like(before[:, :1], -1), before[:, :-1]], axis=1)
  hidden = serving.gather_positions(states, before + 1)  # [2B, R, D]
  logits = reference_logits(cfg, backbone, hidden)
  feats = {"hidden": hidden, "ref": serving.token_logprobs(logits, response, response_mask).sum(-1)}
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
  projection = layers.Projection((cfg.embed_dim,), (policy.feature_dim,), ("embed",), ("features",),
                                 dtype=cfg.dtype, weight_dtype=cfg.weight_dtype)
  return projection.apply({"params": trainable["features"]["projection"]}, hidden)


def cached_response_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, hidden: Array,
                             response: Array, response_mask: Array) -> Array:
  """Sequence log-probs under each head basis from cached h(s): hidden [B, R, D] -> f32[K, B]."""
  cfg = policy.config
  ref_logits = layers.constrain(reference_logits(cfg, backbone, hidden), ("batch", "length", "vocab"))
  psi = _psi(policy, trainable, hidden)
  basis_logits = ref_logits[None] + head_delta_logits(trainable["heads"], psi, cfg.dtype)
  basis_logits = layers.constrain(basis_logits, ("basis", "batch", "length", "vocab"))
  score = lambda logits: serving.token_logprobs(logits, response, response_mask).sum(-1)
  return jax.vmap(score)(basis_logits)


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
  column = jnp.full((cfg.vocab_size,), -1, jnp.int32).at[support].set(jnp.arange(support.shape[0]))[response]
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
    logprobs = lambda side: batch[f"ref_{side}"][None] + support_response_logratios(
        policy, trainable, batch[f"hidden_{side}"], batch[f"support_probs_{side}"], batch[f"response_{side}"],
        batch[f"response_{side}_mask"], support)
  else:
    logprobs = lambda side: cached_response_logprobs(policy, trainable, backbone, batch[f"hidden_{side}"],
                                                     batch[f"response_{side}"], batch[f"response_{side}_mask"])
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
