"""The analysis tools' inputs: damaged comparisons, repeated runs, bad strengths and output paths are refused, naming
them, before any fit or model load; outputs are written whole."""

import json
import os
import re

import numpy as np
import pytest

from experiments import choose_online_l2
from experiments import compare_ridge_fits


def _dev_run(tmp_path, name="run", damage=None):
  """A dev run's config.json and comparisons.npz (6 users x 16 comparisons, K = 3), `damage` set to NaN / inf."""
  workdir = tmp_path / name
  workdir.mkdir()
  rng = np.random.default_rng(0)
  arrays = {
      "features": rng.normal(size=(6, 16, 3)).astype(np.float32),
      "pad_features": rng.normal(size=(6, 16, 3)).astype(np.float32),
      "prefs": (rng.uniform(size=(6, 16)) < 0.5).astype(np.float32)
  }
  if damage:
    field, index, value = damage
    arrays[field][index] = value
  np.savez(workdir / "comparisons.npz", **arrays)
  config = {"eval": {"split": "dev"}, "online": {"constraint": "nonnegative", "prior_mean": -1.0}}
  (workdir / "config.json").write_text(json.dumps(config))
  return str(workdir)


@pytest.mark.parametrize("damage, message", [
    (("prefs", (2, 5), np.nan), "prefs[2, 5] is nan (user 2, comparison 5; 1 non-finite entry in all)"),
    (("features", (0, 3, 1), np.inf), "features[0, 3, 1] is inf (user 0, comparison 3; 1 non-finite entry in all)"),
    (("pad_features", (1, 0), -np.inf), "pad_features[1, 0, 0] is -inf (user 1, comparison 0; 3 non-finite entries"),
])
def test_choose_online_l2_refuses_non_finite_comparisons(tmp_path, capsys, damage, message):
  workdir = _dev_run(tmp_path, damage=damage)
  assert choose_online_l2.main([workdir, "--l2s=1,10", "--folds=2"]) == 2
  out = capsys.readouterr()
  path = os.path.join(workdir, "comparisons.npz")
  assert out.out == "" and out.err.startswith(f"error: {path}: {message}") and out.err.count("\n") == 1, out.err
  assert out.err.endswith("): expected finite features and choices (a damaged file?).\n"), out.err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--l2s=nan"], r"--l2s='nan': expected comma-separated finite numbers > 0 that float32 holds, .* \(not nan\)"),
        (["--l2s=1,-1"], r"\(not -1\)"),
        (["--l2s=1,1"], r"--l2s='1,1' repeats a penalty: expected distinct values"),  # Two identical columns.
        (["--folds=1"], r"--folds=1: expected an integer >= 2"),
    ])
def test_choose_online_l2_names_bad_flags_before_reading_any_run(tmp_path, capsys, flags, message):
  """They were named without '--' ('l2s[0] is nan', 'folds=1') by the fit, after every run had been read."""
  with pytest.raises(SystemExit) as exit_info:
    choose_online_l2.main([str(tmp_path / "no_such_run"), *flags])
  assert exit_info.value.code == 2
  assert re.search(message, capsys.readouterr().err)


def test_choose_online_l2_refuses_a_run_given_twice(tmp_path, capsys):
  workdir = _dev_run(tmp_path)
  os.symlink(workdir, tmp_path / "link")
  assert choose_online_l2.main([workdir, workdir]) == 2
  assert f"error: {workdir} is given twice: each dev run must be given once" in capsys.readouterr().err
  assert choose_online_l2.main([workdir, str(tmp_path / "link")]) == 2
  assert f"is the same workdir as {workdir}" in capsys.readouterr().err


def test_choose_online_l2_chooses_no_penalty_from_a_non_finite_row(tmp_path, capsys, monkeypatch):
  """A fit that diverges despite finite inputs: the row is reported, no penalty is picked from it, the JSON stays
  valid."""
  from spectral_soup.online import selection  # pylint: disable=g-import-not-at-top
  diverged = lambda *args, **kwargs: {"log_likelihood": np.array([np.nan, -0.6]), "accuracy": np.array([0.5, 0.6])}
  monkeypatch.setattr(selection, "cross_validate", diverged)
  path = tmp_path / "out.json"
  assert choose_online_l2.main([_dev_run(tmp_path), "--l2s=1,10", f"--json={path}"]) == 0
  out = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
  assert out["learners"]["spectral"]["best_l2"] is None
  assert out["learners"]["spectral"]["log_likelihood"] == [None, -0.6]
  assert "warning: spectral: the held-out log-likelihood is not finite at l2=1" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("", "is a directory: expected a file path."),
    ("missing/out.json", "its directory"),
    ("run/config.json", "is one of the inputs"),
])
def test_choose_online_l2_checks_the_json_path_first(tmp_path, capsys, name, message):
  run = _dev_run(tmp_path)
  path = tmp_path / name
  # One run does not exist: the output path is named first, before any run is read.
  assert choose_online_l2.main([str(tmp_path / "nowhere"), run, f"--json={path}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: --json={path}") and message in err, err


@pytest.mark.parametrize("argv, message", [
    (["--scales=1,abc"], "--scales=1,abc: 'abc' is not a number; expected positive strengths including 1"),
    (["--scales=0.5,1,nan"], "--scales=0.5,1,nan: nan is not a finite number > 0; expected positive strengths"),
    (["--scales=1,inf"], "--scales=1,inf: inf is not a finite number > 0"),
    (["--scales=1,-2"], "--scales=1,-2: -2 is not a finite number > 0"),
    (["--scales=1,1"], "--scales=1,1: a strength is listed more than once."),
    (["--fits=counts,counts"], "--fits=counts,counts: a fit is listed more than once."),
    (["--json="], "--json is empty: expected a file path"),
    (["--json=/"], "--json=/ is a directory: expected a file path."),
    (["--json=/nonexistent-dir/ridge.json"], "--json=/nonexistent-dir/ridge.json: its directory /nonexistent-dir does "
     "not exist."),
])
def test_compare_ridge_fits_refuses_bad_arguments_before_loading(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    compare_ridge_fits.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
