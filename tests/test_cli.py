"""The prr command line."""

import json
import os
import subprocess
import sys

from prr.cli import main


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "prr", "--help"], capture_output=True, text=True, check=True).stdout
    assert "simulate" in out and "info" in out


def test_simulate_prr_matches_dsa_and_writes_json(tmp_path, capsys):
    path = tmp_path / "sim.json"
    rc = main(["simulate", "--context", "2000", "--steps", "6", "--budget", "256", "--calibrate-steps", "4",
               "--dtype", "fp64", "--drift", "0.5", "--quiet", "--json", str(path)])
    assert rc == 0
    res = json.loads(path.read_text())
    assert len(res["steps"]) == 6
    assert res["max_abs_diff_vs_dsa"] < 1e-12  # exact mode, float64
    for row in res["steps"]:
        assert row["hits"] + row["misses"] == row["selected"] == 16
    assert "hit rate" in capsys.readouterr().out


def test_simulate_bad_budget_is_a_clear_error(capsys):
    assert main(["simulate", "--budget", "16", "--quiet"]) == 2
    assert "budget_tokens=16 leaves no dynamic block" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    import pytest

    for cmd in (["info"], ["simulate"], ["generate"], ["demo"], ["eval"], ["locality"], ["bench"],
                ["bench", "kernels"], ["bench", "layer"], ["bench", "e2e"], ["bench", "plot"], ["bench", "show"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: prr " + " ".join(cmd) in capsys.readouterr().out


def test_gpu_benchmarks_refuse_politely_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        return
    for b in ("kernels", "layer", "e2e"):
        assert main(["bench", b]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_plot_and_show_read_saved_results(tmp_path, capsys):
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "results")
    assert main(["bench", "plot", os.path.join(root, "bench_layer_h200.json"), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "layer_latency.png").stat().st_size > 10_000
    assert main(["bench", "show", os.path.join(root, "bench_kernels_h200.json")]) == 0
    assert "NVIDIA H200" in capsys.readouterr().out


def test_benchmark_source_digest_names_the_code(tmp_path):
    """Saved benchmark results carry a digest of the package sources: a copy of the tree (what the GPU machine
    gets, without git) digests the same, and any edit changes it."""
    import shutil

    import prr
    from prr.provenance import source_digest

    pkg = os.path.dirname(prr.__file__)
    copy = tmp_path / "prr"
    shutil.copytree(pkg, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert source_digest(str(copy)) == source_digest()
    (copy / "ops" / "__init__.py").write_text((copy / "ops" / "__init__.py").read_text() + "\n")
    assert source_digest(str(copy)) != source_digest()
