"""Time to a compiled population's first epoch, with the compiler's cache empty or warm.

    TORCHINDUCTOR_CACHE_DIR=/tmp/ic TRITON_CACHE_DIR=/tmp/ic/triton \
        python bench/first_epoch.py TAG [--K 256]

Builds the reference benchmark's population (K members, bf16, --compile, on cuda) and prints
one JSON line: seconds to import, to build the population, and each of 3 epochs. The first
epoch traces, compiles (or loads from the cache) and captures the CUDA graph. Run it once
with an empty cache directory (cold), then again with the same one (warm); several at once
(one per trial) show whether compiling in parallel slows each compile down.
"""

from __future__ import annotations

import argparse
import json
import time

start = time.time()
import torch  # noqa: E402
from common import population_configs, reference_corpus  # noqa: E402

from ufw.train import Population  # noqa: E402

imported = time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tag", help="a label for this run's line")
    parser.add_argument("--K", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    corpus = reference_corpus()
    began = time.time()
    population = Population(population_configs(args.K), corpus, args.device, compile=True,
                            precision="bf16")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    built = time.time() - began
    epochs = []
    for _ in range(3):
        began = time.time()
        population.run_epoch()
        sync()
        epochs.append(round(time.time() - began, 2))
    print(json.dumps({"tag": args.tag, "import": round(imported, 2), "build": round(built, 2),
                      "epochs": epochs}), flush=True)


if __name__ == "__main__":
    main()
