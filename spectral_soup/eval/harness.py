"""The model side of the online protocol and the evaluation: decode row programs over prompt pools and score them.

`PolicyHarness` wraps a head-basis `SpectralPolicy` with H = K + extra heads (the K bases first; the main job puts
one bespoke head per evaluation user after them), a pool of tokenized prompts and a scorer. Rows are decoded by
the decoding engine (`soup/engine.py`) in fixed-size chunks (one compile for any number of rows), after a single
prefill of the prompts they continue.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spectral_soup.baselines import pad as pad_lib
from spectral_soup.models import cost
from spectral_soup.soup import decoding
from spectral_soup.soup import engine
from spectral_soup.soup.validation import check_int
from spectral_soup.utils import progress

# score_fn(prompts: R prompt texts, tokens: int32[R, N], lengths: int32[R]) -> float32[R, A] standardized scores.
ScoreFn = Callable[[Sequence[str], np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class Program:
  """One policy to evaluate: a row program shared by all prompts (see `soup.engine.Rows`)."""
  method: str
  user: Optional[int]  # None: the same policy for every user (reference, uniform, ...).
  mode: str  # explicit, params, implicit or guided (`engine.MODES`).
  lam: np.ndarray  # [H] weights over the heads.
  guide: Optional[np.ndarray] = None  # [A]
  scale: float = 1.0  # The strength the method runs at (a point of its sweep; 1: as fitted). A label only.


class PolicyHarness:
  """Decodes and scores rows of row programs for the online protocol and the evaluation."""

  def __init__(self, policy, params, prompts: np.ndarray, prompt_mask: np.ndarray, prompt_texts: Sequence[str],
               score_fn: ScoreFn, *, num_bases: int, beta: float, max_new_tokens: int, eos_id: Optional[int],
               pad_id: int, pad_table: np.ndarray, support: np.ndarray, head_support: Optional[np.ndarray] = None,
               chunk_rows: int = 128, max_proposals: int = 32,
               sampling: decoding.SamplingConfig = decoding.SamplingConfig(temperature=1.0)):
    self.policy, self.params = policy, params
    self.prompts, self.prompt_mask = np.asarray(prompts), np.asarray(prompt_mask, bool)
    self.prompt_texts = list(prompt_texts)
    if len(self.prompt_texts) != len(self.prompts):
      raise ValueError(f"{len(self.prompt_texts)} prompt texts for {len(self.prompts)} tokenized prompts.")
    self.score_fn = score_fn
    self.num_bases = num_bases
    self.num_heads = policy.num_bases
    self.num_attributes = pad_table.shape[0]
    if isinstance(
        beta, bool) or not isinstance(beta,
                                      (int, float, np.integer, np.floating)) or not (np.isfinite(beta) and beta > 0):
      raise ValueError(f"beta must be a finite number > 0 (the guided rows' reward scale is 1 / beta), got {beta!r}.")
    self.beta = beta
    self.max_new_tokens, self.eos_id, self.pad_id = max_new_tokens, eos_id, pad_id
    self.pad_table, self.support = jnp.asarray(pad_table), np.asarray(support)
    # Tokens outside which the heads are zero (trained on a vocabulary support): decoding skips the rest.
    self.head_support = None if head_support is None else jnp.asarray(head_support, jnp.int32)
    self.chunk_rows, self.max_proposals, self.sampling = chunk_rows, max_proposals, sampling
    # Decode work and wall time (`decode_summary`): the backbone, plus each head's low-rank correction per row-step.
    heads = params.get("heads", {}) if isinstance(params, dict) else {}
    extra = 0.0
    if "a" in heads and "b" in heads:
      num_heads, features, rank = np.shape(heads["a"])
      columns = np.shape(heads["b"])[-1] if self.head_support is None else int(self.head_support.shape[0])
      extra = 2.0 * num_heads * rank * (features + columns)
    self.meter = cost.DecodeMeter(policy.config, extra_flops_per_row=extra)
    self.score_s = 0.0

  def run_rows(self, prompt_ids: Sequence[int], modes: Sequence[str], lam: np.ndarray, guide: np.ndarray,
               prompt_index: np.ndarray, key: jax.Array, seed: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Decodes R rows; row r continues prompt `prompt_ids[prompt_index[r]]` of the pool.

    Returns {"tokens": int32[R, N], "lengths": [R], "ref_logp": [R], "head_logp": [R, H], "kl": [R]}.
    """
    prompt_ids = np.asarray(prompt_ids)
    if not len(modes):
      raise ValueError("run_rows needs at least one row (modes is empty).")
    if not 0 < len(prompt_ids) or np.any(prompt_ids < 0) or np.any(prompt_ids >= len(self.prompts)):
      raise ValueError(f"prompt_ids must be indices into the harness's {len(self.prompts)} prompts, got "
                       f"{prompt_ids if prompt_ids.size <= 8 else prompt_ids.shape}.")
    # Every row checked before the prefill compiles (modes, lam, prompt indices within `prompt_ids`).
    all_rows = engine.make_rows(modes, lam, guide, prompt_index, seed, num_prompts=len(prompt_ids))
    max_len = self.prompts.shape[1] + self.max_new_tokens
    with cost.compile_time() as compiled:
      t0 = time.perf_counter()
      prefilled = jax.block_until_ready(
          engine.prefill(self.policy, self.params, self.prompts[prompt_ids], self.prompt_mask[prompt_ids],
                         max_len=max_len))
    prompt_tokens = self.prompt_mask[prompt_ids].sum(axis=1)  # Each prompt's own tokens (padding is not work).
    row_prompt = np.asarray(all_rows.prompt_index)
    self.meter.add_prefill(len(prompt_ids), prompt_tokens, time.perf_counter() - t0, compiled.seconds)
    num_rows = len(modes)
    # Implicit rows last and together: only their chunks pay for rejection sampling and full head logits.
    is_implicit = np.asarray([m == "implicit" for m in modes])
    order = np.argsort(is_implicit, kind="stable")
    outs = []
    for lo in progress.track(range(0, num_rows, self.chunk_rows), desc=f"decoding {num_rows} rows", unit="chunk",
                             total=-(-num_rows // self.chunk_rows)):
      idx = order[np.arange(lo, lo + self.chunk_rows) % num_rows]  # The last chunk wraps around; extras dropped.
      rows = jax.tree.map(lambda a: a[idx], all_rows)  # pylint: disable=cell-var-from-loop
      proposals = self.max_proposals if is_implicit[idx].any() else 0
      with cost.compile_time() as compiled:
        t0 = time.perf_counter()
        # One key for every chunk: a row's stream is set by its seed alone, wherever the row falls.
        tokens, aux = engine.decode_rows(self.policy, self.params, prefilled, rows, key, self.pad_table,
                                         1.0 / self.beta, self.head_support, max_new_tokens=self.max_new_tokens,
                                         sampling=self.sampling, eos_id=self.eos_id, pad_id=self.pad_id,
                                         max_proposals=proposals)
        aux = jax.device_get(aux)
        tokens = np.asarray(tokens)
      keep = min(self.chunk_rows, num_rows - lo)
      # The loop ran until its longest row stopped; the wrapped-around extras were decoded but are not wanted.
      self.meter.add_chunk(len(idx), int(aux["lengths"].max()), int(aux["lengths"][:keep].sum()),
                           float(np.mean(prompt_tokens[row_prompt[idx]])),
                           time.perf_counter() - t0, compiled.seconds)
      out = {"tokens": tokens[:keep], "lengths": aux["lengths"][:keep]}
      for name in ("accepted", "proposals"):  # Present only in chunks with implicit rows.
        aux["stats"].setdefault(name, np.zeros(len(idx), np.float32))
      out.update({name: value[:keep] for name, value in aux["stats"].items()})
      outs.append(out)
    result = {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}
    inverse = np.empty_like(order)
    inverse[order] = np.arange(num_rows)
    result = {name: value[inverse] for name, value in result.items()}  # Back to the callers' row order.
    return result

  def scores(self, prompt_ids: np.ndarray, out: Dict[str, np.ndarray]) -> np.ndarray:
    texts = [self.prompt_texts[i] for i in np.asarray(prompt_ids)]
    t0 = time.perf_counter()
    scores = np.asarray(self.score_fn(texts, out["tokens"], out["lengths"]), np.float32)
    self.score_s += time.perf_counter() - t0
    expected = (len(texts), self.num_attributes)
    if scores.shape != expected:  # A transposed [A, R] would be reshaped into the wrong layout.
      raise ValueError(f"score_fn returned shape {scores.shape}: expected [responses, attributes] = {expected}.")
    return scores

  @property
  def decoded_tokens(self) -> int:
    """Tokens emitted by the rows decoded so far (each up to and including its EOS)."""
    return self.meter.tokens

  def decode_summary(self, rates: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """This harness's decoding so far: work, wall time and (with `cost.machine_rates()`) its share of the floor
    (`cost.DecodeMeter.summary`), with the batch size and the scorer's time beside it."""
    return {"batch_rows": self.chunk_rows, **self.meter.summary(rates), "score_s": self.score_s}

  def pad_features(self, out: Dict[str, np.ndarray]) -> np.ndarray:
    masks = np.arange(out["tokens"].shape[1])[None] < out["lengths"][:, None]
    counts = pad_lib.token_counts([out["tokens"]], [masks], self.support)
    return pad_lib.pad_features(counts, np.asarray(self.pad_table), self.support)

  # -- The online protocol's interface (`online.protocol.Harness`).

  def decode(self, prompt_ids: np.ndarray, mode: str, lam: np.ndarray, key: jax.Array) -> Dict[str, np.ndarray]:
    num_rows, per_prompt = len(lam), len(lam) // max(len(prompt_ids), 1)
    if not num_rows or num_rows != per_prompt * len(prompt_ids):
      raise ValueError(f"decode needs the same number of rows (lam) for each prompt: {num_rows} rows for "
                       f"{len(prompt_ids)} prompts.")
    full = np.zeros((num_rows, self.num_heads), np.float32)
    full[:, :self.num_bases] = lam
    prompt_index = np.repeat(np.arange(len(prompt_ids)), per_prompt)
    # Each row its own sampling stream: the two shown responses must differ by more than their soups.
    out = self.run_rows(prompt_ids, [mode] * num_rows, full, np.zeros((num_rows, self.num_attributes), np.float32),
                        prompt_index, key, seed=np.arange(num_rows))
    features = self.beta * (out["head_logp"][:, :self.num_bases] - out["ref_logp"][:, None])
    return {
        "features": features,
        "kl": out["kl"],
        "scores": self.scores(prompt_ids[prompt_index], out),
        "pad_features": self.pad_features(out),
        "tokens": out["tokens"],
        "lengths": out["lengths"]
    }

  # -- Evaluation.

  def evaluate(self, programs: Sequence[Program], prompt_ids: np.ndarray, key: jax.Array,
               samples_per_prompt: int = 1) -> Dict[str, np.ndarray]:
    """Every program answers every prompt `samples_per_prompt` times, with common random numbers across programs.

    Returns {"scores": f32[P, E, S, A], "kl": f32[P, E, S], "tokens": int32[P, E, S, N], "lengths": [P, E, S]}
    for P programs, E prompts, S samples.
    """
    num_p, num_e, num_s = len(programs), len(prompt_ids), samples_per_prompt
    check_int("samples_per_prompt", num_s, 1)
    if not num_p or not num_e:
      raise ValueError(f"evaluate needs at least one program and one prompt, got {num_p} and {num_e}.")
    grid = np.stack(np.meshgrid(np.arange(num_p), np.arange(num_e), np.arange(num_s), indexing="ij"), -1)
    grid = grid.reshape(-1, 3)  # Rows ordered (program, prompt, sample).
    modes = [programs[p].mode for p in grid[:, 0]]
    lam = np.stack([programs[p].lam for p in grid[:, 0]]).astype(np.float32)
    guide = np.stack([
        np.zeros(self.num_attributes) if programs[p].guide is None else programs[p].guide for p in grid[:, 0]
    ]).astype(np.float32)
    out = self.run_rows(prompt_ids, modes, lam, guide, grid[:, 1], key, seed=grid[:, 1] * num_s + grid[:, 2])
    scores = self.scores(np.asarray(prompt_ids)[grid[:, 1]], out)
    shape = (num_p, num_e, num_s)
    result = {
        "scores": scores.reshape(*shape, -1),
        "kl": out["kl"].reshape(shape),
        "tokens": out["tokens"].reshape(*shape, -1),
        "lengths": out["lengths"].reshape(shape)
    }
    for name in ("accepted", "proposals"):  # Implicit rows' rejection-sampling counts.
      result[name] = out[name].reshape(shape)
    return result
