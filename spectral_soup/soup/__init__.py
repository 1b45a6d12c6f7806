"""Souping math: combine K basis policies into one user's policy (docs/METHOD.md section 4)."""

from spectral_soup.soup.explicit import mod_combine
from spectral_soup.soup.explicit import soup_logits
from spectral_soup.soup.explicit import soup_logits_batched
from spectral_soup.soup.implicit import rejection_sample
from spectral_soup.soup.parameters import lora_delta
from spectral_soup.soup.parameters import soup_lora_concat
from spectral_soup.soup.parameters import soup_lora_dense
from spectral_soup.soup.parameters import soup_params
from spectral_soup.soup.validation import check_lam
