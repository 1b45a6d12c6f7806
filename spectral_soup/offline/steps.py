"""The update and evaluation steps of the K bases: the optimizer, the per-basis loss sums, one update with
gradient accumulation (`train_step`, jitted by the trainer) and the held-out sums (`eval_step`, `eval_metrics`).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.offline import features
from spectral_soup.offline import losses

LOSS_KINDS = ("dpo", "ratings")  # config.loss.kind: the terms `loss_terms` sums.


def make_optimizer(config: ml_collections.ConfigDict) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine decay and global-norm clipping."""
  o, steps = config.optim, config.train.num_steps
  schedule = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
                                                decay_steps=max(steps, o.warmup_steps + 1),
                                                end_value=o.learning_rate * o.end_lr_fraction)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*parts), schedule


def loss_terms(loss_cfg: Mapping[str, Any], logprobs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
  """Per-basis sums of `losses` for one batch of scored pairs."""
  lp = (logprobs["ref_a"], logprobs["ref_b"], logprobs["basis_a"], logprobs["basis_b"])
  rows = batch.get("real")  # Held-out padding rows (`pad_eval_pairs`) count nowhere.
  if loss_cfg["kind"] == "dpo":
    return losses.dpo_terms(*lp, batch["labels"], beta=loss_cfg["beta"], label_smoothing=loss_cfg["label_smoothing"],
                            rows=rows)
  return losses.ratings_terms(*lp, batch["scores_a"], batch["scores_b"], beta=loss_cfg["beta"],
                              rating_scale=loss_cfg["rating_scale"], rows=rows)


def label_counts(loss_cfg: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> jax.Array:
  """Labelled pairs per basis, f32[K], over every leading axis of the batch."""
  if loss_cfg["kind"] == "dpo":
    valid = batch["labels"] >= 0
  else:
    valid = ~jnp.isnan(batch["scores_a"] - batch["scores_b"])
  return jnp.sum(valid.reshape(-1, valid.shape[-1]), axis=0).astype(jnp.float32)


def train_step(policy: SpectralPolicy, tx: optax.GradientTransformation, schedule: optax.Schedule,
               loss_cfg: Mapping[str, Any], state: Dict[str, Any], batch: Mapping[str, jax.Array], backbone: Any, *,
               support: Optional[np.ndarray] = None) -> Tuple[Dict[str, Any], dict]:
  """One optimizer update of all K bases.

  Args:
    state: {"step": int32[], "params": trainable params, "opt_state", "rng": uint32[2]}.
    batch: pair fields with leading [A, M] axes (A micro-batches of M pairs), or cached features
      ({"hidden_a": [A, M, R, D], "ref_a": [A, M], ...}).
    backbone: the frozen backbone's parameters.
    support: int32[S], the heads' vocabulary support (cached features only; see `features.py`), or None.

  Returns:
    (new state, metrics): per-basis "loss", "accuracy", "margin", "kl", "count" ([K]), and scalar "total_loss",
    "grad_norm", "learning_rate", "finite" (bool: False means the update was not applied).
  """
  counts = label_counts(loss_cfg, batch)

  def loss_fn(params, micro):
    logprobs = features.batch_logprobs(policy, params, backbone, micro, support)
    sums = loss_terms(loss_cfg, logprobs, micro)
    return losses.loss_from_sums(sums, counts), sums

  def accumulate(carry, micro):
    grads, sums = carry
    (_, micro_sums), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], micro)
    return (jax.tree.map(jnp.add, grads, micro_grads), jax.tree.map(jnp.add, sums, micro_sums)), None

  num_bases = policy.num_bases
  zero_sums = {name: jnp.zeros((num_bases,), jnp.float32) for name in losses.SUM_KEYS}
  zero_sums["responses"] = jnp.zeros((), jnp.float32)
  zero_grads = jax.tree.map(jnp.zeros_like, state["params"])
  (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), batch)

  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
      "rng": state["rng"]
  }
  metrics = losses.metrics_from_sums(sums)
  metrics.update(total_loss=losses.loss_from_sums(sums), grad_norm=optax.tree.norm(grads),
                 learning_rate=schedule(state["step"]))
  # A non-finite loss or gradient never reaches the state: the step returns its input (the loop then stops and
  # saves it with the batch, see `train.nan_check`). Bitwise a no-op when everything is finite.
  metrics["finite"] = jnp.isfinite(metrics["total_loss"]) & jnp.isfinite(metrics["grad_norm"])
  new_state = jax.tree.map(lambda new, old: jnp.where(metrics["finite"], new, old), new_state, state)
  return new_state, metrics


def eval_step(policy: SpectralPolicy, loss_cfg: Mapping[str, Any], params: Any, backbone: Any,
              batch: Mapping[str, jax.Array], *, support: Optional[np.ndarray] = None) -> dict:
  """Loss sums on one batch [M, ...]: {"terms": per-basis sums, "cross": `losses.cross_accuracy_terms`}.

  Add them up over batches, then `eval_metrics`.
  """
  logprobs = features.batch_logprobs(policy, params, backbone, batch, support)
  if "labels" in batch:  # The pairs' own labels (ties masked), whichever loss trained the heads.
    labels = batch["labels"]
  else:  # The sign of the rating difference; ties and missing ratings are masked.
    diff = batch["scores_a"] - batch["scores_b"]
    labels = jnp.where(diff > 0, 1, jnp.where(diff < 0, 0, -1))
  cross = losses.cross_accuracy_terms(logprobs["ref_a"], logprobs["ref_b"], logprobs["basis_a"], logprobs["basis_b"],
                                      labels)
  return {"terms": loss_terms(loss_cfg, logprobs, batch), "cross": cross}


def pad_eval_pairs(pairs: Mapping[str, np.ndarray], batch_size: int) -> Dict[str, np.ndarray]:
  """Held-out pairs padded to a multiple of `batch_size`, so that evaluation sees every pair.

  Padding rows repeat the first pair with every label masked (-1) and NaN scores, and `real` (bool[N]) marks the
  pairs that count; `eval_step` leaves the padding out of every metric.
  """
  n = len(pairs["response_a"])
  extra = -n % batch_size
  out = dict(pairs)
  out["real"] = np.concatenate([np.ones((n,), bool), np.zeros((extra,), bool)])
  if not extra or not n:
    return out
  for name, value in pairs.items():
    pad = np.repeat(value[:1], extra, axis=0)
    if name == "labels":
      pad = np.full_like(pad, -1)
    elif name.startswith("scores_"):
      pad = np.full_like(pad, np.nan)
    out[name] = np.concatenate([value, pad])
  return out


def eval_metrics(sums: Mapping[str, Any]) -> dict:
  """Per-basis means from summed `eval_step` outputs, plus "cross_accuracy": [K, J]."""
  metrics = losses.metrics_from_sums(sums["terms"])
  metrics["cross_accuracy"] = sums["cross"]["correct"] / jnp.maximum(sums["cross"]["count"], 1.0)[None, :]
  return metrics
