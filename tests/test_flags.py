"""On/off knobs as they arrive from `python -m monai.bundle run ... --knob false`."""

import pytest

from scripts.flags import flag, optional_flag


def test_command_line_spellings():
    assert [flag(v) for v in ("false", "False", "off", "0", "no", False, 0)] == [False] * 7
    assert [flag(v) for v in ("true", "True", "on", "1", "yes", True, 1)] == [True] * 7
    assert [optional_flag(v) for v in (None, "null", "auto", "false", True)] == [None, None, None, False, True]
    with pytest.raises(ValueError, match="expected true or false, got 'maybe'"):
        flag("maybe")
