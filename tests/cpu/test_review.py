"""`daguerre inspect OUT --html FILE`: the review sheet a catalogue team approves a batch by.

The output is made without Ray, through the one write path (`write_outputs`,
`write_errors`) and a run record: flat images, a WebDataset shard, a quality refusal
with its kept copy under rejected/, a validation error. The page is parsed with the
standard library, then opened in a real headless Chromium (Debian's chromium and
chromium-driver, as in test_page.py; that part skips when they are missing).
"""

from __future__ import annotations

import base64
import datetime as dt
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daguerre.pipeline.files import OutputLayout, Provenance, WriteOptions
from daguerre.pipeline.formats import EncodingConfig, Variant
from daguerre.pipeline.outputs import write_errors, write_outputs
from daguerre.pipeline.report import figure_rows
from daguerre.pipeline.schema import ErrorRecord, GeneratedImage, ImageRequest, StageTimings
from daguerre.pipeline.storage import Storage
from PIL import Image

pytestmark = pytest.mark.timeout(120)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCRIPT_PROMPT = "<script>alert('x')</script> a vase & a cup"
FLAT = {"a-vase": (SCRIPT_PROMPT, 64, 64), "b-lamp": ("a brass lamp", 96, 64),
        "c-poster": ("a wide poster", 512, 384)}  # fmt: skip
SHARDED = {"d-cup": ("a cup in a shard", 64, 64), "e.dotted": ("a dotted id", 64, 96)}
REJECT_REASON = "near-uniform: standard deviation 0.0 under 2.0"
RUN_FIGURES = {"startup_s": 3.5, "steady_images_per_s": 12.25, "end_to_end_images_per_s": 4.0,
               "mean_engine_batch": 2.5, "engine_busy_fraction_mean": 0.75,
               "gpu_seconds_per_image": 0.08, "cost_per_1000_images": 0.42}  # fmt: skip


def generated(image_id: str, prompt: str, width: int, height: int, seed: int) -> GeneratedImage:
    """An image as the engine hands it over: a colourful gradient with noise, [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 60, (height, width, 3))
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1) + noise
    request = ImageRequest(id=image_id, prompt=prompt, seed=seed, width=width, height=height)
    return GeneratedImage(request=request, image=np.clip(pixels, 0, 255).astype(np.uint8),
                          seed=seed, width=width, height=height, batch_size=2,
                          scheduler_config="{}", timings=StageTimings(denoise_s=0.5))  # fmt: skip


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """An output prefix: 3 flat PNGs, 2 WebPs with a variant in a shard, a quality refusal
    with its kept copy and a validate error."""
    out = tmp_path_factory.mktemp("review") / "out"
    storage, run_id = Storage(str(out)), "20260101T000000000Z-abcdef"
    provenance = Provenance(model="tiny", weights_hash="sha256:" + "0" * 64,
                            backend={"device": "cpu"}, node_id="n1", actor_id="a1")  # fmt: skip
    webp = EncodingConfig(format="webp", variants=[Variant(name="thumb", width=32)])
    for options, images in ((WriteOptions(), FLAT),
                            (WriteOptions(OutputLayout("webdataset"), encoding=webp), SHARDED)):  # fmt: skip
        batch = [(generated(i, p, w, h, seed), provenance)
                 for seed, (i, (p, w, h)) in enumerate(images.items())]  # fmt: skip
        write_outputs(batch, storage, run_id=run_id, version="test", options=options)
    now = dt.datetime.now(dt.timezone.utc)
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 80, 3), (200, 30, 30), np.uint8)).save(buf, format="PNG")
    kept = storage.write_bytes("rejected/f-wall.png", buf.getvalue())
    write_errors([
        ErrorRecord(id="f-wall", stage="quality", field="image", reason=REJECT_REASON,
                    row=json.dumps({"id": "f-wall", "prompt": "a grey wall"}), uri=kept,
                    run_id=run_id, created_at=now),
        ErrorRecord(id="g-bad", stage="validate", field="steps", reason="999 is out of range",
                    row='{"id": "g-bad"}', run_id=run_id, created_at=now),
    ], storage, run_id)  # fmt: skip
    record = {"run_id": run_id, "started_at": now.isoformat(), "ended_at": now.isoformat(),
              "generated": 5, "skipped_done": 0, "errors": 2, **RUN_FIGURES}  # fmt: skip
    storage.write_bytes(f"runs/{run_id}.json", json.dumps(record).encode())
    return out


def daguerre(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("daguerre")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=100)


class Sheet(html.parser.HTMLParser):
    """What a page holds, per section: its images (attributes), captions and text."""

    def __init__(self, page: str):
        super().__init__()
        self.section: str | None = None
        self.images: dict[str, list[dict]] = {}
        self.captions: dict[str, list[str]] = {}
        self.text: dict[str | None, str] = {}
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.in_caption = False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [v or "" for _, v in attrs]
        if tag == "section":
            self.section = dict(attrs)["id"]
        elif tag == "img":
            self.images.setdefault(self.section, []).append(dict(attrs))
        elif tag == "figcaption":
            self.in_caption = True
            self.captions.setdefault(self.section, []).append("")

    def handle_endtag(self, tag):
        if tag == "section":
            self.section = None
        elif tag == "figcaption":
            self.in_caption = False

    def handle_data(self, data):
        self.text[self.section] = self.text.get(self.section, "") + data
        if self.in_caption:
            self.captions[self.section][-1] += data


def test_html_sheet_shows_images_rejections_errors_and_figures(output, tmp_path):
    page_path = tmp_path / "review.html"
    result = daguerre("inspect", str(output), "--html", str(page_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        f"wrote review sheet {page_path}: 5 images, 1 rejected, 1 errors"
    )
    raw = page_path.read_text()
    sheet = Sheet(raw)
    ids = sorted([*FLAT, *SHARDED])
    assert [img["alt"] for img in sheet.images["images"]] == ids  # sorted by id, shards too
    for img, caption in zip(sheet.images["images"], sheet.captions["images"], strict=True):
        image_id = img["alt"]
        prompt = {**FLAT, **SHARDED}[image_id][0]
        assert f"id {image_id}" in caption and f"prompt {prompt}" in caption, caption
        assert "status ok" in caption and "seed " in caption
        if image_id in SHARDED:  # webp masters inside the shard, a variant next to each
            assert "format webp" in caption and "variants thumb" in caption, caption
        else:
            assert "format png" in caption and "variants" not in caption, caption
        assert f"prompt: {prompt}" in img["title"] and "cache_hit: no" in img["title"]
        assert img["src"].startswith("data:image/jpeg;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        width, height = {**FLAT, **SHARDED}[image_id][1:]
        assert decoded.size == (min(width, 256), height * min(width, 256) // width)
    # rejected: the reason and the kept copy's thumbnail; errors: the validate row
    (rejected,) = sheet.images["rejected"]
    assert rejected["alt"] == "f-wall" and rejected["src"].startswith("data:image/jpeg;base64,")
    assert REJECT_REASON in sheet.captions["rejected"][0]
    assert "a grey wall" in sheet.captions["rejected"][0]
    errors = sheet.text["errors"]
    assert "validate" in errors and "steps" in errors and "999 is out of range" in errors
    assert "g-bad" in errors and "f-wall" not in errors and "g-bad" not in sheet.text["rejected"]
    # the run's figures, as `daguerre inspect` words and rounds them
    for label, value in figure_rows(RUN_FIGURES):
        assert label in raw and value in sheet.text[None], (label, value)
    # nothing outside the page, and the prompt stays text
    assert not [a for a in sheet.attributes if re.match(r"\s*(https?:)?//", a)]
    assert not re.search(r"https?://", raw)
    assert "script" not in sheet.tags and "<script>" not in raw
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; a vase &amp; a cup" in raw


def test_html_limit_leaves_images_out_and_says_so(output, tmp_path):
    page_path = tmp_path / "small.html"
    result = daguerre("inspect", str(output), "--html", str(page_path), "--html-limit", "2",
                      cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 images (3 left out)" in result.stdout
    sheet = Sheet(page_path.read_text())
    assert [img["alt"] for img in sheet.images["images"]] == ["a-vase", "b-lamp"]
    assert "showing 2 of 5: 3 left out" in sheet.text["images"]


def test_a_copied_output_finds_its_files_and_names_a_missing_one(output, tmp_path):
    """An output copied elsewhere (its uris still name where it was written) is read where
    it is now; an image gone from it is a note on its tile, not a failed page."""
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    (copy / "images" / "b-lamp.png").unlink()
    page_path = tmp_path / "copy.html"
    result = daguerre("inspect", str(copy), "--html", str(page_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    raw = page_path.read_text()
    sheet = Sheet(raw)
    shown = [img["alt"] for img in sheet.images["images"]]
    assert shown == sorted({*FLAT, *SHARDED} - {"b-lamp"})
    assert [img["alt"] for img in sheet.images["rejected"]] == ["f-wall"]
    assert "not found under this output: " in sheet.text["images"] and "b-lamp.png" in raw


def test_html_of_a_folder_that_is_no_output_is_one_line(tmp_path):
    (tmp_path / "not-an-output").mkdir()
    result = daguerre("inspect", str(tmp_path / "not-an-output"), "--html",
                      str(tmp_path / "r.html"), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and not (tmp_path / "r.html").exists()
    assert result.stderr.strip() == (
        f"daguerre: error: {tmp_path / 'not-an-output'}: not a daguerre output "
        "(no _daguerre marker, metadata/ or runs/ in it)"
    )
    both = daguerre("inspect", str(tmp_path), "--json", "--html", "r.html", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver "
                    "(apt-get install chromium chromium-driver)")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1200,1000", "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def drawn_fraction(driver, image, shot_path: Path) -> float:
    """The share of the image's screenshot region whose pixels differ from the page's
    background (the image scrolled into view first)."""
    rect = driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});"
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];",
        image,
    )
    background = driver.execute_script(
        "return getComputedStyle(document.body).backgroundColor.match(/\\d+/g).map(Number)"
    )
    png = driver.get_screenshot_as_png()
    shot_path.write_bytes(png)
    left, top, right, bottom, scale = rect
    box = tuple(round(v * scale) for v in (left + 2, top + 2, right - 2, bottom - 2))
    assert box[2] - box[0] >= 40 and box[3] - box[1] >= 40, rect
    region = np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(box)).astype(int)
    return float((np.abs(region - np.array(background[:3])).sum(-1) > 30).mean())


def test_the_sheet_renders_its_thumbnails_in_chromium(output, tmp_path, browser):
    from selenium.webdriver.common.by import By

    page_path = tmp_path / "review.html"
    result = daguerre("inspect", str(output), "--html", str(page_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    browser.get(page_path.as_uri())
    assert browser.title.startswith("daguerre review: ")
    sizes = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth,"
        " i.naturalHeight])"
    )
    assert [s[0] for s in sizes] == [*sorted([*FLAT, *SHARDED]), "f-wall"]
    assert all(done and width > 0 for _, done, width, _ in sizes), sizes
    assert [s[2:] for s in sizes if s[0] == "c-poster"] == [[256, 192]]
    for image_id in ("a-vase", "e.dotted", "f-wall"):
        image = browser.find_element(By.CSS_SELECTOR, f'img[alt="{image_id}"]')
        drawn = drawn_fraction(browser, image, tmp_path / f"{image_id}.png")
        assert drawn > 0.9, f"{image_id}: only {drawn:.0%} of its region is drawn"
    caption = browser.find_element(By.CSS_SELECTOR, "#images figcaption").text
    assert SCRIPT_PROMPT in caption  # shown as text, not run
