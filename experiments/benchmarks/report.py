r"""Writes BENCHMARKS.md's measured tables from the benchmarks' JSON files (nobody edits those tables by hand).

  python -m experiments.benchmarks.report [--results=experiments/benchmarks/results] [--doc=BENCHMARKS.md] [--check]

Each `<!-- report:NAME -->` ... `<!-- /report:NAME -->` block of the document is replaced by the table of
`RESULTS/NAME.json` (a file a benchmark wrote with `--json`): the command, when and on what machine it ran, the load
at its timed runs, one row per variant (median of the timed runs, their range in brackets) and its targets. The
prose around the blocks (what the numbers mean, profiles, history) is the document's own. `--check` writes nothing
and exits 1 naming the blocks that differ from what the JSON gives (tests/test_benchmarks.py runs it), so the tables
and the JSON next to them cannot drift apart: a block without a JSON file and a JSON file without a block are errors
too. A JSON that cannot make its table (a missing field, a value that is not a finite number, no rows) is refused
(exit 2) with the file, the row and the column named, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join("experiments", "benchmarks", "results")
BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)

Column = Tuple[str, Callable[[Dict[str, Any]], Any]]


def _finite(value: Any) -> Any:
  """`value` if it is a finite number; ValueError otherwise (a table never shows nan or inf as a measurement)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{value!r} is not a number")
  if not math.isfinite(value):
    raise ValueError(f"{value!r} is not a finite number")
  return value


def _num(value: Any, spec: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, bool):
    return "yes" if value else "no"
  return format(_finite(value), spec)


def _spread(row: Dict[str, Any], scale: float = 1.0, spec: str = ".3f") -> str:
  """The median time with its range over the timed runs: `1.234 [1.200-1.300]`."""
  median = row.get("median_s", row.get("time_s"))
  if median is None:
    return "-"
  low, high = row.get("min_s"), row.get("max_s")
  if low is None and row.get("times_s"):
    low, high = min(row["times_s"]), max(row["times_s"])
  text = format(_finite(median) * scale, spec)
  if low is not None and high is not None:
    text += f" [{format(_finite(low) * scale, spec)}-{format(_finite(high) * scale, spec)}]"
  return text


def _load(row: Dict[str, Any]) -> str:
  load = row.get("load_1m", (row.get("idle_check") or {}).get("load_1m"))
  if load is None:
    return "-"
  return f"{_finite(load):.2f}" + (" (under load)" if row.get("under_load") else "")


COLUMNS: Dict[str, List[Column]] = {
    "online": [
        ("variant", lambda r: f"`{r['variant']}`"),
        ("users timed", lambda r: _num(r["users"], ",d")),
        ("time (s) [range]", lambda r: _spread(r)),
        ("users/s", lambda r: _num(r["users_per_s"], ",.0f")),
        ("vs best baseline", lambda r: _num(r.get("speedup_vs_strongest_baseline"), ".1f") + "x"),
        ("max abs lam diff vs ours", lambda r: _num(r.get("max_abs_lam_diff_vs_ours"), ".1e")),
        ("ours' objective above it (relative)", lambda r: _num(r.get("ours_relative_excess"), ".1e")),
        ("load", _load),
    ],
    "params": [
        ("workload", lambda r: r["workload"]),
        ("variant", lambda r: f"`{r['variant']}`"),
        ("kind", lambda r: r["kind"]),
        ("time (s) [range]", lambda r: _spread(r)),
        ("users/s", lambda r: _num(r["users_per_s"], ",.0f")),
        ("MB/s written", lambda r: _num(r["output_mb_per_s"], ",.0f")),
        ("vs fastest loop", lambda r: _num(r.get("speedup_vs_strongest_baseline"), ".2f") + "x"),
        ("max abs diff", lambda r: _num(r.get("max_abs_diff_vs_ours"), ".1e")),
        ("load", _load),
    ],
    "train": [
        ("variant", lambda r: f"`{r['variant']}`"),
        ("models", lambda r: _num(r.get("models"), "d")),
        ("devices", lambda r: _num(r.get("devices"), "d")),
        ("ms per update of all K [range]", lambda r: _spread(r, 1e3, ".1f")),
        ("basis-tokens/s", lambda r: _num(r.get("basis_tokens_per_s"), ",.0f")),
        ("vs separate", lambda r: _num(r.get("vs_separate"), ".2f") + "x"),
        ("compile (s)", lambda r: _num(r.get("compile_s"), ".1f")),
        ("load", _load),
    ],
    "decode": [
        ("variant", lambda r: f"`{r['variant']}`"),
        ("tokens/s [range]", lambda r: _num(r.get("tokens_per_s"), ",.1f") +
         (f" [{_finite(r['tokens_per_s_range'][0]):,.1f}-{_finite(r['tokens_per_s_range'][1]):,.1f}]"
          if r.get("tokens_per_s_range") else "")),
        ("vs single", lambda r: _num(r.get("vs_single"), ".2f")),
        ("peak RSS (MiB)", lambda r: _num(r.get("peak_rss_mb"), ",.0f")),
        ("memory vs single", lambda r: _num(r.get("memory_vs_single"), ".2f")),
        ("share of floor", lambda r: _num(r.get("share_of_floor"), ".0%")),
        ("tokens_match_torch", lambda r: ("WRONG "
                                          if r.get("wrong") else "") + _num(r.get("tokens_match_torch"), ".2f")),
        ("vs its @xla-defaults (paired)", lambda r: _num(r.get("vs_xla_defaults"), ".2f")),
        ("load", _load),
    ],
    "malloc": [
        ("workload", lambda r: r["workload"]),
        ("malloc settings", lambda r: r["setting"]),
        ("ms per call [range]", lambda r: _spread(r, 1e3, ".1f")),
        ("page faults per call (median, mean)",
         lambda r: _num(r.get("faults_per_call"), ",.0f") + ", " + _num(r.get("faults_per_call_mean"), ",.0f")),
        ("vs glibc defaults (paired)", lambda r: _num(r.get("speedup_vs_glibc_defaults"), ".2f") + "x"),
        ("load", _load),
    ],
}


def _machine_line(result: Dict[str, Any]) -> str:
  m = result.get("machine", {})
  parts = [m.get("cpu_model") or m.get("device") or "unknown CPU", f"{m.get('cpus', '?')} CPUs"]
  parts.append(f"jax {m.get('jax', '?')} ({m.get('backend', '?')}, {m.get('device_count', '?')} device(s))")
  rows = result.get("rows", [])
  loads = [_finite(x) for r in rows if (x := r.get("load_1m", (r.get("idle_check") or {}).get("load_1m"))) is not None]
  loaded = [str(r.get("variant", f"row {i}")) for i, r in enumerate(rows) if r.get("under_load")]
  if loads:
    load = f"1-minute load {min(loads):.2f}-{max(loads):.2f} before the timed runs"
    load += f"; **under load**: {', '.join(loaded)}" if loaded else " (no row under load)"
  else:
    load = f"load average at the end {m.get('load_avg_1m_5m_15m')}"
  return f"Measured {result.get('date_utc', 'at an unrecorded date')} UTC on {', '.join(parts)}; {load}."


def render(name: str, result: Dict[str, Any], source: str) -> str:
  """The Markdown block of one benchmark's JSON."""
  columns = COLUMNS.get(name)
  if columns is None:
    raise ValueError(f"{source}: no table layout for benchmark {name!r}; known: {sorted(COLUMNS)}")
  if not isinstance(result, dict):
    raise ValueError(f"{source}: expected a JSON object (a benchmark's --json output), got a {type(result).__name__}")
  rows = result.get("rows")
  if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
    raise ValueError(f"{source}: 'rows' must be a non-empty list of objects (one per measured variant), got "
                     f"{str(rows)[:80]}")
  if not isinstance(result.get("machine"), dict):
    raise ValueError(f"{source}: 'machine' (the CPU, the load and the jax version the table names) is missing")
  targets = result.get("targets") or {}
  if not isinstance(targets, dict) or not all(isinstance(v, bool) for v in targets.values()):
    raise ValueError(f"{source}: 'targets' must map each target to true or false, got {str(targets)[:120]}")
  lines = [f"<!-- generated by experiments/benchmarks/report.py from {source}; do not edit -->", ""]
  if result.get("command"):
    lines += ["```", str(result["command"]), "```", ""]
  try:
    machine = _machine_line(result)
  except ValueError as e:
    raise ValueError(f"{source}: a row's load: {e}") from None
  lines += [machine + " Each time is the median of the row's timed runs, with their range.", ""]
  lines.append("| " + " | ".join(header for header, _ in columns) + " |")
  lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|")
  for i, row in enumerate(rows):
    cells = []
    for header, cell in columns:
      try:
        cells.append(str(cell(row)))
      except (KeyError, TypeError, ValueError, IndexError) as e:
        why = f"the field {e.args[0]!r} is missing" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{source}: row {i} ({row.get('variant', 'no variant')}), column {header!r}: {why}") from None
    lines.append("| " + " | ".join(cells) + " |")
  if targets:
    lines += ["", "Targets: " + "; ".join(f"{k}: **{'met' if v else 'not met'}**" for k, v in targets.items()) + "."]
  return "\n".join(lines) + "\n"


def load_results(results_dir: str) -> Dict[str, Tuple[Dict[str, Any], str]]:
  out = {}
  for file in sorted(os.listdir(results_dir)):
    if file.endswith(".json"):
      path = os.path.join(results_dir, file)
      with open(path) as f:
        try:
          out[file[:-len(".json")]] = (json.load(f), os.path.relpath(path, REPO))
        except ValueError as e:
          raise ValueError(f"{path}: not valid JSON ({e})") from e
  return out


def update(doc: str, results: Dict[str, Tuple[Dict[str, Any], str]], doc_name: str = "BENCHMARKS.md") -> str:
  """`doc` with every report block replaced by its table; a block without a JSON file is an error."""
  names = [m.group("name") for m in BLOCK.finditer(doc)]
  missing = [n for n in names if n not in results]
  if missing:
    raise ValueError(f"{doc_name}: report blocks {missing} have no JSON file (have: {sorted(results)}).")
  unplaced = sorted(set(results) - set(names))
  if unplaced:
    raise ValueError(f"{doc_name} has no report block for {[results[n][1] for n in unplaced]}: add "
                     f"`<!-- report:NAME -->` ... `<!-- /report:NAME -->` where its table belongs, or remove the file.")

  def replace(m: "re.Match[str]") -> str:
    result, source = results[m.group("name")]
    return m.group(1) + render(m.group("name"), result, source) + m.group(4)

  return BLOCK.sub(replace, doc)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.report", description=__doc__.split("\n")[0])
  p.add_argument("--results", default=os.path.join(REPO, RESULTS), help="Folder of the benchmarks' JSON files.")
  p.add_argument("--doc", default=os.path.join(REPO, "BENCHMARKS.md"), help="The document to update.")
  p.add_argument("--check", action="store_true", help="Write nothing; exit 1 if the document is out of date.")
  args = p.parse_args(argv)
  with open(args.doc) as f:
    doc = f.read()
  try:
    new = update(doc, load_results(args.results), os.path.basename(args.doc))
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.check:
    if new != doc:
      bodies = lambda text: {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
      old_bodies, new_bodies = bodies(doc), bodies(new)
      stale = [name for name in new_bodies if old_bodies.get(name) != new_bodies[name]]
      print(f"{args.doc} is out of date with {args.results} (the tables of {stale or 'the document'}): run "
            f"`python -m experiments.benchmarks.report`.")
      return 1
    print(f"{args.doc} matches {args.results}.")
    return 0
  if new != doc:
    tmp = args.doc + ".tmp"
    with open(tmp, "w") as f:
      f.write(new)
    os.replace(tmp, args.doc)
    print(f"Updated {args.doc}.")
  else:
    print(f"{args.doc} is up to date.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
