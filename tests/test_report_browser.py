"""The report in a real browser: headless Chromium renders RUN/report.html, every <img> decodes
(naturalWidth > 0, read back from the DOM), and the screenshot is not blank and shows the banner.

Chromium comes from the Debian package ``chromium`` (``.ci/run`` installs it); the test skips, saying
so, only where no Chromium binary can be found. Set ``CHROMIUM`` to use another binary."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cka_split.reports import build_report
from PIL import Image
from test_report import make_run, parse

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
]

# Appended to a copy of the report (the report itself has no script): after load, write what each
# image decoded to into the DOM, where --dump-dom reads it back.
PROBE = """<script>
window.addEventListener('load', function () {
  var out = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    out.push({complete: im.complete, w: im.naturalWidth, h: im.naturalHeight, shown: im.getBoundingClientRect().width});
  }
  var pre = document.createElement('pre');
  pre.id = 'img-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium binary found (install the Debian package 'chromium', or set CHROMIUM=/path/to/chrome)",
)


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp)},
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    run = make_run(root)
    return build_report(run), root


def test_every_image_decodes_in_chromium(report):
    path, root = report
    html = path.read_text(encoding="utf-8")
    n_imgs = len(parse(html).imgs)
    probe = root / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "\n</body>"), encoding="utf-8")
    r = chromium(["--virtual-time-budget=15000", "--window-size=1280,2000", "--dump-dom", probe.as_uri()], root)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert 'id="img-probe"' in dom, "the probe script did not run: " + r.stderr[-1000:]
    text = dom.split('id="img-probe">', 1)[1].split("</pre>", 1)[0]
    imgs = json.loads(text.replace("&quot;", '"').replace("&amp;", "&"))
    assert len(imgs) == n_imgs == 10
    for i, im in enumerate(imgs):
        assert im["complete"] and im["w"] > 100 and im["h"] > 50, (i, im)  # decoded, at its real size
        assert im["shown"] > 100, (i, im)  # laid out with a visible width


def test_screenshot_is_not_blank(report):
    path, root = report
    shot = root / "shot.png"
    r = chromium([f"--screenshot={shot}", "--window-size=1280,2000", "--virtual-time-budget=5000", path.as_uri()], root)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert px.shape[:2] == (2000, 1280)
    assert px.std() > 20, f"screenshot nearly uniform (std {px.std():.1f})"
    # the banner for random weights is drawn: its border colour (#c62828) is on screen
    border = np.all(np.abs(px - np.array([0xC6, 0x28, 0x28])) < 12, axis=-1)
    assert border.sum() > 500, border.sum()
    # text and tables, not only background: enough dark pixels
    assert (px.mean(-1) < 100).mean() > 0.005
