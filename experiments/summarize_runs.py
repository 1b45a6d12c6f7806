r"""Mean and spread over several runs of the main job (e.g. seeds), from their results.json files.

  python -m experiments.summarize_runs workdir/seed0 workdir/seed1 workdir/seed2 [--json summary.json]

Runs of `experiments.main` with different `--config.seed` / `--config.users.seed` differ in the heads'
initialization and data order, the online rounds, the evaluation samples and the held-out users. This prints, per
method, the mean true reward, its gain over the reference in the same run, and the KL over runs (mean, standard
deviation and range), the bespoke gain of each run and whether it was significant, the normalized score where
every run's bespoke gain was significant, each swept method's gain at the bespoke policy's KL, each basis's shift
of its own attribute, and each head's held-out accuracy; `--json` writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence

from experiments.main import METHOD_ORDER


def load_runs(workdirs: Sequence[str]) -> List[dict]:
  """results.json of every workdir; a missing or unreadable file is an error naming it."""
  runs = []
  for workdir in workdirs:
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no results.json (did `python -m experiments.main --workdir={workdir}` "
                              "finish?).")
    try:
      with open(path) as f:
        runs.append(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from e
    for key in ("methods", "bespoke_gain", "bespoke_gain_significant", "offline"):
      if key not in runs[-1]:
        raise ValueError(f"{path}: missing key {key!r}; expected the main job's results.json.")
  return runs


def _stats(values: Sequence[float]) -> Dict[str, float]:
  values = [float(v) for v in values]
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def summarize(runs: Sequence[dict]) -> dict:
  """{"runs", "methods": {name: {"mean_reward", "gain", "kl", "normalized_score"?}}, "bespoke", "heldout_accuracy"}."""
  all_significant = all(r["bespoke_gain_significant"] for r in runs)
  methods = {}
  for name in METHOD_ORDER:
    if not all(name in r["methods"] for r in runs):
      continue
    entry = {
        "mean_reward": _stats([r["methods"][name]["mean_reward"] for r in runs]),
        "kl": _stats([r["methods"][name]["kl"] for r in runs])
    }
    if all("reference" in r["methods"] for r in runs):  # Gains remove what the runs' user sets share.
      entry["gain"] = _stats(
          [r["methods"][name]["mean_reward"] - r["methods"]["reference"]["mean_reward"] for r in runs])
    if all_significant:
      entry["normalized_score"] = _stats([r["methods"][name]["normalized_score"] for r in runs])
    methods[name] = entry
  # Gains at the bespoke policy's KL along each swept method's frontier (runs that have them).
  at_kl = {}
  for name in METHOD_ORDER:
    if all(name in r.get("at_bespoke_kl", {}) for r in runs):
      at_kl[name] = {
          "gain": _stats([r["at_bespoke_kl"][name]["gain"] for r in runs]),
          "gain_ci": [r["at_bespoke_kl"][name]["gain_ci"] for r in runs]
      }
  # Each basis's shift of its own attribute (the diagonal of offline.attribute_shift), with every run's interval.
  shift = {}
  if all("attribute_shift" in r["offline"] for r in runs) and all(
      r["attributes"] == runs[0]["attributes"] for r in runs):
    for k, attribute in enumerate(runs[0]["attributes"]):
      shift[attribute] = {
          "shift": _stats([r["offline"]["attribute_shift"][k][k] for r in runs]),
          "ci": [r["offline"]["attribute_shift_ci"][k][k] for r in runs]
      }
  heads = runs[0]["offline"]["heads"]
  accuracy = {
      head: _stats([r["offline"]["heldout_accuracy"][h] for r in runs]) for h, head in enumerate(heads) if all(
          len(r["offline"]["heldout_accuracy"]) == len(heads) for r in runs)
  }
  return {
      "runs": len(runs),
      "methods": methods,
      "bespoke": {
          "gain": [r["bespoke_gain"] for r in runs],
          "gain_ci": [r.get("bespoke_gain_ci") for r in runs],
          "significant": [bool(r["bespoke_gain_significant"]) for r in runs],
          "all_significant": all_significant
      },
      "heldout_accuracy": accuracy,
      "at_bespoke_kl": at_kl,
      "attribute_shift": shift,
  }


def format_summary(summary: dict) -> str:
  lines = [
      f"{summary['runs']} runs: mean (std) [min, max] over runs", "",
      f"{'method':<24} {'mean true reward':>34} {'gain over the reference':>34} {'KL':>34}" +
      (f" {'normalized score':>24}" if summary["bespoke"]["all_significant"] else "")
  ]
  fmt = lambda s: f"{s['mean']:+.3f} ({s['std']:.3f}) [{s['min']:+.3f}, {s['max']:+.3f}]"
  for name, entry in summary["methods"].items():
    gain = fmt(entry["gain"]) if "gain" in entry else "n/a"
    line = f"{name:<24} {fmt(entry['mean_reward']):>34} {gain:>34} {fmt(entry['kl']):>34}"
    if "normalized_score" in entry:
      line += f" {fmt(entry['normalized_score']):>24}"
    lines.append(line)
  lines.append("")
  gains = ", ".join(f"{g:+.3f}" + ("" if s else " (n.s.)")
                    for g, s in zip(summary["bespoke"]["gain"], summary["bespoke"]["significant"]))
  lines.append(f"bespoke gain over the reference per run: {gains}")
  if not summary["bespoke"]["all_significant"]:
    lines.append("not every run's bespoke gain is significant: normalized scores are not aggregated")
  if summary.get("at_bespoke_kl"):
    lines += ["", "gain over the reference at the bespoke policy's KL (along each method's frontier):"]
    for name, entry in summary["at_bespoke_kl"].items():
      lines.append(f"  {name:<24} {fmt(entry['gain'])}")
  if summary.get("attribute_shift"):
    lines += ["", "shift of each basis's own attribute (SD, sampled responses vs the reference's):"]
    for attribute, entry in summary["attribute_shift"].items():
      above = sum(ci[0] > 0 for ci in entry["ci"])
      lines.append(f"  {attribute:<24} {fmt(entry['shift'])}, 90% interval above 0 in {above} of "
                   f"{len(entry['ci'])} runs")
  lines.append("")
  lines.append("held-out pair accuracy per head: " +
               "; ".join(f"{head} {s['mean']:.2f} ({s['std']:.2f})" for head, s in summary["heldout_accuracy"].items()))
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="workdirs of finished runs of experiments.main")
  parser.add_argument("--json", default="", help="also write the summary here")
  args = parser.parse_args(argv)
  summary = summarize(load_runs(args.workdirs))
  summary["workdirs"] = list(args.workdirs)
  print(format_summary(summary))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)


if __name__ == "__main__":
  main(sys.argv[1:])
