"""Hugging Face (transformers) configs -> `TransformerConfig`, refusing any feature the model does not implement.

Supported families: GPT-2 (`gpt2`), Llama (`llama`, and `mistral`, which is Llama with a sliding window on every
layer) and Gemma 3 (`gemma3_text`, and the text half of the multimodal `gemma3`). `hf_import` maps the weights.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple

from spectral_soup.models.config import TransformerConfig

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "gemma3_text", "gemma3")

# HF activation name -> ours (only names whose formula is exactly one of ours).
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}


def _unsupported(model_type: str, field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"{model_type} config field {field}={value!r} is not supported: {why}.")


def _given(value: Any, default: Any) -> Any:
  """`value`, or `default` where the config leaves the field out (None); a given 0 stays 0 (and is refused by the
  TransformerConfig checks, naming the field) instead of silently becoming the default."""
  return default if value is None else value


def _activation(model_type: str, field: str, value: Any) -> str:
  if value not in _ACTIVATIONS:
    raise _unsupported(model_type, field, value, f"supported activations are {sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[value]


def _positive_number(model_type: str, field: str, value: Any) -> float:
  """A rope parameter the config states: a finite number > 0 (null or "10000" ran with the default, or a string's
  value, where transformers' own model fails)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
    raise _unsupported(model_type, field, value, "expected a finite number > 0")
  return float(value)


def _rope(model_type: str, field: str, params: Optional[Mapping[str, Any]], default_theta: float,
          allow_linear: bool = True) -> Tuple[float, float]:
  """(theta, linear scale) from one HF rope-parameter dict; raises on rope types we do not implement."""
  params = dict(params or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  theta = _positive_number(model_type, f"{field}.rope_theta",
                           params["rope_theta"]) if "rope_theta" in params else (float(default_theta))
  partial = params.get("partial_rotary_factor", 1.0)
  if partial not in (None, 1, 1.0):
    raise _unsupported(model_type, f"{field}.partial_rotary_factor", partial, "only full rotary embeddings")
  if rope_type == "default":
    return theta, 1.0
  if rope_type == "linear":
    factor = _positive_number(model_type, f"{field}.factor", params["factor"]) if "factor" in params else 1.0
    if factor != 1.0 and not allow_linear:
      raise _unsupported(model_type, f"{field}.factor", factor,
                         "linear rope scaling is only implemented for global (full-attention) layers")
    return theta, factor
  raise _unsupported(model_type, f"{field}.rope_type", rope_type, "supported rope types are 'default' and 'linear'")


def _flat_rope_params(hf: Any) -> Dict[str, Any]:
  """A single (not per-layer-type) rope dict from transformers 5 `rope_parameters` or legacy fields."""
  params = dict(getattr(hf, "rope_parameters", None) or {})
  legacy = getattr(hf, "rope_scaling", None)
  if legacy:
    params = {**dict(legacy), **params}
  if "rope_theta" not in params and getattr(hf, "rope_theta", None) is not None:
    params["rope_theta"] = hf.rope_theta
  return params


def _require_false(model_type: str, hf: Any, fields: Mapping[str, str]) -> None:
  """Raises for the first of `fields` (name -> why unsupported) that is set in the HF config."""
  for field, why in fields.items():
    value = getattr(hf, field, None)
    if value:
      raise _unsupported(model_type, field, value, why)


_NO_BIAS = "our projections have biases on all of attention and MLP or on none, and this family has none"


def _gpt2_fields(hf: Any) -> Dict[str, Any]:
  mt = "gpt2"
  _require_false(
      mt, hf, {
          "scale_attn_by_inverse_layer_idx": "per-layer attention scaling is not implemented",
          "add_cross_attention": "decoder-only models only"
      })
  d, h = hf.n_embd, hf.n_head
  if d % h:
    raise _unsupported(mt, "n_head", h, f"n_embd={d} must be a multiple of it")
  return dict(family="gpt2", vocab_size=hf.vocab_size, num_layers=hf.n_layer, embed_dim=d, num_heads=h, num_kv_heads=h,
              head_dim=d // h, mlp_dim=hf.n_inner or 4 * d, max_len=hf.n_positions, norm="layer",
              norm_eps=hf.layer_norm_epsilon, activation=_activation(mt, "activation_function", hf.activation_function),
              gated_mlp=False, use_bias=True, learned_positions=True,
              query_scale=None if getattr(hf, "scale_attn_weights", True) else 1.0,
              tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)))


def _llama_fields(hf: Any) -> Dict[str, Any]:
  mt = hf.model_type
  _require_false(mt, hf, {"attention_bias": _NO_BIAS, "mlp_bias": _NO_BIAS})
  if getattr(hf, "layer_types", None) and any(t != "full_attention" for t in hf.layer_types):
    raise _unsupported(mt, "layer_types", hf.layer_types, "only 'full_attention' layers")
  heads = hf.num_attention_heads
  theta, scale = _rope(mt, "rope_parameters", _flat_rope_params(hf), 10_000.0)
  fields = dict(family="llama", vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
                num_heads=heads, num_kv_heads=_given(getattr(hf, "num_key_value_heads", None),
                                                     heads), head_dim=_given(getattr(hf, "head_dim", None),
                                                                             hf.hidden_size // heads),
                mlp_dim=hf.intermediate_size, max_len=hf.max_position_embeddings, norm="rms", norm_eps=hf.rms_norm_eps,
                activation=_activation(mt, "hidden_act",
                                       hf.hidden_act), gated_mlp=True, use_bias=False, rope_base=theta,
                rope_local_base=theta, rope_scale=scale, tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
  window = getattr(hf, "sliding_window", None) if mt == "mistral" else None
  if window:  # Mistral: every layer is a sliding-window layer (our local layers never scale positions).
    if scale != 1.0:
      raise _unsupported(mt, "rope_parameters.factor", scale, "linear rope scaling with a sliding window")
    fields.update(sliding_window=int(window), layer_is_local=(True,) * hf.num_hidden_layers)
  return fields


def _gemma3_fields(hf: Any, tie: Optional[bool] = None, multimodal: bool = False) -> Dict[str, Any]:
  """Gemma 3 text fields; `multimodal`: hf is the text_config of a `gemma3` (Gemma3ForConditionalGeneration)."""
  mt = hf.model_type
  _require_false(mt, hf, {
      "attention_bias": _NO_BIAS,
      "use_bidirectional_attention": "only causal attention is implemented"
  })
  layer_types = list(hf.layer_types)
  unknown = sorted(set(layer_types) - {"sliding_attention", "full_attention"})
  if unknown:
    raise _unsupported(mt, "layer_types", unknown, "only 'sliding_attention' and 'full_attention'")
  rope = dict(getattr(hf, "rope_parameters", None) or {})
  if rope and not {"sliding_attention", "full_attention"} & set(rope):  # One dict for every layer type.
    rope = {"sliding_attention": rope, "full_attention": rope}
  local_theta, _ = _rope(mt, "rope_parameters['sliding_attention']", rope.get("sliding_attention"),
                         _given(getattr(hf, "rope_local_base_freq", None), 10_000.0), allow_linear=False)
  global_theta, scale = _rope(mt, "rope_parameters['full_attention']", rope.get("full_attention"),
                              _given(getattr(hf, "rope_theta", None), 1_000_000.0))
  is_local = tuple(t == "sliding_attention" for t in layer_types)
  if len(is_local) != hf.num_hidden_layers:
    raise _unsupported(mt, "layer_types", layer_types, f"expected {hf.num_hidden_layers} entries")
  if hf.attn_logit_softcapping is not None:
    # transformers' Gemma 3 attention never passes `softcap` to its attention kernels, so the field has no
    # effect there (real Gemma 3 configs leave it None); match the reference implementation, but say so.
    logger.warning(
        "%s config field attn_logit_softcapping=%r is ignored, as in transformers' Gemma 3 "
        "(only Gemma 2 applies it).", mt, hf.attn_logit_softcapping)
  qpa = hf.query_pre_attn_scalar
  if isinstance(qpa, bool) or not isinstance(qpa, (int, float)) or not (0 < qpa < float("inf")):
    raise _unsupported(mt, "query_pre_attn_scalar", qpa, "expected a finite number > 0 (queries are scaled by its "
                       "inverse square root)")
  if any(is_local) and (isinstance(hf.sliding_window, bool) or not isinstance(hf.sliding_window, int) or
                        hf.sliding_window < 1):
    raise _unsupported(mt, "sliding_window", hf.sliding_window,
                       f"expected a window of >= 1 tokens for the {sum(is_local)} 'sliding_attention' layers")
  final_softcap = None if hf.final_logit_softcapping is None else float(hf.final_logit_softcapping)
  if multimodal and final_softcap is not None:
    # Gemma3ForConditionalGeneration applies no final softcap (Gemma3ForCausalLM does); match the architecture
    # the checkpoint was saved as. Real Gemma 3 configs leave the field None.
    logger.warning(
        "gemma3 text_config.final_logit_softcapping=%r is ignored, as in transformers' "
        "Gemma3ForConditionalGeneration.", final_softcap)
    final_softcap = None
  return dict(family="gemma3", vocab_size=hf.vocab_size, num_layers=hf.num_hidden_layers, embed_dim=hf.hidden_size,
              num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim,
              mlp_dim=hf.intermediate_size, max_len=hf.max_position_embeddings, norm="rms", norm_eps=hf.rms_norm_eps,
              norm_scale_plus_one=True, sandwich_norm=True, qk_norm=True,
              activation=_activation(mt, "hidden_activation", hf.hidden_activation), gated_mlp=True, use_bias=False,
              rope_base=global_theta, rope_local_base=local_theta, rope_scale=scale,
              sliding_window=int(hf.sliding_window) if any(is_local) else None, layer_is_local=is_local,
              query_scale=float(qpa)**-0.5, attn_logit_softcap=None, final_logit_softcap=final_softcap,
              embed_scale=float(hf.hidden_size)**0.5,
              tie_embeddings=bool(hf.tie_word_embeddings if tie is None else tie))


def config_from_hf(hf_config: Any, **overrides) -> TransformerConfig:
  """TransformerConfig of a transformers config (a `PretrainedConfig`, or its dict with a `model_type` key).

  `overrides` replace fields of the result (e.g. `dtype="bfloat16"`, `max_len=2048`). Raises ValueError for an
  unsupported model type and for any feature we do not implement (never a silently different model).
  """
  if isinstance(hf_config, Mapping):
    import transformers  # Lazy: only needed to interpret a raw dict.
    d = dict(hf_config)
    if "model_type" not in d:
      raise ValueError(f"HF config dict has no 'model_type'; supported model types: {SUPPORTED_MODEL_TYPES}.")
    hf_config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
  model_type = getattr(hf_config, "model_type", None)
  if model_type == "gpt2":
    fields = _gpt2_fields(hf_config)
  elif model_type in ("llama", "mistral"):
    fields = _llama_fields(hf_config)
  elif model_type == "gemma3_text":
    fields = _gemma3_fields(hf_config)
  elif model_type == "gemma3":
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config.text_config
    fields = _gemma3_fields(text, tie=getattr(hf_config, "tie_word_embeddings", None), multimodal=True)
  else:
    raise ValueError(f"Unsupported model_type {model_type!r}; supported model types: {SUPPORTED_MODEL_TYPES}.")
  fields.update(overrides)
  return TransformerConfig.from_dict(fields)
