"""`daguerre inspect OUT --html FILE`: one self-contained HTML page to approve a batch by.

The page holds a grid of the finished images (thumbnails made here with PIL, embedded as
base64 JPEG data: URIs, so the file opens anywhere without the output or a network), the
quality gate's refusals with their reasons ("Rejected", with the kept copy's thumbnail
where there is one), every other standing error ("Errors"), and the last run's speed and
cost figures exactly as `daguerre inspect` prints them (`report.figure_rows`). Every
string from the output is escaped: prompts are user input. Each section shows at most
`limit` entries, sorted by id, and says how many it left out.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import html
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import read_errors, read_metadata
from .config import StorageConfig
from .report import OutputReport, figure_rows, inspect_output
from .schema import error_schema, record_schema
from .storage import Storage, StorageError

THUMB_SIDE = 256  # longest side of a thumbnail, in pixels
DEFAULT_HTML_LIMIT = 500  # entries per section of the page
READ_THREADS = 16  # images read and thumbnailed at once (object stores answer slowly)
_IMAGE_COLUMNS = ["id", "prompt", "seed", "status", "uri", "width", "height"]
_OPTIONAL_COLUMNS = ["format", "variants", "watermark", "cache_hit"]  # when the schema has them
_FOLDERS = ("images", "shards", "rejected")  # where a moved output's uris are looked for


@dataclass
class Tile:
    """One image on the page: its caption as (name, value) pairs, shown below the thumbnail
    and as its hover title, and the thumbnail (a data: URI) or why there is none."""

    id: str
    caption: list[tuple[str, str]]
    uri: str | None = None  # the stored file the thumbnail is made from
    thumbnail: str | None = None
    missing: str | None = None  # why there is no thumbnail


@dataclass
class ReviewSheet:
    """Everything the page shows; each list holds at most `limit` entries, sorted by id."""

    report: OutputReport  # the inspect report: counts and the last run's figures
    images: list[Tile]
    rejected: list[Tile]  # errors of stage quality
    errors: list[dict[str, Any]]  # the other standing errors: id, stage, field, reason
    rejected_total: int = 0
    errors_total: int = 0
    limit: int = DEFAULT_HTML_LIMIT
    made_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())

    def summary(self) -> str:
        """'N images, N rejected, N errors' with what was left out of each."""
        parts = [(len(self.images), self.report.images, "images"),
                 (len(self.rejected), self.rejected_total, "rejected"),
                 (len(self.errors), self.errors_total, "errors")]  # fmt: skip
        return ", ".join(f"{total} {name}" + (f" ({total - shown} left out)" if total > shown
                                              else "") for shown, total, name in parts)  # fmt: skip


def write_review(
    uri: str, path: Path, storage_config: StorageConfig | None = None,
    limit: int = DEFAULT_HTML_LIMIT,
) -> ReviewSheet:  # fmt: skip
    """The review sheet of the output `uri`, written as one HTML file at `path`."""
    sheet = build_review(uri, storage_config, limit)
    try:
        Path(path).write_text(render_review(sheet), encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"{path}: cannot write the review sheet ({exc.strerror})") from None
    return sheet


def build_review(
    uri: str, storage_config: StorageConfig | None = None, limit: int = DEFAULT_HTML_LIMIT
) -> ReviewSheet:
    """What the page of the output `uri` shows, thumbnails made (StorageError when it is not
    a readable output, as for inspect)."""
    report = inspect_output(uri, storage_config)
    storage = Storage(uri, storage_config)
    present = set(record_schema().names)
    columns = _IMAGE_COLUMNS + [c for c in _OPTIONAL_COLUMNS if c in present]
    table = read_metadata(storage, columns)
    rows = [] if table is None else sorted(table.to_pylist(), key=lambda r: r["id"])
    images = [_image_tile(r) for r in rows[:limit]]
    wanted = ["id", "stage", "field", "reason", "row"]
    wanted += ["uri"] if "uri" in error_schema().names else []
    finished = None if table is None else table["id"]
    errors = read_errors(storage, finished, wanted)
    error_rows = [] if errors is None else sorted(errors.to_pylist(), key=lambda r: r["id"])
    quality = [r for r in error_rows if r["stage"] == "quality"]
    others = [{k: r[k] for k in ("id", "stage", "field", "reason")}
              for r in error_rows if r["stage"] != "quality"]  # fmt: skip
    rejected = [_rejected_tile(r) for r in quality[:limit]]
    add_thumbnails(storage, images + rejected)
    return ReviewSheet(report=report, images=images, rejected=rejected, errors=others[:limit],
                       rejected_total=len(quality), errors_total=len(others), limit=limit)  # fmt: skip


def _image_tile(row: dict[str, Any]) -> Tile:
    """A finished image's tile: id, prompt, seed, status, size, then the optional fields
    its row has (variants by name, booleans as yes/no)."""
    caption = [("id", row["id"]), ("prompt", row["prompt"]), ("seed", str(row["seed"])),
               ("status", str(row["status"])), ("size", f"{row['width']}x{row['height']}")]  # fmt: skip
    for name in _OPTIONAL_COLUMNS:
        value = row.get(name)
        if value is None or value == [] or value == {}:
            continue
        if name == "variants":
            value = ", ".join(sorted(dict(value)))
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        caption.append((name, str(value)))
    return Tile(id=row["id"], caption=caption, uri=row["uri"] or None)


def _rejected_tile(row: dict[str, Any]) -> Tile:
    """A refused image's tile: id, reason, and the prompt when the recorded row (JSON,
    possibly truncated) still parses; its thumbnail from the kept copy, if one was kept."""
    caption = [("id", row["id"]), ("reason", row["reason"])]
    try:
        prompt = json.loads(row.get("row") or "").get("prompt")
    except (ValueError, AttributeError):
        prompt = None
    if isinstance(prompt, str):
        caption.append(("prompt", prompt))
    uri = row.get("uri")
    return Tile(id=row["id"], caption=caption, uri=uri or None,
                missing=None if uri else "no copy kept")  # fmt: skip


def add_thumbnails(storage: Storage, tiles: list[Tile]) -> None:
    """Fill each tile's thumbnail from its stored file (or say why there is none)."""
    keys = {id(t): _key_of(t.uri, storage) for t in tiles if t.uri}
    shards = sorted({k.rpartition("#")[0] for k in keys.values() if k and _in_shard(k)})
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        indexes = pool.map(lambda shard: _shard_index(storage, shard), shards)
        members = dict(zip(shards, indexes, strict=True))

        def fill(tile: Tile) -> None:
            if not tile.uri:
                return
            key = keys[id(tile)]
            if key is None:
                tile.missing = f"not found under this output: {tile.uri}"
                return
            try:
                tile.thumbnail = thumbnail(_read_image(storage, key, members))
            except (OSError, ValueError, KeyError, tarfile.TarError) as exc:
                tile.missing = f"cannot read {tile.uri}: {type(exc).__name__}: {exc}"

        list(pool.map(fill, tiles))


def thumbnail(data: bytes, side: int = THUMB_SIDE) -> str:
    """A data: URI of the image `data` as a JPEG at most `side` pixels on its long side."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.thumbnail((side, side))
        small = image.convert("RGB")
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _in_shard(key: str) -> bool:
    """True for `<shard>.tar#<member>`: an image inside a WebDataset shard."""
    return "#" in key and key.rpartition("#")[0].endswith(".tar")


def _key_of(uri: str, storage: Storage) -> str | None:
    """The key under the output of a recorded uri; for an output copied elsewhere (its uris
    still name where it was written), the first images/, shards/ or rejected/ tail that
    exists here; None when there is none."""
    base = storage.url("").rstrip("/") + "/"
    if uri.startswith(base):
        return uri[len(base) :]
    if "://" not in uri and not uri.startswith("/"):
        return uri  # already a key
    path = uri.split("://", 1)[-1]
    for folder in _FOLDERS:
        at = path.find(f"/{folder}/")
        while at >= 0:
            key = path[at + 1 :]
            if storage.fs.exists(storage.path(key.rpartition("#")[0] if _in_shard(key) else key)):
                return key
            at = path.find(f"/{folder}/", at + 1)
    return None


ShardIndex = dict[str, tuple[int, int]]  # member name -> (offset, size) in the tar


def _shard_index(storage: Storage, shard: str) -> ShardIndex | Exception:
    """The members of a tar shard, from its headers alone; or why it cannot be read (its
    images then say so, the rest of the page is made)."""
    try:
        with (
            storage.fs.open(storage.path(shard), "rb") as fh,
            tarfile.open(fileobj=fh, mode="r:") as tar,
        ):
            return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
    except (OSError, tarfile.TarError) as exc:
        return exc


def _read_image(storage: Storage, key: str, shards: dict[str, ShardIndex | Exception]) -> bytes:
    """The bytes of the image at `key`: a stored object, or a member of a shard (one
    ranged read; KeyError when the shard does not hold it)."""
    if not _in_shard(key):
        return storage.fs.cat_file(storage.path(key))
    shard, _, member = key.rpartition("#")
    index = shards[shard]
    if isinstance(index, Exception):
        raise index
    offset, size = index[member]
    return storage.fs.cat_file(storage.path(shard), start=offset, end=offset + size)


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 32px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 3px 8px;
  text-align: left; vertical-align: top; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
figure { margin: 0; width: 264px; padding: 4px; background: #fff; border: 1px solid #ddd; }
figure img { display: block; max-width: 256px; max-height: 256px; margin: auto; }
figure .missing { height: 96px; display: flex; align-items: center; justify-content: center;
  color: #a00; background: #f3f3f3; font-size: 12px; overflow-wrap: anywhere; padding: 4px; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }
figcaption b { font-weight: 600; } .rejected figure { border-color: #d88; }
.note { color: #555; }
"""


def render_review(sheet: ReviewSheet) -> str:
    """The page: one HTML document, nothing outside it (no scripts, links or URLs)."""
    report = sheet.report
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>daguerre review: {_e(report.output)}</title><style>{_CSS}</style></head><body>",
        f"<h1>daguerre review: {_e(report.output)}</h1>",
        f'<p class="note">made {_e(sheet.made_at)}: {_e(sheet.summary())}; at most '
        f"{sheet.limit} per section, sorted by id</p>",
        _figures_section(report),
        _tiles_section("Images", "images", sheet.images, report.images),
        _tiles_section("Rejected", "rejected", sheet.rejected, sheet.rejected_total),
        _errors_section(sheet.errors, sheet.errors_total),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _figures_section(report: OutputReport) -> str:
    """The counts and the last run's throughput and cost figures, as inspect prints them."""
    rows = [("images", str(report.images)), ("standing errors", str(report.errors)),
            ("runs", str(report.runs))]  # fmt: skip
    run = report.last_run
    if run:
        rows.append(("last run", f"{run['run_id']}: {run['generated']} generated, "
                     f"{run['skipped_done']} skipped, {run['errors']} errors"))  # fmt: skip
        rows += figure_rows(run)
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<h2>Run</h2><table id="figures">{body}</table>'


def _tiles_section(title: str, section_id: str, tiles: list[Tile], total: int) -> str:
    """A heading, what was left out, and a grid of figures (thumbnail and caption)."""
    head = f'<section id="{section_id}" class="{section_id}"><h2>{title} ({total})</h2>'
    head += _left_out(len(tiles), total)
    figures = []
    for tile in tiles:
        hover = _e("\n".join(f"{k}: {v}" for k, v in tile.caption))
        if tile.thumbnail:
            picture = f'<img src="{tile.thumbnail}" alt="{_e(tile.id)}" title="{hover}">'
        else:
            picture = f'<div class="missing" title="{hover}">{_e(tile.missing or "no image")}</div>'
        lines = "<br>".join(f"<b>{_e(k)}</b> {_e(v)}" for k, v in tile.caption)
        figures.append(f'<figure title="{hover}">{picture}<figcaption>{lines}</figcaption>'
                       "</figure>")  # fmt: skip
    return f'{head}<div class="grid">{"".join(figures)}</div></section>'


def _errors_section(rows: list[dict[str, Any]], total: int) -> str:
    """The other standing errors as a table: stage, field, reason, id."""
    head = f'<section id="errors"><h2>Errors ({total})</h2>'
    head += _left_out(len(rows), total)
    if not rows:
        return head + "</section>"
    columns = ("stage", "field", "reason", "id")
    header = "".join(f"<th>{c}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(str(r[c]))}</td>" for c in columns) + "</tr>"
                   for r in rows)  # fmt: skip
    return f"{head}<table><tr>{header}</tr>{body}</table></section>"


def _left_out(shown: int, total: int) -> str:
    """The note saying how many entries of a section the page leaves out ('' for none)."""
    if total <= shown:
        return ""
    return f'<p class="note">showing {shown} of {total}: {total - shown} left out</p>'


def _e(text: Any) -> str:
    """`text` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)
