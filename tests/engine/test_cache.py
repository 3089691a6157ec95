"""The embedding cache: the encoder runs once per distinct input; keys follow content and backbone."""

from __future__ import annotations

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


def test_when_the_cache_is_used():
    assert use_cache(None, 0) is True and use_cache(None, 8) is False
    assert use_cache("true", 8) is False  # image-encoder prompts change the encoder's output
    assert use_cache(True, 0, augment="true") is False and use_cache(True, 0, scale="native") is False
    assert use_cache("false", 0) is False
