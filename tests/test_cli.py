"""The prr command line."""

import json
import os
import subprocess
import sys

import pytest

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
    assert main(["bench", "plot", os.path.join(root, "bench_layer_h100.json"), "--out-dir", str(tmp_path)]) == 0
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


def test_ratio_argument_takes_auto_or_a_positive_number(capsys):
    from prr.cli_args import parse_ratio
    from prr.model.commands import _speculation_line

    assert parse_ratio("auto") == parse_ratio(" AUTO ") == "auto"
    assert parse_ratio("1.25") == 1.25
    for bad in ("0", "-1", "nan", "inf", "fast"):
        with pytest.raises(ValueError, match="positive number or 'auto'"):
            parse_ratio(bad)
    with pytest.raises(SystemExit):
        main(["generate", "--ratio", "-2", "--prompt", "x"])
    assert "--ratio" in capsys.readouterr().err
    off = {"context": 4650, "speculation": "off", "ratio": None, "gain": -0.075, "reason": "off: gain -7.5% < 2%"}
    assert _speculation_line(off).startswith("PRR speculation off at 4650 tokens (PRR decodes as DSA")
    on = {"context": 9000, "speculation": "on", "ratio": 1.25, "gain": 0.08, "reason": "on: gain +8.0%"}
    assert "ratio 1.25, modelled gain +8.0%" in _speculation_line(on)
