"""The CUDA path: a training step, bf16 autocast, pinned host batches, a whole fit, on the device.

Marked ``gpu``: deselected from the default and slow suites and run by the GPU check
(``python -m crener.gpucheck``, ``nox -s gpu_check``) on a GPU machine. The device comes from
``$CRENER_GPU_DEVICE`` (default ``cuda``); the check's CPU dry run sets it to ``cpu`` so these
tests run on every test-suite pass and cannot rot between GPU sessions.
"""

from __future__ import annotations

import os

import pytest
import torch

from crener.checkpoint import load_checkpoint
from crener.data.batching import collate
from crener.evaluation import autocast, predict_examples
from tests.helpers import tiny_cfg
from tests.test_model import make

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = torch.device(os.environ.get("CRENER_GPU_DEVICE", "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (set CRENER_GPU_DEVICE=cpu for the dry run)")
    return dev


def _setup(tiny_encoder, sentences, model="crener"):
    return make("full", tiny_encoder, sentences, family=model)


def _loss_and_grads(net, task, batch, device, bf16=False):
    net.zero_grad(set_to_none=True)
    with autocast(device, bf16):
        out = net(batch)
    loss = task.loss(out, batch)["loss"]
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), grads


@pytest.mark.parametrize("model", ["crener", "w2ner"])
def test_training_step_on_device_matches_cpu(model, device, tiny_encoder, sentences):
    """fp32 on the device computes what the CPU computes: loss and every gradient."""
    _, task, net, examples = _setup(tiny_encoder, sentences, model)
    net.train()
    batch = collate(examples, task.target, task.num_labels)
    torch.manual_seed(1)
    cpu_loss, cpu_grads = _loss_and_grads(net.eval(), task, batch, torch.device("cpu"))
    net.to(device)
    dev_loss, dev_grads = _loss_and_grads(net.eval(), task, batch.to(device), device)
    assert dev_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-4)
    assert cpu_grads.keys() == dev_grads.keys() and cpu_grads
    for name, g in cpu_grads.items():
        torch.testing.assert_close(dev_grads[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_step_learns(device, tiny_encoder, sentences):
    """Under bf16 autocast a step gives a finite loss near fp32's, and steps lower it."""
    _, task, net, examples = _setup(tiny_encoder, sentences)
    net.to(device).eval()  # no dropout: the two precisions see the same function
    batch = collate(examples, task.target, task.num_labels).to(device)
    fp32, _ = _loss_and_grads(net, task, batch, device)
    bf16, grads = _loss_and_grads(net, task, batch, device, bf16=True)
    assert torch.isfinite(bf16) and all(torch.isfinite(g).all() for g in grads.values())
    assert bf16.item() == pytest.approx(fp32.item(), rel=5e-2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        with autocast(device, True):
            loss = task.loss(net(batch), batch)["loss"]
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


def test_pinned_batch_reaches_the_device_unchanged(device, tiny_encoder, sentences):
    _, task, _, examples = _setup(tiny_encoder, sentences)
    batch = collate(examples, task.target, task.num_labels)
    host = batch.pin_memory() if device.type == "cuda" else batch
    if device.type == "cuda":
        assert all(t.is_pinned() for t in (host.input_ids, host.lengths, host.grid_mask, host.targets))
    moved = host.to(device)
    assert moved.input_ids.device.type == device.type and moved.indices == batch.indices
    for name in ("input_ids", "attention_mask", "lengths", "char_mask", "grid_mask", "targets"):
        assert torch.equal(getattr(moved, name).cpu(), getattr(batch, name)), name


def test_predictions_on_device_equal_cpu(device, tiny_encoder, sentences):
    cfg, task, net, examples = _setup(tiny_encoder, sentences)
    run = tiny_cfg(".")
    on_cpu = predict_examples(net.eval(), task, examples, torch.device("cpu"), run)
    on_dev = predict_examples(net.to(device).eval(), task, examples, device, run)
    assert on_dev == on_cpu


def test_fit_on_device_and_checkpoint_loads_on_cpu(device, tiny_data, tmp_path):
    from crener.train import fit

    cfg = tiny_cfg(tiny_data, **{"runtime.device": str(device), "train.bf16": device.type == "cuda",
                                 "train.epochs": 2})  # fmt: skip
    summary = fit(cfg, tmp_path / "run", resume=False)
    assert 0.0 <= summary["test"]["f1"] <= 1.0
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert all(t.device.type == "cpu" for t in state["model"].values())
