"""timemachine.files: a result file is either the old one or the complete new one."""

import json
import os

import numpy as np
import pytest

from timemachine.files import (
    atomic_json,
    atomic_savefig,
    atomic_savez,
    atomic_write,
    atomic_write_text,
)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    atomic_json(path, {"a": 1})

    def dies(fh):
        fh.write("{half")
        raise KeyboardInterrupt  # a kill mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies, binary=False)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(path.parent) == ["result.json"]


def test_round_trips_and_permissions(tmp_path):
    x = np.arange(6.0).reshape(2, 3)
    atomic_savez(tmp_path / "x.npz", x=x)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["x"], x)
    atomic_write_text(tmp_path / "t.txt", "ζ = H·dx/dθ\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "ζ = H·dx/dθ\n"
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


def test_savefig_takes_the_format_from_the_extension_and_is_atomic(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    png, svg = tmp_path / "a.png", tmp_path / "a.svg"
    atomic_savefig(fig, png, dpi=50)
    atomic_savefig(fig, svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:400]
    before = png.read_bytes()
    with pytest.raises(TypeError):  # savefig fails half-way: the old PNG stays
        atomic_savefig(fig, png, dpi=50, format_that_does_not_exist=1)
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.svg"]
