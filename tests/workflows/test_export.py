"""Deployment exports of the whole network with the prompts baked in: TorchScript and ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
import torch

from helpers import BUNDLE, monai_bundle, quiet
from scripts.export import build_network, export_onnx, onnx_difference
from scripts.model.network import PTSAM
from scripts.model.prompt_file import save_prompts


def _trained(tmp_path) -> tuple[PTSAM, str]:
    net = quiet(PTSAM, "tiny", n_md_prompts=8).eval()
    with torch.no_grad():
        net.md_prompts.tokens.add_(torch.randn_like(net.md_prompts.tokens))
    return net, str(save_prompts(net, tmp_path / "models" / "model.pt"))


def test_torchscript_through_monai_ckpt_export(tmp_path):
    net, model = _trained(tmp_path)
    done = monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(tmp_path / "model.ts"), "--ckpt_file", model,
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml",
        "--sam_variant", "tiny", "--use_trace", "True", "--input_shape", "[1, 3, 256, 256]",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        assert (exported(image) - net(image)).abs().max() <= 1e-4


def test_onnx_with_dynamic_batch(tmp_path):
    net, model = _trained(tmp_path)
    built = quiet(build_network, str(BUNDLE / "configs" / "inference.yaml"), sam_variant="tiny", model_path=model)
    assert torch.equal(built.md_prompts.tokens, net.md_prompts.tokens)  # the trained prompts, baked in
    path = export_onnx(built, tmp_path / "model.onnx")
    assert onnx_difference(built, path, batch=3) <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        assert np.abs(session.run(None, {"image": image.numpy()})[0] - net(image).numpy()).max() <= 1e-4


def test_onnx_file_carries_the_training_recipe(tmp_path):
    import json

    import onnx

    from scripts.engine.recipe import LEGACY, from_knobs
    from scripts.export import main

    net = quiet(PTSAM, "tiny", n_md_prompts=8).eval()
    knobs = {**LEGACY, "layout": "display", "intensity": "window", "a_min": -100, "a_max": 200}
    recipe = from_knobs(**knobs, image_size=256)
    model = save_prompts(net, tmp_path / "models" / "model.pt", recipe)
    config = str(BUNDLE / "configs" / "inference.yaml")
    path = quiet(main, str(tmp_path / "model.onnx"), config, sam_variant="tiny", model_path=str(model))
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert json.loads(props["ptsam_recipe"]) == json.loads(json.dumps(recipe))


def test_onnx_with_image_encoder_prompts_and_two_classes(tmp_path):
    import json

    import onnx

    from scripts.engine.recipe import LEGACY, from_knobs
    from scripts.export import main

    net = quiet(PTSAM, "tiny", n_md_prompts=4, n_ie_prompts=2, num_classes=2).eval()
    with torch.no_grad():  # trained prompts: the export must carry these, not fresh ones
        net.md_prompts.tokens.add_(torch.randn_like(net.md_prompts.tokens))
        net.ie_prompts.tokens.normal_(0, 1)
    knobs = {**LEGACY, "layout": "display", "classes": [1, 2], "class_names": ["a", "b"]}
    recipe = from_knobs(**knobs, image_size=256)
    model = save_prompts(net, tmp_path / "models" / "model.pt", recipe)
    config = str(BUNDLE / "configs" / "inference.yaml")
    knobs = {"sam_variant": "tiny", "n_md_prompts": 4, "n_ie_prompts": 2, "num_classes": 2}
    path = quiet(main, str(tmp_path / "model.onnx"), config, model_path=str(model), **knobs)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    image = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = net(image).numpy()
    out = session.run(None, {"image": image.numpy()})[0]
    assert out.shape == (2, 2, 256, 256)
    assert np.abs(out - expected).max() <= 1e-4
    io = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["ptsam_io"])
    assert io["image_size"] == 256 and io["class_names"] == ["a", "b"] and len(io["pixel_mean"]) == 3


def test_torchscript_file_carries_the_recipe_and_input_contract_as_the_onnx_file_does(tmp_path):
    import json

    import onnx

    from scripts.engine.recipe import LEGACY, from_knobs, recorded_recipe
    from scripts.export import main

    net, _ = _trained(tmp_path)
    knobs = {**LEGACY, "layout": "display", "intensity": "window", "a_min": -100, "a_max": 200}
    knobs |= {"classes": [2], "label_map": {255: 2}, "class_names": ["lesion"]}
    model = save_prompts(net, tmp_path / "models" / "model.pt", from_knobs(**knobs, image_size=256))
    config = str(BUNDLE / "configs" / "inference.yaml")
    path = quiet(main, str(tmp_path / "model.ts"), config, sam_variant="tiny", model_path=str(model))
    extra = {"ptsam_recipe": "", "ptsam_io": "", "metadata.json": ""}
    exported = torch.jit.load(path, _extra_files=extra)
    # what model.pt records, read back as a deployment without the bundle would read it
    assert json.loads(extra["ptsam_recipe"]) == json.loads(json.dumps(recorded_recipe(model)))
    assert json.loads(extra["ptsam_recipe"])["label_map"] == {"255": 2}
    assert json.loads(extra["metadata.json"])["version"]  # MONAI's bundle metadata, as ckpt_export writes it
    # the same entries, byte for byte, as the ONNX export of the same model.pt writes
    onnx_path = quiet(main, str(tmp_path / "model.onnx"), config, sam_variant="tiny", model_path=str(model))
    props = {p.key: p.value for p in onnx.load(onnx_path).metadata_props}
    assert {k for k in props if k.startswith("ptsam_")} == {"ptsam_recipe", "ptsam_io"}
    assert all(extra[k].decode() == props[k] for k in ("ptsam_recipe", "ptsam_io"))
    assert json.loads(extra["ptsam_io"])["class_names"] == ["lesion"]
    image = torch.randn(3, 3, 256, 256)  # another batch than the trace's
    with torch.no_grad():
        assert (exported(image) - net(image)).abs().max() <= 1e-4


def test_export_refuses_to_overwrite_the_trained_prompts_and_unknown_knobs(tmp_path):
    from scripts.common.options import OptionError
    from scripts.export import main

    _, model = _trained(tmp_path)
    before = (tmp_path / "models" / "model.pt").read_bytes()
    config = str(BUNDLE / "configs" / "inference.yaml")
    # `.pt` is a TorchScript name too: exporting onto model.pt would replace the prompts
    with pytest.raises(ValueError, match=r"--filepath .*model\.pt is the trained prompts' file"):
        quiet(
            main, str(tmp_path / "models" / "model.pt"), config, sam_variant="tiny", ckpt_dir=str(tmp_path / "models")
        )
    assert (tmp_path / "models" / "model.pt").read_bytes() == before
    # a misspelt knob would otherwise be ignored (here: the default models/ folder's prompts)
    with pytest.raises(OptionError, match=r"--ckpt_dri \(did you mean --ckpt_dir\?\)"):
        quiet(main, str(tmp_path / "model.ts"), config, sam_variant="tiny", ckpt_dri=str(tmp_path / "models"))
    with pytest.raises(OptionError, match=r"--network_def#n_md_prompt: not a parameter of scripts\.model\.PTSAM"):
        quiet(main, str(tmp_path / "model.ts"), config, sam_variant="tiny", **{"network_def#n_md_prompt": 4})
    assert not (tmp_path / "model.ts").exists()


def test_export_without_trained_prompts_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "models" / "model.pt"
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "scripts.export", "--filepath", str(tmp_path / "model.onnx"),
         "--sam_variant", "tiny", "--ckpt_dir", str(model.parent)],
        cwd=BUNDLE, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: no trained prompts at {model}: train first")  # as inference says it
    assert "Traceback" not in done.stderr and not (tmp_path / "model.onnx").exists()
