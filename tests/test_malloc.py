"""The package's glibc malloc settings (spectral_soup/utils/malloc.py): applied on import, opt-out, harmless elsewhere."""

import os
import platform
import subprocess
import sys

import pytest

import spectral_soup
from spectral_soup.utils import malloc as _malloc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _tuned_in_fresh_process(**env) -> str:
  code = "import spectral_soup; print(spectral_soup.MALLOC_TUNED)"
  full_env = {k: v for k, v in os.environ.items() if k != _malloc.OPT_OUT}
  full_env.update(env)
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full_env, capture_output=True, text=True, check=True)
  return out.stdout.strip()


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_settings_apply_on_import_and_every_value_is_accepted():
  assert spectral_soup.MALLOC_TUNED
  assert _tuned_in_fresh_process() == "True"
  # glibc refuses values above its limits (mallopt returns 0): each one must be accepted.
  assert _malloc.retain_freed_memory()


def test_opt_out_keeps_glibc_defaults():
  assert _tuned_in_fresh_process(**{_malloc.OPT_OUT: "1"}) == "False"


def test_nothing_is_changed_off_glibc(monkeypatch):
  monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
  assert not _malloc.retain_freed_memory()


def test_release_free_memory_hands_back_a_freed_peak():
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not GLIBC:
    assert not _malloc.release_free_memory()
    return
  rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]) // 1024
  blocks = [np.ones(2**20) for _ in range(64)]  # 512 MiB in 8 MiB blocks, from the heap (no mmap'd blocks).
  del blocks
  before = rss()
  _malloc.release_free_memory()
  assert rss() < before - 256, (before, rss())
