"""The per-token breakdown of ``prr bench e2e`` (kernel timeline -> categories -> wall-time parts), on
synthetic timelines whose answers are known; the GPU run draws the real ones."""

import json

import pytest

from prr.bench.timeline import CATEGORIES, kernel_categories, step_breakdown


def k(name, stream, start, end):
    return {"name": name, "stream": stream, "start_us": start, "end_us": end, "dur_us": end - start}


def test_dsa_step_categories_and_parts_add_up_to_the_wall():
    rows = [k("gemv_bf16", 7, 0, 10), k("_quest_append_kernel", 7, 10, 12), k("_quest_scores_kernel", 7, 14, 30),
            k("_group_max_kernel", 7, 30, 33), k("_topk_kernel", 7, 33, 45), k("_sparse_decode_kernel", 7, 46, 56),
            k("_merge_kernel", 7, 56, 58), k("gemv_bf16", 7, 60, 70)]
    assert kernel_categories(rows, "dsa") == ["rest", "metadata", "selection", "selection", "selection",
                                              "attention", "attention", "rest"]
    b = step_breakdown(rows, "dsa")
    assert b["wall_us"] == 70
    assert b["exclusive_us"] == {"rest": 20, "metadata": 2, "selection": 31, "attention": 12, "repair": 0,
                                 "speculation": 0, "predictor": 0, "gaps": 5}
    assert sum(b["exclusive_us"].values()) == pytest.approx(b["wall_us"])


def test_prr_step_hidden_speculation_and_tail_cost_nothing():
    main, sel, side = 7, 13, 9
    rows = [k("gemv_bf16", main, 0, 10),
            k("_quest_scores_kernel", sel, 11, 30), k("_sparse_decode_kernel", side, 12, 28),  # spec under sel
            k("_topk_kernel", sel, 30, 40), k("_repair_kernel", main, 41, 46), k("_merge_kernel", main, 46, 48),
            k("_holt_kernel", side, 49, 53), k("gemv_bf16", main, 49, 70),  # the tail under the next layer
            k("_topk_kernel", side, 52, 60),
            k("_sparse_decode_kernel", main, 70, 80), k("_merge_kernel", main, 80, 82)]  # a dense layer
    cats = kernel_categories(rows, "prr")
    assert cats == ["rest", "selection", "speculation", "selection", "repair", "repair", "predictor", "rest",
                    "predictor", "attention", "attention"]
    b = step_breakdown(rows, "prr")
    ex = b["exclusive_us"]
    assert ex["speculation"] == 0 and ex["predictor"] == 0  # all hidden: under the selection, under the rest
    assert ex["selection"] == 29 and ex["repair"] == 7 and ex["attention"] == 12 and ex["gaps"] == 3
    assert sum(ex.values()) == pytest.approx(b["wall_us"]) == 82
    assert b["busy_us"]["speculation"] == 16 and b["busy_us"]["predictor"] == 12
    # the same kernels under DSA's rules: a top-K is always selection
    assert kernel_categories(rows, "dsa")[8] == "selection"
    top = step_breakdown(rows, "prr")["top_kernels"]
    assert top[0] == {"name": "gemv_bf16", "category": "rest", "count": 2, "busy_us": 31}


def test_prr_roles_survive_a_replay_that_moves_streams():
    """A replayed graph may continue the main chain on what was the selection's stream and swap the side
    streams between layers (seen on the H200): the model's kernels stay "rest", a top-K after the predictor's
    update on its stream is the predictor's, one after scoring the selection's, and attention over a dense
    layer is attention wherever it runs."""
    a, b_ = 13, 9
    rows = [k("_sparse_decode_kernel", b_, 0, 10), k("_merge_kernel", b_, 10, 12),  # a dense layer, off "main"
            k("nvjet_sm90_tst_128x8", a, 12, 30), k("_rms_norm_kernel", a, 30, 31),  # the chain on stream a
            k("_quest_scores_kernel", b_, 32, 50), k("_sparse_decode_kernel", a, 33, 45),  # roles swapped
            k("_topk_kernel", b_, 50, 60), k("_repair_kernel", a, 61, 66), k("_merge_kernel", a, 66, 67),
            k("_overlap_kernel", b_, 67, 68), k("_holt_kernel", b_, 68, 72), k("nvjet_sm90_tst_128x8", a, 68, 90),
            k("_group_max_kernel", b_, 72, 74), k("_topk_kernel", b_, 74, 80)]
    assert kernel_categories(rows, "prr") == [
        "attention", "attention", "rest", "rest", "selection", "speculation", "selection", "repair", "repair",
        "predictor", "predictor", "rest", "predictor", "predictor"]


def test_empty_timeline():
    b = step_breakdown([], "dsa")
    assert b["wall_us"] == 0 and set(b["exclusive_us"]) == set(CATEGORIES)


def test_breakdown_plot_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    from prr.bench.plots import plot_e2e_breakdown

    rows = [k("gemv", 7, 0, 10), k("_sparse_decode_kernel", 7, 10, 14)]
    res = {"bench": "e2e", "meta": {"model": "m", "method": "quest", "budget": 2048}, "env": {"gpu": "g"},
           "rows": [{"context": 131072, "batch": 1, "attention": a, "ms_per_token": 0.02,
                     "breakdown": step_breakdown(rows, a)} for a in ("dense", "dsa")]}
    path = tmp_path / "e2e.json"
    path.write_text(json.dumps(res))
    png = plot_e2e_breakdown(str(path), str(tmp_path))
    assert png.endswith("e2e_breakdown.png") and (tmp_path / "e2e_breakdown.png").stat().st_size > 1000
    res["rows"] = [{k2: v for k2, v in r.items() if k2 != "breakdown"} for r in res["rows"]]
    path.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="no per-token breakdown"):
        plot_e2e_breakdown(str(path), str(tmp_path))


def test_step_parts_plot_from_saved_diag_json(tmp_path):
    """`prr bench plot` on a scripts/diag_prr.py JSON draws the layer step's parts; a case missing a part is an
    error that names it."""
    pytest.importorskip("matplotlib")
    from prr.bench.plots import plot_step_parts

    us = {"selection": 29.7, "attention_split": 11.0, "speculate": 9.2, "repair_exact": 10.0, "dsa": 40.9,
          "prr_exact": 42.9}
    res = {"env": {"gpu": "g", "commit": "c"}, "cases": {"m/b1/128K/quest": {"us": us},
                                                          "m/b1/32K/quest/8192": {"us": dict(us, dsa=60.0)}}}
    path = tmp_path / "diag.json"
    path.write_text(json.dumps(res))
    png = plot_step_parts(str(path), str(tmp_path))
    assert png.endswith("diag.png") and (tmp_path / "diag.png").stat().st_size > 1000
    del res["cases"]["m/b1/128K/quest"]["us"]["repair_exact"]
    path.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="repair_exact"):
        plot_step_parts(str(path), str(tmp_path))


def test_timeline_plot_from_saved_diag_json(tmp_path):
    """`prr bench plot --timelines`: one lane per (step, stream), the chosen steps only; a JSON without recorded
    timelines is an error that says how to record them."""
    pytest.importorskip("matplotlib")
    from prr.bench.plots import plot_timelines

    def k(name, stream, a, b):
        return {"name": name, "stream": stream, "start_us": a, "end_us": b, "dur_us": b - a}

    tls = {"dsa": [k("_quest_scores_kernel", 7, 0, 15), k("_topk_kernel", 7, 15.5, 25), k("_merge_kernel", 7, 26, 28)],
           "prr_exact": [k("_quest_scores_kernel", 7, 0, 15), k("_sparse_decode_kernel", 9, 10, 30),
                         k("_repair_kernel", 7, 31, 37)],
           "other": [k("x", 7, 0, 1)]}
    res = {"env": {"gpu": "g"}, "cases": {"m/b1/128K/quest": {"us": {}, "timelines": tls}}}
    path = tmp_path / "diag.json"
    path.write_text(json.dumps(res))
    png = plot_timelines(str(path), str(tmp_path), steps=("dsa", "prr_exact"))
    assert png.endswith("diag_timelines.png") and (tmp_path / "diag_timelines.png").stat().st_size > 1000
    del res["cases"]["m/b1/128K/quest"]["timelines"]
    path.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="--timelines"):
        plot_timelines(str(path), str(tmp_path))
