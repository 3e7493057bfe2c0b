"""The `daguerre` command's arguments: one parser per subcommand, each with a description,
an example and help for every flag, and errors in one line (exit code 2)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import daguerre

from ..pipeline.review import DEFAULT_HTML_LIMIT
from ..pipeline.schema import SCHEDULERS

DEFAULT_DEMO_OUT = "output/demo"


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit code 2, like every other daguerre error
    (the usage block is what --help is for)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix("daguerre").strip()
        where = f"{command}: " if command else ""
        hint = f"daguerre {command} --help" if command else "daguerre --help"
        print(f"daguerre: error: {where}{message} (see {hint})", file=sys.stderr)
        raise SystemExit(2)


class _Help(argparse.RawDescriptionHelpFormatter):
    """A flag's default after its help (where it has one); descriptions and examples kept
    as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or "default" in text
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _actors(value: str) -> tuple[int, int]:
    try:
        low, _, high = value.partition(":")
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not MIN:MAX (for example 1:4)") from None
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"{value!r}: need 1 <= MIN <= MAX")
    return pair


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be at least 1")
    return number


def _backend_args(p: argparse.ArgumentParser) -> None:
    from ..kernels.attention import ATTENTION_BACKENDS
    from ..kernels.unet import UNET_BACKENDS

    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS,
                   help="attention inside the UNet (config default: auto)")  # fmt: skip
    p.add_argument("--unet-backend", choices=UNET_BACKENDS,
                   help="how the UNet runs (config default: auto)")  # fmt: skip


def _sub(sub: Any, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description,
                          epilog=f"example:\n  {example}", formatter_class=_Help)  # fmt: skip


def _presets() -> list[str]:
    from ..pipeline.models import preset_names

    return preset_names()


def _generate_parser(sub: Any) -> None:
    gen = _sub(
        sub, "generate", "run a batch job over a manifest",
        "Generate one image per manifest row into an output prefix (a folder or s3://...):\n"
        "images/<id>.png, one metadata row per image, errors/ for rejected rows, runs/ for\n"
        "the run record. A rerun resumes: finished ids are skipped.",
        "daguerre generate manifest.parquet --out output/run-1 --model tiny --actors 1:2",
    )  # fmt: skip
    gen.add_argument("manifest", help="Parquet file or folder, or a .csv / .jsonl with the "
                     "manifest's columns (a .txt of prompts: see daguerre manifest)")  # fmt: skip
    gen.add_argument("--out", required=True, help="output prefix (a folder or s3://bucket/prefix)")
    gen.add_argument("--model", help=f"preset ({', '.join(_presets())}) or a diffusers model "
                     "folder, local or s3:// (config default: tiny)")  # fmt: skip
    gen.add_argument("--config", type=Path, help="job YAML (see configs/jobs/); flags override it")
    gen.add_argument(
        "--batch-size", type=_positive, help="images per engine call (config default: 4)"
    )
    gen.add_argument("--actors", type=_actors, metavar="MIN:MAX",
                     help="engine actor pool, scaled under backlog (config default: 1:1)")  # fmt: skip
    gen.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)",
    )
    gen.add_argument("--via-serve", nargs="?", const="daguerre", metavar="APP",
                     help="run the engine stage on the replicas of a running `daguerre serve` "
                     "app (default app: daguerre) on the cluster at --address, behind its "
                     "online traffic, instead of a dedicated actor pool")  # fmt: skip
    _backend_args(gen)
    gen.add_argument("--overwrite", action="store_true",
                     help="make again the finished ids that were made with another model or "
                     "other request fields (otherwise such a rerun is refused)")  # fmt: skip
    gen.add_argument("--dry-run", action="store_true", help="check and count, generate nothing: "
                     "valid and invalid rows, batches, estimated time")  # fmt: skip
    gen.add_argument(
        "--limit",
        type=_positive,
        metavar="N",
        help="only N rows not yet finished (a trial; a later run does the rest)",
    )
    gen.add_argument("--verbose", action="store_true", help="Ray's own logs and progress bars")
    gen.add_argument("--no-progress", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="daguerre", formatter_class=_Help,
        description="Distributed diffusion image generation on Ray: batch jobs over manifests "
        "and an online images API on one engine.",
        epilog="Start with: daguerre demo    (see README.md)",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"daguerre {daguerre.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)  # fmt: skip
    _generate_parser(sub)

    man = _sub(
        sub, "manifest", "build a Parquet manifest from prompts (.txt lines or .csv rows)",
        "One row per prompt and seed. A .txt holds one prompt per line; a .csv's columns fill\n"
        "--template and are kept in each image's metadata.",
        'daguerre manifest examples/products.csv -o m.parquet --template "a photo of {product}" --seeds 4',
    )  # fmt: skip
    man.add_argument("prompts", type=Path, help=".txt (one prompt per line) or .csv")
    man.add_argument("-o", "--output", type=Path, required=True, help="manifest .parquet to write")
    man.add_argument("--template", help='prompt template filled from CSV columns, e.g. '
                     '"a studio photo of {product}, {style}"')  # fmt: skip
    man.add_argument("--seeds", type=_positive, default=1, help="images per prompt")
    man.add_argument("--seed-base", type=int, default=0, help="first seed (then +1, +2, ...)")
    man.add_argument("--steps", type=int, help="denoising steps (row default: 30)")
    man.add_argument("--guidance-scale", type=float, help="guidance scale (row default: 7.5)")
    man.add_argument("--width", type=int, help="width (row default: the model's)")
    man.add_argument("--height", type=int, help="height (row default: the model's)")
    man.add_argument("--scheduler", choices=SCHEDULERS, help="sampler (row default: ddim)")
    man.add_argument("--negative-prompt", help="negative prompt for every row")
    man.add_argument(
        "--init-image-column",
        metavar="COLUMN",
        help="img2img: the CSV column "
        "naming each row's photo (a path relative to the CSV, file:// or s3://)",
    )
    man.add_argument(
        "--mask-image-column",
        metavar="COLUMN",
        help="inpainting: the CSV column naming each row's mask",
    )
    man.add_argument("--strength", type=float, help="how far from the photo (0 < s <= 1; 0.8)")
    man.add_argument(
        "--resize",
        choices=("fill", "fit", "stretch"),
        help="how photos become --width x --height (default fill)",
    )

    ins = _sub(
        sub, "inspect", "summarise an output prefix: counts, errors, speed, provenance",
        "Read an output's metadata, errors and run records (nothing else): images, standing\n"
        "errors by stage and reason, the last run's speed figures, models and backends.",
        "daguerre inspect output/demo --html review.html",
    )  # fmt: skip
    ins.add_argument("output", help="output prefix (folder or s3://...)")
    ins.add_argument("--config", type=Path, help="job YAML whose storage: settings to use")
    shown = ins.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print the report as JSON")
    shown.add_argument("--html", type=Path, metavar="FILE",
                       help="write a review sheet instead: one self-contained HTML page with "
                       "thumbnails of the images, the rejected ones and the errors")  # fmt: skip
    ins.add_argument("--html-limit", type=_positive, default=DEFAULT_HTML_LIMIT, metavar="N",
                     help="most entries per section of the --html page (sorted by id)")  # fmt: skip

    cpt = _sub(
        sub, "compact", "merge an output's metadata and errors fragments into large files",
        "Rewrite the small Parquet fragments under metadata/ and errors/ as files of about\n"
        "compact_target_mb (128 MiB), atomically: readers and resumes see every row exactly\n"
        "once throughout. Jobs do this at their end; run it after a job was stopped.",
        "daguerre compact output/demo",
    )  # fmt: skip
    cpt.add_argument("output", help="output prefix (folder or s3://...)")
    cpt.add_argument("--config", type=Path, help="job YAML (its storage: and compact_target_mb)")
    cpt.add_argument("--target-mb", type=float, help="size of the merged files (default 128)")

    comp = _sub(
        sub, "compile", "prebuild and cache a compiled denoiser (UNet or transformer: ONNX / TensorRT)",
        "Export and build the denoiser graphs a job or replica will ask for, ahead of time, into\n"
        "$DAGUERRE_CACHE: one per image size, covering engine batches 1..--max-batch-size.",
        "daguerre compile --model sd15 --backend onnxruntime --max-batch-size 8 --sizes 512x512",
    )  # fmt: skip
    comp.add_argument("--model", default="tiny", help="preset or diffusers folder (or s3://)")
    comp.add_argument("--backend", required=True, choices=("onnxruntime", "tensorrt"),
                      help="the cached backends")  # fmt: skip
    comp.add_argument("--max-batch-size", type=_positive, default=8,
                      help="engine.max_batch_size of the jobs and replicas that will use it")  # fmt: skip
    comp.add_argument("--sizes", help="image sizes WxH,... (default: the model's native size)")
    comp.add_argument("--device", default="auto", help="auto, cpu or cuda")
    comp.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"))

    cred = _sub(
        sub, "credentials", "make a throwaway certificate chain to try content credentials",
        "init DIR writes chain.pem, key.pem and root.pem: a root CA and a signing certificate\n"
        "in the profile C2PA requires, for `credentials:` in a job or serve config. Readers\n"
        "see files signed with it as valid but untrusted: use a CA-issued certificate for real.",
        "daguerre credentials init certs/",
    )  # fmt: skip
    cred.add_argument("action", choices=("init",), help="init: write a new chain")
    cred.add_argument("folder", type=Path, help="folder to write the files into")
    cred.add_argument("--name", default="daguerre trial", help="the certificates' common name")
    cred.add_argument("--days", type=_positive, default=365, help="validity in days")

    sub.add_parser("bench", add_help=False,
                   help="images/s, MFU and memory per backend and batch size (--help for more)")  # fmt: skip

    srv = _sub(
        sub, "serve", "serve the OpenAI-compatible images API and the native API over HTTP",
        "Start Serve with one engine deployment per model behind a FastAPI ingress; prints the\n"
        "URL when healthy, stops on Ctrl-C. Auth is on when $DAGUERRE_API_TOKEN is set.",
        "daguerre serve --model tiny --port 8000",
    )  # fmt: skip
    srv.add_argument(
        "--config", type=Path, help="serve YAML (see configs/serve/); flags override it"
    )
    srv.add_argument(
        "--model", help="preset or diffusers folder for the (first) model (default tiny)"
    )
    srv.add_argument("--port", type=int, help="HTTP port (config default: 8000)")
    srv.add_argument("--host", help="address to bind (config default: 127.0.0.1)")
    srv.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray)",
    )
    srv.add_argument("--verbose", action="store_true", help="Ray's own logs")
    _backend_args(srv)

    demo = _sub(
        sub, "demo", "generate the demo manifest with the tiny model on a local Ray",
        "Write a 10-row demo manifest (8 valid rows, 2 invalid on purpose) and generate it.",
        "daguerre demo --out output/demo",
    )  # fmt: skip
    demo.add_argument("--out", default=DEFAULT_DEMO_OUT, help="output prefix")
    demo.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser
