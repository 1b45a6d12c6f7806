"""The embedded preference dataset: real prompts, responses sampled from the embedded LM, attribute-scored pairs.

Prompts are real short questions from the `chitchat-dataset` package. For each prompt, two responses are sampled
from the model with the batched KV-cache decoder; each response is generated under a randomly drawn style hint
(a system message such as "Answer in one short sentence." or none), so that the attributes actually vary between
the two responses. The pair keeps the *plain* prompt: a basis trained on these pairs learns to produce the attribute
without being told (context distillation). Every response is scored by every attribute reward and the pair gets
per-attribute Bradley-Terry labels (see `spectral_soup.data.builders.embedded_prefs`).

The output directory holds `pairs.jsonl` and `metadata.json`; it is written atomically (temporary directory, then
rename) and keyed by a hash of every setting that changes its content (for a model given by a local path, its
files' contents too), so a second call with the same settings returns the cached copy; a dataset shipped with the
package (`shipped/`, the demo's) is returned without sampling.
Deterministic for a seed on a given machine (`regenerate_batch` samples one batch again, alone, to check it). A
request that differs from a cached or shipped dataset only in `attributes` reuses that dataset's responses and only
scores them again (no sampling); the result is the dataset sampling would have written, with `rescored_from`
naming the source directory in its metadata.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from spectral_soup.utils import files

STYLE_HINTS = (
    "",
    "Answer in one short sentence.",
    "Give a detailed, informative answer.",
    "Be warm, cheerful and encouraging.",
    "Be blunt and critical.",
    "Answer like a university professor, using technical terms.",
    "Explain it simply, as you would to a young child.",
    "Use a formal tone.",
    "Answer casually, like texting a friend.",
    "Answer with a short bulleted list.",
)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Everything that determines the dataset's content."""
  model: str = "embedded:smollm2"  # Model that writes the responses.
  num_prompts: int = 128  # Prompts; each gives one pair (two responses).
  seed: int = 0  # Prompt choice, style hints and sampling.
  max_new_tokens: int = 40  # Length cap of a response.
  temperature: float = 0.8  # Sampling temperature.
  top_p: float = 0.95  # Nucleus sampling.
  batch_size: int = 64  # Rows (responses) decoded together.
  attributes: Tuple[str, ...] = ("readability", "verbosity", "sentiment", "relevance", "formality")
  style_hints: Tuple[str, ...] = STYLE_HINTS  # System messages drawn per response ("" = none).

  def key(self) -> str:
    """A hash of the settings and, for a model given by a local path, of its files' contents (`model_digest`)."""
    settings = dataclasses.asdict(self)
    digest = model_digest(self.model)
    if digest:  # Absent for the embedded models: their keys (and the shipped datasets' names) stay as they were.
      settings["model_digest"] = digest
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def model_digest(model: str) -> Optional[str]:
  """`files.content_digest` of a model given by a local file or directory (None for `embedded:...`): a checkpoint
  replaced at the same path, or another one reached through the same relative path, writes other responses."""
  return files.content_digest(model)


# Datasets this package ships (`shipped/README.md`): `generate` returns one whose settings match instead of sampling.
SHIPPED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shipped")


def shipped_dataset(settings: GenerationSettings) -> Optional[str]:
  """The shipped dataset directory with exactly these settings, or None."""
  path = os.path.join(SHIPPED_ROOT, f"embedded_prefs-{settings.key()}")
  return path if os.path.exists(os.path.join(path, "metadata.json")) else None


def chitchat_questions(num: int, seed: int, min_words: int = 4, max_chars: int = 120) -> list:
  """`num` distinct real questions from chitchat-dataset, chosen by `seed`."""
  import chitchat_dataset  # pylint: disable=g-import-not-at-top

  questions = set()
  for convo in chitchat_dataset.Dataset().values():
    for turn in convo["messages"]:
      for message in turn:
        text = " ".join(message["text"].split())
        if text.endswith("?") and len(text.split()) >= min_words and len(text) <= max_chars:
          questions.add(text[0].upper() + text[1:])
  pool = sorted(questions)
  if num > len(pool):
    raise ValueError(f"num_prompts={num} exceeds the {len(pool)} usable questions in chitchat-dataset.")
  order = np.random.default_rng(seed).permutation(len(pool))[:num]
  return [pool[i] for i in order]


def settings_from_config(config) -> GenerationSettings:
  """The dataset that a config's `data` fields (and `model.path`) describe."""
  d = config.data
  return GenerationSettings(model=config.model.path, num_prompts=d.num_prompts, seed=d.seed,
                            max_new_tokens=d.max_new_tokens, temperature=d.temperature, top_p=d.top_p,
                            batch_size=d.generation_batch_size, attributes=tuple(d.attributes))


def generate_for_config(config) -> str:
  """`generate` of the config's dataset in `config.data.cache_dir` (empty: `default_cache_root()`)."""
  return generate(settings_from_config(config), config.data.get("cache_dir") or default_cache_root())


def generate(settings: GenerationSettings, cache_root: str, *, force: bool = False) -> str:
  """Generates (or reuses) the dataset; returns the directory holding pairs.jsonl and metadata.json.

  Args:
    settings: what to generate.
    cache_root: directory holding the cached datasets (one subdirectory per settings key).
    force: sample the responses again even when a cached dataset has them.

  Returns:
    The dataset directory, `cache_root/embedded_prefs-<settings.key()>`. Without `force`, an existing one is
    returned as is, then a shipped one with these settings (`shipped_dataset`, read in place), and a cached or
    shipped dataset whose settings differ only in `attributes` is rescored instead of sampling again.
  """
  out_dir = os.path.join(cache_root, f"embedded_prefs-{settings.key()}")
  if not force and os.path.exists(os.path.join(out_dir, "metadata.json")):
    try:
      load_pairs(out_dir)
    except (OSError, ValueError, KeyError) as e:  # Damaged after it was written (it is written atomically).
      aside = f"{out_dir}.unreadable-{int(time.time())}"
      os.replace(out_dir, aside)
      logging.warning("The cached embedded data in %s are unreadable (%s: %s); moved to %s and generated again.",
                      out_dir,
                      type(e).__name__, e, aside)
    else:
      logging.info("Reusing the embedded preference data in %s", out_dir)
      return out_dir

  shipped = None if force else shipped_dataset(settings)
  if shipped:
    logging.info("Using the embedded preference data shipped in %s", shipped)
    return shipped

  from spectral_soup.data import rewards as rewards_lib  # pylint: disable=g-import-not-at-top

  suite = rewards_lib.RewardSuite(list(settings.attributes))  # Fails fast on an unknown attribute.
  if not force:
    source = _find_rescorable(settings, cache_root)
    if source is not None:
      return _rescore(settings, suite, source, cache_root, out_dir)

  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top

  start = time.time()
  model, params = models.from_pretrained(settings.model)
  tokenizer = models.tokenizer_from_pretrained(settings.model)
  prompts, hints, encoded = _sampling_plan(settings, tokenizer)
  check_sampling_fits(settings, model.config, prompt_len=max(len(e) for e in encoded))
  meter = cost.DecodeMeter(model.config)
  responses, ended = _sample(settings, model, params, tokenizer, encoded, meter=meter)
  sample_s = time.time() - start
  # The sampling's decode speed against this machine's floor (`models/cost.py`), kept with the data.
  decoding = dict(batch_rows=settings.batch_size, **meter.summary(cost.machine_rates()))

  _write_dataset(settings, suite, cache_root, out_dir, prompts, hints, responses, ended, sample_s, decoding=decoding)
  logging.info("Wrote %d pairs to %s in %.1f s", len(prompts), out_dir, time.time() - start)
  return out_dir


def check_sampling_fits(settings: GenerationSettings, model_config: Any, prompt_len: int) -> None:
  """Raises ValueError naming config.data.max_new_tokens (and data.generation_batch_size) when the sampling's
  prompt + response do not fit the model's positions or the memory of this machine: before any decode compiles (a
  response cap of 9,000 tokens ran out of memory in the decode, as a traceback)."""
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import memory  # pylint: disable=g-import-not-at-top
  length = prompt_len + settings.max_new_tokens
  if length > model_config.max_len:
    raise ValueError(
        f"config.data.max_new_tokens={settings.max_new_tokens} is invalid: expected <= "
        f"{max(model_config.max_len - prompt_len, 0)}, the model's max_len={model_config.max_len} positions less the "
        f"longest sampling prompt's {prompt_len} tokens.")
  # Two caches are live: the empty one `decoding.decode` is given and the loop's own (measured: 2.2 caches above
  # the weights at 64 rows x 716 positions of SmolLM2).
  need = cost.decode_memory_bytes(model_config, settings.batch_size, length, caches_per_row=2)
  limit = memory.memory_limit_bytes()
  if limit is not None and need > limit:
    raise ValueError(
        f"config.data.max_new_tokens={settings.max_new_tokens} with config.data.generation_batch_size="
        f"{settings.batch_size} is invalid: sampling needs at least {need / 2**30:.1f} GiB (two KV caches of "
        f"{settings.batch_size} rows x {length} positions, the weights and the logits), more than this machine's "
        f"{limit / 2**30:.1f} GiB; lower data.generation_batch_size (rows sampled at a time) or data.max_new_tokens.")


def _sampling_plan(settings: GenerationSettings, tokenizer) -> Tuple[list, list, list]:
  """(prompts [N], hints [2N], chat-encoded rows [2N]): rows 2i and 2i+1 are the two responses to prompt i."""
  prompts = chitchat_questions(settings.num_prompts, settings.seed)
  rng = np.random.default_rng(settings.seed + 1)
  hints = [settings.style_hints[rng.integers(len(settings.style_hints))] for _ in prompts for _ in range(2)]
  encoded = [_encode_chat(tokenizer, prompt, hint) for prompt, hint in zip([p for p in prompts for _ in "ab"], hints)]
  return prompts, hints, encoded


def _sample(settings: GenerationSettings, model, params, tokenizer, encoded: Sequence[list],
            batches: Optional[Sequence[int]] = None, meter=None) -> Tuple[list, list]:
  """(responses, ended) of the rows in `batches` (indices of `settings.batch_size` rows; None: all).

  Every batch is sampled exactly as in a whole generation (its own key from the same chain, the same prompt
  padding), so a slice can be regenerated alone (`regenerate_batch`). `meter` (a `models.cost.DecodeMeter`)
  records each batch's work and time.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import progress  # pylint: disable=g-import-not-at-top

  prompt_len = max(len(e) for e in encoded)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  sampling = decoding.SamplingConfig(settings.temperature, 0, settings.top_p)
  logits_fn = decoding.model_logits_fn(model)
  batch = settings.batch_size
  num_batches = -(-len(encoded) // batch)
  wanted = set(range(num_batches) if batches is None else batches)
  key = jax.random.key(settings.seed)
  responses, ended = [], []
  for index in progress.track(range(num_batches), desc="sampling responses", unit="batch", total=num_batches):
    key, sub = jax.random.split(key)
    if index not in wanted:
      continue
    chunk = encoded[index * batch:(index + 1) * batch]
    tokens, mask = decoding.pad_prompts(chunk, batch, prompt_len, pad_id)
    with cost.compile_time() as compiled:
      t0 = time.perf_counter()
      out, aux = decoding.decode(logits_fn, params, tokens, mask,
                                 models.init_cache(model.config, batch, prompt_len + settings.max_new_tokens), sub,
                                 max_new_tokens=settings.max_new_tokens, sampling=sampling,
                                 eos_id=tokenizer.eos_token_id, pad_id=pad_id)
      out, lengths = np.asarray(out), np.asarray(aux["lengths"])
    if meter is not None:  # The prefill runs inside `decode`: its time is in the batch's.
      own = np.asarray([len(e) for e in chunk])  # Each prompt's tokens: the padding to the longest is not work.
      meter.add_prefill(len(chunk), own, 0.0)
      meter.add_chunk(batch, int(lengths.max()), int(lengths[:len(chunk)].sum()), float(own.mean()),
                      time.perf_counter() - t0, compiled.seconds)
    for i in range(len(chunk)):
      ids = out[i, :lengths[i]].tolist()
      responses.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
      ended.append(bool(ids) and ids[-1] == tokenizer.eos_token_id)
  return responses, ended


def regenerate_batch(settings: GenerationSettings, index: int = 0) -> List[dict]:
  """Samples and scores batch `index` of the dataset `settings` describes, alone: its pairs, as pairs.jsonl holds
  them (checks a shipped or cached dataset without sampling all of it; `settings.batch_size` must be even)."""
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.data import rewards as rewards_lib  # pylint: disable=g-import-not-at-top

  if settings.batch_size % 2:
    raise ValueError(f"batch_size={settings.batch_size}: a batch must hold whole pairs (an even number of rows).")
  model, params = models.from_pretrained(settings.model)
  tokenizer = models.tokenizer_from_pretrained(settings.model)
  prompts, hints, encoded = _sampling_plan(settings, tokenizer)
  if not 0 <= index < -(-len(encoded) // settings.batch_size):
    raise ValueError(f"index={index}: the dataset has {-(-len(encoded) // settings.batch_size)} batches.")
  responses, ended = _sample(settings, model, params, tokenizer, encoded, batches=[index])
  first = index * settings.batch_size // 2
  prompts = prompts[first:first + len(responses) // 2]
  hints = hints[2 * first:2 * first + len(responses)]
  return _pair_records(settings, rewards_lib.RewardSuite(list(settings.attributes)), prompts, hints, responses,
                       ended)[0]


def _pair_records(settings: GenerationSettings, suite, prompts: Sequence[str], hints: Sequence[str],
                  responses: Sequence[str], ended: Sequence[bool]) -> Tuple[List[dict], np.ndarray]:
  """The pairs.jsonl records of scored responses (rows 2i, 2i+1 answer prompts[i]), and the raw scores [2N, A]."""
  plain = [p for p in prompts for _ in range(2)]
  scores = suite(plain, responses)  # [2N, A], raw scale.
  records = []
  for i, prompt in enumerate(prompts):
    a, b = 2 * i, 2 * i + 1
    records.append({
        "prompt": prompt,
        "response_a": responses[a],
        "response_b": responses[b],
        "scores_a": [float(x) for x in scores[a]],
        "scores_b": [float(x) for x in scores[b]],
        "attributes": list(settings.attributes),
        "hint_a": hints[a],
        "hint_b": hints[b],
        "ended_a": ended[a],
        "ended_b": ended[b]
    })
  return records, scores


def _write_dataset(settings: GenerationSettings, suite, cache_root: str, out_dir: str, prompts: Sequence[str],
                   hints: Sequence[str], responses: Sequence[str], ended: Sequence[bool], sampling_seconds: float,
                   **extra_metadata) -> None:
  """Scores the responses (rows 2i, 2i+1 answer prompts[i]) and writes `out_dir` atomically."""
  records, scores = _pair_records(settings, suite, prompts, hints, responses, ended)
  tmp = tempfile.mkdtemp(prefix=".embedded_prefs-", dir=_ensure_dir(cache_root))
  with open(os.path.join(tmp, "pairs.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  digest = model_digest(settings.model)
  metadata = dict(dataclasses.asdict(settings), **({
      "model_digest": digest
  } if digest else {}), attributes=list(settings.attributes), style_hints=list(settings.style_hints),
                  num_pairs=len(prompts), sampling_seconds=sampling_seconds, ended_fraction=float(np.mean(ended)),
                  score_mean=scores.mean(0).tolist(), score_std=scores.std(0).tolist(), **extra_metadata)
  with open(os.path.join(tmp, "metadata.json"), "w") as f:
    json.dump(metadata, f, indent=2)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp, out_dir)


def _find_rescorable(settings: GenerationSettings, cache_root: str) -> Optional[str]:
  """A cached dataset directory whose settings equal `settings` in every field but `attributes`, or None.

  Candidates are taken in name order; sampled datasets come before rescored ones.
  """
  wanted = dataclasses.asdict(settings)
  del wanted["attributes"]
  wanted = json.loads(json.dumps(wanted))  # Tuples -> lists, as stored in metadata.json.
  digest = model_digest(settings.model)  # Only a dataset sampled from these very files (None: an embedded model).
  found: List[Tuple[bool, str]] = []
  paths = [
      path for root in (cache_root, SHIPPED_ROOT)
      for path in sorted(glob.glob(os.path.join(glob.escape(root), "embedded_prefs-*", "metadata.json")))
  ]
  for path in paths:
    directory = os.path.dirname(path)
    if ".unreadable-" in os.path.basename(directory) or not os.path.exists(os.path.join(directory, "pairs.jsonl")):
      continue  # Set aside as damaged, or incomplete.
    try:
      with open(path) as f:
        metadata = json.load(f)
    except (OSError, ValueError):
      continue
    if (isinstance(metadata, dict) and all(k in metadata and metadata[k] == v for k, v in wanted.items()) and
        metadata.get("model_digest") == digest):
      found.append(("rescored_from" in metadata, directory))
  return min(found)[1] if found else None


def _rescore(settings: GenerationSettings, suite, source: str, cache_root: str, out_dir: str) -> str:
  """Writes `out_dir` from the responses of the cached dataset `source`, scored under `settings.attributes`."""
  start = time.time()
  pairs, metadata = load_pairs(source)
  if len(pairs) != settings.num_prompts:
    raise ValueError(f"{source} holds {len(pairs)} pairs, but its metadata says num_prompts="
                     f"{settings.num_prompts}; delete it, or pass force=True to sample again.")
  prompts = [p["prompt"] for p in pairs]
  hints = [p[f"hint_{side}"] for p in pairs for side in "ab"]
  responses = [p[f"response_{side}"] for p in pairs for side in "ab"]
  ended = [p[f"ended_{side}"] for p in pairs for side in "ab"]
  provenance = {"decoding": metadata["decoding"]} if "decoding" in metadata else {}
  _write_dataset(settings, suite, cache_root, out_dir, prompts, hints, responses, ended, metadata["sampling_seconds"],
                 rescored_from=os.path.basename(source), **provenance)
  logging.info("Rescored the %d pairs of %s under attributes %s (no sampling) into %s in %.1f s", len(pairs), source,
               list(settings.attributes), out_dir,
               time.time() - start)
  return out_dir


def _encode_chat(tokenizer, prompt: str, hint: str) -> list:
  messages = ([{"role": "system", "content": hint}] if hint else []) + [{"role": "user", "content": prompt}]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def _ensure_dir(path: str) -> str:
  os.makedirs(path, exist_ok=True)
  return path


def load_pairs(directory: str) -> Tuple[list, dict]:
  """Reads pairs.jsonl and metadata.json back (plain Python; the TFDS builder is the indexed path).

  Raises ValueError naming the file and line of a damaged dataset (a line that is not JSON, a pair without its
  texts, or without one finite score per attribute of metadata.json): regenerate it (`generate(..., force=True)`).
  """
  path = os.path.join(directory, "metadata.json")
  try:
    with open(path) as f:
      metadata = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e}): the dataset is damaged; regenerate it.") from None
  num_scores = len(metadata.get("attributes", ())) if isinstance(metadata, dict) else 0
  path = os.path.join(directory, "pairs.jsonl")
  pairs = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}, line {number}"
      try:
        pair = json.loads(line)
      except ValueError as e:
        raise ValueError(f"{where}: not valid JSON ({e}): the dataset is damaged; regenerate it.") from None
      problem = _pair_problem(pair, num_scores)
      if problem:
        raise ValueError(f"{where}: {problem}: the dataset is damaged; regenerate it.")
      pairs.append(pair)
  return pairs, metadata


def _pair_problem(pair: Any, num_scores: int) -> Optional[str]:
  """What is wrong with one pair of pairs.jsonl (None: nothing): texts and `num_scores` finite scores per side."""
  if not isinstance(pair, dict):
    return f"a {type(pair).__name__}, expected a JSON object"
  for field in ("prompt", "response_a", "response_b"):
    if not isinstance(pair.get(field), str):
      return f"field {field!r} is {pair.get(field)!r}, expected a string"
  for field in ("scores_a", "scores_b"):
    scores = pair.get(field)
    ok = (isinstance(scores, list) and (not num_scores or len(scores) == num_scores) and
          all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores))
    if not ok:
      return f"field {field!r} is {scores!r}, expected {num_scores or 'one'} finite number(s), one per attribute"
  return None


def default_cache_root() -> str:
  return os.environ.get("SPECTRAL_SOUP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "spectral_soup"))


def summarize(pairs: Sequence[dict], attributes: Sequence[str]) -> dict:
  """Per attribute: fraction of pairs where the two responses differ by more than a tie margin."""
  a = np.asarray([p["scores_a"] for p in pairs], np.float32)
  b = np.asarray([p["scores_b"] for p in pairs], np.float32)
  std = np.concatenate([a, b]).std(0) + 1e-8
  decisive = np.mean(np.abs(a - b) / std > 0.1, axis=0)
  return {name: float(x) for name, x in zip(attributes, decisive)}


def split_of(prompt: str, eval_fraction: float, salt: str = "embedded") -> str:
  """'train' or 'eval', from a hash of the prompt (so one prompt's pairs never straddle splits)."""
  h = int(hashlib.sha256((salt + prompt).encode()).hexdigest()[:8], 16) / 16**8
  return "eval" if h < eval_fraction else "train"


def pair_labels(scores_a: np.ndarray, scores_b: np.ndarray, tie_margin: float,
                fit: Optional[np.ndarray] = None) -> np.ndarray:
  """int8[N, A]: 1 if a beats b under attribute k by more than tie_margin standard deviations, 0 if b beats a,
  -1 (tie, masked in the loss) otherwise. Standard deviations are over both responses of the pairs `fit` selects
  (bool[N]; None: all pairs), so that held-out pairs need not inform the training labels."""
  fit = slice(None) if fit is None else np.asarray(fit, bool)
  std = np.concatenate([scores_a[fit], scores_b[fit]]).std(0) + 1e-8
  diff = (scores_a - scores_b) / std
  return np.where(diff > tie_margin, 1, np.where(diff < -tie_margin, 0, -1)).astype(np.int8)


def tokenize_pairs(pairs: Sequence[dict], tokenizer, *, prompt_len: int, response_len: int,
                   tie_margin: float = 0.1) -> Dict[str, np.ndarray]:
  """Pair arrays in the `spectral_soup.offline.input_pipeline` format.

  The prompt is the chat-formatted plain question (left-padded, truncated from the left); each response is its
  tokens followed by the end-of-turn token when the sampled response ended (right-padded, truncated).
  """
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  n = len(pairs)
  out = {
      name: np.full((n, length), pad, np.int32)
      for name, length in (("prompt", prompt_len), ("response_a", response_len), ("response_b", response_len))
  }
  for name in list(out):
    out[f"{name}_mask"] = np.zeros_like(out[name], bool)
  for i, pair in enumerate(pairs):
    ids = _encode_chat(tokenizer, pair["prompt"], "")[-prompt_len:]
    out["prompt"][i, prompt_len - len(ids):] = ids
    out["prompt_mask"][i, prompt_len - len(ids):] = True
    for side in ("a", "b"):
      ids = tokenizer(pair[f"response_{side}"], add_special_tokens=False)["input_ids"]
      if pair.get(f"ended_{side}", False):
        ids = ids + [tokenizer.eos_token_id]
      ids = ids[:response_len]
      out[f"response_{side}"][i, :len(ids)] = ids
      out[f"response_{side}_mask"][i, :len(ids)] = True
  scores_a = np.asarray([p["scores_a"] for p in pairs], np.float32)
  scores_b = np.asarray([p["scores_b"] for p in pairs], np.float32)
  out["labels"] = pair_labels(scores_a, scores_b, tie_margin)
  out["scores_a"], out["scores_b"] = scores_a, scores_b
  return out
