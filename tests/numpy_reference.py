"""An independent float64 NumPy implementation of a Llama-family policy with head bases, for decode checks.

Written from the model's definition (RMSNorm, rotary "rotate_half", grouped-query causal attention, SwiGLU, tied
output layer), not from the JAX code paths: full-sequence forward passes, no KV cache, no fusion, float64.
Shared by `tests/test_decode_reference.py` and `tests/xla_cpu_regression.py`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def _f64(tree: Any) -> Any:
  """A float64 copy of a parameter tree (leaves already float64 are kept: convert once, reuse across calls)."""
  if isinstance(tree, Mapping):
    return {k: _f64(v) for k, v in tree.items()}
  return tree if isinstance(tree, np.ndarray) and tree.dtype == np.float64 else np.asarray(tree, np.float64)


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
  """x: [T, H, Dh], positions: [T]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / base**(np.arange(0, dh, 2, dtype=np.float64) / dh)
  angles = positions[:, None].astype(np.float64) * inv_freq[None]
  angles = np.concatenate([angles, angles], axis=-1)[:, None, :]
  x1, x2 = x[..., :dh // 2], x[..., dh // 2:]
  return x * np.cos(angles) + np.concatenate([-x2, x1], axis=-1) * np.sin(angles)


def _log_softmax(x: np.ndarray) -> np.ndarray:
  m = np.max(x, axis=-1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def llama_forward(config, backbone: Mapping[str, Any], tokens: np.ndarray):
  """One sequence, no padding. tokens: int[T] -> (logits f64[T, V], hidden f64[T, D])."""
  if config.family != "llama" or config.learned_positions or config.sandwich_norm or config.qk_norm:
    raise ValueError("the NumPy reference covers plain Llama configs only")
  p = _f64(backbone)
  x = p["embed"]["embedding"][np.asarray(tokens)]
  t = x.shape[0]
  positions = np.arange(t)
  h, hkv = config.num_heads, config.num_kv_heads
  causal = np.tril(np.ones((t, t), bool))
  lay = p["layers"]
  for i in range(config.num_layers):
    y = _rms_norm(x, lay["pre_attn_norm"]["scale"][i], config.norm_eps)
    q = np.einsum("td,dhk->thk", y, lay["attn"]["q_proj"]["kernel"][i])
    k = np.einsum("td,dhk->thk", y, lay["attn"]["k_proj"]["kernel"][i])
    v = np.einsum("td,dhk->thk", y, lay["attn"]["v_proj"]["kernel"][i])
    q, k = _rope(q, positions, config.rope_base), _rope(k, positions, config.rope_base)
    k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
    scores = np.einsum("thk,shk->hts", q, k) * config.attention_scale
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("hts,shk->thk", probs, v)
    x = x + np.einsum("thk,hkd->td", attn, lay["attn"]["o_proj"]["kernel"][i])
    y = _rms_norm(x, lay["pre_mlp_norm"]["scale"][i], config.norm_eps)
    gate = y @ lay["mlp"]["gate_proj"]["kernel"][i]
    up = y @ lay["mlp"]["up_proj"]["kernel"][i]
    x = x + (gate / (1.0 + np.exp(-gate)) * up) @ lay["mlp"]["down_proj"]["kernel"][i]
  hidden = _rms_norm(x, p["final_norm"]["scale"], config.norm_eps)
  if config.tie_embeddings:
    logits = hidden @ p["embed"]["embedding"].T
  else:
    logits = hidden @ p["lm_head"]["kernel"]
  return logits, hidden


def soup_next_logprobs(config, policy_params: Mapping[str, Any], tokens: np.ndarray, lam: np.ndarray) -> np.ndarray:
  """The explicit soup's next-token log-probs after `tokens` (int[T]): f64[V].

  log pi_soup = log_softmax((1 - sum lam) log pi_ref + sum_k lam_k log pi_k), log pi_k from logits
  ref + (psi A_k) B_k + c_k (the head bases of `SpectralPolicy`, psi = the final hidden state).
  """
  logits, hidden = llama_forward(config, policy_params["features"]["backbone"], tokens)
  logits, psi = logits[-1], hidden[-1]
  heads = _f64(policy_params["heads"])
  lam = np.asarray(lam, np.float64)
  num_bases = lam.shape[0]
  delta = np.zeros((num_bases, logits.shape[-1]))
  if "a" in heads:
    delta = delta + np.einsum("f,kfr,krv->kv", psi, heads["a"], heads["b"])
  if "c" in heads:
    delta = delta + heads["c"]
  mixed = (1.0 - lam.sum()) * _log_softmax(logits) + lam @ _log_softmax(logits[None] + delta)
  return _log_softmax(mixed)


def check_decode(config, policy_params, prompts: np.ndarray, lam: np.ndarray, tokens: np.ndarray, logprobs: np.ndarray,
                 steps: int) -> dict:
  """Teacher-forced float64 check of decoded rows: per row and step, is the token the float64 argmax and how far
  is its log-prob from the float64 one.

  prompts: int[U, P] (unpadded), lam: [U, K], tokens / logprobs: [U, N] from a greedy decode.
  Returns {"argmax_ok": bool[U, steps], "margin": f64[U, steps] (top-1 minus top-2 float64 log-prob),
  "logprob_err": f64[U, steps]}.
  """
  users = len(prompts)
  policy_params = _f64(policy_params)
  out = {
      "argmax_ok": np.zeros((users, steps), bool),
      "margin": np.zeros((users, steps)),
      "logprob_err": np.zeros((users, steps))
  }
  for u in range(users):
    for s in range(steps):
      prefix = np.concatenate([prompts[u], tokens[u, :s]])
      ref = soup_next_logprobs(config, policy_params, prefix, lam[u])
      top2 = np.sort(ref)[-2:]
      out["margin"][u, s] = top2[1] - top2[0]
      out["argmax_ok"][u, s] = ref[tokens[u, s]] >= top2[1] - 1e-6
      out["logprob_err"][u, s] = abs(ref[tokens[u, s]] - logprobs[u, s])
  return out
