"""The roofline suite's attribution: FLOPs per op group exactly, time per group from the profiler
(backward ops to the group whose forward created them), the machine peaks, the JSON schema."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from crener.profiles import VARIANTS, build_run_config
from crener.registry import build_model, build_task
from crener.tools import roofline
from tests.conftest import TYPES


class Grid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Linear(8, 6)
        self.dconv = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, N, 8) -> (B, 6, N, N)
        return self.dconv(self.reduce(x).permute(0, 3, 1, 2))


class Toy(nn.Module):
    """Children named like a grid model's: encoder, grid (with dconv), predictor."""

    def __init__(self, wide: int = 16) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.grid = Grid()
        self.predictor = nn.Sequential(nn.Linear(6, wide), nn.GELU(), nn.Linear(wide, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, 4)
        h = self.encoder(x)
        g = self.grid(h.unsqueeze(2) + h.unsqueeze(1))
        return self.predictor(g.permute(0, 2, 3, 1))


def test_flops_per_group_are_the_layers_own_counts() -> None:
    b, n = 2, 5
    model, x = Toy(), torch.randn(b, n, 4)
    with FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts()
    got = roofline.flops_by_group(counts, "Toy", train=True)
    cells = b * n * n
    # A linear layer: 2*m*k*n forward, and a training step counts three times that (the input's and
    # the weights' gradients); the rule overcounts a first layer, whose input needs no gradient.
    assert got["encoder"] == 3 * 2 * (b * n) * 4 * 8
    assert got["grid input + 1x1 conv"] == 3 * 2 * cells * 8 * 6
    assert got["dilated convs"] == 3 * 2 * cells * 6 * 9  # depthwise: 9 taps a channel
    assert got["predictor"] == 3 * 2 * cells * (6 * 16 + 16 * 3)
    assert "other" not in got  # every FLOP is inside a group
    assert roofline.flops_by_group(counts, "Toy", train=False)["dilated convs"] == 2 * cells * 6 * 9


def test_a_real_models_training_flops_match_the_counters_total() -> None:
    # Counted over forward and backward, the module tracker put CRENER's backward ops under several
    # groups (their sum twice the counter's total): the roofline counts the forward pass, times 3.
    from crener.data.batching import collate
    from crener.tools.workload import bench_config, sample_parts

    cfg = bench_config("quick", "crener", "full", {})
    parts = sample_parts(cfg, 12, torch.device("cpu"))
    task, model = parts.task, parts.model.train()
    batch = collate(parts.train_examples[:6], task.target, task.num_labels)
    with FlopCounterMode(display=False) as forward:
        loss = task.loss(model(batch), batch)["loss"]
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    groups = roofline.flops_by_group(forward.get_flop_counts(), type(model).__name__, train=True)
    assert sum(groups.values()) == 3 * forward.get_total_flops()
    measured = forward.get_total_flops() + backward.get_total_flops()
    assert 0.9 * measured <= sum(groups.values()) <= 1.1 * measured


def test_backward_time_goes_to_the_group_that_made_the_op() -> None:
    """A predictor 200 times wider than everything else owns most of the step, backward included."""
    model, x = Toy(wide=2048), torch.randn(4, 24, 4)
    model(x).sum().backward()  # warm-up
    with roofline.group_scopes(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    got = roofline.attribute_profile(prof.events())
    total = sum(v["seconds"] for v in got.values())
    assert got["predictor"]["seconds"] / total > 0.6
    backward = [
        e for e in prof.events() if e.name.startswith("autograd::engine::evaluate_function: AddmmBackward")
    ]
    assert backward and all(roofline._evaluate_function(e) is e for e in backward)
    # Without the scopes nothing is attributed to a group: the scopes are what labels the ops.
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    assert set(roofline.attribute_profile(prof.events())) == {"other"}


@pytest.mark.parametrize("model", ["crener", "w2ner"])
def test_every_child_of_the_grid_models_has_a_group(model: str, tiny_encoder) -> None:
    encoder, _ = tiny_encoder
    for variant in VARIANTS if model == "crener" else ["full"]:
        cfg = build_run_config(model=model, variant=variant, profile="smoke").model
        net = build_model(cfg, build_task(cfg, TYPES), encoder)
        assert {name for name, _ in net.named_children()} <= set(roofline.GROUP_OF_CHILD), variant


def test_peaks_are_rates_of_the_work_done() -> None:
    assert roofline.matmul_gflops(torch.float32, shapes=((64, 64, 64),), reps=2) > 0
    assert roofline.copy_bandwidth_gbs(mib=8, reps=2) > 0


def test_suite_json_has_the_issue_schema(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from crener.tools.bench import run_bench

    monkeypatch.setattr(
        roofline, "machine_peaks", lambda: {"fp32_gflops": 100.0, "bf16_gflops": 50.0, "bandwidth_gbs": 10.0}
    )
    args = argparse.Namespace(probe=None, overrides=["runtime.device=cpu"], suite=["roofline"], widths=["quick"],
                              models=["w2ner"], variants=["full"], sentences=4, json=True, lengths=[], batch=1)  # fmt: skip
    assert run_bench(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["peaks"] == {"fp32_gflops": 100.0, "bf16_gflops": 50.0, "bandwidth_gbs": 10.0}
    assert [(s["model"], s["widths"], s["phase"]) for s in out["steps"]] == [
        ("w2ner", "quick", "train"),
        ("w2ner", "quick", "eval"),
    ]
    for s in out["steps"]:
        assert {"variant", "sent_per_s", "dense_gflops", "fraction_of_fp32_peak", "groups"} <= set(s)
        assert s["fraction_of_fp32_peak"] == pytest.approx(s["dense_gflops"] / 100.0)
        assert sum(g["share"] for g in s["groups"]) == pytest.approx(1.0)
        assert sum(g["gflop"] for g in s["groups"]) == pytest.approx(s["dense_gflop"])
    groups = {g["group"] for g in out["steps"][0]["groups"]}
    assert {
        "encoder",
        "context",
        "grid input + 1x1 conv",
        "dilated convs",
        "predictor",
        "loss",
        "optimiser",
    } <= groups
    assert "decode" in {g["group"] for g in out["steps"][1]["groups"]}


def test_page_is_generated_from_the_run_and_rerendered_from_its_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    from crener.tools.bench import run_bench

    monkeypatch.setattr(
        roofline, "machine_peaks", lambda: {"fp32_gflops": 123.4, "bf16_gflops": 5.6, "bandwidth_gbs": 7.8}
    )
    page = tmp_path / "perf" / "performance.md"
    args = argparse.Namespace(probe=None, overrides=[], suite=["roofline"], widths=["quick"], models=["w2ner"],
                              variants=["full"], sentences=4, json=False, lengths=[], batch=1, page=str(page),
                              from_json=None)  # fmt: skip
    assert run_bench(args) == 0
    text = page.read_text()
    data = json.loads(page.with_suffix(".json").read_text())
    assert text.startswith("# Performance") and "## Roofline" in text
    assert "fp32 matmul 123.4 GFLOP/s" in text and data["machine"]["commit"][:7] in text
    step = data["steps"][0]
    assert f"{step['sent_per_s']:.1f} sent/s" in text  # the page shows the run's own figures
    page.unlink()
    again = argparse.Namespace(probe=None, from_json=str(page.with_suffix(".json")), page=None)
    assert run_bench(again) == 0
    assert page.read_text() == text


def test_bytes_read_count_each_dtype_at_its_width() -> None:
    longs, halves = torch.ones(100, dtype=torch.long), torch.ones(100, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        longs.add(longs)
        halves.mul(halves)
        longs.view(10, 10)
    got = {
        e.name: roofline._input_bytes(e)
        for e in prof.events()
        if e.name in ("aten::add", "aten::mul", "aten::view")
    }
    assert got == {"aten::add": 2 * 100 * 8, "aten::mul": 2 * 100 * 2, "aten::view": 0}
