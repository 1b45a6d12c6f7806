"""`ss.export_hf`: one user's soup of LoRA or head bases, trained by the CLI on a tiny Llama checkpoint, written as a
Hugging Face checkpoint that transformers (PyTorch) loads, with the JAX soup's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import spectral_soup as ss
from spectral_soup import export
from spectral_soup import models
from spectral_soup import soup
from spectral_soup.models.transformer import Transformer
from spectral_soup.models.spectral import group_targets, split_lora_params
from spectral_soup.soup.parameters import soup_lora_concat
import hf_fixtures

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = np.array([[7, 40, 41, 99, 5, 200, 17, 3, 250, 12]], np.int32)
LAM = np.array([0.7, -0.3, 1.2], np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny random Llama (vocabulary 512) with a byte-level tokenizer in the same directory."""
  path = tmp_path_factory.mktemp("llama")
  hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama", vocab_size=512), path)
  hf_fixtures.byte_tokenizer(path)
  return str(path)


def _train(checkpoint, workdir, *overrides):
  env = dict(os.environ, SPECTRAL_SOUP_PROGRESS="0", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py", f"--workdir={workdir}",
      f"--config.model.path={checkpoint}", "--config.train.num_steps=40", "--config.train.tensorboard=False",
      "--config.optim.warmup_steps=5", *overrides
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return ss.load_basis(str(workdir))


def _hf_logits(directory):
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_a_lora_soup_exports_as_merged_weights(checkpoint, tmp_path):
  basis = _train(checkpoint, tmp_path / "lora", "--config.basis.kind=lora", "--config.train.cache_features=False",
                 "--config.optim.learning_rate=0.01")
  assert np.abs(np.asarray(basis.params["lora"]["q_proj_b"])).max() > 1e-4  # Trained adapters, not zeros.
  out = ss.export_hf(basis, LAM, str(tmp_path / "export"))
  assert {"model.safetensors", "config.json", "tokenizer.json", "soup.json"} <= set(os.listdir(out))
  got = _hf_logits(out)
  # The JAX parameter soup: the backbone with the exact rank-K*r adapter sum_k lam_k a_k b_k.
  exported = transformers.AutoConfig.from_pretrained(out)
  assert exported.tie_word_embeddings == basis.policy.config.tie_embeddings
  assert exported.architectures == ["LlamaForCausalLM"]  # Tools that pick the class from config.json find it.
  backbone = basis.params["features"]["backbone"]
  lora = group_targets(soup_lora_concat(split_lora_params(basis.params["lora"]), LAM))
  want, _ = Transformer(basis.policy.config).apply({"params": backbone}, TOKENS, lora=lora)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)
  # Not the reference: the soup moved the logits.
  ref, _ = Transformer(basis.policy.config).apply({"params": backbone}, TOKENS)
  assert np.abs(got - np.asarray(ref)).max() > 1e-3
  # The checkpoint reads back through the package too, and names what it holds.
  reloaded, params = models.from_pretrained(out)
  again, _ = reloaded.apply({"params": params}, TOKENS)
  np.testing.assert_allclose(np.asarray(again), np.asarray(want), atol=1e-4, rtol=1e-4)
  with open(os.path.join(out, "soup.json")) as f:
    assert json.load(f)["bases"] == list(basis.names)


def test_a_head_soup_exports_as_an_untied_output_layer(checkpoint, tmp_path, monkeypatch):
  basis = _train(checkpoint, tmp_path / "heads", "--config.basis.kind=heads", "--config.basis.head_rank=4")
  out = ss.export_hf(basis, LAM, str(tmp_path / "export"))
  assert transformers.AutoConfig.from_pretrained(out).tie_word_embeddings is False
  ref_logits, basis_logits, _ = basis.policy.apply({"params": basis.params}, TOKENS)
  want = soup.soup_logits(ref_logits, basis_logits, LAM)  # The explicit soup's normalized log-probs.
  np.testing.assert_allclose(_log_softmax(_hf_logits(out)), np.asarray(want), atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(want) - _log_softmax(ref_logits)).max() > 1e-3
  # The special tokens are the tokenizer's (LlamaConfig's defaults are bos 1, eos 2; this tokenizer's are not), so
  # transformers' generate stops where Basis.generate does.
  tokenizer = basis.tokenizer
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) != (1, 2)
  for read in (transformers.AutoConfig.from_pretrained, transformers.GenerationConfig.from_pretrained):
    config = read(out)
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
  # An earlier export is replaced whole; any other non-empty directory, or a file, is refused before writing.
  (tmp_path / "export" / "stale.txt").write_text("from before")
  ss.export_hf(basis, LAM * 0.5, out)
  assert "stale.txt" not in os.listdir(out)
  with open(os.path.join(out, "soup.json")) as f:
    np.testing.assert_allclose(json.load(f)["lam"], LAM * 0.5, rtol=1e-6)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match="is not empty and holds no earlier export"):
    ss.export_hf(basis, LAM, str(tmp_path / "other"))
  assert os.listdir(tmp_path / "other") == ["notes.txt"]
  with pytest.raises(ValueError, match="is a file: expected a new or empty directory"):
    ss.export_hf(basis, LAM, str(tmp_path / "other" / "notes.txt"))
  # A file named soup.json does not make a directory an export (it was replaced whole, notes and all); nor does an
  # export's soup.json alone.
  for soup_json in ("my soup recipe", (tmp_path / "export" / "soup.json").read_text()):
    (tmp_path / "other" / "soup.json").write_text(soup_json)
    with pytest.raises(ValueError, match=r"is not empty and holds no earlier export \(its soup.json"):
      ss.export_hf(basis, LAM, str(tmp_path / "other"))
    assert sorted(os.listdir(tmp_path / "other")) == ["notes.txt", "soup.json"]
  os.remove(tmp_path / "other" / "soup.json")
  # A name the file system cannot hold with the temporary directory's suffix: refused before anything is made.
  with pytest.raises(ValueError, match=r"its name is 250 bytes long: expected at most"):
    ss.export_hf(basis, LAM, str(tmp_path / "new_parent" / ("n" * 250)))
  assert not (tmp_path / "new_parent").exists()
  # A write that fails names what it was writing and leaves the directory as it was (no partial export).
  before = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)}

  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")

  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(safetensors.numpy, "save_file", fail)
  with pytest.raises(OSError, match="writing model.safetensors of .* failed: .*No space left"):
    ss.export_hf(basis, LAM, out)
  assert {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["export", "heads", "other"]  # No temporary directory left behind.
  monkeypatch.undo()
  nested = ss.export_hf(basis, LAM, str(tmp_path / "exports" / "user_7"))  # Missing parents are created.
  assert sorted(os.listdir(nested)) == sorted(os.listdir(out))
  # Through a link (exports/latest -> user_7): the target is replaced, the link stays, nothing is left beside it.
  os.symlink("user_7", tmp_path / "exports" / "latest")
  ss.export_hf(basis, LAM * 2, str(tmp_path / "exports" / "latest"))
  assert os.path.islink(tmp_path / "exports" / "latest")
  assert sorted(os.listdir(tmp_path / "exports")) == ["latest", "user_7"]
  with open(tmp_path / "exports" / "user_7" / "soup.json") as f:
    np.testing.assert_allclose(json.load(f)["lam"], LAM * 2, rtol=1e-6)
  with pytest.raises(ValueError, match=r"lam must be numbers of shape \[K=3\], got <U3 values \['0.5'"):
    ss.export_hf(basis, ["0.5", "0.3", "0.2"], out)
  with pytest.raises(ValueError, match=r"got bool values \[True, False, False\]"):
    ss.export_hf(basis, [True, False, False], out)


def test_what_cannot_be_exported_exactly_is_refused(checkpoint, tmp_path):
  basis = _train(checkpoint, tmp_path / "bias", "--config.basis.kind=heads", "--config.basis.head_rank=0",
                 "--config.basis.logit_bias=True")
  with pytest.raises(ValueError, match="cannot export logit-bias bases"):
    ss.export_hf(basis, LAM, str(tmp_path / "export"))
  assert not (tmp_path / "export").exists()  # Refused before anything is written.
  # [K] only: the message offered a [U, 3] lam, which export_hf refuses.
  with pytest.raises(ValueError, match=r"lam has shape \(2,\): expected \[K=3\], one weight per basis"):
    ss.export_hf(basis, LAM[:2], str(tmp_path / "export"))
  with pytest.raises(ValueError, match=r"lam\[0\] is nan: expected finite weights"):
    ss.export_hf(basis, [np.nan, 0.0, 0.0], str(tmp_path / "export"))
  with pytest.raises(ValueError, match="exports one user's soup"):
    ss.export_hf(basis, np.stack([LAM, LAM]), str(tmp_path / "export"))


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
  """Tiny random Gemma 3 (local and global layers, linear rope scaling on the global ones) and GPT-2 (untied output
  layer) checkpoints, vocabulary 512, each with the byte-level tokenizer."""
  paths = {}
  for family, overrides in (("gemma3", {"final_logit_softcapping": None}), ("gpt2", {"tie_word_embeddings": False})):
    path = tmp_path_factory.mktemp(family)
    hf_fixtures.save_hf_model(hf_fixtures.build_hf_model(family, vocab_size=512, **overrides), path)
    hf_fixtures.byte_tokenizer(path)
    paths[family] = str(path)
  return paths


# Head soups share the output-layer path of every family (Llama's is tested above); GPT-2's packing is tested with both.
@pytest.mark.parametrize("family,kind", [("gemma3", "lora"), ("gpt2", "lora"), ("gpt2", "heads")])
def test_gemma3_and_gpt2_soups_export_and_read_back_as_the_same_architecture(family_checkpoints, tmp_path, family,
                                                                             kind):
  extra = (["--config.basis.kind=lora", "--config.train.cache_features=False", "--config.optim.learning_rate=0.01"]
           if kind == "lora" else ["--config.basis.kind=heads", "--config.basis.head_rank=4"])
  basis = _train(family_checkpoints[family], tmp_path / kind, *extra)
  cfg = basis.policy.config
  assert cfg.family == family
  if family == "gemma3":
    assert any(cfg.local_layers) and cfg.rope_scale == 2.0
  out = ss.export_hf(basis, LAM, str(tmp_path / "export"))
  exported = transformers.AutoConfig.from_pretrained(out)
  assert exported.model_type == {"gemma3": "gemma3_text", "gpt2": "gpt2"}[family]
  # Tools that pick the model class from config.json's "architectures" (vLLM, TGI) find the causal-LM class.
  assert exported.architectures == [{"gemma3": "Gemma3ForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]]
  # The exported config reads back as this basis's architecture (untied output layer for a head soup).
  tie = cfg.tie_embeddings and kind == "lora"
  read_back = models.config_from_hf(exported).replace(dtype=cfg.dtype, weight_dtype=cfg.weight_dtype, remat=cfg.remat)
  assert read_back == cfg.replace(tie_embeddings=tie)
  got = _hf_logits(out)
  backbone = basis.params["features"]["backbone"]
  if kind == "lora":
    lora = group_targets(soup_lora_concat(split_lora_params(basis.params["lora"]), LAM))
    want, _ = Transformer(cfg).apply({"params": backbone}, TOKENS, lora=lora)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)
    ref, _ = Transformer(cfg).apply({"params": backbone}, TOKENS)
    assert np.abs(got - np.asarray(ref)).max() > 1e-3
  else:
    ref_logits, basis_logits, _ = basis.policy.apply({"params": basis.params}, TOKENS)
    want = soup.soup_logits(ref_logits, basis_logits, LAM)
    np.testing.assert_allclose(_log_softmax(got), np.asarray(want), atol=1e-4, rtol=1e-4)
    assert np.abs(np.asarray(want) - _log_softmax(ref_logits)).max() > 1e-3


def test_families_and_caps_that_cannot_hold_a_soup_are_refused_by_name(tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  from spectral_soup.models.config import TransformerConfig  # pylint: disable=g-import-not-at-top
  gemma = models.config_from_hf(hf_fixtures.tiny_hf_config("gemma3"))  # final_logit_softcapping=6.
  mistral = models.config_from_hf(hf_fixtures.tiny_hf_config("mistral"))
  gpt2 = models.config_from_hf(hf_fixtures.tiny_hf_config("gpt2"))
  assert isinstance(gemma, TransformerConfig) and gemma.final_logit_softcap == 6.0

  def fake(cfg, kind):
    policy = types.SimpleNamespace(config=cfg, basis_kind=kind)
    return types.SimpleNamespace(policy=policy, config=types.SimpleNamespace(basis={}), num_bases=3,
                                 names=("a", "b", "c"))

  # A Llama with another activation than SiLU keeps it under transformers' name (it was written under ours, and
  # neither transformers nor this package could load the export).
  llama = models.config_from_hf(hf_fixtures.tiny_hf_config("llama")).replace(activation="gelu_tanh")
  written = export._hf_config(llama, tie_embeddings=False)  # pylint: disable=protected-access
  assert written.hidden_act == "gelu_pytorch_tanh" and models.config_from_hf(written).activation == "gelu_tanh"
  cases = [(fake(gemma, "heads"), "final logit softcap"), (fake(mistral, "lora"), "sliding window"),
           (fake(gpt2.replace(final_logit_softcap=3.0), "lora"), "GPT2Config cannot hold")]
  for basis, message in cases:
    with pytest.raises(ValueError, match=message):
      ss.export_hf(basis, LAM, str(tmp_path / "export"))
  assert not (tmp_path / "export").exists()


def test_an_export_that_bases_were_trained_on_is_not_replaced(tmp_path):
  """Bases trained on an earlier export read it as their backbone (`model.path`): exporting a soup over it passed the
  check for earlier exports and swapped the backbone under the bases."""
  import types  # pylint: disable=g-import-not-at-top

  def an_export(name):
    folder = tmp_path / name
    folder.mkdir()
    for file in ("model.safetensors", "config.json"):
      (folder / file).write_text("{}")
    (folder / "soup.json").write_text(json.dumps({"lam": [1.0], "bases": ["a"], "basis_kind": "lora", "step": 1}))
    return folder

  earlier, tokenizer = an_export("earlier_export"), an_export("tokenizer_export")
  config = {"model": {"path": str(earlier)}, "data": {"tokenizer": str(tokenizer)}, "basis": {}}
  basis = types.SimpleNamespace(config=config, num_bases=3, names=("a", "b", "c"))
  for target, field in ((earlier, "model.path"), (tokenizer, "data.tokenizer")):
    with pytest.raises(ValueError, match=rf"is or holds config\.{field}=.*which loading this basis reads"):
      ss.export_hf(basis, LAM, str(target))
  assert sorted(os.listdir(earlier)) == ["config.json", "model.safetensors", "soup.json"]
  # Inside the run's checkpoints: read back as a damaged step, then deleted by the run's next resume.
  (tmp_path / "run" / "checkpoints" / "300").mkdir(parents=True)
  basis.directory = str(tmp_path / "run")
  for target in ("checkpoints/1000", "checkpoints/300/x"):
    with pytest.raises(ValueError, match=r"is inside the training run's checkpoints .* which the run reads and "
                       "prunes"):
      ss.export_hf(basis, LAM, str(tmp_path / "run" / target))


def test_what_a_killed_export_left_is_cleared_and_the_previous_export_restored(tmp_path):
  """A kill while writing left a hidden copy of the whole model beside out_dir; a kill between the two renames left
  no out_dir and the previous export hidden. The next export of out_dir clears the first and restores the second;
  a live process's leftovers are not touched."""
  dead = subprocess.Popen(["true"])
  dead.wait()
  out = tmp_path / "user_7"
  partial = tmp_path / f".user_7.tmp-{dead.pid}-abc"
  previous = tmp_path / f".user_7.old-{dead.pid}-def"
  live = tmp_path / f".user_7.tmp-{os.getpid()}-ghi"
  for folder in (partial, previous, live):
    folder.mkdir()
  (partial / "model.safetensors").write_bytes(b"half")
  for name in ("model.safetensors", "config.json"):
    (previous / name).write_text("{}")
  (previous / "soup.json").write_text(json.dumps({"lam": [1.0], "bases": ["a"], "basis_kind": "lora", "step": 1}))
  touched = export._clear_abandoned(str(out))  # pylint: disable=protected-access
  assert sorted(touched) == sorted([str(partial), str(previous)])
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "soup.json"]
  assert sorted(os.listdir(tmp_path)) == [live.name, "user_7"]


def test_the_documented_workflow_on_the_tiny_config(tmp_path):
  """What the README documents, end to end on `configs/train_basis_tiny.py` as it ships (its character tokenizer,
  LoRA bases): train by the CLI, load, serve two users in one call, fit a user's lam, export and reload."""
  basis = _train("", tmp_path / "tiny", "--config.basis.kind=lora", "--config.train.cache_features=False")
  texts = basis.generate("how are you?", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], max_new_tokens=8)
  assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
  prompts = ["how are you?", "tell me a story."] * 5
  reference = np.zeros(basis.num_bases)
  a = basis.generate(prompts, reference, temperature=1.0, seed=1, max_new_tokens=8)
  b = basis.generate(prompts, reference, temperature=1.0, seed=2, max_new_tokens=8)
  features = basis.features(prompts, a) - basis.features(prompts, b)
  prefs = (features[:, 0] > 0).astype(np.float32)  # A user whose reward is basis 0's.
  lam = np.asarray(ss.fit_lambda(features, prefs, l2=1.0, constraint="box", box=(0.0, 10.0)))
  out = ss.export_hf(basis, lam, str(tmp_path / "export"))
  tokens, _ = basis.encode_prompts(["how are you?"])
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  with torch.no_grad():
    got = hf(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
  lora = group_targets(soup_lora_concat(split_lora_params(basis.params["lora"]), lam))
  want, _ = Transformer(basis.policy.config).apply({"params": basis.params["features"]["backbone"]}, tokens, lora=lora)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)
  assert transformers.AutoTokenizer.from_pretrained(out).decode(tokens[0]) == "<|user|>how are you?<|end|><|assistant|>"


def test_a_resume_on_a_backbone_replaced_at_the_same_path_is_refused(tmp_path):
  """Bases trained on one checkpoint are not resumed on another written over it at the same path (it resumed and
  kept the old bases); the same weights again are accepted."""
  path = tmp_path / "llama"
  hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama", seed=1, vocab_size=512), path)
  hf_fixtures.byte_tokenizer(path)
  _train(str(path), tmp_path / "run", "--config.train.num_steps=4", "--config.optim.warmup_steps=1")
  for name in os.listdir(path):  # Another model of the same architecture, in place.
    if name.endswith(".safetensors"):
      os.remove(path / name)
  hf_fixtures.save_hf_model(hf_fixtures.build_hf_model("llama", seed=2, vocab_size=512), path)
  env = dict(os.environ, SPECTRAL_SOUP_PROGRESS="0", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py",
      f"--workdir={tmp_path / 'run'}", f"--config.model.path={path}", "--config.train.num_steps=4",
      "--config.train.tensorboard=False", "--config.optim.warmup_steps=1"
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "is not the one the checkpoint of step 4" in result.stderr and "a new --workdir" in result.stderr
