"""Learnability probes: ridge on token counts / surprise counts, scored like a basis; the CLI on a tiny run."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from spectral_soup.offline import learnability

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, R = 40, 12


def _pairs(n, seed):
  """Random responses; attribute 0 = count(token 7) - count(token 9) (+ noise), attribute 1 = pure noise."""
  rng = np.random.default_rng(seed)
  out = {}
  for side in "ab":
    tokens = rng.integers(0, V, (n, R)).astype(np.int32)
    mask = np.arange(R)[None] < rng.integers(4, R + 1, (n, 1))
    counts = lambda t: ((t == 7) & mask).sum(1) - ((t == 9) & mask).sum(1)
    scores = np.stack([counts(tokens) + 0.01 * rng.normal(size=n), rng.normal(size=n)], 1)
    probs = rng.dirichlet(np.ones(V), (n, R))
    out.update({
        f"response_{side}": tokens,
        f"response_{side}_mask": mask,
        f"scores_{side}": scores,
        f"support_probs_{side}": probs
    })
  diff = out["scores_a"] - out["scores_b"]
  out["labels"] = np.where(diff > 0.05, 1, np.where(diff < -0.05, 0, -1)).astype(np.int8)
  return out


def test_counts_and_surprise():
  tokens = np.array([[3, 3, 5, 0], [1, 2, 2, 2]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  support = np.array([2, 3, 5])
  np.testing.assert_array_equal(learnability.token_counts(tokens, mask, support), [[0, 2, 1], [3, 0, 0]])
  probs = np.full((2, 4, 3), 0.25)
  np.testing.assert_allclose(learnability.surprise(tokens, mask, support, probs),
                             [[-0.75, 1.25, 0.25], [2.0, -1.0, -1.0]])
  with pytest.raises(ValueError, match="support_probs has shape"):
    learnability.surprise(tokens, mask, support, probs[:, :3])


def test_pair_accuracy_masks_and_counts_zero_margin_wrong():
  margins = np.array([[1.0, 0.0], [-2.0, 3.0], [0.5, -1.0]])
  labels = np.array([[1, 1], [0, -1], [0, 0]])
  acc, count = learnability.pair_accuracy(margins, labels)
  np.testing.assert_allclose(acc, [2 / 3, 0.5])
  np.testing.assert_array_equal(count, [3, 2])
  # No labelled pair: no accuracy (it read 0.0, a probe that is always wrong), and the verdict says so.
  acc, count = learnability.pair_accuracy(margins, np.array([[1, -1], [0, -1], [0, -1]]))
  assert acc[0] == pytest.approx(2 / 3) and np.isnan(acc[1]) and count.tolist() == [3, 0]
  assert learnability.verdict(np.array([0.9, np.nan]), np.array([100, 0])) == ["learnable", "no pairs"]


def test_probes_find_the_learnable_attribute_only():
  train, held_out = _pairs(600, 0), _pairs(300, 1)
  results = learnability.report(train, held_out, np.arange(V), l2=1.0)
  assert set(results) == {"token_counts", "surprise"}
  for name, r in results.items():
    assert r["cv_accuracy"][0] > 0.9 and r["held_out_accuracy"][0] > 0.9, (name, r)
    assert abs(r["cv_accuracy"][1] - 0.5) < 0.08 and abs(r["held_out_accuracy"][1] - 0.5) < 0.1, (name, r)
  assert learnability.verdict(results["surprise"]["cv_accuracy"],
                              results["surprise"]["cv_count"]) == ["learnable", "weak"]
  # Without cached reference probabilities only the token-count probe runs.
  plain = {k: v for k, v in train.items() if not k.startswith("support_probs")}
  assert set(learnability.report(plain, held_out, np.arange(V), l2=1.0)) == {"token_counts"}


def test_hint_share():
  rng = np.random.default_rng(0)
  hints = np.repeat(["", "warm", "blunt"], 200)
  scores = np.stack([np.repeat([0.0, 2.0, -2.0], 200) + rng.normal(size=600), rng.normal(size=600)], 1)
  share = learnability.hint_share(hints, scores)
  np.testing.assert_allclose(share[0], 8 / 3 / (8 / 3 + 1), atol=0.05)  # Between-group var 8/3, noise var 1.
  assert share[1] < 0.02
  with pytest.raises(ValueError, match="hints for"):
    learnability.hint_share(hints[:10], scores)


@pytest.mark.parametrize("settings, message", [
    ({
        "l2": float("nan")
    }, "l2=nan: expected a finite number > 0"),
    ({
        "l2": float("inf")
    }, "l2=inf: expected a finite number > 0"),
    ({
        "l2": -1.0
    }, "l2=-1.0: expected a finite number > 0"),
    ({
        "l2": 0
    }, "l2=0: expected a finite number > 0"),
    ({
        "l2": 1.0,
        "folds": 1
    }, "folds=1: expected an integer >= 2"),
    ({
        "l2": 1.0,
        "folds": 0
    }, "folds=0: expected an integer >= 2"),
    ({
        "l2": 1.0,
        "folds": 2.5
    }, "folds=2.5: expected an integer >= 2"),
])
def test_probe_settings_are_checked(settings, message):
  """A NaN penalty or a single fold would score every attribute 0 ("weak") instead of failing."""
  with pytest.raises(ValueError, match=re.escape("--" + message)):
    learnability.check_settings(**settings, prefix="--")
  train = _pairs(8, 0)
  with pytest.raises(ValueError, match=re.escape(message)):
    learnability.cross_validated_accuracy(train["response_a"][:, :3] * 1.0, train["response_b"][:, :3] * 1.0,
                                          train["scores_a"], train["scores_b"], train["labels"], **{
                                              "folds": 2,
                                              **settings
                                          })


def test_cli_refuses_bad_flags_before_anything_is_read_or_written(tmp_path):
  """One line, exit status 2, before JAX starts; the workdir's earlier learnability.json is left as it was."""
  (tmp_path / "learnability.json").write_text("earlier")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([
      sys.executable, "-m", "experiments.attribute_learnability", "--config=configs/train_basis_tiny.py",
      f"--workdir={tmp_path}", "--l2=nan"
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr == "error: --l2=nan: expected a finite number > 0 (the ridge penalty).\n"
  assert (tmp_path / "learnability.json").read_text() == "earlier"


@pytest.mark.parametrize("content, message", [
    ('{"data": ', "config.json cannot be read as the training run's config (JSONDecodeError: Expecting value"),
    ("[1, 2]", "config.json holds a JSON list: expected the training run's config (a JSON object)."),
    ('{"data": {"source": "embedded", "attributes": ["a"]}, "basis": {"num_bases": 1}}',
     "config.json: data.source='embedded', but --config has 'synthetic': this workdir holds another run"),
])
def test_cli_names_a_workdir_of_another_or_a_damaged_run(tmp_path, content, message):
  """The workdir's config.json is read before anything else: a damaged one or another run's is one error line."""
  (tmp_path / "config.json").write_text(content)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([
      sys.executable, "-m", "experiments.attribute_learnability", "--config=configs/train_basis_tiny.py",
      f"--workdir={tmp_path}", "--config.basis.vocab_support=64"
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
  assert out.stderr.count("\n") == 1 and not (tmp_path / "learnability.json").exists()


def test_cli_reports_a_training_run(tmp_path):
  """Train the tiny synthetic config on a support, then the CLI reads its pairs, features and metrics."""
  workdir = str(tmp_path / "run")
  flags = [
      "--config=configs/train_basis_tiny.py", f"--workdir={workdir}", "--config.basis.vocab_support=64",
      "--config.train.num_steps=4", "--config.optim.warmup_steps=1", "--config.data.num_train_pairs=256",
      "--config.data.num_eval_pairs=64", "--config.train.tensorboard=False", "--config.checkpoint.every_steps=0"
  ]
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
  run = lambda module, extra: subprocess.run([sys.executable, "-m", module, *flags, *extra], cwd=REPO, env=env,
                                             capture_output=True, text=True, timeout=600)
  trained = run("experiments.train_basis", [])
  assert trained.returncode == 0, trained.stderr[-3000:]
  out = run("experiments.attribute_learnability", ["--l2=1.0"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "surprise cv" in out.stdout and "basis (held-out)" in out.stdout, out.stdout
  report = json.load(open(os.path.join(workdir, "learnability.json")))
  assert report["basis_step"] == 4 and len(report["verdict"]) == 3
  # Marker-token counts are what the synthetic attributes are: both probes rank them almost perfectly.
  for probe in ("token_counts", "surprise"):
    assert min(report["probes"][probe]["held_out_accuracy"]) > 0.9, report["probes"]
  assert report["verdict"] == ["learnable"] * 3
