r"""What the package's glibc malloc settings (`spectral_soup/utils/malloc.py`) buy: time and page faults per call.

  python -m experiments.benchmarks.malloc [--rounds=3] [--calls=12] [--json=malloc.json]

Two steps whose buffers are tens of MiB, each called `--calls` times after a compile call, in a fresh subprocess per
setting and round, the two settings interleaved round after round:
* `train heads K=8`: `experiments/benchmarks/train.py`'s shared step (K = 8 head bases on a 4-layer random Llama,
  8 pairs x (32 + 32) tokens, AdamW; [K, 2B, R, V] basis logits);
* `decode U=32`: 16 greedy tokens of the explicit head soup (K = 8) for 32 users on a 4-layer random Llama of
  SmolLM2's width and vocabulary (D = 576, V = 49,152; [32, V] logits per token).
Settings: `package` (importing `spectral_soup` applies them) and `glibc defaults` (`SPECTRAL_SOUP_MALLOC_DEFAULTS=1`).
Each row: the median time per call over every round's calls, its range, the minor page faults per call (from
`getrusage`), and the time relative to glibc's defaults (the median of the rounds' paired ratios).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from experiments.benchmarks import common

NAME = "malloc"
WORKLOADS = ("train heads K=8", "decode U=32")
SETTINGS = {"package": {}, "glibc defaults": {"SPECTRAL_SOUP_MALLOC_DEFAULTS": "1"}}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog=f"python -m experiments.benchmarks.{NAME}", description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3, help="Subprocesses per setting and workload, interleaved.")
  p.add_argument("--calls", type=int, default=12, help="Timed calls per subprocess (after one compile call).")
  p.add_argument("--layers", type=int, default=4, help="Decoder layers of the decode workload's random model.")
  p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"Comma-separated, from {WORKLOADS}.")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # Internal: run one workload, print its JSON.
  p.add_argument("--json", default=None, help="Where to write the results (JSON).")
  return p.parse_args(argv)


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _calls(fn, calls: int) -> Dict[str, Any]:
  """Times `fn` (returns when its result is ready) `calls` times after one compile call."""
  fn()
  times, faults = [], []
  for _ in range(calls):
    f0, t0 = _faults(), time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    faults.append(_faults() - f0)
  return {"times_s": times, "faults": faults}


def train_workload(args: argparse.Namespace) -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import train  # pylint: disable=g-import-not-at-top
  step, state, batch, backbone = train.build(train.resolve(train.parse_args(["--kinds=heads", "--devices=0"])), "heads",
                                             8)
  holder = [state]

  def call():
    holder[0], _ = step(holder[0], batch, backbone)
    jax.block_until_ready(holder[0])

  return _calls(call, args.calls)


def decode_workload(args: argparse.Namespace) -> Dict[str, Any]:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import build as build_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import config as config_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.spectral import SpectralPolicy  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import serving  # pylint: disable=g-import-not-at-top
  cfg = config_lib.llama(num_layers=args.layers)
  policy = SpectralPolicy(cfg, num_bases=8, basis_kind="heads", head_rank=8)
  shapes = nn.meta.unbox(jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  trainable, backbone_shapes = build_lib.split_params(shapes)
  backbone = jax.tree.map(jnp.asarray, build_lib.random_backbone(backbone_shapes, cfg, 0))
  rng = np.random.default_rng(0)
  heads = jax.tree.map(lambda s: jnp.asarray(0.05 * rng.normal(size=s.shape), s.dtype), trainable)
  params = build_lib.merge_params(heads, backbone)
  prompt = jnp.asarray(rng.integers(10, cfg.vocab_size, (32, 8)), jnp.int32)
  lam = jnp.asarray(rng.dirichlet(np.ones(8), 32), jnp.float32)
  mask = jnp.ones(prompt.shape, bool)
  call = lambda: jax.block_until_ready(serving.generate(policy, params, lam, prompt, mask, max_new_tokens=16))
  return _calls(call, args.calls)


def run(args: argparse.Namespace) -> Dict[str, Any]:
  if args.rounds < 1 or args.calls < 1:
    raise ValueError(f"--rounds and --calls must be positive, got {args.rounds} and {args.calls}.")
  workloads = [w for w in args.workloads.split(",") if w]
  unknown = sorted(set(workloads) - set(WORKLOADS))
  if unknown or not workloads:
    raise ValueError(f"--workloads: expected some of {WORKLOADS}, got {unknown or 'nothing'}.")
  child_args = [f"--calls={args.calls}", f"--layers={args.layers}"]
  outs: Dict[tuple, List[Dict[str, Any]]] = {}
  for _ in range(args.rounds):
    for workload in workloads:
      for setting, env in SETTINGS.items():
        out = common.run_child(f"experiments.benchmarks.{NAME}", child_args + [f"--child={workload}"], env=env)
        outs.setdefault((workload, setting), []).append(out)
        print(
            f"  {workload}, {setting}: {1e3 * statistics.median(out['times_s']):.1f} ms per call, "
            f"{statistics.median(out['faults']):.0f} page faults (malloc settings applied: {out['tuned']})", flush=True)
  rows = []
  for (workload, setting), runs in outs.items():
    times = [t for out in runs for t in out["times_s"]]
    faults = [f for out in runs for f in out["faults"]]
    rows.append({
        "variant": f"{workload} / {setting}",
        "workload": workload,
        "setting": setting,
        "tuned": all(out["tuned"] for out in runs),
        "time_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "runs": len(times),
        "round_times_s": [statistics.median(out["times_s"]) for out in runs],
        "faults_per_call": statistics.median(faults),
        "faults_per_call_mean": statistics.mean(faults),
        "load_1m": max(out["idle_check"]["load_1m"] for out in runs),
        "under_load": any(out["idle_check"]["under_load"] for out in runs),
    })
  speedups = {}
  for row in rows:
    base = next(r for r in rows if r["workload"] == row["workload"] and r["setting"] == "glibc defaults")
    ratios = [b / o for o, b in zip(row["round_times_s"], base["round_times_s"])]
    row["speedup_vs_glibc_defaults"] = statistics.median(ratios)
    if row["setting"] == "package":
      speedups[row["workload"]] = row["speedup_vs_glibc_defaults"]
  config = dict(vars(args))
  config.pop("json", None)
  config.pop("child", None)
  return common.result(NAME, config, rows, min(speedups.values()), speedups=speedups,
                       command=f"python -m experiments.benchmarks.{NAME} --rounds={args.rounds} --calls={args.calls}")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  args = parse_args(argv)
  if args.child:
    import spectral_soup  # pylint: disable=g-import-not-at-top
    fn = {"train heads K=8": train_workload, "decode U=32": decode_workload}[args.child]
    out = fn(args)
    out["tuned"] = spectral_soup.MALLOC_TUNED
    print(json.dumps(out))
    return out
  result = run(args)
  for row in result["rows"]:
    row["ms"] = 1e3 * row["time_s"]
  common.print_table(result["rows"], [("variant", "variant", "s"), ("ms", "ms per call", ".1f"),
                                      ("faults_per_call", "page faults per call", ".0f"),
                                      ("speedup_vs_glibc_defaults", "vs glibc defaults", ".2f"),
                                      ("load_1m", "load", ".2f")],
                     title=f"package over glibc defaults: {result['speedups']}")
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
