"""Rendering a (multi-turn) conversation into prompt ids.

Models use their tokenizer's own chat template unless the model config gives one (Vicuna v1.3
ships none; its config carries FastChat's ``vicuna_v1.1`` template, the one Spec-Bench uses).
A configured template is tokenized with special tokens added (BOS, as FastChat does); a
tokenizer's own template already contains every special token it needs.
"""

from __future__ import annotations

from typing import Optional

from specdec.errors import UserError


class PromptBuilder:
    def __init__(self, tokenizer, chat_template: Optional[str] = None):
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise UserError("the model's tokenizer has no chat template; set model.chat_template in its config")
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def messages(self, questions: list[str], answers: list[str]) -> list[dict]:
        """User turns interleaved with the model's own earlier answers; ends with a user turn."""
        msgs = []
        for i, question in enumerate(questions):
            msgs.append({"role": "user", "content": question})
            if i < len(answers):
                msgs.append({"role": "assistant", "content": answers[i]})
        return msgs

    def ids(self, questions: list[str], answers: list[str]) -> list[int]:
        text = self.tokenizer.apply_chat_template(self.messages(questions, answers), chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=self.chat_template is not None).input_ids

    def answer_text(self, output_ids: list[int]) -> str:
        """Spec-Bench's cleaned turn text: special tokens removed, stripped."""
        return self.tokenizer.decode(output_ids, skip_special_tokens=True).strip()


def stop_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """EOS ids of the tokenizer and the generation config (end-of-turn tokens included)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    eos = getattr(generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if not ids:
        raise UserError("the tokenizer defines no EOS token; generation could never stop early")
    return frozenset(ids)
