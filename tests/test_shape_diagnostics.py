"""bench/shape_diagnostics.py: the caption edit its "swapped shape" column depends on."""
import importlib.util
from pathlib import Path

import pytest

from ldm.data.shapes import SHAPES, caption_to_attributes

SPEC = importlib.util.spec_from_file_location("shape_diagnostics",
                                              Path(__file__).resolve().parents[1] / "bench" / "shape_diagnostics.py")
diagnostics = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(diagnostics)


def test_swap_shape_changes_only_the_first_shape_word():
    swapped = diagnostics.swap_shape("a small red circle above a large blue square")
    assert swapped == "a small red star above a large blue square"
    before = caption_to_attributes("a small red circle above a large blue square")["attributes"]
    after = caption_to_attributes(swapped)["attributes"]
    assert after[0][0] == SHAPES.index("star") and (after[0][1:] == before[0][1:]).all()
    assert (after[1] == before[1]).all()


def test_swap_shape_rejects_a_caption_without_a_shape():
    with pytest.raises(ValueError, match="no shape word"):
        diagnostics.swap_shape("a red thing")


def test_a_missing_model_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["shape_diagnostics.py", "--model", str(tmp_path / "nope"),
                                     "--out", str(tmp_path / "out.md")])
    with pytest.raises(SystemExit, match="^error: no model config"):
        diagnostics.main()
    assert not (tmp_path / "out.md").exists()
