"""One user's parameter soup as a Hugging Face checkpoint: `ss.export_hf(basis, lam, out_dir)`.

    basis = ss.load_basis("workdir/my_lora_basis")
    ss.export_hf(basis, lam, "soup_user_7")              # model.safetensors, config.json, the tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained("soup_user_7")

What is exported is exact where the basis kind allows it (docs/METHOD.md, section 4):

* **LoRA bases**: every adapted projection gets W + sum_k lam_k a_k b_k, the parameter soup by definition (for LoRA
  it approximates the explicit soup, which mixes the K + 1 policies' log-probs and has no single set of weights).
* **Head bases on the final hidden state** (`basis.head_rank` > 0, no learned projection): the soup's logits are
  h (W_out + sum_k lam_k A_k B_k), written as an untied `lm_head` (`tie_word_embeddings=false`); identical to the
  explicit soup.
* Families: Llama (`LlamaForCausalLM`) and Gemma 3 (`Gemma3ForCausalLM`, text only).
* Refused, with the reason: logit-bias bases (`basis.logit_bias`, e.g. the demo's; neither output layer has a bias
  to hold sum_k lam_k c_k), heads on a learned projection of psi, head bases under a final logit softcap (the cap
  is not linear: capping h (W_out + sum_k lam_k A_k B_k) is not the soup of capped logits), Llama backbones with a
  sliding window (Mistral), and GPT-2 backbones (their output layer is tied to the input embedding in every
  transformers GPT-2 model; LoRA soups of GPT-2 could be written, this function does not yet).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


# Our activation names -> the transformers names that `hf_import` reads back as them.
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _whole(x: float) -> Any:
  """x as an int where it is one up to float rounding (config fields typed int)."""
  return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else float(x)


def _hf_config(cfg: Any, tie_embeddings: bool) -> Any:
  """A transformers config equal to our TransformerConfig (what `hf_import.config_from_hf` reads back)."""
  import transformers  # pylint: disable=g-import-not-at-top
  rope = {"rope_type": "default", "rope_theta": float(cfg.rope_base)}
  if cfg.rope_scale != 1.0:
    rope = {"rope_type": "linear", "factor": float(cfg.rope_scale), "rope_theta": float(cfg.rope_base)}
  if cfg.family == "gemma3":
    local = {"rope_type": "default", "rope_theta": float(cfg.rope_local_base)}
    return transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_activation=_HF_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tie_embeddings, attention_bias=False,
        query_pre_attn_scalar=_whole(cfg.attention_scale ** -2),
        sliding_window=cfg.sliding_window or 4096,
        layer_types=["sliding_attention" if local_layer else "full_attention" for local_layer in cfg.local_layers],
        rope_parameters={"sliding_attention": local, "full_attention": rope},
        final_logit_softcapping=cfg.final_logit_softcap, attn_logit_softcapping=None, torch_dtype="float32")
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      hidden_act=cfg.activation, rope_parameters=rope, tie_word_embeddings=tie_embeddings,
      attention_bias=False, mlp_bias=False, torch_dtype="float32")


def _check_exportable(basis: Any) -> None:
  cfg, b = basis.policy.config, basis.config.basis
  if cfg.family == "gpt2":
    raise ValueError("export_hf writes Llama and Gemma 3 checkpoints; GPT-2 backbones are not exported (a "
                     "transformers GPT-2 ties its output layer to the input embedding, so a head soup has no place "
                     "to go). Serve them with Basis.generate instead.")
  if cfg.family == "llama" and (cfg.sliding_window or cfg.final_logit_softcap or cfg.embed_scale):
    raise ValueError("export_hf writes plain Llama checkpoints; this basis's Llama backbone has a sliding window, "
                     "a final logit softcap or an embedding scale (a Mistral-style model), which Llama's config "
                     "cannot hold.")
  if cfg.family not in ("llama", "gemma3"):
    raise ValueError(f"export_hf writes Llama and Gemma 3 checkpoints, not {cfg.family!r}.")
  if basis.policy.basis_kind == "heads":
    if b.get("logit_bias", False):
      raise ValueError("export_hf cannot export logit-bias bases (basis.logit_bias=True) exactly: the output layer "
                       "has no bias to hold sum_k lam_k c_k. Serve them with Basis.generate instead.")
    if b.get("feature_dim", 0):
      raise ValueError("export_hf cannot export heads on a learned projection of psi (basis.feature_dim > 0).")
    if cfg.final_logit_softcap:
      raise ValueError(f"export_hf cannot export head bases under a final logit softcap "
                       f"({cfg.final_logit_softcap}) exactly: capping h (W_out + sum_k lam_k A_k B_k) is not the "
                       "soup of the capped logits. Serve them with Basis.generate instead.")


def merged_backbone(basis: Any, lam: Any) -> dict:
  """Our backbone parameters with the user's soup folded in (see the module docstring): a plain dict of numpy
  arrays, plus "lm_head" for head bases."""
  from spectral_soup.basis import _lam_rows  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.spectral import ATTN_TARGETS, split_lora_params  # pylint: disable=g-import-not-at-top
  if np.ndim(lam) != 1:
    raise ValueError(f"export_hf exports one user's soup: lam must be [K={basis.num_bases}], got shape "
                     f"{np.shape(lam)}.")
  lam = _lam_rows(lam, basis.num_bases, 1, basis.names)
  _check_exportable(basis)
  lam = lam[0].astype(np.float64)
  cfg = basis.policy.config
  backbone = jax.tree.map(lambda x: np.array(x, np.float64), basis.params["features"]["backbone"])  # A copy.
  if basis.policy.basis_kind == "lora":
    for name, adapter in split_lora_params(basis.params["lora"]).items():
      a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)  # [K, L, in, r], [K, L, r, out]
      kernel = backbone["layers"]["attn" if name in ATTN_TARGETS else "mlp"][name]["kernel"]  # [L, *in, *out]
      kernel += np.einsum("k,klir,klro->lio", lam, a, b).reshape(kernel.shape)  # W + sum_k lam_k a_k b_k
  else:
    heads = basis.params["heads"]
    out = backbone["embed"]["embedding"].T if cfg.tie_embeddings else backbone["lm_head"]["kernel"]  # [D, V]
    out = np.array(out, np.float64)
    if "a" in heads:
      out += np.einsum("k,kdr,krv->dv", lam, np.asarray(heads["a"], np.float64), np.asarray(heads["b"], np.float64))
    backbone["lm_head"] = {"kernel": out}
  return backbone


def export_hf(basis: Any, lam: Any, out_dir: str) -> str:
  """Writes one user's soup (`lam: [K]`) of `basis` as a Hugging Face checkpoint directory (model.safetensors,
  config.json and the tokenizer's files) that `transformers.AutoModelForCausalLM.from_pretrained` and
  `spectral_soup.models.from_pretrained` load; returns `out_dir`. Raises ValueError for what cannot be exported
  exactly (see the module docstring), before anything is written."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  params = merged_backbone(basis, lam)
  cfg = basis.policy.config
  tied = cfg.tie_embeddings and basis.policy.basis_kind == "lora"
  tensors = {}
  for entry in hf_import.export_table(cfg, tie_embeddings=tied):
    node = params
    for key in entry.path:
      node = node[key]
    layers = range(cfg.num_layers) if entry.per_layer else [None]
    for layer in layers:
      w = node[layer] if layer is not None else node
      name = entry.hf_name if entry.hf_name == "lm_head.weight" else "model." + entry.hf_name
      tensors[name.format(i=layer)] = np.ascontiguousarray(entry.inverse(w), np.float32)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  _hf_config(cfg, tie_embeddings=tied).save_pretrained(out_dir)
  if basis.tokenizer is not None:
    basis.tokenizer.save_pretrained(out_dir)
  with open(os.path.join(out_dir, "soup.json"), "w") as f:
    json.dump({"lam": [float(x) for x in np.asarray(lam, np.float64).reshape(-1)], "bases": list(basis.names),
               "basis_kind": basis.policy.basis_kind, "step": basis.step}, f, indent=2)
  return out_dir
