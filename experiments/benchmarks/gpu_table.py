r"""One table of the JSON files `gpu.sh` writes (online, params, train, train_1b, decode, decode_256), with floors.

  python -m experiments.benchmarks.gpu_table OUT_DIR [--markdown]

A benchmark whose JSON is missing (it failed or timed out; its log says why) or cannot be rendered (unreadable, a
field missing) is named under the table, the other benchmarks' rows still print, and the exit status is 1. For the
decode runs, the floor of each variant's token step is the bytes it must read (weights x passes per step + its KV
cache) over the measured bandwidth, and `of floor` is the measured time's share of the whole decode's floor
(prefill + steps, FLOPs at the measured matmul rate where those take longer than the bytes).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from spectral_soup.utils import files

LABELS = ("online", "params", "train", "train_1b", "decode", "decode_256")


def load(out: str, label: str) -> Optional[Dict[str, Any]]:
  """`label`'s JSON object, None when the file is missing; ValueError naming the file when it cannot be read."""
  path = os.path.join(out, f"{label}.json")
  if not os.path.exists(path):
    return None
  return files.read_json_object(path, "a benchmark's results")


def _num(value: Any, spec: str) -> str:
  """`value` formatted with `spec`, or "-" where the benchmark wrote none (null: no baseline, no measurement)."""
  return "-" if value is None else format(value, spec)


def rows_of(results: Dict[str, Dict[str, Any]]) -> List[Tuple[str, str, str, str, str]]:
  rows = []
  if (r := results.get("online")):
    for x in r["rows"]:
      rows.append(("online", x["variant"], f"{x['users_per_s']:,.0f} users/s",
                   _num(x['speedup_vs_strongest_baseline'], ".1f") + "x",
                   f"max|dlam| {_num(x['max_abs_lam_diff_vs_ours'], '.1e')}"))
  if (r := results.get("params")):
    for x in r["rows"]:
      rows.append(("params", f"{x['workload']}: {x['variant']}", f"{x['users_per_s']:,.1f} users/s",
                   _num(x['speedup_vs_strongest_baseline'], ".2f") + "x", f"{x['output_mb_per_s']:,.0f} MB/s out"))
  if (r := results.get("train")):
    for x in r["rows"]:
      rows.append(("train", x["variant"], f"{x['basis_tokens_per_s']:,.0f} basis-tokens/s", f"{x['vs_separate']:.2f}x",
                   f"{x['update_ms']:.1f} ms/update"))
  if (r := results.get("train_1b")):
    for x in r["rows"]:
      if x.get("error"):
        rows.append(("train_1b", x["variant"], "FAILED", "-", x["error"][-160:]))
        continue
      mfu = f"MFU {x['mfu']:.1%}" if x.get("mfu") is not None else "MFU -"
      rows.append(
          ("train_1b", x["variant"], f"{x['tokens_per_s']:,.0f} tokens/s", "-",
           f"{x['update_ms']:,.0f} ms/step, {_num(x['achieved_tflops'], ',.1f')} TFLOP/s, {mfu} "
           f"({_num(x['of_measured_matmul'], '.0%')} of a bf16 matmul), peak {_num(x['peak_memory_gib'], ',.1f')} GiB"))
  for label in ("decode", "decode_256"):
    if (r := results.get(label)):
      key = r["config"]["memory_measure"]
      for x in r["rows"]:
        check = (f", same tokens {x['tokens_match_torch']:.0%}" if x.get("tokens_match_torch") is not None else "")
        rows.append((f"{label} (U={r['config']['users']})", x["variant"], f"{x['tokens_per_s']:,.0f} tokens/s",
                     f"{x['vs_naive']:.2f}x" if x.get("vs_naive") else "-",
                     f"{x.get(key, 0):,.0f} MiB peak, {_num(x['share_of_floor'], '.0%')} of floor{check}" +
                     (" WRONG" if x.get("wrong") else "")))
  return rows


def floor_lines(results: Dict[str, Dict[str, Any]]) -> List[str]:
  lines = []
  for label in ("decode", "decode_256"):
    r = results.get(label)
    if not r:
      continue
    rates, c = r["rates"], r["config"]
    bw = rates["bandwidth_bytes_per_s"]
    for x in r["rows"]:
      if x["variant"] in ("single", "explicit/heads", "naive/heads"):
        read_mb = x["passes_per_step"] * x["weight_mb"] + x["kv_cache_mb"]
        floor_ms = read_mb * 2**20 / bw * 1e3
        step_ms = x["time_s"] * 1e3 / c["new_tokens"]
        lines.append(
            f"{label}, U={c['users']}, {x['variant']}: {x['passes_per_step']} x {x['weight_mb']:.0f} MiB weights + "
            f"{x['kv_cache_mb']:.0f} MiB KV cache per token step / {bw / 1e9:,.0f} GB/s = {floor_ms:.3f} ms "
            f"(bandwidth floor: {c['users'] * 1e3 / floor_ms:,.0f} tokens/s); measured {step_ms:.3f} ms per token "
            f"({x['tokens_per_s']:,.0f} tokens/s, {floor_ms / step_ms:.0%} of the bandwidth floor; step "
            f"{x['step_bound']}-bound at the measured matmul rate {rates['matmul_flops_per_s'] / 1e12:,.1f} "
            f"TFLOP/s).")
  return lines


def collect(out: str) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, str]]:
  """({label: its JSON} of the benchmarks whose rows render, {label: why not} of those whose JSON does not)."""
  results, broken = {}, {}
  for label in LABELS:
    try:
      r = load(out, label)
      if r is not None:
        rows_of({label: r}), floor_lines({label: r})  # pylint: disable=expression-not-assigned
        results[label] = r
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError, IndexError) as e:
      broken[label] = str(e) if isinstance(e, ValueError) else f"{os.path.join(out, label + '.json')}: " \
          f"{type(e).__name__} {e} (a field missing or of another type than the benchmark writes)"
  return results, broken


def table(out: str, markdown: bool = False, collected: Optional[Tuple[dict, dict]] = None) -> str:
  """The table of `collect(out)` (or of `collected`, its result)."""
  results, broken = collected or collect(out)
  rows = rows_of(results)
  header = ("bench", "variant", "rate", "vs baseline", "notes")
  lines = []
  if markdown:
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(r) + " |" for r in rows]
  else:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*r) for r in rows]
  for label, r in results.items():
    if r.get("speedup") is not None:
      lines.append(f"{label}: speedup {r['speedup']:.2f}x" + (f", targets {r['targets']}" if r.get("targets") else ""))
  lines += floor_lines(results)
  for label, why in broken.items():
    lines.append(f"unreadable: {label}: {why}")
  missing = [label for label in LABELS if label not in results and label not in broken]
  if missing:
    lines.append(f"missing (failed or timed out; see {out}/<name>.log): {', '.join(missing)}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
  """Prints the table; exits 1 (after printing) when a benchmark's JSON is missing or unreadable."""
  argv = list(sys.argv[1:] if argv is None else argv)
  markdown = "--markdown" in argv
  paths = [a for a in argv if not a.startswith("--")]
  if len(paths) != 1 or not os.path.isdir(paths[0]):
    raise SystemExit("usage: python -m experiments.benchmarks.gpu_table OUT_DIR [--markdown] (OUT_DIR: the folder "
                     "gpu.sh wrote its JSON files to).")
  collected = collect(paths[0])
  text = table(paths[0], markdown, collected)
  print(text)
  if len(collected[0]) < len(LABELS):
    raise SystemExit(1)
  return text


if __name__ == "__main__":
  main()
