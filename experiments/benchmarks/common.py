"""Helpers shared by the benchmarks: timing, peak memory, the machine's matmul rate and bandwidth, tables, JSON.

Every benchmark writes one JSON object:

    {"name": str, "date_utc": "YYYY-MM-DD HH:MM", "config": {...}, "machine": {...}, "rows": [{"variant": str, ...}],
     "speedup": float (ours over the strongest baseline), ...}

Timings are medians of repeated runs after a compile run. On a shared machine other processes steal cycles, so a
benchmark always measures ours and its baselines in the same run, and the ratios are the numbers to compare.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ----------------------------------------------------------------------------------------------------------------
# Timing.


def time_call(fn: Callable[[], Any], *, repeats: int = 3, min_time_s: float = 0.0, warmup: int = 1,
              sync: Optional[Callable[[Any], Any]] = None, wait_idle: bool = True) -> Dict[str, Any]:
  """Runs `fn` `warmup` times (compiles), waits for an idle machine, then runs it at least `repeats` times (and at
  least `min_time_s` in total).

  `sync(out)` waits for asynchronous results (e.g. `jax.block_until_ready`). Returns {"first_s": the first warmup
  call (compile + run), "median_s", "min_s", "max_s", "runs", and `wait_for_idle`'s reading before the timed runs
  (`load_1m`, `waited_s`, `cpu_busy`, `under_load`; absent with `wait_idle=False`)}; `timing_fields` picks what a
  result row keeps.
  """
  if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
    raise ValueError(f"repeats must be a positive int (the tables report a median of at least 3), got {repeats!r}.")
  sync = sync or (lambda out: out)
  first = None
  for _ in range(warmup):
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0 if first is None else first
  idle = wait_for_idle() if wait_idle else {}
  times: List[float] = []
  start = time.perf_counter()
  while len(times) < repeats or time.perf_counter() - start < min_time_s:
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return {
      "first_s": first,
      "median_s": statistics.median(times),
      "min_s": min(times),
      "max_s": max(times),
      "runs": len(times),
      **idle
  }


TIMING_FIELDS = ("median_s", "min_s", "max_s", "runs", "load_1m", "under_load")


def timing_fields(timing: Dict[str, Any]) -> Dict[str, Any]:
  """What every timed result row records of a `time_call` result: the median, the spread, the repeats, the load."""
  return {k: timing[k] for k in TIMING_FIELDS if k in timing}


def jax_sync(out: Any) -> Any:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(out)


# ----------------------------------------------------------------------------------------------------------------
# An idle machine: timings taken while other processes run are not evidence.

IDLE_LOAD = 0.5  # A timed run starts when the 1-minute load average is at most this ...
IDLE_WAIT_S = float(os.environ.get("SPECTRAL_SOUP_BENCH_IDLE_WAIT_S", "120"))  # ... or after waiting this long.


def cpu_busy_fraction(window_s: float = 2.0) -> Optional[float]:
  """Fraction of all cores busy over the next `window_s` seconds (/proc/stat), or None where unavailable."""

  def read():
    with open("/proc/stat") as f:
      values = [float(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + (values[4] if len(values) > 4 else 0.0)  # Total, idle + iowait.

  try:
    total0, idle0 = read()
    time.sleep(window_s)
    total1, idle1 = read()
  except (OSError, ValueError, IndexError):
    return None
  return max(0.0, 1.0 - (idle1 - idle0) / max(total1 - total0, 1e-9))


def wait_for_idle(threshold: float = IDLE_LOAD, max_wait_s: float = IDLE_WAIT_S, poll_s: float = 5.0) -> Dict[str, Any]:
  """Waits until the 1-minute load average is <= `threshold` (at most `max_wait_s`), before a timed run.

  Returns what a result row records: {"load_1m": the load when the run starts, "waited_s", "cpu_busy": the
  fraction of all cores busy over 2 s just before (this process idle, so: other processes), "under_load": the
  load was still above the threshold}. The 1-minute average decays slowly (about 80 s from 2 to 0.5 after a
  2-core job), so a row marked under load whose cpu_busy is near 0 was waiting out the previous variant's load.
  """
  start = time.perf_counter()
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
  while load > threshold and time.perf_counter() - start < max_wait_s:
    time.sleep(poll_s)
    load = os.getloadavg()[0]
  busy = cpu_busy_fraction() if max_wait_s > 0 else None  # Waiting off (tests, GPU budgets): no 2 s reading.
  return {
      "load_1m": round(load, 2),
      "waited_s": round(time.perf_counter() - start, 1),
      "cpu_busy": None if busy is None else round(busy, 3),
      "under_load": load > threshold
  }


# ----------------------------------------------------------------------------------------------------------------
# Memory (Linux): the resident-set high-water mark, resettable so that a phase can be measured alone.


def rss_mb() -> Tuple[float, float]:
  """(current RSS, high-water RSS) of this process in MiB, from /proc/self/status (falls back to getrusage)."""
  current = peak = None
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          current = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
          peak = int(line.split()[1]) / 1024
  except OSError:
    pass
  if peak is None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return (current if current is not None else peak), peak


def reset_peak_rss() -> bool:
  """Resets the high-water mark to the current RSS (Linux >= 4.0: writes 5 to /proc/self/clear_refs)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def process_peak_mb() -> float:
  """getrusage's ru_maxrss in MiB: the whole process's peak (loading and compiling included)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# The machine: what is it, how loaded, and how fast can it multiply and move memory (jax, one device).


def machine_info() -> Dict[str, Any]:
  info: Dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
  try:
    info["load_avg_1m_5m_15m"] = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      info["cpu_model"] = names[0]
  except OSError:
    pass
  try:
    import jax  # pylint: disable=g-import-not-at-top
    info["jax"] = jax.__version__
    info["backend"] = jax.default_backend()
    info["device"] = jax.devices()[0].device_kind
    info["device_count"] = jax.device_count()
  except Exception:  # pylint: disable=broad-except
    pass
  return info


def machine_rates(matmul_size: int = 2_048, copy_mb: int = 256, repeats: int = 5) -> Dict[str, float]:
  """The machine's achievable floor (`spectral_soup.models.cost.machine_rates`: a float32 matmul's rate and a
  streaming update's bandwidth, best of `repeats`), measured once the machine is idle.

  Returns {"matmul_flops_per_s", "bandwidth_bytes_per_s", "matmul_size", "copy_mb"}.
  """
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  wait_for_idle()
  return cost.machine_rates(matmul_size, copy_mb, repeats)


# ----------------------------------------------------------------------------------------------------------------
# Output.


def _fmt(value: Any, spec: str) -> str:
  if value is None:
    return "-"
  if isinstance(value, str):
    return value
  try:
    return format(value, spec)
  except (TypeError, ValueError):
    return str(value)


def print_table(rows: Sequence[Dict[str, Any]], columns: Sequence[Tuple[str, str, str]], title: str = "") -> str:
  """Prints rows as an aligned text table. columns: (key, header, format spec). Returns the text."""
  cells = [[header for _, header, _ in columns]]
  for row in rows:
    cells.append([_fmt(row.get(key), spec) for key, _, spec in columns])
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = [title] if title else []
  for i, r in enumerate(cells):
    lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
    if i == 0:
      lines.append("  ".join("-" * w for w in widths))
  text = "\n".join(lines)
  print(text, flush=True)
  return text


def write_json(path: Optional[str], result: Dict[str, Any]) -> None:
  if not path:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # allow_nan=False: a NaN or infinite measurement is an error here, not a `NaN` that is not JSON (and that a table
  # would show as a number).
  try:
    text = json.dumps(result, indent=2, default=_json_default, allow_nan=False)
  except ValueError as e:
    raise ValueError(f"{path}: the result holds a value that is not a finite number ({e}); not written: "
                     f"{_non_finite_fields(result)[:5]}") from None
  with open(path, "w") as f:
    f.write(text)
  print(f"Wrote {path}.", flush=True)


def _non_finite_fields(value: Any, where: str = "") -> List[str]:
  """Paths of the non-finite floats in a JSON-like value (after `_json_default`)."""
  if isinstance(value, float):
    return [] if math.isfinite(value) else [f"{where or '.'} = {value}"]
  if isinstance(value, dict):
    return [p for k, v in value.items() for p in _non_finite_fields(v, f"{where}.{k}")]
  if isinstance(value, (list, tuple)):
    return [p for i, v in enumerate(value) for p in _non_finite_fields(v, f"{where}[{i}]")]
  converted = _json_default(value)
  return [] if converted is value or isinstance(converted, str) else _non_finite_fields(converted, where)


def _json_default(x: Any) -> Any:
  """NumPy and jax scalars as numbers and arrays as lists (a jax value was written as its repr string)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if hasattr(x, "__array__") and hasattr(x, "dtype") and hasattr(x, "shape"):  # A jax array (or similar).
    value = np.asarray(x)
    return value.item() if value.ndim == 0 else value.tolist()
  return str(x)


def cpu_seconds() -> float:
  """User + system CPU time of this process and of its finished children (subprocess variants included)."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def result(name: str, config: Dict[str, Any], rows: List[Dict[str, Any]], speedup: Optional[float],
           **extra: Any) -> Dict[str, Any]:
  """The JSON object every benchmark writes (see the module docstring).

  `cpu_s` (CPU seconds of the whole benchmark so far, subprocesses included) tells how long the run would take
  on an otherwise idle machine better than its wall time on a loaded one: between cpu_s / cores and cpu_s.
  """
  out = {
      "name": name,
      "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
      "config": config,
      "machine": machine_info(),
      "rows": rows,
      "speedup": speedup,
      "cpu_s": cpu_seconds()
  }
  out.update(extra)
  return out


# ----------------------------------------------------------------------------------------------------------------
# Subprocesses (one per variant: a clean address space for the peak-memory reading, or other XLA flags).


def run_child(module: str, args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
              timeout_s: Optional[float] = None) -> Dict[str, Any]:
  """Runs `python -m module *args` and returns the JSON object it prints on its last stdout line.

  The child inherits this environment plus `env`; its stderr passes through (compile warnings, errors). It starts
  once the machine is idle (`wait_for_idle`), whose reading the returned row keeps as "idle_check".
  """
  full_env = dict(os.environ)
  full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.update(env or {})
  idle = wait_for_idle()
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                        text=True, timeout=timeout_s, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.strip()]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"`python -m {module} {' '.join(args)}` failed (exit {proc.returncode}):\n{proc.stdout}")
  out = json.loads(lines[-1])
  if isinstance(out, dict):
    out.setdefault("idle_check", idle)
  return out
