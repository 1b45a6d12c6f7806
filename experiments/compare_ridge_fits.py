r"""Which closed-form fit of the logit-vector bases buys the most true reward per nat of KL? (dev split only)

  python -m experiments.compare_ridge_fits [--fits=pair_surprise,surprise,counts] [--users=16] [--users_seed=100]
      [--scales=0.5,1,1.5] [--json=ridge_fits.json]

On the demo's data (`configs/demo.py`, read from the cache the main job fills) the held-out prompts are dropped
unseen, and the training prompts are split again as `--config.eval.split=dev` splits them: the fits see the dev
training part, the policies answer the dev evaluation part. For each `basis.init_features` in --fits
(`offline.ridge_init.ridge_logit_bias`) it fits the K attribute bases and one head per simulated user of the user
stream's *training* split (the user's true reward: for these linear fits, the soup of the bases at the user's true
weights), then decodes in one loop (common random numbers): the reference, each basis alone (scale 1) and every
user's head at each of --scales. Prints and writes: each basis's shift of every attribute (standardized, paired with
the reference, 90% bootstrap interval) and its KL; each fit's reward-KL frontier; and every fit's gain over the
reference read along its frontier at the KL of each fit's scale-1 heads (`eval.metrics.frontiers`). The
measurements in docs/METHOD.md section 3 come from this script with its defaults.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

from spectral_soup.utils import files


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.compare_ridge_fits", description=__doc__.split("\n")[0])
  p.add_argument("--fits", default="pair_surprise,surprise,counts", help="basis.init_features values, comma-separated.")
  p.add_argument("--users", type=int, default=16, help="Simulated users (training split of the user stream).")
  p.add_argument("--users_seed", type=int, default=100, help="Their seed.")
  p.add_argument("--scales", default="0.5,1,1.5", help="Strengths of each user's head (1 must be one of them).")
  p.add_argument("--seed", type=int, default=7, help="Sampling seed of the decoding loop.")
  p.add_argument("--json", default="ridge_fits.json", help="Where to write the numbers.")
  args = p.parse_args(argv)
  from spectral_soup.offline import ridge_init  # pylint: disable=g-import-not-at-top
  args.fits = tuple(args.fits.split(","))
  bad = [f for f in args.fits if f not in ridge_init.RIDGE_FEATURES]
  if bad or not args.fits:
    p.error(f"--fits={','.join(args.fits)}: expected names among {', '.join(ridge_init.RIDGE_FEATURES)}.")
  if len(set(args.fits)) < len(args.fits):
    p.error(f"--fits={','.join(args.fits)}: a fit is listed more than once.")
  scales = args.scales
  expected = "expected positive strengths including 1, comma-separated (e.g. 0.5,1,1.5)"
  values = []
  for text in scales.split(","):
    try:
      values.append(float(text))
    except ValueError:
      p.error(f"--scales={scales}: {text.strip()!r} is not a number; {expected}.")
  args.scales = tuple(values)
  bad = [s for s in args.scales if not (math.isfinite(s) and s > 0)]
  if bad or 1.0 not in args.scales:
    problem = f"{bad[0]:g} is not a finite number > 0" if bad else "1 is missing"
    p.error(f"--scales={scales}: {problem}; {expected}.")
  if len(set(args.scales)) < len(args.scales):
    p.error(f"--scales={scales}: a strength is listed more than once.")
  if args.users < 1:
    p.error(f"--users={args.users}: expected >= 1.")
  problem = files.output_file_problem("--json", args.json)
  if problem:
    p.error(problem)
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from spectral_soup import models  # pylint: disable=g-import-not-at-top
  from spectral_soup.baselines import pad as pad_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.data import embedded  # pylint: disable=g-import-not-at-top
  from spectral_soup.data import rewards as rewards_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.eval import harness as harness_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.eval import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.models import build  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import feature_cache  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import features, ridge_init, train  # pylint: disable=g-import-not-at-top
  from spectral_soup.offline import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.online import users as users_lib  # pylint: disable=g-import-not-at-top
  from spectral_soup.soup import decoding  # pylint: disable=g-import-not-at-top

  config = demo.get_config()
  d = config.data
  tokenizer = models.tokenizer_from_pretrained(config.model.path)
  # The dev split of experiments/main.py: held-out prompts dropped, the training prompts split again.
  data = pairs_lib.embedded_data(config, tokenizer, dev=True)
  pairs, arrays, is_eval = data.pairs, data.arrays, data.is_eval
  model, backbone = models.from_pretrained(config.model.path, dtype=config.model.dtype,
                                           weight_dtype=config.model.weight_dtype)
  attributes = tuple(d.attributes)
  num_attr, num_users = len(attributes), args.users
  suite = rewards_lib.RewardSuite(list(attributes), stats=data.stats)
  std = {side: data.standardized(side) for side in "ab"}
  users = users_lib.make_users("dirichlet", num_users, args.users_seed, split="train", num_attributes=num_attr,
                               temperature=config.users.temperature, concentration=config.users.concentration)
  rewards = {side: np.asarray(users_lib.true_reward(users, std[side])).T for side in "ab"}  # [N, U]
  fields = ("prompt", "prompt_mask", "response_a", "response_a_mask", "response_b", "response_b_mask")
  labels = np.concatenate(
      [arrays["labels"], embedded.pair_labels(rewards["a"], rewards["b"], d.tie_margin, fit=~is_eval)], 1)
  split = lambda m: {
      **{
          f: arrays[f][m] for f in fields
      }, "labels": labels[m],
      **{
          f"scores_{s}": np.concatenate([std[s], rewards[s]], 1)[m] for s in "ab"
      }
  }
  train_pairs, dev_pairs = split(~is_eval), split(is_eval)

  # The cached feature pass (reference probabilities on the support) of a throwaway basis run.
  train_config = ml_collections.ConfigDict(config.to_dict())
  train_config.basis.num_bases = num_attr + num_users
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(train_config, workdir, pairs=(train_pairs, dev_pairs), loaded=(model, backbone))
    train_pairs.update(feature_cache.load_features(glob.glob(os.path.join(workdir, "features-*.npz"))[0])["train"])
  support = features.select_support([train_pairs["response_a"], train_pairs["response_b"]],
                                    [train_pairs["response_a_mask"], train_pairs["response_b_mask"]],
                                    config.basis.vocab_support, model.config.vocab_size)
  vocab, heads_per_fit = model.config.vocab_size, num_attr + num_users
  logits = np.concatenate([
      ridge_init.ridge_logit_bias(train_pairs, support, vocab, beta=config.loss.beta,
                                  rating_scale=config.loss.rating_scale, l2=config.basis.init_l2, features=fit)
      for fit in args.fits
  ])
  num_heads = len(logits)
  basis_cfg = ml_collections.ConfigDict({**train_config.basis.to_dict(), "num_bases": num_heads})
  policy = build.build_policy(model.config, basis_cfg)
  params = build.merge_params({"heads": {"c": logits}}, build.unboxed(backbone))
  counts = pad_lib.token_counts([train_pairs["response_a"], train_pairs["response_b"]],
                                [train_pairs["response_a_mask"], train_pairs["response_b_mask"]], support)
  pad_table = pad_lib.fit_token_rewards(counts, np.concatenate([std["a"][~is_eval], std["b"][~is_eval]]), support,
                                        vocab, l2=config.eval.pad_l2)  # Unused (no guided rows): the harness needs one.
  pool = np.flatnonzero(is_eval)
  prompt_text = [pairs[i]["prompt"] for i in pool]

  def score_fn(prompts, tokens, lengths):
    texts = [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True).strip() for row, n in zip(tokens, lengths)]
    return suite(prompts, texts, standardize=True)

  harness = harness_lib.PolicyHarness(policy, params, arrays["prompt"][pool], arrays["prompt_mask"][pool], prompt_text,
                                      score_fn, num_bases=num_attr, beta=config.loss.beta,
                                      max_new_tokens=config.eval.max_new_tokens, eos_id=tokenizer.eos_token_id,
                                      pad_id=tokenizer.pad_token_id or 0, pad_table=pad_table, support=support,
                                      head_support=support, chunk_rows=config.eval.chunk_rows,
                                      max_proposals=config.eval.max_proposals,
                                      sampling=decoding.SamplingConfig(temperature=1.0))
  eye = np.eye(num_heads, dtype=np.float32)
  programs = [harness_lib.Program("reference", None, "explicit", np.zeros(num_heads, np.float32))]
  for f, fit in enumerate(args.fits):
    first = f * heads_per_fit
    programs += [
        harness_lib.Program(f"{fit}/basis:{a}", None, "explicit", eye[first + k]) for k, a in enumerate(attributes)
    ]
    programs += [
        harness_lib.Program(fit, u, "explicit", s * eye[first + num_attr + u], scale=s)
        for u in range(num_users)
        for s in args.scales
    ]
  t0 = time.time()
  out = harness.evaluate(programs, np.arange(len(pool)), jax.random.key(args.seed), 1)
  decode_s = time.time() - t0

  num_e = len(pool)
  shared = {
      prog.method: out["scores"][p].reshape(num_e, num_attr) for p, prog in enumerate(programs) if prog.user is None
  }
  shared_kl = {prog.method: float(out["kl"][p].mean()) for p, prog in enumerate(programs) if prog.user is None}
  reference = np.asarray(users_lib.true_reward(users, shared["reference"])).reshape(num_users, num_e)
  sweeps = {}
  for p, prog in enumerate(programs):
    if prog.user is None:
      continue
    reward = np.asarray(users_lib.true_reward(users, out["scores"][p].reshape(-1, num_attr))).reshape(num_users, -1)
    sweep = sweeps.setdefault(prog.method, {}).setdefault(prog.scale, (np.zeros(
        (num_users, num_e)), np.zeros((num_users, num_e))))
    sweep[0][prog.user], sweep[1][prog.user] = reward[prog.user], out["kl"][p].reshape(num_e)
  result = {
      "fits": list(args.fits),
      "attributes": list(attributes),
      "users": num_users,
      "dev_prompts": num_e,
      "dev_train_prompts": int((~is_eval).sum()),
      "decode_s": decode_s,
      "bases": {},
      "read_at": {}
  }
  for fit in args.fits:
    shift = metrics_lib.attribute_shift(np.stack([shared[f"{fit}/basis:{a}"] for a in attributes]), shared["reference"],
                                        num_bootstrap=config.eval.num_bootstrap, seed=0)
    result["bases"][fit] = {
        "shift": shift["shift"].tolist(),
        "shift_ci": np.asarray(shift["ci"]).tolist(),
        "kl": [shared_kl[f"{fit}/basis:{a}"] for a in attributes]
    }
  for fit in args.fits:  # Every fit's frontier read at the KL of this fit's heads at scale 1.
    trade = metrics_lib.frontiers(sweeps, reference, sweeps[fit][1.0], num_bootstrap=config.eval.num_bootstrap, seed=0)
    result["frontier"] = trade["frontier"]
    result["read_at"][fit] = {
        "kl": trade["bespoke_kl"],
        "gain": {
            m: g["gain"] for m, g in trade["at_bespoke_kl"].items()
        },
        "gain_ci": {
            m: g["gain_ci"] for m, g in trade["at_bespoke_kl"].items()
        }
    }

  print(f"{num_users} training-split users, {num_e} dev prompts ({result['dev_train_prompts']} to fit), "
        f"decoded in {decode_s:.0f} s")
  for fit in args.fits:
    own = np.diag(np.asarray(result["bases"][fit]["shift"]))
    low = np.diag(np.asarray(result["bases"][fit]["shift_ci"])[..., 0])
    print(f"{fit:>14} bases, own attribute shift: " +
          "  ".join(f"{a} {x:+.2f} [{lo:+.2f}]" for a, x, lo in zip(attributes, own, low)))
  for fit, read in result["read_at"].items():
    print(f"gain at {read['kl']:.2f} nats ({fit} at scale 1): " +
          "  ".join(f"{m} {g:+.3f}" for m, g in read["gain"].items()))
  files.write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
