"""Baselines run in the same harness as spectral souping (see `spectral_soup.eval.methods`)."""
