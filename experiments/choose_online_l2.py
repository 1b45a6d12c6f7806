r"""The online learners' penalties, chosen on a dev run's comparisons by cross-validated choice prediction.

  python -m experiments.main --config=configs/demo.py --workdir=workdir/dev --config.eval.split=dev
  python -m experiments.choose_online_l2 workdir/dev [workdir/dev_seed1 ...] [--l2s=1,3,10,30,100] [--json F]

Reads each run's `comparisons.npz` (every user's comparisons: the spectral features, PAD's predicted attribute
vectors and the choices) and `config.json`, and prints, per learner and penalty, the held-out log-likelihood and
accuracy of the users' choices (`spectral_soup.online.selection`): spectral lambda with the run's constraint and
prior, P-Soups on the simplex, PAD's user weights. Spectral and P-Soups use the run's `online.features`; where the
runs also saved the other kind (`implicit_features`: the bases' implicit rewards, `pad_features`: the reward
model's predicted attributes), they are scored on it too, as `spectral@KIND` and `p_soups@KIND`. Runs must be dev
runs (`--config.eval.split=dev`): the held-out users and prompts choose nothing. The penalties with the best
log-likelihood go to `online.l2` (spectral and P-Soups share it: the same features) and `online.pad_weights_l2`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from typing import Dict, Optional, Sequence

import numpy as np

from spectral_soup.utils import errors
from spectral_soup.utils import files

# (learner, features in comparisons.npz, constraint; None: the run's online.constraint).
LEARNERS = (("spectral", "features", None), ("p_soups", "features", "simplex"), ("pad", "pad_features", "none"))
# online.features -> the comparisons.npz field holding that kind of features.
FEATURE_FIELDS = {"implicit_reward": "implicit_features", "reward_model": "pad_features"}


def load_dev_run(workdir: str) -> Dict[str, np.ndarray]:
  """comparisons.npz and the online config of a dev run; anything else is an error naming the file."""
  config_path, data_path = os.path.join(workdir, "config.json"), os.path.join(workdir, "comparisons.npz")
  missing = lambda path: FileNotFoundError(f"{path}: missing (expected a finished `python -m experiments.main` "
                                           "workdir).")
  if not os.path.exists(config_path):
    raise missing(config_path)
  config = files.read_json_object(config_path, "the main job's config")
  split = config.get("eval", {}).get("split")
  if split != "dev":
    raise ValueError(f"{config_path}: eval.split={split!r}; penalties are chosen on dev runs only "
                     "(--config.eval.split=dev), never on the held-out users.")
  if not os.path.exists(data_path):
    raise missing(data_path)
  try:
    with np.load(data_path, allow_pickle=False) as data:
      arrays = {name: np.asarray(data[name]) for name in data.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{data_path}: not a readable .npz of the main job's comparisons (truncated or another "
                     f"file?): {type(e).__name__}: {e}") from None
  missing = {"features", "pad_features", "prefs"} - set(arrays)
  if missing:
    raise ValueError(f"{data_path}: missing {sorted(missing)}; expected the main job's comparisons.")
  run = {name: arrays[name] for name in ("features", "pad_features", "prefs", "implicit_features") if name in arrays}
  for name, array in run.items():  # Every comparison is recorded (no missing rows): a non-finite entry is damage.
    if array.dtype.kind not in "biuf":
      raise ValueError(f"{data_path}: {name} has dtype {array.dtype}: expected numbers.")
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
      where = tuple(int(i) for i in bad[0])
      row = f"user {where[0]}, comparison {where[1]}; " if len(where) >= 2 else ""
      count = f"{len(bad)} non-finite entr{'y' if len(bad) == 1 else 'ies'} in all"
      raise ValueError(f"{data_path}: {name}[{', '.join(map(str, where))}] is {array[where]} ({row}{count}): "
                       "expected finite features and choices (a damaged file?).")
  online = config.get("online", {})
  run["kind"] = online.get("features", "implicit_reward")
  num_bases = run["features"].shape[-1]
  prior = online.get("prior_mean", 0.0)
  run["prior_mean"] = np.full(num_bases, 1.0 / num_bases if prior < 0 else prior, np.float32)
  run["constraint"] = online.get("constraint", "none")
  return run


def choose(workdirs: Sequence[str], l2s: Sequence[float], folds: int = 8) -> dict:
  """{learner: {"l2", "log_likelihood", "accuracy": [P] pooled over runs, "best_l2"}}."""
  for i, workdir in enumerate(workdirs):
    for earlier in workdirs[:i]:
      if os.path.realpath(workdir) == os.path.realpath(earlier):
        same = "is given twice" if workdir == earlier else f"is the same workdir as {earlier}"
        raise ValueError(f"{workdir} {same}: each dev run must be given once (its comparisons would count twice).")
  runs = [load_dev_run(w) for w in workdirs]
  from spectral_soup.online import selection  # pylint: disable=g-import-not-at-top
  for key in ("constraint", "kind"):
    if len({r[key] for r in runs}) > 1:
      field = "features" if key == "kind" else key
      raise ValueError(f"The runs use different online.{field} values: {[r[key] for r in runs]}.")
  # (learner, field, constraint, kind of features): the run's own, then the other kind where every run saved it.
  learners = [(name, field, constraint, runs[0]["kind"] if field == "features" else "reward_model")
              for name, field, constraint in LEARNERS]
  for kind, field in FEATURE_FIELDS.items():
    if kind != runs[0]["kind"] and all(field in r for r in runs):
      learners += [(f"spectral@{kind}", field, None, kind), (f"p_soups@{kind}", field, "simplex", kind)]
  out = {}
  for name, field, constraint, kind in learners:
    constraint = constraint or runs[0]["constraint"]
    prior = lambda run: run["prior_mean"] if name.startswith("spectral") else None  # PAD, P-Soups: none.
    results = [
        selection.cross_validate(run[field], run["prefs"], l2s, constraint=constraint, prior_mean=prior(run),
                                 folds=folds) for run in runs
    ]
    counts = np.asarray([run["prefs"].size for run in runs], np.float64)
    pooled = {
        key: np.average([r[key] for r in results], axis=0, weights=counts) for key in ("log_likelihood", "accuracy")
    }
    finite = np.isfinite(pooled["log_likelihood"])
    if not finite.all():  # A fit that diverged: no penalty is chosen from a row that is not all numbers.
      print(
          f"warning: {name}: the held-out log-likelihood is not finite at l2="
          f"{', '.join(f'{x:g}' for x, ok in zip(l2s, finite) if not ok)}: no penalty chosen for it.", file=sys.stderr,
          flush=True)
    out[name] = {
        "constraint": constraint,
        "features": kind,
        "l2": [float(x) for x in l2s],
        "log_likelihood": [float(x) if np.isfinite(x) else None for x in pooled["log_likelihood"]],
        "accuracy": [float(x) if np.isfinite(x) else None for x in pooled["accuracy"]],
        "best_l2": float(l2s[int(np.argmax(pooled["log_likelihood"]))]) if finite.all() else None
    }
  return out


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.choose_online_l2", description=__doc__.split("\n")[0])
  p.add_argument("workdirs", nargs="+", help="Workdirs of finished dev runs of experiments.main.")
  p.add_argument("--l2s", default="0.3,1,3,10,30,100,300", help="Comma-separated penalties to compare.")
  p.add_argument("--folds", type=int, default=8, help="Folds of every user's comparisons.")
  p.add_argument("--json", default="", help="Where to write the numbers (JSON).")
  args = p.parse_args(argv)
  try:
    l2s = [float(x) for x in args.l2s.split(",") if x.strip()]
  except ValueError:
    p.error(f"--l2s={args.l2s!r}: expected comma-separated numbers.")
  # The flags before any run is read (they were named by cross_validate, without "--", after every run loaded).
  low, high = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)  # What the fits take (no NaN).
  bad = [x for x in l2s if not low <= x <= high]
  if not l2s or bad:
    p.error(f"--l2s={args.l2s!r}: expected comma-separated finite numbers > 0 that float32 holds, in "
            f"[{low:.3g}, {high:.3g}]{f' (not {bad[0]:g})' if bad else ''}.")
  if len(set(l2s)) != len(l2s):  # Two identical columns.
    p.error(f"--l2s={args.l2s!r} repeats a penalty: expected distinct values.")
  if args.folds < 2:
    p.error(f"--folds={args.folds}: expected an integer >= 2 (and at most the comparisons per user).")
  try:
    if args.json:
      inputs = [os.path.join(w, name) for w in args.workdirs for name in ("config.json", "comparisons.npz")]
      files.check_output_file("--json", args.json, inputs)
    out = choose(args.workdirs, l2s, args.folds)
  except (OSError, ValueError) as e:
    print(f"error: {errors.message_of(e)}", file=sys.stderr)
    return 2
  print(f"held-out choice prediction ({args.folds}-fold per user) over {len(args.workdirs)} dev run(s)")
  print(f"{'learner':<24} {'features':<16} {'constraint':<12} " + " ".join(f"{f'l2={x:g}':>14}" for x in l2s) +
        "  best")
  for name, r in out.items():
    cells = " ".join(("-" if ll is None else f"{ll:+.3f}/{acc:.3f}").rjust(14)
                     for ll, acc in zip(r["log_likelihood"], r["accuracy"]))
    best = "-" if r["best_l2"] is None else f"{r['best_l2']:g}"
    print(f"{name:<24} {r['features']:<16} {r['constraint']:<12} {cells}  {best}")
  print("(each cell: mean held-out log-likelihood per comparison / accuracy)")
  if args.json:
    report = {"name": "choose_online_l2", "workdirs": list(args.workdirs), "folds": args.folds, "learners": out}
    files.write_text_atomic(args.json, json.dumps(report, indent=2, allow_nan=False) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
