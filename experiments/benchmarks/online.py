r"""Online lambda fitting for many users: our vmapped Newton fit vs a per-user scikit-learn loop.

  python -m experiments.benchmarks.online [--users=1024] [--bases=30] [--comparisons=64] [--json=online.json]

U simulated users, each with N pairwise comparisons of K basis features (d ~ N(0, 1), labels drawn from
sigmoid(lam_true . d)). Every variant solves the same problem, the L2-regularized logistic regression

  min_lam sum_i [softplus(lam . d_i) - p_i lam . d_i] + l2 / 2 |lam|^2,

for every user:
* `ours/vmap(fit_lambda)`: `jax.jit(jax.vmap(partial(online.fit_lambda, l2=l2)))` on [U, N, K], the default call
  (damped Newton steps until the step is below fit_lambda's `tol`, 1e-5; under vmap the `while_loop` runs until
  the slowest user converges; all users in one compiled call; timed after the compile call);
* `ours/vmap(fit_lambda, tol=0)`: the same with exactly 25 Newton steps (differentiated through the steps);
* `ours/fit_lambda_batched`: the public batched entry point (the same computation as the first row);
* `ours/loop(fit_lambda)`: the jitted one-user fit called once per user from Python (what vmap saves);
* `sklearn/<solver>`: a Python loop of `LogisticRegression(fit_intercept=False, C=1/l2, tol=...)` per user
  (C * sum log-loss + |w|^2 / 2 = the objective above divided by l2), for the `liblinear` and `newton-cholesky`
  solvers.
Reports users/s, the max |lam - lam_sklearn| over all users and coefficients, the objective gap (sklearn's
objective minus ours, float64; > 0 means ours is lower) and how far ours ends above each variant, relative, on the
worst user (the target: at most 1e-6). `speedup` = ours/vmap (default call) over the fastest sklearn loop;
`speedup_fixed_steps` the same for the tol=0 row. Every variant waits for an idle machine before its timed runs
(`common.time_call`) and records the load, its median and its range over at least 3 timed runs.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments.benchmarks import common

NAME = "online"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--users", type=int, default=1_024, help="U: users fitted at once.")
  p.add_argument("--bases", type=int, default=30, help="K: basis features per comparison.")
  p.add_argument("--comparisons", type=int, default=64, help="N: comparisons per user.")
  p.add_argument("--l2", type=float, default=1.0, help="L2 penalty strength (sklearn C = 1 / l2).")
  p.add_argument(
      "--tol", type=float, default=0.0,
      help="fit_lambda's `tol` in the second ours row (0: a fixed 25 Newton steps, differentiated through the "
      "steps; the default call stops early).")
  p.add_argument("--sklearn_tol", type=float, default=1e-8, help="scikit-learn's stopping tolerance.")
  p.add_argument("--solvers", default="liblinear,newton-cholesky",
                 help="scikit-learn solvers to time (lbfgs is ~20x slower than these at tol 1e-8).")
  p.add_argument(
      "--baseline_users", type=int, default=0,
      help="Users fitted by each scikit-learn loop (0: all; fewer: users/s extrapolates, agreement is "
      "checked on those users).")
  p.add_argument("--loop_users", type=int, default=256,
                 help="Users timed for ours/loop(fit_lambda) (users/s extrapolates; 0: skip the variant).")
  p.add_argument("--min_time_s", type=float, default=1.0, help="Repeat our variants for at least this long.")
  p.add_argument("--baseline_repeats", type=int, default=3, help="Timed runs of each scikit-learn loop.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return p.parse_args(argv)


def make_data(users: int, bases: int, comparisons: int, seed: int):
  """Feature differences d [U, N, K], hard labels p [U, N] in {0, 1} (both classes present per user), lam_true."""
  rng = np.random.default_rng(seed)
  lam_true = rng.normal(size=(users, bases)) / np.sqrt(bases) * 3.0
  x = rng.normal(size=(users, comparisons, bases))
  prob = 1.0 / (1.0 + np.exp(-np.einsum("unk,uk->un", x, lam_true)))
  p = (rng.random((users, comparisons)) < prob).astype(np.float64)
  p[:, 0], p[:, 1] = 1.0, 0.0  # scikit-learn needs both classes in every user's data.
  return x.astype(np.float32), p.astype(np.float32), lam_true


def objective(lam: np.ndarray, x: np.ndarray, p: np.ndarray, l2: float) -> np.ndarray:
  """The fitted objective per user, in float64: lam [U, K], x [U, N, K], p [U, N] -> [U]."""
  z = np.einsum("unk,uk->un", x.astype(np.float64), lam.astype(np.float64))
  return np.sum(np.logaddexp(0.0, z) - p * z, axis=1) + 0.5 * l2 * np.sum(lam.astype(np.float64)**2, axis=1)


def sklearn_loop(x: np.ndarray, p: np.ndarray, l2: float, solver: str, tol: float) -> np.ndarray:
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  out = np.empty((x.shape[0], x.shape[2]))
  for u in range(x.shape[0]):
    model = LogisticRegression(fit_intercept=False, C=1.0 / l2, tol=tol, solver=solver, max_iter=10_000)
    model.fit(x[u].astype(np.float64), p[u].astype(np.int64))
    out[u] = model.coef_[0]
  return out


def run(args: argparse.Namespace) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spectral_soup import online  # pylint: disable=g-import-not-at-top

  users, l2 = args.users, args.l2
  x, p, _ = make_data(users, args.bases, args.comparisons, args.seed)
  xj, pj = jnp.asarray(x), jnp.asarray(p)
  rows: List[Dict[str, Any]] = []
  fits: Dict[str, np.ndarray] = {}

  def add(variant, kind, timing, lam, users_timed=users):
    lam = np.asarray(lam)
    fits[variant] = lam
    rows.append({
        "variant": variant,
        "kind": kind,
        "users": users_timed,
        "time_s": timing["median_s"],
        "users_per_s": users_timed / timing["median_s"],
        "compile_s": timing.get("first_s"),
        **common.timing_fields(timing), "objective_mean": float(objective(lam, x[:len(lam)], p[:len(lam)], l2).mean())
    })

  # ---- Ours: all users in one compiled call: the default call, the fixed-step one, the public batched form.
  fit_all = jax.jit(jax.vmap(functools.partial(online.fit_lambda, l2=l2)))
  timing = common.time_call(lambda: fit_all(xj, pj), min_time_s=args.min_time_s, sync=common.jax_sync)
  add("ours/vmap(fit_lambda)", "ours", timing, fit_all(xj, pj))
  fit_fixed = jax.jit(jax.vmap(functools.partial(online.fit_lambda, l2=l2, tol=args.tol)))
  timing = common.time_call(lambda: fit_fixed(xj, pj), min_time_s=args.min_time_s, sync=common.jax_sync)
  add(f"ours/vmap(fit_lambda, tol={args.tol:g})", "ours", timing, fit_fixed(xj, pj))
  timing = common.time_call(lambda: online.fit_lambda_batched(xj, pj, l2=l2), min_time_s=args.min_time_s,
                            sync=common.jax_sync)
  add("ours/fit_lambda_batched", "ours", timing, online.fit_lambda_batched(xj, pj, l2=l2))

  # ---- Ours, one user per call (the dispatch cost vmap removes).
  if args.loop_users:
    n = min(args.loop_users, users)
    loop = lambda: [online.fit_lambda(xj[u], pj[u], l2=l2) for u in range(n)]
    timing = common.time_call(loop, repeats=3, sync=common.jax_sync)
    add("ours/loop(fit_lambda)", "ours (per-user calls)", timing, np.stack(loop()), users_timed=n)

  # ---- Baselines: a per-user scikit-learn loop.
  n_base = min(args.baseline_users or users, users)
  for solver in [s for s in args.solvers.split(",") if s]:
    loop = functools.partial(sklearn_loop, x[:n_base], p[:n_base], l2, solver, args.sklearn_tol)
    timing = common.time_call(loop, repeats=args.baseline_repeats, warmup=0)
    add(f"sklearn/{solver}", "baseline", timing, loop(), users_timed=n_base)

  # ---- Agreement with every baseline (over all users and coefficients).
  ours = fits["ours/vmap(fit_lambda)"]
  ours_obj = objective(ours, x, p, l2)
  for row in rows:
    lam = fits[row["variant"]]
    row["max_abs_lam_diff_vs_ours"] = float(np.max(np.abs(lam - ours[:len(lam)])))
    row["objective_gap_vs_ours"] = float(np.max(objective(lam, x[:len(lam)], p[:len(lam)], l2) - ours_obj[:len(lam)]))
    # How much higher ours ends than this variant, relative (> 0: ours is worse), on the worst user.
    row["ours_relative_excess"] = float(
        np.max((ours_obj[:len(lam)] - objective(lam, x[:len(lam)], p[:len(lam)], l2)) /
               np.abs(objective(lam, x[:len(lam)], p[:len(lam)], l2))))
  baselines = [r for r in rows if r["kind"] == "baseline"]
  best = max(baselines, key=lambda r: r["users_per_s"]) if baselines else None
  ours_row = rows[0]
  for row in rows:
    row["speedup_vs_strongest_baseline"] = row["users_per_s"] / best["users_per_s"] if best else None
  speedup = ours_row["users_per_s"] / best["users_per_s"] if best else None
  fixed = rows[1]
  speedup_fixed = fixed["users_per_s"] / best["users_per_s"] if best else None
  agreement = max((r["max_abs_lam_diff_vs_ours"] for r in baselines), default=None)
  excess = max((r["ours_relative_excess"] for r in baselines), default=None)
  config = {k: v for k, v in vars(args).items() if k != "json"}
  targets = {
      "speedup>=100x": speedup is not None and speedup >= 100,
      "objective within 1e-6 (relative) of every baseline": excess is not None and excess <= 1e-6,
  }
  return common.result(
      NAME, config, rows, speedup, strongest_baseline=best["variant"] if best else None,
      speedup_fixed_steps=speedup_fixed, max_abs_lam_diff=agreement, ours_relative_excess=excess, targets=targets,
      command=f"python -m experiments.benchmarks.{NAME} --users={users} --bases={args.bases} "
      f"--comparisons={args.comparisons}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  out = run(args)
  common.print_table(
      out["rows"], [("variant", "variant", ""), ("users", "users", "d"), ("time_s", "time s", ".4f"),
                    ("users_per_s", "users/s", ",.0f"), ("speedup_vs_strongest_baseline", "vs best baseline", ".1f"),
                    ("max_abs_lam_diff_vs_ours", "max|lam diff|", ".1e"), ("objective_gap_vs_ours", "obj gap", ".1e"),
                    ("load_1m", "load", ".2f")],
      title=f"online: U={args.users} users x K={args.bases} bases x N={args.comparisons} comparisons, "
      f"l2={args.l2} ({out['machine'].get('device', '?')}, load {out['machine'].get('load_avg_1m_5m_15m')})")
  print(f"speedup (ours/vmap over {out['strongest_baseline']}): {out['speedup']:.1f}x, with tol={args.tol:g}: "
        f"{out['speedup_fixed_steps']:.1f}x; max |lam diff| vs the baselines: {out['max_abs_lam_diff']:.2e}; "
        f"ours' objective above the best baseline's by at most {out['ours_relative_excess']:.1e} (relative); "
        f"targets: {out['targets']}")
  common.write_json(args.json, out)
  return out


if __name__ == "__main__":
  main()
