# The daguerre image: Ray 2.60.0 and daguerre with the versions `make` installs. The KubeRay
# manifests in cluster/deploy/ (rayservice.yaml, raycluster.yaml, rayjob.yaml) all run it.
#
#   CUDA image (the one the manifests name):
#     docker build -t ghcr.io/daguerre/daguerre:0.1.0 .
#   CPU image (torch from PyTorch's CPU index, no CUDA wheels):
#     docker build --build-arg BASE=rayproject/ray:2.60.0-py311 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ghcr.io/daguerre/daguerre:0.1.0-cpu .
#
# The tag is the project version in pyproject.toml; tests/cpu/test_deploy.py checks that this
# file, pyproject.toml and the manifests agree.
ARG BASE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE}

# Empty: torch from the default index (its Linux wheels are the CUDA build).
ARG TORCH_INDEX=

ENV HF_HUB_OFFLINE=1 \
    DAGUERRE_CACHE=/var/cache/daguerre \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# $DAGUERRE_CACHE holds compiled UNets and s3:// models fetched once per node (mount a volume
# there to keep them across pod restarts). /tmp/daguerre is where the package is built.
USER root
RUN install -d -o ray -m 0775 /var/cache/daguerre \
    && install -d -o ray /tmp/daguerre
USER ray

# torch first, as `make` does, so that nothing later resolves it to another build.
RUN pip install torch==2.13.0 ${TORCH_INDEX:+--index-url $TORCH_INDEX}

WORKDIR /tmp/daguerre
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users daguerre daguerre
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users cluster cluster
COPY --chown=ray:users kernels kernels
COPY --chown=ray:users configs configs
COPY --chown=ray:users examples examples

# The project itself, not editable: its pinned runtime deps, S3 storage and ONNX Runtime.
# The source tree goes afterwards: Ray puts a driver's working directory first on its
# workers' sys.path, so a driver started inside it would shadow the installed package with
# the bare daguerre/ folder. The examples and configs stay in ~ (/home/ray).
RUN pip install ".[s3,onnx]" \
    && mv examples configs /home/ray/ \
    && cd / && rm -rf /tmp/daguerre
# The real CLIP BPE vocabulary ships in this wheel; its own deps would replace torch.
RUN pip install --no-deps open_clip_torch==3.3.0 \
    && daguerre --version

WORKDIR /home/ray
