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


@pytest.mark.parametrize("kwargs, match", [
    ({"folds": 1}, "folds=1"), ({"folds": 65}, "folds=65"), ({"l2s": [0.0]}, "positive"),
    ({"constraint": "box"}, "constraint='box'")])
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
  rc = choose_online_l2.main([_workdir(tmp_path, name="a"), _workdir(tmp_path, name="b"), "--l2s=0.1,1e4",
                              "--json", path])
  assert rc == 0
  out = json.load(open(path))["learners"]
  assert set(out) == {"spectral", "p_soups", "pad"}
  assert out["spectral"]["constraint"] == "nonnegative" and out["p_soups"]["constraint"] == "simplex"
  assert out["spectral"]["best_l2"] == 0.1  # The choices follow the spectral features.
  assert "spectral" in capsys.readouterr().out


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
