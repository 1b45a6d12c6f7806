"""Your own preference pairs as JSON lines (`spectral_soup.data.jsonl`): both layouts read, every bad row refused
naming its line and field, and a 20-row file trains bases through the CLI whose names are the file's attributes."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import spectral_soup as ss
from spectral_soup.data import jsonl
import hf_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_chosen_rejected_rows_label_their_attribute(tmp_path, caplog):
  path = _write(
      tmp_path / "p.jsonl",
      [
          {
              "prompt": "p0",
              "chosen": "short",
              "rejected": "a long answer",
              "attribute": "concise"
          },
          "",  # Blank lines are skipped.
          {
              "prompt": "p1",
              "chosen": "thanks!",
              "rejected": "no",
              "attribute": "friendly"
          },
          {
              "prompt": "p2",
              "chosen": "yes",
              "rejected": "maybe"
          },
      ])
  with caplog.at_level(logging.WARNING):
    out = jsonl.read(path)
  # The row without one trains a basis of its own, as documented; a forgotten field reads alike, so it is named.
  assert re.search(
      r"p.jsonl: some chosen / rejected rows name their attribute \(first: line 1\) and some do not "
      r"\(first: line 4\); those without one train a basis 'preference' of their own", caplog.text)
  assert out["attributes"] == ("concise", "friendly", "preference")
  assert out["prompt"] == ["p0", "p1", "p2"] and out["response_a"] == ["short", "thanks!", "yes"]
  np.testing.assert_array_equal(out["label"], [[1, -1, -1], [-1, 1, -1], [-1, -1, 1]])
  np.testing.assert_array_equal(out["mask"], np.eye(3, dtype=bool))
  assert out["scores_a"] is None


def test_pair_rows_with_labels_and_scores(tmp_path):
  path = _write(
      tmp_path / "p.jsonl",
      [
          {
              "prompt": "p0",
              "response_a": "x",
              "response_b": "y",
              "scores_a": {
                  "help": 3,
                  "brief": 1
              },
              "scores_b": {
                  "help": 1,
                  "brief": 2
              },
              "labels": {  # Agreeing with the scores; null is no label, so the scores decide.
                  "help": "a",
                  "brief": None
              }
          },
          {
              "prompt": "p1",
              "response_a": "x",
              "response_b": "y",
              "scores_a": {
                  "brief": 2.5
              },
              "scores_b": {
                  "brief": 2.5
              },
              "labels": {
                  "brief": "tie"
              }
          },
      ])
  out = jsonl.read(path)
  assert out["attributes"] == ("help", "brief")
  np.testing.assert_array_equal(out["label"], [[1, 0], [-1, -1]])
  np.testing.assert_array_equal(out["mask"], [[True, True], [False, True]])
  np.testing.assert_allclose(out["scores_a"], [[3, 1], [np.nan, 2.5]])
  labels_only = jsonl.read(
      _write(tmp_path / "l.jsonl", [{
          "prompt": "p",
          "response_a": "x",
          "response_b": "y",
          "labels": {
              "help": "b",
              "brief": 0.5,
              "tone": None
          }
      }]))
  np.testing.assert_array_equal(labels_only["label"], [[0, -1, -1]])
  # null is a missing label (as Arrow's None in a datasets directory), not a tie.
  np.testing.assert_array_equal(labels_only["mask"], [[True, True, False]])
  assert labels_only["attributes"] == ("help", "brief", "tone")


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}
PAIR = {"prompt": "p", "response_a": "a", "response_b": "b"}


@pytest.mark.parametrize(
    "bad,message",
    [
        ("{not json", r"line 2: not JSON"),
        # Cut short at the end of the line: the column of the cut (it was reported at column 1).
        ('{"prompt": "hi", "chosen": "a",', r"line 2: not JSON \(Expecting property name enclosed in double quotes "
         r"at column 32\)"),
        ('{"prompt": "p", "prompt": "q", "chosen": "a", "rejected": "b"}',
         r"line 2: the key 'prompt' appears twice in one object"),  # json kept the last value, silently.
        ("[" * 100_000 + "]" * 100_000, r"line 2: nested too deeply to parse"),  # A RecursionError.
        ('{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": {"x": 1' + "0" * 400 + '}, '
         '"scores_b": {"x": 0}}', r"line 2: scores_a\['x'\] = 100000000000\.\.\.000000 \(401 digits\): expected a "
         r"finite number"),  # An OverflowError; the integer is shown cut.
        ('{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": {"x": 1' + "0" * 5000 + '}, '
         '"scores_b": {"x": 0}}', r"line 2: not JSON that can be read \(Exceeds the limit \(4300 digits\)"),
        ({
            **GOOD, "attribute": "-concise"
        }, r"line 2: field 'attribute' has the attribute name '-concise': expected a name that does not start "
         r"with '-'"),  # config.data.attributes could never select it ("-" negates there).
        ({
            **GOOD, "attribute": " concise"
        }, r"line 2: field 'attribute' has the attribute name ' concise': expected no surrounding whitespace"),
        (
            {  # Equal once stored in float32: the pair would silently read as a tie.
                **PAIR, "scores_a": {
                    "x": 100000001
                },
                "scores_b": {
                    "x": 100000000
                },
                "labels": {
                    "x": "a"
                }
            },
            r"line 2: scores_a\['x'\] = 100000001 and scores_b\['x'\] = 100000000 differ, but not in float32"),
        ([1, 2], r"line 2: a JSON array: expected a JSON object"),
        ({
            "chosen": "a",
            "rejected": "b"
        }, r"line 2: field 'prompt' is missing: expected a string"),
        ({
            **GOOD, "chosen": "  "
        }, r"line 2: field 'chosen' is empty: expected text"),
        ({
            **GOOD, "rejected": 3
        }, r"line 2: field 'rejected' is a number: expected a string"),
        ({
            **GOOD, "attribute": ""
        }, r"line 2: field 'attribute' has the attribute name ''"),
        ({
            "prompt": "p",
            "answer": "a"
        }, r"line 2: expected the fields \('prompt', 'chosen', 'rejected'\)"),
        ({
            **PAIR
        }, r"line 2: a response_a / response_b row needs 'labels' or 'scores_a' / 'scores_b'"),
        ({
            **PAIR, "labels": {
                "x": 2
            }
        }, r"line 2: labels\['x'\] = 2: expected 'a', 'b', 'tie', 1, 0, 0.5 or null"),
        ({
            **PAIR, "labels": {
                "x": True
            }
        }, r"line 2: labels\['x'\] = True"),
        ({
            **PAIR, "scores_a": {
                "x": 1
            }
        }, r"line 2: field 'scores_b' is missing"),
        ({
            **PAIR, "scores_a": {
                "x": 1
            },
            "scores_b": {
                "y": 1
            }
        }, r"line 2: scores_a has attributes \['x'\] and scores_b"),
        ({
            **PAIR, "scores_a": {
                "x": "high"
            },
            "scores_b": {
                "x": 1
            }
        }, r"line 2: scores_a\['x'\] = 'high': expected a finite"),
        ({
            **PAIR, "scores_a": {
                "x": 1
            },
            "scores_b": {
                "x": 2
            },
            "labels": {
                "x": "a"
            }
        }, r"line 2: labels\['x'\] disagrees"),
        (
            {  # Tied scores and a label that picks one: refused for either side.
                **PAIR, "scores_a": {
                    "x": 1
                },
                "scores_b": {
                    "x": 1
                },
                "labels": {
                    "x": "b"
                }
            },
            r"line 2: labels\['x'\] disagrees"),
        (
            {  # A tie against unequal scores (it became the scores' side).
                **PAIR, "scores_a": {
                    "x": 5
                },
                "scores_b": {
                    "x": 1
                },
                "labels": {
                    "x": 0.5
                }
            },
            r"line 2: labels\['x'\] disagrees with scores_a / scores_b \(5.0 vs 1.0\): it is 0.5"),
        ({
            **PAIR, "scores_a": {
                "x": 1e39
            },
            "scores_b": {
                "x": 1
            }
        }, r"line 2: scores_a\['x'\] = 1e\+39: expected a finite number within \+-1e\+37"),
        ({
            **GOOD, "atribute": "friendly"
        }, r"line 2: unknown field 'atribute'; did you mean 'attribute'\?"),
        ({
            **GOOD, "response_a": "x"
        }, r"line 2: field 'response_a' belongs to the other layout"),
        ({
            **GOOD, "chosen": "paris\ud800."
        }, r"line 2: field 'chosen' holds an unpaired surrogate '\\ud800' at "
         "character 5"),
        ({
            **GOOD, "attribute": "concise\ud800"
        }, r"line 2: field 'attribute' has an attribute name that holds an unpaired surrogate '\\ud800' at "
         "character 7"),  # Refused in text fields only: a name that UTF-8 cannot write into basis.json or the logs.
        (None, r"line 2: null: expected a JSON object"),
        ({
            **GOOD, "chosen": None
        }, r"line 2: field 'chosen' is null: expected a string"),
        ('{"prompt": "p\tq", "chosen": "a", "rejected": "b"}',
         r"line 2: not JSON \(Invalid control character at column 14: a raw tab or line break inside a string"),
        (  # Integers beyond float64's 2^53 that differ, with one float64 image: read as a tie before.
            '{"prompt": "p", "response_a": "a", "response_b": "b", "scores_a": {"x": 9007199254740993}, '
            '"scores_b": {"x": 9007199254740992}}', r"line 2: scores_a\['x'\] = 9007199254740993 and scores_b\['x'\] = "
            r"9007199254740992 differ, but not in float32"),
    ])
def test_a_bad_row_is_refused_naming_its_line_and_field(tmp_path, bad, message):
  first = {**PAIR, "labels": {"x": "a"}} if isinstance(bad, dict) and "response_a" in bad else GOOD
  path = _write(tmp_path / "bad.jsonl", [first, bad])
  with pytest.raises(ValueError, match=message) as info:
    jsonl.read(path)
  assert str(path) in str(info.value)


def test_a_file_in_another_json_layout_is_named(tmp_path):
  """A pretty-printed JSON array, an object spread over lines and old Mac line endings: the cause, not only
  json's message."""
  array = tmp_path / "array.jsonl"
  array.write_text(json.dumps([GOOD, GOOD], indent=2))
  with pytest.raises(ValueError, match=r"array.jsonl, line 1: not JSON \(.*the file looks like one JSON array"):
    jsonl.read(str(array))
  spread = tmp_path / "spread.jsonl"
  spread.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD, indent=2))
  with pytest.raises(ValueError, match=r"spread.jsonl, line 2: not JSON \(.*a row spread over several lines"):
    jsonl.read(str(spread))
  mac = tmp_path / "mac.jsonl"
  mac.write_bytes(b"\r".join(json.dumps(row).encode() for row in (GOOD, GOOD)) + b"\r")
  with pytest.raises(
      ValueError, match=r"mac.jsonl, line 1: not JSON \(Extra data at column \d+: the line holds "
      r"carriage returns"):
    jsonl.read(str(mac))


def test_file_level_errors(tmp_path, caplog):
  with pytest.raises(ValueError, match="no such file"):
    jsonl.read(str(tmp_path / "missing.jsonl"))
  (tmp_path / "folder.jsonl").mkdir()
  with pytest.raises(ValueError, match=r"folder.jsonl' is a directory without a dataset_info.json"):
    jsonl.read(str(tmp_path / "folder.jsonl"))
  not_utf8 = tmp_path / "latin1.jsonl"
  not_utf8.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}\n')
  with pytest.raises(ValueError, match=r"latin1.jsonl, line 2: not UTF-8 text \(byte b'\\xe9' at column"):
    jsonl.read(str(not_utf8))
  packed = tmp_path / "packed.jsonl"
  packed.write_bytes(gzip.compress(json.dumps(GOOD).encode()))
  with pytest.raises(ValueError, match=r"packed.jsonl is gzip-compressed: expected plain JSON-lines text"):
    jsonl.read(str(packed))
  bom = tmp_path / "bom.jsonl"
  bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
  assert jsonl.read(str(bom))["prompt"] == ["p"]  # A byte-order mark is not an error.
  joined = tmp_path / "joined.JSONL"  # Two files joined with `cat`, each opening with a byte-order mark.
  joined.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\xef\xbb\xbf" + json.dumps({
      **GOOD, "prompt": "q"
  }).encode() + b"\n")
  assert jsonl.is_jsonl(str(joined)) and jsonl.read(str(joined))["prompt"] == ["p", "q"]
  # Rows whose two responses are the same text carry no preference: left out with a warning, refused if all are.
  with caplog.at_level("WARNING"):
    out = jsonl.read(_write(tmp_path / "same.jsonl", [GOOD, {**GOOD, "rejected": "a"}, {**GOOD, "prompt": "q"}]))
  assert out["prompt"] == ["p", "q"] and "1 row(s) whose two responses are the same text (first: line 2)" in caplog.text
  with pytest.raises(ValueError, match="every row's two responses are the same text"):
    jsonl.read(_write(tmp_path / "all_same.jsonl", [{**GOOD, "rejected": "a"}]))
  # A row repeated exactly is kept once (it would count twice in the loss), as the TFDS builder does; the same pair
  # judged on another attribute, or with other scores, is another row.
  caplog.clear()
  rows = [GOOD, {**GOOD, "attribute": "other"}, GOOD, {**GOOD, "prompt": "q"}, GOOD, {**GOOD, "prompt": "q"}]
  with caplog.at_level("WARNING"):
    out = jsonl.read(_write(tmp_path / "repeats.jsonl", rows))
  assert out["prompt"] == ["p", "p", "q"] and tuple(out["attributes"]) == ("preference", "other")
  assert "3 row(s) repeat an earlier row exactly (first: line 3 repeats line 1)" in caplog.text
  assert "judge an attribute on the same two responses" not in caplog.text  # Another attribute: not a warning.
  # The same pair mirrored, or judged the other way, on one attribute: kept, with a warning naming the lines.
  caplog.clear()
  mirrored = {**GOOD, "chosen": GOOD["rejected"], "rejected": GOOD["chosen"]}
  with caplog.at_level("WARNING"):
    out = jsonl.read(_write(tmp_path / "mirrored.jsonl", [GOOD, {**GOOD, "prompt": "q"}, mirrored]))
  assert out["prompt"] == ["p", "q", "p"]
  assert ("1 row(s) judge an attribute on the same two responses to the same prompt as an earlier row, mirrored "
          "or differently (first: line 3, the pair of line 1)") in caplog.text
  # Attribute names a letter or a case apart are separate bases: a warning says so.
  caplog.clear()
  with caplog.at_level("WARNING"):
    out = jsonl.read(
        _write(tmp_path / "names.jsonl", [{
            **GOOD, "attribute": "helpfulness"
        }, {
            **GOOD, "prompt": "q",
            "attribute": "Helpfullness"
        }]))
  assert out["attributes"] == ("helpfulness", "Helpfullness")
  assert "the attributes 'helpfulness' and 'Helpfullness' differ only slightly" in caplog.text
  scored = dict(PAIR, scores_a={"x": 1.0}, scores_b={"x": 0.0})
  assert len(jsonl.read(_write(tmp_path / "scores.jsonl", [scored, dict(scored, scores_b={"x": 0.5})]))["prompt"]) == 2
  with pytest.raises(ValueError, match="holds no rows"):
    jsonl.read(_write(tmp_path / "empty.jsonl", [""]))
  with pytest.raises(ValueError, match="line 2: mixes the chosen / rejected layout"):
    jsonl.read(_write(tmp_path / "mixed.jsonl", [GOOD, {**PAIR, "labels": {"x": "a"}}]))
  with pytest.raises(ValueError, match="line 3: no scores, where line 1 has scores_a / scores_b"):
    jsonl.read(
        _write(tmp_path / "partial.jsonl", [{
            **PAIR, "scores_a": {
                "x": 1
            },
            "scores_b": {
                "x": 0
            }
        }, "", {
            **PAIR, "labels": {
                "x": "a"
            }
        }]))


def _rows(n):
  """n pairs over two attributes: 'short' prefers the shorter response, 'polite' the one that says please."""
  rows = []
  for i in range(n):
    prompt = f"question number {i}: how should I answer?"
    if i % 2:
      rows.append({"prompt": prompt, "chosen": "ok", "rejected": "a much longer answer " * 3, "attribute": "short"})
    else:
      rows.append({"prompt": prompt, "chosen": "please do", "rejected": "do it", "attribute": "polite"})
  return rows


def _train(tmp_path, data, *extra):
  tokenizer = hf_fixtures.byte_tokenizer(tmp_path / "tokenizer")
  env = dict(os.environ, SPECTRAL_SOUP_PROGRESS="0", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count"))
  workdir = tmp_path / "run"
  result = subprocess.run([
      sys.executable, "-m", "experiments.train_basis", "--config=configs/train_basis_tiny.py", f"--workdir={workdir}",
      f"--config.data.source={data}", f"--config.data.tokenizer={tokenizer}", "--config.model.vocab_size=512",
      "--config.basis.num_bases=2", "--config.train.batch_size=4", "--config.train.eval_batch_size=1",
      "--config.train.num_steps=20", "--config.optim.warmup_steps=2", "--config.train.tensorboard=False",
      "--config.data.prompt_len=48", "--config.data.response_len=64", *extra
  ], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  return result, str(workdir)


def _pairs(tmp_path, rows):
  """`sources.builder_pairs` of `rows` (no held-out share) for K = 2 bases: (train arrays, metadata)."""
  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.data.source = _write(tmp_path / "prefs.jsonl", rows)
  config.data.eval_fraction = 0.0
  config.data.tokenizer = hf_fixtures.byte_tokenizer(tmp_path / "tokenizer")
  config.model.vocab_size, config.basis.num_bases, config.train.batch_size = 512, 2, 4
  train, _, metadata = sources.builder_pairs(config, sources.load_tokenizer(config))
  return train, metadata


def test_an_attribute_only_labelled_in_a_scored_file_teaches_its_basis(tmp_path, caplog):
  """Labels of one attribute beside scores of another: the labels count (they were dropped for the scores)."""
  rows = [{
      "prompt": f"question {i}",
      "response_a": f"answer {i}",
      "response_b": f"reply {i}",
      "labels": {
          "helpful": "ab"[i % 2]
      },
      "scores_a": {
          "short": float(i % 3)
      },
      "scores_b": {
          "short": 1.0
      }
  } for i in range(12)]
  train, metadata = _pairs(tmp_path, rows)
  assert metadata["attributes"] == ["helpful", "short"]
  np.testing.assert_array_equal(train["labels"][:, 0], [1 - i % 2 for i in range(12)])
  np.testing.assert_array_equal(train["labels"][:, 1], [[0, -1, 1][i % 3] for i in range(12)])
  for row in rows:  # No pair labels "helpful": its basis stays at its initialization, named in a warning.
    row["labels"]["helpful"] = None
  caplog.clear()
  _pairs(tmp_path, rows)
  assert any("basis 0 (helpful: 1) has no training pair with a label (loss.kind='dpo') among the 8 pairs of 'train': "
             "it will stay at its initialization" in r.getMessage() for r in caplog.records), caplog.text


def test_a_20_row_file_trains_bases_through_the_cli_and_names_them(tmp_path):
  data = _write(tmp_path / "prefs.jsonl", _rows(20))
  result, workdir = _train(tmp_path, data)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "basis.json")) as f:
    assert json.load(f)["attributes"] == ["polite", "short"]
  basis = ss.load_basis(workdir)
  assert basis.names == ("polite", "short") and basis.num_bases == 2
  assert len(basis.generate("hello", [[1.0, 0.0], [0.0, 1.0]], max_new_tokens=4)) == 2


def test_a_malformed_row_is_refused_by_the_cli_naming_its_line(tmp_path):
  rows = _rows(20)
  rows[6] = {"prompt": "p", "chosen": "", "rejected": "x"}
  data = _write(tmp_path / "prefs.jsonl", rows)
  result, workdir = _train(tmp_path, data)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith(f"error: {data}, line 7: field 'chosen' is empty"), result.stderr[-2000:]
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  result, _ = _train(tmp_path, str(tmp_path / "missing.jsonl"))
  assert result.returncode == 2 and "no such file" in result.stderr, result.stderr[-2000:]


def test_a_hugging_face_datasets_directory_reads_like_the_json_lines(tmp_path):
  datasets = pytest.importorskip("datasets")
  rows = [{
      "prompt": "p0",
      "response_a": "x",
      "response_b": "y",
      "scores_a": {
          "help": 3.0,
          "brief": None
      },
      "scores_b": {
          "help": 1.0,
          "brief": None
      }
  }, {
      "prompt": "p1",
      "response_a": "u",
      "response_b": "v",
      "scores_a": {
          "help": 1.0,
          "brief": 2.0
      },
      "scores_b": {
          "help": 2.0,
          "brief": 1.0
      }
  }]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
  datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
  want = jsonl.read(
      _write(tmp_path / "same.jsonl", [{
          **rows[0], "scores_a": {
              "help": 3.0
          },
          "scores_b": {
              "help": 1.0
          }
      }, rows[1]]))
  for name in ("ds", "dd"):
    assert jsonl.is_jsonl(str(tmp_path / name))
    got = jsonl.read(str(tmp_path / name))
    assert got["attributes"] == want["attributes"] == ("help", "brief")
    for key in ("label", "mask", "scores_a", "scores_b"):
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")
  bad = [{"prompt": "p", "chosen": "a", "rejected": ""}]
  datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
  with pytest.raises(ValueError, match=r"bad, row 0: field 'rejected' is empty"):
    jsonl.read(str(tmp_path / "bad"))


def test_a_datasets_row_whose_labels_are_all_null_reads_like_the_json_line(tmp_path):
  """Arrow fills a struct field a row lacks with None: a row labelling none of the attributes is a row of missing
  labels, as the same row in JSON lines (it was refused as "field 'labels' is {}", which the file never held)."""
  datasets = pytest.importorskip("datasets")
  rows = [{
      "prompt": "p1",
      "response_a": "x",
      "response_b": "y",
      "labels": {
          "h": "a",
          "g": None
      }
  }, {
      "prompt": "p2",
      "response_a": "x",
      "response_b": "y",
      "labels": {
          "h": None,
          "g": "b"
      }
  }, {
      "prompt": "p3",
      "response_a": "x",
      "response_b": "y",
      "labels": {
          "h": None,
          "g": None
      }
  }]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
  got, want = jsonl.read(str(tmp_path / "ds")), jsonl.read(_write(tmp_path / "same.jsonl", rows))
  assert got["attributes"] == want["attributes"] == ("h", "g")
  for key in ("label", "mask"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_array_equal(got["mask"], [[True, False], [False, True], [False, False]])


def _tiny_jsonl_config(tmp_path, rows, **data):
  from configs import train_basis_tiny  # pylint: disable=g-import-not-at-top
  config = train_basis_tiny.get_config()
  config.data.source = _write(tmp_path / "prefs.jsonl", rows)
  config.data.tokenizer = hf_fixtures.byte_tokenizer(tmp_path / "tokenizer")
  config.model.vocab_size, config.basis.num_bases = 512, 1
  config.train.batch_size, config.train.eval_batch_size = 4, 1
  for name, value in data.items():
    config.data[name] = value
  return config


def test_pairs_are_counted_and_rated_before_the_model_loads(tmp_path):
  """A file whose pairs teach no basis (every label a tie), or whose rating difference the ratings loss refuses,
  is refused by the config check (before any model loads), naming the batch or the file's line."""
  from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
  ties = [{"prompt": f"question {i}", "response_a": "a", "response_b": "b", "labels": {"x": "tie"}} for i in range(20)]
  config = _tiny_jsonl_config(tmp_path, ties)
  with pytest.raises(
      ValueError, match=r"config.train.batch_size=4 is invalid: .*prefs.jsonl has 0 labelled pairs in the "
      r"training share .* of them teach no basis: every label a tie or null"):
    sources.validate_config(config)
  rated = [{
      "prompt": f"question {i}",
      "response_a": "a",
      "response_b": "b",
      "scores_a": {
          "x": float(i)
      },
      "scores_b": {
          "x": 0.0
      }
  } for i in range(1, 40)]
  rated[5]["scores_a"]["x"] = 1e20  # Line 6: fine as a float32 score, beyond the ratings loss's range.
  config = _tiny_jsonl_config(tmp_path, rated, eval_fraction=0.0)
  sources.validate_config(config)  # dpo: the labels are the scores' signs.
  config.loss.kind = "ratings"
  with pytest.raises(
      ValueError, match=r"prefs.jsonl, line 6: loss.rating_scale \* \(rating_a - rating_b\) = 1 \* "
      r"\(1e\+20 - 0\) for basis 0 is beyond \+-1e\+15"):
    sources.validate_config(config)


def test_a_held_out_share_of_ties_trains_without_held_out_pairs(tmp_path, caplog):
  """Every held-out row a tie: no held-out pair (a warning), not a crash on an empty tokenizer call."""
  from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
  rows = []
  for i in range(60):
    prompt = f"question {i}"
    held_out = sources.jsonl_split_of(prompt, 0.1) == "eval"
    rows.append({"prompt": prompt, "response_a": "a", "response_b": "b", "labels": {"x": "tie" if held_out else "a"}})
  assert any(r["labels"]["x"] == "tie" for r in rows)
  config = _tiny_jsonl_config(tmp_path, rows, eval_fraction=0.1)
  sources.validate_config(config)
  with caplog.at_level("WARNING"):
    train, held_out, _ = sources.builder_pairs(config, sources.load_tokenizer(config))
  assert len(train["prompt"]) == sum(r["labels"]["x"] == "a" for r in rows) and not len(held_out["prompt"])
  assert "no labelled pair in the held-out share data.eval_fraction=0.1" in caplog.text


def test_the_trainer_holds_out_the_prompts_of_the_builders_validation_and_test_splits(tmp_path):
  """A file trained on directly (`data.source`) and built as a `jsonl_prefs` dataset splits its prompts alike: the
  trainer's held-out share (0.1) is the builder's validation and test splits (0.05 each, the same hash)."""
  from spectral_soup.data import builders  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import sources  # pylint: disable=g-import-not-at-top
  rows = [{"prompt": f"question {i}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(400)]
  config = _tiny_jsonl_config(tmp_path, rows, eval_fraction=0.1)
  held_out = set(sources.read_split(config, "eval", limit=10_000)["prompt"])
  trained = set(sources.read_split(config, "train", limit=10_000)["prompt"])
  built = {}
  for split in ("train", "validation", "test"):
    ds = builders.load_source("jsonl_prefs", tmp_path / "tfds", split=split, config={"source_path": config.data.source})
    built[split] = {
        ds[i]["prompt"].decode() if isinstance(ds[i]["prompt"], bytes) else ds[i]["prompt"] for i in range(len(ds))
    }
  assert 20 < len(held_out) < 60 and held_out == built["validation"] | built["test"] and trained == built["train"]


def test_a_zero_row_datasets_directory_is_refused_in_one_line(tmp_path):
  datasets = pytest.importorskip("datasets")
  datasets.Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match=r"empty(: not a readable datasets directory| holds no rows)"):
    jsonl.read(str(tmp_path / "empty"))


def test_a_source_file_of_another_name_is_named(tmp_path):
  from spectral_soup.offline import config_checks  # pylint: disable=g-import-not-at-top
  config = _tiny_jsonl_config(tmp_path, _rows(20), eval_fraction=0.0)
  config.basis.num_bases, config.train.batch_size, config.train.eval_batch_size = 2, 8, 8  # Over 8 devices.
  config_checks.validate_config(config)
  os.rename(config.data.source, tmp_path / "prefs.json")
  config.data.source = str(tmp_path / "prefs.json")
  with pytest.raises(
      ValueError, match=r"config.data.source=.*prefs.json' is invalid: expected a JSON-lines file "
      r"named .jsonl \(this file is named 'prefs.json'"):
    config_checks.validate_config(config)


def test_a_resume_on_a_file_edited_in_place_is_refused(tmp_path):
  """The same command after the data file changed (chosen and rejected swapped): the checkpoint's bases were trained
  on other pairs, and resuming would mix them (it resumed silently, and a finished run kept its old evaluation)."""
  data = _write(tmp_path / "prefs.jsonl", _rows(20))
  result, workdir = _train(tmp_path, data)
  assert result.returncode == 0, result.stderr[-2000:]
  _write(tmp_path / "prefs.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in _rows(20)])
  result, _ = _train(tmp_path, data)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "pairs differ from those the checkpoint of step 20" in result.stderr and "a new --workdir" in result.stderr
  _write(tmp_path / "prefs.jsonl", _rows(20))  # The original file again: the finished run is accepted.
  result, _ = _train(tmp_path, data)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.isdir(workdir)
