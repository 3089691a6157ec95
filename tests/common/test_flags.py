"""On/off knobs as they arrive from `python -m monai.bundle run ... --knob false`."""

import pytest

from scripts.common.flags import flag, optional_flag


def test_command_line_spellings():
    assert [flag(v) for v in ("false", "False", "off", "0", "no", False, 0)] == [False] * 7
    assert [flag(v) for v in ("true", "True", "on", "1", "yes", True, 1)] == [True] * 7
    assert [optional_flag(v) for v in (None, "null", "auto", "false", True)] == [None, None, None, False, True]
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        flag("maybe")


def test_amp_dtype_knob():
    import torch

    from scripts.common.flags import amp_kwargs

    assert amp_kwargs("bfloat16") == {"dtype": torch.bfloat16}
    assert amp_kwargs("FP16") == {"dtype": torch.float16}
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    assert amp_kwargs("auto") == {"dtype": expected}
    with pytest.raises(ValueError, match="amp_dtype must be auto, bfloat16 or float16, got 'int8'"):
        amp_kwargs("int8")
