"""Benchmark a decoding method against autoregressive decoding on a Spec-Bench-style task.

    python run.py                                   # default: method=ar model=smollm2-135m task=spec_bench_mini
    python run.py method=recycle model=vicuna-7b task=spec_bench
    python run.py -m method=ar max_new_tokens=32,64 # Hydra multirun
    python run.py hydra.run.dir=runs/my_run         # rerun into an existing dir resumes it

Results land in the Hydra run dir under runs/: answers.jsonl (Spec-Bench answer records),
summary.json (per-task tokens/s, MAT, speedup, lossless), .hydra/ (the resolved config).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from specdec.errors import UserError
    from specdec.runner import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
