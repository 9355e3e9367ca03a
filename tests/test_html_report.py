"""The HTML report and the dvc plots page render offline, checked in headless Chromium.

Each browser check has a negative control, the same page loading from a CDN, which must fail the
same check: a check that passed on a blank page would prove nothing.
"""
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import seaborn as sns  # noqa: E402
from browser import bounding_box, colour_mask, require_chromium, require_npm, screenshot  # noqa: E402
from conftest import ROOT, sh  # noqa: E402

from cmt_bench import plots_template  # noqa: E402
from cmt_bench.html import render  # noqa: E402

# The figure's background: a colour nothing else on the page uses, so where it lands is the figure.
FIGURE_RGB = (27, 158, 119)
FIGURE_PX = (300, 600)  # height, width: figsize (6, 3) inches at 100 dpi
DVC_LINE_RGB = (0x94, 0x5D, 0xD6)  # dvc-render's first line colour
CDN = "https://cdn.jsdelivr.net/npm/cmt-bench-figures/figure.png"


def _report(tmp: Path) -> Path:
    """A report directory like reports/<preset>/: Markdown with a table, bold, code and a seaborn PNG."""
    tmp.mkdir()
    fig, ax = plt.subplots(figsize=(FIGURE_PX[1] / 100, FIGURE_PX[0] / 100), dpi=100)
    colour = "#%02x%02x%02x" % FIGURE_RGB
    fig.patch.set_facecolor(colour)
    ax.set_facecolor(colour)
    sns.barplot(x=["random", "diffusion", "cmt"], y=[3.0, 2.0, 1.0], color="white", ax=ax)
    fig.savefig(tmp / "metric_vs_compute.png", dpi=100, facecolor=colour)
    plt.close(fig)
    (tmp / "report.md").write_text("\n".join([
        "# CMT benchmark report: preset `test`", "",
        "Metric `sw_2step`, **lower is better**.", "",
        "| init | total device-seconds | final `sw_2step` |", "|---|---|---|",
        "| random | 13.1 | 0.0842 |", "| diffusion | 30 | 0.0545 |", "| cmt | 33.3 | **0.0521** |", "",
        "## Figures", "", "![metric versus compute](metric_vs_compute.png)", ""]))
    return tmp


def _figure_shown(pixels) -> bool:
    """The figure's colour fills a box of the figure's size (a few pixels of scaling slack)."""
    box = bounding_box(colour_mask(pixels, FIGURE_RGB))
    if box is None:
        return False
    top, left, h, w = box
    filled = colour_mask(pixels[top:top + h, left:left + w], FIGURE_RGB).mean()
    return abs(h - FIGURE_PX[0]) <= 3 and abs(w - FIGURE_PX[1]) <= 3 and filled > 0.5


def test_html_is_self_contained(tmp_path):
    report = _report(tmp_path / "report")
    page = render((report / "report.md").read_text(), report, "CMT report: test")
    assert not re.search(r"https?://", page), "the HTML names a network address"
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(srcs) == 1 and srcs[0].startswith("data:image/png;base64,")
    assert "<table>" in page and "<strong>lower is better</strong>" in page and "<code>sw_2step</code>" in page
    assert "<title>CMT report: test</title>" in page


def test_committed_report_is_self_contained():
    report = ROOT / "reports" / "toy"
    if not (report / "report.md").exists():
        pytest.skip("no reports/toy/report.md")
    page = render((report / "report.md").read_text(), report, "toy")
    assert not re.search(r"https?://", page)
    assert all(s.startswith("data:image/") for s in re.findall(r'<img[^>]*\ssrc="([^"]*)"', page))


def test_bad_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples.png"):
        render("![samples](samples.png)", tmp_path, "t")
    with pytest.raises(ValueError, match="not a local file"):
        render(f"![remote]({CDN})", tmp_path, "t")
    with pytest.raises(ValueError, match="network"):
        render(f'<script src="{CDN}"></script>', tmp_path, "t")


def test_html_report_renders_offline_in_chromium(tmp_path):
    require_chromium()
    report = _report(tmp_path / "report")
    page = render((report / "report.md").read_text(), report, "CMT report: test")
    alone = tmp_path / "alone"  # no sibling PNGs: the one file must be enough
    alone.mkdir()
    (alone / "report.html").write_text(page)
    # negative control: the same page with the figure on a CDN (unreachable here) must fail the check
    (alone / "cdn.html").write_text(re.sub(r'src="data:[^"]*"', f'src="{CDN}"', page))
    assert _figure_shown(screenshot(alone / "report.html")), "the inlined figure did not render"
    assert not _figure_shown(screenshot(alone / "cdn.html")), "the check passes without the figure"


def test_dvc_plots_render_offline(tmp_path):
    require_chromium()
    require_npm()
    # the npm packages stay in the repo's build/npm between runs (`make setup` puts them there)
    template = plots_template.build(tmp_path / "template.html", ROOT / plots_template.NPM_DIR)
    text = template.read_text()
    assert "{plot_divs}" in text and "{scripts}" not in text
    assert not re.search(r"""<(?:script|link)\b[^>]*(?:src|href)\s*=""", text), "the template loads a file"
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    pd.DataFrame({"images_seen": [0, 1000, 2000, 3000, 4000], "fd": [9.5, 6.1, 4.0, 3.1, 2.6]}).to_csv(
        repo / "curve.csv", index=False)
    (repo / "dvc.yaml").write_text("plots:\n  - curve.csv:\n      x: images_seen\n      y: fd\n")
    sh("git init -q && dvc init -q", repo, env)
    sh(f"dvc plots show --html-template {template} -o offline", repo, env)
    sh("dvc plots show -o stock", repo, env)  # negative control: DVC's page loads vega from a CDN

    def plotted(page: Path) -> bool:
        box = bounding_box(colour_mask(screenshot(page, size=(900, 600)), DVC_LINE_RGB, tol=40))
        return box is not None and box[2] > 150 and box[3] > 200  # the line crosses the 300 px plot
    assert plotted(repo / "offline" / "index.html"), "the offline template rendered no plot"
    assert "cdn.jsdelivr.net" in (repo / "stock" / "index.html").read_text()
    assert not plotted(repo / "stock" / "index.html"), "the check passes without vega"


def test_plots_template_refuses_missing_libraries(tmp_path):
    with pytest.raises(RuntimeError, match="vega 5.21.0 is not installed"):
        plots_template.template(tmp_path)
