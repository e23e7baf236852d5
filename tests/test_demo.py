import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from captum_interactions import demo  # noqa: E402


def test_quick_demo_writes_report_with_existing_figures(tmp_path, capsys):
    out = tmp_path / "report"
    assert demo.main(["demo", "--out", str(out), "--quick", "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    index = out / "index.html"
    assert f"Report written to {index}" in printed
    page = index.read_text(encoding="utf-8")
    images = re.findall(r'<img src="([^"]+)"', page)
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert sorted(images) == pngs  # every figure is in the report, every reference exists
    assert len(images) >= 9
    for name in images:
        assert (out / name).stat().st_size > 5000
    # one caption per figure, each a real sentence
    captions = re.findall(r"<figcaption><b>[^<]+</b> ([^<]+)</figcaption>", page)
    assert len(captions) == len(images)
    assert all(len(c) > 80 and c.rstrip().endswith(".") for c in captions)
    for method in ("IntegratedHessians", "ExpectedHessians", "SmoothHess",
                   "ContextualDecomposition", "AgglomerativeContextualDecomposition"):
        assert method in page
    assert "Device: cpu" in page


def test_demo_arguments():
    with pytest.raises(SystemExit):
        demo.main(["demo"])  # --out is required
    with pytest.raises(ValueError, match="unknown demo sections"):
        demo.run_demo("unused", sections=["nope"], progress=False)


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "captum_interactions", "demo", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "--quick" in result.stdout
