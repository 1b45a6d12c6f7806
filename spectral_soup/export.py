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
* Families: Llama (`LlamaForCausalLM`), Gemma 3 (`Gemma3ForCausalLM`, text only) and GPT-2 (`GPT2LMHeadModel`; q, k
  and v are packed back into its fused `c_attn`).
* Refused, with the reason: logit-bias bases (`basis.logit_bias`, e.g. the demo's; none of these output layers has
  a bias to hold sum_k lam_k c_k), heads on a learned projection of psi, head bases under a final logit softcap
  (the cap is not linear: capping h (W_out + sum_k lam_k A_k B_k) is not the soup of capped logits), and Llama
  backbones with a sliding window (Mistral: Llama's config cannot hold the window).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from typing import Any, List, Mapping

from absl import logging
import jax
import numpy as np

from spectral_soup.utils import files

# Our activation names -> the transformers names that `hf_import` reads back as them.
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_HF_ACTIVATIONS_GPT2 = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu"}


def _whole(x: float) -> Any:
  """x as an int where it is one up to float rounding (config fields typed int)."""
  return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else float(x)


def _hf_config(cfg: Any, tie_embeddings: bool) -> Any:
  """A transformers config equal to our TransformerConfig (what `hf_import.config_from_hf` reads back)."""
  import transformers  # pylint: disable=g-import-not-at-top
  rope = {"rope_type": "default", "rope_theta": float(cfg.rope_base)}
  if cfg.rope_scale != 1.0:
    rope = {"rope_type": "linear", "factor": float(cfg.rope_scale), "rope_theta": float(cfg.rope_base)}
  if cfg.family == "gpt2":
    return transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.embed_dim,
                                   n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim,
                                   activation_function=_HF_ACTIVATIONS_GPT2[cfg.activation],
                                   layer_norm_epsilon=cfg.norm_eps, scale_attn_weights=cfg.query_scale is None,
                                   tie_word_embeddings=tie_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                   torch_dtype="float32", architectures=["GPT2LMHeadModel"])
  if cfg.family == "gemma3":
    local = {"rope_type": "default", "rope_theta": float(cfg.rope_local_base)}
    return transformers.Gemma3TextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, hidden_activation=_HF_ACTIVATIONS[cfg.activation], max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tie_embeddings, attention_bias=False,
        query_pre_attn_scalar=_whole(cfg.attention_scale**-2), sliding_window=cfg.sliding_window or 4096,
        layer_types=["sliding_attention" if local_layer else "full_attention" for local_layer in cfg.local_layers
                    ], rope_parameters={
                        "sliding_attention": local,
                        "full_attention": rope
                    }, final_logit_softcapping=cfg.final_logit_softcap, attn_logit_softcapping=None,
        torch_dtype="float32", architectures=["Gemma3ForCausalLM"])
  return transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
                                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                                  max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                                  hidden_act=_HF_ACTIVATIONS[cfg.activation], rope_parameters=rope,
                                  tie_word_embeddings=tie_embeddings, attention_bias=False, mlp_bias=False,
                                  torch_dtype="float32", architectures=["LlamaForCausalLM"])


def _check_exportable(basis: Any) -> None:
  cfg, b = basis.policy.config, basis.config.basis
  if cfg.family == "llama" and (cfg.sliding_window or cfg.final_logit_softcap or cfg.embed_scale):
    raise ValueError("export_hf writes plain Llama checkpoints; this basis's Llama backbone has a sliding window, "
                     "a final logit softcap or an embedding scale (a Mistral-style model), which Llama's config "
                     "cannot hold.")
  if cfg.family not in ("llama", "gemma3", "gpt2"):
    raise ValueError(f"export_hf writes Llama, Gemma 3 and GPT-2 checkpoints, not {cfg.family!r}.")
  if cfg.family == "gpt2" and (cfg.query_scale not in (None, 1.0) or cfg.attn_logit_softcap or cfg.final_logit_softcap):
    raise ValueError("export_hf writes plain GPT-2 checkpoints; this basis's GPT-2 backbone has an attention scale "
                     "or softcap that GPT2Config cannot hold.")
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
  if isinstance(lam, (str, bytes)) or lam is None:
    raise ValueError(f"export_hf exports one user's soup: lam must be [K={basis.num_bases}] numbers, got "
                     f"{type(lam).__name__} {lam!r}.")
  if np.ndim(lam) != 1:
    raise ValueError(f"export_hf exports one user's soup: lam must be [K={basis.num_bases}], got shape "
                     f"{np.shape(lam)}.")
  lam = _lam_rows(lam, basis.num_bases, 1, basis.names, one_user=True)
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


def _gpt2_tensors(cfg: Any, params: Mapping[str, Any], tied: bool) -> dict:
  """GPT2LMHeadModel's state dict of our GPT-2 parameters (the inverse of `hf_import`'s GPT-2 table): Conv1D
  weights are [in, out] as our kernels flattened, and q, k, v go back into the fused `c_attn` columns."""
  d, num_layers = cfg.embed_dim, cfg.num_layers
  flat = lambda x, n_in: np.asarray(x, np.float64).reshape(n_in, -1)
  layers = params["layers"]
  t = {
      "transformer.wte.weight": params["embed"]["embedding"],
      "transformer.wpe.weight": params["pos_embed"]["embedding"],
      "transformer.ln_f.weight": params["final_norm"]["scale"],
      "transformer.ln_f.bias": params["final_norm"]["bias"]
  }
  for i in range(num_layers):
    h = f"transformer.h.{i}."
    attn, mlp = layers["attn"], layers["mlp"]
    for ours, theirs in (("pre_attn_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
      t[h + theirs + ".weight"], t[h + theirs + ".bias"] = layers[ours]["scale"][i], layers[ours]["bias"][i]
    qkv = ("q_proj", "k_proj", "v_proj")
    t[h + "attn.c_attn.weight"] = np.concatenate([flat(attn[n]["kernel"][i], d) for n in qkv], axis=1)
    t[h + "attn.c_attn.bias"] = np.concatenate([np.reshape(attn[n]["bias"][i], -1) for n in qkv])
    t[h + "attn.c_proj.weight"] = flat(attn["o_proj"]["kernel"][i], d)
    t[h + "attn.c_proj.bias"] = attn["o_proj"]["bias"][i]
    t[h + "mlp.c_fc.weight"], t[h + "mlp.c_fc.bias"] = mlp["up_proj"]["kernel"][i], mlp["up_proj"]["bias"][i]
    t[h + "mlp.c_proj.weight"], t[h + "mlp.c_proj.bias"] = mlp["down_proj"]["kernel"][i], mlp["down_proj"]["bias"][i]
  if not tied:
    t["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
  return {name: np.ascontiguousarray(value, np.float32) for name, value in t.items()}


def _is_export(path: str) -> bool:
  """Whether directory `path` holds an earlier export: the soup.json an export writes (a JSON object with its keys)
  beside its model.safetensors and config.json. A directory that merely holds a file named soup.json is not one
  (it was replaced whole, with whatever else it held)."""
  try:
    with open(os.path.join(path, "soup.json")) as f:
      soup = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(soup, dict) and {"lam", "bases", "basis_kind", "step"} <= set(soup) and
          all(os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", "config.json")))


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def _check_out_dir(out_dir: str) -> str:
  """The absolute `out_dir` if it may be (re)written: new, empty, or an earlier export (`_is_export`)."""
  if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
    raise ValueError(f"export_hf: out_dir={out_dir!r}: expected a directory path.")
  # A link to a directory: its target is (re)written, the link stays (renaming the link away replaced it).
  path = os.path.realpath(os.path.expanduser(os.fspath(out_dir)))
  if os.path.lexists(path) and not os.path.isdir(path):
    raise ValueError(f"export_hf: out_dir={out_dir!r} is a file: expected a new or empty directory.")
  if os.path.isdir(path) and os.listdir(path) and not _is_export(path):
    raise ValueError(f"export_hf: out_dir={out_dir!r} is not empty and holds no earlier export (its soup.json, "
                     "model.safetensors and config.json): expected a new or empty directory, or one that export_hf "
                     "wrote (it is then replaced whole).")
  # The temporary directory beside it is named after it (`.<name>.tmp-XXXXXXXX`): a name the file system refuses
  # failed with a bare OSError after the parents were created.
  limit = os.pathconf(_nearest_existing(os.path.dirname(path)), "PC_NAME_MAX") - len(".tmp-") - 9
  if len(os.fsencode(os.path.basename(path))) > limit:
    raise ValueError(f"export_hf: out_dir={out_dir!r}: its name is {len(os.fsencode(os.path.basename(path)))} bytes "
                     f"long: expected at most {limit} (the export writes a temporary directory named after it).")
  problem = files.directory_problem(os.path.dirname(path))  # Missing parents are created (as os.makedirs does).
  if problem:
    raise ValueError(f"export_hf: out_dir={out_dir!r}: its parent directory {os.path.dirname(path)} {problem}.")
  return path


def _check_not_an_input(basis: Any, path: str, out_dir: Any) -> None:
  """ValueError if replacing `path` would replace what loading `basis` reads (its backbone at `model.path`, its
  tokenizer at `data.tokenizer`): an earlier export that bases were trained on is itself an export, so it passed
  `_check_out_dir`, and replacing it swapped the backbone under the bases without an error."""
  directory = getattr(basis, "directory", None)
  if directory:  # Orbax read it as a damaged step, and the next resume of the run deleted it.
    for folder in ("checkpoints", "checkpoints.corrupt"):
      real = os.path.realpath(os.path.join(directory, folder))
      if path == real or path.startswith(real + os.sep):
        raise ValueError(f"export_hf: out_dir={out_dir!r} is inside the training run's {folder} ({real}), which "
                         "the run reads and prunes: expected a directory outside it.")
  for section, name in (("model", "path"), ("data", "tokenizer")):
    try:
      folder = basis.config[section][name] or ""
    except (AttributeError, KeyError, TypeError):  # No such field in this basis's config.
      continue
    if not isinstance(folder, str) or not folder or folder.startswith("embedded:"):
      continue
    real = os.path.realpath(os.path.expanduser(folder))
    if real == path or real.startswith(path + os.sep):
      raise ValueError(f"export_hf: out_dir={out_dir!r} is or holds config.{section}.{name}={folder!r}, which "
                       "loading this basis reads: expected another directory.")


def _special_token_ids(tokenizer: Any) -> dict:
  """bos / eos / pad token ids for config.json and generation_config.json: the tokenizer's (what `Basis.generate`
  stops at), not the transformers config classes' defaults, which belong to other vocabularies."""
  if tokenizer is None:
    return {}
  ids = {f"{name}_token_id": getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
  if ids["pad_token_id"] is None:
    ids["pad_token_id"] = 0  # What `Basis.generate` pads with.
  return {name: int(value) for name, value in ids.items() if value is not None}


def export_hf(basis: Any, lam: Any, out_dir: str) -> str:
  """Writes one user's soup (`lam: [K]`) of `basis` as a Hugging Face checkpoint directory (model.safetensors,
  config.json, generation_config.json and the tokenizer's files) that
  `transformers.AutoModelForCausalLM.from_pretrained` and `spectral_soup.models.from_pretrained` load; returns
  `out_dir`.

  Raises ValueError for what cannot be exported exactly (see the module docstring) and for an `out_dir` that is a
  file or a non-empty directory that no earlier export wrote, before anything is written. The checkpoint's special
  token ids are the tokenizer's. The files are written to a temporary directory beside `out_dir`, synced, and renamed
  into place at the end, so `out_dir` never holds a partial export: after a failure it is as it was. What a killed
  export left beside `out_dir` is cleared by the next export of it (`_clear_abandoned`).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  path = _check_out_dir(out_dir)
  _check_not_an_input(basis, path, out_dir)
  params = merged_backbone(basis, lam)
  cfg = basis.policy.config
  tied = cfg.tie_embeddings and basis.policy.basis_kind == "lora"
  tensors = _gpt2_tensors(cfg, params, tied) if cfg.family == "gpt2" else {}
  for entry in ([] if cfg.family == "gpt2" else hf_import.export_table(cfg, tie_embeddings=tied)):
    node = params
    for key in entry.path:
      node = node[key]
    layers = range(cfg.num_layers) if entry.per_layer else [None]
    for layer in layers:
      w = node[layer] if layer is not None else node
      name = entry.hf_name if entry.hf_name == "lm_head.weight" else "model." + entry.hf_name
      tensors[name.format(i=layer)] = np.ascontiguousarray(entry.inverse(w), np.float32)
  del params
  hf_config = _hf_config(cfg, tie_embeddings=tied)
  special = _special_token_ids(basis.tokenizer)
  for name, value in special.items():
    setattr(hf_config, name, value)
  soup = {
      "lam": [float(x) for x in np.asarray(lam, np.float64).reshape(-1)],
      "bases": list(basis.names),
      "basis_kind": basis.policy.basis_kind,
      "step": basis.step
  }
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _clear_abandoned(path)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=os.path.dirname(path))
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # A directory made as usual (mkdtemp's are private to their owner).
    steps = [("model.safetensors",
              lambda: save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})),
             ("config.json", lambda: hf_config.save_pretrained(tmp))]
    if special:
      steps.append(("generation_config.json", lambda: _generation_config(special).save_pretrained(tmp)))
    if basis.tokenizer is not None:
      steps.append(("the tokenizer's files", lambda: basis.tokenizer.save_pretrained(tmp)))
    steps.append(("soup.json", lambda: _write_json(os.path.join(tmp, "soup.json"), soup)))
    for what, write in steps:
      try:
        write()
      except Exception as e:  # pylint: disable=broad-except
        raise OSError(f"export_hf: writing {what} of {out_dir!r} (in {tmp}) failed: {e}") from e
    _fsync_tree(tmp)  # On disk before the rename: a power loss leaves the old export or the new one.
    _replace_dir(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _generation_config(special: Mapping[str, int]) -> Any:
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.GenerationConfig(**special)


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)


def _fsync_tree(directory: str) -> None:
  for name in os.listdir(directory):
    target = os.path.join(directory, name)
    if os.path.isfile(target) and not os.path.islink(target):
      files.fsync(target)
  files.fsync(directory)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's live process.
    return True
  return True


def _clear_abandoned(path: str) -> List[str]:
  """Clears what a killed export of `path` left beside it (this host's processes only); returns what it touched.

  A kill while writing left `.<name>.tmp-<pid>-*` (a whole model's copy): removed. A kill between the two renames
  of `_replace_dir` left no `path` and the previous export in `.<name>.old-<pid>-*`: renamed back to `path`, then
  replaced as usual. Exports of live processes (another export of the same directory running) are left alone.
  """
  parent, name = os.path.dirname(path), os.path.basename(path)
  touched = []
  for kind in ("old", "tmp"):  # The previous export is restored before any partial copy is removed.
    for leftover in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.{kind}-*"))):
      match = re.fullmatch(rf"\.{re.escape(name)}\.{kind}-(\d+)-[^/]*", os.path.basename(leftover))
      if not match or not os.path.isdir(leftover) or os.path.islink(leftover) or _pid_alive(int(match.group(1))):
        continue
      if kind == "old" and not os.path.lexists(path) and _is_export(leftover):
        os.rename(leftover, path)
        logging.warning("export_hf: %s was left without its export by a killed export; restored it from %s.", path,
                        leftover)
      else:
        shutil.rmtree(leftover, ignore_errors=True)
        logging.warning("export_hf: removed %s, left by a killed export of %s.", leftover, path)
      touched.append(leftover)
  return touched


def _replace_dir(new: str, path: str) -> None:
  """Moves directory `new` to `path` (the same file system); an existing `path` is replaced whole."""
  old = None
  if os.path.lexists(path):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-{os.getpid()}-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
  try:
    os.rename(new, path)
  except OSError:
    if old is not None:
      os.rename(old, path)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
