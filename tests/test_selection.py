"""Choosing the online penalties by cross-validated choice prediction (`online.selection`, its CLI)."""

import json
import os

import numpy as np
import pytest

from experiments import choose_online_l2
from spectral_soup.online import selection


def _comparisons(num_users=6, num=64, k=3, signal=True, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(num_users, num, k)).astype(np.float32)
  lam = rng.uniform(0.5, 2.0, size=(num_users, k))
  margin = np.einsum("unk,uk->un", features, lam) if signal else np.zeros((num_users, num))
  prefs = (rng.uniform(size=(num_users, num)) < 1 / (1 + np.exp(-margin))).astype(np.float32)
  return features, prefs


def test_informative_choices_prefer_a_weak_penalty():
  features, prefs = _comparisons(signal=True)
  out = selection.cross_validate(features, prefs, [0.1, 1e4], constraint="nonnegative")
  assert out["log_likelihood"][0] > out["log_likelihood"][1] + 0.1
  assert out["accuracy"][0] > 0.7
  # A penalty that pins lambda at 0 predicts nothing: log(1/2) per comparison, every margin zero (wrong).
  np.testing.assert_allclose(out["log_likelihood"][1], np.log(0.5), atol=1e-3)


def test_ties_count_half_whichever_response_comes_first():
  """A tie (0.5) counted as a choice of the second response: swapping the responses (-features, 1 - prefs) moved
  the accuracy from 0.771 to 0.688 on the same comparisons (the log-likelihood did not move)."""
  features, prefs = _comparisons(signal=True)
  prefs[:, ::3] = 0.5
  out = selection.cross_validate(features, prefs, [0.1, 1.0])
  swapped = selection.cross_validate(-features, 1.0 - prefs, [0.1, 1.0])
  np.testing.assert_allclose(swapped["accuracy"], out["accuracy"], rtol=1e-12)
  np.testing.assert_allclose(swapped["log_likelihood"], out["log_likelihood"], rtol=1e-5)
  hard = prefs != 0.5  # Ties are worth half of a choice, as long as the margin is not exactly zero.
  assert 0.5 * (~hard).mean() <= out["accuracy"][0] <= 0.5 * (~hard).mean() + hard.mean()


def test_a_zero_margin_counts_half_as_in_the_online_rounds():
  """A nonnegative learner whose fit stays at lam = 0 (every comparison against it) predicts nothing: its accuracy
  is a coin flip's, 0.5, as the online rounds count a zero margin; it was 0.0 (every zero margin counted wrong)."""
  features, prefs = _comparisons(signal=True)
  stuck = selection.cross_validate(np.abs(features), np.zeros_like(prefs), [1.0], constraint="nonnegative")
  np.testing.assert_allclose(stuck["accuracy"], 0.5)


def test_uninformative_choices_prefer_a_strong_penalty():
  features, prefs = _comparisons(num=24, k=8, signal=False)
  out = selection.cross_validate(features, prefs, [1e-3, 100.0], folds=4)
  assert out["log_likelihood"][1] > out["log_likelihood"][0]


def test_simplex_and_prior():
  features, prefs = _comparisons()
  out = selection.cross_validate(features, prefs, [1.0], constraint="simplex")
  assert np.all((0 <= out["accuracy"]) & (out["accuracy"] <= 1)) and np.isfinite(out["log_likelihood"]).all()
  # A huge penalty around a prior reproduces the prior's own predictions.
  prior = np.asarray([1.0, 1.0, 1.0], np.float32)
  pinned = selection.cross_validate(features, prefs, [1e6], prior_mean=prior)
  margin = features.sum(-1)
  want = np.mean(-prefs * np.logaddexp(0, -margin) - (1 - prefs) * np.logaddexp(0, margin))
  np.testing.assert_allclose(pinned["log_likelihood"][0], want, rtol=1e-3)


@pytest.mark.parametrize("kwargs, match", [({
    "folds": 1
}, "folds=1"), ({
    "folds": 65
}, "folds=65"), ({
    "l2s": [0.0]
}, r"l2s\[0\] is 0.0: expected a finite number > 0"), ({
    "constraint": "box"
}, "constraint='box'")])
def test_bad_arguments(kwargs, match):
  features, prefs = _comparisons()
  kwargs = {"l2s": [1.0], **kwargs}
  with pytest.raises(ValueError, match=match):
    selection.cross_validate(features, prefs, **kwargs)


def test_shapes_are_checked():
  features, prefs = _comparisons()
  with pytest.raises(ValueError, match=r"\[U, N, K\]"):
    selection.cross_validate(features[0], prefs, [1.0])


def _workdir(tmp_path, split="dev", name="run"):
  workdir = tmp_path / name
  workdir.mkdir()
  features, prefs = _comparisons()
  pad_features, _ = _comparisons(seed=1)
  np.savez(workdir / "comparisons.npz", features=features, pad_features=pad_features, prefs=prefs)
  config = {"eval": {"split": split}, "online": {"constraint": "nonnegative", "prior_mean": -1.0}}
  (workdir / "config.json").write_text(json.dumps(config))
  return str(workdir)


def test_cli_chooses_every_learner(tmp_path, capsys):
  path = str(tmp_path / "out.json")
  rc = choose_online_l2.main(
      [_workdir(tmp_path, name="a"),
       _workdir(tmp_path, name="b"), "--l2s=0.1,1e4", "--json", path])
  assert rc == 0
  out = json.load(open(path))["learners"]
  # Runs on the implicit rewards are also scored on the reward model's features, which they always save.
  assert set(out) == {"spectral", "p_soups", "pad", "spectral@reward_model", "p_soups@reward_model"}
  assert out["spectral"]["constraint"] == "nonnegative" and out["p_soups"]["constraint"] == "simplex"
  assert out["spectral"]["best_l2"] == 0.1  # The choices follow the spectral features.
  assert "spectral" in capsys.readouterr().out


def test_cli_scores_the_other_kind_of_features(tmp_path):
  """A run that saved the bases' implicit rewards beside the features it used (online.features='reward_model') is
  scored on both: spectral and P-Soups, then spectral@implicit_reward and p_soups@implicit_reward."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  features, prefs = _comparisons()
  noise, _ = _comparisons(seed=1)
  np.savez(workdir / "comparisons.npz", features=features, pad_features=features, implicit_features=noise, prefs=prefs)
  config = {
      "eval": {
          "split": "dev"
      },
      "online": {
          "constraint": "nonnegative",
          "prior_mean": -1.0,
          "features": "reward_model"
      }
  }
  (workdir / "config.json").write_text(json.dumps(config))
  path = str(tmp_path / "out.json")
  assert choose_online_l2.main([str(workdir), "--l2s=0.1,1", "--json", path]) == 0
  out = json.load(open(path))["learners"]
  assert set(out) == {"spectral", "p_soups", "pad", "spectral@implicit_reward", "p_soups@implicit_reward"}
  assert out["spectral"]["features"] == "reward_model" == out["pad"]["features"]
  assert out["spectral@implicit_reward"]["features"] == "implicit_reward"
  assert out["p_soups@implicit_reward"]["constraint"] == "simplex"
  # The choices follow the features used, not the noise saved beside them.
  assert max(out["spectral"]["log_likelihood"]) > max(out["spectral@implicit_reward"]["log_likelihood"]) + 0.05


def test_cli_refuses_held_out_runs_and_missing_files(tmp_path, capsys):
  assert choose_online_l2.main([_workdir(tmp_path, split="heldout")]) == 2
  assert "eval.split='heldout'" in capsys.readouterr().err
  empty = tmp_path / "empty"
  empty.mkdir()
  assert choose_online_l2.main([str(empty)]) == 2
  assert os.path.join(str(empty), "config.json") in capsys.readouterr().err
  with pytest.raises(SystemExit):
    choose_online_l2.main([_workdir(tmp_path, name="c"), "--l2s=a,b"])
  assert "--l2s='a,b'" in capsys.readouterr().err
  # Damaged files are named: a truncated comparisons.npz, a file that is not an .npz, a garbled config.json.
  damaged = _workdir(tmp_path, name="d")
  data = os.path.join(damaged, "comparisons.npz")
  with open(data, "rb") as f:
    head = f.read(100)
  for content in (head, b"not a zip file"):
    with open(data, "wb") as f:
      f.write(content)
    assert choose_online_l2.main([damaged]) == 2
    assert f"{data}: not a readable .npz of the main job's comparisons" in capsys.readouterr().err
  with open(os.path.join(damaged, "config.json"), "w") as f:
    f.write('{"eval": ')
  assert choose_online_l2.main([damaged]) == 2
  assert "config.json cannot be read as the main job's config (JSONDecodeError" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--fits=surprise,logits"], "--fits=surprise,logits: expected names among pair_surprise, surprise, counts"),
    (["--scales=0.5,2"], "expected positive strengths including 1"),
    (["--users=0"], "--users=0: expected >= 1"),
])
def test_compare_ridge_fits_refuses_bad_arguments(argv, message, capsys):
  """The dev-split comparison of the closed-form fits names a bad argument before loading anything."""
  from experiments import compare_ridge_fits  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    compare_ridge_fits.parse_args(argv)
  assert message in capsys.readouterr().err
