"""Prompt-only checkpoints: contents, size, round trips through MONAI and MONAI Label's paths, refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.networks.utils import copy_model_state

from helpers import quiet
from scripts.model.network import PTSAM
from scripts.model.prompt_file import META_KEY, IncompatibleCheckpointError, decode_meta, load_prompts, save_prompts


def _net(**kw) -> PTSAM:
    kw = {"sam_variant": "tiny", "n_md_prompts": 4, "n_ie_prompts": 2, "num_classes": 2} | kw
    return quiet(PTSAM, **kw)


def _trained(**kw) -> PTSAM:
    """A network whose prompts differ from any fresh one's."""
    net = _net(**kw)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) + 3.0)
    return net


def _assert_same_prompts(a: PTSAM, b: PTSAM) -> None:
    assert torch.equal(a.md_prompts.tokens, b.md_prompts.tokens)
    assert torch.equal(a.ie_prompts.tokens, b.ie_prompts.tokens)


def test_file_holds_prompts_and_meta_only(tmp_path):
    net = _trained()
    path = save_prompts(net, tmp_path / "models" / "model.pt")
    state = torch.load(path, weights_only=True)
    assert set(state) == {"md_prompts.tokens", "ie_prompts.tokens", META_KEY}
    assert decode_meta(state[META_KEY]) == {
        "format": 1,
        "sam_variant": "tiny",
        "n_md_prompts": 4,
        "n_ie_prompts": 2,
        "num_classes": 2,
        "backbone_fingerprint": net.backbone.fingerprint,
        "backbone_source": "random(seed=0)",
    }
    assert not list(tmp_path.glob("models/.*tmp"))  # the temporary file was renamed away


@pytest.mark.parametrize(("n_ie", "limit"), [(0, 16_000), (8, 400_000)])
def test_vit_b_file_sizes(tmp_path, n_ie, limit):
    path = save_prompts(quiet(PTSAM, "vit_b", n_ie_prompts=n_ie), tmp_path / "model.pt")
    assert path.stat().st_size <= limit


def test_round_trip_through_save_and_load_prompts(tmp_path):
    trained = _trained()
    path = save_prompts(trained, tmp_path / "model.pt")
    fresh = _net()
    load_prompts(fresh, path)
    _assert_same_prompts(fresh, trained)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_monai_checkpoint_saver_and_loader(tmp_path):
    """The files the workflows write (CheckpointSaver) load back through CheckpointLoader."""
    trained = _trained()
    engine = Engine(lambda e, b: None)
    CheckpointSaver(str(tmp_path), {"model": trained}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    fresh = _net()
    loader_engine = Engine(lambda e, b: None)
    CheckpointLoader(str(tmp_path / "model.pt"), {"model": fresh}).attach(loader_engine)
    loader_engine.run([0], max_epochs=1)
    _assert_same_prompts(fresh, trained)


def test_copy_model_state_as_ckpt_export_does(tmp_path):
    """MONAI's copy_model_state treats every entry as a tensor; the check still runs."""
    trained = _trained()
    fresh = _net()
    copy_model_state(fresh, torch.load(save_prompts(trained, tmp_path / "model.pt"), weights_only=True))
    _assert_same_prompts(fresh, trained)
    other = save_prompts(_trained(n_md_prompts=5), tmp_path / "other.pt")
    with pytest.raises(IncompatibleCheckpointError, match="n_md_prompts: file 5, network 4"):
        copy_model_state(_net(), torch.load(other, weights_only=True))


def test_non_strict_load_as_monai_label_does(tmp_path):
    trained = _trained()
    path = save_prompts(trained, tmp_path / "model.pt")
    fresh = _net()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    result = fresh.load_state_dict(ckpt.get("model", ckpt), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_prompts(fresh, trained)


def test_loading_never_touches_the_backbone(tmp_path):
    net = _net()
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    state = _trained().state_dict()
    state["backbone.image_encoder.pos_embed"] = torch.zeros_like(before["image_encoder.pos_embed"])
    net.load_state_dict(state)
    for key, value in net.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key


MISMATCHES = [
    ({"n_md_prompts": 6}, "n_md_prompts: file 6, network 4"),
    ({"n_ie_prompts": 0}, "n_ie_prompts: file 0, network 2"),
    ({"num_classes": 3}, "num_classes: file 3, network 2"),
    ({"backbone_seed": 1}, "backbone_fingerprint: file '[0-9a-f]+', network '[0-9a-f]+'.*random\\(seed=1\\)"),
]


@pytest.mark.parametrize(("change", "message"), MISMATCHES)
@pytest.mark.parametrize("path", ["strict", "non-strict", "CheckpointLoader", "load_prompts"])
def test_file_for_another_network_is_refused(tmp_path, change, message, path):
    file = save_prompts(_trained(**change), tmp_path / "model.pt")
    net = _net()
    before = net.md_prompts.tokens.detach().clone()
    with pytest.raises(IncompatibleCheckpointError, match=message):
        if path == "load_prompts":
            load_prompts(net, file)
        elif path == "CheckpointLoader":
            engine = Engine(lambda e, b: None)
            CheckpointLoader(str(file), {"model": net}).attach(engine)
            engine.run([0], max_epochs=1)
        else:
            net.load_state_dict(torch.load(file, weights_only=True), strict=path == "strict")
    assert torch.equal(net.md_prompts.tokens, before)


def test_other_variant_is_refused(tmp_path):
    file = save_prompts(quiet(PTSAM, "tiny"), tmp_path / "model.pt")
    with pytest.raises(IncompatibleCheckpointError, match="sam_variant: file 'tiny', network 'vit_b'"):
        quiet(PTSAM, "vit_b").load_state_dict(torch.load(file, weights_only=True), strict=False)


def test_state_without_meta_is_refused(tmp_path):
    bare = {k: v for k, v in _trained().state_dict().items() if k != META_KEY}
    for strict in (True, False):
        with pytest.raises(IncompatibleCheckpointError, match="not a PTSAM prompt checkpoint"):
            _net().load_state_dict(bare, strict=strict)
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(IncompatibleCheckpointError, match=f"{tmp_path / 'bare.pt'} is not a PTSAM prompt"):
        load_prompts(_net(), tmp_path / "bare.pt")


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_crafted_pickle_as_model_pt_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"md_prompts.tokens": _Payload()}, tmp_path / "model.pt")
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Payload()))
    for name in ("model.pt", "raw.pt"):
        with pytest.raises(IncompatibleCheckpointError, match=f"{name} cannot be read as a weights-only"):
            load_prompts(_net(), tmp_path / name)
        engine = Engine(lambda e, b: None)
        CheckpointLoader(str(tmp_path / name), {"model": _net()}).attach(engine)
        with pytest.raises(pickle.UnpicklingError):
            engine.run([0], max_epochs=1)
    assert not (tmp_path / "PWNED").exists()


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt: no such file"):
        load_prompts(_net(), tmp_path / "model.pt")


def test_loading_does_not_mutate_the_callers_dict():
    state = _trained().state_dict()
    keys = set(state)
    _net().load_state_dict(state)
    assert set(state) == keys  # the meta entry is consumed from a copy, not from the caller's dict


def test_meta_averaged_by_a_federated_server_still_loads():
    """A server averages every entry: the mean of equal bytes is those bytes as floats."""
    net = quiet(PTSAM, "tiny")
    state = net.state_dict()
    averaged = {**state, META_KEY: state[META_KEY].double()}
    net.load_state_dict(averaged)
    assert decode_meta(averaged[META_KEY]) == decode_meta(state[META_KEY])
    mixed = {**state, META_KEY: state[META_KEY].double() + 0.5}  # sites that disagreed
    with pytest.raises(IncompatibleCheckpointError, match="not a PTSAM prompt checkpoint"):
        net.load_state_dict(mixed)
