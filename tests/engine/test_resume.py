"""The training's identity a resume state records: each case's image and label by their whole content
(as model.pt's split record identifies them), and a state an older bundle wrote refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scripts.demo.synthetic import ct_affine, ct_case, write_dicom_series
from scripts.engine.resume import ResumeMismatchError, check_identity, describe_cases
from scripts.engine.splits import image_id


def _file(path: Path, seed: int, size: int = 300_000) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return str(path)


def _flip_middle_byte(path: str) -> None:
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(data)


def test_a_label_changed_in_its_middle_is_another_case(tmp_path):
    case = {"image": _file(tmp_path / "imagesTr" / "a.nii", 0), "label": _file(tmp_path / "labelsTr" / "a.nii", 1)}
    (before,) = describe_cases([case])
    _flip_middle_byte(case["label"])
    (after,) = describe_cases([case])
    assert after != before and after.split(" @ ")[0] == before.split(" @ ")[0] == "a.nii + a.nii"
    state = {"identity": json.dumps({"training_cases": [before]})}
    with pytest.raises(ResumeMismatchError, match=r"training cases: 1 changed \(a\.nii\)"):
        check_identity(tmp_path / "state.ckpt", state, {"training_cases": [after]})


def test_a_dicom_series_counts_by_its_series_uid(tmp_path):
    label = _file(tmp_path / "labelsTr" / "ct.nii", 0)
    image, _ = ct_case(np.random.default_rng(0))
    write_dicom_series(image, ct_affine(np.random.default_rng(0)), tmp_path / "a", seed=0)
    write_dicom_series(image, ct_affine(np.random.default_rng(0)), tmp_path / "b", seed=1)
    uid = image_id(tmp_path / "a")[len("dicom:") :]
    folder, by_uid, other = describe_cases(
        [
            {"image": str(tmp_path / "a"), "label": label},
            {"image": f"{tmp_path / 'a'}::{uid}", "label": label},
            {"image": str(tmp_path / "b"), "label": label},
        ]
    )
    assert folder.split(" @ ")[1] == by_uid.split(" @ ")[1] != other.split(" @ ")[1]
    assert describe_cases([{"image": str(tmp_path / "a"), "label": label}]) == [folder]  # stable


def test_a_state_an_older_bundle_wrote_is_refused_saying_so(tmp_path):
    old = {"training_cases": ["a.nii + a.nii @ 0123456789abcdef"], "seed": 0}  # first and last bytes only
    case = {"image": _file(tmp_path / "a.nii", 0), "label": _file(tmp_path / "l" / "a.nii", 1)}
    with pytest.raises(ResumeMismatchError) as refused:
        check_identity(tmp_path / "s.ckpt", {"identity": json.dumps(old)}, {"training_cases": describe_cases([case])})
    assert str(refused.value).endswith(
        "An older bundle wrote it, identifying each image and label by part of its bytes only: "
        "whether it trained on this data cannot be checked."
    )
    assert "--resume false" in str(refused.value)
