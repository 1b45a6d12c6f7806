"""Numerical guards: a non-finite loss stops training with the offending batch and state saved, and never
reaches the parameters; bfloat16 compute agrees with float32 within the tolerances stated here (RELIABILITY.md
quotes them)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import train_basis_tiny
from spectral_soup.models import build
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import metrics as metrics_lib
from spectral_soup.soup import serving
from tests.reliability.harness import NUM_STEPS, assert_bitwise_equal, finished_steps, one_device, restore

# bfloat16 vs float32 on the tiny training config's random backbone (measured on CPU: token mean 0.01, max 0.14;
# features max 0.017; training loss per step below 0.003 apart).
TOKEN_MEAN_ATOL = 0.03  # Mean |difference| of per-token log-probs (nats).
TOKEN_MAX_ATOL = 0.4  # Largest |difference| of a per-token log-prob (nats).
SEQUENCE_RTOL = 5e-3  # |difference| of a response's log-prob, relative to its float32 value (plus 0.05 nats).
FEATURE_ATOL = 0.05  # Implicit-reward features f_k = 0.1 * (log pi_k - log pi_ref) of whole responses.
LOSS_ATOL = 0.02  # Training loss (mean DPO loss over the K bases, ~0.69 at the start) at each of 16 steps.

# ----------------------------------------------------------------------------------------------------------------
# NaN / Inf in training.


def test_nonfinite_loss_stops_with_batch_and_state_saved(trainer, tmp_path):
  workdir = str(tmp_path / "nan")
  run = trainer.run(workdir, fault="nan_batch:5")  # The 5th batch drawn (step 5) gets one NaN feature.
  assert run.rc == 1, run.tail()
  assert "FloatingPointError: Step 5: non-finite training loss or gradient" in run.out, run.tail()
  assert "the last checkpoint is step 4" in run.out, run.tail()
  assert finished_steps(workdir) == [2, 4]  # Committed before stopping; nothing of step 5 is checkpointed.
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)][-1] == 4
  debug = os.path.join(workdir, "nonfinite", "step_5")
  batch = np.load(os.path.join(debug, "batch_process0.npz"))
  assert sum(int(np.isnan(batch[name]).sum()) for name in batch.files if batch[name].dtype.kind == "f") == 1
  assert math.isnan(json.load(open(os.path.join(debug, "metrics.json")))["total_loss"])
  # The saved state is the one step 5 started from: the non-finite update was not applied.
  _, at_4, _ = restore(os.path.join(workdir, "checkpoints"), 4)
  with ocp.StandardCheckpointer() as checkpointer:
    saved = jax.device_get(checkpointer.restore(os.path.join(debug, "state"), one_device(at_4)))
  assert_bitwise_equal(saved, at_4)


def test_unchecked_nonfinite_step_is_skipped_not_applied(trainer, reference, tmp_path):
  """With train.nan_check=False and logs every 4 steps, the NaN of step 5 goes unnoticed by the host, yet the
  update is skipped inside the step: the run finishes with finite parameters, one update short of the reference."""
  workdir = str(tmp_path / "unchecked")
  run = trainer.run(workdir, "--config.train.nan_check=False", "--config.train.log_every_steps=4", fault="nan_batch:5")
  assert run.rc == 0, run.tail()
  _, state, _ = restore(os.path.join(workdir, "checkpoints"))
  _, state_ref, _ = restore(os.path.join(reference, "checkpoints"))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  assert int(state["step"]) == NUM_STEPS - 1  # Step 5's update never happened.
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["opt_state"]))
  assert not np.array_equal(state["params"]["heads"]["b"], state_ref["params"]["heads"]["b"])


# ----------------------------------------------------------------------------------------------------------------
# bfloat16 compute.


def test_bfloat16_training_tracks_float32(trainer, reference, tmp_path):
  workdir = str(tmp_path / "bf16")
  run = trainer.run(workdir, "--config.model.dtype=bfloat16")
  assert run.rc == 0, run.tail()
  bf16 = metrics_lib.read_metrics(workdir, kind="train")
  fp32 = metrics_lib.read_metrics(reference, kind="train")
  assert [r["step"] for r in bf16] == [r["step"] for r in fp32] == list(range(1, NUM_STEPS + 1))
  losses = np.array([[r["total_loss"] for r in bf16], [r["total_loss"] for r in fp32]])
  np.testing.assert_allclose(losses[0], losses[1], atol=LOSS_ATOL)
  assert losses[0, -1] < losses[0, 0] - 0.05  # And it learns.


@pytest.fixture(scope="module")
def policies():
  """The tiny training config's policy in float32 and bfloat16 compute, sharing float32 parameters."""
  config = train_basis_tiny.get_config()
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    out[dtype] = build.build_policy(build.model_config(config), config.basis)
  abstract = build.unboxed(jax.eval_shape(out["float32"].init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  trainable, backbone = build.split_params(abstract["params"])
  backbone = build.random_backbone(backbone, out["float32"].config, seed=0)
  rng = np.random.default_rng(1)
  trainable = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), trainable)
  return out, build.merge_params(trainable, backbone)


def test_bfloat16_logprobs_and_features_match_float32(policies):
  by_dtype, params = policies
  assert by_dtype["bfloat16"].config.dtype != by_dtype["float32"].config.dtype
  pairs = input_pipeline.synthetic_pairs(64, num_bases=3, vocab_size=64, prompt_len=8, response_len=16, seed=0)
  lam = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(3), size=64), jnp.float32)
  out = {
      dtype:
          jax.device_get(
              serving.sequence_logprobs(policy, params, pairs["prompt"], pairs["prompt_mask"], pairs["response_a"],
                                        pairs["response_a_mask"], lam)) for dtype, policy in by_dtype.items()
  }
  low, high = out["bfloat16"], out["float32"]
  mask = pairs["response_a_mask"]
  for name in ("ref_tokens", "basis_tokens", "soup_tokens"):
    assert low[name].dtype == np.float32  # Log-probs are normalized in float32 whatever the compute dtype.
    diff = np.abs(low[name] - high[name])[..., mask]
    assert diff.mean() <= TOKEN_MEAN_ATOL and diff.max() <= TOKEN_MAX_ATOL, (name, diff.mean(), diff.max())
    assert np.abs(low[name] - high[name])[..., ~mask].max() == 0.0  # Padding stays exactly zero.
  for name in ("ref", "basis", "soup"):
    np.testing.assert_allclose(low[name], high[name], rtol=SEQUENCE_RTOL, atol=0.05, err_msg=name)
  np.testing.assert_allclose(serving.implicit_rewards(low, 0.1), serving.implicit_rewards(high, 0.1), atol=FEATURE_ATOL)
