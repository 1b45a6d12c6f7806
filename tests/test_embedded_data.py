"""The embedded preference data: prompts, labels, splits, tokenization, caching, and the shipped demo data (one batch
is sampled again with the embedded model and compared byte for byte)."""

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest

from configs import train_basis_embedded
from spectral_soup.data import embedded
from spectral_soup.data import rewards
from spectral_soup.offline import pairs as pairs_lib
from spectral_soup.offline import config_checks


def test_chitchat_questions_are_real_distinct_and_seeded():
  a = embedded.chitchat_questions(50, seed=0)
  assert a == embedded.chitchat_questions(50, seed=0)
  assert a != embedded.chitchat_questions(50, seed=1)
  assert len(set(a)) == 50 and all(q.endswith("?") and len(q.split()) >= 4 for q in a)
  with pytest.raises(ValueError, match="num_prompts"):
    embedded.chitchat_questions(10_000_000, seed=0)


def test_pair_labels_with_ties():
  a = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 2.0]], np.float32)
  b = np.array([[0.0, 0.0], [1.0, 0.01], [0.5, 0.0]], np.float32)
  labels = embedded.pair_labels(a, b, tie_margin=0.1)
  np.testing.assert_array_equal(labels, [[1, -1], [0, -1], [-1, 1]])


def test_split_is_a_deterministic_function_of_the_prompt():
  prompts = [f"question {i}?" for i in range(400)]
  splits = [embedded.split_of(p, 0.25) for p in prompts]
  assert splits == [embedded.split_of(p, 0.25) for p in prompts]
  assert 0.15 < splits.count("eval") / 400 < 0.35


def test_tokenize_pairs_formats_prompts_and_marks_ended_responses():
  from spectral_soup import models
  tokenizer = models.tokenizer_from_pretrained("embedded:smollm2")
  pairs = [{
      "prompt": "How are you?",
      "response_a": "Fine, thanks!",
      "response_b": "I am well.",
      "scores_a": [1.0, 0.2],
      "scores_b": [0.0, 0.9],
      "ended_a": True,
      "ended_b": False
  }]
  arrays = embedded.tokenize_pairs(pairs, tokenizer, prompt_len=64, response_len=8)
  assert arrays["prompt"].shape == (1, 64) and arrays["prompt_mask"][0, -1]
  prompt_text = tokenizer.decode(arrays["prompt"][0][arrays["prompt_mask"][0]])
  assert "<|im_start|>user\nHow are you?<|im_end|>" in prompt_text and prompt_text.endswith("assistant\n")
  a = arrays["response_a"][0][arrays["response_a_mask"][0]].tolist()
  b = arrays["response_b"][0][arrays["response_b_mask"][0]].tolist()
  assert a[-1] == tokenizer.eos_token_id and b[-1] != tokenizer.eos_token_id
  np.testing.assert_array_equal(arrays["labels"], [[1, 0]])


def test_embedded_training_config_validates_and_names_bad_fields():
  config = train_basis_embedded.get_config()
  config_checks.validate_config(config)
  config.model.path = ""
  with pytest.raises(ValueError, match="model.path"):
    config_checks.validate_config(config)
  config = train_basis_embedded.get_config()
  config.data.eval_fraction = 1.5
  with pytest.raises(ValueError, match="data.eval_fraction"):
    config_checks.validate_config(config)


def test_embedded_pairs_carry_ratings_standardized_on_the_training_split(monkeypatch):
  """loss.kind="ratings" trains on the attribute scores: z-scored with the training responses' statistics."""
  rng = np.random.default_rng(0)
  pairs = [{
      "prompt": f"What is question number {i}?",
      "response_a": "Yes.",
      "response_b": "No, never.",
      "scores_a": (rng.normal(size=5) * 10 + 3).tolist(),
      "scores_b": (rng.normal(size=5) * 10 + 3).tolist(),
      "ended_a": True,
      "ended_b": False
  } for i in range(40)]
  monkeypatch.setattr(embedded, "generate", lambda settings, root: "unused")
  monkeypatch.setattr(embedded, "load_pairs", lambda directory: (pairs, {}))
  config = train_basis_embedded.get_config()
  config.data.eval_fraction = 0.3
  train_split, eval_split = pairs_lib._embedded_pairs(config)
  assert len(train_split["scores_a"]) + len(eval_split["scores_a"]) == 40 and len(eval_split["scores_a"]) > 0
  both = np.concatenate([train_split["scores_a"], train_split["scores_b"]])
  np.testing.assert_allclose(both.mean(0), 0.0, atol=1e-5)
  np.testing.assert_allclose(both.std(0), 1.0, atol=1e-4)
  raw = np.asarray([p["scores_a"] for p in pairs])
  is_eval = np.asarray([embedded.split_of(p["prompt"], 0.3) == "eval" for p in pairs])
  # Same order, same affine map per attribute on both splits.
  ratio = (eval_split["scores_a"] - train_split["scores_a"][:1]) / (raw[is_eval] - raw[~is_eval][:1])
  np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:1], ratio.shape), rtol=1e-4)
  # data.num_train_pairs / num_eval_pairs keep the first pairs of each split (they were ignored).
  config.data.num_train_pairs, config.data.num_eval_pairs = 5, 2
  few_train, few_eval = pairs_lib._embedded_pairs(config)
  np.testing.assert_array_equal(few_train["scores_a"], train_split["scores_a"][:5])
  np.testing.assert_array_equal(few_eval["scores_a"], eval_split["scores_a"][:2])


@pytest.mark.parametrize("damage, problem", [
    (lambda line: line[:40], r"line 3: not valid JSON"),
    (lambda line: line.replace('"scores_a": [', '"scores_a": [1e400, '), r"line 3: field 'scores_a' is .*expected 5 "
     "finite"),
    (lambda line: line.replace('"response_b"', '"response_c"'), r"line 3: field 'response_b' is None"),
])
def test_a_damaged_embedded_dataset_names_its_file_and_line(tmp_path, damage, problem):
  shipped = glob.glob(os.path.join(os.path.dirname(embedded.__file__), "shipped", "*", ""))[0]
  shutil.copytree(shipped, tmp_path / "data")
  path = tmp_path / "data" / "pairs.jsonl"
  lines = path.read_text().splitlines()
  lines[2] = damage(lines[2])
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"pairs\.jsonl, " + problem + ".*damaged; regenerate it"):
    embedded.load_pairs(str(tmp_path / "data"))


@pytest.mark.parametrize("dev", [False, True])
def test_held_out_pairs_do_not_move_the_training_labels(monkeypatch, dev):
  """The tie margin is in standard deviations of the training responses: rescaling held-out scores changes no
  training label (it changed about one in eight when the deviations were taken over all pairs)."""
  from spectral_soup import models
  tokenizer = models.tokenizer_from_pretrained("embedded:smollm2")
  rng = np.random.default_rng(1)
  pairs = [{
      "prompt": f"What is question number {i}?",
      "response_a": "Yes.",
      "response_b": "No.",
      "scores_a": rng.normal(size=5).tolist(),
      "scores_b": rng.normal(size=5).tolist(),
  } for i in range(120)]
  monkeypatch.setattr(embedded, "generate", lambda settings, root: "unused")
  config = train_basis_embedded.get_config()
  config.data.eval_fraction, config.data.tie_margin = 0.3, 0.5

  def labels(scale):
    held_out = [embedded.split_of(p["prompt"], 0.3) == "eval" for p in pairs]
    scaled = [{
        **p,
        **{
            f"scores_{s}": [v * (scale if out else 1.0) for v in p[f"scores_{s}"]] for s in "ab"
        }
    } for p, out in zip(pairs, held_out)]
    monkeypatch.setattr(embedded, "load_pairs", lambda directory: (scaled, {}))
    data = pairs_lib.embedded_data(config, tokenizer, dev=dev)
    train = ~data.is_eval
    expected = embedded.pair_labels(data.arrays["scores_a"][train], data.arrays["scores_b"][train], 0.5)
    np.testing.assert_array_equal(data.arrays["labels"][train], expected)
    return data.arrays["labels"][train]

  np.testing.assert_array_equal(labels(3.0), labels(1.0))


# ---------------------------------------------------------------------------------------------------------------
# generate: caching and rescoring, with a stand-in for the language model.

_WORDS = ("the", "mitochondria", "synthesize", "energy", "well", "you", "know", "so", "on", "and", "quickly", "cat")


class _FakeTokenizer:
  """Whitespace tokens; ids 2.. decode to `_WORDS`."""

  pad_token_id, eos_token_id = 0, 1

  def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    del tokenize, add_generation_prompt
    return " | ".join(f"{m['role']}: {m['content']}" for m in messages)

  def __call__(self, text, add_special_tokens):
    del add_special_tokens
    return {"input_ids": [2 + sum(map(ord, w)) % len(_WORDS) for w in text.split()]}

  def decode(self, ids, skip_special_tokens):
    del skip_special_tokens
    return " ".join(_WORDS[i - 2] for i in ids if i >= 2)


class _NoSampling(Exception):
  """Raised by the stand-in model when a test expects nothing to be sampled."""


def _fake_lm(monkeypatch):
  """Replaces the model, tokenizer, decoder and prompt source used by `generate`; returns the list of decode calls.

  The fake decoder is a deterministic function of the padded prompts and the PRNG key, so two runs with the same
  settings sample the same responses. Some rows end with the end-of-turn token, some are empty.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top

  calls = []

  def decode(logits_fn, params, tokens, mask, cache, key, *, max_new_tokens, sampling, eos_id, pad_id):
    del logits_fn, params, mask, cache, sampling, pad_id
    calls.append(tokens.shape)
    rng = np.random.default_rng([int(np.asarray(tokens).sum()), *np.asarray(jax.random.key_data(key)).tolist()])
    out = rng.integers(2, 2 + len(_WORDS), size=(tokens.shape[0], max_new_tokens))
    lengths = rng.integers(0, max_new_tokens + 1, size=tokens.shape[0])
    for i in np.flatnonzero((lengths > 0) & (rng.random(tokens.shape[0]) < 0.5)):
      out[i, lengths[i] - 1] = eos_id
    return out, {"lengths": lengths}

  monkeypatch.setenv("SPECTRAL_SOUP_PROGRESS", "0")
  monkeypatch.setattr(embedded, "chitchat_questions",
                      lambda num, seed: [f"What is question {seed}-{i}?" for i in range(num)])
  model = type("Model", (), {"config": models.TransformerConfig()})()  # Its shapes: the decode meter's cost model.
  monkeypatch.setattr(models, "from_pretrained", lambda name: (model, {}))
  monkeypatch.setattr(models, "tokenizer_from_pretrained", lambda name: _FakeTokenizer())
  monkeypatch.setattr(models, "init_cache", lambda *args: None)
  monkeypatch.setattr(decoding, "model_logits_fn", lambda model: None)
  monkeypatch.setattr(decoding, "decode", decode)
  return calls


def _refuse_sampling(monkeypatch):
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise _NoSampling("generate tried to sample")

  monkeypatch.setattr(models, "from_pretrained", refuse)
  monkeypatch.setattr(decoding, "decode", refuse)


def test_generate_rescores_cached_responses_when_only_the_attributes_change(tmp_path, monkeypatch):
  calls = _fake_lm(monkeypatch)
  root = str(tmp_path / "cache")
  old = embedded.GenerationSettings(num_prompts=6, batch_size=4, max_new_tokens=12, attributes=("verbosity",))
  new = dataclasses.replace(old, attributes=("verbosity", "density"))
  source = embedded.generate(old, root)
  assert len(calls) == 3  # 12 responses in batches of 4
  sampled = embedded.generate(new, str(tmp_path / "elsewhere"))  # What sampling writes for `new`.
  assert len(calls) == 6

  _refuse_sampling(monkeypatch)
  rescored = embedded.generate(new, root)
  assert rescored == os.path.join(root, f"embedded_prefs-{new.key()}") != source
  pairs, metadata = embedded.load_pairs(rescored)
  source_pairs, source_metadata = embedded.load_pairs(source)
  for field in ("prompt", "response_a", "response_b", "hint_a", "hint_b", "ended_a", "ended_b"):
    assert [p[field] for p in pairs] == [p[field] for p in source_pairs], field
  prompts = [p["prompt"] for p in pairs for _ in "ab"]
  responses = [p[f"response_{side}"] for p in pairs for side in "ab"]
  assert "" in responses and len(set(responses)) > 6  # the stand-in sampled varied responses, some empty
  scores = np.asarray([p[f"scores_{side}"] for p in pairs for side in "ab"], np.float32)
  np.testing.assert_array_equal(scores, rewards.RewardSuite(["verbosity", "density"])(prompts, responses))
  assert all(p["attributes"] == ["verbosity", "density"] for p in pairs)
  assert metadata["rescored_from"] == os.path.basename(source) and "rescored_from" not in source_metadata
  assert metadata["sampling_seconds"] == source_metadata["sampling_seconds"]

  # Byte for byte what sampling writes, but for the provenance fields of the metadata.
  with open(os.path.join(rescored, "pairs.jsonl")) as a, open(os.path.join(sampled, "pairs.jsonl")) as b:
    assert a.read() == b.read()
  _, sampled_metadata = embedded.load_pairs(sampled)
  assert metadata["decoding"] == source_metadata["decoding"]  # the sampling's speed, measured when it ran
  for m in (metadata, sampled_metadata):
    del m["sampling_seconds"], m["decoding"]
  assert metadata.pop("rescored_from") and metadata == sampled_metadata

  assert embedded.generate(new, root) == rescored  # Now cached as is.
  # A third attribute set is rescored from the sampled dataset, not from the rescored one.
  third = embedded.generate(dataclasses.replace(old, attributes=("density",)), root)
  assert embedded.load_pairs(third)[1]["rescored_from"] == os.path.basename(source)
  assert not [name for name in os.listdir(root) if name.startswith(".")]  # no temporary directories left

  # Any other change samples again, and so does force=True.
  for changed in (dict(seed=1), dict(max_new_tokens=13), dict(style_hints=("",))):
    with pytest.raises(_NoSampling):
      embedded.generate(dataclasses.replace(new, **changed), root)
  with pytest.raises(_NoSampling):
    embedded.generate(dataclasses.replace(old, attributes=("formality",)), root, force=True)
  with pytest.raises(ValueError, match="unknown reward attribute"):
    embedded.generate(dataclasses.replace(old, attributes=("helpfulness",)), root)


def _replace_keeping_size_and_mtime(path, data: bytes):
  """Writes `data` (of the file's size) over `path` and restores its modification time, as `cp -p` would."""
  stat = os.stat(path)
  assert len(data) == stat.st_size
  with open(path, "wb") as f:
    f.write(data)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_model_replaced_at_the_same_path_is_another_dataset(tmp_path, monkeypatch):
  """A local checkpoint replaced in place, even keeping its size and modification time, samples again (it used to
  return the old model's responses, cached under the path's name); an unchanged one reuses its dataset, also
  when rescored, and the embedded models' keys do not depend on any file."""
  calls = _fake_lm(monkeypatch)
  root = str(tmp_path / "cache")
  model = tmp_path / "model"
  model.mkdir()
  (model / "model.safetensors").write_bytes(b"a" * 64)
  (model / "config.json").write_text("{}")
  settings = embedded.GenerationSettings(model=str(model), num_prompts=6, batch_size=4, max_new_tokens=12,
                                         attributes=("verbosity",))
  first = embedded.generate(settings, root)
  assert len(calls) == 3 and embedded.generate(settings, root) == first and len(calls) == 3
  assert embedded.load_pairs(first)[1]["model_digest"] == embedded.model_digest(str(model))
  rescored = embedded.generate(dataclasses.replace(settings, attributes=("density",)), root)
  assert len(calls) == 3 and embedded.load_pairs(rescored)[1]["rescored_from"] == os.path.basename(first)

  _replace_keeping_size_and_mtime(model / "model.safetensors", b"b" * 64)
  second = embedded.generate(settings, root)
  assert second != first and len(calls) == 6
  rescored_again = embedded.generate(dataclasses.replace(settings, attributes=("density",)), root)
  assert rescored_again != rescored and len(calls) == 6  # Rescored, from the responses of these files.
  assert embedded.load_pairs(rescored_again)[1]["rescored_from"] == os.path.basename(second)
  assert embedded.model_digest("embedded:smollm2") is None
  assert "model_digest" not in json.dumps(dataclasses.asdict(embedded.GenerationSettings()))


def test_an_unreadable_cached_dataset_is_moved_aside_and_generated_again(tmp_path, monkeypatch, caplog):
  calls = _fake_lm(monkeypatch)
  root = str(tmp_path / "cache")
  settings = embedded.GenerationSettings(num_prompts=6, batch_size=4, max_new_tokens=12, attributes=("verbosity",))
  out = embedded.generate(settings, root)
  with open(os.path.join(out, "pairs.jsonl")) as f:
    text = f.read()
  with open(os.path.join(out, "pairs.jsonl"), "w") as f:
    f.write(text[:len(text) // 2])  # Truncated mid-line: not JSON.
  assert embedded.generate(settings, root) == out
  assert len(calls) == 6  # Sampled again, not a crash at every restart.
  assert len(embedded.load_pairs(out)[0]) == 6
  aside = [name for name in os.listdir(root) if ".unreadable-" in name]
  assert len(aside) == 1 and aside[0] in caplog.text


def test_one_batch_regenerates_alone_as_in_the_whole_dataset(tmp_path, monkeypatch):
  """`regenerate_batch` samples batch j with batch j's key and the whole dataset's prompt padding."""
  _fake_lm(monkeypatch)
  settings = embedded.GenerationSettings(num_prompts=7, batch_size=4, max_new_tokens=12, attributes=("verbosity",))
  pairs, _ = embedded.load_pairs(embedded.generate(settings, str(tmp_path)))
  for index in range(4):  # 14 rows in batches of 4: the last batch holds one pair.
    assert embedded.regenerate_batch(settings, index) == pairs[2 * index:2 * index + 2]
  with pytest.raises(ValueError, match="index=4"):
    embedded.regenerate_batch(settings, 4)
  with pytest.raises(ValueError, match="even"):
    embedded.regenerate_batch(dataclasses.replace(settings, batch_size=3), 0)


def _demo_settings():
  from configs import demo  # pylint: disable=g-import-not-at-top
  return embedded.settings_from_config(demo.get_config())


def test_the_demo_reads_its_shipped_data_without_sampling(tmp_path, monkeypatch):
  settings = _demo_settings()
  shipped = embedded.shipped_dataset(settings)
  assert shipped == os.path.join(embedded.SHIPPED_ROOT, f"embedded_prefs-{settings.key()}")
  _refuse_sampling(monkeypatch)
  root = str(tmp_path / "cache")
  assert embedded.generate(settings, root) == shipped and not os.path.exists(root)
  pairs, metadata = embedded.load_pairs(shipped)
  assert len(pairs) == settings.num_prompts == metadata["num_pairs"]
  assert {
      k: metadata[k] for k in ("num_prompts", "seed", "max_new_tokens", "temperature", "top_p", "batch_size")
  } == {
      k: getattr(settings, k) for k in ("num_prompts", "seed", "max_new_tokens", "temperature", "top_p", "batch_size")
  }
  # Another attribute set rescores the shipped responses into the cache, without sampling.
  other = dataclasses.replace(settings, attributes=("verbosity", "sentiment"))
  rescored = embedded.generate(other, root)
  assert rescored.startswith(root)
  again, again_metadata = embedded.load_pairs(rescored)
  assert [p["response_b"] for p in again] == [p["response_b"] for p in pairs]
  np.testing.assert_array_equal([p["scores_a"] for p in again], np.asarray([p["scores_a"] for p in pairs])[:, [1, 2]])
  assert again_metadata["rescored_from"] == os.path.basename(shipped)
  with pytest.raises(_NoSampling):  # force=True samples, shipped data or not.
    embedded.generate(settings, root, force=True)


def test_the_shipped_demo_data_regenerate_byte_identically():
  """The first batch of the shipped demo data, sampled again with the package's own sampler and rewards."""
  settings = _demo_settings()
  records = embedded.regenerate_batch(settings, 0)
  with open(os.path.join(embedded.shipped_dataset(settings), "pairs.jsonl")) as f:
    lines = f.read().splitlines()
  assert len(records) == settings.batch_size // 2 == 64
  for i, record in enumerate(records):
    assert json.dumps(record) == lines[i], (
        f"pair {i} of the shipped demo data differs from the one sampled now: the sampler, the prompts, the hints or "
        "the rewards changed (regenerate the shipped data: spectral_soup/data/shipped/README.md), or this CPU rounds "
        "differently from the one that wrote it")


def test_a_sampling_that_cannot_fit_is_refused_before_it_decodes(monkeypatch):
  """data.max_new_tokens beyond the model's positions, or with generation_batch_size beyond memory: one error naming
  the fields before the decode (9,000 tokens ran out of memory in it, 4,000 were killed by the kernel)."""
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.utils import memory  # pylint: disable=g-import-not-at-top
  cfg = models.TransformerConfig(max_len=256)
  settings = embedded.GenerationSettings(max_new_tokens=250, batch_size=8)
  with pytest.raises(
      ValueError, match=r"config.data.max_new_tokens=250 is invalid: expected <= 196, the model's "
      r"max_len=256 positions less the longest sampling prompt's 60 tokens"):
    embedded.check_sampling_fits(settings, cfg, prompt_len=60)
  settings = dataclasses.replace(settings, max_new_tokens=196)
  embedded.check_sampling_fits(settings, cfg, prompt_len=60)
  from spectral_soup.models import cost  # pylint: disable=g-import-not-at-top
  need = cost.decode_memory_bytes(cfg, 8, 256, caches_per_row=2)
  monkeypatch.setattr(memory, "memory_limit_bytes", lambda: need - 1)
  with pytest.raises(
      ValueError, match=r"config.data.max_new_tokens=196 with config.data.generation_batch_size=8 is "
      r"invalid: sampling needs at least .* GiB \(two KV caches of 8 rows x 256 positions"):
    embedded.check_sampling_fits(settings, cfg, prompt_len=60)
  monkeypatch.setattr(memory, "memory_limit_bytes", lambda: need)
  embedded.check_sampling_fits(settings, cfg, prompt_len=60)
