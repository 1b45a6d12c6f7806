r"""Offline phase: trains the K basis policies together in one sharded step (docs/METHOD.md section 3).

`train_and_evaluate(config, workdir)` is the whole job, in titled sections: mesh, input, model, sharding,
update step, checkpoint, loop. Entry point: `python -m experiments.train_basis --config=... --workdir=...`.

* Train state `{"step", "params", "opt_state", "rng"}` holds only the trainable part of the policy (the heads,
  psi's projection if any, or the LoRA adapters); the frozen backbone is a separate argument of the step, never
  in the optimizer and never in a checkpoint (it is reloaded from `config.model`).
* Shapes come from `jax.eval_shape` before anything is allocated; the trainable parameters are created already
  sharded by `jax.jit(init, out_shardings=...)`; the backbone (a checkpoint, or a seeded host-side random init) is
  placed straight into its sharding.
* The update step is one `jax.jit` with in/out shardings, the state donated; gradient accumulation is a
  `lax.scan` over micro-batches inside it, normalized by the whole batch's label counts (so accumulating equals
  one large batch).
* Head bases can train on cached features (`config.train.cache_features`, see `features.py`): the frozen backbone
  runs once over the data before the loop and a step only runs the heads.
* Checkpoints (Orbax, async, last N) hold the state and the data iterator's position; a restarted job resumes
  bitwise where the last checkpoint left off; SIGTERM saves a checkpoint and stops. A checkpoint written with
  other `resume_fields` (another K, model shape, batch size, ...) stops the run naming the field.
* A step with a non-finite loss or gradient norm never updates the state; `config.train.nan_check` stops the run
  there, with the step's batch and the state it started from saved under `<workdir>/nonfinite/step_<n>/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import time
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from spectral_soup.models import config as config_lib
from spectral_soup.models.spectral import ATTN_TARGETS, BASIS_KINDS, MLP_TARGETS, SpectralPolicy
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import features
from spectral_soup.utils import config_check
from spectral_soup.utils import errors
from spectral_soup.utils import files
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import learnability
from spectral_soup.offline import losses
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.offline import metrics as metrics_lib
from spectral_soup.data import jsonl
from spectral_soup.offline import sources
from spectral_soup.utils import progress
from spectral_soup.utils import workdir_lock

LOSS_KINDS = ("dpo", "ratings")
BASIS_INITS = ("zeros", "ridge")
RIDGE_FEATURES = ("pair_surprise", "surprise", "counts")  # What the "ridge" initialization regresses ratings on.
DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------------------------
# Config check: every field, before anything compiles.


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Raises ValueError naming the first invalid field (`config.train.batch_size=...`)."""
  need = config_check.field_checker(config)
  config_check.check_finite(config)  # NaN / inf in any float field, before any relation between fields.

  c = config
  # Each field's own range before the relations that use it (a negative step count is named as itself).
  need(c.train.num_steps >= 0, "train.num_steps", ">= 0")
  need(c.train.num_steps >= 1 or c.basis.get("init", "zeros") == "ridge", "train.num_steps",
       ">= 1 (0 only with basis.init='ridge': the bases are then their closed-form initialization)")
  need(c.train.batch_size >= 1, "train.batch_size", ">= 1")
  need(c.model.family in config_lib.FAMILIES, "model.family", f"one of {config_lib.FAMILIES}")
  need(c.model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}")
  need(c.model.weight_dtype in DTYPES, "model.weight_dtype", f"one of {DTYPES}")
  need(c.basis.kind in BASIS_KINDS, "basis.kind", f"one of {BASIS_KINDS}")
  need(c.basis.num_bases >= 1, "basis.num_bases", ">= 1")
  need(c.basis.head_rank >= 1 or (c.basis.head_rank == 0 and c.basis.get("logit_bias", False)), "basis.head_rank",
       ">= 1 (or 0 with basis.logit_bias=True)")
  need(c.basis.feature_dim >= 0, "basis.feature_dim", ">= 0 (0: no projection)")
  need(c.basis.get("init", "zeros") in BASIS_INITS, "basis.init", f"one of {BASIS_INITS}")
  if c.basis.get("init", "zeros") == "ridge":
    need(c.basis.kind == "heads" and c.basis.get("logit_bias", False) and c.basis.get("vocab_support", 0) > 0,
         "basis.init", "'zeros' unless basis.kind='heads' with basis.logit_bias=True and basis.vocab_support > 0 "
         "('ridge' fits the logit vectors on the support's cached reference probabilities)")
    need(c.basis.get("init_l2", 0.0) > 0, "basis.init_l2", "> 0")
    need(c.basis.get("init_features", "pair_surprise") in RIDGE_FEATURES, "basis.init_features",
         " or ".join(map(repr, RIDGE_FEATURES)))
  need(c.basis.lora_rank >= 1, "basis.lora_rank", ">= 1")
  need(len(c.basis.lora_targets) > 0 and set(c.basis.lora_targets) <= set(ATTN_TARGETS + MLP_TARGETS),
       "basis.lora_targets", f"some of {ATTN_TARGETS + MLP_TARGETS}")
  need(c.data.prompt_len >= 1, "data.prompt_len", ">= 1")
  need(c.data.response_len >= 1, "data.response_len", ">= 1")
  if not c.model.path:  # The random backbone's architecture (a checkpoint brings its own).
    try:
      model_config(c)
    except ValueError as e:
      raise ValueError(str(e).replace("TransformerConfig.", "config.model.")) from None
    need(c.data.prompt_len + c.data.response_len <= c.model.max_len, "data.response_len",
         f"<= model.max_len - data.prompt_len = {c.model.max_len - c.data.prompt_len}")
  need(c.data.source in ("synthetic", "embedded") + sources.BUILDER_SOURCES or jsonl.is_jsonl(c.data.source),
       "data.source", f"one of {('synthetic', 'embedded') + sources.BUILDER_SOURCES}, a .jsonl file of pairs or "
       "a datasets directory (save_to_disk)")
  if c.data.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(c.data.source):
    sources.validate_config(c)
  if c.data.source == "embedded":
    need(bool(c.model.path), "model.path", "a checkpoint (the embedded data is tokenized with its tokenizer)")
    need(0.0 < c.data.eval_fraction < 1.0, "data.eval_fraction", "in (0, 1)")
  need(c.data.num_train_pairs >= c.train.batch_size, "data.num_train_pairs",
       f">= train.batch_size={c.train.batch_size}")
  need(c.data.num_eval_pairs >= 0, "data.num_eval_pairs", ">= 0")
  need(c.loss.kind in LOSS_KINDS, "loss.kind", f"one of {LOSS_KINDS}")
  need(c.loss.beta > 0, "loss.beta", "> 0")
  need(0.0 <= c.loss.label_smoothing < 0.5, "loss.label_smoothing", "in [0, 0.5)")
  need(c.loss.rating_scale > 0, "loss.rating_scale", "> 0")
  need(c.optim.learning_rate >= 0, "optim.learning_rate", ">= 0")
  need(0 <= c.optim.warmup_steps and (c.optim.warmup_steps <= c.train.num_steps or c.train.num_steps == 0),
       "optim.warmup_steps", f"in [0, train.num_steps={c.train.num_steps}]")
  need(0.0 <= c.optim.end_lr_fraction <= 1.0, "optim.end_lr_fraction", "in [0, 1]")
  need(c.optim.weight_decay >= 0, "optim.weight_decay", ">= 0")
  need(c.optim.grad_clip >= 0, "optim.grad_clip", ">= 0 (0: off)")
  need(0 <= c.optim.b1 < 1, "optim.b1", "in [0, 1)")
  need(0 <= c.optim.b2 < 1, "optim.b2", "in [0, 1)")
  need(c.train.grad_accum_steps >= 1 and c.train.batch_size % c.train.grad_accum_steps == 0,
       "train.grad_accum_steps", f"a divisor of train.batch_size={c.train.batch_size}")
  need(not c.train.cache_features or c.basis.kind == "heads", "train.cache_features",
       "False for basis.kind='lora' (cached features serve head bases only)")
  need(c.basis.get("vocab_support", 0) >= 0, "basis.vocab_support", ">= 0 (0: the whole vocabulary)")
  need(not c.basis.get("vocab_support", 0) or c.train.cache_features, "basis.vocab_support",
       "0 unless train.cache_features=True (the support's reference probabilities are cached features)")
  need(c.train.log_every_steps >= 1, "train.log_every_steps", ">= 1")
  need(isinstance(c.train.nan_check, bool), "train.nan_check", "True or False")
  need(c.train.eval_every_steps >= 0, "train.eval_every_steps", ">= 0 (0: only at the end)")
  need(c.checkpoint.every_steps >= 0, "checkpoint.every_steps", ">= 0 (0: only at the end)")
  need(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", ">= 1")

  # The mesh and what it must split.
  devices = jax.device_count() if num_devices is None else num_devices
  if c.mesh.num_devices != -1:
    need(0 < c.mesh.num_devices <= devices, "mesh.num_devices", f"-1 or 1..{devices}")
    devices = c.mesh.num_devices
  data, fsdp, _ = mesh_lib.resolve_mesh_shape(c.mesh.data, c.mesh.fsdp, c.mesh.model, devices)
  shards = data * fsdp
  micro = c.train.batch_size // c.train.grad_accum_steps
  need(micro % shards == 0, "train.batch_size",
       f"a multiple of grad_accum_steps x data x fsdp = {c.train.grad_accum_steps} x {data} x {fsdp} "
       f"(each micro-batch of {micro} pairs is split over {shards} devices)")
  need(micro % jax.process_count() == 0, "train.batch_size", f"divisible over {jax.process_count()} hosts")
  for field in ("feature_batch_size", "eval_batch_size"):
    size = c.train[field]
    need(size >= 1 and size % shards == 0, f"train.{field}", f"a positive multiple of data x fsdp = {shards}")
  need(c.data.num_eval_pairs == 0 or c.data.num_eval_pairs >= c.train.eval_batch_size, "data.num_eval_pairs",
       f"0 or >= train.eval_batch_size={c.train.eval_batch_size}")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (each usable alone: tests and benchmarks call them directly).


def model_config(config: ml_collections.ConfigDict) -> config_lib.TransformerConfig:
  """The random backbone's architecture from `config.model`."""
  m = config.model
  return getattr(config_lib, m.family)(
      vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim, num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads, head_dim=m.head_dim, mlp_dim=m.mlp_dim, max_len=m.max_len, dtype=m.dtype,
      weight_dtype=m.weight_dtype, remat=m.remat)


def build_policy(model_cfg: config_lib.TransformerConfig, basis: Mapping[str, Any]) -> SpectralPolicy:
  return SpectralPolicy(model_cfg, num_bases=basis["num_bases"], basis_kind=basis["kind"],
                        head_rank=basis["head_rank"], feature_dim=basis["feature_dim"] or None,
                        lora_rank=basis["lora_rank"], lora_targets=tuple(basis["lora_targets"]),
                        logit_bias=bool(basis.get("logit_bias", False)))


def backbone_leaf_rule(path: Any, model_cfg: config_lib.TransformerConfig) -> Tuple[Optional[float], int]:
  """How `random_backbone` draws one leaf: (constant, 0) for norm scales (1, or 0 with `norm_scale_plus_one`) and
  biases (0), else (None, fan_in) for N(0, 1/fan_in) kernels and embeddings."""
  keys = [getattr(p, "key", None) for p in path]
  if keys[-1] == "scale":
    return (0.0 if model_cfg.norm_scale_plus_one else 1.0), 0
  if keys[-1] == "bias":
    return 0.0, 0
  fan_in = {"o_proj": model_cfg.num_heads * model_cfg.head_dim, "down_proj": model_cfg.mlp_dim}
  if keys[-1] == "embedding":
    return None, model_cfg.embed_dim
  return None, next((fan_in[k] for k in keys if k in fan_in), model_cfg.embed_dim)


def random_backbone(abstract_backbone: Any, model_cfg: config_lib.TransformerConfig, seed: int) -> Any:
  """A seeded random backbone drawn on the host (no compile): N(0, 1/fan_in) kernels, unit norms, zero biases."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    dtype = jnp.dtype(leaf.dtype)
    constant, n_in = backbone_leaf_rule(path, model_cfg)
    if constant is not None:
      return np.full(leaf.shape, constant, dtype)
    return (rng.standard_normal(leaf.shape) / np.sqrt(n_in)).astype(dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_backbone)


def unboxed(tree: Any) -> Any:
  """Strips logical-axis boxes without sharding constraints (`nn.meta.unbox` constrains under a mesh)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                      tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays in `shardings` (every host holds the same values; multi-host safe)."""
  def one(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree, shardings)


def init_trainable(policy: SpectralPolicy, key: jax.Array) -> Any:
  """Initial trainable parameters (what `features.split_params` keeps), without tracing the backbone if possible."""
  if policy.basis_kind == "lora":
    variables = policy.init(key, method=lambda m: m.lora())
  elif policy.feature_dim is None:
    psi = jnp.zeros((1, 1, policy.config.embed_dim), policy.config.dtype)
    variables = policy.init(key, psi, method=lambda m, x: m.heads(x, None))
  else:  # psi's projection lives inside the feature map: initialize everything, keep the trainable part.
    variables = {"params": features.split_params(policy.init(key, jnp.zeros((1, 4), jnp.int32))["params"])[0]}
  return nn.meta.unbox(variables["params"])


def ridge_logit_bias(pairs: Mapping[str, np.ndarray], support: np.ndarray, vocab_size: int, *, beta: float,
                     rating_scale: float, l2: float, features: str = "pair_surprise") -> np.ndarray:
  """Closed-form logit vectors c: f32[K, V] (zero outside `support`) for bias-only bases, from rated pairs.

  With pi_k(a|s) ~ pi_ref(a|s) exp(c_k(a)), the log-ratio log pi_k(y) / pi_ref(y) of a response is, to first order
  in c, c . s(y) with s(y) = sum_t (onehot(y_t) - p_ref(. | s_t)) its token surprise under the reference. The ratings
  loss asks beta * log-ratio = rating_scale * rating (up to a constant per prompt), which is then linear least
  squares in c_k; with an L2 penalty, ridge regression times rating_scale / beta solves it in closed form:
  * "pair_surprise": each pair's rating difference on its surprise difference s(y_a) - s(y_b) (one row per pair:
    the pairwise ratings loss);
  * "surprise": each response's rating on its surprise, both responses of every pair, centered (twice the rows; on
    the embedded default these directions buy more true reward per nat of KL: docs/METHOD.md, section 3);
  * "counts": each response's rating on its support-token counts, centered: a bag-of-words reward model (PAD's,
    `baselines.pad.fit_token_rewards`), whose token-level KL-regularized optimum, ignoring the soft value of what
    follows, is pi_ref exp(c_k). Counts credit every token of a longer response, so a length attribute's basis
    makes common words likelier instead of longer answers; under surprise, length is carried by the end-of-turn
    token.
  Training, if any, refines it. pairs: response_a/b [N, R] with masks, support_probs_a/b [N, R, S] (the cached
  feature pass; surprise only) and scores_a/b [N, K] (NaN: missing, dropped per basis); support: int[S] token ids.
  """
  if features not in RIDGE_FEATURES:
    raise ValueError(f"features={features!r}: expected one of {RIDGE_FEATURES}.")
  check_ridge_ratings(pairs)
  scores = [np.asarray(pairs[f"scores_{side}"], np.float64) for side in ("a", "b")]
  if features == "counts":
    x = [learnability.token_counts(pairs[f"response_{side}"], pairs[f"response_{side}_mask"], support)
         for side in ("a", "b")]
  else:
    x = [learnability.surprise(pairs[f"response_{side}"], pairs[f"response_{side}_mask"], support,
                               pairs[f"support_probs_{side}"]) for side in ("a", "b")]
  if features == "pair_surprise":
    weights = learnability.fit_ridge(x[0] - x[1], scores[0] - scores[1], l2)
  else:
    weights = learnability.fit_ridge(np.concatenate(x), np.concatenate(scores), l2)
  c = np.zeros((scores[0].shape[1], vocab_size), np.float32)
  c[:, support] = rating_scale / beta * weights.T
  return c


def check_ridge_ratings(pairs: Mapping[str, np.ndarray]) -> None:
  """basis.init='ridge' needs, for every basis, pairs with a rating of both responses: else a ValueError."""
  rated = np.isfinite(np.asarray(pairs["scores_a"], np.float64) - np.asarray(pairs["scores_b"], np.float64))
  for k in np.flatnonzero(rated.sum(0) < 2):
    raise ValueError(f"basis.init='ridge' fits basis {k} on pairs with both responses rated, but scores_a / scores_b "
                     f"have {rated[:, k].sum()} such pairs (>= 2 needed). Use basis.init='zeros'.")


def make_optimizer(config: ml_collections.ConfigDict) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with warmup + cosine decay and global-norm clipping."""
  o, steps = config.optim, config.train.num_steps
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=max(steps, o.warmup_steps + 1), end_value=o.learning_rate * o.end_lr_fraction)
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  return optax.chain(*parts), schedule


def loss_terms(loss_cfg: Mapping[str, Any], logprobs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
  """Per-basis sums of `losses` for one batch of scored pairs."""
  lp = (logprobs["ref_a"], logprobs["ref_b"], logprobs["basis_a"], logprobs["basis_b"])
  rows = batch.get("real")  # Held-out padding rows (`pad_eval_pairs`) count nowhere.
  if loss_cfg["kind"] == "dpo":
    return losses.dpo_terms(*lp, batch["labels"], beta=loss_cfg["beta"],
                            label_smoothing=loss_cfg["label_smoothing"], rows=rows)
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
               loss_cfg: Mapping[str, Any], state: Dict[str, Any], batch: Mapping[str, jax.Array],
               backbone: Any, *, support: Optional[np.ndarray] = None) -> Tuple[Dict[str, Any], dict]:
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
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state, "rng": state["rng"]}
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
  cross = losses.cross_accuracy_terms(logprobs["ref_a"], logprobs["ref_b"], logprobs["basis_a"],
                                      logprobs["basis_b"], labels)
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


def make_feature_fn(policy: SpectralPolicy, mesh, backbone_shardings: Any, support: Optional[np.ndarray] = None):
  """The jitted frozen feature pass `(backbone, token batch [B, ...]) -> features.pair_features(...)`."""
  batch_shardings = {f: mesh_lib.batch_sharding(mesh, 2) for f in input_pipeline.TOKEN_FIELDS}
  return jax.jit(functools.partial(features.pair_features, policy, support=support),
                 in_shardings=(backbone_shardings, batch_shardings))


def compute_features(feature_fn, backbone: Any, arrays: Mapping[str, np.ndarray], mesh, batch_size: int,
                     desc: str = "features") -> Dict[str, np.ndarray]:
  """The frozen feature pass over a whole pair set: returns `arrays` without the prompts, plus cached features.

  Runs `feature_fn` (from `make_feature_fn`) on batches of `batch_size` pairs split over the mesh's batch axes;
  every host receives all features (any host may draw any row later).
  """
  fields = input_pipeline.TOKEN_FIELDS
  n = len(arrays["prompt"])
  per_host = batch_size // jax.process_count()
  chunks = []
  for start in progress.track(range(0, n, batch_size), desc=desc, unit="batch",
                              total=math.ceil(n / batch_size)):
    stop = min(start + batch_size, n)
    rows = np.arange(start, start + batch_size) % n  # The last batch wraps around; the extra rows are dropped.
    rows = rows[jax.process_index() * per_host:(jax.process_index() + 1) * per_host]
    batch = mesh_lib.shard_batch({f: arrays[f][rows] for f in fields}, mesh)
    out = feature_fn(backbone, batch)
    chunks.append({name: multihost_utils.process_allgather(value, tiled=True)[:stop - start]
                   for name, value in out.items()})
  cached = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
  kept = {name: value for name, value in arrays.items() if not name.startswith("prompt")}
  return {**kept, **cached}


def load_pairs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """(train, eval) pair arrays for `config.data` (`input_pipeline` format)."""
  d = config.data
  if d.source == "embedded":
    return _embedded_pairs(config)
  if d.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(d.source):
    train, held_out, _ = sources.builder_pairs(config, sources.load_tokenizer(config))
    return train, held_out
  total = d.num_train_pairs + d.num_eval_pairs
  pairs = input_pipeline.synthetic_pairs(
      total, num_bases=config.basis.num_bases, vocab_size=config.model.vocab_size, prompt_len=d.prompt_len,
      response_len=d.response_len, seed=d.seed)
  train = {name: value[:d.num_train_pairs] for name, value in pairs.items()}
  held_out = {name: value[d.num_train_pairs:] for name, value in pairs.items()}
  return train, held_out


def _embedded_pairs(config: ml_collections.ConfigDict) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """Generates (or reuses) the embedded preference data and tokenizes it; split by a hash of the prompt."""
  from spectral_soup.data import embedded  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  d = config.data
  if len(d.attributes) != config.basis.num_bases:
    raise ValueError(f"config.basis.num_bases={config.basis.num_bases} but config.data.attributes has "
                     f"{len(d.attributes)} attributes: one basis per attribute.")
  directory = embedded.generate_for_config(config)
  pairs, _ = embedded.load_pairs(directory)
  tokenizer = hf_import.tokenizer_from_pretrained(config.model.path)
  arrays = embedded.tokenize_pairs(pairs, tokenizer, prompt_len=d.prompt_len, response_len=d.response_len,
                                   tie_margin=d.tie_margin)
  is_eval = np.asarray([embedded.split_of(p["prompt"], d.eval_fraction) == "eval" for p in pairs])
  # Ratings for loss.kind="ratings": each attribute standardized by the training responses' mean and std.
  train_scores = np.concatenate([arrays["scores_a"][~is_eval], arrays["scores_b"][~is_eval]])
  mean, std = train_scores.mean(0), train_scores.std(0) + 1e-8
  for side in ("a", "b"):
    arrays[f"scores_{side}"] = ((arrays[f"scores_{side}"] - mean) / std).astype(np.float32)
  return ({k: v[~is_eval] for k, v in arrays.items()}, {k: v[is_eval] for k, v in arrays.items()})


def resume_fields(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The config values a checkpoint must share with the run that resumes it, saved with every checkpoint.

  The data order (batch size, seed) and what the state's arrays mean: the bases (kind, K, their ranks) and the
  backbone they sit on (a checkpoint path, or the random backbone's architecture, drawn from `seed`).
  """
  c = config
  names = ["train.batch_size", "seed", "basis.kind", "basis.num_bases", "model.path", "model.weight_dtype"]
  names += (["basis.head_rank", "basis.feature_dim"] if c.basis.kind == "heads" else
            ["basis.lora_rank", "basis.lora_targets"])
  if c.basis.kind == "heads" and c.basis.get("logit_bias", False):
    names.append("basis.logit_bias")
  if c.basis.get("init", "zeros") == "ridge":  # Where the state started (the state itself when num_steps = 0).
    names += ["basis.init", "basis.init_l2"] + (["basis.init_features"] if "init_features" in c.basis else [])
  if not c.model.path:
    names += [f"model.{f}" for f in ("family", "vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads",
                                     "head_dim", "mlp_dim")]
  fields = {}
  for name in names:
    value = c
    for part in name.split("."):
      value = value[part]
    fields[name] = list(value) if isinstance(value, (tuple, list)) else value  # As it reads back from JSON.
  return fields


# Resume fields added after checkpoints were first written, with the value every older checkpoint was made with.
_RESUME_FIELD_DEFAULTS = {"basis.init_features": "pair_surprise"}


def check_resume(config: ml_collections.ConfigDict, workdir: str, step: int, saved: Mapping[str, Any]) -> None:
  """Raises ValueError naming the first `resume_fields` value that differs from checkpoint `step`'s data."""
  for field, value in resume_fields(config).items():
    if field not in saved and field not in _RESUME_FIELD_DEFAULTS:  # Older checkpoints lack it: not checked.
      continue
    stored = saved.get(field, _RESUME_FIELD_DEFAULTS.get(field))
    if stored != value:
      why = ("the data order would not continue" if field in ("train.batch_size", "seed") else
             "the checkpoint holds other bases or another backbone")
      raise ValueError(f"config.{field}={value!r} differs from {stored!r} in the checkpoint of step {step} in "
                       f"{workdir}: {why}. Use the same value or a new --workdir.")


def _nonfinite_error(workdir: str, step: int, state: Any, host_batch: Mapping[str, np.ndarray],
                     metrics: Mapping[str, Any], last_checkpoint: Optional[int]) -> FloatingPointError:
  """Saves step `step`'s batch and the state it started from (the step did not apply its update) under
  `<workdir>/nonfinite/step_<step>/` and returns the error that stops the run."""
  directory = checkpoint_lib.save_debug_step(os.path.join(workdir, "nonfinite", f"step_{step}"), state, host_batch,
                                             metrics)
  loss = np.asarray(metrics["loss"])
  return FloatingPointError(
      f"Step {step}: non-finite training loss or gradient (total_loss={float(metrics['total_loss'])}, "
      f"grad_norm={float(metrics['grad_norm'])}, per-basis loss {loss.tolist()}); the update was not applied and "
      f"training stopped. The step's batch and the state before it are saved in {directory}; the last checkpoint is "
      f"step {last_checkpoint}. Check the data or lower config.optim.learning_rate.")


def _features_key(config, train_pairs, eval_pairs, support) -> str:
  """A hash of everything the cached features depend on: the model, its dtypes, the pairs' tokens, the support."""
  h = hashlib.sha256()
  h.update(json.dumps([config.model.path, config.model.dtype, config.model.weight_dtype, config.seed
                       if not config.model.path else 0]).encode())
  for pairs in (train_pairs, eval_pairs):
    for name in input_pipeline.TOKEN_FIELDS:
      h.update(np.ascontiguousarray(pairs[name]).tobytes())
  if support is not None:
    h.update(np.asarray(support).tobytes())
  return h.hexdigest()[:16]


def _save_features(path: str, train_pairs, eval_pairs) -> None:
  """Writes the cached features atomically (temporary file, then rename)."""
  names = set(features.CACHED_FIELDS) | set(features.SUPPORT_FIELDS)
  files.write_npz_atomic(path, **{f"{split}/{k}": v for split, pairs in (("train", train_pairs), ("eval", eval_pairs))
                                  for k, v in pairs.items() if k in names})


def check_existing_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Before anything is written: the newest readable checkpoint in `workdir` must have been made by a compatible
  config (`check_resume`, which names the field). Unreadable steps are left for `restore_latest` to set aside."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=config.checkpoint.max_to_keep, save_interval_steps=1,
                                     async_save=False, remove_partial_steps=False)  # Reads only.
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      try:
        data = ckpt.read_data(step)
      except Exception:  # pylint: disable=broad-except  (unreadable: `restore_latest` falls back past it)
        continue
      check_resume(config, workdir, step, data)
      return
  finally:
    ckpt.close()


def _load_features(path: str):
  """{"train": {...}, "eval": {...}} from `_save_features`, or None if absent or unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as data:
      out = {"train": {}, "eval": {}}
      for key in data.files:
        split, name = key.split("/", 1)
        out[split][name] = data[key]
      return out
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    aside = f"{path}.unreadable"
    try:
      os.replace(path, aside)  # Out of the way: the recomputed features are written under the same name.
    except OSError:
      aside = "(could not be moved)"
    logging.warning("Cached features %s are unreadable (%s: %s); moved to %s, recomputing.", path,
                    type(e).__name__, e, aside)
    return None


class _StopSignal:
  """Records SIGTERM (preemption) so the loop can checkpoint and stop at the next step boundary."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: no signal handling.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step and stopping.")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


@dataclasses.dataclass
class TrainResult:
  """What `train_and_evaluate` returns: the final state (device arrays) and the last metrics (host values)."""
  state: Dict[str, Any]
  step: int
  train_metrics: Dict[str, Any]
  eval_metrics: Dict[str, Any]
  preempted: bool
  timing: Dict[str, float]


# ----------------------------------------------------------------------------------------------------------------
# The job.


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       pairs: Optional[Tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]] = None,
                       loaded: Optional[Tuple[Any, Any]] = None) -> TrainResult:
  """Trains the K bases of `config` and writes checkpoints and metrics to `workdir`. Resumes if it can.

  pairs: (train, eval) pair arrays to use instead of `load_pairs(config)` (e.g. with extra label columns);
  loaded: (model, backbone params) already loaded from `config.model.path`.
  """
  with contextlib.ExitStack() as stack:  # Holds the workdir's lock while the run lasts.
    return _train_and_evaluate(config, workdir, stack, pairs=pairs, loaded=loaded)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack, *,
                        pairs, loaded) -> TrainResult:
  # Nothing is written to `workdir` until the config, the model, the data, an existing checkpoint's config and the
  # workdir's lock have been checked: a rejected run leaves a workdir as it found it, and its errors are
  # `InputError`s (one line from the CLIs). config.json is written once the run is accepted.
  with errors.input_stage():
    validate_config(config)
    if os.path.isdir(workdir):
      workdir_lock.check_free(workdir)  # Before the model loads: another live run holds it.
    timing = {}
    t_start = time.time()
    loss_cfg = dict(config.loss)
    basis_init = config.basis.get("init", "zeros")

    # ---- Mesh.
    mesh = mesh_lib.mesh_from_config(config.mesh)
    logging.info("Mesh %s over %d devices (%d hosts).", dict(mesh.shape), mesh.size, jax.process_count())

    # ---- Model: abstract shapes first; nothing is allocated until the sharding is known.
    if loaded is not None:
      model, loaded_backbone = loaded
      model_cfg = model.config
    elif config.model.path:
      from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
      model, loaded_backbone = hf_import.from_pretrained(config.model.path, dtype=config.model.dtype,
                                                         weight_dtype=config.model.weight_dtype,
                                                         remat=config.model.remat)
      model_cfg = model.config
    else:
      model_cfg, loaded_backbone = model_config(config), None
    policy = build_policy(model_cfg, config.basis)
    tx, schedule = make_optimizer(config)
    dummy = jnp.zeros((1, 4), jnp.int32)
    abstract_params = jax.eval_shape(policy.init, jax.random.key(0), dummy)["params"]  # Boxed: logical axes.
    abstract_trainable, abstract_backbone = features.split_params(abstract_params)
    abstract_opt_state = jax.eval_shape(tx.init, abstract_trainable)

    # ---- Sharding: logical axis names -> mesh axes for the state, the backbone and the batches.
    params_shardings = mesh_lib.abstract_shardings(abstract_trainable, mesh)
    state_shardings = {"step": mesh_lib.replicated(mesh), "params": params_shardings,
                       "opt_state": mesh_lib.abstract_shardings(abstract_opt_state, mesh),
                       "rng": mesh_lib.replicated(mesh)}
    backbone_shardings = mesh_lib.abstract_shardings(abstract_backbone, mesh)

    # ---- Input: host arrays, the frozen feature pass (cached heads), a seekable iterator per host.
    train_pairs, eval_pairs = load_pairs(config) if pairs is None else (dict(pairs[0]), dict(pairs[1]))
    for split in (train_pairs, eval_pairs):
      if len(split["prompt"]):
        input_pipeline.check_pairs(split, policy.num_bases,
                                   need_ratings=config.loss.kind == "ratings" or basis_init == "ridge",
                                   vocab_size=model_cfg.vocab_size)
    if basis_init == "ridge":
      check_ridge_ratings(train_pairs)
    check_existing_checkpoint(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    stack.enter_context(workdir_lock.hold(workdir))  # Until this call returns (or the process ends).
  support = None
  if config.basis.get("vocab_support", 0):
    support = features.select_support([train_pairs["response_a"], train_pairs["response_b"]],
                                      [train_pairs["response_a_mask"], train_pairs["response_b_mask"]],
                                      config.basis.vocab_support, model_cfg.vocab_size)

  with mesh_lib.use_mesh(mesh):
    if loaded_backbone is not None:
      backbone = place(unboxed(loaded_backbone), backbone_shardings)
    else:
      backbone = place(random_backbone(unboxed(abstract_backbone), model_cfg, config.seed),
                       backbone_shardings)

    if config.train.cache_features:
      t0 = time.time()
      feature_fn = make_feature_fn(policy, mesh, backbone_shardings, support)
      features_dir = config.train.get("features_dir", "") or workdir
      os.makedirs(features_dir, exist_ok=True)
      features_file = os.path.join(features_dir,
                                   f"features-{_features_key(config, train_pairs, eval_pairs, support)}.npz")
      stored = _load_features(features_file)
      if stored is not None:  # A restarted job skips the frozen pass.
        logging.info("Reusing the cached features in %s.", features_file)
        train_pairs = {**train_pairs, **stored["train"]}
        eval_pairs = {**eval_pairs, **stored["eval"]}
      else:
        train_pairs = compute_features(feature_fn, backbone, train_pairs, mesh, config.train.feature_batch_size,
                                       desc="features (train)")
        if len(eval_pairs["prompt"]):
          eval_pairs = compute_features(feature_fn, backbone, eval_pairs, mesh, config.train.feature_batch_size,
                                        desc="features (eval)")
        if jax.process_index() == 0:
          _save_features(features_file, train_pairs, eval_pairs)
      timing["feature_pass_s"] = time.time() - t0
      logging.info("Cached features of %d + %d pairs in %.1f s.", len(train_pairs["response_a"]),
                   len(eval_pairs["response_a"]), timing["feature_pass_s"])
    logit_bias = None
    if basis_init == "ridge":  # From the cached feature pass's reference probabilities on the support.
      logit_bias = ridge_logit_bias(train_pairs, support, model_cfg.vocab_size, beta=config.loss.beta,
                                    rating_scale=config.loss.rating_scale, l2=config.basis.init_l2,
                                    features=config.basis.get("init_features", "pair_surprise"))
    # Only what the step reads goes to the devices.
    needed = {"labels"} if config.loss.kind == "dpo" else {"scores_a", "scores_b"}
    needed |= set(input_pipeline.TOKEN_FIELDS) if not config.train.cache_features else (
        {"response_a", "response_a_mask", "response_b", "response_b_mask"} | set(features.CACHED_FIELDS)
        | (set(features.SUPPORT_FIELDS) if support is not None else set()))
    train_pairs = {k: v for k, v in train_pairs.items() if k in needed}
    # Held-out accuracy counts the pairs' labels (ties masked) when they have them, whichever the loss.
    eval_pairs = {k: v for k, v in eval_pairs.items() if k in needed | {"labels"}}
    if len(eval_pairs["response_a"]):
      eval_pairs = pad_eval_pairs(eval_pairs, config.train.eval_batch_size)
    train_iter = input_pipeline.PairIterator(train_pairs, config.train.batch_size, seed=config.seed)
    accum = config.train.grad_accum_steps

    def to_micro_batches(host_batch):  # [b, ...] -> [A, b / A, ...] global arrays, micro-batches on axis 0.
      local = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in host_batch.items()}
      return mesh_lib.shard_batch(local, mesh, batch_dim=1)

    batch_shardings = {k: mesh_lib.batch_sharding(mesh, v.ndim + 1, batch_dim=1) for k, v in train_pairs.items()}

    # ---- Update step: jitted with shardings; the state is donated.
    step_fn = jax.jit(functools.partial(train_step, policy, tx, schedule, loss_cfg, support=support),
                      in_shardings=(state_shardings, batch_shardings, backbone_shardings),
                      out_shardings=(state_shardings, mesh_lib.replicated(mesh)), donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(eval_step, policy, loss_cfg, support=support),
                      in_shardings=(params_shardings, backbone_shardings,
                                    {k: mesh_lib.batch_sharding(mesh, v.ndim) for k, v in eval_pairs.items()}),
                      out_shardings=mesh_lib.replicated(mesh))

    def evaluate(params):
      num_eval = len(eval_pairs["response_a"])
      if not num_eval:
        return {}
      size, sums = config.train.eval_batch_size, None
      per_host = size // jax.process_count()
      for start in range(0, num_eval, size):  # Every pair: the last batch is padded (`pad_eval_pairs`).
        lo = start + jax.process_index() * per_host
        batch = mesh_lib.shard_batch({k: v[lo:lo + per_host] for k, v in eval_pairs.items()}, mesh)
        out = eval_fn(params, backbone, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      return jax.device_get(eval_metrics(sums))

    # ---- Checkpoint: resume from the newest good step, else initialize (sharded at creation).
    interval = config.checkpoint.every_steps or max(config.train.num_steps, 1)  # 0: only the last step.
    ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
                                       save_interval_steps=interval, async_save=config.checkpoint.async_save)
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  unboxed({"step": jax.ShapeDtypeStruct((), jnp.int32),
                                           "params": abstract_trainable, "opt_state": abstract_opt_state,
                                           "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}),
                                  state_shardings)
    # Another config's checkpoint (other K, other shapes) raises here, naming the field, before anything is read.
    restored = ckpt.restore_latest(abstract_state, check_data=functools.partial(check_resume, config, workdir))
    if jax.process_index() == 0:  # The run is accepted: record what it runs (atomically).
      files.write_text_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))
      if config.data.source in sources.BUILDER_SOURCES or jsonl.is_jsonl(config.data.source):  # What basis k means.
        files.write_text_atomic(os.path.join(workdir, "basis.json"),
                                json.dumps(sources.basis_metadata(config), indent=2))
    if restored is not None:
      start_step, state, data_state = restored
      train_iter.set_state(data_state["iterator"])
      logging.info("Resumed from step %d (iterator %s).", start_step, data_state["iterator"])
    else:
      def init_state(key, logit_bias):
        params = init_trainable(policy, key)
        if logit_bias is not None:
          params["heads"]["c"] = logit_bias.astype(params["heads"]["c"].dtype)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                "rng": jax.random.key_data(jax.random.fold_in(key, 1))}
      state = jax.jit(init_state, out_shardings=state_shardings)(jax.random.key(config.seed), logit_bias)
      start_step = 0
    timing["setup_s"] = time.time() - t_start

    # ---- Loop.
    writer = metrics_lib.MetricsWriter(workdir, resume_step=start_step, tensorboard=config.train.tensorboard)
    num_steps = config.train.num_steps
    train_metrics, final_eval, preempted = {}, {}, False
    step, t_log, step_log, t_first = start_step, time.time(), start_step, None
    with _StopSignal() as stop:
      for step in progress.track(range(start_step + 1, num_steps + 1), desc="train", unit="step",
                                 total=num_steps - start_step):
        host_batch = next(train_iter)
        state, metrics = step_fn(state, to_micro_batches(host_batch), backbone)
        finite = metrics.pop("finite")
        if t_first is None:  # The first step pays for the compile: time the rest from here.
          jax.block_until_ready(state)
          t_first = t_log = time.time()
          timing["first_step_s"] = t_first - t_start - timing["setup_s"]
          step_log = step
        log_now = step % config.train.log_every_steps == 0 or step == num_steps
        if (config.train.nan_check or log_now) and not bool(jax.device_get(finite)):
          ckpt.wait()  # The last good checkpoint is committed before the run stops.
          error = _nonfinite_error(workdir, step, state, host_batch, jax.device_get(metrics), ckpt.latest_step())
          ckpt.close()
          writer.close()
          raise error
        if log_now:
          train_metrics = jax.device_get(metrics)
          now = time.time()
          if step > step_log:  # Throughput since the last log (the compile excluded).
            steps_per_s = (step - step_log) / (now - t_log)
            train_metrics.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.train.batch_size)
          writer.write(step, train_metrics)
          t_log, step_log = now, step
        if config.train.eval_every_steps and step % config.train.eval_every_steps == 0 and step != num_steps:
          writer.write(step, evaluate(state["params"]), kind="eval")
        stop_now = stop.received or (jax.process_count() > 1 and ckpt.manager.reached_preemption(step))
        data_state = {"iterator": train_iter.get_state(), **resume_fields(config)}
        ckpt.save(step, state, data_state, force=stop_now or step == num_steps)
        if stop_now:
          preempted = True
          logging.warning("Stopped at step %d after a checkpoint (preemption).", step)
          break
    if num_steps == 0 and restored is None:  # No update: the checkpoint holds the closed-form initialization.
      ckpt.save(0, state, {"iterator": train_iter.get_state(), **resume_fields(config)}, force=True)
    jax.block_until_ready(state)
    if t_first is not None and step > start_step + 1:
      timing["loop_step_s"] = (time.time() - t_first) / (step - start_step - 1)
    final_step = int(jax.device_get(state["step"]))
    if not preempted:
      final_eval = evaluate(state["params"])
      if final_eval and (start_step < num_steps or restored is None):  # A finished run's restart: not twice.
        writer.write(final_step, final_eval, kind="eval")
    ckpt.wait()
    ckpt.close()
    writer.close()
  timing["total_s"] = time.time() - t_start
  return TrainResult(state=state, step=final_step, train_metrics=train_metrics, eval_metrics=final_eval,
                     preempted=preempted, timing=timing)
