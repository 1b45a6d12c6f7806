"""The decoding engine: many row programs in one loop, each row equal to the single-policy decoder it stands for."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_soup.soup import decoding
from spectral_soup.soup import engine
from spectral_soup.soup import serving
from tests import tiny

H = 3
PROMPT = np.array([[1, 2, 3, 4, 5], [0, 0, 6, 7, 8], [9, 10, 11, 0, 0]], np.int32)
MASK = PROMPT != 0
N = 6
GREEDY = decoding.SamplingConfig(temperature=0.0)


@pytest.fixture(scope="module", params=[False, True], ids=["heads", "heads+bias"])
def policy(request):
  return tiny.tiny_policy("heads", num_bases=H, logit_bias=request.param)


def _decode(policy, rows, **kw):
  pol, params = policy
  prompts = engine.prefill(pol, params, PROMPT, MASK, max_len=PROMPT.shape[1] + N)
  tokens, aux = engine.decode_rows(pol, params, prompts, rows, jax.random.key(0), max_new_tokens=N, **kw)
  return np.asarray(tokens), jax.device_get(aux)


def test_rows_match_single_policy_decoders(policy):
  """Explicit, params, reference and one-hot rows reproduce `serving.generate` (greedy), prompts shared."""
  pol, params = policy
  lam = np.array([0.5, -0.2, 0.4], np.float32)
  programs = [("explicit", lam), ("params", lam), ("explicit", np.zeros(H)), ("params", np.eye(H)[1])]
  modes, lam_rows, index = [], [], []
  for kind, c in programs:
    for p in range(len(PROMPT)):
      modes.append(kind), lam_rows.append(c), index.append(p)
  rows = engine.make_rows(modes, np.stack(lam_rows), prompt_index=index)
  tokens, aux = _decode(policy, rows, sampling=GREEDY)
  for i, (kind, c) in enumerate(programs):
    want, _ = serving.generate(pol, params, np.broadcast_to(c, (3, H)), PROMPT, MASK, mode="explicit", max_new_tokens=N)
    np.testing.assert_array_equal(tokens[3 * i:3 * i + 3], np.asarray(want), err_msg=kind)
  # Reference rows have zero KL; the others positive.
  np.testing.assert_allclose(aux["stats"]["kl"][6:9], 0.0, atol=1e-5)
  assert np.all(aux["stats"]["kl"][:6] > 1e-4)


def test_many_rows_from_one_prompt_decode_like_one_row(policy):
  """128 identical rows continuing one prefilled prompt: every row is the one-row decode, stats included.

  Gathered from a single prompt the rows' state is a broadcast; jaxlib 0.10.2's YNN dot fusion got the heads'
  product of a broadcast operand wrong on AVX-512 EPYCs (126 of 128 rows off, log-probs by up to 26 nats).
  """
  pol, params = policy
  prompts = engine.prefill(pol, params, PROMPT[:1], MASK[:1], max_len=PROMPT.shape[1] + N)
  lam = np.array([0.5, -0.2, 0.4], np.float32)
  decode = lambda rows: jax.device_get(
      engine.decode_rows(pol, params, prompts, rows, jax.random.key(0), max_new_tokens=N, sampling=GREEDY))
  one_tokens, one = decode(engine.make_rows(["explicit"], lam[None]))
  tokens, many = decode(engine.make_rows(["explicit"] * 128, np.tile(lam, (128, 1)), prompt_index=[0] * 128))
  np.testing.assert_array_equal(tokens, np.repeat(one_tokens, 128, axis=0))
  for name in ("kl", "ref_logp"):
    np.testing.assert_allclose(many["stats"][name], np.repeat(one["stats"][name], 128), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(many["logprobs"], np.repeat(one["logprobs"], 128, axis=0), rtol=1e-5, atol=1e-5)


def test_stats_are_sequence_logprobs(policy):
  """The per-head and reference log-probs summed during decoding equal a forward pass over the responses."""
  pol, params = policy
  rows = engine.make_rows(["explicit"] * 3, np.full((3, H), 0.3, np.float32))
  tokens, aux = _decode(policy, rows, sampling=decoding.SamplingConfig(temperature=1.0))
  out = serving.sequence_logprobs(pol, params, PROMPT, MASK, tokens, np.ones_like(tokens, bool))
  np.testing.assert_allclose(aux["stats"]["ref_logp"], out["ref"], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(aux["stats"]["head_logp"], np.asarray(out["basis"]).T, rtol=1e-4, atol=1e-4)


def test_guided_rows(policy):
  """A zero guide is the reference; a table favoring one token makes greedy decoding emit it."""
  vocab = tiny.VOCAB
  table = np.zeros((2, vocab), np.float32)
  table[1, 7] = 1.0
  rows = engine.make_rows(["guided"] * 3 + ["guided"] * 3, np.zeros((6, H)),
                          guide=np.array([[0.0, 0.0]] * 3 + [[0.0, 1.0]] * 3), prompt_index=[0, 1, 2] * 2)
  tokens, _ = _decode(policy, rows, sampling=GREEDY, guide_table=jnp.asarray(table), guide_scale=100.0)
  ref, _ = serving.generate(policy[0], policy[1], np.zeros((3, H)), PROMPT, MASK, max_new_tokens=N)
  np.testing.assert_array_equal(tokens[:3], np.asarray(ref))
  assert np.all(tokens[3:] == 7)


def test_implicit_rows_report_acceptance(policy):
  rows = engine.make_rows(["implicit"] * 3, np.full((3, H), 0.3, np.float32))
  tokens, aux = _decode(policy, rows, max_proposals=16)
  assert tokens.shape == (3, N)
  rate = aux["stats"]["accepted"] / np.maximum(aux["stats"]["proposals"], 1)
  assert np.all((rate > 0) & (rate <= 1))


def test_bad_lam_fails_on_host():
  with pytest.raises(ValueError, match="lam row 1"):
    engine.make_rows(["explicit"] * 2, np.array([[0.0, 0.0], [np.nan, 0.0]]))
  # A NaN guide weight decoded the last token id at every step with NaN log-probs; a fractional mode id was
  # truncated (1.7: 'params').
  with pytest.raises(ValueError, match=r"guide row 1 is not finite"):
    engine.make_rows(["guided"] * 2, np.zeros((2, 2)), guide=[[0.5], [np.nan]])
  with pytest.raises(ValueError, match=r"guide must be \[B=2, A\]"):
    engine.make_rows(["guided"] * 2, np.zeros((2, 2)), guide=[0.5, 0.5])
  for mode in (1.7, 1.0, True):
    with pytest.raises(ValueError, match=r"unknown decoding modes .* integer ids 0..3"):
      engine.make_rows([mode], np.zeros((1, 2)))
  assert engine.make_rows([np.int64(1), 2], np.zeros((2, 2))).mode.tolist() == [1, 2]


def test_support_path_equals_full_vocabulary(policy):
  """Heads zero outside a support S: decoding with the support (no [H, B, V] arrays) gives the same tokens, head
  log-probs and KL as the full-vocabulary path."""
  pol, params = policy
  support = np.arange(2, tiny.VOCAB, 3).astype(np.int32)
  outside = np.setdiff1d(np.arange(tiny.VOCAB), support)
  heads = {**params["heads"], "b": params["heads"]["b"].at[:, :, outside].set(0.0)}
  if "c" in heads:
    heads["c"] = heads["c"].at[:, outside].set(0.0)
  params = {**params, "heads": heads}
  restricted = (pol, params)
  rows = engine.make_rows(["explicit", "params", "explicit", "guided", "implicit", "implicit"],
                          np.array([[0.5, -0.2, 0.4]] * 2 + [[0.0, 1.0, 0.0]] + [[0.0] * 3] + [[0.3, 0.3, 0.0]] * 2,
                                   np.float32), guide=np.array([[0.0], [0.0], [0.0], [1.0], [0.0], [0.0]]),
                          prompt_index=[0, 1, 2, 0, 1, 2])
  table = jnp.asarray(np.random.default_rng(0).normal(size=(1, tiny.VOCAB)), jnp.float32)
  kw = dict(sampling=decoding.SamplingConfig(temperature=1.0), guide_table=table, guide_scale=2.0, max_proposals=8)
  prompts = engine.prefill(pol, params, PROMPT, MASK, max_len=PROMPT.shape[1] + N)
  full_tokens, full = engine.decode_rows(pol, params, prompts, rows, jax.random.key(3), max_new_tokens=N, **kw)
  sup_tokens, sup = engine.decode_rows(pol, params, prompts, rows, jax.random.key(3), max_new_tokens=N,
                                       support=jnp.asarray(support), **kw)
  np.testing.assert_array_equal(np.asarray(sup_tokens), np.asarray(full_tokens))
  for name in ("head_logp", "ref_logp", "kl"):
    np.testing.assert_allclose(sup["stats"][name], full["stats"][name], rtol=1e-4, atol=1e-4, err_msg=name)
  del restricted


def test_bad_inputs_fail_while_tracing(policy):
  """Shapes that do not fit the policy, the prompts' pass or each other are refused while tracing (before XLA
  compiles anything), naming the input."""
  pol, params = policy
  prompts = engine.prefill(pol, params, PROMPT, MASK, max_len=PROMPT.shape[1] + N)
  good = engine.make_rows(["explicit"] * 3, np.zeros((3, H), np.float32))
  decode = lambda rows, **kw: engine.decode_rows(pol, params, kw.pop("prompts", prompts), rows, jax.random.key(0),
                                                 max_new_tokens=N, **kw)
  with pytest.raises(ValueError, match=r"rows.lam must be \[B=3, H=3\]"):
    decode(engine.make_rows(["explicit"] * 3, np.zeros((3, H + 1), np.float32)))
  with pytest.raises(ValueError, match=r"rows.seed has 2 rows"):
    decode(good.replace(seed=good.seed[:2]))
  with pytest.raises(ValueError, match=r"guide_table must be \[A=1, V=64\]"):
    decode(good, guide_table=jnp.zeros((2, tiny.VOCAB)))
  with pytest.raises(ValueError, match="not prefilled for passes='separate'"):
    decode(good, passes="separate")
  with pytest.raises(ValueError, match="does not serve basis_kind='heads'"):
    decode(good, passes="stacked")
  with pytest.raises(ValueError, match="passes='merged' prefills each prompt"):
    engine.prefill(pol, params, PROMPT, MASK, max_len=PROMPT.shape[1] + N, passes="merged")


def test_a_cache_without_room_for_the_new_tokens_is_refused(policy):
  """A cache too small for prompt + max_new_tokens overwrote its last slot at every step: wrong tokens (a quarter
  of greedy tokens equal to transformers' with 9 slots for 8 + 16), no error."""
  pol, params = policy
  rows = engine.make_rows(["explicit"] * 3, np.full((3, H), 0.3, np.float32))
  prompts = engine.prefill(pol, params, PROMPT, MASK, max_len=PROMPT.shape[1] + N - 1)
  with pytest.raises(
      ValueError, match=r"prefilled with max_len=10 slots and hold 5 tokens: no room for "
      r"max_new_tokens=6 \(prefill with max_len >= 11\)"):
    engine.decode_rows(pol, params, prompts, rows, jax.random.key(0), max_new_tokens=N)
  model = pol.config
  from spectral_soup.models import transformer  # pylint: disable=g-import-not-at-top
  backbone = transformer.Transformer(model)
  backbone_params = params["features"]["backbone"]
  for slots in (PROMPT.shape[1] + N - 1, PROMPT.shape[1] - 1):
    with pytest.raises(ValueError, match=rf"the cache has {slots} slots, fewer than the prompt's 5 \+ "
                       r"max_new_tokens=6"):
      decoding.decode(decoding.model_logits_fn(backbone), backbone_params, PROMPT, MASK,
                      transformer.init_cache(model, 3, slots), jax.random.key(0), max_new_tokens=N)
  with pytest.raises(ValueError, match=r"prompt_mask bool\[B, T\] of the same shape, got \(3, 5\) and \(3, 4\)"):
    decoding.decode(decoding.model_logits_fn(backbone), backbone_params, PROMPT, MASK[:, :4],
                    transformer.init_cache(model, 3, 11), jax.random.key(0), max_new_tokens=N)
  # A NaN guide scale decoded the last token id at every step (traced inside the loop: checked before it).
  with pytest.raises(ValueError, match=r"guide_scale must be finite"):
    engine.decode_rows(pol, params, engine.prefill(pol, params, PROMPT, MASK, max_len=11), rows, jax.random.key(0),
                       guide_scale=float("nan"), max_new_tokens=N)


def test_rows_refuse_weights_past_the_soups_bound():
  """The main job's frontier builds rows as strength x lam: past +-1e6 the soup's float32 log-probs overflow."""
  engine.make_rows(["explicit"], [[1e6, -1e6]])
  with pytest.raises(ValueError, match=r"lam\[1, 1\] = -3e\+06: mixing weights must lie within \+-1e\+06"):
    engine.make_rows(["explicit", "explicit"], [[1.0, 0.0], [0.0, -3e6]])
