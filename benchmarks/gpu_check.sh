#!/usr/bin/env bash
# Every GPU claim in one command: bash benchmarks/gpu_check.sh [--budget 420] [--out DIR]
#
# On a bare GPU machine (torch and Triton, no diffusers, pydantic or this project): carry
# the .whl folder `make gpu-wheels` filled, and this installs it into a temporary target
# with --no-deps, so the machine's own torch stays. Where daguerre is importable already
# (a checkout after `make install-dev`, any GPU box with the project installed) it uses that.
# Results: $OUT (the device tool's folder that comes back) or benchmarks/results/gpu/.
set -euo pipefail
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)}  # the budget counts from here
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python=$root/.venv/bin/python; else python=python3; fi
fi
out=${OUT:-$root/benchmarks/results/gpu}
if ! (cd / && "$python" -c "import daguerre.pipeline.engine") 2>/dev/null; then
  if ! ls "$root"/.whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check: daguerre is not importable by $python and $root/.whl has no wheels: run 'make gpu-wheels' where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
  target=$(mktemp -d /tmp/daguerre-gpu-check.XXXXXX)
  echo "gpu_check: installing $(ls "$root"/.whl/*.whl | wc -l) wheels into $target (--no-deps)"
  "$python" -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile \
    --target "$target" "$root"/.whl/*.whl
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
  # diffusers imports torchao wherever it is installed: one that does not import with this
  # machine's torch would stop every model, so it goes, and the 8-bit cases skip.
  if ! (cd / && "$python" -c "import torchao") >/dev/null 2>&1; then
    echo "gpu_check: torchao does not import with this torch; removed, the 8-bit cases will skip"
    rm -rf "$target"/torchao "$target"/torchao-*.dist-info
  fi
fi
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
# A cache of its own: compiled graphs and bench results of an earlier run on this machine
# must not change this run's baseline (unet_backend auto reads the last bench result).
export DAGUERRE_CACHE=${GPU_CHECK_CACHE:-$(mktemp -d /tmp/daguerre-gpu-cache.XXXXXX)}
# the checkout's commit for the evidence (a copy without .git: pass DAGUERRE_GIT_COMMIT)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || true)
export DAGUERRE_GIT_COMMIT=${DAGUERRE_GIT_COMMIT:-$commit}
exec "$python" "$root/benchmarks/gpu_check.py" --out "$out" "$@"
