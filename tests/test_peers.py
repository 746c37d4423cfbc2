"""specdec.measure.peers (make bench-peers): the missing-extra error and the comparison helpers, without llama.cpp;
one real llama.cpp check (skipped unless llama-cpp-python is installed)."""

from __future__ import annotations

import sys

import pytest

from specdec import EMBEDDED_MODEL
from specdec.measure import peers


def test_missing_llama_cpp_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    out = tmp_path / "peers.json"
    assert peers.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install -e '.[peers]'" in err
    assert not out.exists()


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2, 3], [1, 5, 3], 1), ([1, 2], [1, 2, 3], 2), ([], [7], 0), ([4], [5], 0)])
def test_first_divergence(a, b, expected):
    assert peers.first_divergence(a, b) == expected
    assert peers.first_divergence(b, a) == expected


def _run(ids, decode_s, prefill_s=1.0):
    return {"output_ids": ids, "decode_s": decode_s, "prefill_s": prefill_s}


def test_summarize_ratios_within_each_family_and_output_equality():
    # llama.cpp: plain 10 tok/s, pld 5 tok/s on run 0 (different ids), 10 vs 20 on run 1 (same ids)
    # ours: ar 4 tok/s, pld 8 tok/s on both runs, always the same ids
    rows = [{"runs": {"llama.cpp": _run([1] * 10, 1.0), "llama.cpp+pld": _run([2] * 10, 2.0),
                      "ours ar": _run([3] * 8, 2.0), "ours pld": _run([3] * 8, 1.0)}},
            {"runs": {"llama.cpp": _run([1] * 20, 2.0), "llama.cpp+pld": _run([1] * 20, 1.0),
                      "ours ar": _run([3] * 8, 2.0), "ours pld": _run([3] * 8, 1.0)}}]
    table = {r["system"]: r for r in peers.summarize(rows)}
    assert table["llama.cpp"]["decode_tokens_per_s"] == pytest.approx(10.0)
    assert table["llama.cpp+pld"]["decode_tokens_per_s"] == pytest.approx(12.5)
    assert table["llama.cpp+pld"]["speedup_vs_own_plain"] == pytest.approx(1.25)
    assert table["llama.cpp+pld"]["equals_own_plain"] == "1/2"
    assert table["ours pld"]["speedup_vs_own_plain"] == pytest.approx(2.0)
    assert table["ours pld"]["equals_own_plain"] == "2/2"
    assert table["ours ar"]["speedup_vs_own_plain"] == 1.0 and table["ours ar"]["family"] == "ours"
    # end to end includes the 1 s prefill: llama.cpp plain 10/2 and 20/3 tok/s
    assert table["llama.cpp"]["e2e_tokens_per_s"] == pytest.approx((5.0 + 20 / 3) / 2)


def test_llama_generate_is_deterministic_capped_and_stops_like_our_loop():
    """Real llama.cpp on the embedded GGUF: greedy output is deterministic, capped, and a stop id ends it."""
    pytest.importorskip("llama_cpp")
    from llama_cpp import Llama

    from specdec.models import embedded_gguf

    llm = Llama(model_path=str(embedded_gguf(EMBEDDED_MODEL)), n_ctx=256, n_threads=1, n_threads_batch=1,
                verbose=False)
    prompt = llm.tokenize(b"<|im_start|>user\nCount from one to ten.<|im_end|>\n<|im_start|>assistant\n",
                          add_bos=False, special=True)
    first = peers.llama_generate(llm, prompt, 12, frozenset())
    assert len(first.output_ids) == 12 and first.prefill_s > 0 and first.decode_s > 0
    assert peers.llama_generate(llm, prompt, 12, frozenset()).output_ids == first.output_ids
    stopped = peers.llama_generate(llm, prompt, 12, frozenset({first.output_ids[3]}))
    cut = first.output_ids.index(first.output_ids[3]) + 1
    assert stopped.output_ids == first.output_ids[:cut]
