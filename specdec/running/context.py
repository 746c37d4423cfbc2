"""What a turn does when prompt + ``max_new_tokens`` passes the target's trained length (``context_policy``).

Spec-Bench never checks lengths (``evaluation/eval.py`` tokenizes the whole history and asks for 1024 new
tokens; Vicuna v1.3 was trained on 2048 positions): its baseline, SpS and PLD run on past the trained length,
where RoPE computes any position; only methods with preallocated caches (Medusa, EAGLE) fail or stop early
there. Its summarization prompts run up to ~1,900 Vicuna tokens, so with 1024 new tokens some 20-30 of them pass
2048. The harness follows the baseline by default:

    extend  (default) generate past the trained length where positions are computed, not learned (RoPE);
            a model with learned absolute positions (GPT-2's ``wpe``) cannot, and is refused with one line
    stop    end the turn at the trained length: stop reason ``context``
    refuse  refuse the question before anything runs (one line, exit 2)

Each turn records ``prompt_tokens`` and ``past_context`` (committed positions past the trained length);
each summary row counts the turns that went past (``turns_past_context``). Models whose cache cannot hold
the rows at all (sliding-window layers) keep ``Target``'s own refusal whatever the policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from specdec.errors import UserError

POLICIES = ("extend", "stop", "refuse")


def computes_positions(model) -> bool:
    """True if ``model`` computes position encodings (a ``*RotaryEmbedding`` module: Llama, Qwen2, Mistral,
    Gemma, GPT-NeoX ...), so positions past the trained length exist; False for learned position tables."""
    return any(type(module).__name__.endswith("RotaryEmbedding") for module in model.modules())


@dataclass(frozen=True)
class ContextPolicy:
    policy: str              # one of POLICIES
    trained: Optional[int]   # the target's max_position_embeddings (None: unknown, never limits)
    extendable: bool         # positions past ``trained`` are computed (RoPE)

    @classmethod
    def of(cls, model, policy: str) -> "ContextPolicy":
        if policy not in POLICIES:
            raise UserError(f"context_policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        return cls(policy, getattr(model.config, "max_position_embeddings", None), computes_positions(model))

    def new_token_cap(self, question_id, prompt_len: int, max_new_tokens: int) -> int:
        """New tokens this turn may generate: ``max_new_tokens``, or less under ``stop``; raises under ``refuse``
        (and under ``extend`` for a model that cannot go past its trained length)."""
        if self.trained is None or prompt_len + max_new_tokens <= self.trained:
            return max_new_tokens
        over = (f"question {question_id}: prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} "
                f"passes the model's trained length of {self.trained}")
        if self.policy == "refuse":
            raise UserError(f"{over} (context_policy=refuse; extend or stop run it)")
        if self.policy == "stop":
            return max(0, self.trained - prompt_len)
        if not self.extendable:
            raise UserError(f"{over}, and its positions are learned, not computed: use context_policy=stop "
                            f"or a shorter max_new_tokens")
        return max_new_tokens

    def past(self, prompt_len: int, new_tokens: int) -> int:
        """Committed positions past the trained length (0 if none or unknown)."""
        return 0 if self.trained is None else max(0, prompt_len + new_tokens - self.trained)
