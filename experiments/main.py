r"""The main job: the whole spectral souping pipeline on one config, everything written to --workdir.

  python -m experiments.main --config=configs/demo.py --workdir=workdir/demo [--config.FIELD=VALUE ...]

Phases (each timed, with a progress bar where it loops):
  1. data      the embedded preference data (shipped for the demo's settings; other settings are sampled once,
               then cached), tokenized and split by prompt;
  2. users     held-out simulated users (their own seed), and their labels on the training pairs;
  3. offline   K basis heads (one per attribute) and one bespoke head per user, fitted together
               (`offline.train.train_and_evaluate`: the demo's in closed form, ridge with train.num_steps=0; gradient
               steps on cached features otherwise; checkpointed: a restart resumes);
  4. pad       PAD's token-level attribute rewards (ridge on token counts);
  5. online    T rounds of Thompson-sampled soups shown in pairs, simulated choices, lambda refits (all users at
               once; `online.protocol`);
  6. eval      every method answers the held-out prompts (one decoding loop for all methods and users, common
               random numbers), the swept methods at each strength of `eval.frontier`, each basis alone;
               normalized scores with bootstrap intervals, KL, gains at the bespoke policy's KL, each basis's
               attribute shift, regret, a K ablation, a Pareto sweep between two bases;
  7. results   results.json, plots (*.png), the table.

results.json: {"methods": {NAME: {"normalized_score", "mean_reward", "kl", ...}}, "frontier", "at_bespoke_kl",
"offline": {"attribute_shift", ...}, "users", "rounds", ..., "config", "code"}; every key: docs/RESULTS.md. It is
strict JSON: a number that is not finite (a normalized score when the bespoke gain is 0, the K ablation's accuracy
when no comparison is held out) is written as null. `--config.eval.split=dev` evaluates on a split of the training
prompts and users instead (for tuning; the held-out prompts are never read).

The workdir. `<workdir>/config.json` records the config of the last run accepted there, and `<workdir>/basis` holds
what a later run reuses: the closed-form bases and bespoke heads (checkpointed) and the feature cache.
  * Reuse. A run into a workdir whose basis/ holds a checkpoint must have the recorded config in every field except
    those each run recomputes from scratch (`recomputed_every_run`: online.* and eval.*, but eval.split, which
    picks the training prompts and users); any other difference (users.seed, data.attributes, a field the recorded
    config lacks, ...) is refused before anything loads, naming each field with both values: the saved heads would
    be reused under the wrong names, users or data. Same config: the run resumes (the heads are read back).
  * Another job's workdir (a basis training's checkpoints/, a config.json the main job did not write) is refused,
    and so is a workdir in which a file the job writes is taken by a directory (`check_output_paths`).
  * Results always belong to the config.json beside them. When a run is accepted (config, data, model, workdir
    checked; the workdir's lock held), the previous run's results.json, comparisons.npz, samples.json and plots are
    moved to `<workdir>/previous_runs/<YYYYmmdd-HHMMSS>/` with a copy of its config.json (a warning names the
    directory), and only then is the new config.json written. A run that is killed or fails later leaves its
    config.json with only its own outputs (comparisons.npz once the online phase is done; results.json, samples.json
    and plots at the end), never beside another run's. Every file is written atomically (a temporary file renamed
    over it; a failed write removes it, and a run removes those a killed run left).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from typing import Any, List, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spectral_soup.utils import cli
from spectral_soup.utils import errors
from spectral_soup.utils import files
from spectral_soup.utils import logs
from spectral_soup.utils import memory
from spectral_soup.utils import workdir_lock

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for everything the run writes.")
_SHOW_CONFIG = flags.DEFINE_bool(
    "show_config", False, "Print every field of --config with its value and comment, "
    "and exit (no --workdir needed).")
flags.mark_flags_as_required(["config"])  # --workdir is checked in main (not needed by --show_config).

ESTIMATES = ("map", "posterior_mean")  # The spectral lambda served: the penalized fit, or the Bayes direction.
# Bounds of eval fields whose large values fail only after the decode: frontier strengths (a strength times a
# method's weights must stay within the soups' weight bound, `soup.validation.MAX_ABS_WEIGHT`) and bootstrap resamples.
MAX_STRENGTH = 1e3
MAX_BOOTSTRAP = 100_000
# Methods evaluated along a strength knob (eval.frontier), compared at the bespoke policy's KL.
SWEPT = ("spectral_soup_explicit", "p_soups", "pad", "mod_oracle")
METHOD_ORDER = ("spectral_soup_explicit", "spectral_soup_params", "spectral_soup_implicit", "p_soups", "pad",
                "mod_oracle", "uniform", "reference", "bespoke")
# The run's results at the top of the workdir, besides config.json and the plots (`plots.PLOT_FILES`); results.json
# first: a re-run moves them aside in this order.
RESULT_FILES = ("results.json", "comparisons.npz", "samples.json")
BASIS_DIR = "basis"  # The offline run: the bases and bespoke heads (checkpointed), the feature cache.
PREVIOUS_RUNS = "previous_runs"  # Earlier runs' results, one timestamped directory each.


def online_config(config):
  """The online protocol's settings from the job's config (prior_mean = -1: 1 / K, the uniform soup)."""
  from spectral_soup.online import protocol  # pylint: disable=g-import-not-at-top
  o = config.online
  return protocol.OnlineConfig(rounds=o.rounds, prompts_per_round=o.prompts_per_round, l2=o.l2,
                               pad_weights_l2=o.get("pad_weights_l2"),
                               prior_mean=1.0 / len(config.data.attributes) if o.prior_mean < 0 else o.prior_mean,
                               explore_scale=o.explore_scale, mode=o.mode, constraint=o.get("constraint", "none"),
                               features=o.get("features", "implicit_reward"))


def validate_config(config, num_devices: Optional[int] = None) -> None:
  """Fails fast, naming the field, before anything expensive runs (the training fields: `offline.train`).

  num_devices: the devices the job will see (None: this machine's; a launcher passes the remote machine's)."""
  from spectral_soup.offline import config_checks  # pylint: disable=g-import-not-at-top
  from spectral_soup.online import checks  # pylint: disable=g-import-not-at-top
  from spectral_soup.online import protocol  # pylint: disable=g-import-not-at-top
  from spectral_soup.online import users as users_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.eval import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import config_check  # pylint: disable=g-import-not-at-top

  need = config_check.field_checker(config)
  config_check.check_finite(config)  # NaN / inf floats and out-of-range integers, before any field's own range.
  # jax.random.key takes a 64-bit signed seed (`>= 0`: the offline check, below).
  need(config.seed <= 2**63 - 1, "seed", "an integer in [0, 2**63 - 1] (a 64-bit PRNG seed)")
  need(config.data.source == "embedded", "data.source", "'embedded' (the main job generates its own data)")
  config_checks.check_embedded_attributes(config)  # Before the fields whose sizes follow from it.
  need(not config.data.get("tokenizer", ""), "data.tokenizer",
       "'' (the main job reads model.path's tokenizer, which tokenized its data)")
  need(config.online.prior_mean >= 0 or config.online.prior_mean == -1, "online.prior_mean",
       ">= 0, or -1 for 1 / K (the uniform soup)")
  need(config.data.num_prompts >= 2, "data.num_prompts", ">= 2 (prompts for training and for held-out evaluation)")
  need(config.basis.kind == "heads", "basis.kind", "'heads' (bespoke and basis heads share one decoding loop)")
  need(config.basis.num_bases == len(config.data.attributes), "basis.num_bases",
       f"the number of data.attributes ({len(config.data.attributes)}): one basis per attribute")
  need(config.users.kind in users_lib.USER_KINDS, "users.kind", f"one of {users_lib.USER_KINDS}")
  need(config.users.num_users >= 1, "users.num_users", ">= 1")
  need(config.users.seed >= 0, "users.seed", ">= 0")
  need(config.users.temperature >= 0, "users.temperature", ">= 0")
  need(config.users.concentration > 0, "users.concentration", "> 0")
  for field, expected in protocol.config_problems(online_config(config)):
    need(False, f"online.{field}", expected)
  need(not config.online.get("unit_total_weight", False) or config.online.get("constraint") == "nonnegative",
       "online.unit_total_weight", "False unless online.constraint='nonnegative' (it rescales lambda to sum 1)")
  estimate = config.online.get("estimate", "map")
  need(estimate in ESTIMATES, "online.estimate", " or ".join(map(repr, ESTIMATES)))
  need(estimate != "posterior_mean" or config.online.get("unit_total_weight", False), "online.estimate",
       "'map' unless online.unit_total_weight=True ('posterior_mean' estimates lambda's direction on the simplex)")
  need(config.eval.split in ("heldout", "dev"), "eval.split",
       "'heldout' (the held-out prompts and users) or 'dev' (a split of the training ones, for tuning)")
  need(config.eval.num_prompts >= 2, "eval.num_prompts", ">= 2")
  for method in SWEPT:
    scales = config.eval.frontier.get(method, ())
    need(
        config_check.is_numbers(scales) and all(0 < x <= MAX_STRENGTH for x in scales) and 1.0 in scales,
        f"eval.frontier.{method}", f"a tuple of strengths in (0, {MAX_STRENGTH:g}] including 1.0 (the method as "
        "fitted; a strength multiplies the method's weights, which the soups bound)")
  need(
      set(config.eval.soups) <= {"params", "implicit"} and len(set(config.eval.soups)) == len(config.eval.soups),
      "eval.soups", "soups evaluated besides the explicit one, among 'params' and 'implicit', each once")
  need(config.eval.samples_per_prompt >= 1, "eval.samples_per_prompt", ">= 1")
  if num_devices is None:  # On the job's own machine: the evaluation's responses are held in its memory.
    host = memory.host_memory_bytes()
    # At least the 7 methods that are always evaluated, each answering every prompt for every user.
    rows = config.users.num_users * config.eval.num_prompts * config.eval.samples_per_prompt * (len(METHOD_ORDER) - 2)
    need(
        host is None or rows * config.eval.max_new_tokens * 4 <= host, "eval.samples_per_prompt",
        f"a number whose evaluation fits this machine's {(host or 0) / 2**30:.1f} GiB: users.num_users x "
        "eval.num_prompts x eval.samples_per_prompt x 7 methods x eval.max_new_tokens token ids (4 bytes) are "
        f"held at once, {rows * config.eval.max_new_tokens * 4 / 2**30:.3g} GiB")
  need(config.eval.max_new_tokens >= 1, "eval.max_new_tokens", ">= 1")
  need(config.eval.chunk_rows >= 1, "eval.chunk_rows", ">= 1")
  need(config.eval.max_proposals >= 1, "eval.max_proposals", ">= 1")
  need(checks.l2_in_range(config.eval.pad_l2), "eval.pad_l2", protocol.L2_EXPECTED)
  pareto = config.eval.pareto_bases
  need(
      config_check.is_numbers(pareto, integers=True) and len(pareto) == 2 and
      all(0 <= b < config.basis.num_bases for b in pareto) and pareto[0] != pareto[1], "eval.pareto_bases",
      f"two distinct basis indices in [0, {config.basis.num_bases})")
  need(config.eval.pareto_points >= 2, "eval.pareto_points", ">= 2 (soups from one basis to the other)")
  need(
      metrics_lib.min_bootstrap() <= config.eval.num_bootstrap <= MAX_BOOTSTRAP, "eval.num_bootstrap",
      f"an integer in [{metrics_lib.min_bootstrap()}, {MAX_BOOTSTRAP:,}] (at least 2 / (1 - 0.9) draws for the 90% "
      "intervals; each method's bootstrap holds num_bootstrap x users x eval prompts float64 values, computed after "
      "the whole decode)")
  if num_devices is None:  # The bootstrap's [users, draws, prompts] float64 values and its int64 draws, at once.
    host = memory.host_memory_bytes()
    boot = config.eval.num_bootstrap * config.eval.num_prompts * (config.users.num_users + 1) * 8
    need(
        host is None or boot <= host / 2, "eval.num_bootstrap",
        f"a number of draws whose bootstrap fits half of this machine's {(host or 0) / 2**30:.1f} GiB: "
        f"num_bootstrap x (users.num_users + 1) x eval.num_prompts x 8 bytes = {boot / 2**30:.3g} GiB, after the "
        "whole decode")
  config_checks.validate_config(config, num_devices=num_devices)


def recomputed_every_run(field: str) -> bool:
  """Whether every run recomputes all that depends on config `field` ("online.l2"), so that a run may change it in
  a workdir whose saved bases it reuses: the online rounds and the evaluation, but not eval.split (the training
  prompts and users the bases and bespoke heads are fitted on). Any other field, a new one included, is state."""
  return field.startswith(("online.", "eval.")) and field != "eval.split"


def _output_files() -> tuple:
  from spectral_soup.eval import plots  # pylint: disable=g-import-not-at-top
  return RESULT_FILES + plots.PLOT_FILES


def check_workdir_reuse(config, workdir: str) -> None:
  """Raises ValueError unless `workdir` is new, or a main-job workdir whose saved state `config` may reuse.

  Refused: another job's workdir (a basis training's `checkpoints/`, a config.json the main job did not write), and a
  workdir whose basis/ holds a checkpoint made with a config that differs from `config` in a field the saved heads
  depend on (every field but `recomputed_every_run`'s), each such field named with both values. A workdir without
  a basis checkpoint (new, or a run stopped before its offline phase) holds nothing a run reuses (the feature cache
  is keyed by what it depends on) and is accepted. Reads config.json only.
  """
  from spectral_soup.offline import resume  # pylint: disable=g-import-not-at-top
  kind = resume.workdir_kind(workdir)
  if kind == resume.BASIS_TRAINING:
    raise ValueError(f"--workdir={workdir} holds a basis training (checkpoints/ or metrics.jsonl at its top: "
                     f"experiments.train_basis, or a main job's {BASIS_DIR}/ directory): expected a main job's workdir "
                     "or a fresh one.")
  if kind == resume.OTHER:
    resume.read_config_json(os.path.join(workdir, "config.json"))  # One that is not JSON is named as such.
    raise ValueError(f"--workdir={workdir} holds a config.json that the main job did not write (no "
                     f"{' / '.join(resume.MAIN_JOB_SECTIONS)} sections): expected a main job's workdir or a fresh one.")
  checkpoints = os.path.join(workdir, BASIS_DIR, "checkpoints")
  # Committed steps only: a killed save leaves `<step>.orbax-checkpoint-tmp-*`, which holds no bases.
  if not (os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))):
    return
  new = json.loads(config.to_json_best_effort())  # As config.json holds it (tuples as lists, None as null).
  recorded = os.path.join(workdir, "config.json")
  if not os.path.lexists(recorded):  # The basis run's own record: one head per basis, then one per user.
    recorded = os.path.join(workdir, BASIS_DIR, "config.json")
    if not os.path.lexists(recorded):
      raise ValueError(f"--workdir={workdir} holds saved bases ({checkpoints}) but no config.json that says what "
                       "config made them: use a fresh --workdir.")
    new["basis"]["num_bases"] = len(config.data.attributes) + config.users.num_users
  differences = resume.config_differences(resume.read_config_json(recorded), new, recomputed_every_run)
  if differences:

    def describe(field, old, value):
      if old is resume.MISSING:
        return f"config.{field}={value!r} is not in it"
      if value is resume.MISSING:
        return f"config.{field} (it has {old!r}) is no longer a config field"
      return f"config.{field}={value!r} differs from its {old!r}"

    listed = "; ".join(describe(*d) for d in differences)
    raise ValueError(f"--workdir={workdir} holds bases and bespoke heads ({os.path.join(workdir, BASIS_DIR)}) made "
                     f"with another config ({recorded}): {listed}. A run reuses them, so only online.* and eval.* "
                     "fields (not eval.split) may change in one workdir: use a fresh --workdir, or the recorded "
                     "values.")


def check_output_paths(workdir: str) -> None:
  """Raises ValueError naming the first path the run would fail to write at its end: a file it writes (config.json,
  results.json, a plot, ...) taken by a directory or another non-file, or one of its directories taken by a file."""
  for name in ("config.json",) + _output_files():
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.isfile(path):
      what = "a directory" if os.path.isdir(path) else "not a regular file"
      raise ValueError(f"--workdir={workdir}: {path} is {what}: expected a file the run can replace (the run writes "
                       f"its {name} there); move it away or use another --workdir.")
  for name in (BASIS_DIR, PREVIOUS_RUNS):
    path = os.path.join(workdir, name)
    if os.path.lexists(path) and not os.path.isdir(path):
      raise ValueError(f"--workdir={workdir}: {path} is a file: expected the directory the run keeps its "
                       f"{'bases' if name == BASIS_DIR else 'earlier results'} in; move it away or use another "
                       "--workdir.")


def set_aside_previous_outputs(workdir: str) -> Optional[str]:
  """Moves the previous run's results (`RESULT_FILES`, the plots) to `<workdir>/previous_runs/<time>/`, with a copy
  of the config.json they belong to, and removes temporary files that killed writes left; returns that directory
  (None: nothing to move). Called once the run is accepted, before it writes its own config.json: results in the
  workdir then always belong to the config.json beside them."""
  files.remove_stale_temps(workdir, ("config.json",) + _output_files())
  present = [name for name in _output_files() if os.path.lexists(os.path.join(workdir, name))]
  if not present:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S")
  destination, n = os.path.join(workdir, PREVIOUS_RUNS, stamp), 1
  while os.path.lexists(destination):
    destination, n = os.path.join(workdir, PREVIOUS_RUNS, f"{stamp}-{n}"), n + 1
  os.makedirs(destination)
  if os.path.isfile(os.path.join(workdir, "config.json")):
    shutil.copy2(os.path.join(workdir, "config.json"), os.path.join(destination, "config.json"))
  for name in present:  # results.json first: the workdir stops looking finished at once.
    os.replace(os.path.join(workdir, name), os.path.join(destination, name))
  logging.warning("Moved the previous run's %s to %s (with its config.json): this run writes its own.",
                  ", ".join(present), destination)
  return destination


def check_prompt_pools(config, num_online: int, num_eval: int) -> List[str]:
  """Checks the prompt pools of the data's hash split (known once the data is loaded: a hash of each prompt's text)
  against the config; raises ValueError naming the field. Returns warnings (fewer prompts than eval.num_prompts
  asks for: the evaluation uses all of them).

  Args:
    config: the job's config.
    num_online: prompts the online rounds draw from (the training prompts; with eval.split="dev", those of the
      dev split's training side).
    num_eval: prompts the evaluation draws from (held out; with eval.split="dev", the dev split's).
  """
  from spectral_soup.online import protocol  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import config_check  # pylint: disable=g-import-not-at-top
  need = config_check.field_checker(config)
  dev = config.eval.split == "dev"
  split_name = "dev" if dev else "held-out"
  split = (f"the dev split of the {num_online + num_eval} training prompts"
           if dev else f"the hash split of the {num_online + num_eval} prompts")
  pools = f"{split} holds out {num_eval} and leaves {num_online} for the online rounds"
  need(num_eval >= 2, "data.eval_fraction", f"a share that holds out at least 2 {split_name} prompts to evaluate on: "
       f"{pools}")
  need(
      num_online >= config.train.batch_size, "data.eval_fraction",
      f"a share that leaves at least train.batch_size={config.train.batch_size} training prompts (one pair each) for "
      f"the bases and bespoke heads: {pools}")
  for field, expected in protocol.config_problems(online_config(config), pool_size=num_online)[:1]:
    need(False, f"online.{field}", f"{expected}: {pools} (data.eval_fraction={config.data.eval_fraction})")
  warnings = []
  if config.eval.num_prompts > num_eval:
    warnings.append(f"config.eval.num_prompts={config.eval.num_prompts} asks for more {split_name} prompts than "
                    f"there are: the evaluation uses all {num_eval} ({pools}).")
  return warnings


def check_decode_length(config, prompt_len: int, max_len: int) -> None:
  """Raises ValueError naming eval.max_new_tokens when a prompt and its response do not fit the model's `max_len`
  positions (the decoding cache holds both; the serving API refuses the same)."""
  from spectral_soup.utils import config_check  # pylint: disable=g-import-not-at-top
  need = config_check.field_checker(config)
  need(prompt_len < max_len, "data.prompt_len",
       f"< the model's max_len={max_len} positions (a prompt of {prompt_len} tokens leaves no room for a response)")
  need(
      prompt_len + config.eval.max_new_tokens <= max_len, "eval.max_new_tokens",
      f"<= {max_len - prompt_len}: the model's max_len={max_len} positions less the prompt's {prompt_len} "
      "(data.prompt_len)")


def check_decode_memory(config, model_config, prompt_len: int, limit_bytes: Optional[int]) -> None:
  """Raises ValueError naming eval.max_new_tokens and eval.chunk_rows when decoding `eval.chunk_rows` rows of
  prompt + response cannot fit in `limit_bytes` (the device's memory; None: unknown, not checked): the weights, the
  rows' KV cache and one logits row each, a lower bound of what the decoding loop holds."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  if limit_bytes is None:
    return
  rows, max_len = config.eval.chunk_rows, prompt_len + config.eval.max_new_tokens
  need = cost.decode_memory_bytes(model_config, rows, max_len)
  if need > limit_bytes:
    cache = cost.cache_bytes_per_token(model_config, np.dtype(model_config.dtype).itemsize)
    raise ValueError(
        f"config.eval.max_new_tokens={config.eval.max_new_tokens} with config.eval.chunk_rows={rows} needs at least "
        f"{need / 2**30:.1f} GiB to decode ({rows} rows x {max_len} cache positions x {cache / 2**10:.0f} KiB, the "
        f"weights and the logits), more than the device's {limit_bytes / 2**30:.1f} GiB: lower "
        f"eval.chunk_rows (rows decoded at a time) or eval.max_new_tokens.")


def implicit_acceptance_rate(modes: List[str], accepted: Any, proposals: Any) -> Optional[float]:
  """Accepted proposals per proposal over the programs of mode "implicit" (`accepted` / `proposals`: per program,
  summed over its rows and steps); None (null in results.json) when no program was implicit, not 0."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  implicit = [p for p, mode in enumerate(modes) if mode == "implicit"]
  if not implicit:
    return None
  return float(np.sum(np.asarray(accepted)[implicit]) / max(float(np.sum(np.asarray(proposals)[implicit])), 1.0))


def code_version() -> dict:
  """The code that ran: the package's version and, in a git checkout, its commit and whether tracked files differ
  from it (None where unknown). Local only: no network."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  import spectral_soup  # pylint: disable=g-import-not-at-top
  try:
    version = metadata.version("spectral_soup")
  except metadata.PackageNotFoundError:
    version = None
  root = os.path.dirname(os.path.dirname(os.path.abspath(spectral_soup.__file__)))
  commit = modified = None
  if os.path.exists(os.path.join(root, ".git")):

    def git(*args):
      return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                            check=True).stdout.strip()

    try:
      commit = git("rev-parse", "HEAD")
      modified = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
      pass
  return {"version": version, "git_commit": commit, "git_modified": modified}


def json_text(value: Any) -> str:
  """`json.dumps(value, indent=2)` as strict JSON: a NaN or infinite float is written as null (bare NaN / Infinity
  tokens are not JSON); every finite value exactly as json.dumps writes it."""
  return json.dumps(files.finite_or_none(value), indent=2, allow_nan=False)


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if _SHOW_CONFIG.value:
    print(cli.describe_config(config, config_flags.get_config_filename(flags.FLAGS["config"])))
    return
  # ---- Config check: a bad field or workdir ends here in one line, exit status 2 (`--verbosity=1`: traceback).
  with cli.input_checks():
    validate_config(config)
    cli.check_workdir(workdir)
    check_workdir_reuse(config, workdir)
    check_output_paths(workdir)
  # The run's own input checks (model, data, the basis run's resume, the workdir's lock) end the same way.
  with cli.reporting_input_errors(), contextlib.ExitStack() as stack:
    run(config, workdir, stack)


def run(config, workdir: str, stack: contextlib.ExitStack) -> None:
  """The whole job on a checked config. `stack` holds the workdir's lock until the job ends."""
  # Imported here so that `--help` and config errors do not pay for JAX start-up.
  import jax
  import ml_collections
  import numpy as np

  from spectral_soup import models
  from spectral_soup.baselines import pad as pad_lib
  from spectral_soup.data import embedded
  from spectral_soup.data import rewards as rewards_lib
  from spectral_soup.eval import harness as harness_lib
  from spectral_soup.eval import metrics as metrics_lib
  from spectral_soup.eval import plots
  from spectral_soup.models import build
  from spectral_soup.models import cost
  from spectral_soup.offline import features
  from spectral_soup.offline import pairs as pairs_lib
  from spectral_soup.offline import resume
  from spectral_soup.offline import train
  from spectral_soup.online import direction
  from spectral_soup.online import fit as fit_lib
  from spectral_soup.online import protocol
  from spectral_soup.online import users as users_lib
  from spectral_soup.soup import decoding

  logs.quiet_orbax()
  timing = {}
  t_job = time.time()

  def phase(name):
    print(f"\n==== {name} ({time.time() - t_job:.0f} s)", flush=True)
    return time.time()

  logging.info("JAX devices: %s", jax.devices())
  code = code_version()  # The code as it starts (results.json["code"]).
  attributes = tuple(config.data.attributes)
  num_attr = num_bases = len(attributes)
  num_users = config.users.num_users

  # ---- 1. Data.
  t0 = phase("data: embedded preference pairs")
  split_name = "dev" if config.eval.split == "dev" else "held-out"  # Where the users and prompts evaluated come from.
  # Model, data, the basis run's checkpoint and the workdir's lock are the user's input: a bad one is an InputError
  # (one line), and nothing is written to the workdir before all of them have been accepted.
  with errors.input_stage():
    d = config.data
    tokenizer = models.tokenizer_from_pretrained(config.model.path)
    # Tuning (eval.split="dev"): the held-out prompts are dropped unseen, and a hash split of the training prompts
    # plays their part (with users of the user stream's training split, below).
    data = pairs_lib.embedded_data(config, tokenizer, dev=config.eval.split == "dev")
    pairs, arrays, is_eval = data.pairs, data.arrays, data.is_eval
    # The prompt pools are a hash split of the prompts' text: checked here, before the model loads.
    pool_warnings = check_prompt_pools(config, num_online=int((~is_eval).sum()), num_eval=int(is_eval.sum()))
    model, backbone = models.from_pretrained(config.model.path, dtype=config.model.dtype,
                                             weight_dtype=config.model.weight_dtype, remat=config.model.remat)
    check_decode_length(config, prompt_len=arrays["prompt"].shape[1], max_len=model.config.max_len)
    check_decode_memory(config, model.config, prompt_len=arrays["prompt"].shape[1],
                        limit_bytes=memory.memory_limit_bytes())
    # Standardization of the attribute scores (users' true rewards, PAD's targets, the evaluation's scorer) is fitted
    # on the training responses only: held-out prompts inform nothing that is chosen or fitted.
    suite = rewards_lib.RewardSuite(list(attributes), stats=data.stats)
    std_a, std_b = data.standardized("a"), data.standardized("b")
    print(f"{len(pairs)} pairs ({(~is_eval).sum()} train / {is_eval.sum()} held out) from {data.directory}; "
          f"responses sampled in {data.metadata['sampling_seconds']:.0f} s when generated.")
    train_config = ml_collections.ConfigDict(config.to_dict())
    train_config.basis.num_bases = num_bases + num_users  # The K bases, then one bespoke head per user.
    try:
      resume.check_existing_checkpoint(train_config, os.path.join(workdir, "basis"))
    except ValueError as e:
      if "config.basis.num_bases=" not in str(e):
        raise
      # Inside the main job the basis run has K + U heads: name the field the user sets.
      raise ValueError(f"config.users.num_users={num_users} differs from the run in {workdir}, whose basis checkpoint "
                       f"holds another number of heads ({num_bases} bases + one bespoke head per user): {e}") from None
    os.makedirs(workdir, exist_ok=True)
    stack.enter_context(workdir_lock.hold(workdir))
    check_workdir_reuse(config, workdir)  # Again, now that no other run can write to it.
    check_output_paths(workdir)
  for warning in pool_warnings:
    logging.warning(warning)
  timing["data_s"] = time.time() - t0
  # The config, the model, the data and the workdir have been accepted: only now is anything written to it. The
  # previous run's results go first, so that the results in the workdir always belong to its config.json.
  set_aside_previous_outputs(workdir)
  files.write_text_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2))

  # ---- 2. Users: held-out simulated users, labels of their own reward on the pairs (for the bespoke heads).
  t0 = phase("users")
  users = users_lib.make_users(config.users.kind, num_users, config.users.seed,
                               split="train" if config.eval.split == "dev" else "eval", num_attributes=num_attr,
                               temperature=config.users.temperature, concentration=config.users.concentration)
  r_a = np.asarray(users_lib.true_reward(users, std_a)).T  # [N, U]
  r_b = np.asarray(users_lib.true_reward(users, std_b)).T
  user_labels = embedded.pair_labels(r_a, r_b, d.tie_margin, fit=~is_eval)  # Ties scaled on training pairs only.
  labels = np.concatenate([arrays["labels"], user_labels], axis=1)  # [N, K + U]: bases, then bespoke heads.
  print("users (weights over " + ", ".join(attributes) + "):")
  for u in range(num_users):
    print(f"  user {u}: " + " ".join(f"{w:+.2f}" for w in np.asarray(users.weights[u])))
  timing["users_s"] = time.time() - t0

  # ---- 3. Offline: K bases + U bespoke heads in one training run.
  t0 = phase(f"offline: {num_bases} basis heads + {num_users} bespoke heads")
  fields = ("prompt", "prompt_mask", "response_a", "response_a_mask", "response_b", "response_b_mask")
  # Ratings (loss.kind="ratings"): each basis regresses its standardized attribute score, each bespoke head its
  # user's true reward; the labels are their signs (held-out accuracy).
  ratings_a, ratings_b = np.concatenate([std_a, r_a], axis=1), np.concatenate([std_b, r_b], axis=1)
  split = lambda keep: {
      **{
          f: arrays[f][keep] for f in fields
      }, "labels": labels[keep],
      "scores_a": ratings_a[keep],
      "scores_b": ratings_b[keep]
  }
  train_pairs, eval_pairs = split(~is_eval), split(is_eval)
  result = train.train_and_evaluate(train_config, os.path.join(workdir, "basis"), pairs=(train_pairs, eval_pairs),
                                    loaded=(model, backbone))
  heads = jax.device_get(result.state["params"]["heads"])
  accuracy = np.asarray(result.eval_metrics.get("accuracy", np.full(num_bases + num_users, np.nan)))
  counts = np.asarray(result.eval_metrics.get("count", np.zeros(num_bases + num_users)))
  accuracy = np.where(counts > 0, accuracy, np.nan)  # No held-out pair: no accuracy (null in results.json), not 0.
  cross = np.asarray(result.eval_metrics.get("cross_accuracy", np.full((num_bases + num_users,) * 2, np.nan)))
  print("held-out pair accuracy of each head's implicit reward on its own labels:")
  for h in range(num_bases + num_users):
    name = f"basis {attributes[h]}" if h < num_bases else f"bespoke user {h - num_bases}"
    print(f"  {name:<24} {accuracy[h]:.3f} ({int(counts[h])} pairs)")
  timing["offline_s"] = time.time() - t0

  # ---- 4. PAD's token-level rewards on the same training responses.
  t0 = phase("pad: token-level attribute rewards")
  support = features.select_support([train_pairs["response_a"], train_pairs["response_b"]],
                                    [train_pairs["response_a_mask"], train_pairs["response_b_mask"]],
                                    config.basis.vocab_support or model.config.vocab_size, model.config.vocab_size)
  counts_train = pad_lib.token_counts([train_pairs["response_a"], train_pairs["response_b"]],
                                      [train_pairs["response_a_mask"], train_pairs["response_b_mask"]], support)
  pad_table = pad_lib.fit_token_rewards(counts_train, np.concatenate([std_a[~is_eval], std_b[~is_eval]]), support,
                                        model.config.vocab_size, l2=config.eval.pad_l2)
  timing["pad_s"] = time.time() - t0

  # ---- The harness: the policy with every head, prompt pools, the scorer.
  policy = build.build_policy(model.config, train_config.basis)
  params = build.merge_params({"heads": heads}, build.unboxed(backbone))
  prompt_text = [p["prompt"] for p in pairs]
  online_pool = np.flatnonzero(~is_eval)
  eval_pool = np.flatnonzero(is_eval)[:config.eval.num_prompts]
  eos_id = tokenizer.eos_token_id
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

  def score_fn(prompts, tokens, lengths):
    texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip() for row, n in zip(tokens, lengths)]
    return suite(prompts, texts, standardize=True)

  def make_harness(rows, max_new_tokens):
    return harness_lib.PolicyHarness(policy, params, arrays["prompt"][rows], arrays["prompt_mask"][rows],
                                     [prompt_text[i] for i in rows], score_fn, num_bases=num_bases,
                                     beta=config.loss.beta, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                     pad_table=pad_table, support=support,
                                     head_support=support if config.basis.vocab_support else None,
                                     chunk_rows=config.eval.chunk_rows, max_proposals=config.eval.max_proposals,
                                     sampling=decoding.SamplingConfig(temperature=1.0))

  # ---- 5. Online.
  t0 = phase(f"online: {config.online.rounds} rounds x {config.online.prompts_per_round} comparisons, "
             f"{num_users} users, {config.online.mode} soups")
  online_cfg = online_config(config)
  harness = make_harness(online_pool, config.eval.max_new_tokens)
  key = jax.random.key(config.seed)
  key, k_online = jax.random.split(key)
  history = protocol.run_online(harness, users, len(online_pool), online_cfg, k_online)
  lam, lam_ps, pad_w = history["lam"], history["lam_p_soups"], history["pad_weights"]
  if config.online.get("estimate", "map") == "posterior_mean":  # The Bayes direction (online/direction.py).
    lam = direction.posterior_mean_direction(history["comparison_features"], history["comparison_prefs"],
                                             key=jax.random.fold_in(k_online, 1))
  elif config.online.get("unit_total_weight", False):  # At the bases' reward scale (fit_lib.unit_total_weight).
    lam = fit_lib.unit_total_weight(lam)
  # The data behind every lambda, to refit it offline: features [U, N, K] (f(y_a) - f(y_b)), PAD's [U, N, A], choices.
  files.write_npz_atomic(os.path.join(workdir, "comparisons.npz"), features=history["comparison_features"],
                         pad_features=history["comparison_pad_features"], prefs=history["comparison_prefs"],
                         implicit_features=history["comparison_implicit_features"],
                         user_weights=np.asarray(users.weights), lam=lam, lam_p_soups=lam_ps, pad_weights=pad_w)
  print("fitted lambda per user (spectral):")
  for u in range(num_users):
    print(f"  user {u}: " + " ".join(f"{x:+.2f}" for x in lam[u]))
  online_harness = harness
  timing["online_s"] = time.time() - t0

  # ---- 6. Evaluation: every method x user on the held-out prompts, one decoding loop.
  scales = {m: sorted(float(x) for x in config.eval.frontier[m]) for m in SWEPT}
  soups = tuple(config.eval.soups)
  t0 = phase(f"eval: {len(SWEPT) + len(soups) + 3} methods ({len(SWEPT)} swept over strengths) x {num_users} "
             f"users + {num_bases} bases x {len(eval_pool)} {split_name} prompts x {config.eval.samples_per_prompt} "
             "samples")
  num_heads = num_bases + num_users
  on_bases = lambda c: np.concatenate([np.asarray(c, np.float32), np.zeros(num_users, np.float32)])
  eye = np.eye(num_heads, dtype=np.float32)
  programs = [
      harness_lib.Program("reference", None, "explicit", np.zeros(num_heads, np.float32)),
      harness_lib.Program("uniform", None, "explicit", on_bases(np.full(num_bases, 1.0 / num_bases)))
  ]
  programs += [harness_lib.Program(f"basis:{a}", None, "explicit", eye[k]) for k, a in enumerate(attributes)]
  weights = np.asarray(users.weights)
  for u in range(num_users):
    programs.append(harness_lib.Program("bespoke", u, "explicit", eye[num_bases + u]))
    programs += [harness_lib.Program(f"spectral_soup_{kind}", u, kind, on_bases(lam[u])) for kind in soups]
    # The swept methods, each along its strength knob (scale 1: the method as fitted; 0 would be the reference).
    swept = {
        "spectral_soup_explicit": lambda s: ("explicit", on_bases(s * lam[u]), None),
        "p_soups": lambda s: ("params", on_bases(s * lam_ps[u]), None),
        "pad": lambda s: ("guided", np.zeros(num_heads, np.float32), s * pad_w[u]),
        "mod_oracle": lambda s: ("explicit", on_bases(s * weights[u]), None)
    }
    programs += [harness_lib.Program(m, u, *swept[m](s), scale=s) for m in SWEPT for s in scales[m]]
  i, j = config.eval.pareto_bases
  alphas = np.linspace(0.0, 1.0, config.eval.pareto_points)
  for point, a in enumerate(alphas):  # Named by index: any number of points keeps distinct names.
    c = np.zeros(num_bases, np.float32)
    c[i], c[j] = 1.0 - a, a
    programs.append(harness_lib.Program(f"pareto_{point}", None, "explicit", on_bases(c)))
  harness = make_harness(eval_pool, config.eval.max_new_tokens)
  key, k_eval = jax.random.split(key)
  out = harness.evaluate(programs, np.arange(len(eval_pool)), k_eval, config.eval.samples_per_prompt)
  num_e = len(eval_pool)
  rewards, kls, shared, sweeps = {}, {}, {}, {}
  for p, prog in enumerate(programs):
    r = np.asarray(users_lib.true_reward(users, out["scores"][p].reshape(-1, num_attr)))  # [U, E * S]
    r = r.reshape(num_users, num_e, -1).mean(-1)  # [U, E]
    kl = np.broadcast_to(out["kl"][p].mean(-1), (num_users, num_e))
    if prog.user is None:
      shared[prog.method] = out["scores"][p].mean(1)  # [E, A]
      if prog.method in ("reference", "uniform"):
        rewards[prog.method], kls[prog.method] = r, kl
      continue
    sweep = sweeps.setdefault(prog.method, {}).setdefault(prog.scale, (np.zeros(
        (num_users, num_e)), np.zeros((num_users, num_e))))
    sweep[0][prog.user], sweep[1][prog.user] = r[prog.user], kl[prog.user]
  for method, sweep in sweeps.items():
    rewards[method], kls[method] = sweep[1.0]
  summary = metrics_lib.summarize(rewards, kls, num_bootstrap=config.eval.num_bootstrap, seed=config.seed)
  trade_offs = metrics_lib.frontiers({m: sweeps[m] for m in SWEPT}, rewards["reference"], sweeps["bespoke"][1.0],
                                     num_bootstrap=config.eval.num_bootstrap, seed=config.seed)
  shift = metrics_lib.attribute_shift(np.stack([shared[f"basis:{a}"] for a in attributes]), shared["reference"],
                                      num_bootstrap=config.eval.num_bootstrap, seed=config.seed)
  acceptance = implicit_acceptance_rate([prog.mode for prog in programs], out["accepted"], out["proposals"])
  timing["eval_s"] = time.time() - t0
  # How fast each phase decoded against this machine's floor (its matmul rate and bandwidth, measured now).
  rates = cost.machine_rates()
  decode_phases = {"online": online_harness.decode_summary(rates), "eval": harness.decode_summary(rates)}
  for name, stats in decode_phases.items():
    print(f"{name} decoding: {stats['tokens']} tokens at batch {stats['batch_rows']} in "
          f"{stats['prefill_s'] + stats['decode_s']:.0f} s ({stats['tokens_per_s']:.0f} tokens/s, "
          f"{stats['share_of_floor']:.0%} of the floor; {stats['busy_fraction']:.0%} of row-steps emitted a token); "
          f"scoring {stats['score_s']:.0f} s")

  # K ablation: held-out choice accuracy of lambda fitted on the first k bases (first 3/4 of the comparisons).
  ablation = _k_ablation(history, num_bases, config.online.l2)

  # Regret against each user's bespoke policy value.
  bespoke_value = rewards["bespoke"].mean(axis=1)
  regret = protocol.cumulative_regret(history["reward"], bespoke_value)

  # ---- 7. Results.
  t0 = phase("results")
  results = {
      "methods": {
          m: summary["methods"][m] for m in METHOD_ORDER if m in summary["methods"]
      },
      "users": num_users,
      "rounds": config.online.rounds,
      "comparisons_per_user": int(history["num_comparisons"][-1]),
      "eval_prompts": int(len(eval_pool)),
      "samples_per_prompt": config.eval.samples_per_prompt,
      "bespoke_gain": summary["bespoke_gain"],
      "bespoke_gain_ci": summary["bespoke_gain_ci"],
      "bespoke_gain_significant": summary["bespoke_gain_significant"],
      "confidence": summary["confidence"],
      "attributes": list(attributes),
      "user_kind": config.users.kind,
      "user_weights": weights.tolist(),
      "lambda": lam.tolist(),
      "lambda_p_soups": lam_ps.tolist(),
      "pad_weights": pad_w.tolist(),
      "offline": {
          "heads": [f"basis:{a}" for a in attributes] + [f"bespoke:{u}" for u in range(num_users)],
          "heldout_accuracy": accuracy.tolist(),
          "heldout_pairs": counts.tolist(),
          "cross_accuracy": cross.tolist(),
          # Responses sampled from each basis vs the reference's, on the held-out prompts: [K][A].
          "attribute_shift": shift["shift"].tolist(),
          "attribute_shift_ci": shift["ci"].tolist()
      },
      "frontier": trade_offs["frontier"],
      "at_bespoke_kl": trade_offs["at_bespoke_kl"],
      "bespoke_kl": trade_offs["bespoke_kl"],
      "learning_curve": {
          "comparisons": history["num_comparisons"].tolist(),
          "reward": history["reward"].tolist(),
          "kl": history["kl"].tolist(),
          "regret": regret.tolist(),
          "choice_accuracy": history["choice_accuracy"].tolist()
      },
      "k_ablation": ablation,
      "pareto": {
          "bases": [attributes[i], attributes[j]],
          "alpha":
              alphas.tolist(),
          "scores": [
              shared[f"pareto_{point}"].reshape(-1, num_attr)[:, [i, j]].mean(0).tolist()
              for point in range(len(alphas))
          ]
      },
      "implicit_acceptance_rate": acceptance,
      "decoded_tokens": harness.decoded_tokens,
      # Per phase: tokens, row-steps, prefill / decode / scoring seconds, GFLOP, and the share of the floor that
      # the measured matmul rate and bandwidth (`rates`) set for that work (`spectral_soup/models/cost.py`).
      "decoding": {
          "rates": rates,
          **decode_phases
      },
      "timing_s": timing,
      # What produced these results: the config (as config.json holds it) and the code.
      "config": json.loads(config.to_json_best_effort()),
      "code": code,
  }
  results["timing_s"]["total_s"] = time.time() - t_job
  files.write_text_atomic(os.path.join(workdir, "results.json"), json_text(results))
  samples = _contrasting_samples(programs, out, users, tokenizer, [prompt_text[i] for i in eval_pool])
  files.write_text_atomic(os.path.join(workdir, "samples.json"), json_text(samples))
  plots.write_all(results, workdir)
  timing["results_s"] = time.time() - t0

  print()
  print(metrics_lib.format_table(summary, METHOD_ORDER))
  print(f"\n{num_users} {split_name} {config.users.kind} users, {history['num_comparisons'][-1]} comparisons each, "
        f"{len(eval_pool)} {split_name} prompts x {config.eval.samples_per_prompt} samples; "
        f"total {time.time() - t_job:.0f} s. Wrote {os.path.join(workdir, 'results.json')} and plots.")


def _contrasting_samples(programs, out, users, tokenizer, prompts, num_prompts: int = 2) -> list:
  """The two users whose weights differ most, answered by the reference, their soups and their bespoke policies on
  the first held-out prompts (the first sample of each)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  weights = np.asarray(users.weights)
  distance = np.linalg.norm(weights[:, None] - weights[None], axis=-1)
  pair = np.unravel_index(np.argmax(distance), distance.shape) if len(weights) > 1 else (0, 0)
  wanted = [("reference", None)
           ] + [(m, int(u)) for u in dict.fromkeys(pair) for m in ("spectral_soup_explicit", "bespoke")]
  samples = []
  for e in range(min(num_prompts, len(prompts))):
    for method, user in wanted:
      p = next(
          p for p, prog in enumerate(programs) if prog.method == method and prog.user == user and prog.scale == 1.0)
      text = tokenizer.decode(out["tokens"][p, e, 0, :out["lengths"][p, e, 0]].tolist(), skip_special_tokens=True)
      samples.append({
          "prompt": prompts[e],
          "method": method,
          "user": user,
          "user_weights": None if user is None else [round(float(w), 3) for w in weights[user]],
          "response": text.strip()
      })
  return samples


def _k_ablation(history, num_bases, l2):
  """Held-out accuracy of the users' choices (last quarter of the comparisons) by lambda fitted on the first k
  bases' features of the rest, k = 1..K: how many bases the users' preferences need."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spectral_soup.online import fit as fit_lib  # pylint: disable=g-import-not-at-top
  feats, prefs = history["comparison_features"], history["comparison_prefs"]
  n = feats.shape[1]
  split = max(1, (3 * n) // 4)
  out = {"k": [], "heldout_choice_accuracy": []}
  for k in range(1, num_bases + 1):
    lam = np.asarray(fit_lib.fit_lambda_batched(feats[:, :split, :k], prefs[:, :split], l2=l2))
    margin = np.einsum("unk,uk->un", feats[:, split:, :k], lam)
    # A zero margin (identical responses, lam = 0) predicts each choice as a coin flip, as the online rounds score it.
    right = np.where(margin == 0, 0.5, (margin > 0) == (prefs[:, split:] > 0.5))
    out["k"].append(k)
    # NaN (null in results.json) when nothing is held out: a single comparison per user.
    out["heldout_choice_accuracy"].append(float(np.mean(right)) if split < n else float("nan"))
  return out


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
