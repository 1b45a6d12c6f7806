r"""Your own preference pairs as JSON lines: every row checked, a bad row refused naming the file, line and field.

    python -m experiments.train_basis --config=configs/train_basis_jsonl.py --workdir=W \
        --config.data.source=prefs.jsonl

One JSON object per line (blank lines are skipped), or one row of a Hugging Face `datasets` directory (written by
`save_to_disk`; its "train" split if it holds several; reading it needs the `datasets` package), in one of two
layouts (a dataset's columns carry the same names; None, Arrow's missing value, is an absent field):

* **chosen / rejected**: `{"prompt": str, "chosen": str, "rejected": str, "attribute": str}`: one preference per
  row; `attribute` (optional, default "preference", with a warning when other rows name theirs) names the
  dimension it judges, so rows of several attributes may share a file, each labelling only its own. Response a is
  the chosen one.
* **two responses, judged per attribute**: `{"prompt": str, "response_a": str, "response_b": str, "labels": {name:
  "a" | "b" | "tie" | 1 | 0 | 0.5 | null}}` and/or `{"scores_a": {name: number}, "scores_b": {name: number}}`
  (ratings of each response, higher is better; both or neither). An attribute absent from a row, or labelled
  null, is missing for that pair unless the row scores it; with scores, a row's labels (if any) must agree with
  them ("a" / 1: scores_a higher, "b" / 0: lower, "tie" / 0.5: equal).

A row whose two responses are the same text carries no preference, and a row that repeats an earlier row exactly
would count twice: both are left out with a warning naming the first. The attributes are the names met in the
file, in order of first appearance; they become the bases' names
(`basis.json`, `spectral_soup.load_basis(...).names`). `read` returns the pairs in the format of
`offline.sources.read_split` (labels: 1 = response a preferred, 0 = b, -1 = tie or missing).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

CHOSEN_FIELDS = ("prompt", "chosen", "rejected")
PAIR_FIELDS = ("prompt", "response_a", "response_b")
DEFAULT_ATTRIBUTE = "preference"
_LABELS = {"a": 1, "b": 0, "tie": -1, 1: 1, 0: 0, 0.5: -1, None: None}  # null: missing (as Arrow's None is).
GZIP_MAGIC = b"\x1f\x8b"  # The first two bytes of every gzip file.
# Scores are stored as float32; their differences must stay finite too.
MAX_SCORE = 1e37

# The salt of the prompt hash that splits a JSON-lines file: the `jsonl_prefs` builder's default `split_salt` and
# the trainer's held-out share (`offline/sources.py`), so both hold out the same prompts.
SPLIT_SALT = "spectral_soup"


def stable_hash(*parts: str) -> bytes:
  """SHA-256 of the parts (NUL-separated, UTF-8); independent of PYTHONHASHSEED and the platform."""
  return hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()


def prompt_bucket(prompt: str, salt: str = SPLIT_SALT) -> float:
  """A number in [0, 1) determined by the prompt text and the salt only: the builders' hash splits put a prompt in
  'test' below test_fraction, in 'validation' below test_fraction + validation_fraction; the trainer holds a
  JSON-lines prompt out below its eval_fraction, so with eval_fraction >= test_fraction (+ validation_fraction)
  no prompt of the builder's test (and validation) split is trained on."""
  return int.from_bytes(stable_hash(salt, prompt)[:8], "big") / 2.0**64


def is_gzip(head: bytes) -> bool:
  """Whether a file that starts with the bytes `head` (at least its first two) is gzip-compressed."""
  return head[:2] == GZIP_MAGIC


def text_problem(value: str) -> Optional[str]:
  """What makes the string `value` unusable as text (an unpaired surrogate, which UTF-8 cannot encode), or None.

  JSON's "\\ud800" escapes decode to lone surrogates, which no tokenizer (and no UTF-8 writer) takes.
  """
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    return (f"holds an unpaired surrogate {value[e.start]!r} at character {e.start}: expected text (a broken "
            "\\uXXXX escape?)")
  return None


def is_jsonl(source: Any) -> bool:
  """Whether `config.data.source` names your own pairs: a JSON-lines file (by its extension) or a Hugging Face
  `datasets` directory written by `save_to_disk` (`is_dataset_dir`)."""
  return isinstance(source, str) and (source.lower().endswith(".jsonl") or is_dataset_dir(source))


def is_dataset_dir(path: Any) -> bool:
  """A directory that `datasets.save_to_disk` wrote (a Dataset, or a DatasetDict with a "train" split)."""
  return isinstance(path, str) and any(
      os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _dataset_rows(path: str):
  """(where, row) of every row of a `datasets` directory (its "train" split if it is a DatasetDict)."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(f"config.data.source={path!r} is a Hugging Face datasets directory: reading it needs the "
                     "`datasets` package (pip install datasets).") from None
  try:
    data = datasets.load_from_disk(path)
  except Exception as e:  # pylint: disable=broad-except
    # The library's own failures on a damaged or empty directory include IndexError and KeyError.
    raise ValueError(f"{path}: not a readable datasets directory ({type(e).__name__}: {e}): expected a "
                     "directory written by datasets' save_to_disk.") from None
  if isinstance(data, datasets.DatasetDict):
    if "train" not in data:
      raise ValueError(f"{path}: a DatasetDict with splits {sorted(data)}: expected a 'train' split (held-out "
                       "prompts are chosen by a hash, data.eval_fraction).")
    data, path = data["train"], os.path.join(path, "train")
  for i, row in enumerate(data):
    # Arrow stores absent values as None (a column a row does not use, a struct field it lacks): drop them, but
    # keep a null label (a missing label, as a null in JSON), so that a row labelling none of the struct's
    # attributes reads as in a JSON-lines file instead of as an empty 'labels'.
    row = {
        k: ({
            a: x for a, x in v.items() if x is not None or k == "labels"
        } if isinstance(v, dict) else v) for k, v in row.items() if v is not None
    }
    yield f"{path}, row {i}", row


def _text_field(where: str, row: Dict[str, Any], field: str, allow_empty: bool = False) -> str:
  if field not in row:
    raise ValueError(f"{where}: field {field!r} is missing: expected a string.")
  value = row[field]
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {field!r} is {_json_type(value)}: expected a string.")
  if not allow_empty and not value.strip():
    raise ValueError(f"{where}: field {field!r} is empty: expected text.")
  problem = text_problem(value)
  if problem:
    raise ValueError(f"{where}: field {field!r} {problem}.")
  return value


# The fields of each layout; another field close to one of these (a typo: 'atribute') is refused, other extra
# fields (an id, a source) are ignored.
_LAYOUT_FIELDS = {
    "chosen": ("prompt", "chosen", "rejected", "attribute"),
    "pair": ("prompt", "response_a", "response_b", "labels", "scores_a", "scores_b")
}


def _check_fields(where: str, row: Dict[str, Any], layout: str) -> None:
  known = _LAYOUT_FIELDS[layout]
  other = _LAYOUT_FIELDS["pair" if layout == "chosen" else "chosen"]
  for field in row:
    if field in known:
      continue
    if field in other and field != "prompt":
      raise ValueError(f"{where}: field {field!r} belongs to the other layout: a row holds either {CHOSEN_FIELDS} "
                       f"(optionally 'attribute') or {PAIR_FIELDS} with 'labels' and/or 'scores_a' / 'scores_b'.")
    close = difflib.get_close_matches(field, known, n=1, cutoff=0.8)
    if close:
      raise ValueError(f"{where}: unknown field {field!r}; did you mean {close[0]!r}?")


def _name(where: str, field: str, name: Any) -> str:
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"{where}: field {field!r} has the attribute name {name!r}: expected a non-empty string.")
  if name != name.strip():  # " concise" and "concise" would become two bases.
    raise ValueError(f"{where}: field {field!r} has the attribute name {name!r}: expected no surrounding "
                     "whitespace.")
  problem = text_problem(name)
  if problem:  # Refused in text fields already; a name is written to basis.json and the logs as UTF-8 too.
    raise ValueError(f"{where}: field {field!r} has an attribute name that {problem}.")
  if name.startswith("-"):  # config.data.attributes reads a leading "-" as "negated": no setting could select it.
    raise ValueError(f"{where}: field {field!r} has the attribute name {name!r}: expected a name that does not "
                     "start with '-' (config.data.attributes negates an attribute with a leading '-').")
  return name


def _label(where: str, name: str, value: Any) -> Optional[int]:
  key = value.lower() if isinstance(value, str) else value
  if isinstance(key, bool) or not (key is None or isinstance(key, (str, int, float))) or key not in _LABELS:
    raise ValueError(f"{where}: labels[{name!r}] = {value!r}: expected 'a', 'b', 'tie', 1, 0, 0.5 or null.")
  return _LABELS[key]


def _score(where: str, field: str, name: str, value: Any) -> float:
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or abs(value) > MAX_SCORE):
    raise ValueError(f"{where}: {field}[{name!r}] = {_short(value)}: expected a finite number within "
                     f"+-{MAX_SCORE:g} (scores are stored in float32).")
  return float(value)


def _short(value: Any, limit: int = 40) -> str:
  """repr(value), an integer of many digits cut to its first and last digits and its length."""
  text = repr(value)
  if isinstance(value, int) and not isinstance(value, bool) and len(text) > limit:
    return f"{text[:12]}...{text[-6:]} ({len(text.lstrip('-'))} digits)"
  return text


def _finite(value: Any) -> bool:
  try:
    return math.isfinite(value)
  except OverflowError:  # An integer beyond float64.
    return False


def _parse_row(where: str, row: Any) -> Tuple[str, str, str, Dict[str, int], Dict[str, Tuple[float, float]]]:
  """(prompt, response_a, response_b, labels {name: 1 | 0 | -1 | None (missing)}, scores {name: (a, b)}) of one
  row."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: {_json_type(row)}: expected a JSON object.")
  if "chosen" in row or "rejected" in row:
    _check_fields(where, row, "chosen")
    prompt, a, b = (_text_field(where, row, f) for f in CHOSEN_FIELDS)
    name = _name(where, "attribute", row.get("attribute", DEFAULT_ATTRIBUTE))
    return prompt, a, b, {name: 1}, {}
  if not ("response_a" in row or "response_b" in row):
    raise ValueError(f"{where}: expected the fields {CHOSEN_FIELDS} (optionally 'attribute') or {PAIR_FIELDS} with "
                     f"'labels' and/or 'scores_a' / 'scores_b'; the row has {sorted(row)}.")
  _check_fields(where, row, "pair")
  prompt, a, b = (_text_field(where, row, f) for f in PAIR_FIELDS)
  labels, scores = {}, {}
  if "labels" in row:
    if not isinstance(row["labels"], dict) or not row["labels"]:
      raise ValueError(f"{where}: field 'labels' is {row['labels']!r}: expected an object {{attribute: 'a' | 'b' | "
                       "'tie'}.")
    labels = {_name(where, "labels", k): _label(where, k, v) for k, v in row["labels"].items()}
  if ("scores_a" in row) != ("scores_b" in row):
    raise ValueError(f"{where}: field {'scores_b' if 'scores_a' in row else 'scores_a'!r} is missing: scores come "
                     "in pairs (scores_a and scores_b).")
  if "scores_a" in row:
    sa, sb = row["scores_a"], row["scores_b"]
    for field, value in (("scores_a", sa), ("scores_b", sb)):
      if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: field {field!r} is {value!r}: expected an object {{attribute: number}}.")
    if set(sa) != set(sb):
      raise ValueError(f"{where}: scores_a has attributes {sorted(sa)} and scores_b {sorted(sb)}: expected the "
                       "same.")
    scores = {
        _name(where, "scores_a", k): (_score(where, "scores_a", k, sa[k]), _score(where, "scores_b", k, sb[k]))
        for k in sa
    }
    for k, (a_score, b_score) in scores.items():
      # The values as written: integers beyond float64's 2^53 that differ can have one float64 image.
      if sa[k] != sb[k] and np.float32(a_score) == np.float32(b_score):
        raise ValueError(f"{where}: scores_a[{k!r}] = {_short(sa[k])} and scores_b[{k!r}] = {_short(sb[k])} differ, "
                         "but not in float32 (about 7 significant digits), the precision scores are stored in: the "
                         "pair would read as a tie. Expected scores that differ in float32 (shift or rescale the "
                         "attribute's scores, e.g. subtract a common offset).")
    for k, label in labels.items():  # A tie (-1) must have equal scores too; null is no label (the scores decide).
      if k in scores and label is not None and (scores[k][0] > scores[k][1], scores[k][0]
                                                < scores[k][1]) != (label == 1, label == 0):
        raise ValueError(f"{where}: labels[{k!r}] disagrees with scores_a / scores_b ({scores[k][0]} vs "
                         f"{scores[k][1]}): it is {row['labels'][k]!r}.")
  if not labels and not scores:
    raise ValueError(f"{where}: a response_a / response_b row needs 'labels' or 'scores_a' / 'scores_b'.")
  return prompt, a, b, labels, scores


def _json_lines(path: str):
  """(where, row) of every non-blank line of a JSON-lines file."""
  with open(path, "rb") as f:
    if is_gzip(f.read(2)):
      raise ValueError(f"{path} is gzip-compressed: expected plain JSON-lines text (decompress it first).")
    f.seek(0)
    for number, raw in enumerate(f, start=1):
      where = f"{path}, line {number}"
      try:
        # A byte-order mark may open the file, or a line (files joined with `cat`): it is not text.
        line = raw.decode("utf-8-sig")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); "
                         "expected JSON lines in UTF-8.") from None
      if not line.strip():
        continue
      try:
        # Without its line break: an object cut short at the end of the line was reported at "line 2, column 1".
        row = json.loads(line.rstrip("\r\n"), object_pairs_hook=functools.partial(_unique_keys, where))
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({_decode_error(e, line, number)}).") from None
      except RecursionError:
        raise ValueError(f"{where}: nested too deeply to parse: expected a flat JSON object.") from None
      except _RowError:
        raise
      except ValueError as e:  # Python's limit on an integer's digits (4,300), raised inside the parser.
        raise ValueError(f"{where}: not JSON that can be read ({e}).") from None
      yield where, row


def _decode_error(e: json.JSONDecodeError, line: str, number: int) -> str:
  """json's message for a line that does not parse, with the likely cause of the common ones."""
  at = f"{e.msg} column {e.colno}" if e.msg.endswith(" at") else f"{e.msg} at column {e.colno}"
  if e.msg.startswith("Invalid control character"):
    return f"{at}: a raw tab or line break inside a string; JSON writes them escaped, as \\t and \\n"
  if e.msg == "Extra data" and "\r" in line.rstrip("\r\n"):
    return (f"{at}: the line holds carriage returns (\\r) between objects, old Mac line endings; expected one "
            "object per line, each line ending in \\n")
  if number == 1 and line.lstrip().startswith("["):
    return f"{at}: the file looks like one JSON array; expected JSON lines, one object per line"
  if line.strip() in ("{", "[") or (number > 1 and line[:1].isspace()):
    return f"{at}: a row spread over several lines (pretty-printed JSON); expected one object per line"
  return at


_JSON_TYPE_NAMES = {
    type(None): "null",
    bool: "true / false",
    int: "a number",
    float: "a number",
    str: "a string",
    list: "a JSON array",
    dict: "a JSON object"
}


def _json_type(value: Any) -> str:
  """What a parsed JSON value is, in JSON's words ("null", "a JSON array", ...); a datasets row's own type names."""
  return _JSON_TYPE_NAMES.get(type(value), f"a {type(value).__name__}")


class _RowError(ValueError):
  """A bad row found while parsing it (its message names the row)."""


def _unique_keys(where: str, pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
  """A JSON object's fields, refusing a repeated key (json keeps the last value, silently)."""
  out: Dict[str, Any] = {}
  for key, value in pairs:
    if key in out:
      raise _RowError(f"{where}: the key {key!r} appears twice in one object: expected each field once.")
    out[key] = value
  return out


def _warn_same_pairs(path: str, rows: List[Tuple[Any, ...]], places: List[str]) -> None:
  """Warns about rows that judge an attribute on the same two responses to the same prompt as an earlier row without
  repeating it (the pair mirrored, or judged differently): they are kept, each a judgement of its own (two opposite judgements
  of one pair pull its attribute's basis both ways, as disagreeing annotators do)."""
  exact = lambda row: (row[0], row[1], row[2], tuple(sorted(row[3].items())), tuple(sorted(row[4].items())))
  seen: Dict[Any, List[int]] = {}
  again = []
  for i, (prompt, a, b, labels, scores) in enumerate(rows):
    earlier = seen.setdefault((prompt, frozenset((a, b))), [])
    judged = set(labels) | set(scores)
    # The same attribute judged again; exact repeats are read()'s (or the caller's) to count.
    for j in earlier:
      if judged & (set(rows[j][3]) | set(rows[j][4])) and exact(rows[i]) != exact(rows[j]):
        again.append((i, j))
        break
    earlier.append(i)
  if again:
    i, first = again[0]
    logging.warning(
        "%s: %d row(s) judge an attribute on the same two responses to the same prompt as an earlier row, "
        "mirrored or differently (first: %s, the pair of %s); all are kept, each as a judgement of its own.", path,
        len(again), places[i].rsplit(", ", 1)[-1], places[first].rsplit(", ", 1)[-1])


def _warn_similar_names(path: str, names: List[str]) -> None:
  """Warns about attribute names that differ only in case, spacing or a letter or two ('helpfulness' and
  'Helpfullness'): each name is a basis of its own, which a misspelled label would silently create."""
  key = lambda name: " ".join(name.casefold().replace("_", " ").replace("-", " ").split())
  for i, name in enumerate(names):
    for other in names[:i]:
      if key(name) == key(other) or difflib.SequenceMatcher(None, key(name), key(other)).ratio() >= 0.9:
        logging.warning(
            "%s: the attributes %r and %r differ only slightly; they are separate bases (one per name): if they "
            "are one attribute, spell it one way.", path, other, name)
        return


def read(path: str, keep_repeats: bool = False) -> Dict[str, Any]:
  """Every row of `path`, checked (`keep_repeats`: keep rows that repeat an earlier row exactly, for a caller that
  counts them itself, as the `jsonl_prefs` builder does). Returns {"prompt", "response_a", "response_b": lists of
  str, "label": int8[N, A], "mask": bool[N, A], "scores_a" / "scores_b": f32[N, A] (NaN: missing) or None when no
  row has scores, "attributes": A names, "where": each row's place ("<path>, line <n>")}. Raises ValueError naming
  the file, the line and the field of the first bad row."""
  if os.path.isdir(path) and not is_dataset_dir(path):
    raise ValueError(f"config.data.source={path!r} is a directory without a dataset_info.json, dataset_dict.json "
                     "or state.json: expected a JSON-lines file of preference pairs, or a directory written by "
                     "datasets' save_to_disk.")
  if not (os.path.isfile(path) or is_dataset_dir(path)):
    raise ValueError(f"config.data.source={path!r}: no such file (expected a JSON-lines file of preference pairs, "
                     "or a directory written by datasets' save_to_disk).")
  rows: List[Tuple[str, str, str, Dict[str, int], Dict[str, Tuple[float, float]]]] = []
  places: List[str] = []
  layouts = set()
  named: Optional[Tuple[str, bool]] = None  # (where, whether it names its attribute) of the first chosen row.
  mixed = None  # The first chosen row that differs from it there.
  for where, row in (_dataset_rows(path) if is_dataset_dir(path) else _json_lines(path)):
    rows.append(_parse_row(where, row))
    places.append(where)
    layouts.add("chosen" if isinstance(row, dict) and "chosen" in row else "pair")
    if len(layouts) > 1:
      raise ValueError(f"{where}: mixes the chosen / rejected layout with the response_a / response_b layout of "
                       "earlier rows: expected one layout per file.")
    if layouts == {"chosen"}:
      if named is None:
        named = (where, "attribute" in row)
      elif mixed is None and named[1] != ("attribute" in row):
        mixed = where
  if mixed is not None:  # The rows without one train a basis of their own: say so (a forgotten field reads alike).
    without, with_ = (mixed, named[0]) if named[1] else (named[0], mixed)
    logging.warning(
        "%s: some chosen / rejected rows name their attribute (first: %s) and some do not (first: %s); those "
        "without one train a basis %r of their own. Write \"attribute\" on every row if that is not meant.", path,
        with_.rsplit(", ", 1)[-1],
        without.rsplit(", ", 1)[-1], DEFAULT_ATTRIBUTE)
  if not rows:
    raise ValueError(f"{path} holds no rows: expected one JSON object per line.")
  same = [i for i, r in enumerate(rows) if r[1] == r[2]]
  if same:
    if len(same) == len(rows):
      raise ValueError(f"{path}: every row's two responses are the same text: a pair needs two different responses.")
    logging.warning(
        "%s: %d row(s) whose two responses are the same text (first: %s) carry no preference and are "
        "left out.", path, len(same), places[same[0]].rsplit(", ", 1)[-1])
    same = set(same)
    keep = [i for i in range(len(rows)) if i not in same]
    rows, places = [rows[i] for i in keep], [places[i] for i in keep]
  # A row that repeats an earlier one exactly is kept once (as the TFDS builder `jsonl_prefs` does): a repeated row
  # would count twice in the loss.
  first_of: Dict[Any, int] = {}
  repeats = []
  for i, (prompt, a, b, labels, scores) in enumerate([] if keep_repeats else rows):
    key = (prompt, a, b, tuple(sorted(labels.items())), tuple(sorted(scores.items())))
    if key in first_of:
      repeats.append((i, first_of[key]))
    else:
      first_of[key] = i
  if repeats:
    i, first = repeats[0]
    logging.warning(
        "%s: %d row(s) repeat an earlier row exactly (first: %s repeats %s) and are left out: each is "
        "kept once.", path, len(repeats), places[i].rsplit(", ", 1)[-1], places[first].rsplit(", ", 1)[-1])
    left_out = {i for i, _ in repeats}
    keep = [i for i in range(len(rows)) if i not in left_out]
    rows, places = [rows[i] for i in keep], [places[i] for i in keep]
  _warn_same_pairs(path, rows, places)
  scored = [bool(r[4]) for r in rows]
  if any(scored) and not all(scored):
    first, without = scored.index(True), scored.index(False)
    raise ValueError(f"{places[without]}: no scores, where {places[first].rsplit(', ', 1)[-1]} has scores_a / "
                     "scores_b: expected scores on every row or on none.")
  names: Dict[str, int] = {}
  for _, _, _, labels, scores in rows:
    for name in list(labels) + list(scores):
      names.setdefault(name, len(names))
  _warn_similar_names(path, list(names))
  n, a = len(rows), len(names)
  label = np.full((n, a), -1, np.int8)
  mask = np.zeros((n, a), bool)
  has_scores = any(r[4] for r in rows)
  scores_a = np.full((n, a), np.nan, np.float32) if has_scores else None
  scores_b = np.full((n, a), np.nan, np.float32) if has_scores else None
  for i, (_, _, _, labels, scores) in enumerate(rows):
    for name, value in labels.items():
      if value is not None:  # null: this pair is missing for the attribute (mask False), not a tie.
        label[i, names[name]], mask[i, names[name]] = value, True
    for name, (sa, sb) in scores.items():
      j = names[name]
      scores_a[i, j], scores_b[i, j], mask[i, j] = sa, sb, True
      label[i, j] = 1 if sa > sb else (0 if sa < sb else -1)
  return {
      "prompt": [r[0] for r in rows],
      "response_a": [r[1] for r in rows],
      "response_b": [r[2] for r in rows],
      "label": label,
      "mask": mask,
      "scores_a": scores_a,
      "scores_b": scores_b,
      "attributes": tuple(names),
      "where": places,
  }
