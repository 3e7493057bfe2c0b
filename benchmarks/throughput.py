"""Throughput per GPU: the same code as `daguerre bench` (see pipeline/bench.py).

    python benchmarks/throughput.py --model sd15 --size 512x512 --steps 30 --batch-sizes 1,2,4,8 \
        --backends eager,compile,onnxruntime,tensorrt --json benchmarks/results/throughput_sd15.json
"""

import sys

from daguerre.cluster.bench import main

if __name__ == "__main__":
    sys.exit(main())
