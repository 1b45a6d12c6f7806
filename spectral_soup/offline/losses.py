"""Preference losses that train all K basis policies on the same pairs at once (docs/METHOD.md section 3).

Basis k's implicit reward of a response is r_k(x, y) = beta * (log pi_k(y|x) - log pi_ref(y|x)). A pair (x, a, b)
carries one label per basis, `labels: int8[B, K]`: 1 if response a is preferred under basis k's attribute, 0 if
b is, -1 for a tie or a missing label (masked). One reference forward and one basis forward score both responses
for every basis; each basis then reads its own label column.

* `dpo_loss` (Bradley-Terry / DPO): -log sigmoid(s * beta * margin) with s = +1 (a wins) or -1 (b wins) and
  margin = (log pi_k(a) - log pi_ref(a)) - (log pi_k(b) - log pi_ref(b)); optional label smoothing (conservative
  DPO: the label is flipped with probability `label_smoothing`).
* `ratings_loss` (regression): the implicit reward is identified only up to a function of the prompt, so it
  predicts the *difference* of per-attribute ratings within a pair: (beta * margin - scale * (rating_a -
  rating_b))^2, NaN ratings masked.

Both come in two forms: `*_terms` returns per-basis *sums* and counts (exact under gradient accumulation and
sharding: sums add up across micro-batches and devices), and `dpo_loss` / `ratings_loss` return the finished loss
and per-basis means. The loss is the mean over bases of each basis's mean over its labelled pairs, so a basis
with few labels weighs as much as one with many.

Metrics per basis ([K] arrays): `loss`, `accuracy` (fraction of ranked pairs whose implicit reward margin has
the label's sign; a zero margin counts as wrong), `margin` (mean signed reward margin beta * s * margin), `kl`
(mean of log pi_k(y|x) - log pi_ref(y|x) over both responses of every pair: a sequence-level estimate of the
basis's drift from the reference on the data; responses are not sampled from pi_k, so it can be negative),
`count` (labelled pairs).
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
# Keys of the per-basis sums (each f32[K]) plus the scalar "responses" (number of scored responses, for `kl`).
SUM_KEYS = ("loss", "correct", "margin", "count", "ranked", "kl")


def _pair_margins(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array) -> Tuple[Array, Array, Array]:
  """Per-basis log-ratio terms. ref_*: [B], basis_*: [K, B] -> (margin [K, B], logratio_a, logratio_b)."""
  ref_a, ref_b = ref_a.astype(jnp.float32), ref_b.astype(jnp.float32)
  logratio_a = basis_a.astype(jnp.float32) - ref_a[None]
  logratio_b = basis_b.astype(jnp.float32) - ref_b[None]
  return logratio_a - logratio_b, logratio_a, logratio_b


def dpo_terms(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array, labels: Array, *, beta: float,
              label_smoothing: float = 0.0, rows: Optional[Array] = None) -> dict:
  """Per-basis sums of the DPO loss and its metrics.

  Args:
    ref_a, ref_b: f32[B] sequence log-probs of responses a and b under the reference.
    basis_a, basis_b: f32[K, B] the same under each basis.
    labels: int[B, K]: 1 (a preferred under basis k), 0 (b preferred), -1 (tie / missing: masked).
    beta: KL strength of the implicit reward.
    label_smoothing: probability that a label is wrong (0: plain DPO).
    rows: optional bool[B], False for padding rows that count nowhere (their labels must be masked too).

  Returns:
    {"loss", "correct", "margin", "count", "ranked", "kl": f32[K], "responses": f32[]} sums over the batch
    (`ranked` = `count` here: every labelled pair has a preferred response).
  """
  margin, logratio_a, logratio_b = _pair_margins(ref_a, ref_b, basis_a, basis_b)
  labels = labels.astype(jnp.int32).T  # [K, B]
  valid = (labels >= 0).astype(jnp.float32)
  sign = jnp.where(labels == 1, 1.0, -1.0)
  logits = beta * sign * margin  # [K, B]: the labelled winner's reward minus the loser's.
  loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
  return _sums(loss, logits, valid, valid, logratio_a, logratio_b, rows)


def ratings_terms(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array, ratings_a: Array, ratings_b: Array, *,
                  beta: float, rating_scale: float = 1.0, rows: Optional[Array] = None) -> dict:
  """Per-basis sums of the ratings (regression) loss and its metrics.

  Args:
    ref_a, ref_b, basis_a, basis_b: as in `dpo_terms`.
    ratings_a, ratings_b: f32[B, K] per-attribute ratings of each response (NaN: missing, masked).
    beta: KL strength of the implicit reward.
    rating_scale: reward units per rating unit: the target of beta * margin is scale * (rating_a - rating_b).
    rows: as in `dpo_terms` (padding rows need NaN ratings).

  Returns:
    As `dpo_terms`; `count` counts pairs with both ratings, `ranked` those whose ratings differ, and `correct`
    the ranked pairs whose margin has the sign of the rating difference.
  """
  margin, logratio_a, logratio_b = _pair_margins(ref_a, ref_b, basis_a, basis_b)
  diff = (ratings_a.astype(jnp.float32) - ratings_b.astype(jnp.float32)).T  # [K, B]
  valid = (~jnp.isnan(diff)).astype(jnp.float32)
  diff = jnp.where(valid > 0, diff, 0.0)
  prediction = beta * margin
  loss = jnp.square(prediction - rating_scale * diff)
  ranked = valid * (diff != 0)
  return _sums(loss, jnp.sign(diff) * prediction, valid, ranked, logratio_a, logratio_b, rows)


def _sums(loss: Array, signed_margin: Array, valid: Array, ranked: Array, logratio_a: Array, logratio_b: Array,
          rows: Optional[Array] = None) -> dict:
  """[K, B] per-pair terms -> per-basis sums.

  valid: pairs that enter the loss; ranked: pairs with a preferred response (accuracy and margin are over these);
  signed_margin > 0 means the basis ranks the pair correctly; rows: bool[B], False for padding (out of `kl`).
  """
  rows = jnp.ones(logratio_a.shape[1:], jnp.float32) if rows is None else rows.astype(jnp.float32)
  return {
      "loss": jnp.sum(loss * valid, axis=1),
      "correct": jnp.sum((signed_margin > 0) * ranked, axis=1),
      "margin": jnp.sum(signed_margin * ranked, axis=1),
      "count": jnp.sum(valid, axis=1),
      "ranked": jnp.sum(ranked, axis=1),
      "kl": jnp.sum((logratio_a + logratio_b) * rows[None], axis=1),
      "responses": 2.0 * jnp.sum(rows),
  }


def cross_accuracy_terms(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array, labels: Array) -> dict:
  """How each basis ranks the pairs by *every* label column: a specialization diagnostic.

  Shapes as in `dpo_terms` (labels: int[B, J]). Returns sums {"correct": f32[K, J] (pairs that basis k ranks as
  label column j does), "count": f32[J] (labelled pairs of column j)}; `correct / count` near 0.5 off the
  diagonal and high on it means basis k follows attribute k only.
  """
  margin, _, _ = _pair_margins(ref_a, ref_b, basis_a, basis_b)  # [K, B]
  labels = labels.astype(jnp.int32).T  # [J, B]
  a_wins, b_wins = (labels == 1).astype(jnp.float32), (labels == 0).astype(jnp.float32)
  correct = (jnp.einsum("kb,jb->kj", (margin > 0).astype(jnp.float32), a_wins) +
             jnp.einsum("kb,jb->kj", (margin < 0).astype(jnp.float32), b_wins))
  return {"correct": correct, "count": jnp.sum(a_wins + b_wins, axis=1)}


def loss_from_sums(sums: Mapping[str, Array], counts: Optional[Array] = None) -> Array:
  """The training loss: mean over bases of each basis's mean loss over its labelled pairs.

  `counts: [K]` overrides `sums["count"]` (the whole accumulated batch's counts when `sums` covers one
  micro-batch: the loss of the full batch is then the sum of the micro-batches' losses).
  """
  counts = sums["count"] if counts is None else counts
  return jnp.mean(sums["loss"] / jnp.maximum(counts, 1.0))


def metrics_from_sums(sums: Mapping[str, Array]) -> dict:
  """Per-basis means ([K] arrays) from `*_terms` sums (possibly added up over micro-batches)."""
  count, ranked = jnp.maximum(sums["count"], 1.0), jnp.maximum(sums["ranked"], 1.0)
  return {
      "loss": sums["loss"] / count,
      "accuracy": sums["correct"] / ranked,
      "margin": sums["margin"] / ranked,
      "kl": sums["kl"] / jnp.maximum(sums["responses"], 1.0),
      "count": sums["count"],
  }


def dpo_loss(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array, labels: Array, *, beta: float,
             label_smoothing: float = 0.0) -> Tuple[Array, dict]:
  """DPO loss of all K bases on one batch of pairs. Shapes as in `dpo_terms`.

  Returns (loss: f32[], metrics: {"loss", "accuracy", "margin", "kl", "count": f32[K]}).
  """
  sums = dpo_terms(ref_a, ref_b, basis_a, basis_b, labels, beta=beta, label_smoothing=label_smoothing)
  return loss_from_sums(sums), metrics_from_sums(sums)


def ratings_loss(ref_a: Array, ref_b: Array, basis_a: Array, basis_b: Array, ratings_a: Array, ratings_b: Array, *,
                 beta: float, rating_scale: float = 1.0) -> Tuple[Array, dict]:
  """Ratings-regression loss of all K bases on one batch of pairs. Shapes as in `ratings_terms`."""
  sums = ratings_terms(ref_a, ref_b, basis_a, basis_b, ratings_a, ratings_b, beta=beta, rating_scale=rating_scale)
  return loss_from_sums(sums), metrics_from_sums(sums)
