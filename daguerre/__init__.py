"""daguerre: distributed diffusion image generation on Ray.

The subpackages live in the repository's top-level folders and are mapped under this
import root by ``pyproject.toml``: ``daguerre.pipeline`` (``pipeline/``),
``daguerre.cluster`` (``cluster/``), ``daguerre.kernels`` (``kernels/``) and
``daguerre.configs`` (``configs/``).
"""

__version__ = "0.1.0"
