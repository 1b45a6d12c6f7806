r"""Which attributes can a basis learn from these pairs? Linear probes next to the trained bases' accuracy.

  python -m experiments.train_basis --config=configs/train_basis_embedded.py --workdir=workdir/basis_embedded
  python -m experiments.attribute_learnability --config=configs/train_basis_embedded.py \
      --workdir=workdir/basis_embedded [--config.FIELD=VALUE ...]

Reads the config's pairs (generated and cached as training does), the cached features the training run wrote
(`features-<hash>.npz` in `train.features_dir` or --workdir; they hold p_ref on the vocabulary support) and the run's
last held-out evaluation (metrics.jsonl), and prints per attribute: labelled pairs, the share of the attribute's
variance the style hints explain, the held-out accuracy of the trained basis, and two ridge probes scored like a
basis (see `spectral_soup.offline.learnability`): on token counts (a bag-of-words reward model: what the tokens
say) and on surprise counts (the first-order implicit reward of a context-free logit bias: what a policy can say with
token identities alone). Probe accuracies are cross-validated on the training pairs (so an attribute set can be
chosen without touching held-out pairs) and, separately, fitted on all training pairs and scored on the held-out
ones. "learnable" = the cross-validated surprise probe is at least 3 standard errors above chance.
Writes the same numbers to <workdir>/learnability.json (or --json).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from spectral_soup.utils import cli
from spectral_soup.utils import files

_CONFIG = config_flags.DEFINE_config_file("config", None, "The training config (configs/train_basis_*.py).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (cached features, metrics.jsonl).")
_L2 = flags.DEFINE_float("l2", 10.0, "Ridge penalty of both probes (token-count units).")
_FOLDS = flags.DEFINE_integer("folds", 4, "Cross-validation folds over the training pairs.")
_JSON = flags.DEFINE_string("json", "", "Where to write the numbers (default: <workdir>/learnability.json).")
flags.mark_flags_as_required(["config", "workdir"])


def _fmt(x, digits=3):
  return "-" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _jsonable(values) -> list:
  """A list with NaN (no labelled pair: no accuracy) as null, which JSON can hold."""
  return [None if isinstance(v, float) and not np.isfinite(v) else v for v in np.asarray(values).tolist()]


def check_workdir(workdir: str, config) -> None:
  """Raises ValueError unless `workdir` is an existing directory whose config.json (if any) is of the same data and
  bases as `config`: its metrics.jsonl fills the basis column under this config's attribute names."""
  if not workdir:
    raise ValueError("--workdir is empty: expected the training run's workdir.")
  if not os.path.isdir(workdir):
    problem = "is a file" if os.path.exists(workdir) else "does not exist"
    raise ValueError(f"--workdir={workdir} {problem}: expected the workdir of the `experiments.train_basis` run of "
                     "this config (its cached features and metrics.jsonl).")
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  trained = files.read_json_object(path, "the training run's config")
  for section, name in (("data", "source"), ("data", "attributes"), ("basis", "num_bases")):
    ours = config[section].get(name)
    ours = list(ours) if isinstance(ours, (tuple, list)) else ours
    theirs = trained.get(section, {}).get(name) if isinstance(trained.get(section), dict) else None
    if name == "source":  # Runs record their paths absolute.
      theirs, ours = files.absolute_if_exists(theirs), files.absolute_if_exists(ours)
    if theirs != ours:
      raise ValueError(f"{path}: {section}.{name}={theirs!r}, but --config has {ours!r}: this workdir holds another "
                       "run (its bases' accuracies would be printed under this config's attribute names); pass the "
                       "workdir of the training run of this config.")


def main(argv) -> None:
  del argv
  from spectral_soup.offline import learnability  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, _WORKDIR.value
  out_path = _JSON.value or os.path.join(workdir, "learnability.json")
  with cli.input_checks():  # The flags, before JAX starts: one line, exit status 2.
    learnability.check_settings(l2=_L2.value, folds=_FOLDS.value, prefix="--")

  from spectral_soup.models import build  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import feature_cache  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import features  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import config_checks  # pylint: disable=g-import-not-at-top

  with cli.input_checks():  # The config and the paths, before any data load or write.
    config_checks.validate_config(config)
    if not config.basis.get("vocab_support", 0):
      raise ValueError("config.basis.vocab_support=0: the probes live on a vocabulary support; set it (e.g. 1024) "
                       "as the training run did.")
    check_workdir(workdir, config)
    files.check_output_file("--json" if _JSON.value else "the default --json", out_path)
  with cli.reporting_input_errors():  # Data that fail their checks: one line too.
    train_pairs, held_out = pairs_lib.load_pairs(config)
  with cli.input_checks():
    if len(train_pairs["labels"]) < _FOLDS.value:
      raise ValueError(f"--folds={_FOLDS.value}: the config's {len(train_pairs['labels'])} training pairs cannot be "
                       f"split into {_FOLDS.value} folds.")
  # The support does not depend on the vocabulary size beyond the largest token id (unseen ids follow in id order),
  # so this needs no model: it equals the training run's support.
  vocab_size = max(
      build.model_config(config).vocab_size, config.basis.vocab_support,
      1 + int(max(train_pairs["response_a"].max(), train_pairs["response_b"].max())))
  support = features.select_support([train_pairs["response_a"], train_pairs["response_b"]],
                                    [train_pairs["response_a_mask"], train_pairs["response_b_mask"]],
                                    config.basis.vocab_support, vocab_size)
  features_dir = config.train.get("features_dir", "") or workdir
  path = feature_cache.features_path(config, features_dir, train_pairs, held_out, support)
  stored = feature_cache.load_features(path)
  if stored is None:
    print(f"No cached features at {path} (run experiments.train_basis with this config and workdir first): "
          "the surprise probe is skipped.")
  else:
    for split, pairs in (("train", train_pairs), ("eval", held_out)):
      pairs.update({k: v for k, v in stored[split].items() if k in features.SUPPORT_FIELDS})

  results = learnability.report(train_pairs, held_out, support, l2=_L2.value, folds=_FOLDS.value, seed=config.seed)
  attributes = list(config.data.get("attributes", ())) or [f"basis_{k}" for k in range(config.basis.num_bases)]
  hints = None
  if config.data.source == "embedded":
    from spectral_soup.data import embedded  # pylint: disable=g-import-not-at-top
    records, _ = embedded.load_pairs(embedded.generate_for_config(config))
    hints = learnability.hint_share_of_pairs(records, len(attributes))
  evals = metrics_lib.read_metrics(workdir, kind="eval") if os.path.exists(os.path.join(workdir,
                                                                                        metrics_lib.FILENAME)) else []
  basis = evals[-1] if evals else None

  probe_names = list(results)
  ceiling = results.get("surprise", results["token_counts"])
  verdicts = learnability.verdict(ceiling["cv_accuracy"], ceiling["cv_count"])
  header = ["attribute", "pairs", "hint R2", "basis (held-out)"]
  for name in probe_names:
    header += [f"{name} cv", f"{name} held-out"]
  header.append("verdict")
  rows = []
  for k, attribute in enumerate(attributes):
    row = [
        attribute,
        str(int(results["token_counts"]["cv_count"][k])),
        _fmt(None if hints is None else hints[k]),
        _fmt(None if basis is None else basis["accuracy"][k])
    ]
    for name in probe_names:
      r = results[name]
      row += [_fmt(r["cv_accuracy"][k]), _fmt(r["held_out_accuracy"][k] if "held_out_accuracy" in r else None)]
    row.append(verdicts[k])
    rows.append(row)
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
  for r in rows:
    print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
  if basis is not None:
    print(f"basis: step {basis['step']} of {workdir}; held-out pairs per attribute "
          f"{[int(c) for c in basis['count']]}.")

  out = {
      "name": "attribute_learnability",
      "attributes": attributes,
      "l2": _L2.value,
      "folds": _FOLDS.value,
      "hint_share": None if hints is None else hints.tolist(),
      "basis_held_out_accuracy": None if basis is None else list(basis["accuracy"]),
      "basis_step": None if basis is None else basis["step"],
      "verdict": verdicts,
      "probes": {
          name: {
              k: _jsonable(v) for k, v in r.items()
          } for name, r in results.items()
      }
  }
  files.write_text_atomic(out_path, json.dumps(out, indent=2) + "\n")
  print(f"Wrote {out_path}.")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
