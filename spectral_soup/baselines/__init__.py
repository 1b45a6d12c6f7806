"""Baselines run in the same harness as spectral souping: PAD's token-level attribute rewards (`pad.py`), decoded
as `guided` rows of `spectral_soup.soup.engine`; P-Soups, the MOD-style oracle, the uniform soup, the reference
and the bespoke heads are row programs of `spectral_soup.eval.harness` (see `experiments/main.py`)."""
