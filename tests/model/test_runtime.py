"""The encoder's CPU fast paths (scripts/model/runtime.py) against the PyTorch reference, on the
tiny generalist with prompts trained here: embeddings' relative error and the masks' Dice; the
exports' cache kept to its budget."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import bf16_units, quiet
from scripts.demo.scenes import make_scene
from scripts.model import runtime
from scripts.model.network import PTSAM
from scripts.model.sam import PIXEL_MEAN, PIXEL_STD


def _scenes(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM-normalised scene images (n, 3, 256, 256) and the union of their objects (n, 1, 256, 256)."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, 256) for _ in range(n)]
    mean, std = torch.tensor(PIXEL_MEAN)[:, None, None], torch.tensor(PIXEL_STD)[:, None, None]
    images = torch.stack([(torch.from_numpy(s.image) - mean) / std for s in scenes]).float()
    masks = torch.stack([torch.from_numpy(s.masks.any(0))[None] for s in scenes]).float()
    return images, masks


@pytest.fixture(scope="module")
def specialist(generalist) -> PTSAM:
    """4 decoder tokens trained for 'every object' on 8 scenes (cached embeddings, seconds)."""
    torch.manual_seed(0)
    net = quiet(PTSAM, "tiny", sam_checkpoint=generalist, n_md_prompts=4).eval()
    images, masks = _scenes(0, 8)
    with torch.no_grad():
        embeddings = net.encode(images)
    optimiser = torch.optim.Adam([net.md_prompts.tokens], lr=0.05)
    for _ in range(60):
        loss = F.binary_cross_entropy_with_logits(net(embeddings, embedded=True), masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net


@pytest.fixture(autouse=True)
def encoder_files(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "encoders"  # one export per module, not per test
    monkeypatch.setattr(runtime, "cache_folder", lambda: folder)
    return folder


def _exports(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _with(net: PTSAM, engine: str, int8: bool, bf16: bool = False) -> PTSAM:
    fast = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=net.ie_prompts.n, backbone=net.backbone)
    fast.load_state_dict(net.state_dict())
    fast.encoder_engine, fast.encoder_int8, fast.encoder_bf16 = engine, int8, bf16
    return fast.eval()


@pytest.mark.parametrize(
    ("engine", "int8", "max_error", "min_dice"),
    [("onnxruntime", False, 1e-4, 0.999), ("openvino", False, 1e-4, 0.999), ("onnxruntime", True, 0.05, 0.98),
     ("torch", True, 0.05, 0.98)],
)  # fmt: skip
def test_fast_paths_agree_with_pytorch(specialist, engine, int8, max_error, min_dice):
    images, masks = _scenes(1, 4)  # held out
    fast = _with(specialist, engine, int8)
    with torch.no_grad():
        reference, embeddings = specialist(images), specialist.encode(images)
        predicted, fast_embeddings = fast(images), fast.encode(images)
    assert _dice(reference > 0, masks > 0) >= 0.7  # the reference segments: its masks mean something
    error = float((fast_embeddings - embeddings).norm() / embeddings.norm())
    assert error <= max_error
    assert _dice(predicted > 0, reference > 0) >= min_dice
    if not int8:
        assert error <= 1e-5 or engine == "openvino"  # float rounding only
    else:
        assert error >= 1e-4  # int8 really ran


def test_bfloat16_agrees_with_pytorch_where_the_cpu_has_it(specialist):
    """OpenVINO in bfloat16, held to int8's tolerance, and it really ran in bfloat16 (float32
    agrees within 1e-5). Where the CPU has no bfloat16 units, the refusal below is what runs."""
    images, masks = _scenes(1, 4)
    fast = _with(specialist, "openvino", False, bf16=True)
    if not bf16_units():
        with pytest.raises(ValueError, match="this CPU has no bfloat16 units"), torch.no_grad():
            fast(images)
        return
    runtime.require_engine("openvino", False, "cpu", bf16=True)
    with torch.no_grad():
        reference, embeddings = specialist(images), specialist.encode(images)
        predicted, fast_embeddings = fast(images), fast.encode(images)
    assert fast._runtime.precision == "bfloat16"
    error = float((fast_embeddings - embeddings).norm() / embeddings.norm())
    assert 1e-4 <= error <= 0.05
    assert _dice(predicted > 0, reference > 0) >= 0.98
    assert _dice(predicted > 0, masks > 0) >= _dice(reference > 0, masks > 0) - 0.02


def test_bfloat16_is_refused_on_a_cpu_without_its_units(monkeypatch):
    """Asked for bfloat16 there, OpenVINO runs float32 without a word: refused at the start."""
    import openvino as ov

    real = ov.Core.get_property

    def no_bf16(core, device, name, *args):  # what OpenVINO reports on an AVX2 CPU
        found = real(core, device, name, *args)
        return [c for c in found if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else found

    monkeypatch.setattr(ov.Core, "get_property", no_bf16)
    with pytest.raises(ValueError, match=r"this CPU has no bfloat16 units \(OpenVINO finds .*FP32"):
        runtime.require_engine("openvino", False, "cpu", bf16=True)
    runtime.require_engine("openvino", False, "cpu")  # float32 is fine there


def test_image_encoder_prompts_are_baked_in_and_followed(specialist, encoder_files):
    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=2, backbone=specialist.backbone).eval()
    with torch.no_grad():
        net.ie_prompts.tokens.normal_(0, 1)
    fast = _with(net, "onnxruntime", False)
    images = _scenes(2, 2)[0]
    before = _exports(encoder_files)
    with torch.no_grad():
        assert (fast.encode(images) - net.encode(images)).abs().max() <= 1e-4
        fast.ie_prompts.tokens.mul_(-1)  # new prompts (as a loaded model.pt brings): a new export
        net.ie_prompts.tokens.mul_(-1)
        assert (fast.encode(images) - net.encode(images)).abs().max() <= 1e-4
    exported = _exports(encoder_files)
    assert len(exported - before) == 2  # one per set of prompts
    again = _with(net, "onnxruntime", False)  # as a new process: it finds the file, no new export
    with torch.no_grad():
        assert (again.encode(images) - net.encode(images)).abs().max() <= 1e-4
    assert _exports(encoder_files) == exported


def test_the_export_runs_global_attention_in_query_chunks(specialist, encoder_files, monkeypatch):
    """The exported encoder computes each global block's attention in chunks of queries (the
    whole matrix is ViT-B's 0.8 GB a pass), with the prompts as keys, and still equals PyTorch."""
    import onnx

    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=2, backbone=specialist.backbone).eval()
    with torch.no_grad():
        net.ie_prompts.tokens.normal_(0, 1)
    images = _scenes(2, 2)[0]
    softmaxes = {}
    for chunk in (256, 96):  # tiny's global blocks have 16 x 16 queries: one chunk, then 96 + 96 + 64
        monkeypatch.setattr(runtime, "EXPORT_QUERY_CHUNK", chunk)
        with torch.no_grad():
            fast = _with(net, "onnxruntime", False)
            assert float((fast.encode(images) - net.encode(images)).norm() / net.encode(images).norm()) <= 1e-5
        graph = onnx.load(
            str(encoder_files / f"encoder_{fast._runtime.stem}" / "encoder.onnx"), load_external_data=False
        )
        softmaxes[chunk] = sum(node.op_type == "Softmax" for node in graph.graph.node)
    windowed = sum(block.window_size > 0 for block in net.backbone.image_encoder.blocks)
    global_ = len(net.backbone.image_encoder.blocks) - windowed
    assert global_ >= 1 and softmaxes[256] == windowed + global_
    assert softmaxes[96] == windowed + 3 * global_


@pytest.mark.parametrize("n_ie", [0, 2])
def test_int8_quantises_every_linear_layer_of_the_encoder(specialist, encoder_files, n_ie):
    """No float32 product is left with a weight in the int8 export, with or without image-encoder
    prompts. A weight that reached the ONNX graph other than as a plain initializer (the windowed
    blocks' qkv, and with prompts every qkv, once did, through a Transpose, for being used twice)
    is not quantised: slower, and unnoticed by the accuracy tests."""
    import onnx

    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=n_ie, backbone=specialist.backbone).eval()
    with torch.no_grad():
        net.ie_prompts.tokens.normal_(0, 1)
    fast = _with(net, "onnxruntime", True)
    with torch.no_grad():
        fast.encode(_scenes(1, 1)[0])
    folder = encoder_files / f"encoder_{fast._runtime.stem}_int8{runtime.INT8_TAG}"
    graph = onnx.load(str(folder / "encoder.onnx"), load_external_data=False).graph
    weights = {tensor.name for tensor in graph.initializer}
    made_by = {out: node for node in graph.node for out in node.output}

    def from_weight(name: str) -> bool:  # an initializer, or one only reshaped or transposed
        node = made_by.get(name)
        if node is None:
            return name in weights
        return node.op_type in ("Transpose", "Reshape", "Identity") and from_weight(node.input[0])

    float_with_weight = [n.name for n in graph.node if n.op_type == "MatMul" and any(map(from_weight, n.input))]
    assert float_with_weight == []
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) >= 4 * len(net.backbone.image_encoder.blocks)


def test_fast_paths_refuse_what_they_cannot_do(specialist):
    fast = _with(specialist, "onnxruntime", False)
    image = _scenes(3, 1)[0]
    with pytest.raises(RuntimeError, match="inference paths"):
        fast(image)  # gradients on: a training step would silently not reach the prompts
    with pytest.raises(ValueError, match="CPU paths, but device is cuda"):
        runtime.require_engine("onnxruntime", "false", "cuda:0")
    with pytest.raises(ValueError, match="use encoder_engine 'onnxruntime' for int8"):
        runtime.require_engine("openvino", True, "cpu")
    with pytest.raises(
        ValueError, match="encoder_bf16 is offered with encoder_engine 'openvino' only, got 'onnxruntime'"
    ):
        runtime.require_engine("onnxruntime", False, "cpu", bf16="true")
    with pytest.raises(ValueError, match="encoder_int8 and encoder_bf16 both true"):
        quiet(PTSAM, "tiny", encoder_engine="openvino", encoder_int8=True, encoder_bf16=True)
    with pytest.raises(ValueError, match="CPU paths, but device is cuda"):
        runtime.require_engine("openvino", False, "cuda", bf16=True)
    with pytest.raises(ValueError, match="encoder_engine must be one of torch, onnxruntime, openvino"):
        quiet(PTSAM, "tiny", encoder_engine="tensorrt")
    runtime.require_engine("torch", False, "cuda:0")  # the default is fine anywhere


def _fake_export(folder, name: str, mb: int, age_s: float):
    path = folder / name
    path.mkdir(parents=True)
    (path / "encoder.onnx").write_bytes(b"\0" * (mb * 2**20))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_old_exports_are_pruned_least_recently_used_first(tmp_path):
    folder = tmp_path / "encoders"
    oldest = _fake_export(folder, "encoder_a", 3, 3 * 86400)
    old = _fake_export(folder, "encoder_b", 3, 2 * 86400)
    recent = _fake_export(folder, "encoder_c", 3, 60)  # used a minute ago: maybe by another process
    current = _fake_export(folder, "encoder_d", 3, 7 * 86400)  # the one being used: never
    (folder / ".encoder_e.tmp").mkdir()  # another process's export being written: not an export
    assert runtime.prune_exports(folder, [current], 7 * 2**20) == [oldest, old]
    assert sorted(p.name for p in folder.iterdir()) == [".encoder_e.tmp", "encoder_c", "encoder_d"]
    assert runtime.prune_exports(folder, [current], float("inf")) == []
    assert recent.is_dir()


def test_a_new_export_prunes_the_cache_to_its_budget(specialist, encoder_files, monkeypatch):
    stale = _fake_export(encoder_files, "encoder_stale", 2, 30 * 86400)
    monkeypatch.setenv(runtime.BUDGET_ENV, "0.001")  # 1 MB: everything old goes
    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=1, backbone=specialist.backbone).eval()
    with torch.no_grad():
        net.ie_prompts.tokens.normal_(0, 1)  # prompts of its own: a new export
        _with(net, "onnxruntime", False).encode(_scenes(4, 1)[0])
    assert not stale.exists()
    assert any((p / "encoder.onnx").is_file() for p in encoder_files.glob("encoder_*"))  # the new one stays
    monkeypatch.setenv(runtime.BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match="PTSAM_ENCODER_CACHE_GB='lots': expected a number of GB"):
        runtime.require_engine("onnxruntime", False, "cpu")
