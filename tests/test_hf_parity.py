"""Parity of spectral_soup.models.hf_import with transformers' PyTorch models (tiny random GPT-2, Llama, Gemma 3).

Every checkpoint is built and saved locally (tests/hf_fixtures.py); nothing is downloaded (conftest.py and
hf_fixtures set HF_HUB_OFFLINE).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import hf_fixtures
from spectral_soup.models import hf_config
from spectral_soup.models import hf_import
from spectral_soup.models.transformer import Transformer, init_cache

FAMILIES = hf_fixtures.FAMILIES
ATOL = 1e-4
BATCH, LENGTH = 2, 14  # Longer than Gemma's sliding window (4), so the window matters.
PROMPT, NEW_TOKENS = 6, 8  # PROMPT + NEW_TOKENS == LENGTH: the no-cache decoder reuses the forward compile.
PAD = 3  # Left padding of row 1 in the padded tests.


@dataclasses.dataclass
class Loaded:
  family: str
  hf_model: Any
  path: Any
  model: Transformer
  params: Any
  forward: Callable  # jitted (params, tokens, mask) -> logits


@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, tmp_path_factory) -> Loaded:
  family = request.param
  hf_model = hf_fixtures.build_hf_model(family)
  path = hf_fixtures.save_hf_model(hf_model, tmp_path_factory.mktemp(family))
  model, params = hf_import.from_pretrained(path)
  forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, mask=m)[0])
  return Loaded(family, hf_model, path, model, params, forward)


def _tokens(family: str, shape, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(1, hf_fixtures.VOCAB[family], size=shape).astype(np.int32)


def _left_padded(family: str, length: int):
  """Tokens [BATCH, length] and mask, row 1 with PAD padding tokens (id 0) on the left."""
  tokens = _tokens(family, (BATCH, length))
  mask = np.ones_like(tokens, dtype=bool)
  tokens[1, :PAD] = 0
  mask[1, :PAD] = False
  return tokens, mask


def _hf_logits(hf_model, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  mask_t = torch.tensor(mask, dtype=torch.long)
  position_ids = (mask_t.cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask_t, position_ids=position_ids)
  return out.logits.float().numpy()


# ---------------------------------------------------------------------------------------------------------------
# Logit parity.


def test_logits_match_hf(loaded):
  tokens = _tokens(loaded.family, (BATCH, LENGTH))
  mask = np.ones_like(tokens, dtype=bool)
  ours = np.asarray(loaded.forward(loaded.params, tokens, mask))
  theirs = _hf_logits(loaded.hf_model, tokens, mask)
  diff = np.abs(ours - theirs).max()
  print(f"{loaded.family}: max |logits - hf| = {diff:.3g} (logit scale {np.abs(theirs).max():.3g})")
  assert ours.shape == (BATCH, LENGTH, hf_fixtures.VOCAB[loaded.family])
  assert diff <= ATOL


def test_left_padded_logits_match_hf(loaded):
  tokens, mask = _left_padded(loaded.family, LENGTH)
  ours = np.asarray(loaded.forward(loaded.params, tokens, mask))
  theirs = _hf_logits(loaded.hf_model, tokens, mask)
  diff = np.abs(ours - theirs)[mask].max()
  print(f"{loaded.family}: left padded, max |logits - hf| on real tokens = {diff:.3g}")
  assert diff <= ATOL
  # Row 1's real tokens see exactly what they see unpadded. Unpadded = moved to the front with padding on the
  # right, which causality hides from them (same shape: no new compile).
  shifted, shifted_mask = np.roll(tokens, -PAD, axis=1), np.roll(mask, -PAD, axis=1)
  unpadded = np.asarray(loaded.forward(loaded.params, shifted, shifted_mask))
  np.testing.assert_allclose(ours[1, PAD:], unpadded[1, :LENGTH - PAD], atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Greedy decoding: KV cache vs recomputation vs transformers' generate.


def _greedy_with_cache(loaded: Loaded, prompt: np.ndarray, mask: np.ndarray) -> np.ndarray:
  model, cfg = loaded.model, loaded.model.config
  cache = init_cache(cfg, BATCH, PROMPT + NEW_TOKENS)
  logits, aux = jax.jit(lambda p, t, m, c: model.apply({"params": p}, t, mask=m, cache=c))(loaded.params, prompt, mask,
                                                                                           cache)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t[:, None], cache=c))
  token, cache, out = jnp.argmax(logits[:, -1], axis=-1), aux["cache"], []
  for _ in range(NEW_TOKENS):
    out.append(token)
    logits, aux = step(loaded.params, token, cache)
    token, cache = jnp.argmax(logits[:, -1], axis=-1), aux["cache"]
  return np.stack([np.asarray(t) for t in out], axis=1)


def _greedy_without_cache(loaded: Loaded, prompt: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Recomputes the whole sequence each step; not-yet-generated slots are masked (causality hides them anyway)."""
  tokens = np.zeros((BATCH, PROMPT + NEW_TOKENS), np.int32)
  full_mask = np.zeros_like(tokens, dtype=bool)
  tokens[:, :PROMPT], full_mask[:, :PROMPT] = prompt, mask
  for t in range(PROMPT, PROMPT + NEW_TOKENS):
    logits = loaded.forward(loaded.params, tokens, full_mask)
    tokens[:, t], full_mask[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1)), True
  return tokens[:, PROMPT:]


def test_greedy_decoding_matches(loaded):
  prompt, mask = _left_padded(loaded.family, PROMPT)
  with_cache = _greedy_with_cache(loaded, prompt, mask)
  without_cache = _greedy_without_cache(loaded, prompt, mask)
  with torch.no_grad():
    generated = loaded.hf_model.generate(input_ids=torch.tensor(prompt, dtype=torch.long),
                                         attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
  hf_tokens = generated[:, PROMPT:].numpy()
  print(loaded.family, with_cache.tolist(), hf_tokens.tolist())
  np.testing.assert_array_equal(with_cache, without_cache)
  np.testing.assert_array_equal(with_cache, hf_tokens)


def test_gemma3_multimodal_checkpoint_matches_hf(tmp_path):
  """Gemma3ForConditionalGeneration: text weights under language_model.*, a vision tower to skip, tied head."""
  config = hf_fixtures.tiny_gemma3_multimodal_config()
  torch.manual_seed(0)
  hf_model = transformers.Gemma3ForConditionalGeneration(config).eval()
  path = hf_fixtures.save_hf_model(hf_model, tmp_path / "mm")
  model, params = hf_import.from_pretrained(path)
  tokens = _tokens("gemma3", (BATCH, LENGTH))
  ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, tokens))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  diff = np.abs(ours - theirs).max()
  print(f"gemma3 multimodal (text only): max |logits - hf| = {diff:.3g}")
  assert diff <= ATOL


def test_mistral_sliding_window_matches_hf(tmp_path):
  hf_model = hf_fixtures.build_hf_model("mistral")
  model, params = hf_import.from_pretrained(hf_fixtures.save_hf_model(hf_model, tmp_path / "mistral"))
  assert model.config.layer_is_local == (True, True) and model.config.sliding_window == 4
  tokens = _tokens("mistral", (BATCH, LENGTH))
  ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, tokens))
  theirs = _hf_logits(hf_model, tokens, np.ones_like(tokens, dtype=bool))
  diff = np.abs(ours - theirs).max()
  print(f"mistral: max |logits - hf| = {diff:.3g}")
  assert diff <= ATOL


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint formats.


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_checkpoint(tmp_path):
  hf_model = hf_fixtures.build_hf_model("llama")
  single = hf_fixtures.save_hf_model(hf_model, tmp_path / "single")
  sharded = hf_fixtures.save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="40KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  assert len(list(sharded.glob("*.safetensors"))) > 1
  config_a, params_a = hf_import.load_hf_checkpoint(single)
  config_b, params_b = hf_import.load_hf_checkpoint(sharded)
  assert config_a == config_b
  _assert_trees_equal(params_a, params_b)


def test_sharded_checkpoint_shape_error_names_the_shard(tmp_path):
  hf_model = hf_fixtures.build_hf_model("llama")
  path = hf_fixtures.save_hf_model(hf_model, tmp_path / "sharded", max_shard_size="40KB")
  weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
  name = "model.layers.0.mlp.up_proj.weight"
  shard = path / weight_map[name]
  state = load_file(str(shard))
  state[name] = state[name][:, :-1].copy()
  save_file(state, str(shard), metadata={"format": "pt"})
  with pytest.raises(ValueError) as err:
    hf_import.from_pretrained(path)
  assert str(shard) in str(err.value) and name in str(err.value) and "layers/mlp/up_proj/kernel" in str(err.value)


def test_a_single_file_wins_over_an_index_as_in_transformers(tmp_path):
  """A directory holding model.safetensors and a sharded index of other weights loads model.safetensors."""
  path = hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama", seed=1), tmp_path / "both",
                                   max_shard_size="40KB")
  single = hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama", seed=2), tmp_path / "single")
  shutil.copy(single / "model.safetensors", path / "model.safetensors")
  _, ours = hf_import.load_hf_checkpoint(path)
  _, theirs = hf_import.load_hf_checkpoint(single)
  _assert_trees_equal(ours, theirs)


def test_an_index_naming_the_wrong_shard_says_so(tmp_path):
  path = hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama"), tmp_path / "sharded", max_shard_size="40KB")
  index = json.loads((path / "model.safetensors.index.json").read_text())
  name = "model.layers.1.mlp.up_proj.weight"
  wrong = next(s for s in sorted(set(index["weight_map"].values())) if s != index["weight_map"][name])
  index["weight_map"][name] = wrong
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(
      ValueError, match=rf"model\.safetensors\.index\.json maps tensor '{name}' to {wrong}, which does "
      r"not hold it \(it holds \d+ others\): the index names the wrong shard"):
    hf_import.from_pretrained(path)


def test_a_tied_config_with_its_own_lm_head_loads_untied_as_in_transformers(tmp_path, caplog):
  """config.json ties the output projection, but the file holds an lm_head of other values: transformers keeps it."""
  path = hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama"), tmp_path / "model")  # Untied weights.
  config = json.loads((path / "config.json").read_text())
  config["tie_word_embeddings"] = True
  (path / "config.json").write_text(json.dumps(config))
  with caplog.at_level(logging.WARNING):
    model, params = hf_import.from_pretrained(path)
  assert not model.config.tie_embeddings and "it is loaded untied" in caplog.text
  tokens = _tokens("llama", (BATCH, LENGTH))
  mask = np.ones_like(tokens, dtype=bool)
  ours = np.asarray(model.apply({"params": params}, tokens, mask=mask)[0])
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
  assert np.abs(ours - _hf_logits(hf_model, tokens, mask)).max() <= ATOL


def test_bf16_checkpoint(tmp_path):
  hf_model = hf_fixtures.build_hf_model("gemma3").to(torch.bfloat16)
  path = hf_fixtures.save_hf_model(hf_model, tmp_path / "bf16")
  q_ref = hf_model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H * Dh, D]
  for weight_dtype in ("bfloat16", "float32"):
    model, params = hf_import.from_pretrained(path, weight_dtype=weight_dtype)
    q = params["layers"]["attn"]["q_proj"]["kernel"][1]  # [D, H, Dh]
    assert q.dtype == jnp.dtype(weight_dtype)
    np.testing.assert_array_equal(np.asarray(q, np.float32).reshape(q.shape[0], -1).T, q_ref)
    assert model.config.weight_dtype == weight_dtype


# ---------------------------------------------------------------------------------------------------------------
# State-dict handling.


def _state_dict(hf_model) -> dict:
  return {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return hf_fixtures.save_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama_sd"))


def test_config_from_pretrained_is_the_loaded_architecture(llama_dir, tmp_path):
  """An HF directory's architecture from config.json alone, overrides applied as `from_pretrained` applies them;
  a directory without config.json is named."""
  assert hf_import.config_from_pretrained(llama_dir) == hf_import.from_pretrained(llama_dir)[0].config
  assert hf_import.config_from_pretrained(llama_dir, max_len=7).max_len == 7
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"empty: no config.json"):
    hf_import.config_from_pretrained(tmp_path / "empty")


def _rewrite_checkpoint(src, dst, edit) -> None:
  """dst/ = src/config.json + edit(src's state dict) as model.safetensors."""
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  save_file(edit(load_file(str(src / "model.safetensors"))), str(dst / "model.safetensors"))


def test_a_shape_error_after_an_override_names_the_override(tmp_path):
  """`from_pretrained(gpt2_dir, max_len=16)` (the docstring's example field) on a 64-position checkpoint blamed the
  file: 'tensor wpe.weight has shape (64, 64), expected (16, 64)'."""
  gpt2 = hf_fixtures.save_tiny_checkpoint("gpt2", tmp_path / "gpt2")
  with pytest.raises(
      ValueError, match=r"has shape \(64, 64\), expected \(16, 64\) .* \(the config was overridden "
      r"with max_len=16: expected the checkpoint's own sizes there\)"):
    hf_import.from_pretrained(gpt2, max_len=16)
  assert hf_import.from_pretrained(gpt2, max_len=64)[0].config.max_len == 64


def test_quantized_checkpoints_are_named_as_such(llama_dir, tmp_path):
  """GPTQ / AWQ (config.json's quantization_config) and MLX (its `quantization`, packed uint32 weights) checkpoints:
  'missing tensor ...q_proj.weight' and 'has shape (64, 8), expected (64, 64)' read as a config that does not match
  its weights; they are named as quantized, from config.json, before any tensor is read."""
  for field, value, shown in (("quantization_config", {
      "quant_method": "gptq",
      "bits": 4
  }, r"\(gptq\)"), ("quantization", {
      "group_size": 64,
      "bits": 4
  }, r"\(4\)")):
    quantized = tmp_path / field
    quantized.mkdir()
    config = json.loads((llama_dir / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, field: value}))
    shutil.copy(llama_dir / "model.safetensors", quantized / "model.safetensors")
    with pytest.raises(ValueError, match=rf"config.json: {field} {shown}: a quantized checkpoint: expected float32"):
      hf_import.from_pretrained(quantized)
  packed = tmp_path / "packed"  # Packed weights under a plain config: the dtype is named, not the shape.
  name = "model.layers.0.self_attn.q_proj.weight"
  _rewrite_checkpoint(llama_dir, packed, lambda sd: {**sd, name: np.zeros((64, 8), np.uint32)})
  with pytest.raises(ValueError, match=rf"tensor '{name}' has dtype uint32: expected float32, float16 or bfloat16"):
    hf_import.from_pretrained(packed)


def test_wrong_shape_names_file_tensor_and_param(llama_dir, tmp_path):
  bad = tmp_path / "bad"
  name = "model.layers.1.self_attn.k_proj.weight"

  def edit(sd):
    sd[name] = np.zeros((8, 64), np.float32)
    return sd

  _rewrite_checkpoint(llama_dir, bad, edit)
  with pytest.raises(ValueError) as err:
    hf_import.from_pretrained(bad)
  message = str(err.value)
  for part in (str(bad / "model.safetensors"), name, "layers/attn/k_proj/kernel", "(8, 64)", "(32, 64)"):
    assert part in message


def test_missing_tensor_names_file_and_tensor(llama_dir, tmp_path):
  bad = tmp_path / "bad"
  name = "model.layers.0.mlp.down_proj.weight"
  _rewrite_checkpoint(llama_dir, bad, lambda sd: {k: v for k, v in sd.items() if k != name})
  with pytest.raises(ValueError, match="missing tensor") as err:
    hf_import.load_hf_checkpoint(bad)
  assert str(bad / "model.safetensors") in str(err.value) and name in str(err.value)


def test_a_float8_tensor_is_named_as_a_quantized_weight_not_a_corrupt_file(llama_dir, tmp_path):
  from safetensors.torch import load_file as load_torch, save_file as save_torch  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "fp8"
  bad.mkdir()
  shutil.copy(llama_dir / "config.json", bad / "config.json")
  state = load_torch(str(llama_dir / "model.safetensors"))
  name = "model.layers.0.mlp.up_proj.weight"
  state[name] = state[name].to(torch.float8_e4m3fn)
  save_torch(state, str(bad / "model.safetensors"))
  with pytest.raises(
      ValueError, match=rf"model.safetensors: tensor '{name}' has dtype F8_E4M3: expected float32, "
      r"float16 or bfloat16 weights \(quantized checkpoints are not supported"):
    hf_import.load_hf_checkpoint(bad)


@pytest.mark.parametrize("family, overrides, message", [
    ("gemma3", dict(query_pre_attn_scalar=-16), r"query_pre_attn_scalar=-16 is not supported: expected a finite "
     r"number > 0"),
    ("gemma3", dict(query_pre_attn_scalar=0), r"query_pre_attn_scalar=0 is not supported"),
    ("gemma3", dict(sliding_window=None), r"sliding_window=None is not supported: expected a window of >= 1 tokens"),
])
def test_gemma3_scalars_that_made_a_silently_wrong_model_are_refused(tmp_path, family, overrides, message):
  """query_pre_attn_scalar=-16 became a complex query scale (near-uniform attention, no error); 0 a bare
  ZeroDivisionError; a null window an int() TypeError naming no field."""
  path = hf_fixtures.save_tiny_checkpoint(family, tmp_path / "ck")
  config = json.loads((path / "config.json").read_text())
  config.update(overrides)
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"config.json: .*{message}"):
    hf_import.load_hf_checkpoint(path)


@pytest.mark.parametrize("family, field", [("gpt2", "n_positions"), ("gemma3", "head_dim")])
def test_an_architecture_field_left_to_transformers_default_is_named(tmp_path, family, field):
  """Without them transformers' class defaults (1,024 positions, head_dim 256) applied and the weights' shapes
  were blamed."""
  path = hf_fixtures.save_tiny_checkpoint(family, tmp_path / "ck")
  config = json.loads((path / "config.json").read_text())
  del config[field]
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=rf"config.json: no '{field}': expected the .* architecture's {field}"):
    hf_import.load_hf_checkpoint(path)


def test_a_scale_that_is_not_a_positive_number_is_refused_by_the_config():
  cfg = hf_import.config_from_hf(hf_fixtures.tiny_hf_config("gemma3"))
  for field, value in (("query_scale", complex(0, -0.25)), ("embed_scale", -1.0), ("final_logit_softcap", 0.0),
                       ("attn_logit_softcap", float("nan"))):
    with pytest.raises(ValueError, match=rf"TransformerConfig.{field}=.* is invalid: expected None or a finite"):
      cfg.replace(**{field: value})


def test_unused_tensors_warn_and_ignorable_ones_do_not(loaded, caplog):
  sd = _state_dict(loaded.hf_model)
  if loaded.family == "gemma3":  # Multimodal layout: text under model.language_model, a vision tower beside it.
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in sd.items()}
    sd["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3, 2, 2), np.float32)
    sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]  # Tied and equal: ignorable.
  sd["model.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)
  with caplog.at_level(logging.WARNING, logger=hf_import.__name__):
    params = hf_import.params_from_state_dict(loaded.model.config, sd, source="sd.safetensors")
  assert not caplog.records, caplog.text
  _assert_trees_equal(params, loaded.params)
  sd["model.layers.0.extra.weight"] = np.zeros((3,), np.float32)
  if loaded.model.config.tie_embeddings:  # A tied checkpoint whose lm_head differs: ignored, but said.
    sd["lm_head.weight"] = np.ones((hf_fixtures.VOCAB[loaded.family], 64), np.float32)
  with caplog.at_level(logging.WARNING, logger=hf_import.__name__):
    hf_import.params_from_state_dict(loaded.model.config, sd, source="sd.safetensors")
  assert "model.layers.0.extra.weight" in caplog.text and "sd.safetensors" in caplog.text
  assert ("'lm_head.weight' differs" in caplog.text) == loaded.model.config.tie_embeddings


def _fake_gguf_module(hf_config, state_dict, tokenizer=None):
  module = types.ModuleType("spectral_soup.models.gguf_import")
  module.read_gguf = lambda path: (hf_config, state_dict)
  module.tokenizer_from_gguf = lambda path: tokenizer
  return module


def test_gguf_path_goes_through_gguf_import(llama_dir, tmp_path, monkeypatch):
  """from_pretrained("x.gguf") = gguf_import.read_gguf + the same conversion (gguf_import itself is faked)."""
  import spectral_soup.models
  hf_config = transformers.AutoConfig.from_pretrained(str(llama_dir), local_files_only=True)
  state = load_file(str(llama_dir / "model.safetensors"))
  fake = _fake_gguf_module(hf_config, state, tokenizer="the tokenizer")
  monkeypatch.setitem(sys.modules, "spectral_soup.models.gguf_import", fake)
  monkeypatch.setattr(spectral_soup.models, "gguf_import", fake, raising=False)
  gguf = tmp_path / "tiny.gguf"
  gguf.write_bytes(b"GGUF")
  model, params = hf_import.from_pretrained(gguf)
  _, expected = hf_import.load_hf_checkpoint(llama_dir)
  _assert_trees_equal(params, expected)
  assert model.config == hf_import.config_from_hf(hf_config)
  assert hf_import.tokenizer_from_pretrained(gguf) == "the tokenizer"
  state["model.norm.weight"] = state["model.norm.weight"][:-1]
  with pytest.raises(ValueError, match="tiny.gguf"):
    hf_import.from_pretrained(gguf)


def test_tokenizer_from_directory(tmp_path):
  import tokenizers
  vocab = {"[UNK]": 0, "hello": 1, "world": 2}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path))
  tokenizer = hf_import.tokenizer_from_pretrained(tmp_path)
  assert tokenizer("hello world there")["input_ids"] == [1, 2, 0]


# ---------------------------------------------------------------------------------------------------------------
# Configs.


def test_gemma3_config_mapping():
  hf = hf_fixtures.tiny_hf_config("gemma3")
  cfg = hf_import.config_from_hf(hf)
  assert cfg.layer_is_local == (True, False, True) and cfg.sliding_window == 4
  assert cfg.rope_local_base == 100.0 and cfg.rope_base == 1000.0 and cfg.rope_scale == 2.0
  assert cfg.query_scale == pytest.approx(24**-0.5) and cfg.final_logit_softcap == 6.0
  assert cfg.embed_scale == pytest.approx(8.0) and cfg.tie_embeddings and cfg.activation == "gelu_tanh"
  # Multimodal: the text_config, without the final softcap (Gemma3ForConditionalGeneration applies none).
  assert hf_import.config_from_hf(hf_fixtures.tiny_gemma3_multimodal_config()) == cfg.replace(final_logit_softcap=None)
  assert hf_import.config_from_hf(hf, dtype="bfloat16").dtype == "bfloat16"


def test_gpt2_and_llama_config_mapping():
  gpt2 = hf_import.config_from_hf(hf_fixtures.tiny_hf_config("gpt2"))
  assert (gpt2.max_len, gpt2.mlp_dim, gpt2.head_dim, gpt2.activation) == (64, 256, 16, "gelu_tanh")
  llama = hf_import.config_from_hf(hf_fixtures.tiny_hf_config("llama"))
  assert (llama.num_kv_heads, llama.rope_base, llama.tie_embeddings, llama.activation) == (2, 500.0, False, "silu")
  linear = hf_fixtures.tiny_hf_config("llama", rope_parameters={
      "rope_type": "linear",
      "rope_theta": 1e4,
      "factor": 4.0
  })
  assert hf_import.config_from_hf(linear).rope_scale == 4.0


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e4,
            "factor": 2.0
        }), "rope_type"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="relu"), "hidden_act"),
        # A stated null or string theta / factor ran with the default theta or the string's value (transformers' own
        # model fails on them): "rope_parameters.rope_theta=None is not supported: expected a finite number > 0".
        (dict(rope_parameters={
            "rope_type": "default",
            "rope_theta": None
        }), r"rope_theta=None is not supported: expected a finite number > 0"),
        (dict(rope_parameters={
            "rope_type": "default",
            "rope_theta": "10000"
        }), r"rope_theta='10000' is not supported: expected a finite number > 0"),
        (dict(rope_parameters={
            "rope_type": "linear",
            "rope_theta": 1e4,
            "factor": None
        }), r"factor=None is not supported: expected a finite number > 0"),
    ])
def test_unsupported_llama_features_raise(overrides, field):
  with pytest.raises(ValueError, match=field):
    hf_import.config_from_hf(hf_fixtures.tiny_hf_config("llama", **overrides))


def test_gemma3_attn_softcap_is_ignored_like_transformers(caplog):
  with caplog.at_level(logging.WARNING, logger=hf_config.__name__):
    cfg = hf_import.config_from_hf(hf_fixtures.tiny_hf_config("gemma3", attn_logit_softcapping=50.0))
  assert cfg.attn_logit_softcap is None and "attn_logit_softcapping" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs.


def test_missing_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    hf_import.from_pretrained(missing)


def test_pickle_only_directory_is_refused(tmp_path):
  (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle; must never be opened")
  with pytest.raises(ValueError, match="safetensors") as err:
    hf_import.from_pretrained(tmp_path)
  assert "pytorch_model.bin" in str(err.value)


def test_unsupported_model_type(tmp_path):
  transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32).save_pretrained(str(tmp_path))
  save_file({"embeddings.word_embeddings.weight": np.zeros((32, 16), np.float32)}, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match="'bert'") as err:
    hf_import.from_pretrained(tmp_path)
  assert "gemma3_text" in str(err.value)


def test_file_that_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "weights.npz"
  path.write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match="weights.npz"):
    hf_import.from_pretrained(path)
  with pytest.raises(ValueError, match=".gguf"):
    hf_import.tokenizer_from_pretrained(path)
