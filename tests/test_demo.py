import html
import os
import re
import subprocess
import sys

import pytest
import torch

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
    # every figure of a method with completeness (IH, EH, layer IH) shows its convergence next
    # to it, as an error against |f(x) - f(x')|
    blocks = re.findall(r"<figure>(.*?)</figure>", page, flags=re.S)
    assert len(blocks) == len(images)
    convergence = {re.search(r'<img src="([^"]+)"', b).group(1):
                   re.search(r'class="convergence"><i>Convergence:</i> ([^<]+)</p>', b)
                   for b in blocks}
    for name in ("synthetic_ih_matrix.png", "diabetes_top_interactions.png",
                 "digits_ih_patch.png", "transformer_token_interactions.png"):
        if name in convergence:
            assert convergence[name] is not None, name
            assert "completeness error" in convergence[name].group(1).lower()
    for name in ("quadrants_smoothhess.png", "digits_smoothhess_patch.png"):
        assert "standard error" in convergence[name].group(1)
    # colour words are the colour map's own (no "red positive, blue negative" left over)
    words = demo.colour_scale_words()
    acd = html.unescape(re.search(r'digits_acd.png.*?<figcaption>(.*?)</figcaption>', page,
                                  flags=re.S).group(1))
    assert f"{words['negative']} negative, {words['zero']} 0, {words['positive']} positive" in acd
    assert "blue negative" not in page and "blue: against" not in page
    # the HOPE caption lists each order's error on the plotted range, and does not claim
    # that every higher order follows the network further unless the numbers say so
    taylor = html.unescape(re.search(r'hope_taylor_1d.png.*?<figcaption>(.*?)</figcaption>',
                                     page, flags=re.S).group(1))
    errors = [float(v) for v in re.findall(r"order \d: ([-0-9.e]+)", taylor)[:4]]
    assert len(errors) == 4
    if "so it is over the whole plotted range" in taylor:
        assert errors == sorted(errors, reverse=True)
    else:
        assert errors != sorted(errors, reverse=True)


def test_colour_words_are_read_from_the_colour_map():
    from matplotlib.colors import LinearSegmentedColormap

    assert demo.colour_scale_words() == {"negative": "red", "zero": "white", "positive": "green"}
    other = LinearSegmentedColormap.from_list("bwr", ["blue", "white", "red"])
    assert demo.colour_scale_words(other) == {"negative": "blue", "zero": "white",
                                              "positive": "red"}
    assert demo.colour_name("darkgreen") == "green" and demo.colour_name("#fefefe") == "white"


def test_converged_doubles_steps_until_within_tolerance():
    calls = []

    def attribute(steps):
        calls.append(steps)
        change = torch.tensor([1.0])
        return None, torch.tensor([1.0 / steps]), change  # error 1/n: within 2% from n = 64

    assert demo._converged(attribute, 8, 256)[3] == 64 and calls == [8, 16, 32, 64]
    calls.clear()
    assert demo._converged(attribute, 8, 16)[3] == 16 and calls == [8, 16]  # the cap
    calls.clear()

    def growing(steps):  # an error that grows with n_steps (a kink): keep the smallest
        calls.append(steps)
        return None, torch.tensor([0.03 + steps / 1000]), torch.tensor([1.0])

    assert demo._converged(growing, 8, 64)[3] == 8 and calls == [8, 16, 32, 64]


def test_demo_arguments():
    with pytest.raises(SystemExit):
        demo.main(["demo"])  # --out is required
    with pytest.raises(ValueError, match="unknown demo sections"):
        demo.run_demo("unused", sections=["nope"], progress=False)
    with pytest.raises(ValueError, match="threads"):
        demo.run_demo("unused", sections=["cd"], progress=False, threads=0)


def test_module_entry_point_help():
    result = subprocess.run(
        [sys.executable, "-m", "captum_interactions", "demo", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--out" in result.stdout and "--quick" in result.stdout
