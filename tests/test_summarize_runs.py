"""Aggregation of several main-job runs: means and spreads, significance gating, errors naming the file."""

import json
import os

import pytest

from experiments import summarize_runs


def _write_run(directory, rewards, gain, significant, accuracy):
  os.makedirs(directory, exist_ok=True)
  methods = {name: {"mean_reward": r, "kl": 2 * r, "normalized_score": r / gain} for name, r in rewards.items()}
  with open(os.path.join(directory, "results.json"), "w") as f:
    json.dump(
        {
            "methods": methods,
            "bespoke_gain": gain,
            "bespoke_gain_ci": [gain - 0.1, gain + 0.1],
            "bespoke_gain_significant": significant,
            "offline": {
                "heads": ["basis:a", "bespoke:0"],
                "heldout_accuracy": accuracy
            }
        }, f)
  return str(directory)


def test_means_spreads_and_significance_gate(tmp_path):
  runs = [
      _write_run(tmp_path / "s0", {
          "reference": 0.1,
          "bespoke": 0.5
      }, 0.4, True, [0.6, 0.7]),
      _write_run(tmp_path / "s1", {
          "reference": 0.3,
          "bespoke": 0.5
      }, 0.2, True, [0.8, 0.5])
  ]
  summary = summarize_runs.summarize(summarize_runs.load_runs(runs))
  ref = summary["methods"]["reference"]["mean_reward"]
  assert ref["mean"] == pytest.approx(0.2) and ref["std"] == pytest.approx(0.1414213, rel=1e-5)
  assert (ref["min"], ref["max"]) == (0.1, 0.3)
  assert summary["methods"]["bespoke"]["gain"]["mean"] == pytest.approx(0.3)  # 0.4 and 0.2 over the reference.
  assert summary["methods"]["bespoke"]["normalized_score"]["mean"] == pytest.approx((0.5 / 0.4 + 0.5 / 0.2) / 2)
  assert summary["heldout_accuracy"]["basis:a"]["mean"] == pytest.approx(0.7)
  assert "normalized score" in summarize_runs.format_summary(summary)

  runs.append(_write_run(tmp_path / "s2", {"reference": 0.2, "bespoke": 0.25}, 0.05, False, [0.5, 0.5]))
  summary = summarize_runs.summarize(summarize_runs.load_runs(runs))
  assert "normalized_score" not in summary["methods"]["reference"]
  assert summary["bespoke"]["significant"] == [True, True, False]
  assert "not aggregated" in summarize_runs.format_summary(summary)


def test_missing_or_foreign_results_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    summarize_runs.load_runs([str(tmp_path / "nowhere")])
  os.makedirs(tmp_path / "other")
  (tmp_path / "other" / "results.json").write_text(json.dumps({"methods": {}}))
  with pytest.raises(ValueError, match="bespoke_gain"):
    summarize_runs.load_runs([str(tmp_path / "other")])


def test_gains_at_the_bespoke_kl_and_attribute_shifts(tmp_path):
  runs = []
  for seed, (gain, shift) in enumerate([(0.2, 0.5), (0.4, 0.1)]):
    path = _write_run(tmp_path / f"s{seed}", {"reference": 0.0, "bespoke": 0.5}, 0.5, True, [0.6, 0.7])
    with open(os.path.join(path, "results.json")) as f:
      results = json.load(f)
    results["attributes"] = ["a", "b"]
    results["offline"]["attribute_shift"] = [[shift, 0.0], [0.0, 0.3]]
    results["offline"]["attribute_shift_ci"] = [[[shift - 0.2, shift + 0.2], [-0.1, 0.1]], [[-0.1, 0.1], [0.1, 0.5]]]
    results["at_bespoke_kl"] = {
        "spectral_soup_explicit": {
            "gain": gain,
            "gain_ci": [gain - 0.1, gain + 0.1]
        },
        "pad": {
            "gain": 0.1,
            "gain_ci": [0.0, 0.2]
        }
    }
    with open(os.path.join(path, "results.json"), "w") as f:
      json.dump(results, f)
    runs.append(path)
  summary = summarize_runs.summarize(summarize_runs.load_runs(runs))
  assert summary["at_bespoke_kl"]["spectral_soup_explicit"]["gain"]["mean"] == pytest.approx(0.3)
  assert summary["at_bespoke_kl"]["pad"]["gain"]["mean"] == pytest.approx(0.1)
  assert summary["attribute_shift"]["a"]["shift"]["mean"] == pytest.approx(0.3)
  assert summary["attribute_shift"]["b"]["shift"]["mean"] == pytest.approx(0.3)
  text = summarize_runs.format_summary(summary)
  assert "above 0 in 1 of 2 runs" in text and "above 0 in 2 of 2 runs" in text
