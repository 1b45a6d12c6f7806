"""The package's layering (docs/ARCHITECTURE.md): each folder imports only the folders above it in the table."""

import pathlib
import re

import spectral_soup

# Top to bottom, as in docs/ARCHITECTURE.md; "api" is the top-level modules (basis, generate, export, ...).
LAYERS = ("utils", "models", "soup", "data", "baselines", "offline", "online", "eval", "api")
ROOT = pathlib.Path(spectral_soup.__file__).parent
IMPORT = re.compile(r"^\s*(?:from spectral_soup(?:\.(\w+))? import (\w+)|import spectral_soup\.(\w+))", re.M)


def _layer(name: str) -> str:
  return name if name in LAYERS else "api"


def test_no_folder_imports_a_folder_below_it():
  upward = []
  for path in sorted(ROOT.rglob("*.py")):
    parts = path.relative_to(ROOT).parts
    layer = _layer(parts[0]) if len(parts) > 1 else "api"
    for sub, name, plain in IMPORT.findall(path.read_text()):
      target = _layer(sub or plain or name)
      if LAYERS.index(target) > LAYERS.index(layer):
        upward.append(f"{path.relative_to(ROOT)} imports {target}")
  assert not upward, upward


def test_the_table_lists_the_layers_in_this_order():
  doc = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text()
  rows = re.findall(r"^\| `spectral_soup/(\w+)", doc, re.M)
  assert [r for r in rows if r in LAYERS] == list(LAYERS[:-1]), rows
