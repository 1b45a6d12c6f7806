"""The GPU run's path at toy sizes on the CPU (gpu.sh --tiny), its table, and the preparation of its wheels."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest

from experiments.benchmarks import decode, gpu_prepare, gpu_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = ("online", "params", "train", "train_1b", "decode", "decode_256")


def test_gpu_sh_tiny_runs_every_step_and_prints_one_table(tmp_path):
  out = tmp_path / "bench"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run(
      ["bash", "experiments/benchmarks/gpu.sh", "--tiny", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=1500)
  logs = {label: (out / f"{label}.log").read_text()[-1500:] for label in LABELS if (out / f"{label}.log").exists()}
  assert proc.returncode == 0, proc.stderr[-3000:]
  for label in LABELS:
    assert f"{label}: done in" in proc.stdout, (label, proc.stdout[-3000:], logs.get(label))
    assert (out / f"{label}.json").exists()
  assert "missing" not in proc.stdout and "WRONG" not in proc.stdout, proc.stdout[-3000:]
  # The paper-size step's path: both kinds on the preset's mesh, with FLOPs, MFU's parts and peak memory.
  train_1b = json.loads((out / "train_1b.json").read_text())
  assert sorted(r["kind"] for r in train_1b["rows"]) == ["heads", "lora"]
  for row in train_1b["rows"]:
    assert not row.get("error"), row
    assert row["model_flops"] > 0 and row["achieved_tflops"] > 0 and row["peak_memory_gib"] > 0
    assert row["batch"] >= 1 and "fsdp" in row["variant"] and row["dtype"] == "bfloat16"
  # Every decode variant's greedy tokens equal the independent PyTorch loop's (or our K+1-pass loop's).
  rows = {r["variant"]: r for r in json.loads((out / "decode.json").read_text())["rows"]}
  for variant in ("explicit/heads", "naive/heads"):
    assert rows[variant]["tokens_match_torch"] == 1.0, variant
  table = gpu_table.table(str(out), markdown=True)
  assert table.startswith("| bench |") and "train_1b" in table and "decode_256 (U=8)" in table
  assert "bandwidth floor" in table


def test_gpu_table_names_what_is_missing(tmp_path):
  (tmp_path / "online.json").write_text(
      json.dumps({
          "rows": [{
              "variant": "ours",
              "users_per_s": 10.0,
              "speedup_vs_strongest_baseline": 2.0,
              "max_abs_lam_diff_vs_ours": 0.0
          }],
          "speedup": 2.0
      }))
  (tmp_path / "train_1b.json").write_text(
      json.dumps({
          "rows": [{
              "kind": "lora",
              "variant": "lora/shared K=30",
              "error": "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory"
          }],
          "speedup": None
      }))
  # No baseline (online.py writes null then), a truncated file, a row without its fields: each benchmark is named,
  # and the others' rows still print.
  (tmp_path / "params.json").write_text(
      json.dumps({
          "rows": [{
              "workload": "lora",
              "variant": "ours",
              "users_per_s": 5.0,
              "speedup_vs_strongest_baseline": None,
              "output_mb_per_s": 1.0
          }]
      }))
  (tmp_path / "train.json").write_text('{"rows": [{"variant": "sha')
  (tmp_path / "decode.json").write_text(json.dumps({"rows": [{"variant": "single"}], "config": {}}))
  text = gpu_table.table(str(tmp_path))
  assert "online" in text and "FAILED" in text and "RESOURCE_EXHAUSTED" in text
  assert "5.0 users/s" in text and "-x" in text
  assert "unreadable: train: " in text and "train.json cannot be read as a benchmark's results" in text
  assert "unreadable: decode: " in text and "decode.json: KeyError" in text
  assert "missing (failed or timed out" in text and "decode_256" in text
  with pytest.raises(SystemExit, match="1"):  # gpu.sh ends with this status: the run was incomplete.
    gpu_table.main([str(tmp_path)])
  with pytest.raises(SystemExit, match="OUT_DIR"):
    gpu_table.main([str(tmp_path / "nowhere")])


def test_random_smollm2_shaped_state_loads_as_our_backbone():
  from spectral_soup.models import hf_import  # pylint: disable=g-import-not-at-top
  config = decode.tiny_hf_config()
  state = decode.random_llama_state(config, seed=0)
  cfg = hf_import.config_from_hf(config.to_dict())
  params = hf_import.params_from_state_dict(cfg, state)
  assert cfg.num_layers == 2 and params
  again = decode.random_llama_state(config, seed=0)
  assert all(np.array_equal(state[k], again[k]) for k in state)
  big = decode.smollm2_hf_config()
  assert (big.num_hidden_layers, big.hidden_size, big.num_attention_heads, big.num_key_value_heads,
          big.intermediate_size, big.vocab_size) == (30, 576, 9, 3, 1536, 49152)


def _wheel(directory, name, requires=()):
  """A minimal pure-Python wheel `name`-1.0 whose METADATA lists `requires`."""
  path = directory / f"{name}-1.0-py3-none-any.whl"
  metadata = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
      name, "".join(f"Requires-Dist: {r}\n" for r in requires))
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{name}/__init__.py", "")
    z.writestr(f"{name}-1.0.dist-info/METADATA", metadata)
    z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr(f"{name}-1.0.dist-info/RECORD", "")
  return path


def test_prepare_fetches_the_missing_closure_only(tmp_path):
  index = tmp_path / "index"
  index.mkdir()
  _wheel(index, "alpha", ["beta>=1.0", "present_pkg", 'gamma; python_version < "3.0"', 'delta; extra == "x"'])
  _wheel(index, "beta", ["Epsilon_Pkg"])
  _wheel(index, "epsilon_pkg")
  _wheel(index, "gamma")
  _wheel(index, "delta")
  out = tmp_path / "wheels"
  wheels = gpu_prepare.prepare(str(out), {"present-pkg"}, "3.12",
                               ["--no-index", "--find-links", str(index)], roots=["alpha"])
  assert sorted(gpu_prepare.wheel_name(w) for w in wheels) == ["alpha", "beta", "epsilon-pkg"]
  assert all(size > 0 for size in wheels.values())
  with pytest.raises(RuntimeError, match="no wheel of 'missing_pkg'"):
    gpu_prepare.prepare(str(tmp_path / "w2"), set(), "3.12",
                        ["--no-index", "--find-links", str(index)], roots=["missing_pkg"])


def test_prepare_refuses_a_wheel_the_target_python_cannot_install(tmp_path):
  """Where no wheel for the target exists, pip builds (or takes) one for this machine's Python: a CPython 3.11
  wheel was handed over as prepared for 3.12 and failed only in the install on the GPU machine."""
  index = tmp_path / "index"
  index.mkdir()
  pure = _wheel(index, "compiled_pkg")
  os.rename(pure, index / "compiled_pkg-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")
  with pytest.raises(
      RuntimeError, match=r"CPython 3\.12 on manylinux x86-64 cannot install: "
      r"\['compiled_pkg-1\.0-cp311-cp311-manylinux_2_17_x86_64\.whl'\]"):
    gpu_prepare.prepare(str(tmp_path / "wheels"), set(), "3.12",
                        ["--no-index", "--find-links", str(index)], roots=["compiled_pkg"])
  assert gpu_prepare.unusable_wheels(str(index), "3.11") == []
  # A wheel only the newest manylinux tags name (the image's glibc is 2.39) is usable.
  os.rename(index / "compiled_pkg-1.0-cp311-cp311-manylinux_2_17_x86_64.whl",
            index / "compiled_pkg-1.0-cp312-cp312-manylinux_2_34_x86_64.whl")
  assert gpu_prepare.unusable_wheels(str(index), "3.12") == []


def test_prepare_refuses_what_cannot_travel_and_bad_inputs(tmp_path, capsys):
  have = tmp_path / "have.txt"
  names = [gpu_prepare.requirement_name(r) for r in gpu_prepare.runtime_requirements()]
  have.write_text("# everything already there\n" + "\n".join(f"{n}==1.0" for n in names) + "\n")
  out = tmp_path / "wheels"
  with pytest.raises(SystemExit, match="too large to travel"):  # The tracked files alone exceed 0.1 MiB.
    gpu_prepare.main([f"--out={out}", f"--have={have}", "--limit_mb=0.1", "--no_index"])
  assert gpu_prepare.main([f"--out={out}", f"--have={have}", "--no_index"]) == {}
  assert "pip install -q --no-index --no-deps" in capsys.readouterr().out
  with pytest.raises(FileNotFoundError, match="--have=.*no such file"):
    gpu_prepare.main([f"--have={tmp_path / 'none.txt'}"])
  with pytest.raises(SystemExit, match="--python_version='3'"):
    gpu_prepare.main([f"--have={have}", "--python_version=3"])
  bad = tmp_path / "bad.txt"
  bad.write_text("jax\n==1.0\n")
  with pytest.raises(ValueError, match="bad.txt, line 2"):
    gpu_prepare.read_have(str(bad))
