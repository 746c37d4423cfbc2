"""Benchmark a decoding method against autoregressive decoding on a Spec-Bench-style task.

    python run.py                                   # default: method=ar model=smollm2-135m task=spec_bench_mini
    python run.py method=recycle model=vicuna-7b task=spec_bench
    python run.py -m method=ar max_new_tokens=32,64 # Hydra multirun
    python run.py hydra.run.dir=runs/my_run         # rerun into an existing dir resumes it (same settings only)

Results land in the Hydra run dir under runs/: answers.jsonl (Spec-Bench answer records),
summary.json (per-task tokens/s, MAT, speedup, lossless), .hydra/ (the resolved config).
"""

import os

import hydra
from omegaconf import DictConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    from specdec.errors import run_in_output_dir
    from specdec.running.runner import run

    return run_in_output_dir(lambda out_dir: run(cfg, out_dir))  # a sweep job's refusal: specdec/running/sweep.py


if __name__ == "__main__":
    main()
