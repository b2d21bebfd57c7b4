"""The default preset is the recipe the fine-tuning benchmark chose (benchmarks/results.json), not a hand-picked one."""

from __future__ import annotations

import json
from dataclasses import fields

from conftest import ROOT, script_module

from lora_yolo.config import LoraConfig
from lora_yolo.presets import resolve_config

RESULTS = ROOT / "benchmarks" / "results.json"


def test_default_preset_is_the_benchmarks_choice():
    results = json.loads(RESULTS.read_text())
    chosen = results["default"]
    assert chosen is not None, "results.json holds no chosen default: run scripts/bench_finetune.py --report"
    preset = chosen["preset"]
    config, train_args = resolve_config("default")
    lora_keys = {k: v for k, v in preset.items() if k not in ("optimizer", "lr0")}
    assert {k: getattr(config, k) for k in lora_keys} == lora_keys
    assert train_args.get("optimizer", "auto") == preset["optimizer"]
    if preset["optimizer"] != "auto":  # under auto Ultralytics picks lr0 itself
        assert train_args["lr0"] == preset["lr0"]
    # the choice is what its own numbers say: the best worst case over every base and task
    assert chosen["worst_val_vs_full"] == max(chosen["candidates"].values())
    assert set(chosen["val_vs_full"]) == {f"{c['base']}/{c['task']}" for c in results["table"] if c["n_train"] == 64}


def bench():
    """scripts/bench_finetune.py as a module (its top level imports only the standard library)."""
    return script_module("bench_finetune")


def test_results_json_is_the_choice_its_runs_make():
    """results.json's default is what choose_default makes of the committed runs.jsonl: the report was not edited by
    hand and is not stale."""
    results, b = json.loads(RESULTS.read_text()), bench()
    chosen = b.choose_default(b.load_runs())
    assert {k: v for k, v in results["default"].items() if k != "test"} == json.loads(json.dumps(chosen))
    assert results["runs"] == len(b.load_runs()) and results["hours"] == b.wall_hours(b.load_runs())


def test_the_default_beat_the_previous_default_run_beside_it():
    """The previous default (rank 16, `dora-r16-head-bias`) ran in the same benchmark on the same code and left
    runs.jsonl for exploration/ when it lost, to keep the whole benchmark within 150 minutes: with its runs back the
    choice is the same, its worst case below the default's."""
    results, b = json.loads(RESULTS.read_text()), bench()
    previous = [r for r in b.load_runs(b.EXPLORATION) if r["method"] == "dora-r16-head-bias"]
    chosen = b.choose_default(b.load_runs() + previous)
    assert (chosen["method"], chosen["lr"]) == (results["default"]["method"], results["default"]["lr"])
    assert chosen["candidates"]["dora-r16-head-bias @ rule"] < chosen["worst_val_vs_full"]


def test_the_default_held_on_every_cell_with_two_seeds():
    """The issue's bar for a default: every base x task and data size run with at least 2 seeds at the default's own
    lr, and none of those runs failed, diverged or collapsed (the default's recipe at a flat 3e-3, with a better worst
    case, was put out by its diverged 256-image runs)."""
    results, b = json.loads(RESULTS.read_text()), bench()
    chosen = results["default"]
    mine = [r for r in b.load_runs() if (r["method"], r["lr"]) == (chosen["method"], chosen["lr"])]
    cells = {(c["base"], c["task"], c["n_train"]) for c in results["table"]}
    for cell in cells:
        runs = [r for r in mine if (r["base"], r["task"], r["n_train"]) == cell]
        assert len({r["seed"] for r in runs}) >= 2, cell
        assert not [r for r in runs if "failed" in r or b.collapsed(r)], cell
    assert set(chosen["test"]) == {"/".join(map(str, c)) for c in cells}


def run(method, lr, val, seed=0, n=64, base="b", **extra):
    return {"base": base, "task": "t", "n_train": n, "method": method, "lr": lr, "seed": seed, "val": val, **extra}


def test_choose_default_puts_out_a_recipe_that_diverged_or_collapsed_anywhere():
    """The best worst case wins unless one of its runs, at any seed or data size, diverged or collapsed; a crash
    (no divergence message) puts nothing out."""
    b = bench()
    a, c = list(b.PRESET_OF)[:2]
    runs = [run("full", 0.001, 0.5), run(a, 0.003, 0.49), run(c, 0.003, 0.45)]
    assert b.choose_default(runs)["method"] == a
    diverged = run(a, 0.003, 0.0, seed=1, n=256, failed="LoraYoloError: training diverged: the loss ... NaN/Inf")
    assert b.choose_default([*runs, diverged])["method"] == c
    assert b.choose_default([*runs, diverged])["out_diverged_or_collapsed"] == [f"{a} @ 0.003"]
    collapsed = run(a, 0.003, 0.1, seed=1, n=16, warnings=["validation mAP50-95 collapsed: ..."])
    assert b.choose_default([*runs, collapsed])["method"] == c
    crashed = run(a, 0.003, 0.0, seed=1, n=256, failed="no output")
    assert b.choose_default([*runs, crashed])["method"] == a


def test_wall_hours_counts_runs_side_by_side_once():
    """Two runs over the same hour are one hour of wall time; a gap counts nothing; runs recorded before `start`
    existed count their own seconds."""
    b = bench()
    runs = [
        {"start": 0.0, "seconds": 3600.0},
        {"start": 1800.0, "seconds": 3600.0},
        {"start": 9000.0, "seconds": 1800.0},
    ]
    assert b.wall_hours(runs) == 2.0  # [0, 5400] and [9000, 10800]
    assert b.wall_hours([*runs, {"seconds": 3600.0}]) == 3.0


def test_every_recipe_states_what_the_default_preset_sets():
    """A LoRA recipe is the default preset with its own settings on top (run_method), so it must state every setting
    the default sets away from LoraConfig's own, or a new default silently changes it: `dora` (DoRA r 8, head
    adapted) became the head-in-full recipe when the default took train_head. lr0_base_ratio is set per run."""
    config = resolve_config("default")[0]
    plain = LoraConfig()
    moved = {f.name for f in fields(LoraConfig) if getattr(config, f.name) != getattr(plain, f.name)}
    for method, settings in bench().PRESET_OF.items():
        assert moved - {"lr0_base_ratio"} <= set(settings), method
