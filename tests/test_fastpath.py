"""The GPU fast path, on the CPU: non-finite updates skipped on the device by fused AdamW (no sync per
update), channels_last for CNNs, --compile with its eager fallback, SDPA attention for transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import finetunekit
from conftest import CIFAR, write_manifest
from finetunekit import build, fastpath, loop
from finetunekit.errors import TrainingStopped


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """60 real CIFAR images (6 per class) and 20 more for validation: a whole run in a few seconds."""
    if not CIFAR.is_dir():
        pytest.skip(f"{CIFAR} not found (the shared datasets sit beside the repo)")
    d = tmp_path_factory.mktemp("tiny")
    return {"train": write_manifest(d / "train.csv", CIFAR / "train", 6),
            "val": write_manifest(d / "val.csv", CIFAR / "test", 2)}


# ---- non-finite updates skipped on the device --------------------------------------------------------------

def _linear_run(poison: set[int], max_nonfinite: int = 10, log_every: int = 25, seen: list | None = None):
    """loop.fit with fused AdamW on a Linear model (no buffers), 8 batches in one epoch; the training forward
    calls numbered (from 1) in `poison` return NaN logits. Returns the weight before each training forward
    (also appended to `seen`), the final weight, the optimizer and the state."""
    from finetunekit.data import make_loader
    from finetunekit.features import Features
    from finetunekit.optim import build_scheduler
    from finetunekit.strategies import Phase, Plan
    from finetunekit.tasks import Classification

    accelerator = build.accelerator("no", 1, True, None)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    train = make_loader(Features(x[None], y), 8, train=True, workers=0, seed=0)
    val = make_loader(Features(x[None], y), 16, train=False, workers=0, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
    seen, calls = [] if seen is None else seen, [0]

    def before(module, args):
        if module.training:
            seen.append(module.weight.detach().clone())

    def after(module, args, out):
        if module.training:
            calls[0] += 1
            return out * float("nan") if calls[0] in poison else out

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    module, optimizer, train, val = accelerator.prepare(model, optimizer, train, val)
    scheduler = build_scheduler(optimizer, kind="constant", epochs=1, updates_per_epoch=len(train),
                                warmup_epochs=0, min_lr_ratio=0.0)
    plan = Plan("full", [Phase(0, frozenset({"weight", "bias"}), 1.0, "all")])
    cfg = loop.LoopConfig(epochs=1, plan=plan, quiet=True, max_nonfinite=max_nonfinite, log_every=log_every)
    state = loop.TrainState()
    try:
        loop.fit(accelerator, module, optimizer, scheduler, train, val, Classification(["a", "b", "c"]), cfg,
                 on_best=lambda *a: None, state=state)
    finally:
        final = model.weight.detach().clone()
    return seen, final, optimizer, state


def test_fused_adamw_skips_a_non_finite_update_on_the_device(caplog):
    seen, final, optimizer, state = _linear_run(poison={3})
    assert loop._skips_on_device(build.accelerator("no", 1, True, None), optimizer)
    assert torch.equal(seen[3], seen[2])  # the update of forward 3 (0-based index 2) changed nothing
    assert all(not torch.equal(seen[i], seen[i + 1]) for i in (0, 1, 3, 4, 5, 6))
    assert not torch.equal(seen[7], final)
    assert state.skipped == 1 and state.updates == 8  # the skipped update still moved the schedule on
    step = optimizer.state[optimizer.param_groups[0]["params"][0]]["step"]
    assert step.item() == 7  # the kernel took back the skipped update's step: Adam's bias correction is right
    assert "step 3: non-finite loss or gradient; update skipped (1 in a row)" in caplog.text
    # a non-fused optimizer keeps the host-checked path
    assert not loop._skips_on_device(build.accelerator("no", 1, True, None),
                                     torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))


@pytest.mark.parametrize("log_every", [4, 8])
def test_device_skips_stop_the_run_after_max_nonfinite_in_a_row(log_every):
    seen = []
    with pytest.raises(TrainingStopped, match="3 updates in a row had a non-finite loss or gradient; likely "
                                              "causes: a learning rate too high") as e:
        _linear_run(poison={2, 3, 4}, max_nonfinite=3, log_every=log_every, seen=seen)
    assert e.value.exit_code == 1  # the CLI's exit code
    # the third skip (batch 4) is found at the next check: after batch 4, or at the end of the epoch (batch 8)
    assert len(seen) == log_every
    assert all(torch.equal(seen[1], w) for w in seen[2:5])  # the weights never saw the poisoned updates


def _regression_table(manifest, path, poison=()):
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "value"])
        for i, r in enumerate(csv.DictReader(manifest.open())):  # 1e30: its squared error overflows to inf
            w.writerow([r["path"], 1e30 if i in poison else float(r["label"] in ("cat", "dog"))])
    return path


def test_a_run_with_fused_adamw_counts_skips_in_metrics(tiny, tmp_path, monkeypatch):
    """A whole run on the device-skip path (fused AdamW forced on the CPU): two poisoned targets make up to
    two of the 7 updates non-finite; they are skipped, counted in metrics.json, the saved weights are finite."""
    forced = build.plan_and_optimizer
    monkeypatch.setattr(build, "plan_and_optimizer",
                        lambda train, backbone, lr, fused=False: forced(train, backbone, lr, fused=True))
    run = finetunekit.fit({
        "task": "image-regression",
        "data": {"path": str(_regression_table(tiny["train"], tmp_path / "train.csv", poison={0, 31})),
                 "val": str(_regression_table(tiny["val"], tmp_path / "val.csv")), "image_size": 32,
                 "augment": "none", "num_workers": 0},
        "model": {"name": "timm:test_efficientnet", "pretrained": False},
        "train": {"epochs": 1, "batch_size": 8}, "out": str(tmp_path / "run"), "quiet": True})
    assert 1 <= run.metrics["skipped_updates"] <= 2
    assert json.loads((run.run_dir / "metrics.json").read_text())["skipped_updates"] == run.metrics["skipped_updates"]
    assert "non-finite loss or gradient; update skipped" in (run.run_dir / "log.txt").read_text()
    weights = load_file(str(run.model_dir / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


# ---- channels_last ---------------------------------------------------------------------------------------

def test_channels_last_for_cnns_only_and_saved_weights_unaffected(tmp_path):
    import timm

    from finetunekit.artifacts import save_model_folder
    from finetunekit.checkpoint import _tensors
    from finetunekit.models import create_backbone

    backbone = create_backbone("timm:test_efficientnet", num_classes=3, pretrained=False)
    cnn = backbone.module
    params = list(cnn.parameters())
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert fastpath.channels_last(cnn)
    assert [id(p) for p in cnn.parameters()] == [id(p) for p in params]  # the optimizer's tensors still
    assert cnn.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert not cnn.conv_stem.weight.is_contiguous()
    seen = []
    cnn.conv_stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
        memory_format=torch.channels_last)))
    cnn.eval()
    with torch.no_grad():
        cnn(torch.randn(2, 3, 32, 32))
    assert seen == [True]  # the input batch was converted too
    assert all(torch.equal(before[k], v) for k, v in cnn.state_dict().items())
    # saved contiguous (safetensors needs it), loading back into plain timm
    save_model_folder(tmp_path / "model", backbone, ["a", "b", "c"], "timm:test_efficientnet")
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], saved[k]) for k in before)
    assert all(v.is_contiguous() for v in _tensors(cnn.state_dict()).values())
    plain = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    plain.load_state_dict(saved)
    # ViTs (their one Conv2d is the patch embedding) and transformers: nothing to gain, left alone
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3)
    assert not fastpath.channels_last(vit) and vit.patch_embed.proj.weight.is_contiguous()
    assert not fastpath.is_cnn(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_resumed_fused_adamw_moments_follow_channels_last_weights():
    """A checkpoint's optimizer state is contiguous; fused AdamW reads parameter and moments as flat memory,
    so without match_param_layout a channels_last weight would be updated with scrambled moments."""
    torch.manual_seed(0)
    w, g1, g2 = (torch.randn(4, 3, 3, 3) for _ in range(3))

    def run(layout, resume):
        p = torch.nn.Parameter(w.clone().contiguous(memory_format=layout))
        opt = torch.optim.AdamW([p], lr=0.1, fused=True)
        p.grad = g1.clone().contiguous(memory_format=layout)
        opt.step()
        if resume:  # as a checkpoint stores it: contiguous
            sd = opt.state_dict()
            sd["state"] = {i: {k: v.contiguous() for k, v in s.items()} for i, s in sd["state"].items()}
            opt = torch.optim.AdamW([p], lr=0.1, fused=True)
            opt.load_state_dict(sd)
            fastpath.match_param_layout(opt)
        p.grad = g2.clone().contiguous(memory_format=layout)
        opt.step()
        return p.detach().contiguous()

    assert torch.equal(run(torch.contiguous_format, False), run(torch.channels_last, True))


# ---- --compile -------------------------------------------------------------------------------------------

def _image_recipe(tiny, out, **train):
    return {"data": {"path": str(tiny["train"]), "val": str(tiny["val"]), "image_size": 32, "augment": "none",
                     "num_workers": 0},
            "model": {"name": "timm:test_efficientnet", "pretrained": False},
            "train": {"epochs": 1, "batch_size": 16, "strategy": "full", **train}, "out": str(out), "quiet": True}


def _broken_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found (injected)")


def test_compile_fallback_runs_the_module_eagerly(monkeypatch, caplog):
    from accelerate import Accelerator

    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", _broken_backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    compiled = fastpath.compile_with_fallback(model)
    assert Accelerator(cpu=True).unwrap_model(compiled, keep_torch_compile=False) is model
    assert list(compiled.parameters()) == list(model.parameters())  # what the optimizer holds
    x = torch.randn(3, 4)
    for _ in range(2):  # the first call fails to compile and falls back; the second goes straight to eager
        out = compiled(x)
        assert torch.equal(out, model(x))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert caplog.text.count("--compile: torch.compile failed (RuntimeError: no C++ compiler found "
                             "(injected)); running eagerly") == 1
    assert set(model.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        compiled(torch.randn(3, 5))  # an error of the model itself still surfaces


def test_compile_failure_in_a_run_falls_back_with_one_log_line(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", _broken_backend)
    run = finetunekit.fit(_image_recipe(tiny, tmp_path / "run", compile=True, ema=0.9))
    log = (run.run_dir / "log.txt").read_text()
    assert log.count("--compile: torch.compile failed (RuntimeError: no C++ compiler found (injected)); "
                     "running eagerly") == 1
    saved = load_file(str(run.model_dir / "model.safetensors"))  # no _orig_mod. prefix, in model/ or checkpoints
    assert "conv_stem.weight" in saved and not any(k.startswith("_orig_mod.") for k in saved)
    step = sorted((run.run_dir / "checkpoints").glob("step-*"))[-1]
    assert load_file(str(step / "model.safetensors")).keys() == saved.keys()
    assert load_file(str(step / "ema.safetensors")).keys() == saved.keys()


def test_compile_paths_train_like_eager(tiny, tmp_path, monkeypatch):
    """A failed compile falls back to exactly the eager run; the compiled path itself (dynamo with its eager
    backend: no C++ compiler needed) trains and saves plain keys."""
    plain = finetunekit.fit(_image_recipe(tiny, tmp_path / "plain", ema=0.9))
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", _broken_backend)
    fallback = finetunekit.fit(_image_recipe(tiny, tmp_path / "fallback", compile=True, ema=0.9))
    a, b = (load_file(str(r.model_dir / "model.safetensors")) for r in (fallback, plain))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "eager")
    run = finetunekit.fit(_image_recipe(tiny, tmp_path / "run", compile=True, ema=0.9))
    assert "torch.compile failed" not in (run.run_dir / "log.txt").read_text()
    saved = load_file(str(run.model_dir / "model.safetensors"))
    assert saved.keys() == b.keys()
    assert all(torch.allclose(saved[k].float(), b[k].float(), atol=1e-4) for k in b)


# ---- SDPA attention --------------------------------------------------------------------------------------

def test_minilm_loads_with_sdpa_attention():
    """transformers 5.x picks SDPA by default where the architecture supports it (see hf_source.create)."""
    from finetunekit.models import create_text_backbone

    backbone = create_text_backbone("minilm", ["neg", "pos"], "classification", pretrained=False)
    assert backbone.module.config._attn_implementation == "sdpa"


def test_cpu_bf16_follows_the_instruction_set_and_the_model_unless_forced(monkeypatch):
    real = fastpath.cpu_flags()
    assert ("fpu" in real) if os.path.exists("/proc/cpuinfo") else real == set()
    transformer = torch.nn.TransformerEncoderLayer(16, 2)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
    monkeypatch.delenv("FINETUNEKIT_CPU_BF16", raising=False)
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    assert fastpath.cpu_bf16(transformer) == "AMX-BF16, not a CNN"  # first match wins
    assert fastpath.cpu_bf16(cnn) is None  # measured slower for depthwise CNNs (docs/speed.md)
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert fastpath.cpu_bf16(transformer) == "AVX512-BF16, not a CNN"
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx2", "fma"})
    assert fastpath.cpu_bf16(transformer) is None
    monkeypatch.setenv("FINETUNEKIT_CPU_BF16", "1")
    assert fastpath.cpu_bf16(cnn) == "FINETUNEKIT_CPU_BF16=1"
    monkeypatch.setenv("FINETUNEKIT_CPU_BF16", "0")
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"amx_bf16"})
    assert fastpath.cpu_bf16(transformer) is None


def test_precision_auto_decides_per_model_on_a_bf16_cpu(tiny, tmp_path, monkeypatch):
    """A transformer trains in bf16, a CNN in fp32, on the same (patched) AMX CPU; evaluate follows fit."""
    from conftest import save_tiny_bert
    from test_text import write_sentiment

    monkeypatch.delenv("FINETUNEKIT_CPU_BF16", raising=False)
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    bert = save_tiny_bert(tmp_path / "bert")
    data = write_sentiment(tmp_path / "s.csv", 48, 0)
    text = finetunekit.fit({"task": "text-classification", "quiet": True, "out": str(tmp_path / "text"),
                            "data": {"path": str(data)}, "model": {"name": f"hf:{bert}"},
                            "train": {"epochs": 1, "batch_size": 16, "strategy": "full"}})
    log = (text.run_dir / "log.txt").read_text()
    assert "--precision auto: bf16 autocast on this CPU (AMX-BF16, not a CNN)" in log
    assert "device cpu, precision bf16" in log and text.metrics["precision"] == "bf16"
    image = finetunekit.fit(_image_recipe(tiny, tmp_path / "image"))
    log = (image.run_dir / "log.txt").read_text()
    assert "bf16" not in log and "device cpu, precision no" in log
    loaded = finetunekit.load(text.run_dir)  # what evaluate builds its accelerator for
    assert build.accelerator("auto", 1, False, None, loaded.module).mixed_precision == "bf16"
    assert build.accelerator("auto", 1, False, None).mixed_precision == "no"  # no model yet: fp32


def test_precision_auto_on_a_bf16_cpu_trains_in_bf16(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNEKIT_CPU_BF16", "1")
    run = finetunekit.fit(_image_recipe(tiny, tmp_path / "run"))
    log = (run.run_dir / "log.txt").read_text()
    assert "--precision auto: bf16 autocast on this CPU (FINETUNEKIT_CPU_BF16=1)" in log
    assert "device cpu, precision bf16" in log
