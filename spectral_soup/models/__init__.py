"""Models: the Flax decoder LM, the spectral feature map and basis policies, and checkpoint import."""

from spectral_soup.models.config import TransformerConfig
from spectral_soup.models.config import gemma3
from spectral_soup.models.config import gpt2
from spectral_soup.models.config import llama
from spectral_soup.models.hf_import import config_from_hf
from spectral_soup.models.hf_import import config_from_pretrained
from spectral_soup.models.hf_import import from_pretrained
from spectral_soup.models.hf_import import load_hf_checkpoint
from spectral_soup.models.hf_import import params_from_state_dict
from spectral_soup.models.hf_import import tokenizer_from_pretrained
from spectral_soup.models.spectral import BasisHeads
from spectral_soup.models.spectral import LoraBases
from spectral_soup.models.spectral import SpectralFeatureMap
from spectral_soup.models.spectral import SpectralPolicy
from spectral_soup.models.spectral import init_policy_cache
from spectral_soup.models.spectral import with_backbone
from spectral_soup.models.transformer import Transformer
from spectral_soup.models.transformer import init_cache
