"""segment-anything's modeling code loads with or without a working torchvision."""

import subprocess
import sys
import textwrap

from helpers import BUNDLE


def _run(code: str, extra_path: str | None = None) -> str:
    paths = [str(BUNDLE)] + ([extra_path] if extra_path else [])
    prelude = f"import sys; sys.path[:0] = {paths!r}\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_modeling_loads_when_torchvision_is_broken():
    out = _run(
        """
        sys.modules["torchvision"] = None  # any import of it raises ImportError
        from scripts.model.sam.modeling import modeling
        import segment_anything
        print(modeling.Sam.__name__, hasattr(segment_anything, "SamPredictor"))
        """
    )
    # The modeling classes are there; the package __init__ (predictor, torchvision) never ran.
    assert out.split() == ["Sam", "False"]


def test_plain_import_kept_where_torchvision_imports(tmp_path):
    # A minimal importable torchvision offering what segment_anything's __init__ imports.
    tv = tmp_path / "torchvision"
    (tv / "transforms").mkdir(parents=True)
    (tv / "ops").mkdir()
    (tv / "__init__.py").write_text("")
    (tv / "transforms" / "__init__.py").write_text("")
    (tv / "transforms" / "functional.py").write_text("def resize(*a, **k): pass\ndef to_pil_image(*a, **k): pass\n")
    (tv / "ops" / "__init__.py").write_text("")
    (tv / "ops" / "boxes.py").write_text("def batched_nms(*a, **k): pass\ndef box_area(*a, **k): pass\n")
    out = _run(
        """
        from scripts.model.sam.modeling import modeling
        import segment_anything
        print(modeling.Sam is segment_anything.modeling.Sam, hasattr(segment_anything, "SamPredictor"))
        """,
        extra_path=str(tmp_path),
    )
    assert out.split() == ["True", "True"]
