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
"""

from __future__ import annotations

from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp

from spectral_soup.models import layers
from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.spectral import SpectralPolicy, head_delta_logits
from spectral_soup.models.transformer import Transformer
from spectral_soup.soup import serving

Array = jax.Array
Batch = Mapping[str, Array]
CACHED_FIELDS = ("hidden_a", "hidden_b", "ref_a", "ref_b")


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
                      response: Array, response_mask: Array) -> dict:
  """The frozen feature pass: h(s) before each response token and the reference log-prob of the response.

  prompt: int32[B, P], response: int32[B, R] (bool masks). Returns {"hidden": [B, R, D] (compute dtype),
  "ref": f32[B]}.
  """
  tokens, mask, prev = serving.join_prompt_response(prompt, prompt_mask, response, response_mask)
  logits, aux = Transformer(policy.config).apply({"params": backbone}, tokens, mask=mask)
  hidden = serving.gather_positions(aux["hidden"], prev)
  ref = serving.token_logprobs(serving.gather_positions(logits, prev), response, response_mask).sum(-1)
  return {"hidden": hidden, "ref": ref}


def pair_features(policy: SpectralPolicy, backbone: Any, batch: Batch) -> dict:
  """`response_features` of both responses: {"hidden_a", "hidden_b": [B, R, D], "ref_a", "ref_b": f32[B]}."""
  feats = response_features(policy, backbone, *_both_responses(batch))
  hidden_a, hidden_b = _unpair(feats["hidden"])
  ref_a, ref_b = _unpair(feats["ref"])
  return {"hidden_a": hidden_a, "hidden_b": hidden_b, "ref_a": ref_a, "ref_b": ref_b}


def reference_logits(config: TransformerConfig, backbone: Any, hidden: Array) -> Array:
  """The backbone's output layer on final hidden states: [..., D] -> f32[..., V] (as `Transformer` computes it)."""
  dtype = config.dtype
  if config.tie_embeddings:
    logits = jnp.einsum("...d,vd->...v", hidden.astype(dtype), backbone["embed"]["embedding"].astype(dtype),
                        preferred_element_type=jnp.float32)
  else:
    logits = jnp.einsum("...d,dv->...v", hidden.astype(dtype), backbone["lm_head"]["kernel"].astype(dtype))
  logits = logits.astype(jnp.float32)
  if config.final_logit_softcap is not None:
    logits = config.final_logit_softcap * jnp.tanh(logits / config.final_logit_softcap)
  return logits


def cached_response_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, hidden: Array,
                             response: Array, response_mask: Array) -> Array:
  """Sequence log-probs under each head basis from cached h(s): hidden [B, R, D] -> f32[K, B]."""
  cfg = policy.config
  ref_logits = layers.constrain(reference_logits(cfg, backbone, hidden), ("batch", "length", "vocab"))
  psi = hidden
  if policy.feature_dim is not None:
    projection = layers.Projection((cfg.embed_dim,), (policy.feature_dim,), ("embed",), ("features",),
                                   dtype=cfg.dtype, weight_dtype=cfg.weight_dtype)
    psi = projection.apply({"params": trainable["features"]["projection"]}, hidden)
  basis_logits = ref_logits[None] + head_delta_logits(trainable["heads"], psi, cfg.dtype)
  basis_logits = layers.constrain(basis_logits, ("basis", "batch", "length", "vocab"))
  score = lambda logits: serving.token_logprobs(logits, response, response_mask).sum(-1)
  return jax.vmap(score)(basis_logits)


def cached_pair_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, batch: Batch) -> dict:
  """Scores B pairs from cached features (batch: `pair_features` outputs + the response fields)."""
  if policy.basis_kind != "heads":
    raise ValueError(f"Cached features serve head bases only; this policy has basis_kind={policy.basis_kind!r}.")
  logprobs = lambda side: cached_response_logprobs(policy, trainable, backbone, batch[f"hidden_{side}"],
                                                   batch[f"response_{side}"], batch[f"response_{side}_mask"])
  return {"ref_a": batch["ref_a"], "ref_b": batch["ref_b"], "basis_a": logprobs("a"), "basis_b": logprobs("b")}


def batch_logprobs(policy: SpectralPolicy, trainable: Any, backbone: Any, batch: Batch) -> dict:
  """Cached scoring when the batch carries features, else the full forward."""
  if "hidden_a" in batch:
    return cached_pair_logprobs(policy, trainable, backbone, batch)
  return pair_logprobs(policy, merge_params(trainable, backbone), batch)
