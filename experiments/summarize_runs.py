r"""Mean and spread over several runs of the main job (e.g. seeds), from their results.json files.

  python -m experiments.summarize_runs workdir/seed0 workdir/seed1 workdir/seed2 [--json summary.json]

Runs of `experiments.main` with different `--config.seed` / `--config.users.seed` differ in the heads'
initialization and data order, the online rounds, the evaluation samples and the held-out users. This prints, per
method, the mean true reward, its gain over the reference in the same run, and the KL over runs (mean, standard
deviation and range), the bespoke gain of each run and whether it was significant, the normalized score where
every run's bespoke gain was significant, each swept method's gain at the bespoke policy's KL, each basis's shift
of its own attribute, and each head's held-out accuracy; `--json` writes the same numbers.

Heads and attributes are matched by name, so runs may list their attributes in another order. Refused, naming the
workdirs: a workdir given twice (or a copy of the same run), runs of different attribute sets, and dev runs
(`eval.split=dev`) mixed with held-out ones. The split and the other settings are read from the config that
results.json records, else from the workdir's config.json (which must agree with results.json: a later run into
the same workdir rewrites it first). Other config differences than `seed` and `users.seed`, and heads or methods
that not every run has, are named in notes above the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from experiments.main import METHOD_ORDER
from spectral_soup.offline import resume
from spectral_soup.utils import errors
from spectral_soup.utils import files

REQUIRED_KEYS = ("methods", "bespoke_gain", "bespoke_gain_significant", "offline")
SEED_FIELDS = ("seed", "users.seed")  # What the runs of a seed sweep differ in.
# results.json keys that record how a run ran (wall times, decode speeds, the code's version), not what it found.
_RUN_RECORD_KEYS = ("timing_s", "decoding", "code")
# config.json field -> the results.json key the main job copies it to: a config.json that disagrees belongs to a
# later run into the same workdir.
_RESULTS_OF_CONFIG = (("data.attributes", "attributes"), ("users.num_users", "users"), ("users.kind", "user_kind"),
                      ("online.rounds", "rounds"), ("eval.samples_per_prompt", "samples_per_prompt"))

# results.json keys that record the evaluation's sizes (compared across runs, with or without a config).
_RUN_SIZE_KEYS = ("users", "user_kind", "rounds", "comparisons_per_user", "eval_prompts", "samples_per_prompt")


def _json_kind(value: Any) -> str:
  return {
      type(None): "null",
      bool: "a boolean",
      str: "a string",
      list: "an array",
      dict: "an object"
  }.get(type(value), "a number")


def _read_json(path: str, missing: str) -> Any:
  """The JSON value in `path`; FileNotFoundError (with `missing`) or ValueError naming the file otherwise."""
  if not os.path.lexists(path):
    raise FileNotFoundError(f"{path}: {missing}")
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory: expected the file the main job writes.")
  try:
    with open(path) as f:
      return json.load(f)
  except OSError as e:
    raise ValueError(f"{path}: cannot be read ({e.strerror or e}).") from None
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
    raise ValueError(f"{path}: not valid JSON ({e}).") from None


def _is_number(value: Any, finite: bool = True) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def _check_results(path: str, results: Any) -> None:
  """Raises ValueError naming `path` and the field unless `results` has what `summarize` reads, well typed."""
  if not isinstance(results, dict):
    raise ValueError(f"{path} holds {_json_kind(results)}, not the main job's results.json (expected an object with "
                     f"{', '.join(REQUIRED_KEYS)}).")
  for key in REQUIRED_KEYS:
    if key not in results:
      raise ValueError(f"{path}: missing key {key!r}; expected the main job's results.json.")

  def need(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
      shown = repr(value) if _is_number(value, finite=False) or isinstance(value, str) else _json_kind(value)
      raise ValueError(f"{path}: {field} is {shown}: expected {expected}.")

  methods, offline = results["methods"], results["offline"]
  need(isinstance(methods, dict), "methods", methods, "an object {method: {mean_reward, kl, ...}}")
  absent = [name for name in ("reference", "bespoke") if name not in methods]
  if absent:  # The main job writes both; without the reference every gain printed as n/a.
    raise ValueError(f"{path}: methods has no {' or '.join(repr(a) for a in absent)} entry (it holds "
                     f"{sorted(methods)}): expected the main job's results.json, which has both.")
  for name, entry in methods.items():
    need(isinstance(entry, dict), f"methods.{name}", entry, "an object {mean_reward, kl, ...}")
    for key in ("mean_reward", "kl"):
      need(_is_number(entry.get(key)), f"methods.{name}.{key}", entry.get(key), "a finite number")
  need(_is_number(results["bespoke_gain"]), "bespoke_gain", results["bespoke_gain"], "a finite number")
  need(isinstance(results["bespoke_gain_significant"], bool), "bespoke_gain_significant",
       results["bespoke_gain_significant"], "true or false")
  if results["bespoke_gain_significant"]:  # Then the normalized scores are aggregated.
    for name, entry in methods.items():
      need(_is_number(entry.get("normalized_score")), f"methods.{name}.normalized_score", entry.get("normalized_score"),
           "a finite number (the run's bespoke gain is significant)")
  need(isinstance(offline, dict), "offline", offline, "an object {heads, heldout_accuracy, ...}")
  heads, accuracy = offline.get("heads"), offline.get("heldout_accuracy")
  need(
      isinstance(heads, list) and all(isinstance(h, str) for h in heads) and len(set(heads)) == len(heads),
      "offline.heads", heads, "an array of distinct head names")
  need(
      isinstance(accuracy, list) and len(accuracy) == len(heads) and
      all(a is None or _is_number(a, finite=False) for a in accuracy), "offline.heldout_accuracy", accuracy,
      f"an array of {len(heads)} numbers (one per head; null for a head without held-out pairs)")
  attributes = results.get("attributes")
  if attributes is not None:
    need(
        isinstance(attributes, list) and all(isinstance(a, str) for a in attributes) and
        len(set(attributes)) == len(attributes), "attributes", attributes, "an array of distinct attribute names")
  if "attribute_shift" in offline:
    need(attributes is not None, "attributes", attributes, "the attribute names (offline.attribute_shift is given)")
    k = len(attributes)
    shift, ci = offline["attribute_shift"], offline.get("attribute_shift_ci")
    need(
        isinstance(shift, list) and len(shift) == k and
        all(isinstance(row, list) and len(row) == k and _is_number(row[i]) for i, row in enumerate(shift)),
        "offline.attribute_shift", shift, f"a {k} x {k} array of finite numbers (basis x attribute)")
    need(
        isinstance(ci, list) and len(ci) == k and all(
            isinstance(row, list) and len(row) == k and isinstance(row[i], list) and len(row[i]) == 2 and all(
                _is_number(x) for x in row[i]) for i, row in enumerate(ci)), "offline.attribute_shift_ci", ci,
        f"a {k} x {k} x 2 array of finite numbers (the shift's intervals)")
  need(
      results.get("config") is None or isinstance(results["config"], dict), "config", results.get("config"),
      "an object (the run's config)")
  at_kl = results.get("at_bespoke_kl", {})
  need(isinstance(at_kl, dict), "at_bespoke_kl", at_kl, "an object {method: {gain, gain_ci}}")
  for name, entry in at_kl.items():
    need(
        isinstance(entry, dict) and _is_number(entry.get("gain")), f"at_bespoke_kl.{name}", entry,
        "an object with a finite gain")
    need(isinstance(entry.get("covered", True), bool), f"at_bespoke_kl.{name}.covered", entry.get("covered"),
         "true or false")


def _workdir_config(workdir: str, results_path: str, results: dict) -> Optional[dict]:
  """The workdir's config.json (None if there is none), checked against what results.json says of its run."""
  path = os.path.join(workdir, "config.json")
  if not os.path.lexists(path):
    return None
  config = _read_json(path, "missing")
  if not isinstance(config, dict):
    raise ValueError(f"{path} holds {_json_kind(config)}, not the main job's config (expected an object).")
  flat = resume.flatten(config)
  for field, key in _RESULTS_OF_CONFIG:
    if field in flat and key in results and flat[field] != results[key]:
      raise ValueError(f"{path}: {field}={flat[field]!r}, but {results_path} has {key}={results[key]!r}: this "
                       "config.json belongs to a later run into the same workdir (one that did not finish?), so "
                       "the run's eval.split and settings are unknown; finish that run or use another workdir.")
  expected = flat.get("online.rounds", 0) * flat.get("online.prompts_per_round", 0)
  if expected and "comparisons_per_user" in results and results["comparisons_per_user"] != expected:
    raise ValueError(f"{path}: online.rounds x online.prompts_per_round = {expected}, but {results_path} has "
                     f"comparisons_per_user={results['comparisons_per_user']!r}: this config.json belongs to a later "
                     "run into the same workdir (one that did not finish?); finish that run or use another workdir.")
  return config


def load_runs(workdirs: Sequence[str]) -> List[dict]:
  """results.json of every workdir, each with "workdir" (as given) and "config" added: the config results.json
  records, else the workdir's config.json, else None. A missing, unreadable or malformed file is an error naming
  it (FileNotFoundError for a missing results.json, ValueError otherwise)."""
  runs = []
  for workdir in workdirs:
    path = os.path.join(workdir, "results.json")
    where = "no results.json" if os.path.isdir(workdir) else f"{workdir} does not exist"
    results = _read_json(path, f"{where} (did `python -m experiments.main --workdir={workdir}` finish?).")
    _check_results(path, results)
    config = results.get("config")
    if not isinstance(config, dict):
      config = _workdir_config(workdir, path, results)
    runs.append({**results, "workdir": workdir, "config": config})
  return runs


def _names(runs: Sequence[dict], indices: Sequence[int]) -> str:
  return ", ".join(str(runs[i].get("workdir", f"run {i}")) for i in indices)


def _check_comparable(runs: Sequence[dict]) -> List[str]:
  """Raises ValueError for runs that must not be pooled; returns notes on the differences that may be."""
  if not runs:
    raise ValueError("no runs to summarize.")
  own = lambda run: {k: v for k, v in run.items() if k != "workdir"}
  # What differs between two runs of the same job and config: wall times and the code's record.
  results_of = lambda run: {k: v for k, v in own(run).items() if k not in _RUN_RECORD_KEYS}
  for i, run in enumerate(runs):
    for j in range(i):
      where = (runs[j].get("workdir"), run.get("workdir"))
      if None not in where and os.path.realpath(where[0]) == os.path.realpath(where[1]):
        same = "is given twice" if where[0] == where[1] else f"is the same workdir as {where[0]}"
        raise ValueError(f"{where[1]} {same}: each run must be given once (a run given twice counts twice and "
                         "shrinks the spread).")
      if own(run) == own(runs[j]):
        raise ValueError(f"{_names(runs, [i])} holds the same results.json as {_names(runs, [j])}: the same run "
                         "given twice (a copy?); each run must be given once.")
      if results_of(run) == results_of(runs[j]):
        raise ValueError(f"{_names(runs, [i])} holds the same results as {_names(runs, [j])} apart from wall times "
                         "and the code's record: the same run repeated; each run must be given once (it would count "
                         "twice and shrink the spread).")
  splits = {}
  for i, run in enumerate(runs):
    if run.get("config") is not None:
      splits.setdefault(resume.flatten(run["config"]).get("eval.split", "heldout"), []).append(i)
  if len(splits) > 1:
    raise ValueError("the runs mix eval.split values: " +
                     "; ".join(f"{s!r} ({_names(runs, idx)})" for s, idx in sorted(splits.items())) +
                     ": summarize dev runs (tuning) and held-out runs separately.")
  attribute_sets = {}
  for i, run in enumerate(runs):
    names = run.get("attributes") or [h.split(":", 1)[1] for h in run["offline"]["heads"] if h.startswith("basis:")]
    attribute_sets.setdefault(tuple(sorted(names)), []).append(i)
  if len(attribute_sets) > 1:
    raise ValueError("the runs score different attribute sets: " +
                     "; ".join(f"{list(s)} ({_names(runs, idx)})" for s, idx in attribute_sets.items()) +
                     ": their bases and methods are not comparable; summarize each attribute set separately.")
  notes = []
  seeds = {}
  for i, run in enumerate(runs):
    if run.get("config") is not None:
      flat = resume.flatten(run["config"])
      seeds.setdefault(tuple(flat.get(k) for k in SEED_FIELDS), []).append(i)
  for seed, indices in seeds.items():
    if len(indices) > 1:
      notes.append(f"{_names(runs, indices)} share {', '.join(f'{k}={v!r}' for k, v in zip(SEED_FIELDS, seed))}: "
                   "reruns of one seed, which weigh it more and shrink the spread (seed sweeps differ in these)")
  unknown = [i for i, run in enumerate(runs) if run.get("config") is None]
  if unknown:
    notes.append(f"no config recorded for {_names(runs, unknown)} (results.json has none and there is no "
                 "config.json): its eval.split and settings are not checked")
  # Each value named with its run: listed bare, the values of three runs read as if they were in argument order.
  absent = object()
  shown = lambda run, value: f"{run.get('workdir', '?')}: {'(absent)' if value is absent else repr(value)}"
  # The evaluation's sizes as every results.json records them, with or without a config.
  sizes = [k for k in _RUN_SIZE_KEYS if any(run.get(k, absent) != runs[0].get(k, absent) for run in runs)]
  if sizes:
    notes.append("the runs' sizes differ: " +
                 "; ".join(f"{k} ({', '.join(shown(run, run.get(k, absent)) for run in runs)})" for k in sizes))
  configured = [(run, resume.flatten(run["config"])) for run in runs if run.get("config") is not None]
  if len(configured) > 1:
    fields = sorted({k for _, f in configured for k in f} - set(SEED_FIELDS))
    differ = [k for k in fields if any(f.get(k, absent) != configured[0][1].get(k, absent) for _, f in configured)]
    if differ:
      notes.append("the runs' configs differ beyond seed and users.seed: " + "; ".join(
          f"{k} ({', '.join(shown(run, f.get(k, absent)) for run, f in configured)})" for k in differ))
  return notes


def _stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
  """Mean, standard deviation (n - 1), min and max over the finite values (None or NaN: no value); None for what
  they do not define (the spread of a single value, anything of none)."""
  values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not values:
    return {"mean": None, "std": None, "min": None, "max": None}
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean)**2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
  return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def _in_every_run(runs: Sequence[dict], names_of, what: str, notes: List[str], why: str = "") -> List[str]:
  """The names (in METHOD_ORDER, then first-seen order) every run has; a note for those only some runs have."""
  seen = []
  for run in runs:
    seen += [n for n in names_of(run) if n not in seen]
  seen = [n for n in METHOD_ORDER if n in seen] + [n for n in seen if n not in METHOD_ORDER]
  counts = {n: sum(n in names_of(run) for run in runs) for n in seen}
  partial = [n for n in seen if counts[n] < len(runs)]
  if partial:
    notes.append(f"{what} not in every run{why}, left out: " +
                 ", ".join(f"{n} ({counts[n]} of {len(runs)} runs)" for n in partial))
  return [n for n in seen if counts[n] == len(runs)]


def summarize(runs: Sequence[dict]) -> dict:
  """{"runs", "methods": {name: {"mean_reward", "gain", "kl", "normalized_score"?}}, "bespoke", "heldout_accuracy",
  "at_bespoke_kl", "attribute_shift", "notes"}; runs as `load_runs` returns them. Raises ValueError for runs that
  must not be pooled (the same run twice, dev and held-out runs, different attribute sets)."""
  notes = _check_comparable(runs)
  all_significant = all(r["bespoke_gain_significant"] for r in runs)
  methods = {}
  for name in _in_every_run(runs, lambda r: r["methods"], "methods", notes):
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
  for name in _in_every_run(runs, lambda r: r.get("at_bespoke_kl", {}), "gains at the bespoke KL", notes):
    at_kl[name] = {
        "gain": _stats([r["at_bespoke_kl"][name]["gain"] for r in runs]),
        "gain_ci": [r["at_bespoke_kl"][name].get("gain_ci") for r in runs],
        # False where the bespoke KL lies beyond the run's sweep: its gain is the largest-KL point's, not read at
        # the bespoke KL (a lower bound for a method whose gain still grows with KL).
        "covered": [bool(r["at_bespoke_kl"][name].get("covered", True)) for r in runs]
    }
  # Each basis's shift of its own attribute (the diagonal of offline.attribute_shift), matched by attribute name.
  shift = {}
  with_shift = sum("attribute_shift" in r["offline"] for r in runs)
  if 0 < with_shift < len(runs):
    notes.append(f"attribute shifts not in every run ({with_shift} of {len(runs)} runs), left out")
  if with_shift == len(runs):
    for attribute in runs[0]["attributes"]:
      own = [r["attributes"].index(attribute) for r in runs]
      shift[attribute] = {
          "shift": _stats([r["offline"]["attribute_shift"][k][k] for r, k in zip(runs, own)]),
          "ci": [r["offline"]["attribute_shift_ci"][k][k] for r, k in zip(runs, own)]
      }
  # Held-out accuracy per head, matched by head name.
  accuracy_of = [dict(zip(r["offline"]["heads"], r["offline"]["heldout_accuracy"])) for r in runs]
  users = sorted({r["users"] for r in runs if isinstance(r.get("users"), int)})
  why = f" (the runs have {', '.join(map(str, users))} users)" if len(users) > 1 else ""
  heads = _in_every_run(runs, lambda r: r["offline"]["heads"], "heads", notes, why)
  accuracy = {head: _stats([acc[head] for acc in accuracy_of]) for head in heads}
  unmeasured = {head: sum(acc[head] is None or not math.isfinite(acc[head]) for acc in accuracy_of) for head in heads}
  unmeasured = {head: n for head, n in unmeasured.items() if n}
  if unmeasured:
    notes.append("held-out accuracy without a value (a head without held-out pairs): " +
                 ", ".join(f"{head} in {n} of {len(runs)} runs" for head, n in unmeasured.items()) +
                 "; its statistics are over the runs that have one")
  splits = {resume.flatten(r["config"]).get("eval.split", "heldout") for r in runs if r.get("config") is not None}
  return {
      "runs": len(runs),
      "split": splits.pop() if len(splits) == 1 else None,  # Mixed splits are refused above; None: not recorded.
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
      "notes": notes,
  }


def format_summary(summary: dict) -> str:
  split = {
      "dev": ", eval.split=dev: training-split users and prompts (tuning), not held-out results",
      "heldout": ", held-out users and prompts"
  }.get(summary.get("split"), "")
  lines = [f"{summary['runs']} runs{split}: mean (std) [min, max] over runs"]
  lines += [f"note: {note}" for note in summary.get("notes", ())]
  lines += [
      "", f"{'method':<24} {'mean true reward':>34} {'gain over the reference':>34} {'KL':>34}" +
      (f" {'normalized score':>24}" if summary["bespoke"]["all_significant"] else "")
  ]
  num = lambda x, spec: "n/a" if x is None else format(x, spec)
  fmt = lambda s: (f"{num(s['mean'], '+.3f')} ({num(s['std'], '.3f')}) "
                   f"[{num(s['min'], '+.3f')}, {num(s['max'], '+.3f')}]")
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
      beyond = [i for i, covered in enumerate(entry.get("covered", ())) if not covered]
      note = (f"  (in {len(beyond)} of {len(entry['covered'])} runs the bespoke KL lies beyond the sweep: their "
              "gain is the largest-KL point's)") if beyond else ""
      lines.append(f"  {name:<24} {fmt(entry['gain'])}{note}")
  if summary.get("attribute_shift"):
    lines += ["", "shift of each basis's own attribute (SD, sampled responses vs the reference's):"]
    for attribute, entry in summary["attribute_shift"].items():
      above = sum(ci[0] > 0 for ci in entry["ci"])
      lines.append(f"  {attribute:<24} {fmt(entry['shift'])}, 90% interval above 0 in {above} of "
                   f"{len(entry['ci'])} runs")
  lines.append("")
  if summary["heldout_accuracy"]:
    lines.append("held-out pair accuracy per head: " + "; ".join(
        f"{head} {num(s['mean'], '.2f')} ({num(s['std'], '.2f')})" for head, s in summary["heldout_accuracy"].items()))
  else:
    lines.append("held-out pair accuracy per head: no head is in every run (see the notes)")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.summarize_runs", description=__doc__.split("\n\n")[0])
  parser.add_argument("workdirs", nargs="+", help="workdirs of finished runs of experiments.main")
  parser.add_argument("--json", default="", help="also write the summary here")
  args = parser.parse_args(argv)
  try:
    if args.json:
      inputs = [os.path.join(w, name) for w in args.workdirs for name in ("results.json", "config.json")]
      files.check_output_file("--json", args.json, inputs)
    summary = summarize(load_runs(args.workdirs))
  except (OSError, ValueError) as e:
    print(f"error: {errors.message_of(e)}", file=sys.stderr, flush=True)
    return 2
  summary["workdirs"] = list(args.workdirs)
  print(format_summary(summary))
  if args.json:
    files.write_text_atomic(args.json, json.dumps(files.finite_or_none(summary), indent=2, allow_nan=False) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
