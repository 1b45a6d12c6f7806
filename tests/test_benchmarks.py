"""Smoke tests of experiments/benchmarks at tiny sizes: each writes the common JSON and its variants agree.

Timings are not checked (benchmarks are not timed tests); the agreement between ours and the baselines is.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import common
from experiments.benchmarks import decode
from experiments.benchmarks import malloc
from experiments.benchmarks import online
from experiments.benchmarks import params
from experiments.benchmarks import report
from experiments.benchmarks import train

KEYS = {"name", "config", "rows", "speedup"}


def _load(path, name):
  with open(path) as f:
    out = json.load(f)
  assert KEYS <= set(out), sorted(out)
  assert out["name"] == name and out["rows"] and all("variant" in row for row in out["rows"])
  assert out["speedup"] is None or out["speedup"] > 0
  return out


def test_online(tmp_path):
  path = tmp_path / "online.json"
  online.main([
      "--users=6", "--bases=3", "--comparisons=12", "--loop_users=0", "--min_time_s=0", "--solvers=newton-cholesky",
      f"--json={path}"
  ])
  out = _load(path, "online")
  assert {r["variant"] for r in out["rows"]} >= {"ours/vmap(fit_lambda)", "sklearn/newton-cholesky"}
  assert out["max_abs_lam_diff"] < 1e-4  # The same optimum as scikit-learn.
  # Every timed row keeps its median, its spread and the number of timed runs (at least 3).
  for row in out["rows"]:
    assert row["runs"] >= 3 and row["min_s"] <= row["median_s"] <= row["max_s"], row
  # The report renders it: one table row per variant, the date, the targets.
  text = report.render("online", out, "online.json")
  assert text.count("\n| `") == len(out["rows"]) and out["date_utc"] in text and "Targets:" in text


def test_report_replaces_blocks_and_refuses_a_block_without_json():
  result = {
      "name":
          "train",
      "date_utc":
          "2026-01-01 00:00",
      "machine": {
          "cpus": 2
      },
      "rows": [{
          "variant": "heads/shared K=2",
          "models": 1,
          "devices": 1,
          "median_s": 0.5,
          "min_s": 0.4,
          "max_s": 0.7,
          "basis_tokens_per_s": 10.0,
          "vs_separate": 2.0,
          "compile_s": 1.0,
          "load_1m": 0.2,
          "under_load": False
      }]
  }
  doc = "intro\n<!-- report:train -->\nstale\n<!-- /report:train -->\nafter\n"
  new = report.update(doc, {"train": (result, "train.json")})
  assert new.startswith("intro\n<!-- report:train -->\n<!-- generated") and new.endswith(
      "<!-- /report:train -->\nafter\n")
  assert "| `heads/shared K=2` | 1 | 1 | 500.0 [400.0-700.0] | 10 | 2.00x | 1.0 | 0.20 |" in new
  assert "stale" not in new and report.update(new, {"train": (result, "train.json")}) == new
  with pytest.raises(ValueError, match=r"report blocks \['train'\] have no JSON file"):
    report.update(doc, {})


def _train_result(**row):
  base = {"variant": "heads/shared K=2", "median_s": 0.5, "min_s": 0.4, "max_s": 0.7, "load_1m": 0.2}
  return {"name": "train", "machine": {"cpus": 2}, "rows": [{**base, **row}]}


@pytest.mark.parametrize("result, message", [
    (_train_result(median_s=float("nan")), r"row 0 \(heads/shared K=2\), column 'ms per update of all K \[range\]': "
     r"nan is not a finite number"),
    (_train_result(basis_tokens_per_s=float("inf")), r".*column 'basis-tokens/s': inf is not a finite number"),
    (_train_result(load_1m="high"), r"a row's load: 'high' is not a number"),
    ({
        "name": "train",
        "machine": {}
    }, r"'rows' must be a non-empty list of objects"),
    ({
        "name": "train",
        "rows": _train_result()["rows"]
    }, r"'machine' .* is missing"),
    ({
        **_train_result(), "targets": {
            "4x": None
        }
    }, r"'targets' must map each target to true or false"),
    ([1, 2], r"expected a JSON object"),
])
def test_report_refuses_a_json_that_cannot_make_its_table(result, message):
  """These were published as `nan [..]` / `inf` cells, a header-only table or 'unknown CPU' (and --check then passed),
  or failed with a bare KeyError / AttributeError naming no file or row."""
  with pytest.raises(ValueError, match=r"train\.json: " + message):
    report.render("train", result, "train.json")


def test_report_check_names_stale_blocks_and_refuses_a_json_without_a_block(tmp_path, capsys):
  results = tmp_path / "results"
  results.mkdir()
  (results / "train.json").write_text(json.dumps(_train_result()))
  doc = tmp_path / "DOC.md"
  doc.write_text("intro\n<!-- report:train -->\nstale\n<!-- /report:train -->\n")
  assert report.main([f"--results={results}", f"--doc={doc}", "--check"]) == 1
  assert "(the tables of ['train'])" in capsys.readouterr().out
  assert report.main([f"--results={results}", f"--doc={doc}"]) == 0
  assert report.main([f"--results={results}", f"--doc={doc}", "--check"]) == 0
  # A results file whose block was deleted (or never added) went unnoticed by --check.
  (results / "malloc.json").write_text(json.dumps({**_train_result(), "name": "malloc"}))
  assert report.main([f"--results={results}", f"--doc={doc}", "--check"]) == 2
  assert "DOC.md has no report block for" in capsys.readouterr().err
  (results / "malloc.json").write_text("{not json")
  assert report.main([f"--results={results}", f"--doc={doc}"]) == 2
  assert "malloc.json: not valid JSON" in capsys.readouterr().err


def test_benchmark_json_holds_numbers_only(tmp_path):
  """A NaN or infinite measurement was written as `NaN` (not JSON), jax scalars and arrays as their repr strings,
  and repeats=0 crashed inside statistics.median."""
  path = tmp_path / "r.json"
  common.write_json(str(path), {"rows": [{"x": jnp.float32(1.5), "v": jnp.arange(3), "n": np.int64(2)}]})
  assert json.loads(path.read_text()) == {"rows": [{"x": 1.5, "v": [0, 1, 2], "n": 2}]}
  with pytest.raises(
      ValueError, match=r"r\.json: the result holds a value that is not a finite number .*"
      r"\.rows\[0\]\.median_s = nan"):
    common.write_json(str(path), {"rows": [{"median_s": float("nan")}]})
  assert json.loads(path.read_text())["rows"][0]["x"] == 1.5  # The earlier file is left as it was.
  with pytest.raises(ValueError, match=r"repeats must be a positive int"):
    common.time_call(lambda: None, repeats=0, wait_idle=False)


def test_benchmarks_md_matches_its_json():
  # BENCHMARKS.md's tables are generated from experiments/benchmarks/results/*.json, never edited by hand.
  assert report.main(["--check"]) == 0


def test_params(tmp_path):
  path = tmp_path / "params.json"
  params.main([
      "--users=3", "--bases=2", "--layers=1", "--embed=8", "--kv_dim=4", "--rank=2", "--min_time_s=0", f"--json={path}"
  ])
  out = _load(path, "params")
  assert {r["workload"] for r in out["rows"]} == {"lora", "full"}
  for row in out["rows"]:
    assert row["max_abs_diff_vs_ours"] < 1e-5, row  # Every loop merges to our numbers.


def test_train(tmp_path):
  path = tmp_path / "train.json"
  small = [
      "--bases=2", "--kinds=heads", "--layers=1", "--embed=16", "--heads=2", "--head_dim=8", "--mlp=32", "--vocab=32",
      "--prompt_len=4", "--response_len=4", "--batch=8", "--steps=1"
  ]
  train.main(small + ["--devices=0", f"--json={path}"])
  out = _load(path, "train")
  assert [r["variant"] for r in out["rows"]] == ["heads/shared K=2", "heads/separate 2 x 1"]
  assert all(r["basis_tokens_per_s"] > 0 for r in out["rows"])
  # The sharded variant (a subprocess with fake devices in the benchmark) on this process's 8 fake devices.
  sharded = train.main(small + ["--child=sharded"])["rows"]
  assert len(sharded) == 1 and sharded[0]["devices"] == jax.device_count() > 1


def test_decode_tiny_model_matches_pytorch_mod(tmp_path):
  """Every soup variant is checked against PyTorch's K+1-pass MOD loop on the same weights (run automatically)."""
  path = tmp_path / "decode.json"
  decode.main([
      "--model=tiny", "--users=2", "--bases=2", "--new_tokens=4", "--prompt_len=3", "--matmul_size=256", "--copy_mb=8",
      "--variants=explicit/heads,params/heads", "--rounds=2", f"--json={path}",
      f"--workdir={tmp_path / 'inputs' / 'new'}"
  ])
  out = _load(path, "decode")
  # A --workdir that did not exist is made, and kept with the shared inputs (only a temporary one is removed).
  assert (tmp_path / "inputs" / "new" / "inputs.npz").is_file()
  rows = {r["variant"]: r for r in out["rows"]}
  assert set(rows) == {"explicit/heads", "params/heads", "torch-mod/heads"}
  # Two interleaved rounds of each timed variant (each round's runs pooled); the reference loop ran once.
  assert rows["explicit/heads"]["rounds"] == 2 and len(rows["explicit/heads"]["round_times_s"]) == 2
  assert len(rows["explicit/heads"]["times_s"]) == 2 * out["config"]["repeats"]
  assert rows["explicit/heads"]["tokens_same_every_round"] and rows["torch-mod/heads"]["rounds"] == 1
  for name in ("explicit/heads", "params/heads"):
    assert rows[name]["tokens_match_torch"] == 1.0 and not rows[name]["wrong"]
    assert np.asarray(rows[name]["tokens"]).shape == (2, 4)
  assert out["wrong_variants"] == []
  assert all(r["tokens_per_s"] > 0 and r["share_of_floor"] > 0 for r in rows.values())
  assert np.isfinite(out["rates"]["matmul_flops_per_s"]) and out["rates"]["bandwidth_bytes_per_s"] > 0


def test_decode_flags_a_variant_whose_tokens_disagree_with_pytorch():
  good, bad = [[1, 2, 3, 4]] * 2, [[1, 2, 9, 9]] * 2
  rows = [{
      "variant": "single",
      "tokens": good
  }, {
      "variant": "torch/single",
      "tokens": good
  }, {
      "variant": "explicit/heads",
      "tokens": bad
  }, {
      "variant": "params/heads",
      "tokens": good
  }, {
      "variant": "torch-mod/heads",
      "tokens": good
  }, {
      "variant": "params/lora",
      "tokens": bad
  }, {
      "variant": "explicit/lora",
      "tokens": good
  }, {
      "variant": "naive/lora",
      "tokens": good
  }]
  assert decode.compare_tokens(rows) == ["explicit/heads"]
  by_name = {r["variant"]: r for r in rows}
  assert by_name["explicit/heads"]["tokens_match_torch"] == 0.5 and by_name["single"]["tokens_match_torch"] == 1.0
  assert "tokens_match_torch" not in by_name["params/lora"]  # No torch-mod/lora ran: nothing to compare with.
  assert decode.compare_tokens(rows, naive_fallback=True) == ["explicit/heads"]
  assert by_name["params/lora"]["approximate"] and not by_name["params/lora"]["wrong"]
  assert by_name["params/lora"]["tokens_reference"] == "naive/lora"


def test_decode_rejects_unknown_variant():
  with pytest.raises(ValueError, match="unknown"):
    decode.run(decode.parse_args(["--model=tiny", "--variants=beam/heads"]))


def test_malloc_settings_benchmark(tmp_path):
  """Both settings run in their own subprocess; the package's is in effect in one and not in the other."""
  import platform  # pylint: disable=g-import-not-at-top
  path = tmp_path / "malloc.json"
  malloc.main(["--rounds=1", "--calls=2", "--workloads=train heads K=8", f"--json={path}"])
  out = _load(path, "malloc")
  rows = {r["setting"]: r for r in out["rows"]}
  assert set(rows) == {"package", "glibc defaults"}
  assert not rows["glibc defaults"]["tuned"]
  assert rows["package"]["tuned"] == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
  for row in rows.values():
    assert row["runs"] == 2 and row["time_s"] > 0 and row["faults_per_call"] >= 0
  assert rows["glibc defaults"]["speedup_vs_glibc_defaults"] == 1.0
  with pytest.raises(ValueError, match="--workloads"):
    malloc.main(["--workloads=nope"])
