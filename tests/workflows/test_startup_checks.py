"""What a run refuses before any work, and how it says so: wrong options, unwritable folders, a
training state that cannot be read or is another training's, a second training into the same
folder; the bundle's own message is the last line printed, the traceback only with PTSAM_DEBUG=1."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from helpers import BUNDLE, monai_bundle, training_until_first_epoch
from scripts.common.errors import chain
from scripts.common.files import check_writable
from scripts.common.options import OptionError, override_problems, problems
from scripts.demo.synthetic import generate
from scripts.engine.resume import check_state

TRAIN = "configs/train.yaml"
INFERENCE = "configs/inference.yaml"


def _train(synthetic, tmp_path, *extra: str, env: dict | None = None):
    args = ["run", "training", "--config_file", TRAIN, "--sam_variant", "tiny"]
    args += ["--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(tmp_path / "eval")]
    args += ["--ckpt_dir", str(tmp_path / "models"), *extra]
    if env is None:
        return monai_bundle(*args)
    command = [sys.executable, "-W", "ignore", "-m", "monai.bundle", *args]
    return subprocess.run(
        command,
        cwd=BUNDLE,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**os.environ, **env},
    )


def _last_lines(done: subprocess.CompletedProcess, n: int = 1) -> list[str]:
    return done.stderr.strip().splitlines()[-n:]


def test_wrong_options_are_named_with_what_is_allowed(synthetic, tmp_path):
    extra = ["--epochs", "abc", "--learning_rate", "-1", "--intensity", "ct", "--n_md_prompts", "0"]
    done = _train(synthetic, tmp_path, *extra)
    assert done.returncode != 0
    assert _last_lines(done, 5) == [
        "Error: invalid option(s):",
        "  --epochs 'abc': expected an integer >= 1",
        "  --learning_rate -1: expected a number >= 0",
        "  --intensity 'ct': expected one of auto, window, percentile, none",
        "  --n_md_prompts 0 with --n_ie_prompts 0: no prompt tokens, nothing to learn or apply",
    ]
    assert "Traceback" not in done.stderr and "ConfigExpression" not in done.stderr
    assert not (tmp_path / "eval").exists()  # refused before any folder or data was touched


def test_classes_must_match_num_classes(synthetic, tmp_path):
    """A label value per class, and prompts that tell the classes apart: anything else trains a
    class on the wrong pixels (or none) and scores it as if it were right."""
    done = _train(synthetic, tmp_path, "--classes", "[1,2]")  # rods would train as background
    assert done.returncode != 0
    assert _last_lines(done, 2) == [
        "Error: invalid option(s):",
        "  --classes [1, 2]: 2 label value(s) for --num_classes 1",
    ]
    assert not (tmp_path / "eval").exists()
    two = {"num_classes": 2, "class_names": ["cell", "rod"], "n_md_prompts": 8, "n_ie_prompts": 0}
    assert problems({**two, "classes": [1, 2], "label_map": {255: 2, 128: 0}}) == []
    assert problems({**two, "classes": [1]}) == ["--classes [1]: 1 label value(s) for --num_classes 2"]
    assert problems({**two, "classes": [1, 2], "label_map": {255: 3}}) == [
        "--label_map {255: 3}: maps to [3], neither background (0) nor among --classes [1, 2]"
    ]
    assert problems({**two, "classes": [0, 1]}) == [
        "--classes [0, 1]: expected a list of distinct label values other than 0"
    ]
    assert problems({**two, "classes": [1, 1]}) == [
        "--classes [1, 1]: expected a list of distinct label values other than 0"
    ]
    assert problems({**two, "classes": [1, 2], "n_md_prompts": 0, "n_ie_prompts": 8}) == [
        "--n_md_prompts 0 with --num_classes 2: the classes differ only by their mask-decoder tokens; without "
        "them every class gets the same mask"
    ]
    assert (
        problems(
            {**two, "num_classes": 1, "class_names": ["cell"], "classes": [1], "n_md_prompts": 0, "n_ie_prompts": 8}
        )
        == []
    )


def test_the_traceback_is_there_with_the_debug_switch(synthetic, tmp_path):
    done = _train(synthetic, tmp_path, "--epochs", "0", env={"PTSAM_DEBUG": "1"})
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "Failed to evaluate ConfigExpression" in done.stderr
    assert _last_lines(done) == ["  --epochs 0: expected an integer >= 1"]  # still the last line


def test_inference_and_evaluation_check_their_options_first(tmp_path):
    cases = [
        (["inference.yaml"], "batch_size", "an integer >= 1"),
        (["train.yaml", "evaluate.yaml"], "n_overlays", "an integer >= 0"),
    ]
    for files, knob, allowed in cases:
        parser = ConfigParser()
        parser.read_config([str(BUNDLE / "configs" / f) for f in files])
        parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path / "out"), knob: 2.5})
        with pytest.raises(RuntimeError) as raised:  # MONAI's "Failed to evaluate", from ours
            parser.get_parsed_content("initialize")
        refusal = [e for e in chain(raised.value) if isinstance(e, OptionError)]
        assert refusal and f"--{knob} 2.5: expected {allowed}" in str(refusal[0])
    assert not (tmp_path / "out").exists()


def test_an_unwritable_folder_is_refused_before_any_data_is_read(synthetic, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    done = _train(synthetic, tmp_path, "--ckpt_dir", str(blocker / "sub"))
    assert done.returncode != 0
    assert _last_lines(done)[0].startswith(f"Error: ckpt_dir={blocker / 'sub'}: cannot write there")
    assert "epoch" not in done.stdout and not (tmp_path / "eval").exists()
    done = monai_bundle(
        "run", "inference", "--config_file", INFERENCE, "--sam_variant", "tiny",
        "--dataset_dir", str(synthetic / "microscopy"), "--output_dir", str(blocker / "out"),
    )  # fmt: skip
    assert done.returncode != 0 and _last_lines(done)[0].startswith(f"Error: output_dir={blocker / 'out'}:")


def test_check_writable_names_the_knob_and_creates_nothing(tmp_path):
    (tmp_path / "a_file").write_text("")
    check_writable(output_dir=tmp_path / "new" / "deep", ckpt_dir=tmp_path)  # creatable, writable
    assert not (tmp_path / "new").exists()
    with pytest.raises(PermissionError, match="output_dir=.*a_file/x: cannot write there .*a_file is a file"):
        check_writable(output_dir=tmp_path / "a_file" / "x")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_an_unreadable_training_state_is_named_with_what_to_do(synthetic, tmp_path):
    state = tmp_path / "models" / "training_state.ckpt"
    state.parent.mkdir()
    state.write_bytes(pickle.dumps(_Payload()))  # by the command line: the message and no advice
    done = _train(synthetic, tmp_path, "--epochs", "1")
    assert done.returncode != 0
    (line,) = _last_lines(done)
    assert line.startswith(f"Error: {state}: cannot resume from this training state (it holds Python objects")
    assert "--resume false" in line and "weights_only=False" not in done.stderr
    assert not (BUNDLE / "PWNED").exists() and not (tmp_path / "models" / "model.pt").exists()
    state.write_bytes(b"PK\x03\x04 cut short")  # in-process: the other reason
    with pytest.raises(ValueError, match="truncated or not a PyTorch file"):
        check_state(state)
    check_state(state, resume="false")  # not resumed: not read


def test_a_training_state_of_another_training_is_refused_naming_what_differs(synthetic, tmp_path):
    """Another dataset and learning rate into the same ckpt_dir: refused before any work (resuming
    would go on with, or silently skip to the end of, the old training)."""
    first = _train(synthetic, tmp_path, "--epochs", "1", "--tracking_enabled", "false")
    assert first.returncode == 0, first.stderr[-3000:]
    model, state = tmp_path / "models" / "model.pt", tmp_path / "models" / "training_state.ckpt"
    before = model.read_bytes(), state.read_bytes()
    other = tmp_path / "other"  # the same file names, other images
    generate(str(other), seed=1, n_train=4, n_val=2, n_test=2, modalities="microscopy")
    args = ["--dataset_dir", str(other / "microscopy"), "--learning_rate", "0.01", "--epochs", "2"]
    done = _train(synthetic, tmp_path, *args, "--tracking_enabled", "false")
    assert done.returncode != 0
    names = ", ".join(f"cells_00{i}.tif" for i in range(3)) + ", ..."
    assert _last_lines(done, 4) == [
        f"Error: {state} holds the state of another training than this one; start over with `--resume false` (it "
        f"is then replaced, and {model} with it), or train into another ckpt_dir. It differs in:",
        "  --learning_rate 0.05 (now 0.01)",
        f"  training cases: 4 changed ({names})",
        "  validation cases: 2 changed (cells_004.tif, cells_005.tif)",
    ]
    assert "epoch" not in done.stdout and (model.read_bytes(), state.read_bytes()) == before
    old = tmp_path / "old.ckpt"  # written before states recorded their training: not taken for this one
    torch.save({"epoch": 1}, old)
    with pytest.raises(ValueError, match="It records no identity"):
        check_state(old, "true", {"seed": 0})


def test_a_training_image_changed_in_its_middle_is_another_training(synthetic, tmp_path):
    """One pixel of a training image, in its middle rows, changed in place (the file keeps its size and
    its first and last 64 KiB): the training does not go on on other data than it started with."""
    import shutil

    import tifffile

    dataset = tmp_path / "data"
    shutil.copytree(synthetic / "microscopy", dataset)
    image = dataset / "imagesTr" / "cells_001.tif"
    tifffile.imwrite(image, tifffile.imread(image))  # uncompressed: a pixel is a place in the file
    args = ["--dataset_dir", str(dataset), "--tracking_enabled", "false"]
    first = _train(synthetic, tmp_path, *args, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    size = image.stat().st_size
    pixels = tifffile.memmap(image)
    row = pixels.shape[0] // 2
    assert 1 << 16 <= pixels.offset + pixels[:row].nbytes <= size - (1 << 16)  # neither end's 64 KiB
    pixels[row, 7] ^= 0x5A5A
    pixels.flush()
    del pixels
    assert image.stat().st_size == size
    done = _train(synthetic, tmp_path, *args, "--epochs", "2")
    assert done.returncode != 0
    assert _last_lines(done, 2)[-1] == "  training cases: 1 changed (cells_001.tif)"
    assert "epoch" not in done.stdout


def test_a_second_training_into_the_same_folder_refuses(synthetic, tmp_path):
    args = ["--config_file", TRAIN, "--sam_variant", "tiny", "--dataset_dir", str(synthetic / "microscopy")]
    args += ["--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models")]
    first = training_until_first_epoch(
        [*args, "--epochs", "300", "--early_stop_patience", "0"], tmp_path / "models" / "training_state.ckpt"
    )
    try:
        assert first.poll() is None, "the first training must still run"
        second = monai_bundle("run", "training", *args, "--epochs", "1")
        assert second.returncode != 0
        (line,) = _last_lines(second)
        assert line.startswith(f"Error: {tmp_path / 'models'} is in use by a training still running (process ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # killed, it leaves no stale lock: the same command now runs (it resumes); under umask 022 its
    # files are 0644, not mkstemp's 0600
    old = os.umask(0o022)
    try:
        again = monai_bundle("run", "training", *args, "--epochs", "2", "--resume", "false")
    finally:
        os.umask(old)
    assert again.returncode == 0, again.stderr[-3000:]
    for path in (tmp_path / "models" / "model.pt", tmp_path / "models" / "training_state.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_training_image_with_channels_the_preprocessing_refuses_stops_it_before_any_work(synthetic, tmp_path):
    import shutil

    import numpy as np
    import tifffile

    dataset = tmp_path / "data"
    shutil.copytree(synthetic / "microscopy", dataset)
    image = sorted((dataset / "imagesTr").glob("*.tif"))[0]
    gray = tifffile.imread(image)
    # a fourth sample that is no alpha: which three of the four SAM should see is the user's choice
    tifffile.imwrite(image, np.stack([gray] * 4, axis=-1).astype(np.uint16), photometric="rgb", extrasamples=[0])
    done = monai_bundle(
        "run", "training", "--config_file", TRAIN, "--sam_variant", "tiny", "--dataset_dir", str(dataset),
        "--output_dir", str(tmp_path / "eval"), "--ckpt_dir", str(tmp_path / "models"),
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{image}: has 4 channels; choose 3 with `channels`, e.g. [0, 1, 2]" in done.stderr
    assert "epoch 1/" not in done.stdout + done.stderr and not (tmp_path / "models").exists()


def test_a_misspelt_knob_is_refused_not_ignored(synthetic, tmp_path):
    # MONAI adds an id no config defines and nothing reads it: `--epoch 3` would train 40 epochs.
    done = _train(synthetic, tmp_path, "--epoch", "3", "--sam_checkpoin", "x.pth", "--batch_size", "2")
    assert done.returncode != 0
    assert _last_lines(done, 3) == [
        "Error: unknown knob(s) on the command line, defined by none of the configs:",
        "  --epoch (did you mean --epochs?)",
        "  --sam_checkpoin (did you mean --sam_checkpoint?)",
    ]
    assert not (tmp_path / "models").exists()  # refused before any work
    # evaluation and inference refuse the same way, each knowing its own configs' knobs
    common = ["--sam_variant", "tiny", "--dataset_dir", str(synthetic / "microscopy"), "--ckpt_dir", str(tmp_path)]
    evaluate = f"['{TRAIN}','configs/evaluate.yaml']"
    for files, run_id, typo, meant in (
        (evaluate, "evaluating", "--n_overlay", "--n_overlays"),
        (INFERENCE, "inference", "--instance_label", "--instance_labels"),
    ):
        done = monai_bundle("run", run_id, "--config_file", files, *common, typo, "2")
        assert done.returncode != 0
        assert _last_lines(done) == [f"  {typo} (did you mean {meant}?)"]


def test_a_misspelt_nested_id_is_refused_before_any_work(synthetic, tmp_path):
    # MONAI adds each as a new key of its section and passes it to the target: the run failed
    # only when it built it, after claiming ckpt_dir, with MONAI's traceback
    typos = ["--train#trainer#max_epoch", "3", "--network_def#n_md_prompt", "4", "--validate::inferer::batchsize", "2"]
    right = ["--train#trainer#max_epochs", "1", "--train#handlers#0#print_lr", "false"]
    right += ["--network_def#backbone_seed", "1"]  # a parameter of PTSAM the config does not set
    done = _train(synthetic, tmp_path, *right, *typos, "--tracking_enabled", "false")
    assert done.returncode != 0
    assert _last_lines(done, 4) == [
        "Error: unknown knob(s) on the command line, defined by none of the configs:",
        "  --train#trainer#max_epoch: not a parameter of SupervisedTrainer (did you mean --train#trainer#max_epochs?)",
        "  --network_def#n_md_prompt: not a parameter of scripts.model.PTSAM (did you mean "
        "--network_def#n_md_prompts or --network_def#n_ie_prompts?)",
        "  --validate::inferer::batchsize: not a parameter of scripts.engine.inferers.make_inferer (did you mean "
        "--validate#inferer#batch_size?)",
    ]
    assert not (tmp_path / "models").exists()  # refused before any work


def test_nested_ids_are_checked_against_the_merged_configs_and_the_targets_parameters():
    train = ConfigParser.load_config_files(str(BUNDLE / TRAIN))
    config = ConfigParser.load_config_files([str(BUNDLE / TRAIN), str(BUNDLE / "configs/evaluate.yaml")])
    right = {
        "train#trainer#max_epochs": 1,
        "train::handlers::0::print_lr": True,  # a list index
        "train#trainer#epoch_length": 2,  # a parameter of SupervisedTrainer the config does not set
        "validate#dataloader#pin_memory": True,  # monai's DataLoader passes **kwargs on
        "network_def#_disabled_": False,
        "validate#dataset#data": [],
        "n_overlays": 0,  # evaluate.yaml's, merged over train.yaml
        "_meta_#version": "1.0",  # the metadata is read from its own file
        "loss": {"_target_": "torch.nn.BCEWithLogitsLoss"},  # in order: the next one goes into this one
        "loss#pos_weight": None,
        "meta_file": "configs/metadata.json",  # the workflow's own argument
    }
    assert override_problems(config, right, ["meta_file"]) == []
    wrong = {
        "train#handlers#8#print_lr": False,
        "validate#handlers#3": None,  # evaluate.yaml's three
        "train#trainr#max_epochs": 1,
        "validate#key_metric#val_dice": None,
        "train#preprocessing#transforms#0#keys": "image",
        "seed#value": 1,
        "loss#pos_weight": None,  # the configs' DiceBCELoss does not take it
        "trian#trainer#max_epochs": 1,
    }
    assert override_problems(config, wrong) == [
        "--train#handlers#8#print_lr: train#handlers is a list with indices 0 to 7",
        "--validate#handlers#3: validate#handlers is a list with indices 0 to 2",
        "--train#trainr#max_epochs: train has no trainr (did you mean --train#trainer?)",
        "--validate#key_metric#val_dice: validate#key_metric has no val_dice (did you mean "
        "--validate#key_metric#val_mean_dice?)",
        "--train#preprocessing#transforms#0#keys: train#preprocessing#transforms#0 is @preprocessing_head: set "
        "--preprocessing_head#keys instead",
        "--seed#value: seed is a value (0), not a section: there is nothing under it to set",
        "--loss#pos_weight: not a parameter of scripts.engine.losses.DiceBCELoss (did you mean --loss#bce_weight or "
        "--loss#dice_weight?)",
        "--trian#trainer#max_epochs (did you mean --train?)",
    ]
    # train.yaml alone: no validation handlers; a label map to fill (evaluate.yaml's null: as trained)
    assert override_problems(train, {"validate#handlers#0": None, "label_map#255": 1}) == [
        "--validate#handlers#0: validate#handlers is a list with no items"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_a_device_that_is_not_here_is_named_before_any_work(synthetic, tmp_path):
    # `make setup` installs CPU torch where there is no nvidia-smi: --device cuda then failed
    # deep in the network's construction ("Torch not compiled with CUDA enabled")
    done = _train(synthetic, tmp_path, "--device", "cuda")
    assert done.returncode != 0
    assert _last_lines(done)[0].startswith("  --device 'cuda': expected cpu (CUDA is not available here")
    assert not (tmp_path / "models").exists()
    assert problems({"device": "gpu"}) == ["--device 'gpu': expected a torch device: cpu, cuda, cuda:0, ..."]
    assert problems({"device": torch.device("cpu")}) == []


def test_eval_section_is_checked_with_the_knobs(tmp_path):
    assert problems({"eval_section": "valid"}) == ["--eval_section 'valid': expected one of test, validation, training"]


def test_allow_other_kind_is_checked_with_the_knobs():
    assert problems({"allow_other_kind": "perhaps"}) == ["--allow_other_kind 'perhaps': expected true or false"]
    assert problems({"allow_other_kind": "true"}) == problems({"allow_other_kind": False}) == []
