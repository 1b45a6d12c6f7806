"""PNG plots of the main job's results.json (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from spectral_soup.utils import files

# Every file `write_all` may write into the workdir (frontier.png and attribute_shift.png when results have them).
PLOT_FILES = ("learning_curve.png", "scores.png", "frontier.png", "attribute_shift.png", "pareto.png", "k_ablation.png")


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  """`fig.savefig(path)`, atomically: a reader (or a crash) sees the old PNG or the new one, never half of it."""
  with files.atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, dpi=110)


_NEEDED = ("methods", "bespoke_gain_significant", "learning_curve", "pareto", "k_ablation")


def _nan_for_null(value):
  """A copy of `value` (parsed JSON) with every None in a list or dict made NaN."""
  if isinstance(value, Mapping):
    return {k: _nan_for_null(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_nan_for_null(v) for v in value]
  return float("nan") if value is None else value


def write_all(results: Mapping, workdir: str) -> list:
  """Writes learning_curve.png, scores.png, frontier.png and attribute_shift.png (when results has frontiers and
  attribute shifts), pareto.png and k_ablation.png; returns their paths."""
  missing = [key for key in _NEEDED if key not in results]
  if missing:
    raise ValueError(f"results lack {missing}: expected the main job's results.json (docs/RESULTS.md), whose "
                     f"{list(_NEEDED)} every plot reads (an older or partial file?).")
  results = _nan_for_null(results)  # A results.json read back holds null where the job had NaN.
  config = results.get("config")
  split = (config.get("eval") or {}).get("split", "heldout") if isinstance(config, Mapping) else "heldout"
  users = "dev (training-split)" if split == "dev" else "held-out"
  plt = _pyplot()
  paths = []

  # Learning curves: the shown soups' true reward and the cumulative regret against bespoke. Round t shows soups of
  # the lambda fitted on the comparisons of rounds before it, so each round sits at the number of comparisons its
  # lambda saw (0 for the first), not at the number collected by its end.
  curve = results["learning_curve"]
  collected = np.asarray(curve["comparisons"], np.float64)
  n = np.concatenate([[0.0], collected[:-1]])
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  reward, regret = np.asarray(curve["reward"]), np.asarray(curve["regret"])
  for u in range(reward.shape[1]):
    axes[0].plot(n, reward[:, u], alpha=0.4, marker=".")
    axes[1].plot(n, regret[:, u], alpha=0.4, marker=".")
  axes[0].plot(n, reward.mean(1), color="k", lw=2, marker="o", ms=3, label="mean over users")
  axes[0].axhline(results["methods"]["bespoke"]["mean_reward"], color="g", ls="--", label="bespoke")
  axes[0].axhline(results["methods"]["reference"]["mean_reward"], color="r", ls=":", label="reference")
  xlabel = "comparisons per user behind the shown lambda"
  axes[0].set(xlabel=xlabel, ylabel="true reward of shown responses", title="online rounds")
  axes[0].legend(fontsize=8)
  axes[1].plot(n, regret.mean(1), color="k", lw=2, marker="o", ms=3)
  # Bespoke's value is on the evaluation prompts, the rounds' rewards on the online prompts (docs/RESULTS.md).
  axes[1].set(xlabel=xlabel, ylabel="cumulative regret vs bespoke", title="regret (bespoke on the evaluation prompts)")
  acc = np.asarray(curve["choice_accuracy"])
  axes[2].plot(n, acc.mean(1), color="k", marker="o")
  axes[2].axhline(0.5, color="gray", ls=":")
  axes[2].set(xlabel=xlabel, ylabel="the round's choices it predicted", title="preference prediction", ylim=(0, 1))
  fig.tight_layout()
  paths.append(os.path.join(workdir, "learning_curve.png"))
  _save(fig, paths[-1])
  plt.close(fig)

  # Normalized score and KL per method.
  methods = list(results["methods"])
  fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
  score = [results["methods"][m]["normalized_score"] for m in methods]
  ci = np.asarray([results["methods"][m]["normalized_score_ci"] for m in methods])
  axes[0].bar(methods, score, color="tab:blue")
  # The interval drawn from its ends (a percentile interval need not contain the estimate: not as lengths about it).
  axes[0].errorbar(np.arange(len(methods)), ci.mean(axis=1), yerr=(ci[:, 1] - ci[:, 0]) / 2, fmt="none", ecolor="k",
                   capsize=3)
  axes[0].axhline(1.0, color="g", ls="--")
  axes[0].axhline(0.0, color="k", lw=0.8)
  title = "normalized score (1 = bespoke)"
  if not results["bespoke_gain_significant"]:
    title += ": bespoke gain NOT significant"
  axes[0].set(title=title)
  axes[1].bar(methods, [results["methods"][m]["kl"] for m in methods], color="tab:orange")
  axes[1].set(title="KL to the reference (nats per response)")
  for ax in axes:
    ax.tick_params(axis="x", rotation=60, labelsize=8)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "scores.png"))
  _save(fig, paths[-1])
  plt.close(fig)

  # Reward-KL frontiers: each swept method along its strength knob, the bespoke policy as a point.
  if results.get("frontier"):
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ref = results["methods"]["reference"]["mean_reward"]
    for method, points in results["frontier"].items():
      kl = [0.0] + [pt["kl"] for pt in points]
      reward = [ref] + [pt["mean_reward"] for pt in points]
      ax.plot(kl, reward, marker="o", label=method)
      for pt in points:
        ax.annotate(f"x{pt['scale']:g}", (pt["kl"], pt["mean_reward"]), fontsize=7, alpha=0.7)
    bespoke = results["methods"]["bespoke"]
    ax.plot([bespoke["kl"]], [bespoke["mean_reward"]], marker="*", ms=14, color="g", ls="", label="bespoke")
    ax.axvline(results["bespoke_kl"], color="g", ls=":", lw=0.8)
    ax.set(xlabel="KL to the reference (nats per response)", ylabel=f"mean true reward of {users} users",
           title="reward-KL frontiers (scale of lambda / guidance)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "frontier.png"))
    _save(fig, paths[-1])
    plt.close(fig)

  # Attribute shift of each basis: a specialized basis moves its own attribute (the diagonal).
  offline = results.get("offline", {})
  if "attribute_shift" in offline:
    shift, ci = np.asarray(offline["attribute_shift"]), np.asarray(offline["attribute_shift_ci"])
    attributes = results["attributes"]
    fig, ax = plt.subplots(figsize=(1.2 * len(attributes) + 2, 0.9 * len(shift) + 1.5))
    # The colour range of the finite shifts (a NaN one would make the bound NaN and saturate every cell).
    bound = max(float(np.nanmax(np.abs(shift), initial=0.0)), 1e-3)
    image = ax.imshow(shift, cmap="RdBu_r", vmin=-bound, vmax=bound)
    for k in range(shift.shape[0]):
      for a in range(shift.shape[1]):
        significant = ci[k, a, 0] > 0 or ci[k, a, 1] < 0
        ax.text(a, k, f"{shift[k, a]:+.2f}" + ("*" if significant else ""), ha="center", va="center", fontsize=8,
                color="white" if abs(shift[k, a]) > 0.6 * bound else "black")
    ax.set_xticks(range(len(attributes)), attributes, rotation=30, fontsize=8)
    ax.set_yticks(range(shift.shape[0]), [f"basis {a}" for a in attributes[:shift.shape[0]]], fontsize=8)
    ax.set(title="attribute shift vs the reference (SD; * 90% CI excludes 0)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    paths.append(os.path.join(workdir, "attribute_shift.png"))
    _save(fig, paths[-1])
    plt.close(fig)

  # Pareto sweep between two bases.
  pareto = results["pareto"]
  pts = np.asarray(pareto["scores"])
  fig, ax = plt.subplots(figsize=(4.5, 4))
  ax.plot(pts[:, 0], pts[:, 1], marker="o")
  for a, (x, y) in zip(pareto["alpha"], pts):
    ax.annotate(f"{a:.2f}", (x, y), fontsize=8)
  ax.set(xlabel=f"{pareto['bases'][0]} (standardized)", ylabel=f"{pareto['bases'][1]} (standardized)",
         title="soups (1-a) basis i + a basis j")
  fig.tight_layout()
  paths.append(os.path.join(workdir, "pareto.png"))
  _save(fig, paths[-1])
  plt.close(fig)

  # K ablation.
  abl = results["k_ablation"]
  fig, ax = plt.subplots(figsize=(4.5, 3.5))
  accuracy = np.asarray([np.nan if a is None else a for a in abl["heldout_choice_accuracy"] or []], np.float64)
  ax.plot(abl["k"], accuracy, marker="o")
  ax.axhline(0.5, color="gray", ls=":")
  low = min(0.4, float(np.nanmin(accuracy, initial=1.0)) - 0.05)  # Accuracies below 0.4 stay on the chart.
  ax.set(xlabel="bases used (first k)", ylabel="held-out choice accuracy", title="ablation over K", ylim=(low, 1))
  ax.xaxis.get_major_locator().set_params(integer=True)
  fig.tight_layout()
  paths.append(os.path.join(workdir, "k_ablation.png"))
  _save(fig, paths[-1])
  plt.close(fig)
  return paths


def training_curves(workdir: str, names=None) -> str:
  """Writes `<workdir>/training_curves.png` from a basis-training run's metrics.jsonl: the loss of every basis and
  its pair accuracy (train records as lines, held-out evaluations as markers) against the step; returns its path."""
  from spectral_soup.offline import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  records = metrics_lib.read_metrics(workdir)
  train = [r for r in records if r.get("kind") == "train"]
  held_out = [r for r in records if r.get("kind") == "eval"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  num = max((len(np.atleast_1d(r.get("accuracy", []))) for r in records), default=0)
  names = list(names or [f"basis {k}" for k in range(num)])
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

  def series(rows, key, k):
    points = [(r["step"], np.atleast_1d(np.asarray(r[key], np.float64))[k]) for r in rows if key in r]
    return np.asarray(points, np.float64).reshape(-1, 2)

  for k in range(num):
    color = colors[k % len(colors)]
    for ax, key in ((axes[0], "loss"), (axes[1], "accuracy")):
      line = series(train, key, k)
      if len(line):
        ax.plot(line[:, 0], line[:, 1], color=color, marker="." if len(line) == 1 else None,
                label=names[k] if ax is axes[0] else None)
      points = series(held_out, key, k)
      if len(points):
        ax.plot(points[:, 0], points[:, 1], "o", color=color, mfc="none",
                label=f"{names[k]} (held out)" if ax is axes[1] else None)
  axes[0].set(xlabel="step", ylabel="loss", title="training loss per basis")
  axes[1].set(xlabel="step", ylabel="pair accuracy", title="accuracy on own labels (o: held out)")
  for ax in axes:
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  path = os.path.join(workdir, "training_curves.png")
  _save(fig, path)
  plt.close(fig)
  return path
