"""TFDS builders of the preference sources: build from small fixture files, read back as array_record, no TF."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from spectral_soup.data import builders
from spectral_soup.data.builders import common
from spectral_soup.data.builders import psoups

tfds.disable_progress_bar()

# ----------------------------------------------------------------------------------------------------------------
# Fixture writers (upstream schemas).


def _write_jsonl(path, rows, compress=False):
  """Writes rows (dicts, or raw strings written verbatim as a line) as JSON lines."""
  path.parent.mkdir(parents=True, exist_ok=True)
  lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8")
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(lines)
  else:
    path.write_bytes(lines)
  return path


ATTRS = ["helpful", "concise", "safe"]


def _embedded_row(prompt, a, b, sa, sb):
  return {"prompt": prompt, "response_a": a, "response_b": b, "scores_a": sa, "scores_b": sb, "attributes": ATTRS}


def _embedded_rows(num_prompts=12):
  rows = []
  for p in range(num_prompts):
    rows.append(_embedded_row(f"prompt {p}", f"a{p}.0", f"b{p}.0", [1.0, 0.0, 0.5], [0.0, 1.0, 0.5]))
    rows.append(_embedded_row(f"prompt {p}", f"a{p}.1", f"b{p}.1", [0.2, 0.3, 0.9], [0.1, 0.3, 1.0]))
  return rows


def _write_embedded(directory, rows, metadata=None):
  _write_jsonl(directory / "pairs.jsonl", rows)
  (directory / "metadata.json").write_text(json.dumps(metadata or {"attributes": ATTRS, "seed": 7, "k": 3}))
  return directory


def _rating(value):
  return {"Rating": value, "Rationale": "..."}


def _completion(model, response, if_, hon, tru, hel):
  return {
      "model": model,
      "response": response,
      "principle": "helpfulness",
      "custom_system_prompt": "",
      "annotations": {
          "instruction_following": _rating(if_),
          "honesty": _rating(hon),
          "truthfulness": {
              **_rating(tru), "Type": ["0"],
              "Rationale For Rating": "."
          },
          "helpfulness": {
              **_rating(hel), "Type": ["1", "2"],
              "Rationale For Rating": "."
          }
      }
  }


def _ultrafeedback_rows():
  q1 = {
      "source":
          "sharegpt",
      "instruction":
          "Plan a trip to Cairo.",
      "models": ["m0", "m1", "m2", "m3"],
      "correct_answers": ["None"],
      "incorrect_answers": ["None"],
      "completions": [
          _completion("m0", "r0", "2", "3", "3", "3"),
          _completion("m1", "r1", "5", "N/A", "5", "5"),
          _completion("m2", "r2", "4", "5", "2", "3"),
          _completion("m3", "r3", "2", "3", "3", "3")
      ]
  }
  # Annotations given as a list of dicts (averaged); one conflicting pair: r4 better IF, r5 better honesty.
  c4 = _completion("m4", "r4", "5", "1", "3", "4")
  c4["annotations"]["instruction_following"] = [_rating("5"), _rating("3")]  # -> 4
  q2 = {
      "source": "flan",
      "instruction": "Translate 'hello'.",
      "completions": [c4, _completion("m5", "r5", "2", "4", "3", "4")]
  }
  q3 = {
      "source": "flan",
      "instruction": "Only one completion.",
      "completions": [_completion("m6", "r6", "1", "1", "1", "1")]
  }
  return [q1, q2, q3]


def _helpsteer_row(prompt, response, h, c1, c2, c3, v):
  return {
      "prompt": prompt,
      "response": response,
      "helpfulness": h,
      "correctness": c1,
      "coherence": c2,
      "complexity": c3,
      "verbosity": v
  }


def _write_helpsteer(directory, train_rows=None):
  train_rows = train_rows or [
      _helpsteer_row("p1", "p1 r1", 3, 3, 4, 1, 1),
      _helpsteer_row("p1", "p1 r2", 4, 3, 3, 2, 0),
      _helpsteer_row("p2 <extra_id_1>Assistant\nhi<extra_id_1>User\nmore", "p2 r1", 2, 2, 2, 2, 2),
      _helpsteer_row("p2 <extra_id_1>Assistant\nhi<extra_id_1>User\nmore", "p2 r2", 0, 1, 3, 2, 4),
      _helpsteer_row("p3 single", "p3 r1", 4, 4, 4, 4, 4),
  ]
  _write_jsonl(directory / "train.jsonl.gz", train_rows, compress=True)
  _write_jsonl(directory / "validation.jsonl.gz",
               [_helpsteer_row("v1", "v1 r1", 1, 1, 1, 1, 1),
                _helpsteer_row("v1", "v1 r2", 2, 1, 0, 1, 1)], compress=True)
  pref = {
      "three_most_similar_preferences": [],
      "all_preferences_unprocessed": [],
      "preference_statement": "s",
      "preference_elaboration": "e"
  }
  _write_jsonl(directory / "preference" / "preference.jsonl.gz", [
      {
          **pref, "split": "train",
          "prompt": "p1",
          "response_1": "p1 r1",
          "response_2": "p1 r2",
          "preference_strength": 2
      },
      {
          **pref, "split": "train",
          "prompt": "p2",
          "response_1": "p2 r1",
          "response_2": "p2 r2",
          "preference_strength": -3
      },
      {
          **pref, "split": "val",
          "prompt": "v1",
          "response_1": "v1 r1",
          "response_2": "v1 r2",
          "preference_strength": 0
      },
  ], compress=True)
  return directory


def _write_psoups(directory):
  rm = directory / "data" / "rm_training"
  rm.mkdir(parents=True)
  # P1A (elementary): RLPHF reward-model schema as a JSON array, completion_a preferred.
  (rm / "P1A.json").write_text(
      json.dumps([
          {
              "user_input": "Explain gravity.",
              "completion_a": "Things fall down.",
              "completion_b": "Spacetime curves."
          },
          {
              "user_input": "What is 2+2?",
              "completion_a": "Four!",
              "completion_b": "The sum is 4 by Peano axioms."
          },
      ]))
  # P1B (knowledgeable): the same pairs, opposite winners, JSON lines.
  _write_jsonl(rm / "p1b_rm.jsonl", [
      {
          "user_input": "Explain gravity.",
          "completion_a": "Spacetime curves.",
          "completion_b": "Things fall down."
      },
  ])
  # P3A (friendly): AlpacaFarm annotation schema with a tie.
  _write_jsonl(rm / "alpaca_gpt4_P3A.jsonl", [
      {
          "instruction": "Explain gravity.",
          "input": "",
          "output_1": "Things fall down.",
          "output_2": "Spacetime curves.",
          "preference": 1.5
      },
      {
          "instruction": "Say hi",
          "input": "to Bob",
          "output_1": "Hi Bob!",
          "output_2": "Greetings.",
          "preference": 1
      },
  ])
  (rm / "P3C.json").write_text(json.dumps([{"user_input": "x", "completion_a": "y", "completion_b": "z"}]))
  return directory


def _read_all(ds):
  return [ds[i] for i in range(len(ds))]


def _s(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------------------------------------------------
# Embedded preferences.

_SPLIT_CONFIG = {"validation_fraction": 0.3, "test_fraction": 0.3}


def test_embedded_prefs_roundtrip_and_splits(tmp_path):
  source = _write_embedded(tmp_path / "src", _embedded_rows(20))
  data_dir = tmp_path / "tfds"
  config = builders.make_config("embedded_prefs", **_SPLIT_CONFIG)
  builder = builders.get_builder("embedded_prefs", data_dir, config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
  assert builder.info.file_format.value == "array_record"
  assert builder.info.metadata["attributes"] == ATTRS
  assert builder.info.metadata["source_metadata"]["seed"] == 7
  assert builder.info.metadata["malformed_rows"]["count"] == 0

  seen = {}
  total = 0
  for split in builder.info.splits:
    ds = builders.load_source("embedded_prefs", data_dir, config=config, split=split)
    examples = _read_all(ds)
    total += len(examples)
    for ex in examples:
      prompt = _s(ex["prompt"])
      assert seen.setdefault(prompt, split) == split, "pairs of one prompt straddle splits"
      assert split == common.split_for_prompt(prompt, 0.3, 0.3, "spectral_soup")
      assert ex["scores_a"].dtype == np.float32 and ex["label"].dtype == np.int8 and ex["mask"].dtype == bool
      assert ex["mask"].all()
      if _s(ex["response_a"]).endswith(".0"):
        np.testing.assert_array_equal(ex["label"], [1, 0, -1])  # a better, b better, tie.
      else:
        np.testing.assert_array_equal(ex["label"], [1, -1, 0])
  assert total == 40 and len(seen) == 20
  assert set(builder.info.splits) == {"train", "validation", "test"}  # 20 prompts at 40/30/30: 13/3/4.

  # Determinism: an independent build elsewhere assigns every prompt to the same split, same examples.
  other = builders.get_builder("embedded_prefs", tmp_path / "tfds2", config)
  other.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
  for split in builder.info.splits:
    a = [_s(e["response_a"]) for e in _read_all(builder.as_data_source(split))]
    b = [_s(e["response_a"]) for e in _read_all(other.as_data_source(split))]
    assert a == b


@pytest.mark.parametrize("name", sorted(builders.BUILDERS))
def test_constructing_a_builder_leaves_no_temporary_directory(tmp_path, monkeypatch, name):
  # TFDS's own DatasetInfo looks for the dataset in its public bucket and leaks an empty temporary directory per
  # builder constructed before its data exist; these builders' data are never there.
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", os.fspath(scratch))
  builder = builders.get_builder(name, tmp_path / "tfds")
  assert builder.info.splits == {}  # Not prepared: nothing restored, nothing precomputed.
  assert list(scratch.iterdir()) == []


def test_embedded_prefs_tie_epsilon_and_source_path(tmp_path):
  source = _write_embedded(tmp_path / "src", _embedded_rows(2))
  ds_config = lambda src: {
      "source_path": os.fspath(src / "pairs.jsonl"),
      "tie_epsilon": 0.15,
      "validation_fraction": 0.0,
      "test_fraction": 0.0
  }
  ds = builders.load_source("embedded_prefs", tmp_path / "tfds", split="train[:100%]", config=ds_config(source))
  labels = {_s(e["response_a"]): e["label"].tolist() for e in _read_all(ds)}
  assert labels == {"a0.0": [1, 0, -1], "a1.0": [1, 0, -1], "a0.1": [-1, -1, -1], "a1.1": [-1, -1, -1]}
  builder = builders.get_builder("embedded_prefs", tmp_path / "tfds", ds_config(source))
  with pytest.raises(ValueError, match=r"split 'train\[:0\]' selects no examples"):  # TFDS: "Paths sequence ...".
    builder.as_data_source("train[:0]")


@pytest.mark.parametrize(
    "bad_row, field",
    [
        ({
            "prompt": "p",
            "response_a": "a",
            "scores_a": [1, 2, 3],
            "scores_b": [1, 2, 3],
            "attributes": ATTRS
        }, "response_b"),  # Missing field.
        ({
            **_embedded_row("p", "a", "b", [1, 2, 3], [1, 2, 3]), "scores_a": "high"
        }, "scores_a"),  # Wrong type.
        ('{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": [1, NaN, 3], "scores_b": [1, 2, 3], '
         '"attributes": ["helpful", "concise", "safe"]}', "scores_a[1]"),  # NaN score.
        (_embedded_row("p", "a", "  ", [1, 2, 3], [1, 2, 3]), "response_b"),  # Empty response.
        ({
            **_embedded_row("p", "a", "b", [1, 2, 3], [1, 2, 3]), "attributes": ["x", "y", "z"]
        }, "attributes"),
        ('{"prompt": "p", ', "<json>"),  # Truncated line.
        (_embedded_row("p", "a", "b", [1e39, 0, 0], [2e39, 1, 0]), "scores_a[0]"),  # Beyond float32: inf.
        ('{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": [1, 2, 3], "scores_b": [1, 2, 1' +
         "0" * 400 + '], "attributes": ["helpful", "concise", "safe"]}', "scores_b[2]"),  # An integer beyond float64.
        (_embedded_row("p\ud800", "a", "b", [1, 2, 3], [1, 2, 3]), "prompt"),  # Lone surrogate (hash would fail).
        (_embedded_row("p", "a", "b\udc80", [1, 2, 3], [1, 2, 3]), "response_b"),  # Lone surrogate (TFDS would fail).
    ])
def test_malformed_row_error_names_file_row_and_field(tmp_path, bad_row, field):
  rows = _embedded_rows(1)
  rows.insert(2, bad_row)  # Line 3 of pairs.jsonl.
  source = _write_embedded(tmp_path / "src", rows)
  with pytest.raises(builders.MalformedRowError) as info:
    builders.load_source("embedded_prefs", tmp_path / "tfds", manual_dir=source)
  error = info.value
  assert isinstance(error, ValueError)
  assert (error.path, error.row, error.field) == (os.fspath(source / "pairs.jsonl"), 3, field)
  assert "pairs.jsonl" in str(error) and "row 3" in str(error) and f"'{field}'" in str(error)
  assert not (tmp_path / "tfds").exists()  # Nothing left behind: not even empty directories or config records.


def test_a_failed_build_removes_only_what_it_created(tmp_path):
  """A failed build into a data directory that holds other datasets leaves them as they were."""
  data_dir = tmp_path / "tfds"
  (data_dir / "other_dataset" / "1.0.0").mkdir(parents=True)
  (data_dir / "other_dataset" / "1.0.0" / "data.bin").write_bytes(b"x")
  (data_dir / "empty_before").mkdir()
  before = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*"))
  rows = _embedded_rows(1)
  rows.insert(2, '{"prompt": "p", ')
  with pytest.raises(builders.MalformedRowError):
    builders.load_source("embedded_prefs", data_dir, manual_dir=_write_embedded(tmp_path / "src", rows))
  assert sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*")) == before


def test_skip_malformed_counts_and_stores_in_metadata(tmp_path):
  rows = _embedded_rows(3)
  rows[1] = {**rows[1], "scores_b": [1.0, float("nan"), 0.0]}
  rows.insert(3, "not json")
  rows.append(_embedded_row("p", "", "b", [1, 2, 3], [1, 2, 3]))
  source = _write_embedded(tmp_path / "src", rows)
  config = {"skip_malformed": True, "validation_fraction": 0.0, "test_fraction": 0.0}
  ds = builders.load_source("embedded_prefs", tmp_path / "tfds", manual_dir=source, config=config)
  assert len(ds) == 5
  # A fresh builder reads the stored metadata back from disk.
  builder = builders.get_builder("embedded_prefs", tmp_path / "tfds", config)
  assert builder.is_prepared()
  malformed = builder.info.metadata["malformed_rows"]
  assert malformed["count"] == 3 and malformed["by_file"] == {"pairs.jsonl": 3}
  assert any("row 4" in m and "'<json>'" in m for m in malformed["first_messages"])
  assert builder.info.metadata["num_source_rows"] == 8


def test_missing_sources_name_the_expected_file_and_upstream(tmp_path):
  with pytest.raises(builders.SourceNotFoundError, match=r"pairs\.jsonl"):
    builders.load_source("embedded_prefs", tmp_path / "tfds", manual_dir=tmp_path / "nowhere")
  with pytest.raises(builders.SourceNotFoundError, match=r"openbmb/UltraFeedback"):
    builders.load_source("ultrafeedback", tmp_path / "tfds")  # Default manual dir: data_dir/downloads/manual.
  (tmp_path / "only_pairs").mkdir()
  _write_jsonl(tmp_path / "only_pairs" / "pairs.jsonl", _embedded_rows(1))
  with pytest.raises(builders.SourceNotFoundError, match=r"metadata\.json"):
    builders.load_source("embedded_prefs", tmp_path / "tfds", manual_dir=tmp_path / "only_pairs")
  (tmp_path / "unrelated").mkdir()
  (tmp_path / "unrelated" / "notes.txt").write_text("x")
  with pytest.raises(builders.SourceNotFoundError, match=r"train\.jsonl\.gz.*nvidia/HelpSteer2"):
    builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=tmp_path / "unrelated")
  with pytest.raises(builders.SourceNotFoundError, match=r"P1A.*joeljang/RLPHF"):
    builders.load_source("psoups", tmp_path / "tfds", manual_dir=tmp_path / "unrelated")


# ----------------------------------------------------------------------------------------------------------------
# UltraFeedback.

_ALL_TRAIN = {"validation_fraction": 0.0, "test_fraction": 0.0}


def _by_pair(ds):
  return {(_s(e["response_a"]), _s(e["response_b"])): e for e in _read_all(ds)}


def test_ultrafeedback_pairs_na_and_conflicting(tmp_path):
  manual = tmp_path / "manual"
  _write_jsonl(manual / "sharegpt.jsonl", _ultrafeedback_rows()[:1])
  _write_jsonl(manual / "flan.jsonl.gz", _ultrafeedback_rows()[1:], compress=True)
  _write_jsonl(manual / "pairs.jsonl", _embedded_rows(1))  # Not an UltraFeedback file: ignored.
  ds = builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=manual, config=_ALL_TRAIN)
  pairs = _by_pair(ds)
  assert len(pairs) == 6 + 1  # C(4, 2) + C(2, 2); the single-completion instruction gives none.

  # Attribute order: instruction_following, honesty, truthfulness, helpfulness.
  e = pairs[("r0", "r1")]
  np.testing.assert_array_equal(e["scores_a"], [2, 3, 3, 3])
  assert math.isnan(e["scores_b"][1])
  np.testing.assert_array_equal(e["label"], [0, -1, 0, 0])
  np.testing.assert_array_equal(e["mask"], [True, False, True, True])  # "N/A" honesty.
  e = pairs[("r0", "r3")]
  np.testing.assert_array_equal(e["label"], [-1, -1, -1, -1])  # All ties.
  assert e["mask"].all()
  e = pairs[("r4", "r5")]
  np.testing.assert_array_equal(e["scores_a"], [4, 1, 3, 4])  # List annotation averaged.
  np.testing.assert_array_equal(e["label"], [1, 0, -1, -1])
  assert (_s(e["source"]), _s(e["model_a"]), _s(e["model_b"])) == ("flan", "m4", "m5")

  builder = builders.get_builder("ultrafeedback", tmp_path / "tfds", _ALL_TRAIN)
  meta = builder.info.metadata
  assert meta["source_files"] == ["flan.jsonl.gz", "sharegpt.jsonl"]
  assert meta["num_prompts_without_pairs"] == 1 and meta["num_missing_ratings"] == 1

  conflicting = _by_pair(
      builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=manual, config={
          "base": "conflicting",
          **_ALL_TRAIN
      }))
  expected = {k for k, e in pairs.items() if common.has_conflict(e["label"], e["mask"])}
  assert set(conflicting) == expected and ("r4", "r5") in expected and ("r0", "r2") in expected
  assert ("r0", "r1") not in expected  # r1 better or N/A everywhere.

  config = {"pairs_per_prompt": 2, **_ALL_TRAIN}
  first = _by_pair(builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=manual, config=config))
  again = _by_pair(builders.load_source("ultrafeedback", tmp_path / "tfds_again", manual_dir=manual, config=config))
  assert set(first) == set(again) and len(first) == 2 + 1 and set(first) <= set(pairs)


@pytest.mark.parametrize("rating, problem", [("abc", "not a number"), ("NaN", "finite"), ("7", "outside")])
def test_ultrafeedback_malformed_rating(tmp_path, rating, problem):
  rows = _ultrafeedback_rows()
  rows[0]["completions"][2]["annotations"]["honesty"]["Rating"] = rating
  _write_jsonl(tmp_path / "manual" / "ultrafeedback" / "part.jsonl", rows)
  with pytest.raises(builders.MalformedRowError, match=problem) as info:
    builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=tmp_path / "manual")
  assert (info.value.row, info.value.field) == (1, "completions[2].annotations.honesty.Rating")
  assert info.value.path.endswith("ultrafeedback/part.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# HelpSteer2.


def test_helpsteer2_ratings_pairs_and_preference(tmp_path):
  manual = _write_helpsteer(tmp_path / "manual")
  ratings = builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual)
  assert len(ratings) == 5
  by_response = {_s(e["response"]): e for e in _read_all(ratings)}
  np.testing.assert_array_equal(by_response["p1 r2"]["scores"], [4, 3, 3, 2, 0])
  assert "<extra_id_1>" in _s(by_response["p2 r1"]["prompt"])
  assert len(builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual, split="validation")) == 2

  pairs = _by_pair(builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual, config="pairs"))
  assert set(pairs) == {("p1 r1", "p1 r2"), ("p2 r1", "p2 r2")}
  np.testing.assert_array_equal(pairs[("p1 r1", "p1 r2")]["label"], [0, -1, 1, 0, 1])
  np.testing.assert_array_equal(pairs[("p2 r1", "p2 r2")]["label"], [1, 1, 0, -1, 0])
  assert pairs[("p1 r1", "p1 r2")]["mask"].all()
  builder = builders.get_builder("helpsteer2", tmp_path / "tfds", "pairs")
  assert "test" not in builder.info.splits

  pref = _by_pair(builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual, config="preference"))
  assert pref[("p1 r1", "p1 r2")]["label"].tolist() == [0]  # Positive strength: response_2 better.
  assert pref[("p2 r1", "p2 r2")]["label"].tolist() == [1]
  assert int(pref[("p2 r1", "p2 r2")]["preference_strength"]) == -3
  val = _read_all(
      builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual, config="preference", split="validation"))
  assert [(e["label"].tolist(), e["mask"].tolist()) for e in val] == [([-1], [True])]  # A tie.


def test_helpsteer2_malformed_rating(tmp_path):
  rows = [
      _helpsteer_row("p1", "r1", 3, 3, 3, 3, 3), {
          **_helpsteer_row("p1", "r2", 3, 3, 3, 3, 3), "coherence": "3"
      },
      _helpsteer_row("p1", "r3", 3, 5, 3, 3, 3)
  ]
  manual = _write_helpsteer(tmp_path / "manual", rows)
  with pytest.raises(builders.MalformedRowError, match=r"train\.jsonl\.gz: row 2: field 'coherence'"):
    builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual)
  ds = builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=manual, config={"skip_malformed": True})
  assert len(ds) == 1
  builder = builders.get_builder("helpsteer2", tmp_path / "tfds", {"skip_malformed": True})
  assert builder.info.metadata["malformed_rows"]["count"] == 2


# ----------------------------------------------------------------------------------------------------------------
# P-SOUPS.


def test_psoups_merges_poles(tmp_path):
  manual = _write_psoups(tmp_path / "manual")
  ds = builders.load_source("psoups", tmp_path / "tfds", manual_dir=manual, config=_ALL_TRAIN)
  examples = _read_all(ds)
  assert len(examples) == 3
  poles = psoups.POLES
  for e in examples:
    a, b = _s(e["response_a"]), _s(e["response_b"])
    labels = dict(zip(poles, e["label"].tolist()))
    masked = {p for p, m in zip(poles, e["mask"].tolist()) if m}
    if {a, b} == {"Things fall down.", "Spacetime curves."}:
      simple_is_a = a == "Things fall down."
      assert masked == {"elementary", "knowledgeable", "friendly"}
      assert labels["elementary"] == (1 if simple_is_a else 0)
      assert labels["knowledgeable"] == (0 if simple_is_a else 1)
      assert labels["friendly"] == -1  # Tie (preference 1.5), still annotated.
      assert labels["concise"] == -1
    elif _s(e["prompt"]) == "Say hi\n\nto Bob":
      assert masked == {"friendly"} and labels["friendly"] == (1 if a == "Hi Bob!" else 0)
    else:
      assert _s(e["prompt"]) == "What is 2+2?" and masked == {"elementary"}
  builder = builders.get_builder("psoups", tmp_path / "tfds", _ALL_TRAIN)
  assert builder.info.metadata["ignored_files"] == ["P3C.json"]
  assert builder.info.metadata["source_files"]["P1B"] == ["p1b_rm.jsonl"]
  # Registered with TFDS: tfds.data_source builds (as array_record, the builders' default) and reads too.
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual))
  ds = tfds.data_source("spectral_soup_psoups", data_dir=os.fspath(tmp_path / "tfds_default"), split="train",
                        download_and_prepare_kwargs={"download_config": download_config})
  assert len(ds) >= 1
  assert list((tmp_path / "tfds_default" / "spectral_soup_psoups" / "default" / "1.0.0").glob("*.array_record*"))


def test_psoups_malformed_row(tmp_path):
  manual = _write_psoups(tmp_path / "manual")
  _write_jsonl(manual / "data" / "rm_training" / "p2a.jsonl", [{
      "user_input": "q",
      "completion_a": "x",
      "completion_b": "y"
  }, {
      "user_input": "q",
      "completion_a": 3
  }])
  with pytest.raises(builders.MalformedRowError, match=r"p2a\.jsonl: row 2: field 'completion_a'"):
    builders.load_source("psoups", tmp_path / "tfds", manual_dir=manual)


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_a_row_that_repeats_a_key_is_malformed_not_read_with_the_last_value(tmp_path, layout):
  manual = _write_psoups(tmp_path / "manual")
  rows = [
      '{"user_input": "q", "completion_a": "x", "completion_b": "y"}',
      '{"user_input": "q", "completion_a": "A", "completion_a": "B", "completion_b": "C"}'
  ]
  name, text = ("p2a.jsonl", "\n".join(rows)) if layout == "jsonl" else ("P2A.json", "[" + ",\n".join(rows) + "]")
  (manual / "data" / "rm_training" / name).write_text(text)
  with pytest.raises(builders.MalformedRowError, match=rf"{name}: row 2: field 'completion_a': the key appears twice"):
    builders.load_source("psoups", tmp_path / "tfds", manual_dir=manual)


def test_a_json_array_file_with_a_byte_order_mark_is_read_as_an_array(tmp_path):
  manual = _write_psoups(tmp_path / "manual")
  path = manual / "data" / "rm_training" / "P1A.json"
  path.write_bytes(b"\xef\xbb\xbf" + json.dumps(json.loads(path.read_text()), indent=1).encode())  # Pretty-printed.
  ds = builders.load_source("psoups", tmp_path / "tfds", manual_dir=manual, config=_ALL_TRAIN)
  plain = builders.load_source("psoups", tmp_path / "tfds_plain", manual_dir=_write_psoups(tmp_path / "plain"),
                               config=_ALL_TRAIN)
  as_lists = lambda d: [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in e.items()} for e in _read_all(d)]
  assert len(ds) == 3 and as_lists(ds) == as_lists(plain)


# ----------------------------------------------------------------------------------------------------------------
# No TensorFlow anywhere.


def test_tensorflow_never_imported_in_process(tmp_path):
  if importlib.util.find_spec("tensorflow") is not None:  # pragma: no cover
    pytest.skip("TensorFlow is installed here; test_build_and_read_with_tensorflow_blocked covers this case")
  _write_helpsteer(tmp_path / "hs")
  for config in ("ratings", "pairs", "preference"):
    assert len(builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=tmp_path / "hs", config=config))
  assert "tensorflow" not in sys.modules


def test_build_and_read_with_tensorflow_blocked(tmp_path):
  """A fresh interpreter that cannot see TensorFlow (even where it is installed) builds and reads every source."""
  _write_embedded(tmp_path / "embedded", _embedded_rows(2))
  _write_jsonl(tmp_path / "uf" / "flan.jsonl", _ultrafeedback_rows())
  _write_helpsteer(tmp_path / "hs")
  _write_psoups(tmp_path / "ps")
  script = textwrap.dedent(f"""
      import sys

      class HideTensorFlow:  # As if TensorFlow were not installed: find_spec -> None, import -> error.
        def __init__(self, inner):
          self.inner = inner

        def find_spec(self, name, path=None, target=None):
          if name == "tensorflow" or name.startswith("tensorflow."):
            return None
          return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
          return getattr(self.inner, attr)

      sys.meta_path[:] = [HideTensorFlow(f) if hasattr(f, "find_spec") else f for f in sys.meta_path]
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      from spectral_soup.data import builders
      root = {os.fspath(tmp_path)!r}
      for name, sub in [("embedded_prefs", "embedded"), ("ultrafeedback", "uf"), ("helpsteer2", "hs"),
                        ("psoups", "ps")]:
        ds = builders.load_source(name, root + "/tfds", manual_dir=root + "/" + sub,
                                  config={{"validation_fraction": 0.0, "test_fraction": 0.0}}
                                  if name != "helpsteer2" else None)
        assert len(ds) > 0 and ds[0]["prompt"], name
      assert "tensorflow" not in sys.modules
      print("OK")
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Your own JSON-lines pairs.


def test_jsonl_prefs_reads_both_layouts_and_refuses_a_bad_line_by_number(tmp_path):
  pairs = tmp_path / "pairs.jsonl"
  rows = [{
      "prompt": f"q{i}",
      "response_a": f"a{i}",
      "response_b": f"b{i}",
      "labels": {
          "concise": "a" if i % 2 else "b",
          **({
              "friendly": "tie"
          } if i % 3 == 0 else {})
      },
      "scores_a": {
          "concise": 2.0 if i % 2 else 1.0
      },
      "scores_b": {
          "concise": 1.0 if i % 2 else 2.0
      }
  } for i in range(12)]
  pairs.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  config = builders.make_config("jsonl_prefs", source_path=os.fspath(pairs), **_ALL_TRAIN)
  ds = builders.load_source("jsonl_prefs", tmp_path / "tfds", config=config)
  builder = builders.get_builder("jsonl_prefs", tmp_path / "tfds", config)
  assert builder.info.metadata["attributes"] == ["concise", "friendly"] and builder.info.metadata["has_scores"]
  examples = {_s(e["prompt"]): e for e in _read_all(ds)}
  assert len(examples) == 12
  np.testing.assert_array_equal(examples["q1"]["label"], [1, -1])
  np.testing.assert_array_equal(examples["q1"]["mask"], [True, False])
  np.testing.assert_array_equal(examples["q3"]["label"], [1, -1])
  np.testing.assert_array_equal(examples["q3"]["mask"], [True, True])  # friendly judged a tie.
  np.testing.assert_array_equal(examples["q2"]["label"], [0, -1])
  assert examples["q2"]["scores_a"][0] == 1.0 and np.isnan(examples["q2"]["scores_a"][1])

  chosen = tmp_path / "manual"
  chosen.mkdir()
  (chosen / "prefs.jsonl").write_text("\n".join(
      json.dumps({
          "prompt": f"p{i}",
          "chosen": f"good {i}",
          "rejected": f"bad {i}",
          "attribute": "helpful"
      }) for i in range(5)) + "\n")
  ds = builders.load_source("jsonl_prefs", tmp_path / "tfds_chosen", manual_dir=chosen, config=_ALL_TRAIN)
  got = _read_all(ds)
  assert len(got) == 5 and all(e["label"].tolist() == [1] and e["mask"].tolist() == [True] for e in got)
  assert all(np.isnan(e["scores_a"]).all() for e in got)

  bad = tmp_path / "bad.jsonl"
  bad.write_text(
      json.dumps(rows[0]) + "\n\n" + json.dumps({
          "prompt": "q",
          "response_a": "a",
          "response_b": "b",
          "labels": {
              "concise": "maybe"
          }
      }) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: labels\['concise'\] = 'maybe'"):
    builders.load_source("jsonl_prefs", tmp_path / "tfds_bad",
                         config=builders.make_config("jsonl_prefs", source_path=os.fspath(bad)))
  assert not (tmp_path / "tfds_bad" / "spectral_soup_jsonl_prefs").exists() or not any(
      p.suffix == ".array_record" or "array_record" in p.name
      for p in (tmp_path / "tfds_bad").rglob("*"))  # Nothing written.
  with pytest.raises(ValueError, match="skip_malformed=True is not offered"):
    builders.load_source("jsonl_prefs", tmp_path / "tfds_skip",
                         config=builders.make_config("jsonl_prefs", source_path=os.fspath(pairs), skip_malformed=True))
  with pytest.raises(builders.SourceNotFoundError, match="prefs.jsonl"):
    builders.load_source("jsonl_prefs", tmp_path / "tfds_none", manual_dir=tmp_path / "src_missing")


# ----------------------------------------------------------------------------------------------------------------
# Configs: custom names, field checks, names that cannot collide.


def test_make_config_takes_a_custom_name_and_keeps_the_positional_builder_name(tmp_path):
  config = builders.make_config("embedded_prefs", name="mine", test_fraction=0.2)
  assert (config.name, config.test_fraction) == ("mine", 0.2)
  assert builders.make_config("ultrafeedback", "conflicting", pairs_per_prompt=2).conflicting_only  # Positional.
  assert builders.make_config("ultrafeedback", base="conflicting").name == "conflicting"
  source = _write_embedded(tmp_path / "src", _embedded_rows(2))
  ds = builders.load_source("embedded_prefs", tmp_path / "tfds", config={
      "name": "mine",
      "source_path": os.fspath(source),
      **_ALL_TRAIN_CONFIG
  })
  assert len(ds) == 4 and (tmp_path / "tfds" / "spectral_soup_embedded_prefs" / "mine" / "1.0.0").is_dir()
  with pytest.raises(ValueError, match="predefined name 'default'"):
    builders.make_config("embedded_prefs", name="default", test_fraction=0.2)
  with pytest.raises(ValueError, match=r"name='a/b': expected a config name"):
    builders.make_config("embedded_prefs", name="a/b")


_ALL_TRAIN_CONFIG = {"validation_fraction": 0.0, "test_fraction": 0.0}
_HASH_SPLIT_BUILDERS = ("embedded_prefs", "ultrafeedback", "psoups", "jsonl_prefs")
_BAD_FIELDS = [
    *[(name, "tie_epsilon", value, "a finite number >= 0")
      for name in _HASH_SPLIT_BUILDERS
      for value in (float("nan"), float("inf"), "0", -0.1)],
    *[("ultrafeedback", "pairs_per_prompt", value, "an integer >= 1, or None")
      for value in (2.5, float("nan"), True, "2", 0)],
    ("embedded_prefs", "validation_fraction", "0.1", r"a finite number in \[0, 1\]"),
    ("psoups", "test_fraction", float("nan"), r"a finite number in \[0, 1\]"),
    ("jsonl_prefs", "split_salt", 3, "a string"),
    ("helpsteer2", "skip_malformed", "yes", "True or False"),
    ("ultrafeedback", "conflicting_only", 1, "True or False"),
    ("helpsteer2", "variant", ["pairs"], "one of"),
    ("psoups", "source_path", "", "a non-empty path"),
    ("psoups", "tie_epsilon", 0.5, "0 .P-SOUPS pairs carry labels"),  # It named a dataset whose labels were the same.
]


@pytest.mark.parametrize("name, field, value, expected", _BAD_FIELDS)
def test_config_fields_of_the_wrong_type_or_range_are_refused_when_the_config_is_made(name, field, value, expected):
  with pytest.raises(ValueError, match=f"{field}={re.escape(repr(value))}: expected {expected}"):
    builders.make_config(name, **{field: value})


def test_jsonl_prefs_tie_epsilon_makes_close_scores_ties(tmp_path):
  """tie_epsilon named a dataset of its own, whose labels were those of tie_epsilon=0."""
  path = tmp_path / "prefs.jsonl"
  rows = [{
      "prompt": f"q{i}",
      "response_a": f"a{i}",
      "response_b": f"b{i}",
      "scores_a": {
          "helpful": 1.0,
          "kind": 2.0
      },
      "scores_b": {
          "helpful": 0.9,
          "kind": 1.0
      }
  } for i in range(4)]
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  labels = {}
  for eps in (0.0, 0.5):
    config = builders.make_config("jsonl_prefs", source_path=os.fspath(path), tie_epsilon=eps, **_ALL_TRAIN_CONFIG)
    ds = builders.load_source("jsonl_prefs", tmp_path / "tfds", config=config)
    labels[eps] = [ds[i]["label"].tolist() for i in range(len(ds))]
  assert labels[0.0] == [[1, 1]] * 4 and labels[0.5] == [[-1, 1]] * 4


def test_unknown_config_names_base_fields_and_a_file_as_data_dir_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"unknown config 'nope'; predefined: \['default'\]"):  # TFDS listed none.
    builders.get_builder("embedded_prefs", tmp_path / "tfds", "nope")
  with pytest.raises(ValueError, match=r"unknown config fields \['description'\]"):  # A TypeError of replace().
    builders.make_config("embedded_prefs", description="mine")
  with pytest.raises(ValueError, match=r"unknown config fields \['version'\]"):  # Accepted, unchecked.
    builders.make_config("embedded_prefs", version="9.9.9")
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="data_dir=.*is a file: expected a directory"):  # NotADirectoryError.
    builders.load_source("embedded_prefs", tmp_path / "file")


def test_config_names_of_verbatim_and_hashed_values_cannot_collide(tmp_path, monkeypatch):
  hashed = builders.make_config("embedded_prefs", split_salt="a-b").name
  assert hashed.startswith("default-split_salt_h")
  looks_hashed = builders.make_config("embedded_prefs", split_salt=hashed.rsplit("_", 1)[1])
  assert looks_hashed.name != hashed  # A value that looks like a hash is hashed too.
  assert builders.make_config("embedded_prefs", split_salt="plain.salt_1").name == "default-split_salt_plain.salt_1"
  # A relative source_path is the absolute path in the config and in its name.
  for where in ("one", "two"):
    (tmp_path / where).mkdir()
  monkeypatch.chdir(tmp_path / "one")
  first = builders.make_config("jsonl_prefs", source_path="prefs.jsonl")
  monkeypatch.chdir(tmp_path / "two")
  second = builders.make_config("jsonl_prefs", source_path="prefs.jsonl")
  assert first.source_path == os.fspath(tmp_path / "one" / "prefs.jsonl") and first.name != second.name


# ----------------------------------------------------------------------------------------------------------------
# Source files: names and contents agree, no file read twice.


def test_a_file_and_its_gz_twin_are_refused_in_every_builder(tmp_path):
  uf = tmp_path / "uf"
  _write_jsonl(uf / "sharegpt.jsonl", _ultrafeedback_rows())
  _write_jsonl(uf / "sharegpt.jsonl.gz", _ultrafeedback_rows(), compress=True)
  _write_jsonl(uf / "pairs.jsonl", [])  # Not an UltraFeedback file; its twin below does not matter.
  _write_jsonl(uf / "pairs.jsonl.gz", [], compress=True)
  hs = _write_helpsteer(tmp_path / "hs")
  _write_jsonl(hs / "train.jsonl", [_helpsteer_row("p", "r", 1, 1, 1, 1, 1)])
  embedded = _write_embedded(tmp_path / "embedded", _embedded_rows(1))
  _write_jsonl(embedded / "pairs.jsonl.gz", _embedded_rows(1), compress=True)
  ps = tmp_path / "ps"
  _write_jsonl(ps / "P1A.json", [{"user_input": "q", "completion_a": "x", "completion_b": "y"}])
  _write_jsonl(ps / "P1A.jsonl.gz", [{"user_input": "q", "completion_a": "x", "completion_b": "y"}], compress=True)
  for name, manual, first, second in [("ultrafeedback", uf, "sharegpt.jsonl", "sharegpt.jsonl.gz"),
                                      ("helpsteer2", hs, "train.jsonl.gz", "train.jsonl"),
                                      ("embedded_prefs", embedded, "pairs.jsonl", "pairs.jsonl.gz"),
                                      ("psoups", ps, "P1A.json", "P1A.jsonl.gz")]:
    with pytest.raises(builders.SourceFileError) as info:
      builders.load_source(name, tmp_path / "tfds", manual_dir=manual)
    message = str(info.value)
    assert f"{manual / first} and {manual / second} are both present" in message, message


def test_compression_is_checked_against_the_file_name(tmp_path):
  rows = "".join(json.dumps(r) + "\n" for r in _embedded_rows(1))
  cases = {
      "pairs.jsonl.gz": (rows.encode(), "named .gz but is not gzip-compressed \\(starts with b'{\"'\\)"),
      "pairs.jsonl": (gzip.compress(rows.encode()), "is gzip-compressed but not named .gz"),
      "pairs.JSONL.GZ": (gzip.compress(rows.encode())[:-12], "the gzip data are truncated or corrupt"),
  }
  for file_name, (data, problem) in cases.items():
    source = tmp_path / file_name.replace(".", "_")
    source.mkdir()
    (source / file_name).write_bytes(data)
    (source / "metadata.json").write_text(json.dumps({"attributes": ATTRS}))
    with pytest.raises(builders.SourceFileError, match=re.escape(os.fspath(source / file_name)) + ": " + problem):
      builders.load_source("embedded_prefs", tmp_path / "tfds", config={"source_path": os.fspath(source / file_name)})


# ----------------------------------------------------------------------------------------------------------------
# Rows that carry nothing: identical responses, repeated rows.


def test_identical_responses_and_repeated_rows_are_left_out_counted_and_named(tmp_path, caplog):
  rows = _embedded_rows(2)
  rows.insert(1, _embedded_row("same", "Same text", "Same text", [1, 0, 0], [0, 1, 0]))  # Line 2.
  rows += [rows[0], rows[0]]  # Lines 6 and 7 repeat line 1.
  source = _write_embedded(tmp_path / "embedded", rows)
  config = {"source_path": os.fspath(source), **_ALL_TRAIN_CONFIG}
  assert len(builders.load_source("embedded_prefs", tmp_path / "tfds", config=config)) == 4
  metadata = builders.get_builder("embedded_prefs", tmp_path / "tfds", config).info.metadata
  assert (metadata["num_identical_responses"], metadata["num_duplicate_rows"]) == (1, 2)
  assert "pairs.jsonl row 2" in caplog.text and "pairs.jsonl row 6 repeats" in caplog.text

  # UltraFeedback: two completions with one text make no pair; a repeated row (e.g. two overlapping files) once.
  uf_rows = _ultrafeedback_rows()
  uf_rows[1]["completions"].append(_completion("m9", "r4", "1", "1", "1", "1"))  # r4 again, other ratings.
  _write_jsonl(tmp_path / "uf" / "flan.jsonl", uf_rows[1:])
  _write_jsonl(tmp_path / "uf" / "sharegpt.jsonl", uf_rows[:2])
  pairs = _by_pair(
      builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=tmp_path / "uf", config=_ALL_TRAIN_CONFIG))
  assert len(pairs) == 6 + 2 and all(a != b for a, b in pairs)
  metadata = builders.get_builder("ultrafeedback", tmp_path / "tfds", _ALL_TRAIN_CONFIG).info.metadata
  assert (metadata["num_identical_responses"], metadata["num_duplicate_rows"]) == (1, 1)

  # HelpSteer2: one response text twice for a prompt makes no pair; nor does a preference of a response to itself.
  hs = _write_helpsteer(
      tmp_path / "hs",
      [
          _helpsteer_row("p1", "same", 3, 3, 4, 1, 1),
          _helpsteer_row("p1", "same", 4, 3, 3, 2, 0),
          _helpsteer_row("p1", "other", 4, 3, 3, 2, 0),
          _helpsteer_row("p1", "other", 4, 3, 3, 2, 0),  # Repeats the row above.
      ])
  pairs = _read_all(builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=hs, config="pairs"))
  assert [(_s(e["response_a"]), _s(e["response_b"])) for e in pairs] == [("same", "other")] * 2  # Rows 1-3, 2-3.
  metadata = builders.get_builder("helpsteer2", tmp_path / "tfds", "pairs").info.metadata
  assert (metadata["num_identical_responses"], metadata["num_duplicate_rows"]) == (1, 1)
  _write_jsonl(hs / "preference" / "preference.jsonl.gz", [{
      "split": "train",
      "prompt": "p",
      "response_1": "x",
      "response_2": "x",
      "preference_strength": 2
  }], compress=True)
  with pytest.raises(
      ValueError, match=r"No examples in any split of spectral_soup_helpsteer2/preference: 1 rows "
      r"read from \[.*preference\.jsonl\.gz'\].*num_identical_responses=1"):
    builders.load_source("helpsteer2", tmp_path / "tfds", manual_dir=hs, config="preference")

  # Your own pairs: a repeated row is kept once.
  prefs = _write_jsonl(tmp_path / "prefs.jsonl", [{
      "prompt": f"q{i % 2}",
      "chosen": "g",
      "rejected": "b"
  } for i in range(4)])
  config = {"source_path": os.fspath(prefs), **_ALL_TRAIN_CONFIG}
  assert len(builders.load_source("jsonl_prefs", tmp_path / "tfds", config=config)) == 2
  assert builders.get_builder("jsonl_prefs", tmp_path / "tfds", config).info.metadata["num_duplicate_rows"] == 2


# ----------------------------------------------------------------------------------------------------------------
# P-SOUPS.


@pytest.mark.parametrize("preference", [0, 3, -1, 2.5])
def test_psoups_preference_outside_1_to_2_is_malformed(tmp_path, preference):
  _write_jsonl(tmp_path / "manual" / "P2A.jsonl", [{
      "instruction": "q",
      "output_1": "x",
      "output_2": "y",
      "preference": 1.5
  }, {
      "instruction": "q",
      "output_1": "x",
      "output_2": "y",
      "preference": preference
  }])
  with pytest.raises(builders.MalformedRowError, match=r"P2A\.jsonl: row 2: field 'preference': .* outside \[1, 2\]"):
    builders.load_source("psoups", tmp_path / "tfds", manual_dir=tmp_path / "manual")


def test_psoups_file_matching(tmp_path):
  row = {"user_input": "q", "completion_a": "x", "completion_b": "y"}
  manual = tmp_path / "manual"
  _write_jsonl(manual / "rm_training" / "P3C.json", [row])  # Only another pole: does not hide the files below.
  _write_jsonl(manual / "pole-p1a.JSONL", [row])  # Suffix in capitals.
  ds = builders.load_source("psoups", tmp_path / "tfds", manual_dir=manual, config=_ALL_TRAIN_CONFIG)
  assert [e["mask"].tolist() for e in _read_all(ds)] == [[True] + [False] * 5]
  _write_jsonl(manual / "P1B_P2A.jsonl", [row])
  with pytest.raises(builders.SourceFileError, match=r"P1B_P2A\.jsonl: the file name names several poles \(P1B, P2A\)"):
    builders.load_source("psoups", tmp_path / "tfds2", manual_dir=manual)


# ----------------------------------------------------------------------------------------------------------------
# A lone surrogate in any text field, in every builder.


@pytest.mark.parametrize("name, files, field", [
    ("ultrafeedback", {
        "flan.jsonl": [{
            "instruction": "q",
            "completions": [_completion("m\udc80", "x", "1", "1", "1", "1")]
        }]
    }, "completions[0].model"),
    ("helpsteer2", {
        "train.jsonl": [_helpsteer_row("p", "r\ud800", 1, 1, 1, 1, 1)],
        "validation.jsonl": [_helpsteer_row("p", "r", 1, 1, 1, 1, 1)]
    }, "response"),
    ("psoups", {
        "P1A.jsonl": [{
            "instruction": "q",
            "output_1": "x",
            "output_2": "y\ud800",
            "preference": 1
        }]
    }, "output_2"),
])
def test_a_lone_surrogate_is_a_malformed_row_in_every_builder(tmp_path, name, files, field):
  for file_name, rows in files.items():
    _write_jsonl(tmp_path / "manual" / file_name, rows)
  with pytest.raises(builders.MalformedRowError, match=f"row 1: field '{re.escape(field)}': holds an unpaired "
                     "surrogate"):
    builders.load_source(name, tmp_path / "tfds", manual_dir=tmp_path / "manual")


# ----------------------------------------------------------------------------------------------------------------
# Reusing a prepared dataset.


def test_a_prepared_dataset_is_reused_only_while_its_config_and_source_are_unchanged(tmp_path):
  source = _write_embedded(tmp_path / "src", _embedded_rows(2))
  config = {"source_path": os.fspath(source), **_ALL_TRAIN_CONFIG}
  data_dir = tmp_path / "tfds"
  assert len(builders.load_source("embedded_prefs", data_dir, config=config)) == 4
  builder = builders.get_builder("embedded_prefs", data_dir, config)
  recorded = {e["path"] for e in builder.info.metadata["source_fingerprint"]}
  assert recorded == {os.fspath(source / "pairs.jsonl"), os.fspath(source / "metadata.json")}
  assert len(builders.load_source("embedded_prefs", data_dir, config=config)) == 4  # Unchanged: reused.

  _write_jsonl(source / "pairs.jsonl", _embedded_rows(3))
  with pytest.raises(builders.StaleDatasetError) as info:
    builders.load_source("embedded_prefs", data_dir, config=config)
  message = str(info.value)
  assert f"{source / 'pairs.jsonl'} has changed since the build" in message, message
  assert "rebuild=True" in message and f"delete {builder.data_dir}" in message
  assert len(builders.load_source("embedded_prefs", data_dir, config=config, rebuild=True)) == 6
  os.utime(source / "pairs.jsonl", ns=(1, 1))  # Same size, another modification time.
  with pytest.raises(builders.StaleDatasetError, match="pairs.jsonl was modified since the build"):
    builders.load_source("embedded_prefs", data_dir, config=config)

  # Another manual directory under the same config: refused, naming both files.
  for manual, n in (("m1", 3), ("m2", 5)):
    _write_jsonl(tmp_path / manual / "prefs.jsonl", [{
        "prompt": f"{manual} {i}",
        "chosen": "g",
        "rejected": "b"
    } for i in range(n)])
  builders.load_source("jsonl_prefs", data_dir, manual_dir=tmp_path / "m1", config=_ALL_TRAIN_CONFIG)
  with pytest.raises(
      builders.StaleDatasetError, match=r"m1/prefs\.jsonl was read by the build but is not part of "
      r"the source now; .*m2/prefs\.jsonl is part of the source now"):
    builders.load_source("jsonl_prefs", data_dir, manual_dir=tmp_path / "m2", config=_ALL_TRAIN_CONFIG)
  (tmp_path / "m1" / "prefs.jsonl").unlink()  # The source is not at hand any more: the dataset is still served.
  assert len(builders.load_source("jsonl_prefs", data_dir, config=_ALL_TRAIN_CONFIG)) == 3

  # One custom name for two configs.
  builders.load_source("embedded_prefs", data_dir, config={"name": "mine", **config, "split_salt": "a"}, rebuild=True)
  with pytest.raises(builders.StaleDatasetError, match="was built with split_salt='a', but this config has "
                     "split_salt='b'"):
    builders.load_source("embedded_prefs", data_dir, config={"name": "mine", **config, "split_salt": "b"})


def test_empty_splits_and_no_examples_are_explained(tmp_path):
  source = _write_embedded(tmp_path / "src", _embedded_rows(2))
  config = {"source_path": os.fspath(source), **_ALL_TRAIN_CONFIG}
  assert len(builders.load_source("embedded_prefs", tmp_path / "tfds", config=config))
  with pytest.raises(
      ValueError, match=r"split 'test' has no examples: it was left out when the dataset was built, "
      r"as no prompt of its 4 examples hashed into it at validation_fraction=0.0, test_fraction=0.0"):
    builders.load_source("embedded_prefs", tmp_path / "tfds", config=config, split="test[:10]")
  _write_jsonl(tmp_path / "uf" / "flan.jsonl", _ultrafeedback_rows()[2:])  # One completion: no pairs.
  with pytest.raises(
      ValueError, match=r"No examples in any split of spectral_soup_ultrafeedback/all: 1 rows read "
      r"from \['.*flan\.jsonl'\], 0 of them skipped as malformed; left out: "
      r"num_prompts_without_pairs=1"):
    builders.load_source("ultrafeedback", tmp_path / "tfds", manual_dir=tmp_path / "uf")
