"""The comparison report renders in a real browser: headless Chromium (Debian package ``chromium``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from adaptflow.pipelines.local import run_compare_local

from adaptflow.config import load_settings
from services import require_or_skip

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=5000",
]

PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; });
  var alt = imgs.filter(function (i) { return (i.getAttribute("alt") || "").length > 0; });
  document.title = "images:" + imgs.length + " loaded:" + ok.length + " alt:" + alt.length;
});
</script>"""


def chromium() -> str:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    require_or_skip("chromium is not installed (Debian: apt-get install -y chromium)")


@pytest.fixture(scope="module")
def report(tiny_assets, tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("report")
    settings = load_settings(
        overrides=[*tiny_assets.overrides(work / "work"), "finetune.epochs=2", "baseline.epochs=10"]
    )
    result = run_compare_local(
        settings, str(tiny_assets.target_shifted), ["linear_probe", "partial"], work / "out"
    )
    assert result.report_html is not None
    return Path(result.report_html)


def _run(browser: str, args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_every_plot_loads_in_chromium(report: Path, tmp_path: Path) -> None:
    browser = chromium()
    page = report.read_text()
    assert "<script" not in page  # the report itself carries no JS; the probe is added to a copy
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    out = _run(browser, ["--dump-dom", probe.as_uri()], tmp_path / "profile")
    assert out.returncode == 0, out.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", out.stdout)
    assert title is not None, out.stdout[:500]
    counts = dict(re.findall(r"(\w+):(\d+)", title.group(1)))
    assert counts == {"images": "3", "loaded": "3", "alt": "3"}, title.group(1)
    assert "Transfer learning versus fine-tuning" in out.stdout
    assert "linear_probe" in out.stdout and "partial" in out.stdout


@pytest.mark.integration
def test_report_screenshot_is_not_blank(report: Path, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    browser = chromium()
    shot = tmp_path / "report.png"
    out = _run(browser, [f"--screenshot={shot}", "--window-size=1280,6000", report.as_uri()], tmp_path / "p")
    assert out.returncode == 0 and shot.exists(), out.stderr[-2000:]
    image = Image.open(shot).convert("L")
    assert image.size == (1280, 6000)
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10  # text, tables and plots, not a blank page
    # the plots are colour images: below the headline and the tables (the figures) are non-grey pixels
    rgb = Image.open(shot).convert("RGB").crop((0, 800, 1280, 6000))
    colourful = sum(1 for r, g, b in rgb.getdata() if max(r, g, b) - min(r, g, b) > 60)
    assert colourful > 2000
