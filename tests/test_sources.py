"""Builder sources for basis training (`spectral_soup.offline.sources`): fixture files in the upstream schemas ->
TFDS builders -> tokenized pair arrays whose K label columns are the BT labels of the basis weightings."""

from __future__ import annotations

import copy
import math

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import train_basis_tiny
from spectral_soup.data import builders
from spectral_soup.offline import input_pipeline
from spectral_soup.offline import sources
import hf_fixtures
import test_builders as fixtures

tfds.disable_progress_bar()

CHAT_TEMPLATE, SPECIALS, byte_tokenizer = hf_fixtures.CHAT_TEMPLATE, hf_fixtures.SPECIALS, hf_fixtures.byte_tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Fixture files of every source, a saved tokenizer and one TFDS data directory shared by the tests."""
  root = tmp_path_factory.mktemp("sources")
  fixtures._write_jsonl(root / "uf" / "sharegpt.jsonl", fixtures._ultrafeedback_rows()[:1])
  fixtures._write_jsonl(root / "uf" / "flan.jsonl", fixtures._ultrafeedback_rows()[1:])
  fixtures._write_helpsteer(root / "hs")
  fixtures._write_psoups(root / "ps")
  byte_tokenizer(root / "tokenizer")
  return root


@pytest.fixture(scope="module")
def tokenizer(root):
  return sources.load_tokenizer(_config("psoups", root, num_bases=6))


ALL_TRAIN = {"validation_fraction": 0.0, "test_fraction": 0.0}
MANUAL = {"ultrafeedback": "uf", "helpsteer2": "hs", "psoups": "ps"}
DEFAULT_BUILDER_CONFIGS = {
    "ultrafeedback": {
        "base": "all",
        **ALL_TRAIN
    },
    "helpsteer2": {
        "base": "pairs"
    },
    "psoups": {
        "base": "default",
        **ALL_TRAIN
    }
}


def _config(source, root, *, num_bases, builder_config=None, **data):
  """train_basis_tiny with the builder-source fields of `config.data`."""
  config = train_basis_tiny.get_config()
  config.model.vocab_size = 512
  config.basis.num_bases = num_bases
  config.train.batch_size = 2
  config.train.eval_batch_size = 1
  d = config.data
  d.source = source
  d.data_dir = str(root / "tfds")
  d.manual_dir = str(root / MANUAL[source])
  d.builder_config = ml_collections.ConfigDict(builder_config or DEFAULT_BUILDER_CONFIGS[source])
  d.train_split = "train"
  d.eval_split = ""
  d.tokenizer = str(root / "tokenizer")
  d.chat_template = True
  d.attributes = ()
  d.weighting_alpha = 1.0
  d.label_margin = 0.0
  d.prompt_len = 64
  d.response_len = 16
  d.num_train_pairs = 100
  d.num_eval_pairs = 100
  for key, value in data.items():
    d[key] = value
  return config


def _builder_examples(config):
  """The builder's own examples of the train split (what `builder_pairs` must reproduce for one-hot bases)."""
  ds = builders.load_source(config.data.source, config.data.data_dir, manual_dir=config.data.manual_dir,
                            config=sources.builder_config(config), split="train")
  return [ds[i] for i in range(len(ds))]


def _assert_padding(arrays):
  """Prompts are left-padded, responses right-padded: every mask is one contiguous run at the right end / start."""
  for name in ("prompt_mask", "response_a_mask", "response_b_mask"):
    mask = arrays[name]
    count = mask.sum(1)
    expected = (np.arange(mask.shape[1])[None] >= mask.shape[1] -
                count[:, None]) if name == "prompt_mask" else (np.arange(mask.shape[1])[None] < count[:, None])
    np.testing.assert_array_equal(mask, expected, err_msg=name)
    assert (count > 0).all(), name


# ----------------------------------------------------------------------------------------------------------------
# Weightings and labels (pure numpy).


def test_source_attributes_match_the_builders():
  from spectral_soup.data.builders import helpsteer2, psoups, ultrafeedback
  assert sources.SOURCE_ATTRIBUTES == {
      "ultrafeedback": ultrafeedback.ATTRIBUTES,
      "helpsteer2": helpsteer2.ATTRIBUTES,
      "psoups": psoups.POLES
  }
  assert set(sources.BUILDER_SOURCES) <= set(builders.BUILDERS)


def test_weightings_one_hot_then_seeded_dirichlet():
  w = sources.attribute_weightings(30, 4, alpha=1.0, seed=3)
  assert w.shape == (30, 4) and w.dtype == np.float32
  np.testing.assert_array_equal(w[:4], np.eye(4))
  assert (w >= 0).all()
  np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
  assert len({tuple(row) for row in w.round(6)}) == 30  # Every basis is a distinct weighting.
  np.testing.assert_array_equal(w, sources.attribute_weightings(30, 4, alpha=1.0, seed=3))
  assert not np.allclose(w[4:], sources.attribute_weightings(30, 4, alpha=1.0, seed=4)[4:])
  np.testing.assert_array_equal(sources.attribute_weightings(4, 4, 1.0, 0), np.eye(4))
  with pytest.raises(ValueError, match="num_bases=3"):
    sources.attribute_weightings(3, 4, 1.0, 0)


def test_basis_labels_are_bt_labels_of_the_weighted_difference():
  d = np.asarray(
      [
          [1.0, -2.0, 0.0],
          [0.5, 0.5, np.nan],  # Attribute 2 missing.
          [0.0, 0.0, 0.0]
      ],
      np.float32)
  w = np.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0.2, 0.3, 0.5], [0.9, 0.1, 0]], np.float32)
  labels = sources.basis_labels(d, w)
  # One-hot rows: the per-attribute sign labels (ties and missing -> -1).
  np.testing.assert_array_equal(labels[:, :3], [[1, 0, -1], [1, 1, -1], [-1, -1, -1]])
  # Mixtures: the sign of w . d; a missing attribute only silences the bases that weight it.
  np.testing.assert_array_equal(labels[:, 3:], [[0, 0, 1], [1, -1, 1], [-1, -1, -1]])
  # A margin turns small weighted differences into ties.
  np.testing.assert_array_equal(
      sources.basis_labels(d, w, margin=0.6)[:, 3:], [[-1, -1, 1], [-1, -1, -1], [-1, -1, -1]])
  scores = sources.weighted(np.asarray([[3.0, np.nan, 1.0]], np.float32), w)
  np.testing.assert_allclose(scores, [[3.0, np.nan, 1.0, np.nan, np.nan, np.nan]])


def test_a_tie_of_the_builder_is_a_zero_difference_whatever_the_scores():
  """A builder config's tie_epsilon makes scores within it ties: they were trained as preferences (the difference
  of the scores decided)."""
  label = np.asarray([[-1, 1, -1]], np.int8)
  mask = np.asarray([[True, True, False]])
  scores_a, scores_b = np.asarray([[4.0, 4.0, 4.0]], np.float32), np.asarray([[3.0, 3.0, 3.0]], np.float32)
  d = sources.attribute_differences(scores_a, scores_b, label, mask)
  np.testing.assert_array_equal(d[:, :2], [[0.0, 1.0]])
  assert np.isnan(d[0, 2])
  np.testing.assert_array_equal(sources.basis_labels(d[:, :2], np.eye(2, dtype=np.float32)), [[-1, 1]])


def test_label_only_differences():
  label = np.asarray([[1, 0, -1, -1]], np.int8)
  mask = np.asarray([[True, True, True, False]])
  d = sources.attribute_differences(None, None, label, mask)
  np.testing.assert_array_equal(d[:, :3], [[1.0, -1.0, 0.0]])
  assert np.isnan(d[0, 3])


# ----------------------------------------------------------------------------------------------------------------
# Builders -> pair arrays.


def test_ultrafeedback_bases_on_weightings(root, tokenizer):
  config = _config("ultrafeedback", root, num_bases=7)
  train, held_out, metadata = sources.builder_pairs(config, tokenizer)
  k = 7
  assert input_pipeline.check_pairs(train, k, need_ratings=True) == 6  # 7 pairs; (r0, r3) is all ties: dropped.
  assert len(held_out["prompt"]) == 0 and held_out["labels"].shape == (0, k)
  assert train["labels"].dtype == np.int8 and train["prompt"].dtype == np.int32

  examples = [e for e in _builder_examples(config) if (e["label"] >= 0).any()]
  assert len(examples) == 6
  label = np.stack([e["label"] for e in examples])
  scores_a, scores_b = np.stack([e["scores_a"] for e in examples]), np.stack([e["scores_b"] for e in examples])
  # The first 4 bases are the attributes: the builder's own labels and ratings.
  np.testing.assert_array_equal(train["labels"][:, :4], label)
  np.testing.assert_array_equal(train["scores_a"][:, :4], scores_a)  # NaN where "N/A" (assert_array_equal: NaN == NaN).
  # Bases 4..6: the sign of w_k . (s_a - s_b), -1 where a weighted rating is missing.
  w = np.asarray(metadata["weightings"], np.float32)
  np.testing.assert_array_equal(w, sources.attribute_weightings(k, 4, 1.0, config.data.seed))
  assert metadata["attributes"] == list(sources.SOURCE_ATTRIBUTES["ultrafeedback"])
  for n in range(len(examples)):
    for j in range(4, k):
      value = float(np.dot(w[j], scores_a[n] - scores_b[n]))
      expected = -1 if math.isnan(value) or value == 0 else int(value > 0)
      assert train["labels"][n, j] == expected, (n, j)
      if not math.isnan(value):
        np.testing.assert_allclose(train["scores_a"][n, j], np.dot(w[j], scores_a[n]), rtol=1e-6)
  assert np.isnan(train["scores_a"][np.isnan(scores_a).any(1), 4:]).all()
  assert metadata["splits"]["train"] == {"in_split": 7, "read": 7, "kept": 6}
  assert metadata["builder_config"].startswith("all-")

  # Tokens: the chat-formatted prompt (left-padded) and each response followed by the end-of-sequence token.
  _assert_padding(train)
  prompt = tokenizer.decode(train["prompt"][0][train["prompt_mask"][0]])
  assert prompt == f"<|user|>{examples[0]['prompt'].decode()}<|end|><|assistant|>"
  response = train["response_a"][0][train["response_a_mask"][0]]
  assert response[-1] == tokenizer.eos_token_id
  assert tokenizer.decode(response[:-1]) == examples[0]["response_a"].decode()


def test_truncation_keeps_the_prompt_end_and_the_response_start(root, tokenizer):
  config = _config("ultrafeedback", root, num_bases=4, prompt_len=6, response_len=1)
  train, _, _ = sources.builder_pairs(config, tokenizer)
  assert train["prompt_mask"].all() and train["response_a_mask"].all()
  prompt = tokenizer.decode(train["prompt"][0])
  # The template's start stays (a cut from the left dropped the user header: a turn generation never shows).
  assert prompt.startswith("<|user|>") and prompt.endswith("<|end|><|assistant|>"), prompt
  assert (train["response_a"][:, 0] != tokenizer.eos_token_id).all()  # A cut response has no end token.
  assert sources.template_head(tokenizer) == 1
  assert sources.keep_prompt_end(range(10), 6, 2) == [0, 1, 6, 7, 8, 9]
  assert sources.keep_prompt_end(range(10), 6, 4) == [4, 5, 6, 7, 8, 9]  # A head above half the length: cut too.
  assert sources.keep_prompt_end(range(5), 6, 2) == [0, 1, 2, 3, 4]


def test_cut_prompts_and_responses_are_counted_in_a_warning(tokenizer, caplog):
  with caplog.at_level("WARNING"):
    sources.tokenize(tokenizer, ["a long prompt of many words", "hi"], ["same start, then a", "same start, then b"],
                     ["ok", "x"], prompt_len=6, response_len=4, chat_template=False)
  assert "1 of 2 prompts were longer than data.prompt_len=6 tokens" in caplog.text
  assert "2 of 4 responses longer than data.response_len=4" in caplog.text
  assert "1 of 2 pairs have two responses that are the same tokens within data.response_len=4" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    sources.tokenize(tokenizer, ["p"], ["same start, then a"], ["same start, then b"], prompt_len=6, response_len=4,
                     chat_template=False)
  assert "1 of 1 pairs have two responses that are the same tokens within data.response_len=4" in caplog.text


def test_a_tokenizer_without_an_end_token_is_warned_about(tokenizer, caplog):
  """No eos_token (a tokenizer.json without its tokenizer_config.json): responses were trained without an end
  token, silently, and the bases never learned to stop."""
  with caplog.at_level("WARNING"):
    sources.tokenize(tokenizer, ["p"], ["a"], ["b"], prompt_len=6, response_len=4, chat_template=False)
  assert "no end-of-sequence token" not in caplog.text
  without = copy.deepcopy(tokenizer)
  without.eos_token = None
  assert without.eos_token_id is None
  with caplog.at_level("WARNING"):
    out = sources.tokenize(without, ["p"], ["a"], ["b"], prompt_len=6, response_len=4, chat_template=False)
  assert "The tokenizer has no end-of-sequence token" in caplog.text and "do not learn to stop" in caplog.text
  assert out["response_a_mask"].sum() == len(without("a", add_special_tokens=False)["input_ids"])


def test_conflicting_subset_and_seeded_subsample(root, tokenizer):
  config = _config("ultrafeedback", root, num_bases=4, builder_config={"base": "conflicting", **ALL_TRAIN})
  train, _, metadata = sources.builder_pairs(config, tokenizer)
  labels = train["labels"]
  assert ((labels == 1).any(1) & (labels == 0).any(1)).all()  # Every pair has conflicting attributes.
  assert metadata["builder_config"].startswith("conflicting")

  config = _config("ultrafeedback", root, num_bases=4, num_train_pairs=3)
  first, _, metadata = sources.builder_pairs(config, tokenizer)
  again, _, _ = sources.builder_pairs(config, tokenizer)
  assert metadata["splits"]["train"]["read"] == 3 and len(first["prompt"]) <= 3
  for name in first:
    np.testing.assert_array_equal(first[name], again[name])


def test_helpsteer2_negated_attributes_ratings_and_eval_split(root, tokenizer):
  config = _config("helpsteer2", root, num_bases=2, attributes=("helpfulness", "-verbosity"),
                   builder_config={"base": "pairs"}, eval_split="validation")
  config.loss.kind = "ratings"
  train, held_out, metadata = sources.builder_pairs(config, tokenizer)
  assert metadata["attributes"] == ["helpfulness", "-verbosity"]
  input_pipeline.check_pairs(train, 2, need_ratings=True)
  examples = _builder_examples(config)
  assert len(train["prompt"]) == len(examples) == 2
  hs = sources.SOURCE_ATTRIBUTES["helpsteer2"]
  h, v = hs.index("helpfulness"), hs.index("verbosity")
  for n, e in enumerate(examples):
    assert train["labels"][n, 0] == e["label"][h]
    assert train["labels"][n, 1] == {1: 0, 0: 1, -1: -1}[int(e["label"][v])]  # Less verbose wins.
    np.testing.assert_array_equal(train["scores_a"][n], [e["scores_a"][h], -e["scores_a"][v]])
  assert len(held_out["prompt"]) == 1 and metadata["splits"]["validation"]["in_split"] == 1
  np.testing.assert_array_equal(held_out["scores_b"][0], [2.0, -1.0])  # "v1 r2": helpfulness 2, verbosity 1.


def test_psoups_label_only_poles(root, tokenizer, caplog):
  config = _config("psoups", root, num_bases=7)
  train, _, metadata = sources.builder_pairs(config, tokenizer)
  examples = [e for e in _builder_examples(config) if (e["label"] >= 0).any()]
  assert len(train["prompt"]) == len(examples) == 3
  np.testing.assert_array_equal(train["labels"][:, :6], np.stack([e["label"] for e in examples]))
  # No pair is annotated for every pole, so the Dirichlet basis (it weights all six) has no label: named in a
  # warning, as is every pole without a pair in these three.
  assert (train["labels"][:, 6] == -1).all()
  untaught = [k for k in range(7) if (train["labels"][:, k] == -1).all()]
  warned = [r.getMessage() for r in caplog.records if "has no training pair with a label" in r.getMessage()]
  assert len(warned) == len(untaught) >= 2 and "basis 6 (elementary: " in warned[-1], warned
  assert "it will stay at its initialization" in warned[-1]
  assert np.isnan(train["scores_a"]).all() and np.isnan(train["scores_b"]).all()
  assert metadata["attributes"] == list(sources.SOURCE_ATTRIBUTES["psoups"])


# ----------------------------------------------------------------------------------------------------------------
# Config errors name the field.


def test_builder_tie_epsilon_reaches_the_training_labels(root, tokenizer, tmp_path):
  """UltraFeedback with tie_epsilon=1: ratings one apart are the builder's ties; builder_pairs trained them as
  preferences of the higher-rated response."""
  rows = [{
      "instruction":
          f"Instruction {p}",
      "completions": [
          fixtures._completion("m0", f"first {p}", "4", "4", "4", "5"),
          fixtures._completion("m1", f"second {p}", "3", "3", "3", "3")
      ]
  } for p in range(4)]
  fixtures._write_jsonl(tmp_path / "uf" / "flan.jsonl", rows)
  config = _config("ultrafeedback", root, num_bases=4, data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "uf"),
                   builder_config={
                       "base": "all",
                       **ALL_TRAIN, "tie_epsilon": 1.0
                   })
  train, _, _ = sources.builder_pairs(config, tokenizer)
  np.testing.assert_array_equal(train["labels"], [[-1, -1, -1, 1]] * 4)  # Only helpfulness (5 vs 3) is no tie.
  np.testing.assert_array_equal(np.stack([e["label"] for e in _builder_examples(config)]), train["labels"])


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.data.update(attributes=("correctness",)), "data.attributes"),
        (lambda c: c.data.update(attributes=("honesty", "honesty")), "data.attributes"),
        (lambda c: c.data.update(eval_split="train"), "data.eval_split"),  # Held-out pairs were training pairs.
        (lambda c: c.data.update(train_split="train[:80%]"), "data.train_split"),  # Blamed a missing 'train' split.
        (lambda c: c.data.update(seed=-1), "data.seed"),  # A numpy error without the field.
        (lambda c: c.basis.update(num_bases=3), "basis.num_bases"),
        (lambda c: c.data.update(tokenizer=""), "data.tokenizer"),
        (lambda c: c.data.builder_config.update(base="nope"), "data.builder_config.base"),
        (lambda c: c.data.builder_config.update(pairs_per_prompt=0), "data.builder_config"),
        (lambda c: c.data.update(weighting_alpha=0.0), "data.weighting_alpha"),
        (lambda c: c.data.update(source="psoups", attributes=("concise",)) or c.data.builder_config.update(
            base="default") or c.loss.update(kind="ratings"), "loss.kind"),
    ])
def test_validate_config_names_the_field(root, change, field):
  config = _config("ultrafeedback", root, num_bases=4)
  change(config)
  with pytest.raises(ValueError, match=f"config.{field}="):
    sources.validate_config(config)


@pytest.mark.parametrize("name", ["prefs.json", "prefs.jsonl.gz", "folder"])
def test_a_source_file_that_is_not_jsonl_is_named_for_what_it_is(root, tmp_path, name):
  """A file or directory of pairs that is neither a .jsonl file nor a datasets directory: the message said only
  "expected one of ('ultrafeedback', 'helpsteer2', 'psoups')"."""
  path = tmp_path / name
  if name == "folder":
    path.mkdir()
    (path / "prefs.jsonl").write_text("{}\n")
  else:
    path.write_text("{}\n")
  config = _config("ultrafeedback", root, num_bases=4)
  config.data.source = str(path)
  kind = "directory" if name == "folder" else "file"
  with pytest.raises(
      ValueError, match=f"config.data.source=.*{name}' is invalid: expected a JSON-lines file named "
      rf"\.jsonl \(plain, not compressed\) or a directory written by datasets' save_to_disk \(this "
      f"{kind} is neither\\)"):
    sources.validate_config(config)


def test_helpsteer2_ratings_variant_is_rejected(root):
  config = _config("helpsteer2", root, num_bases=5, builder_config={"base": "ratings"})
  with pytest.raises(ValueError, match="config.data.builder_config='ratings'"):
    sources.validate_config(config)


def test_vocab_too_small_for_the_tokenizer(root, tokenizer):
  config = _config("ultrafeedback", root, num_bases=4)
  config.model.vocab_size = 100  # The byte tokenizer's ids reach ~260.
  with pytest.raises(ValueError, match="config.model.vocab_size=100"):
    sources.builder_pairs(config, tokenizer)


def test_too_few_pairs_for_one_batch(root, tokenizer):
  config = _config("helpsteer2", root, num_bases=5, builder_config={"base": "pairs"}, eval_split="validation")
  config.train.eval_batch_size = 2  # The validation file has one pair.
  with pytest.raises(ValueError, match="config.train.eval_batch_size=2 is invalid: helpsteer2/validation has only 1"):
    sources.builder_pairs(config, tokenizer)
  config.train.batch_size = 3  # Two training pairs.
  with pytest.raises(ValueError, match="config.train.batch_size=3"):
    sources.builder_pairs(config, tokenizer)


def test_basis_metadata_needs_no_data(root):
  config = _config("ultrafeedback", root, num_bases=30)
  config.data.data_dir = str(root / "never_built")
  meta = sources.basis_metadata(config)
  assert meta["source"] == "ultrafeedback" and len(meta["weightings"]) == 30
  assert not (root / "never_built").exists()
