"""The Dockerfile and the KubeRay manifests in cluster/deploy/ are what our tooling builds
and runs, read statically: no Docker, Kubernetes, Ray or network here.

The image installs the versions `make` does; every manifest runs that image; every Serve
config builds our app; the RayJob's entrypoint is a command daguerre's own CLI accepts, for
an app and a model the RayService serves, on a cluster KubeRay can find.
"""

from __future__ import annotations

import fnmatch
import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from daguerre.pipeline.config import ServeConfig, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "cluster" / "deploy"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
IMAGE = f"ghcr.io/daguerre/daguerre:{VERSION}"  # the tag the Dockerfile's comment builds
BUILD_COMMAND = f"docker build -t {IMAGE} ."


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to (`name==X`, extras allowed)."""
    for req in PYPROJECT["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", req.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


# --- manifests ---------------------------------------------------------------------------


def commented_docs(text: str) -> list[dict]:
    """YAML documents shipped commented out, each after a `# ---` line, uncommented."""
    docs: list[dict] = []
    block: list[str] | None = None
    for line in [*text.splitlines(), ""]:
        if line.rstrip() == "# ---" or not line.startswith("#") or block is None:
            if block:
                docs.append(yaml.safe_load("\n".join(block)))
            block = [] if line.rstrip() == "# ---" else None
        else:
            block.append(line[2:] if line.startswith("# ") else line[1:])
    return [d for d in docs if d]


def manifests(commented: bool = False) -> list[tuple[Path, dict]]:
    """Every YAML document in cluster/deploy/ (with `commented`, also the commented ones)."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        docs = [d for d in yaml.safe_load_all(text) if d]
        found += [(path, d) for d in docs + (commented_docs(text) if commented else [])]
    return found


def of_kind(kind: str, commented: bool = False) -> list[dict]:
    return [d for _, d in manifests(commented) if d.get("kind") == kind]


def serve_applications() -> list[tuple[Path, dict]]:
    """The Serve applications of every Serve config: a `serve deploy` file's own, or a
    RayService's serveConfigV2 (a YAML string)."""
    apps = []
    for path, doc in manifests(commented=True):
        spec = doc.get("spec", doc) or {}
        config = spec.get("serveConfigV2", spec if "applications" in spec else None)
        if isinstance(config, str):
            config = yaml.safe_load(config)
        apps += [(path, app) for app in (config or {}).get("applications", [])]
    return apps


def rayservice_apps(service: dict) -> dict[str, ServeConfig]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    return {
        app["name"]: validate_config(ServeConfig, app.get("args", {}), source="rayservice")
        for app in config["applications"]
    }


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: a RayCluster's, a RayService's rayClusterConfig, a RayJob's
    rayClusterSpec."""
    specs = []
    for path, doc in manifests(commented=True):
        spec = doc.get("spec") or {}
        for key in ("rayClusterConfig", "rayClusterSpec"):
            spec = spec.get(key, spec)
        if "headGroupSpec" in spec:
            specs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", spec))
    return specs


def walk(node: Any, key: str) -> list[Any]:
    """Every value of `key` anywhere in a parsed document."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == key] + [
            x for v in node.values() for x in walk(v, key)
        ]
    if isinstance(node, list):
        return [x for v in node for x in walk(v, key)]
    return []


def gpus(container: dict) -> float:
    resources = container.get("resources", {})
    return max(
        float(resources.get(kind, {}).get("nvidia.com/gpu", 0)) for kind in ("requests", "limits")
    )


def gpu_slots(cluster_spec: dict) -> float:
    """GPUs the cluster's worker groups reach at maxReplicas."""
    return sum(
        group["maxReplicas"] * sum(gpus(c) for c in group["template"]["spec"]["containers"])
        for group in cluster_spec["workerGroupSpecs"]
    )


def parse_entrypoint(job: dict) -> Any:
    """A RayJob's entrypoint, parsed by daguerre's CLI parser as `daguerre` would."""
    from daguerre.cluster.cli import build_parser

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in PYPROJECT["project"]["scripts"], argv
    return build_parser().parse_args(argv[1:])


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuations joined, comment lines dropped."""
    out, buf = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not (line.strip() or buf):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        buf = ""
    assert not buf, "the Dockerfile ends in a continuation"
    return out


def pip_installs() -> list[tuple[str, list[str], str]]:
    """Every `pip install` the image runs, in order: (command, its arguments, WORKDIR)."""
    found, workdir = [], "/"
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = args
        if word != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            argv = shlex.split(command)
            if argv[:2] == ["pip", "install"] or argv[1:4] == ["-m", "pip", "install"]:
                found.append((command.strip(), argv[argv.index("install") + 1 :], workdir))
    return found


def copies() -> list[tuple[list[str], str, str]]:
    """Every COPY: (sources, destination, WORKDIR at that point), flags left out."""
    found, workdir = [], "/"
    for word, args in dockerfile():
        if word == "WORKDIR":
            workdir = args
        if word in ("COPY", "ADD"):
            assert word == "COPY", f"ADD {args}: the image only COPYs files from the repository"
            argv = [a for a in shlex.split(args) if not a.startswith("--")]
            found.append((argv[:-1], argv[-1], workdir))
    return found


def in_workdir(path: str, workdir: str) -> str:
    return str(Path(workdir, path)) if not path.startswith("/") else str(Path(path))


# --- tests ---------------------------------------------------------------------------------


def test_every_serve_config_builds_our_app():
    """`serve deploy` and KubeRay import `import_path` and call it with `args`."""
    from daguerre.cluster.serve import build_app

    apps = serve_applications()
    assert len(apps) >= 2, apps  # serve_config.yaml and the RayService
    for path, app in apps:
        assert app["import_path"] == "daguerre.cluster.serve:build_app", path
        module, _, attr = app["import_path"].partition(":")
        assert getattr(importlib.import_module(module), attr) is build_app
        validate_config(ServeConfig, app.get("args", {}), source=str(path))


def test_rayjob_runs_on_the_rayservice_app_and_model():
    (service,) = of_kind("RayService")
    (job,) = of_kind("RayJob")  # the live one; the dedicated-pool example is commented out
    from daguerre.cluster.cli import job_config

    args = parse_entrypoint(job)
    assert args.command == "generate"
    assert args.address == "auto"  # KubeRay runs the entrypoint on the cluster's head
    config = job_config(args)
    assert config.engine_pool == "serve" and config.serve_app == args.via_serve
    apps = rayservice_apps(service)
    assert args.via_serve in apps, f"--via-serve {args.via_serve}: the RayService has {list(apps)}"
    served = [m.served_name for m in apps[args.via_serve].models]
    # as connect_serve (cluster/plan.py) matches the job's model to a served one
    assert Path(config.engine.model.rstrip("/")).name in served, (config.engine.model, served)

    # KubeRay looks up clusterSelector's ray.io/cluster value as a RayCluster name; a
    # RayService's cluster is <name>-raycluster-<5 random chars>, filled in at submit time
    # by the command the file documents.
    name = service["metadata"]["name"]
    selector = job["spec"]["clusterSelector"]
    assert list(selector) == ["ray.io/cluster"], selector
    placeholder = selector["ray.io/cluster"]
    assert re.fullmatch(rf"{re.escape(name)}-raycluster-\w{{5}}", placeholder), placeholder
    text = (DEPLOY / "rayjob.yaml").read_text()
    lookup = f"kubectl get rayservice {name} -o jsonpath='{{.status.activeServiceStatus.rayClusterName}}'"
    assert lookup in text
    assert (
        f'sed "s/{placeholder}/$CLUSTER/" cluster/deploy/rayjob.yaml | kubectl apply -f -' in text
    )


def test_commented_dedicated_pool_job_targets_the_raycluster():
    from daguerre.cluster.cli import job_config

    live = of_kind("RayJob")
    examples = [d for d in of_kind("RayJob", commented=True) if d not in live]
    assert examples, "rayjob.yaml's commented dedicated-pool example is gone"
    clusters = {c["metadata"]["name"]: c for c in of_kind("RayCluster")}
    for job in examples:
        args = parse_entrypoint(job)
        config = job_config(args)
        assert args.command == "generate" and config.engine_pool == "actors"
        target = job["spec"]["clusterSelector"]["ray.io/cluster"]
        assert target in clusters, f"clusterSelector {target}: no such RayCluster"
        assert config.max_actors * config.actor_num_gpus <= gpu_slots(clusters[target]["spec"])


@pytest.mark.parametrize("name,spec", [pytest.param(n, s, id=n) for n, s in cluster_specs()])
def test_clusters_have_a_cpu_head_and_autoscaling_gpu_workers(name, spec):
    assert spec["rayVersion"] == pin("ray"), name
    assert spec["enableInTreeAutoscaling"] is True, name
    head = spec["headGroupSpec"]
    # KubeRay takes rayStartParams as strings
    assert head.get("rayStartParams", {}).get("num-gpus") == "0", name
    (head_container, *_) = head["template"]["spec"]["containers"]
    assert gpus(head_container) == 0, name
    # Declared ports replace KubeRay's defaults: the dashboard must be among them (RayJobs
    # and RayService's Serve deployment go through it).
    ports = {p["name"]: p["containerPort"] for p in head_container.get("ports", [])}
    assert not ports or ports.get("dashboard") == 8265, (name, ports)
    groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(gpus(c) > 0 for c in g["template"]["spec"]["containers"])
    ]
    assert groups, f"{name}: no GPU worker group"
    for group in groups:
        assert all(gpus(c) == 1 for c in group["template"]["spec"]["containers"]), name
        assert 0 <= group["minReplicas"] <= 1 < group["maxReplicas"], (name, group["groupName"])
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], name


def test_the_rayservice_can_reach_its_apps_max_replicas():
    (service,) = of_kind("RayService")
    slots = gpu_slots(service["spec"]["rayClusterConfig"])
    wanted = sum(
        m.max_replicas * (1 if m.num_gpus == "auto" else m.num_gpus)
        for app in rayservice_apps(service).values()
        for m in app.models
    )
    assert 0 < wanted <= slots, (wanted, slots)


def test_one_image_everywhere_the_one_the_dockerfile_builds():
    assert BUILD_COMMAND in (REPO / "Dockerfile").read_text()
    images = set()
    docs = manifests(commented=True)
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        found = {image for p, doc in docs if p == path for image in walk(doc, "image")}
        # and any `image:` line in a comment
        found |= set(re.findall(r"^[#\s-]*image:\s*(\S+)", text, flags=re.M))
        if found:
            assert BUILD_COMMAND in text, f"{path.name} does not say how its image is built"
        images |= found
    assert images == {IMAGE}, images
    readme = (REPO / "README.md").read_text()
    for tag in re.findall(r"docker build .*?-t (\S+)", readme):
        assert tag in (IMAGE, f"{IMAGE}-cpu"), f"README builds {tag}, the manifests run {IMAGE}"


def test_dockerfile_base_and_build_args():
    instructions = dockerfile()
    words = [w for w, _ in instructions]
    assert words.count("FROM") == 1
    at_from = words.index("FROM")
    before = dict(a.split("=", 1) for w, a in instructions[:at_from] if w == "ARG")
    # a CUDA base with the Ray we pin, on a Python pyproject.toml allows
    assert before["BASE"] == f"rayproject/ray:{pin('ray')}-py311-gpu"
    assert instructions[at_from][1] == "${BASE}"
    after = [a.split("=", 1)[0] for w, a in instructions[at_from:] if w == "ARG"]
    assert "TORCH_INDEX" in after  # an ARG before FROM is not visible to RUN
    env = {}
    for word, args in instructions:
        if word == "ENV":
            env.update(kv.split("=", 1) for kv in shlex.split(args))
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["DAGUERRE_CACHE"] == "/var/cache/daguerre"
    users = [a for w, a in instructions if w == "USER"]
    assert users and users[-1] == "ray"  # the base image's user, not root
    text = (REPO / "Dockerfile").read_text()
    assert "--build-arg BASE=rayproject/ray:" + pin("ray") + "-py311 " in text
    assert "--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text


def test_dockerfile_installs_what_make_installs():
    makefile = (REPO / "Makefile").read_text()
    torch = pin("torch")
    assert re.search(rf"^TORCH \?= torch=={re.escape(torch)}$", makefile, flags=re.M)
    open_clip = re.search(r"--no-deps open_clip_torch==([\w.]+)", makefile).group(1)

    installs = pip_installs()
    assert len(installs) == 3, [cmd for cmd, _, _ in installs]
    (torch_cmd, torch_argv, _), (project_cmd, project_argv, workdir), (clip_cmd, clip_argv, _) = (
        installs
    )
    # torch first, from TORCH_INDEX when given (else the default index: the CUDA build)
    assert torch_argv[0] == f"torch=={torch}"
    assert "${TORCH_INDEX:+--index-url $TORCH_INDEX}" in torch_cmd
    # then the project itself, not editable, with the extras the image uses
    assert not {"-e", "--editable"} & set(project_argv), project_cmd
    (spec,) = [a for a in project_argv if not a.startswith("-")]
    extras = re.fullmatch(r"\.\[([\w,]+)\]", spec)
    assert extras, spec
    assert set(extras.group(1).split(",")) == {"s3", "onnx"}
    assert set(extras.group(1).split(",")) <= set(PYPROJECT["project"]["optional-dependencies"])
    copied = {in_workdir(d, w) for _, d, w in copies() if d.endswith("/")}
    assert str(Path(workdir)) in copied, f"pip install . runs in {workdir}, not the copied tree"
    # then the CLIP vocabulary wheel, without its deps (they would replace torch)
    assert clip_argv == ["--no-deps", f"open_clip_torch=={open_clip}"], clip_cmd


def test_dockerfile_copies_what_the_package_needs_and_it_exists():
    ignored = [
        p.strip()
        for p in (REPO / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for required in (".venv", "output", ".git", "**/__pycache__", "benchmarks/results", "tests"):
        assert required in ignored, f".dockerignore does not exclude {required}"
    sources = set()
    for srcs, dest, _ in copies():
        for src in srcs:
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
            assert not any(fnmatch.fnmatch(src.rstrip("/"), p) for p in ignored), src
            if (REPO / src).is_dir():
                # COPY copies a directory's contents: it must land in a folder of its name
                assert Path(dest).name == Path(src).name, f"COPY {src} {dest}"
            else:
                assert dest.endswith("/") or len(srcs) == 1, f"COPY {srcs} {dest}"
            sources.add(src.rstrip("/"))
    setuptools = PYPROJECT["tool"]["setuptools"]
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"], *setuptools["package-dir"].values()}
    assert needed <= sources, f"the image's build lacks {sorted(needed - sources)}"
    assert "examples" in sources  # `daguerre manifest examples/products.csv` in the image


def test_image_runs_drivers_outside_the_source_tree():
    """Ray puts a driver's working directory first on its workers' sys.path: a `daguerre`
    driver started in the copied source tree would make workers import its bare daguerre/
    folder instead of the installed package (ModuleNotFoundError: daguerre.cluster)."""
    instructions = dockerfile()
    final_workdir = [a for w, a in instructions if w == "WORKDIR"][-1]
    trees = {w for srcs, _, w in copies() if "daguerre" in srcs}
    assert final_workdir not in trees, final_workdir
    runs = " ".join(a for w, a in instructions if w == "RUN")
    for tree in trees:
        assert f"rm -rf {tree}" in runs, f"the source tree {tree} stays in the image"
