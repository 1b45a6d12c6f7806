"""Offline basis training: losses, input, config checks, sharded == unsharded, checkpoints, kill/resume, learning."""

from __future__ import annotations

import gc
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import train_basis_tiny
from spectral_soup.models import build
from spectral_soup.offline import checkpoint as checkpoint_lib
from spectral_soup.offline import feature_cache
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import losses
from spectral_soup.offline import mesh as mesh_lib
from spectral_soup.offline import metrics as metrics_lib
from spectral_soup.offline import pairs as pairs_lib
from spectral_soup.offline import resume
from spectral_soup.offline import ridge_init
from spectral_soup.offline import steps as steps_lib
from spectral_soup.offline import config_checks
from spectral_soup.offline import train
from spectral_soup.utils import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _softplus_neg(x):  # -log sigmoid(x)
  return float(np.logaddexp(0.0, -x))


# ----------------------------------------------------------------------------------------------------------------
# Losses.

# Two pairs, two bases. Log-ratios (basis - ref): basis 0: a [1, 0], b [0, -1]; basis 1: a [-1, -1], b [2, 0].
REF_A, REF_B = np.array([-10.0, -5.0]), np.array([-12.0, -6.0])
BASIS_A = np.array([[-9.0, -5.0], [-11.0, -6.0]])
BASIS_B = np.array([[-12.0, -7.0], [-10.0, -6.0]])
LABELS = np.array([[1, 0], [-1, 1]], np.int8)  # Pair 0: a wins for basis 0, b for basis 1; pair 1: tie, a wins.
BETA = 0.5


@pytest.mark.parametrize("jit", [False, True])
def test_dpo_loss_hand_computed(jit):
  fn = lambda *a: losses.dpo_loss(*a, beta=BETA)
  fn = jax.jit(fn) if jit else fn
  loss, m = fn(REF_A, REF_B, BASIS_A, BASIS_B, LABELS)
  # Margins (a - b): basis 0: [1, 1]; basis 1: [-3, -1]. Signed logits beta * s * margin:
  # basis 0: pair 0 -> +0.5 (pair 1 is a tie: masked); basis 1: pair 0 (b wins) -> +1.5, pair 1 (a wins) -> -0.5.
  loss_0 = _softplus_neg(0.5)
  loss_1 = (_softplus_neg(1.5) + _softplus_neg(-0.5)) / 2
  np.testing.assert_allclose(m["loss"], [loss_0, loss_1], rtol=1e-6)
  np.testing.assert_allclose(loss, (loss_0 + loss_1) / 2, rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5309110576307681, rtol=1e-6)
  np.testing.assert_array_equal(m["count"], [1, 2])
  np.testing.assert_allclose(m["accuracy"], [1.0, 0.5])
  np.testing.assert_allclose(m["margin"], [0.5, (1.5 - 0.5) / 2])
  # KL estimate: mean log-ratio over both responses of every pair (masked labels included).
  np.testing.assert_allclose(m["kl"], [(1 + 0 + 0 - 1) / 4, (-1 - 1 + 2 + 0) / 4], atol=1e-7)


def test_dpo_ties_masked_and_label_smoothing():
  all_ties = np.full_like(LABELS, -1)
  loss, m = losses.dpo_loss(REF_A, REF_B, BASIS_A, BASIS_B, all_ties, beta=BETA)
  assert float(loss) == 0.0 and np.all(np.asarray(m["count"]) == 0)
  # Changing a masked pair's log-probs changes nothing.
  moved = BASIS_A.copy()
  moved[0, 1] += 7.0
  np.testing.assert_allclose(
      losses.dpo_loss(REF_A, REF_B, moved, BASIS_B, LABELS, beta=BETA)[1]["loss"][0], _softplus_neg(0.5), rtol=1e-6)
  _, m = losses.dpo_loss(REF_A, REF_B, BASIS_A, BASIS_B, LABELS, beta=BETA, label_smoothing=0.1)
  np.testing.assert_allclose(m["loss"][0], 0.9 * _softplus_neg(0.5) + 0.1 * _softplus_neg(-0.5), rtol=1e-6)


def test_ratings_loss_hand_computed():
  ratings_a = np.array([[3.0, np.nan], [1.0, 2.0]], np.float32)
  ratings_b = np.array([[1.0, 0.0], [1.0, 4.0]], np.float32)
  _, m = losses.ratings_loss(REF_A, REF_B, BASIS_A, BASIS_B, ratings_a, ratings_b, beta=BETA, rating_scale=0.25)
  # basis 0: predictions beta * margin = [0.5, 0.5], targets 0.25 * [2, 0]; basis 1: pair 0 missing, pair 1:
  # prediction -0.5, target 0.25 * (2 - 4) = -0.5.
  np.testing.assert_allclose(m["loss"], [((0.5 - 0.5)**2 + 0.5**2) / 2, 0.0], atol=1e-7)
  np.testing.assert_array_equal(m["count"], [2, 1])
  np.testing.assert_allclose(m["accuracy"], [1.0, 1.0])  # Over ranked pairs: basis 0's second pair is a tie.
  np.testing.assert_allclose(m["margin"], [0.5, 0.5])


def test_loss_sums_add_up_over_micro_batches():
  """Accumulation is exact: micro-batch losses normalized by the whole batch's counts sum to the batch loss."""
  rng = np.random.default_rng(0)
  k, b = 3, 8
  ref_a, ref_b = rng.normal(size=b), rng.normal(size=b)
  basis_a, basis_b = rng.normal(size=(k, b)), rng.normal(size=(k, b))
  labels = rng.integers(-1, 2, size=(b, k)).astype(np.int8)

  @jax.jit
  def both(ref_a, ref_b, basis_a, basis_b, labels):
    full = losses.dpo_loss(ref_a, ref_b, basis_a, basis_b, labels, beta=0.3)
    counts = jnp.sum(labels >= 0, axis=0).astype(jnp.float32)
    halves = [
        losses.dpo_terms(ref_a[s], ref_b[s], basis_a[:, s], basis_b[:, s], labels[s], beta=0.3)
        for s in (slice(0, 3), slice(3, b))
    ]
    summed = jax.tree.map(lambda x, y: x + y, *halves)
    accumulated = sum(losses.loss_from_sums(h, counts) for h in halves)
    return full, (accumulated, losses.metrics_from_sums(summed))

  full, accumulated = both(ref_a, ref_b, basis_a, basis_b, labels)
  chex.assert_trees_all_close(accumulated, full, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Input.


def test_iterator_is_deterministic_seekable_and_split_per_host():
  pairs = input_pipeline.synthetic_pairs(40, num_bases=2, vocab_size=16, prompt_len=3, response_len=5, seed=0)
  pairs["id"] = np.arange(40)  # Any extra field travels along.
  it = input_pipeline.PairIterator(pairs, 8, seed=3, process_index=0, process_count=1)
  seen = [next(it)["id"] for _ in range(7)]  # 5 batches per epoch: crosses into epoch 1.
  resumed = input_pipeline.PairIterator(pairs, 8, seed=3, process_index=0, process_count=1)
  it2 = input_pipeline.PairIterator(pairs, 8, seed=3, process_index=0, process_count=1)
  for _ in range(3):
    next(it2)
  resumed.set_state(json.loads(json.dumps(it2.get_state())))
  for expected in seen[3:]:
    np.testing.assert_array_equal(next(resumed)["id"], expected)
  # Every example once per epoch; epochs differ in order.
  rows = lambda batch: set(batch.tolist())
  epoch0 = set().union(*[rows(b) for b in seen[:5]])
  assert epoch0 == set(range(40)) and not all(np.array_equal(a, b) for a, b in zip(seen[:2], seen[5:7]))
  # Two hosts together see exactly the global batch.
  hosts = [input_pipeline.PairIterator(pairs, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
  for expected in seen[:3]:
    parts = [next(h)["id"] for h in hosts]
    assert all(len(p) == 4 for p in parts) and rows(np.concatenate(parts)) == rows(expected)


def test_a_damaged_metrics_file_is_named_with_its_line(tmp_path):
  """A bad line raised a bare JSONDecodeError; a line holding a number, an AttributeError in the plots."""
  path = tmp_path / metrics_lib.FILENAME
  path.write_text('{"kind": "train", "step": 1}\n{"kind": "tra\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
    metrics_lib.read_metrics(str(tmp_path))
  path.write_text('{"kind": "train", "step": 1}\n7\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: holds int '7'; expected a metrics record"):
    metrics_lib.read_metrics(str(tmp_path))
  path.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "st')  # Killed mid-line: skipped.
  assert metrics_lib.read_metrics(str(tmp_path)) == [{"kind": "train", "step": 1}]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({
            "batch_size": -4
        }, r"batch_size=-4: expected an integer >= 1"),  # Yielded 6-row batches.
        ({
            "batch_size": 0
        }, r"batch_size=0: expected an integer >= 1"),  # ZeroDivisionError.
        ({
            "process_index": 2
        }, r"process_index=2: expected an integer in \[0, 2\)"),  # The next batch's rows.
        ({
            "process_index": -1
        }, r"process_index=-1"),  # Empty batches.
        ({
            "process_count": 0,
            "process_index": 0
        }, r"process_count=0: expected an integer >= 1"),
        ({
            "arrays": {}
        }, r"arrays holds no field"),  # StopIteration.
        ({
            "arrays": {
                "a": np.zeros(10),
                "b": np.zeros(6)
            }
        }, r"different numbers of rows \{'a': 10, 'b': 6\}"),
    ])
def test_iterator_refuses_bad_arguments(kwargs, message):
  args = {"arrays": {"a": np.zeros(10)}, "batch_size": 2, "seed": 0, "process_index": 0, "process_count": 2, **kwargs}
  with pytest.raises(ValueError, match=message):
    input_pipeline.PairIterator(args.pop("arrays"), args.pop("batch_size"), **args)
  it = input_pipeline.PairIterator({"a": np.zeros(10)}, 2, seed=0, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="is invalid: expected integers epoch"):  # Truncated to epoch 1.
    it.set_state({"epoch": 1.7, "position": "1"})
  it.set_state({"epoch": np.int64(1), "position": np.asarray(2)})
  assert it.get_state() == {"epoch": 1, "position": 2}


# ----------------------------------------------------------------------------------------------------------------
# Config checks: fail fast, naming the field.


def _config(**flat):
  config = train_basis_tiny.get_config()
  config.update_from_flattened_dict(flat)
  return config


@pytest.mark.parametrize(
    "flat, field",
    [
        ({
            "optim.learning_rate": -1e-3
        }, "optim.learning_rate"),
        ({
            "seed": 2**63
        }, "seed"),  # jax.random.key's seed is 64-bit signed (it failed after the feature pass).
        ({
            "train.batch_size": 36
        }, "train.batch_size"),  # 36 pairs over data = 8.
        ({
            "mesh.data": 3
        }, "mesh.data"),  # 3 does not divide 8 devices.
        ({
            "mesh.data": 2,
            "mesh.fsdp": 1,
            "mesh.model": 2
        }, "mesh.data"),  # Uses 4 of 8 devices.
        ({
            "basis.kind": "adapters"
        }, "basis.kind"),
        ({
            "basis.head_rank": 0
        }, "basis.head_rank"),  # Rank 0 needs basis.logit_bias=True.
        ({
            "basis.kind": "lora"
        }, "train.cache_features"),  # Cached features need head bases.
        ({
            "train.grad_accum_steps": 3
        }, "train.grad_accum_steps"),
        ({
            "loss.kind": "hinge"
        }, "loss.kind"),
        ({
            "data.tokenizer": "/nonexistent/tokenizer"
        }, "data.tokenizer"),  # Synthetic pairs read none: load_basis failed after the run.
        ({
            "model.num_kv_heads": 3
        }, "model.num_kv_heads"),  # Does not divide num_heads = 4.
        ({
            "basis.init": "ridge"
        }, "basis.init"),  # Ridge initializes logit vectors: needs basis.logit_bias=True.
        ({
            "basis.init": "normal"
        }, "basis.init"),
        ({
            "basis.init": "ridge",
            "basis.logit_bias": True,
            "basis.vocab_support": 40,
            "train.cache_features": True,
            "basis.init_features": "logits"
        }, "basis.init_features"),
        ({
            "train.num_steps": 0
        }, "train.num_steps"),  # No update is a basis only with basis.init='ridge'.
    ])
def test_bad_config_names_the_field(flat, field):
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match=f"config\\.{field}="):
    config_checks.validate_config(_config(**flat))


def test_a_model_axis_across_hosts_is_refused_before_anything_loads():
  """Each host reads its own 1/hosts of every batch, which needs its own batch shards: a model axis spanning hosts
  (2 hosts x 1 device, model=2) passed the check, then both processes failed at the first batch and one hung."""
  config = _config(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.model": 2, "mesh.num_devices": 2})
  config_checks.validate_config(config, num_devices=2, num_hosts=1)  # One host: the model axis is local.
  with pytest.raises(
      ValueError, match=r"config\.mesh\.model=2 is invalid: expected an axis within one host: data x "
      r"fsdp = 1 x 1 = 1 is not a multiple of the 2 hosts"):
    config_checks.validate_config(config, num_devices=2, num_hosts=2)
  config = _config(**{"mesh.data": 2, "mesh.fsdp": 1, "mesh.model": 4})  # 4 hosts x 2 devices: model spans 2.
  with pytest.raises(ValueError, match=r"config\.mesh\.model=4 .* use a model axis of at most 2 devices"):
    config_checks.validate_config(config, num_devices=8, num_hosts=4)
  config_checks.validate_config(_config(**{"mesh.data": 4, "mesh.model": 2}), num_devices=8, num_hosts=4)


def test_tiny_config_is_valid_and_mesh_fills_the_rest():
  config_checks.validate_config(train_basis_tiny.get_config())
  assert mesh_lib.resolve_mesh_shape(-1, 1, 2, 8) == (4, 1, 2)
  assert dict(mesh_lib.make_mesh(2, -1, 2).shape) == {"data": 2, "fsdp": 2, "model": 2}


# ----------------------------------------------------------------------------------------------------------------
# Sharded == unsharded (and cached features == full forward, accumulation == one batch).

EQUALITY = {
    "train.tensorboard": False,
    "train.num_steps": 4,
    "train.log_every_steps": 1,
    "data.num_train_pairs": 128,
    "data.num_eval_pairs": 0,
    "checkpoint.every_steps": 0,
    "checkpoint.async_save": False,
    "optim.warmup_steps": 1,
    "optim.learning_rate": 1e-3
}
# Adam turns gradients into roughly +-lr updates, so a coordinate whose gradient is near zero turns float rounding
# into an update difference of up to lr: the learning rate bounds how closely two correct runs can agree.


def _train(workdir, **flat):
  result = train.train_and_evaluate(_config(**{**EQUALITY, **flat}), str(workdir))
  return result.train_metrics, jax.device_get(result.state["params"])


def test_without_held_out_pairs_no_eval_record_is_written(tmp_path):
  """data.num_eval_pairs=0 with eval_every_steps: metrics.jsonl got {"step": 2, "kind": "eval"} records with no
  metric in them."""
  _train(tmp_path / "run", **{"train.eval_every_steps": 2})
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records if r.get("kind") == "train"] == [1, 2, 3, 4]
  assert not [r for r in records if r.get("kind") == "eval"], records


@pytest.mark.parametrize(
    "kind, reference, sharded",
    [
        # LoRA: the full (K+1) * 2B-row forward, 1 device vs data x model = 4 x 2.
        ("lora", {
            "train.cache_features": False
        }, {
            "train.cache_features": False,
            "mesh.data": 4,
            "mesh.model": 2
        }),
        # Heads, ratings loss: full forward on 1 device vs cached features on data x fsdp x model = 2 x 2 x 2 with
        # 2 micro-batches per step.
        ("heads", {
            "train.cache_features": False,
            "loss.kind": "ratings"
        }, {
            "train.cache_features": True,
            "mesh.data": 2,
            "mesh.fsdp": 2,
            "mesh.model": 2,
            "train.grad_accum_steps": 2,
            "loss.kind": "ratings"
        }),
        # Heads on a vocabulary support covering every token: the support path is exact (no [.., V] logits in a step).
        ("heads", {
            "train.cache_features": False
        }, {
            "train.cache_features": True,
            "basis.vocab_support": 1_000,
            "mesh.data": 4,
            "mesh.model": 2
        }),
        # Bias-only bases (rank 0 + logit bias), full forward on 1 device vs the support path on data x model.
        ("heads", {
            "train.cache_features": False,
            "basis.head_rank": 0,
            "basis.logit_bias": True
        }, {
            "train.cache_features": True,
            "basis.vocab_support": 1_000,
            "mesh.data": 4,
            "mesh.model": 2,
            "basis.head_rank": 0,
            "basis.logit_bias": True
        }),
    ])
def test_sharded_step_matches_unsharded(tmp_path, kind, reference, sharded):
  """Same losses and parameters after 4 steps (also: cached features == full forward, accumulation == batch)."""
  ref_metrics, ref_params = _train(tmp_path / "one", **{"basis.kind": kind, "mesh.num_devices": 1, **reference})
  metrics, params = _train(tmp_path / "mesh", **{"basis.kind": kind, **sharded})
  assert ref_metrics["grad_norm"] > 0
  np.testing.assert_allclose(metrics["total_loss"], ref_metrics["total_loss"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(params, ref_params, rtol=1e-5, atol=1e-5)
  b = (params["heads"].get("b", params["heads"].get("c")) if kind == "heads" else params["lora"]["q_proj_b"])
  assert np.abs(b).max() > 1e-3  # B starts at zero: the bases did move (by much more than the tolerance).


def test_evaluation_counts_every_held_out_pair(tmp_path):
  """37 held-out pairs in batches of 8: the padded last batch adds its 5 pairs and nothing else (same metrics as
  batches of 1, which need no padding)."""
  flat = {
      **EQUALITY, "mesh.num_devices": 1,
      "data.num_eval_pairs": 37,
      "train.num_steps": 2,
      "train.eval_every_steps": 0
  }
  padded = train.train_and_evaluate(_config(**flat, **{"train.eval_batch_size": 8}), str(tmp_path / "eight"))
  exact = train.train_and_evaluate(_config(**flat, **{"train.eval_batch_size": 1}), str(tmp_path / "one"))
  _, held_out = pairs_lib.load_pairs(_config(**flat))
  np.testing.assert_array_equal(padded.eval_metrics["count"], (held_out["labels"] >= 0).sum(0))
  for name in ("loss", "accuracy", "margin", "kl", "count", "cross_accuracy"):
    np.testing.assert_allclose(padded.eval_metrics[name], exact.eval_metrics[name], rtol=1e-4, atol=1e-5, err_msg=name)
  rows = steps_lib.pad_eval_pairs(held_out, 8)
  assert len(rows["real"]) == 40 and rows["real"].sum() == 37 and np.all(rows["labels"][37:] == -1)


def test_ridge_logit_bias_recovers_token_rewards():
  """Ratings that are a logit-bias policy's first-order implicit reward, sum_t w_k . (onehot(y_t) - p_ref(s_t)):
  the closed-form initialization is rating_scale / beta * w_k on the support (ridge shrinks it a little), zero
  outside, whether fitted on the pairs' differences or on each response (a constant offset of the ratings does not
  matter); the pairwise fit has no intercept (pairs in chosen / rejected order); missing ratings are dropped per
  basis, and a basis with no rated pair is refused."""
  rng = np.random.default_rng(0)
  n, length, vocab = 400, 6, 30
  support = np.arange(2, 22)
  w = rng.normal(size=(2, vocab)) * np.isin(np.arange(vocab), support)  # [K, V], zero outside the support.
  pairs = {}
  for side in "ab":
    tokens = rng.choice(support, (n, length)).astype(np.int32)
    mask = np.arange(length)[None] < rng.integers(1, length + 1, (n, 1))
    probs = rng.dirichlet(np.ones(len(support)), (n, length)) * 0.9  # 10% of the mass outside the support.
    surprise = (w[:, tokens] - np.einsum("nrs,ks->knr", probs, w[:, support])) * mask
    pairs[f"response_{side}"], pairs[f"response_{side}_mask"] = tokens, mask
    pairs[f"support_probs_{side}"], pairs[f"scores_{side}"] = probs, surprise.sum(-1).T
  pairs["scores_b"][:50, 1] = np.nan
  for features in ("pair_surprise", "surprise"):  # Pairs' differences, or each response (plus a constant) alone.
    for side in "ab":
      pairs[f"scores_{side}"] += 0.7 * (features == "surprise")
    c = ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=1e-3, features=features)
    assert c.shape == (2, vocab) and c.dtype == np.float32
    np.testing.assert_allclose(c[:, support], 4.0 * w[:, support], atol=5e-3)
    assert np.all(c[:, np.setdiff1d(np.arange(vocab), support)] == 0)
  # Chosen / rejected order (a is the better response of every pair, as jsonl chosen/rejected rows give them): the
  # pairwise fit has no intercept, so the mean difference (most of the signal here) stays in (it was centered out).
  ordered = {k: v.copy() for k, v in pairs.items()}
  for side in "ab":
    ordered[f"scores_{side}"] -= 0.7
  better_b = ordered["scores_b"][:, 0] > ordered["scores_a"][:, 0]
  for name in ("response", "response_{}_mask", "support_probs", "scores"):
    a, b = (name.format(s) if "{}" in name else f"{name}_{s}" for s in "ab")
    ordered[a][better_b], ordered[b][better_b] = ordered[b][better_b], ordered[a][better_b].copy()
  assert np.all(ordered["scores_a"][:, 0] >= ordered["scores_b"][:, 0])
  ordered["scores_a"][:, 0] += rng.normal(size=n)  # Noisy ratings: the fit is now the ridge solution, not w.
  c = ridge_init.ridge_logit_bias(ordered, support, vocab, beta=0.5, rating_scale=2.0, l2=3.0, features="pair_surprise")
  surprise = {}  # [n, S]: sum over the response of onehot(y_t) - p_ref(. | s_t), on the support.
  for side in "ab":
    onehot = (ordered[f"response_{side}"][..., None] == support).astype(np.float64)
    surprise[side] = np.einsum("nrs,nr->ns", onehot - ordered[f"support_probs_{side}"],
                               ordered[f"response_{side}_mask"].astype(np.float64))
  diff, y = surprise["a"] - surprise["b"], ordered["scores_a"][:, 0] - ordered["scores_b"][:, 0]
  no_intercept = 4.0 * np.linalg.solve(diff.T @ diff + 3.0 * np.eye(len(support)), diff.T @ y)
  np.testing.assert_allclose(c[0, support], no_intercept, rtol=1e-4, atol=1e-5)
  fit = lambda **kw: ridge_init.ridge_logit_bias(**{
      "pairs": pairs,
      "support": support,
      "vocab_size": vocab,
      "beta": 0.5,
      "rating_scale": 2.0,
      "l2": 1e-3,
      **kw
  })
  nan_probs = {**pairs, "support_probs_a": np.where(np.arange(n)[:, None, None] == 3, np.nan, pairs["support_probs_a"])}
  for kw, message in (
      (dict(support=np.r_[-1, support[1:]]), r"support must be distinct token ids in \[0, 30\)"),  # Wrote column V-1.
      (dict(support=np.r_[support[:1], support[:-1]]), r"and repeats"),
      (dict(beta=0.0), r"beta=0.0: expected a finite number > 0"),  # A ZeroDivisionError.
      (dict(beta=float("nan")), r"beta=nan"),
      (dict(rating_scale=-1.0), r"rating_scale=-1.0"),
      (dict(pairs=nan_probs), r"support_probs_a must be finite .* with non-finite entries"),
  ):
    with pytest.raises(ValueError, match=message):
      fit(**kw)
  pairs["scores_a"][:, 1] = np.nan
  with pytest.raises(ValueError, match="fits basis 1 on pairs with both responses rated"):
    ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=1e-3)


def test_ridge_logit_bias_on_counts_is_a_bag_of_words_reward_model():
  """features="counts": ratings that are bag-of-words rewards sum_t w_k(y_t) (plus a constant per basis) give back
  rating_scale / beta * w_k on the support (up to ridge shrinkage); at any penalty it is PAD's token-reward table
  (`baselines.pad.fit_token_rewards`, solved in the dual) times rating_scale / beta; missing ratings are dropped per
  basis and no reference probabilities are needed."""
  from spectral_soup.baselines import pad as pad_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  n, length, vocab = 300, 6, 30
  support = np.arange(2, 22)
  w = rng.normal(size=(2, vocab)) * np.isin(np.arange(vocab), support)
  pairs = {}
  for side in "ab":
    tokens = rng.choice(np.arange(vocab), (n, length)).astype(np.int32)  # Some tokens outside the support.
    mask = np.arange(length)[None] < rng.integers(1, length + 1, (n, 1))
    inside = np.isin(tokens, support) & mask
    pairs[f"response_{side}"], pairs[f"response_{side}_mask"] = tokens, mask
    pairs[f"scores_{side}"] = (w[:, tokens] * inside).sum(-1).T + np.array([0.3, -1.0])
  c = ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=1e-3, features="counts")
  assert c.shape == (2, vocab) and c.dtype == np.float32
  np.testing.assert_allclose(c[:, support], 4.0 * w[:, support], atol=5e-3)
  assert np.all(c[:, np.setdiff1d(np.arange(vocab), support)] == 0)
  counts = pad_lib.token_counts([pairs["response_a"], pairs["response_b"]],
                                [pairs["response_a_mask"], pairs["response_b_mask"]], support)
  scores = np.concatenate([pairs["scores_a"], pairs["scores_b"]]) + rng.normal(size=(2 * n, 2))
  pairs["scores_a"], pairs["scores_b"] = scores[:n], scores[n:]
  table = pad_lib.fit_token_rewards(counts, scores, support, vocab, l2=10.0)
  c = ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=10.0, features="counts")
  np.testing.assert_allclose(c, 4.0 * table, rtol=1e-4, atol=1e-5)
  pairs["scores_b"][:40, 1] = np.nan  # Basis 1 is fitted on the other 560 responses.
  keep = np.concatenate([np.ones(n, bool), np.arange(n) >= 40])
  table_1 = pad_lib.fit_token_rewards(counts[keep], scores[keep][:, 1:], support, vocab, l2=10.0)
  c = ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=10.0, features="counts")
  np.testing.assert_allclose(c[1], 4.0 * table_1[0], rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="features='logits'"):
    ridge_init.ridge_logit_bias(pairs, support, vocab, beta=0.5, rating_scale=2.0, l2=10.0, features="logits")


def test_ridge_initialization_with_zero_steps_is_the_basis(tmp_path):
  """basis.init='ridge' and train.num_steps=0: the bases are `ridge_logit_bias` of the training pairs, saved as
  step 0 (a restart restores them); with steps, training starts there."""
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  flat = {
      "basis.head_rank": 0,
      "basis.logit_bias": True,
      "basis.init": "ridge",
      "loss.kind": "ratings",
      "train.num_steps": 0,
      "mesh.num_devices": 1,
      "data.num_eval_pairs": 64,
      "train.cache_features": True,
      "basis.vocab_support": 40
  }
  config = _config(**{**EQUALITY, **flat})
  result = train.train_and_evaluate(config, str(tmp_path))
  params = jax.device_get(result.state["params"])
  assert result.step == 0 and result.eval_metrics["accuracy"].shape == (config.basis.num_bases,)
  # A killed feature pass's partial file of this run's features is removed at the restart; another key's is kept.
  (cached,) = glob.glob(str(tmp_path / "features-*.npz"))
  partial, other = cached + ".tmp-4242.npz", str(tmp_path / "features-0123456789abcdef.npz.tmp-4242.npz")
  for name in (partial, other):
    with open(name, "wb") as f:
      f.write(b"PK")
  restarted = train.train_and_evaluate(config, str(tmp_path))
  chex.assert_trees_all_equal(jax.device_get(restarted.state["params"]), params)
  assert not os.path.exists(partial) and os.path.exists(other)
  os.remove(other)
  with pytest.raises(errors.InputError, match=r"config\.basis\.init_l2=1\.0 differs"):
    train.train_and_evaluate(_config(**{**EQUALITY, **flat, "basis.init_l2": 1.0}), str(tmp_path))
  pairs, _ = pairs_lib.load_pairs(config)
  support = features.select_support([pairs["response_a"], pairs["response_b"]],
                                    [pairs["response_a_mask"], pairs["response_b_mask"]], 40, config.model.vocab_size)
  pairs.update(feature_cache.load_features(glob.glob(str(tmp_path / "features-*.npz"))[0])["train"])  # The run's pass.
  expected = ridge_init.ridge_logit_bias(pairs, support, config.model.vocab_size, beta=config.loss.beta,
                                         rating_scale=config.loss.rating_scale, l2=config.basis.init_l2)
  assert np.abs(expected).max() > 1e-2  # Not the zeros of the default initialization.
  np.testing.assert_allclose(params["heads"]["c"], expected, rtol=1e-5, atol=1e-6)
  _, stepped = _train(tmp_path / "stepped", **{
      **flat, "train.num_steps": 1,
      "optim.learning_rate": 0.0,
      "optim.warmup_steps": 0
  })
  np.testing.assert_allclose(stepped["heads"]["c"], expected, rtol=1e-5, atol=1e-6)


def test_resume_refuses_a_checkpoint_made_before_init_features_with_another_fit():
  """Checkpoints written before basis.init_features existed hold pairwise-surprise bases: a config asking for
  another fit is refused, naming the field; the pairwise fit resumes."""
  flat = {"basis.head_rank": 0, "basis.logit_bias": True, "basis.init": "ridge", "basis.vocab_support": 40}
  config = _config(**{**flat, "basis.init_features": "surprise"})
  saved = resume.resume_fields(config)
  del saved["basis.init_features"]
  with pytest.raises(ValueError, match=r"config\.basis\.init_features='surprise' differs from 'pair_surprise'"):
    resume.check_resume(config, "wd", 0, saved)
  resume.check_resume(_config(**{**flat, "basis.init_features": "pair_surprise"}), "wd", 0, saved)


def test_pairs_fingerprint_names_other_pairs():
  from spectral_soup.offline import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  train = {"prompt": np.arange(6, dtype=np.int32).reshape(2, 3), "labels": np.array([[1], [0]], np.int8)}
  same = pairs_lib.fingerprint(train, {})
  assert same == pairs_lib.fingerprint({k: v.copy() for k, v in train.items()}, {})
  assert same != pairs_lib.fingerprint({**train, "labels": np.array([[0], [1]], np.int8)}, {})
  assert same != pairs_lib.fingerprint({}, train)  # The same arrays as held-out pairs.
  config = _config()
  saved = {**resume.resume_fields(config), "pairs_fingerprint": same}
  resume.check_resume(config, "wd", 0, saved, pairs_fingerprint=same)
  resume.check_resume(config, "wd", 0, saved)  # Before the pairs are read: not checked.
  with pytest.raises(ValueError, match=r"pairs differ from those the checkpoint of step 0 in wd was trained on"):
    resume.check_resume(config, "wd", 0, saved, pairs_fingerprint="other")


def test_weights_fingerprint_names_another_backbone():
  backbone = {"layers": {"w": np.arange(20_000, dtype=np.float32).reshape(100, 200)}, "embed": np.ones((7, 3))}
  same = resume.weights_fingerprint(backbone)
  assert same == resume.weights_fingerprint(jax.tree.map(np.copy, backbone))
  other = jax.tree.map(np.copy, backbone)
  other["layers"]["w"] = other["layers"]["w"] + 1.0  # Replaced weights change every element.
  assert same != resume.weights_fingerprint(other)
  config = _config()
  saved = {**resume.resume_fields(config), "backbone_fingerprint": same}
  resume.check_resume(config, "wd", 3, saved, backbone_fingerprint=same)
  with pytest.raises(
      ValueError, match=r"the backbone at config.model.path=.* is not the one the checkpoint of step 3 "
      r"in wd was trained on"):
    resume.check_resume(config, "wd", 3, saved, backbone_fingerprint=resume.weights_fingerprint(other))


def test_resume_refuses_another_optimizer_and_lets_the_run_grow():
  """A resumed run with another learning rate (or any optim.* field) is refused, naming it: its config.json would
  describe the checkpoint's steps wrongly. More train.num_steps resume; a checkpoint that did not record the
  optimizer resumes unchecked."""
  config = _config()
  saved = resume.resume_fields(config)
  assert saved["optim.learning_rate"] == config.optim.learning_rate
  changed = _config(**{"optim.learning_rate": 0.5})
  with pytest.raises(
      ValueError, match=r"config\.optim\.learning_rate=0\.5 differs from .* in the checkpoint of step 0 "
      r"in wd: the checkpoint's steps were taken by another optimizer or schedule"):
    resume.check_resume(changed, "wd", 0, saved)
  resume.check_resume(_config(**{"train.num_steps": config.train.num_steps * 2}), "wd", 0, saved)
  resume.check_resume(changed, "wd", 0, {k: v for k, v in saved.items() if not k.startswith("optim.")})


@pytest.mark.parametrize("field, value, saved_value", [("basis.vocab_support", 16, 0),
                                                       ("model.dtype", "bfloat16", "float32")])
def test_resume_refuses_another_head_support_or_compute_dtype(field, value, saved_value):
  """Resuming a full-vocabulary checkpoint with a 16-token support trained all 64 columns of the heads while the
  support's normalizer assumed 16 (wrong losses, wrong held-out accuracy); another compute dtype changed the result
  while config.json described the whole run with it. Checkpoints that predate the fields resume unchecked."""
  saved = resume.resume_fields(_config(**{field: saved_value}))
  assert saved[field] == saved_value
  with pytest.raises(ValueError, match=rf"config\.{field}={value!r} differs from {saved_value!r} in the checkpoint"):
    resume.check_resume(_config(**{field: value}), "wd", 0, saved)
  resume.check_resume(_config(**{field: value}), "wd", 0, {k: v for k, v in saved.items() if k != field})


@pytest.mark.parametrize("logit_bias", [False, True])
def test_support_logprobs_exact_for_restricted_heads(logit_bias):
  """Heads zero outside a support S: the cached [B, R, S] path equals the full-vocabulary path, and gradients
  never reach the columns outside S (so training keeps the heads restricted); with or without a logit bias."""
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  policy, params = tiny.tiny_policy("heads", num_bases=3, logit_bias=logit_bias)
  trainable, backbone = build.split_params(params)
  rng = np.random.default_rng(0)
  support = np.sort(rng.choice(tiny.VOCAB, 20, replace=False)).astype(np.int32)
  outside = np.setdiff1d(np.arange(tiny.VOCAB), support)
  trainable["heads"]["b"] = trainable["heads"]["b"].at[:, :, outside].set(0.0)
  if logit_bias:
    trainable["heads"]["c"] = trainable["heads"]["c"].at[:, outside].set(0.0)
  batch = {"prompt": rng.integers(1, tiny.VOCAB, (4, 5)), "prompt_mask": np.ones((4, 5), bool)}
  for side in "ab":  # Responses use tokens inside and outside the support.
    batch[f"response_{side}"] = rng.integers(1, tiny.VOCAB, (4, 6)).astype(np.int32)
    batch[f"response_{side}_mask"] = np.arange(6)[None] < rng.integers(2, 7, (4, 1))
  cached = {**batch, **features.pair_features(policy, backbone, batch, support=jnp.asarray(support))}
  full = features.cached_pair_logprobs(policy, trainable, backbone, cached)
  restricted = features.cached_pair_logprobs(policy, trainable, backbone, cached, support)
  for name in ("basis_a", "basis_b"):
    np.testing.assert_allclose(restricted[name], full[name], rtol=1e-5, atol=1e-5)
  direct = features.pair_logprobs(policy, build.merge_params(trainable, backbone), batch)
  np.testing.assert_allclose(restricted["basis_a"], direct["basis_a"], rtol=1e-5, atol=1e-4)
  grads = jax.grad(lambda t: features.cached_pair_logprobs(policy, t, backbone, cached, support)["basis_a"].sum())(
      trainable)
  assert float(jnp.abs(grads["heads"]["b"][:, :, outside]).max()) == 0.0
  assert float(jnp.abs(grads["heads"]["b"][:, :, support]).max()) > 0.0
  if logit_bias:
    assert float(jnp.abs(grads["heads"]["c"][:, outside]).max()) == 0.0
    assert float(jnp.abs(grads["heads"]["c"][:, support]).max()) > 0.0


def test_response_padding_ids_beyond_the_vocabulary_are_not_read():
  """Builders pad responses with the tokenizer's pad id, which may lie beyond the model's vocabulary: it embedded as
  NaN and attention spread it to every row (scores, cached features, gradients)."""
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  policy, params = tiny.tiny_policy("heads", num_bases=2)
  trainable, backbone = build.split_params(params)
  rng = np.random.default_rng(2)
  batch = {"prompt": rng.integers(1, tiny.VOCAB, (3, 5)).astype(np.int32), "prompt_mask": np.ones((3, 5), bool)}
  for side in "ab":
    batch[f"response_{side}"] = rng.integers(1, tiny.VOCAB, (3, 6)).astype(np.int32)
    batch[f"response_{side}_mask"] = np.arange(6)[None] < np.array([[2], [6], [4]])
  far = {**batch}
  for side in "ab":
    far[f"response_{side}"] = np.where(batch[f"response_{side}_mask"], batch[f"response_{side}"], tiny.VOCAB + 100)
  for name, fn in (("pair_logprobs", lambda b: features.pair_logprobs(policy, params, b)),
                   ("pair_features", lambda b: features.pair_features(policy, backbone, b)),
                   ("sequence_logprobs", lambda b: serving.sequence_logprobs(policy, params, b["prompt"], b[
                       "prompt_mask"], b["response_a"], b["response_a_mask"]))):
    want, got = fn(batch), fn(far)
    for key in want:
      assert np.all(np.isfinite(np.asarray(got[key]))), (name, key)
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=f"{name}: {key}")
  grad = jax.grad(lambda t: features.pair_logprobs(policy, build.merge_params(t, backbone), far)["basis_a"].sum())
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grad(trainable)))


@pytest.mark.parametrize("kind,family,kw", [("heads", "gemma3", {
    "feature_dim": 6
}), ("heads", "llama", {
    "logit_bias": True
}), ("lora", "gemma3", {})])
def test_pair_logprobs_in_position_chunks_equal_whole_sequence_scoring(kind, family, kw):
  """The training scorer (final hidden states, then the output layer on a few response positions at a time, each
  piece rematerialized) gives the whole-sequence logits' numbers, and the same gradients for any chunk size."""
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  policy, params = tiny.tiny_policy(kind, num_bases=3, family=family, **kw)
  rng = np.random.default_rng(1)
  batch = {
      "prompt": rng.integers(1, tiny.VOCAB, (3, 5)).astype(np.int32),
      "prompt_mask": np.arange(5)[None] >= rng.integers(0, 3, (3, 1))
  }
  for side in "ab":  # 7 positions: chunks of 3 leave a padded last piece.
    batch[f"response_{side}"] = rng.integers(1, tiny.VOCAB, (3, 7)).astype(np.int32)
    batch[f"response_{side}_mask"] = np.arange(7)[None] < rng.integers(1, 8, (3, 1))
  whole = {}
  for side in "ab":
    out = serving.sequence_logprobs(policy, params, batch["prompt"], batch["prompt_mask"], batch[f"response_{side}"],
                                    batch[f"response_{side}_mask"])
    whole[f"ref_{side}"], whole[f"basis_{side}"] = out["ref"], out["basis"]
  trainable, backbone = build.split_params(params)
  loss = lambda t, chunk: sum(
      jnp.sum(v * w) for v, w in zip(
          features.pair_logprobs(policy, build.merge_params(t, backbone), batch, chunk).values(),
          (1.0, -0.5, 0.3, -0.7)))
  grads = {}
  for chunk in (0, 3, 7):
    got = jax.jit(lambda p, c=chunk: features.pair_logprobs(policy, p, batch, c))(params)
    for name, value in whole.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-4, err_msg=f"{name}, chunk {chunk}")
    grads[chunk] = jax.jit(jax.grad(lambda t, c=chunk: loss(t, c)))(trainable)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-3  # The bases get gradients.
  for chunk in (3, 7):
    chex.assert_trees_all_close(grads[chunk], grads[0], rtol=1e-4, atol=1e-5)


def test_select_support_most_frequent():
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  responses = [np.array([[5, 5, 5, 2], [2, 9, 0, 0]]), np.array([[9, 9, 1, 1]])]
  masks = [np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool), np.array([[1, 1, 0, 0]], bool)]
  np.testing.assert_array_equal(features.select_support(responses, masks, 2, 16), [5, 9])  # 5: 3, 9: 3, 2: 2.
  assert len(features.select_support(responses, masks, 100, 16)) == 16


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: fallback past a corrupt latest step, partial saves never listed.


# Orbax's failed asynchronous read of the damaged step leaves a callback for an event loop it has closed; Python
# reports it ("Exception ignored") when it is garbage-collected, harmlessly. Collected at the end of this test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_data", "delete_manifest"])
def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog, damage):
  mesh = mesh_lib.make_mesh(4, 1, 2)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
  state = lambda i: {"w": jax.device_put(jnp.full((8, 4), float(i)), sharding), "step": jnp.asarray(i)}
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=3)
  for i in (1, 2, 3):
    ckpt.save(i, state(i), {"iterator": {"epoch": 0, "position": i}})
  ckpt.wait()
  ckpt.close()
  if damage == "truncate_data":
    data_files = glob.glob(os.path.join(directory, "3", "state", "d", "*"))
    assert data_files
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  else:
    os.remove(os.path.join(directory, "3", "state", "manifest.ocdbt"))
  # A crashed save leaves only a temporary directory: it must never be listed as a step.
  shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "4.orbax-checkpoint-tmp-123"))

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
  ckpt = checkpoint_lib.Checkpointer(directory, max_to_keep=3)
  assert 4 not in ckpt.all_steps()
  with caplog.at_level(logging.WARNING):
    step, restored, data = ckpt.restore_latest(abstract)
  assert step == 2 and data["iterator"]["position"] == 2
  np.testing.assert_array_equal(restored["w"], np.full((8, 4), 2.0))
  assert restored["w"].sharding == sharding
  assert any("step 3" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
  # The bad step is set aside, so training can write step 3 again.
  assert os.path.isdir(directory + ".corrupt/3") and ckpt.all_steps() == [1, 2]
  ckpt.save(3, state(3), {"iterator": {"epoch": 0, "position": 3}}, force=True)
  ckpt.wait()
  assert ckpt.restore_latest(abstract)[0] == 3
  ckpt.close()
  gc.collect()  # The read's leftovers are finalized here, inside this test's warning filter.


# ----------------------------------------------------------------------------------------------------------------
# The entry point: SIGKILL mid-run, restart, bitwise equal to an uninterrupted run; and the bases learn.

COMMAND = [
    sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py",
    "--config.train.tensorboard=False"
]  # Saves each start-up the tensorboardX import (~3 s).


def _env(cache_dir):
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=os.environ["XLA_FLAGS"],
      JAX_PLATFORMS="cpu",
      SPECTRAL_SOUP_PROGRESS="0",
      PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
      # Compiled programs are shared by the three runs (identical programs: results stay bitwise).
      JAX_COMPILATION_CACHE_DIR=cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _finished_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []


def _final_state(workdir):
  directory = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                           data=ocp.args.JsonRestore()))
  manager.close()
  return step, jax.device_get(restored["state"]), restored["data"]


def _wait_for_checkpoint(proc, workdir, after_step, timeout=300):
  """Polls until `workdir` holds a finished checkpoint past `after_step`; True if `proc` was still running."""
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if any(s > after_step for s in _finished_steps(workdir)):
      break
    time.sleep(0.02)
  return proc.poll() is None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run, and a run SIGKILLed after its first checkpoint, restarted, SIGTERMed, restarted."""
  root = tmp_path_factory.mktemp("train_basis")
  env = _env(str(root / "jax_cache"))
  full_dir, killed_dir = str(root / "full"), str(root / "killed")
  start = lambda workdir, **kw: subprocess.Popen(COMMAND + [f"--workdir={workdir}"], cwd=REPO, env=env, text=True, **kw)
  out = {"full_dir": full_dir, "killed_dir": killed_dir}

  # SIGKILL once the first checkpoint is complete: no chance to clean up or save.
  killed = start(killed_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  out["alive_at_kill"] = _wait_for_checkpoint(killed, killed_dir, after_step=0)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  out["steps_at_kill"] = _finished_steps(killed_dir)
  # The uninterrupted run starts now, so that it finds the programs the first run compiled in the cache.
  full = start(full_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

  # Restart; SIGTERM it once it has written a checkpoint of its own: it saves where it is and exits with 143.
  resumed = start(killed_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out["alive_at_term"] = _wait_for_checkpoint(resumed, killed_dir, after_step=max(out["steps_at_kill"] or [0]))
  out["steps_before_term"] = _finished_steps(killed_dir)
  resumed.send_signal(signal.SIGTERM)
  out["resumed_out"], _ = resumed.communicate(timeout=300)
  out["resumed_rc"] = resumed.returncode
  out["steps_at_term"] = _finished_steps(killed_dir)

  # Restart again: runs to the end.
  final = start(killed_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  out["final_out"], _ = final.communicate(timeout=300)
  out["final_rc"] = final.returncode
  out["full_out"], _ = full.communicate(timeout=300)
  out["full_rc"] = full.returncode
  return out


def test_killed_run_resumes_bitwise(runs):
  num_steps = train_basis_tiny.get_config().train.num_steps
  every = train_basis_tiny.get_config().checkpoint.every_steps
  assert runs["full_rc"] == 0, runs["full_out"][-3000:]
  # SIGKILL mid-run, after the first checkpoint.
  assert runs["alive_at_kill"] and runs["steps_at_kill"] == [every], runs
  assert f"Resumed from step {every}" in runs["resumed_out"], runs["resumed_out"][-3000:]
  # SIGTERM: a final checkpoint at the step where it stopped, exit status 143.
  assert runs["alive_at_term"] and runs["resumed_rc"] == 143, runs["resumed_out"][-3000:]
  term_step = max(runs["steps_at_term"])
  assert max(runs["steps_before_term"]) <= term_step < num_steps, runs
  assert runs["final_rc"] == 0, runs["final_out"][-3000:]
  assert f"Resumed from step {term_step}" in runs["final_out"], runs["final_out"][-3000:]
  # Bitwise equal to the uninterrupted run: params, optimizer state, RNG and the iterator position.
  step_full, full, data_full = _final_state(runs["full_dir"])
  step_resumed, again, data_again = _final_state(runs["killed_dir"])
  assert step_full == step_resumed == num_steps and data_full == data_again
  jax.tree.map(np.testing.assert_array_equal, full, again)
  # The metrics log reads as one run: each logged step once, in order.
  steps = [r["step"] for r in metrics_lib.read_metrics(runs["killed_dir"], kind="train")]
  assert steps == sorted(set(steps)) and steps[-1] == num_steps


def test_a_restart_writes_a_missing_final_evaluation_once(runs, tmp_path):
  """A run killed during its final evaluation (its last checkpoint committed, the record not yet written) is
  restarted: the restart resumes at the last step, evaluates and writes the record, which it used to skip as a
  finished run's (and a finished run's restart still writes none)."""
  num_steps = train_basis_tiny.get_config().train.num_steps
  assert runs["final_rc"] == 0, runs["final_out"][-3000:]
  workdir = tmp_path / "run"
  shutil.copytree(runs["killed_dir"], workdir)
  path = workdir / metrics_lib.FILENAME
  lines = path.read_text().splitlines(keepends=True)
  final = [line for line in lines if json.loads(line) == {**json.loads(line), "kind": "eval", "step": num_steps}]
  assert len(final) == 1
  path.write_text("".join(line for line in lines if line not in final))
  env = _env(str(tmp_path.parent / "jax_cache_restart"))
  for _ in range(2):
    out = subprocess.run(COMMAND + [f"--workdir={workdir}"], cwd=REPO, env=env, text=True, capture_output=True,
                         timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    evals = [r for r in metrics_lib.read_metrics(str(workdir), kind="eval") if r["step"] == num_steps]
    assert len(evals) == 1 and evals[0]["accuracy"] == json.loads(final[0])["accuracy"]


def test_bases_learn_their_attribute(runs):
  """Basis k's implicit reward ranks held-out pairs by attribute k (marker token k + 1 counts) well above chance."""
  assert runs["full_rc"] == 0, runs["full_out"][-3000:]
  final = metrics_lib.read_metrics(runs["full_dir"], kind="eval")[-1]
  assert final["step"] == train_basis_tiny.get_config().train.num_steps
  assert min(final["accuracy"]) > 0.75, final
  assert min(final["count"]) > 100  # Enough held-out pairs for the accuracy to mean something.
  # Each basis follows its own attribute: by the other attributes' labels it is near chance.
  cross = np.asarray(final["cross_accuracy"])
  np.testing.assert_allclose(np.diag(cross), final["accuracy"], rtol=1e-6)
  off_diagonal = cross[~np.eye(len(cross), dtype=bool)]
  assert np.all(np.abs(off_diagonal - 0.5) < 0.15), cross
