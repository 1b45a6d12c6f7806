"""TFDS builders of this project's preference sources, written as array_record and read without TensorFlow.

Use `load_source` (never `tfds.load`): it builds the dataset from files on disk if it is not built yet and returns
a random-access data source (`len()`, `ds[i]`, `ds.__getitems__([...])`). Text features come back as `bytes`.

    from spectral_soup.data import builders
    ds = builders.load_source("ultrafeedback", data_dir="/data/tfds", manual_dir="/data/raw/ultrafeedback",
                              config={"base": "conflicting", "pairs_per_prompt": 2}, split="train")

Names (see each module's docstring for the upstream schema and the features):

* `embedded_prefs` (`EmbeddedPrefs`): the project's generated pairs (`pairs.jsonl` + `metadata.json`).
* `ultrafeedback` (`UltraFeedback`): openbmb/UltraFeedback; configs `all`, `conflicting`.
* `helpsteer2` (`HelpSteer2`): nvidia/HelpSteer2; configs `ratings`, `pairs`, `preference`.
* `psoups` (`PSoups`): P-SOUPS / RLPHF per-pole preferences.
* `jsonl_prefs` (`JsonlPrefs`): your own pairs, in the JSON-lines layouts of `spectral_soup/data/jsonl.py`.

Importing this package registers the builders with TFDS (as `spectral_soup_<name>`), so
`tfds.data_source("spectral_soup_ultrafeedback/conflicting", data_dir=...)` also works for predefined configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Dict, Mapping, Optional, Type, Union

import tensorflow_datasets as tfds

from spectral_soup.data.builders import common
from spectral_soup.data.builders.common import MalformedRowError
from spectral_soup.data.builders.common import SourceFileError
from spectral_soup.data.builders.common import SourceNotFoundError
from spectral_soup.data.builders.common import StaleDatasetError
from spectral_soup.data.builders.embedded_prefs import EmbeddedPrefs, EmbeddedPrefsConfig
from spectral_soup.data.builders.helpsteer2 import HelpSteer2, HelpSteer2Config
from spectral_soup.data.builders.jsonl_prefs import JsonlPrefs, JsonlPrefsConfig
from spectral_soup.data.builders.psoups import PSoups, PSoupsConfig
from spectral_soup.data.builders.ultrafeedback import UltraFeedback, UltraFeedbackConfig

BUILDERS: Dict[str, Type[tfds.core.GeneratorBasedBuilder]] = {
    "embedded_prefs": EmbeddedPrefs,
    "ultrafeedback": UltraFeedback,
    "helpsteer2": HelpSteer2,
    "psoups": PSoups,
    "jsonl_prefs": JsonlPrefs,
}
FILE_FORMAT = "array_record"
ConfigLike = Union[None, str, Mapping[str, Any], tfds.core.BuilderConfig]

__all__ = [
    "BUILDERS",
    "EmbeddedPrefs",
    "EmbeddedPrefsConfig",
    "HelpSteer2",
    "HelpSteer2Config",
    "JsonlPrefs",
    "JsonlPrefsConfig",
    "MalformedRowError",
    "PSoups",
    "PSoupsConfig",
    "SourceFileError",
    "SourceNotFoundError",
    "StaleDatasetError",
    "UltraFeedback",
    "UltraFeedbackConfig",
    "get_builder",
    "load_source",
    "make_config",
]


def _builder_class(name: str) -> Type[tfds.core.GeneratorBasedBuilder]:
  for short, cls in BUILDERS.items():
    if name in (short, cls.name):
      return cls
  raise ValueError(f"Unknown source {name!r}; known: {sorted(BUILDERS)}")


_VERBATIM = re.compile(r"[A-Za-z0-9_.]{1,24}")
_HASHED = re.compile(r"h[0-9a-f]{10}")


def _name_part(field: str, value: Any) -> str:
  """How an override shows in a config name: short plain values verbatim, others as `h` + 10 hex digits of a hash.

  A value that itself looks like such a hash is hashed too, so a verbatim part never equals a hashed one;
  `source_path` is always hashed (as the absolute path the config stores).
  """
  try:
    text = common.absolute_path(value) if field == "source_path" and value is not None else str(value)
  except TypeError:  # Not a path: the config refuses it.
    text = str(value)
  if field != "source_path" and _VERBATIM.fullmatch(text) and not _HASHED.fullmatch(text):
    return text
  return "h" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]


def make_config(source: str, /, base: Optional[str] = None, **overrides: Any) -> tfds.core.BuilderConfig:
  """A config of builder `source`: the predefined config `base` (default: the default one) with `overrides`.

  The result's name encodes the overrides (e.g. `conflicting-pairs_per_prompt_2-skip_malformed_True`), so
  datasets built with different options live in different directories. Pass `name=` in `overrides` to choose the
  config name yourself (letters, digits, '_', '.', '-'; it must differ from the predefined names). Either way, a
  dataset prepared under the name with other field values is refused when reused (`StaleDatasetError`).

  Every field is checked here: a value of the wrong type or range (`pairs_per_prompt=2.5`, `tie_epsilon=nan`,
  `validation_fraction="0.1"`) raises `ValueError` naming the field and what was expected. A relative
  `source_path` is made absolute against the working directory.
  """
  cls = _builder_class(source)
  base = base or cls.DEFAULT_CONFIG_NAME
  if base not in cls.builder_configs:
    raise ValueError(f"{cls.name}: unknown config {base!r}; predefined: {sorted(cls.builder_configs)}")
  template = cls.builder_configs[base]
  # The package's data fields and `name`; TFDS's own (version, description, tags, ...) are the builder's to set.
  fields = set(common.config_fields(template)) | {"name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"{cls.name}: unknown config fields {unknown}; known: {sorted(fields)}")
  if not overrides:
    return template
  config_name = overrides.pop("name", None)
  if config_name is None:
    config_name = "-".join([base] + [f"{k}_{_name_part(k, v)}" for k, v in sorted(overrides.items())])
  elif not isinstance(config_name, str) or not common.CONFIG_NAME_RE.fullmatch(config_name):
    raise ValueError(f"{cls.name}: name={config_name!r}: expected a config name of 1 to 200 letters, digits, '_', '.' "
                     "or '-', starting with a letter, a digit or '_' (it names the dataset's directory).")
  if config_name in cls.builder_configs:
    raise ValueError(f"{cls.name}: a custom config may not reuse the predefined name {config_name!r}")
  description = f"{template.description or base} Overrides: {overrides}."
  return dataclasses.replace(template, name=config_name, description=description, **overrides)


def _resolve_config(name: str, config: ConfigLike) -> Optional[Union[str, tfds.core.BuilderConfig]]:
  if isinstance(config, str):
    cls = _builder_class(name)
    if config not in cls.builder_configs:  # TFDS's own message listed no names.
      raise ValueError(f"{cls.name}: unknown config {config!r}; predefined: {sorted(cls.builder_configs)} (or a "
                       f"mapping of overrides, see make_config)")
    return config
  if config is None or isinstance(config, tfds.core.BuilderConfig):
    return config
  if isinstance(config, Mapping):
    overrides = dict(config)
    base = overrides.pop("base", None)
    return make_config(name, base, **overrides)
  raise TypeError(f"config must be None, a config name, a mapping of overrides or a BuilderConfig, got "
                  f"{type(config).__name__}")


def get_builder(name: str, data_dir: Union[str, os.PathLike],
                config: ConfigLike = None) -> tfds.core.GeneratorBasedBuilder:
  """The builder of source `name` (short name or `spectral_soup_<name>`) writing array_record under `data_dir`.

  Args:
    name: 'embedded_prefs', 'ultrafeedback', 'helpsteer2', 'psoups' or 'jsonl_prefs'.
    data_dir: the TFDS data directory (datasets go to `data_dir/spectral_soup_<name>/<config>/<version>`).
    config: None (the default config), a predefined config name, a mapping of config fields to override (with
      an optional 'base' naming the predefined config to start from; see `make_config`) or a BuilderConfig.
  """
  cls = _builder_class(name)
  return cls(data_dir=os.fspath(data_dir), config=_resolve_config(name, config), file_format=FILE_FORMAT)


def load_source(name: str, data_dir: Union[str, os.PathLike], manual_dir: Optional[Union[str, os.PathLike]] = None,
                config: ConfigLike = None, split: str = "train", *, rebuild: bool = False):
  """Builds source `name` if needed and returns `builder.as_data_source(split)` (random access, no TensorFlow).

  A dataset already built under `data_dir` (same name, config name and version) is reused without reading the
  source files again, after checking that its config fields and its source files (their absolute paths, sizes and
  modification times, recorded at build time in `info.metadata["source_fingerprint"]`) are still those that the
  config and `manual_dir` resolve to; if not, `StaleDatasetError` says what differs. Pass `rebuild=True` to
  regenerate it (e.g. after the source files changed). A source that is no longer at hand (deleted after the
  build, or `manual_dir` not given) does not block reuse.

  Args:
    name: 'embedded_prefs', 'ultrafeedback', 'helpsteer2', 'psoups' or 'jsonl_prefs'.
    data_dir: the TFDS data directory.
    manual_dir: the directory holding the upstream files (TFDS default: `data_dir/downloads/manual`); not
      needed when the config sets `source_path` or the dataset is already built.
    config: see `get_builder`.
    split: a split name ('train', 'validation', 'test'; HelpSteer2 has no 'test'); TFDS slicing such as
      'train[:100]' also works. A split that had no examples when the dataset was built (e.g. 'test' of a few
      prompts at test_fraction=0.05) is left out; asking for it raises `ValueError` saying so.
    rebuild: regenerate even if the dataset exists.

  Returns:
    A `tfds` array_record data source: `len(ds)`, `ds[i]` -> dict of numpy values (Text as bytes).

  Raises:
    SourceNotFoundError: the manual directory or an expected file is missing.
    SourceFileError: a source file is not what its name says (`.gz` but not gzip), or a file and its `.gz` twin
      are both present.
    MalformedRowError: a malformed source row (file, 1-based row, field), unless the config skips them.
    StaleDatasetError: the prepared dataset no longer matches its config or its source files.
    ValueError: a config field of the wrong type or range; no examples in any split; an empty split asked for.
  """
  if os.environ.get("SPECTRAL_SOUP_PROGRESS") == "0":
    tfds.disable_progress_bar()
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise ValueError(f"data_dir={os.fspath(data_dir)!r} is a file: expected a directory (the TFDS data directory, "
                     f"created if missing).")
  builder = get_builder(name, data_dir, config)
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if rebuild else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None,
                                                 download_mode=mode)
  builder.download_and_prepare(download_config=download_config)
  return builder.as_data_source(split)
