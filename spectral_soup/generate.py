r"""Serves users' soups of a trained basis from the command line: prompts in, responses out.

  python -m spectral_soup.generate --workdir=workdir/demo --lam=0.5,0.2,0.1,0.1,0.1 --prompt="How do I relax?"
  python -m spectral_soup.generate --workdir=W --users=lams.json --prompts=prompts.txt --output=responses.jsonl

--workdir is a basis-training run's or the main job's. One soup (--lam: K comma-separated weights) or many users
at once (--users: a JSON file holding a list of U weight lists, or {"name": [K weights], ...}); one prompt
(--prompt) or one per line of a text file (--prompts). Every user answers every prompt, all in one decoding call.
Prints one JSON object per response ({"user", "prompt", "response", "ended"}: whether it ended with the
end-of-sequence token rather than at --max_new_tokens, for `Basis.features(..., ended=)`), or writes them to
--output (JSON lines, written atomically). Bad flags or files end in one line, `error: ...`, and exit status 2,
before the model loads. Logs are warnings only, unless --verbosity is given.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import List, Optional, Tuple

from absl import app
from absl import flags
from absl import logging

from spectral_soup.eval import plots
from spectral_soup.utils import cli
from spectral_soup.utils import files

_WORKDIR = flags.DEFINE_string("workdir", None, "The workdir of a basis-training run or of the main job.")
_LAM = flags.DEFINE_string("lam", None, "One soup: K comma-separated weights, one per basis (0,...,0: the "
                           "reference).")
_USERS = flags.DEFINE_string("users", None, "Many soups: a JSON file, a list of weight lists or {name: weights}.")
_PROMPT = flags.DEFINE_string("prompt", None, "One prompt.")
_PROMPTS = flags.DEFINE_string("prompts", None, "A text file: one prompt per non-empty line.")
_MODE = flags.DEFINE_enum("mode", "explicit", ["explicit", "params", "implicit", "naive"], "How to soup.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Response length cap.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy.", lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", "", "Write JSON lines here instead of printing them.")
flags.mark_flags_as_required(["workdir"])


class _RepeatedUser(ValueError):
  pass


# Files a training run or the main job writes at the top of its workdir (beside config.json, basis.json and the main
# job's plots, `plots.PLOT_FILES`).
_RUN_FILES = ("metrics.jsonl", "results.json", "comparisons.npz", "samples.json", "training_curves.png")
# Folders a run writes and reads again: a file written there was removed or misread by the next resume.
_RUN_FOLDERS = ("checkpoints", "checkpoints.corrupt", "tensorboard", "nonfinite")


def check_not_a_run_file(output: str, run_dirs, config) -> None:
  """ValueError if `output` would replace a file the run needs or wrote: inside its checkpoints, one of its outputs
  (metrics.jsonl, results.json, ...), or anything in the backbone (`model.path`) or tokenizer (`data.tokenizer`)
  that `load_basis` reads (writing the responses over the tokenizer made the workdir unservable)."""
  real = os.path.realpath(output)
  inside = lambda folder: real == os.path.realpath(folder) or real.startswith(os.path.realpath(folder) + os.sep)
  for d in run_dirs:
    for folder in _RUN_FOLDERS:
      if inside(os.path.join(d, folder)):
        raise ValueError(f"--output={output} is inside the run's {folder} ({d}/{folder}): expected a file outside "
                         "it.")
    name = os.path.basename(real)
    own = name in _RUN_FILES + plots.PLOT_FILES or name.startswith(".lock") or (name.startswith("features-") and
                                                                                ".npz" in name)
    if own and os.path.dirname(real) == os.path.realpath(d):
      raise ValueError(f"--output={output} is one of the run's own files ({name} in {d}: its lock, its cached "
                       "features or an output): expected another file name.")
  features_dir = ((config.get("train") or {}).get("features_dir") or "") if hasattr(config, "get") else ""
  if isinstance(features_dir, str) and features_dir and inside(features_dir):
    raise ValueError(f"--output={output} is inside config.train.features_dir={features_dir!r}, the run's cached "
                     "features: expected a file outside it.")
  for field in ("model.path", "data.tokenizer"):
    section, name = field.split(".")
    folder = (config.get(section) or {}).get(name) or ""
    if isinstance(folder, str) and folder and not folder.startswith("embedded:") and inside(folder):
      raise ValueError(f"--output={output} is inside config.{field}={folder!r}, which serving the basis reads: "
                       "expected a file outside it.")


def read_users(lam: str, users: str) -> Tuple[List[str], List[List[float]]]:
  """(names, weights) of --lam or --users; raises ValueError naming the flag or file."""
  if (lam is None) == (users is None):
    raise ValueError("pass exactly one of --lam (one soup) and --users (a JSON file of soups).")
  if lam is not None:
    try:
      weights = [float(x) for x in lam.split(",")]
    except ValueError:
      raise ValueError(f"--lam={lam!r}: expected comma-separated numbers, one per basis.") from None
    if not all(math.isfinite(x) for x in weights):
      raise ValueError(f"--lam={lam!r}: expected finite numbers, one per basis.")
    return ["0"], [weights]

  def unique(pairs):  # JSON objects keep the last of repeated names: refuse them instead.
    seen = [key for key, _ in pairs]
    twice = sorted({key for key in seen if seen.count(key) > 1})
    if twice:
      raise _RepeatedUser(f"--users={users} names user {twice[0]!r} twice: expected one weight list per user.")
    return dict(pairs)

  try:
    with open(users, encoding="utf-8-sig") as f:
      data = json.load(f, object_pairs_hook=unique)
  except OSError as e:
    raise ValueError(f"--users={users}: cannot read it ({e.strerror}).") from None
  except _RepeatedUser:
    raise
  except ValueError as e:
    raise ValueError(f"--users={users} is not JSON: {e}.") from None
  if isinstance(data, dict):
    names, weights = [str(k) for k in data], list(data.values())
  elif isinstance(data, list):
    names, weights = [str(u) for u in range(len(data))], data
  else:
    raise ValueError(f"--users={users}: expected a list of weight lists or an object {{name: weights}}.")
  if not weights:
    raise ValueError(f"--users={users} holds no users.")
  for name, w in zip(names, weights):
    if not isinstance(w, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
      raise ValueError(f"--users={users}: user {name!r} has {w!r}: expected a list of numbers, one per basis.")
    if not all(_finite(x) for x in w):
      raise ValueError(f"--users={users}: user {name!r} has {_short(w)}: expected finite numbers.")
  return names, [[float(x) for x in w] for w in weights]


def backbone_max_len(config) -> Tuple[Optional[int], str]:
  """(positions, where they are stated) of the run's backbone, before any weight loads: a random backbone's
  `config.model.max_len`, a checkpoint's own (its config.json or GGUF metadata). (None, "") where the checkpoint's
  config does not read: loading the basis then names the problem (a moved or relative path, ...)."""
  path = config.model.get("path")
  if not path:
    return config.model.get("max_len"), "config.model.max_len"
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  try:
    return models.config_from_pretrained(path).max_len, f"the checkpoint {path}"
  except (OSError, ValueError):
    return None, ""


def _finite(x) -> bool:
  """A finite float64 (an integer of 400 digits is not: float() of it raised OverflowError, a traceback)."""
  try:
    return math.isfinite(float(x))
  except OverflowError:
    return False


def _short(value, limit: int = 200) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def read_prompts(prompt: str, prompts: str) -> List[str]:
  """The prompts of --prompt or --prompts; raises ValueError naming the flag or file."""
  if (prompt is None) == (prompts is None):
    raise ValueError("pass exactly one of --prompt (one prompt) and --prompts (a file, one prompt per line).")
  if prompt is not None:
    if not prompt.strip():
      raise ValueError("--prompt is empty: expected text.")
    return [prompt]
  try:
    with open(prompts, encoding="utf-8-sig") as f:  # A byte-order mark is not part of the first prompt.
      lines = [line.strip() for line in f]
  except OSError as e:
    raise ValueError(f"--prompts={prompts}: cannot read it ({e.strerror}).") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts={prompts} is not UTF-8 text: {e}.") from None
  lines = [line for line in lines if line]
  if not lines:
    raise ValueError(f"--prompts={prompts} holds no prompt (one per non-empty line).")
  return lines


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:  # The libraries' INFO lines (checkpoint reads, backends) are noise here.
    logging.set_verbosity(logging.WARNING)
  with cli.input_checks():  # Flags and files first: one line, exit status 2, before anything loads.
    names, weights = read_users(_LAM.value, _USERS.value)
    prompts = read_prompts(_PROMPT.value, _PROMPTS.value)
    if not 0.0 < _TOP_P.value <= 1.0:
      raise ValueError(f"--top_p={_TOP_P.value}: expected in (0, 1].")
    if not 0.0 <= _TEMPERATURE.value < float("inf"):  # NaN fails every comparison.
      raise ValueError(f"--temperature={_TEMPERATURE.value}: expected a finite number >= 0 (0: greedy).")
    if _MODE.value == "implicit" and (_TEMPERATURE.value == 0 or _TOP_P.value < 1.0):
      raise ValueError(f"--mode=implicit draws exact samples of the soup by rejection sampling: it needs --temperature "
                       f"> 0 and no --top_p (got --temperature={_TEMPERATURE.value}, --top_p={_TOP_P.value}); use "
                       "--mode=explicit (the same distribution) for greedy or nucleus decoding.")
    from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top
    from spectral_soup.soup import validation  # pylint: disable=g-import-not-at-top
    validation.check_seed("--seed", _SEED.value)
    try:  # What Basis.generate would refuse after the basis loads (a temperature of 1e-40 overflows its logits).
      decoding.SamplingConfig(temperature=_TEMPERATURE.value, top_p=_TOP_P.value)
    except ValueError as e:
      raise ValueError(f"--temperature={_TEMPERATURE.value}, --top_p={_TOP_P.value}: {e}") from None
    for name, w in zip(names, weights):
      validation.check_weight_range(w, "--lam" if _LAM.value is not None else f"user {name!r} of --users: lam")
    from spectral_soup import basis as basis_lib  # pylint: disable=g-import-not-at-top
    config = basis_lib.run_config(_WORKDIR.value)  # Raises naming the workdir.
    if _OUTPUT.value:  # Never over the run's own files or this command's inputs.
      run_dirs = {_WORKDIR.value, basis_lib.basis_dir(_WORKDIR.value)}
      inputs = [p for p in (_PROMPTS.value, _USERS.value) if p]
      inputs += [os.path.join(d, name) for d in run_dirs for name in ("config.json", "basis.json")]
      files.check_output_file("--output", _OUTPUT.value, inputs)
      check_not_a_run_file(_OUTPUT.value, run_dirs, config)
    max_len, source = backbone_max_len(config)
    if isinstance(max_len, int) and _MAX_NEW_TOKENS.value >= max_len:  # The prompt needs a position too.
      raise ValueError(f"--max_new_tokens={_MAX_NEW_TOKENS.value}: the model holds {max_len} positions "
                       f"({source}), prompt included: expected fewer.")
    num_bases = len(basis_lib.basis_names(_WORKDIR.value, config))
    for name, w in zip(names, weights):
      if len(w) != num_bases:
        who = "--lam" if _LAM.value is not None else f"user {name!r} of --users"
        raise ValueError(f"{who} has {len(w)} weights: the basis in {_WORKDIR.value} has {num_bases} "
                         f"({', '.join(basis_lib.basis_names(_WORKDIR.value, config))}).")
  with cli.reporting_input_errors():
    basis = basis_lib.load_basis(_WORKDIR.value)
    rows = [(u, p) for u in range(len(names)) for p in range(len(prompts))]
    with cli.input_checks():
      texts, ended = basis.generate([prompts[p] for _, p in rows], [weights[u] for u, _ in rows], mode=_MODE.value,
                                    max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                                    top_p=_TOP_P.value, seed=_SEED.value, return_ended=True)
  lines = [
      json.dumps({
          "user": names[u],
          "prompt": prompts[p],
          "response": text,
          "ended": done
      }, ensure_ascii=False) for (u, p), text, done in zip(rows, texts, ended)
  ]
  if _OUTPUT.value:
    files.write_text_atomic(_OUTPUT.value, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} responses written to {_OUTPUT.value}.", file=sys.stderr)
  else:
    for line in lines:
      print(line)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
