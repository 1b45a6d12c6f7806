"""Aggregation of several main-job runs: means and spreads, significance gating, errors naming the file."""

import json
import os
import re

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
            "gain_ci": [0.0, 0.2],
            "covered": seed == 0  # Run 1's bespoke KL lies beyond PAD's sweep.
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
  # A gain not read at the bespoke KL (beyond the sweep) is flagged per run, and said beside the pooled value.
  assert summary["at_bespoke_kl"]["pad"]["covered"] == [True, False]
  assert summary["at_bespoke_kl"]["spectral_soup_explicit"]["covered"] == [True, True]
  pad_line = next(line for line in text.splitlines() if line.strip().startswith("pad "))
  assert "in 1 of 2 runs the bespoke KL lies beyond the sweep" in pad_line
  assert "beyond the sweep" not in next(
      line for line in text.splitlines()
      if "spectral_soup_explicit" in line and "(" in line and "[" in line and line.startswith("  "))


def _main_run(directory, attributes=("a", "b"), users=2, accuracy=None, split="heldout", config=True, shift=None):
  """A results.json (and config.json) as the main job writes them, small."""
  os.makedirs(directory, exist_ok=True)
  heads = [f"basis:{a}" for a in attributes] + [f"bespoke:{u}" for u in range(users)]
  results = {
      "methods": {
          "reference": {
              "mean_reward": 0.0,
              "kl": 0.0,
              "normalized_score": 0.0
          },
          "bespoke": {
              "mean_reward": 0.4,
              "kl": 3.0,
              "normalized_score": 1.0
          }
      },
      "users": users,
      "rounds": 1,
      "comparisons_per_user": 2,
      "bespoke_gain": 0.4,
      "bespoke_gain_ci": [0.3, 0.5],
      "bespoke_gain_significant": True,
      "attributes": list(attributes),
      "user_kind": "dirichlet",
      "offline": {
          "heads": heads,
          "heldout_accuracy": accuracy if accuracy is not None else [0.6] * len(heads)
      }
  }
  if shift is not None:
    results["offline"]["attribute_shift"] = [
        [shift[i] if i == j else 0.0 for j in range(len(attributes))] for i in range(len(attributes))
    ]
    results["offline"]["attribute_shift_ci"] = [
        [[x - 0.1, x + 0.1] for x in row] for row in results["offline"]["attribute_shift"]
    ]
  (directory / "results.json").write_text(json.dumps(results))
  if config:
    config = {
        "seed": 0,
        "data": {
            "attributes": list(attributes)
        },
        "users": {
            "seed": 0,
            "num_users": users,
            "kind": "dirichlet"
        },
        "online": {
            "rounds": 1,
            "prompts_per_round": 2,
            "l2": 10.0
        },
        "eval": {
            "split": split
        }
    }
    (directory / "config.json").write_text(json.dumps(config))
  return str(directory)


def test_heads_and_attribute_shifts_are_matched_by_name(tmp_path):
  """A run that lists its attributes in another order: each head's numbers stay with its own name."""
  first = _main_run(tmp_path / "s0", ("readability", "formality"), accuracy=[0.56, 0.71, 0.6, 0.7], shift=[1.0, 2.0])
  second = _main_run(tmp_path / "s1", ("formality", "readability"), accuracy=[0.71, 0.56, 0.6, 0.7], shift=[2.0, 1.0])
  summary = summarize_runs.summarize(summarize_runs.load_runs([first, second]))
  accuracy = summary["heldout_accuracy"]
  assert accuracy["basis:readability"]["mean"] == pytest.approx(0.56) and accuracy["basis:readability"]["std"] == 0
  assert accuracy["basis:formality"]["mean"] == pytest.approx(0.71) and accuracy["basis:formality"]["std"] == 0
  assert summary["attribute_shift"]["readability"]["shift"]["mean"] == 1.0
  assert summary["attribute_shift"]["formality"]["shift"]["mean"] == 2.0
  assert any("data.attributes" in note for note in summary["notes"])  # The order is a config difference.


def test_heads_not_in_every_run_are_named_with_the_reason(tmp_path):
  runs = [_main_run(tmp_path / "s0", users=2), _main_run(tmp_path / "s1", users=3)]
  text = summarize_runs.format_summary(summarize_runs.summarize(summarize_runs.load_runs(runs)))
  assert "heads not in every run (the runs have 2, 3 users), left out: bespoke:2 (1 of 2 runs)" in text
  assert "held-out pair accuracy per head: basis:a 0.60 (0.00); basis:b 0.60 (0.00); bespoke:0" in text
  assert f"users.num_users ({runs[0]}: 2, {runs[1]}: 3)" in text  # Each value with its run.
  assert f"the runs' sizes differ: users ({runs[0]}: 2, {runs[1]}: 3)" in text


def test_runs_without_a_config_have_their_sizes_compared(tmp_path):
  """A config-less run with other evaluation sizes was pooled with only the generic "settings are not checked"; and
  a note's values were listed bare, so that three runs' two values read as if in argument order."""
  first = _main_run(tmp_path / "s0")
  second = _main_run(tmp_path / "s1", accuracy=[0.7] * 4, config=False)
  results = json.loads((tmp_path / "s1" / "results.json").read_text())
  (tmp_path / "s1" / "results.json").write_text(json.dumps({**results, "comparisons_per_user": 16}))
  notes = summarize_runs.summarize(summarize_runs.load_runs([first, second]))["notes"]
  assert f"the runs' sizes differ: comparisons_per_user ({first}: 2, {second}: 16)" in notes, notes
  assert not any("configs differ" in note for note in notes)  # One config only: nothing to compare it with.


@pytest.mark.parametrize("case, message", [
    ("twice", "is given twice: each run must be given once"),
    ("link", "is the same workdir as"),
    ("copy", "holds the same results.json as"),
    ("dev", "the runs mix eval.split values: 'dev' ("),
    ("attributes", "the runs score different attribute sets: ['a', 'b'] ("),
])
def test_runs_that_must_not_be_pooled_are_refused(tmp_path, case, message):
  first = _main_run(tmp_path / "s0", accuracy=[0.6, 0.7, 0.8, 0.9])
  second = {
      "twice": lambda: first,
      "link": lambda: (os.symlink(first, tmp_path / "link"), str(tmp_path / "link"))[1],
      "copy": lambda: _main_run(tmp_path / "s1", accuracy=[0.6, 0.7, 0.8, 0.9]),
      "dev": lambda: _main_run(tmp_path / "s1", split="dev"),
      "attributes": lambda: _main_run(tmp_path / "s1", attributes=("a", "c")),
  }[case]()
  with pytest.raises(ValueError, match=re.escape(message)):
    summarize_runs.summarize(summarize_runs.load_runs([first, second]))


def test_the_table_says_which_split_it_summarizes(tmp_path):
  """A summary of dev runs (tuning) read like held-out results."""
  dev = [_main_run(tmp_path / f"d{i}", split="dev", accuracy=[0.5 + 0.1 * i] * 4) for i in range(2)]
  summary = summarize_runs.summarize(summarize_runs.load_runs(dev))
  assert summary["split"] == "dev"
  assert summarize_runs.format_summary(summary).splitlines()[0].startswith(
      "2 runs, eval.split=dev: training-split users and prompts (tuning), not held-out results")
  held = [_main_run(tmp_path / f"h{i}", accuracy=[0.5 + 0.1 * i] * 4) for i in range(2)]
  text = summarize_runs.format_summary(summarize_runs.summarize(summarize_runs.load_runs(held)))
  assert text.startswith("2 runs, held-out users and prompts: mean (std)")


def test_the_split_is_read_from_results_json_before_config_json(tmp_path):
  first, second = _main_run(tmp_path / "s0"), _main_run(tmp_path / "s1", accuracy=[0.7] * 4, config=False)
  results = json.loads((tmp_path / "s1" / "results.json").read_text())
  results["config"] = {"eval": {"split": "dev"}}
  (tmp_path / "s1" / "results.json").write_text(json.dumps(results))
  with pytest.raises(ValueError, match="mix eval.split"):
    summarize_runs.summarize(summarize_runs.load_runs([first, second]))
  (tmp_path / "s1" / "results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "config"}))
  summary = summarize_runs.summarize(summarize_runs.load_runs([first, second]))  # Unknown split: named.
  assert any(f"no config recorded for {second}" in note for note in summary["notes"])


def test_a_config_json_of_a_later_run_is_refused(tmp_path):
  run = _main_run(tmp_path / "s0")
  config = json.loads((tmp_path / "s0" / "config.json").read_text())
  config["online"]["prompts_per_round"] = 1000
  (tmp_path / "s0" / "config.json").write_text(json.dumps(config))
  with pytest.raises(
      ValueError, match="config.json: online.rounds x online.prompts_per_round = 1000, but .*"
      "comparisons_per_user=2: this config.json belongs to a later run"):
    summarize_runs.load_runs([run])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist (did `python -m experiments.main"),
        ("dir", "results.json is a directory"),
        ("null", "results.json holds null, not the main job's results.json"),
        ("[1]", "results.json holds an array, not the main job's results.json"),
        ('{"methods": ', "results.json: not valid JSON"),
        ("kl", "results.json: methods.bespoke.kl is 'high': expected a finite number."),
        ("no_reference", "results.json: methods has no 'reference' entry"),  # Every gain printed as n/a, exit 0.
        ("no_methods", "results.json: methods has no 'reference' or 'bespoke' entry (it holds [])"),  # An empty table.
        ("heads",
         "results.json: offline.heldout_accuracy is an array: expected an array of 4 numbers (one per head; null for a "
         "head without held-out pairs)."),
    ])
def test_input_errors_are_one_line_naming_the_file(tmp_path, capsys, content, message):
  workdir = tmp_path / "run"
  if content is not None:
    _main_run(workdir)
    path = workdir / "results.json"
    results = json.loads(path.read_text())
    if content == "dir":
      path.unlink()
      path.mkdir()
    elif content == "kl":
      results["methods"]["bespoke"]["kl"] = "high"
      path.write_text(json.dumps(results))
    elif content in ("no_reference", "no_methods"):
      results["methods"] = {} if content == "no_methods" else {
          k: v for k, v in results["methods"].items() if k != "reference"
      }
      path.write_text(json.dumps(results))
    elif content == "heads":
      results["offline"]["heldout_accuracy"] = [0.5]
      path.write_text(json.dumps(results))
    else:
      path.write_text(content)
  assert summarize_runs.main([str(workdir)]) == 2
  out = capsys.readouterr()
  assert out.out == "" and out.err.startswith(f"error: {workdir}") and out.err.count("\n") == 1, out.err
  assert message in out.err, out.err


def test_the_json_path_is_checked_first_and_written_atomically(tmp_path, capsys):
  runs = [_main_run(tmp_path / "s0", accuracy=[0.5, 0.6, float("nan"), 0.7]), _main_run(tmp_path / "s1")]
  missing = str(tmp_path / "nowhere")  # Named only if the output path is fine: the output is checked first.
  for path, message in ((tmp_path, "is a directory: expected a file path"),
                        (tmp_path / "no" / "s.json", "its directory"), (tmp_path / "s1" / "results.json",
                                                                        "is one of the inputs")):
    assert summarize_runs.main([missing, runs[1], f"--json={path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --json={path}") and message in err, err
  out = tmp_path / "summary.json"
  assert summarize_runs.main(runs + [f"--json={out}"]) == 0
  summary = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
  # A head without pairs in one run: the other run's value, no spread (null, not NaN).
  assert summary["heldout_accuracy"]["bespoke:0"] == {"mean": 0.6, "std": None, "min": 0.6, "max": 0.6}
  assert summary["workdirs"] == runs and sorted(os.listdir(tmp_path)) == ["s0", "s1", "summary.json"]


def test_reruns_of_one_seed_missing_accuracies_and_single_runs_are_said(tmp_path):
  """A rerun of a seed differs from the first in its wall times only: refused as the same run; a seed given twice
  with other results is named (it weighs that seed twice); a head without held-out pairs (null accuracy) counts
  only where measured; a single run has no spread (n/a, not 0)."""
  first = _main_run(tmp_path / "s0", accuracy=[0.6, 0.7, None, 0.9])
  rerun = _main_run(tmp_path / "s0_again", accuracy=[0.6, 0.7, None, 0.9])
  for directory, seconds in ((first, 10.0), (rerun, 11.5)):
    path = os.path.join(directory, "results.json")
    results = json.loads(open(path).read())
    results.update(timing_s={"total_s": seconds}, code={"commit": "abc"})
    open(path, "w").write(json.dumps(results))
  with pytest.raises(ValueError, match="holds the same results as .* apart from wall times"):
    summarize_runs.summarize(summarize_runs.load_runs([first, rerun]))
  other = _main_run(tmp_path / "s1", accuracy=[0.8, 0.7, 0.5, 0.9])
  summary = summarize_runs.summarize(summarize_runs.load_runs([first, other]))
  assert any("share seed=0, users.seed=0: reruns of one seed" in note for note in summary["notes"]), summary["notes"]
  assert any("bespoke:0 in 1 of 2 runs" in note for note in summary["notes"]), summary["notes"]
  accuracy = summary["heldout_accuracy"]
  assert accuracy["bespoke:0"] == {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5}
  assert accuracy["basis:a"]["mean"] == pytest.approx(0.7) and accuracy["basis:a"]["std"] == pytest.approx(0.1414, 1e-3)
  single = summarize_runs.format_summary(summarize_runs.summarize(summarize_runs.load_runs([first])))
  assert "+0.400 (n/a) [+0.400, +0.400]" in single and "bespoke:0 n/a (n/a)" in single, single


def test_a_covered_flag_that_is_not_a_boolean_is_refused(tmp_path):
  run = _main_run(tmp_path / "s0")
  path = os.path.join(run, "results.json")
  results = json.loads(open(path).read())
  results["at_bespoke_kl"] = {"soup": {"gain": 0.3, "gain_ci": [0.2, 0.4], "covered": "false"}}
  open(path, "w").write(json.dumps(results))
  with pytest.raises(ValueError, match=r"at_bespoke_kl.soup.covered is 'false': expected true or false"):
    summarize_runs.load_runs([run])
