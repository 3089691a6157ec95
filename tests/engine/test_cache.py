"""The embedding cache: the encoder runs once per distinct input; keys follow content and backbone."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.data import MetaTensor

from helpers import quiet
from scripts.engine.cache import EncodeImaged, use_cache
from scripts.model.network import PTSAM


def test_embeddings_are_computed_once_and_reused_from_disk(tmp_path):
    net = quiet(PTSAM, "tiny").eval()
    calls = []
    encode = net.encode
    net.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    image = MetaTensor(torch.randn(3, 256, 256), meta={"filename_or_obj": "a.tif"})
    first = EncodeImaged(net, cache_dir=tmp_path)({"image": image})["embedding"]
    assert first.shape == (256, 16, 16) and first.meta["filename_or_obj"] == "a.tif"
    with torch.no_grad():
        assert torch.equal(first.as_tensor(), encode(image.as_tensor()[None])[0])
    again = EncodeImaged(net, cache_dir=tmp_path)  # a new run: served from disk
    assert torch.equal(again({"image": image})["embedding"].as_tensor(), first.as_tensor()) and calls == [1]
    stack = MetaTensor(torch.randn(3, 5, 256, 256))
    assert again({"image": stack})["embedding"].shape == (256, 5, 16, 16) and calls == [1, 5]
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_damaged_cache_file_is_recomputed(tmp_path):
    net = quiet(PTSAM, "tiny").eval()
    cache = EncodeImaged(net, cache_dir=tmp_path)
    image = torch.randn(3, 256, 256)
    good = cache.embedding(image)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"half a file")
    assert torch.equal(EncodeImaged(net, cache_dir=tmp_path).embedding(image), good)
    assert torch.equal(torch.load(path, weights_only=True), good)  # rewritten whole


def test_keys_change_with_the_backbone():
    image = torch.randn(3, 256, 256)
    a = EncodeImaged(quiet(PTSAM, "tiny", backbone_seed=0)).key_of(image)
    b = EncodeImaged(quiet(PTSAM, "tiny", backbone_seed=1)).key_of(image)
    assert a != b and a == EncodeImaged(quiet(PTSAM, "tiny", backbone_seed=0)).key_of(image.clone())


def test_when_the_cache_is_used(caplog):
    caplog.set_level(logging.INFO, logger="scripts.engine.cache")
    assert use_cache(None, 0) is True and not caplog.records
    assert use_cache(None, 8) is False  # off by default with image-encoder prompts, with a note
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "embedding cache off: image-encoder prompts change the encoder's output as they learn")
    ]
    caplog.clear()
    assert use_cache("true", 8) is False and caplog.records[-1].levelname == "WARNING"  # asked for: a warning
    assert use_cache(True, 0, augment="true") is False and use_cache(True, 0, scale="native") is False
    assert use_cache(None, 0, augment=True) is False and "augmentation" in caplog.records[-1].getMessage()
    caplog.clear()
    assert use_cache("false", 0) is False and not caplog.records


def test_memory_is_bounded_least_recently_used_first(tmp_path):
    net = quiet(PTSAM, "tiny").eval()
    per_embedding = 256 * 16 * 16 * 4  # bytes of one tiny embedding
    cache = EncodeImaged(net, cache_dir=tmp_path, ram_mb=3.5 * per_embedding / 2**20)  # room for 3
    images = [torch.randn(3, 256, 256, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    first = [cache.embedding(image) for image in images]
    assert len(cache.memory) == 3 and cache.held_bytes == 3 * per_embedding
    assert list(cache.memory) == [cache.key_of(image) for image in images[3:]]  # the oldest went first
    cache.embedding(images[3])  # used again: now the most recent
    cache.embedding(images[0])  # from disk, back in memory, pushing out images[4]
    assert list(cache.memory) == [cache.key_of(images[i]) for i in (5, 3, 0)]
    assert torch.equal(cache.embedding(images[0]), first[0])
    volume = torch.randn(3, 5, 256, 256)  # 5 embeddings: beyond the budget, kept on disk only
    assert cache.embedding(volume).shape == (256, 5, 16, 16) and len(cache.memory) == 3


def test_keys_change_with_the_encoder_code_and_attention_path(monkeypatch):
    import scripts.engine.cache as cache_module

    image = torch.randn(3, 256, 256)
    fused = EncodeImaged(quiet(PTSAM, "tiny")).key_of(image)
    assert fused != EncodeImaged(quiet(PTSAM, "tiny", fused_attention=False)).key_of(image)
    monkeypatch.setattr(cache_module, "encoder_version", lambda: "other-code")
    assert fused != EncodeImaged(quiet(PTSAM, "tiny")).key_of(image)
    monkeypatch.setattr(cache_module, "CACHE_FORMAT", cache_module.CACHE_FORMAT + 1)
    assert EncodeImaged(quiet(PTSAM, "tiny")).key_of(image) != fused


def _train_on_volumes(synthetic, out, **overrides) -> tuple[torch.Tensor, list[int]]:
    """Two epochs on the synthetic CT volumes (8 slices of each per epoch); returns the prompts
    and the number of embeddings in memory after every iteration."""
    from ignite.engine import Events
    from monai.bundle import ConfigParser

    from helpers import BUNDLE

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.yaml"))
    parser.update(
        {
            "bundle_root": str(BUNDLE), "dataset_dir": str(synthetic / "ct"), "output_dir": str(out / "eval"),
            "ckpt_dir": str(out / "models"), "sam_variant": "tiny", "device": "$torch.device('cpu')",
            "tracking_enabled": False, "epochs": 2, "intensity": "window", "slices_per_volume": 8, **overrides,
        }
    )  # fmt: skip
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    cache = parser.get_parsed_content("embedding_cache")
    held: list[int] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: held.append(len(cache.memory)))
    trainer.run()
    return parser.get_parsed_content("network").md_prompts.tokens.detach().clone(), held


def test_training_on_many_slices_within_a_small_memory_budget(synthetic, tmp_path):
    budget = 3  # embeddings: 3 x 256 KiB of the tiny backbone
    capped, held = _train_on_volumes(synthetic, tmp_path / "capped", cache_ram_mb=budget * 0.25)
    assert held and max(held) <= budget and max(held) == budget  # full, never over
    assert len(list((tmp_path / "capped" / "eval" / "embedding_cache").glob("*.pt"))) > budget
    uncached, _ = _train_on_volumes(synthetic, tmp_path / "uncached", cache_embeddings=False)
    # The cache changes nothing learned: the encoder's batches differ (rounding of 1e-6), which
    # Adam's normalised steps amplify on tokens of tiny gradients; a wrong input would be off by
    # about the learning rate (0.05).
    assert torch.allclose(capped, uncached, atol=1e-4)


def test_float16_cache_halves_the_files_and_agrees_with_float32(synthetic, generalist, tmp_path):
    """On the pretrained `tiny` generalist and real (synthetic) fields: embeddings within 1e-3
    relative error, masks of the same logits at Dice >= 0.999, files half the size."""
    from scripts.data.transforms import LoadImageAnyd, SamChannelsd, SamInputd, SamIntensityd

    net = quiet(PTSAM, "tiny", str(generalist)).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        net.md_prompts.tokens.normal_()
    prepare = [LoadImageAnyd("image"), SamIntensityd("image"), SamChannelsd("image"), SamInputd("image", 256)]
    full = EncodeImaged(net, cache_dir=tmp_path / "fp32")
    half = EncodeImaged(net, cache_dir=tmp_path / "fp16", dtype="float16")
    for path in sorted((synthetic / "microscopy" / "imagesTr").glob("*.tif")):
        d = {"image": str(path)}
        for transform in prepare:
            d = transform(d)
        image = d["image"].as_tensor()
        a, b = full.embedding(image), half.embedding(image)
        assert b.dtype == torch.float32 and ((a - b).norm() / a.norm()) < 1e-3
        with torch.no_grad():
            la, lb = (net(e[None], embedded=True) for e in (a, b))
        level = la.median()  # untrained prompts may predict nothing at 0: compare masks of half the pixels
        ma, mb = la > level, lb > level
        assert 2 * (ma & mb).sum() / (ma.sum() + mb.sum()) >= 0.999
    sizes = [sum(p.stat().st_size for p in (tmp_path / d).glob("*.pt")) for d in ("fp32", "fp16")]
    assert sizes[1] < 0.55 * sizes[0]
    with pytest.raises(ValueError, match="cache dtype must be one of"):
        EncodeImaged(net, dtype="int8")


def test_one_image_in_two_layouts_has_two_cache_entries(tmp_path):
    """The key is the preprocessed image itself: a NIfTI seen as displayed and as stored (prompts
    of before the layout knob) never share an embedding, even in one cache."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    from scripts.data.transforms import LoadImageAnyd, SamChannelsd, SamInputd, SamIntensityd

    xy = np.random.default_rng(2).integers(0, 256, (40, 30)).astype(np.uint8)
    nib.save(nib.Nifti1Image(xy[:, :, None], np.eye(4)), str(tmp_path / "slide.nii.gz"))
    net = quiet(PTSAM, "tiny").eval()
    cache = EncodeImaged(net, cache_dir=tmp_path / "cache")
    inputs = {}
    for layout in ("display", "stored"):
        prepare = Compose(
            [
                LoadImageAnyd("image"),
                SamIntensityd("image"),
                SamChannelsd("image"),
                SamInputd("image", 256, layout=layout),
            ]
        )
        inputs[layout] = prepare({"image": str(tmp_path / "slide.nii.gz")})["image"].as_tensor()
    assert torch.allclose(inputs["display"], inputs["stored"].transpose(-2, -1), atol=1e-5)  # one image, transposed
    assert cache.key_of(inputs["display"]) != cache.key_of(inputs["stored"])
    with torch.no_grad():
        for image in inputs.values():
            assert torch.equal(cache.embedding(image), net.encode(image[None])[0])
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
