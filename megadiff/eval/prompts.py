"""Prompt files for `megadiff eval`: one format in, a list of (prompt, category) out.

- `.txt`: one prompt per line (blank lines skipped).
- `.csv` / `.tsv`: a header row with a prompt column (`prompt`, `Prompt`, `Prompts` as in
  DrawBench's CSV, `caption`, `text`) and optionally `Category` / `category`
  (DrawBench, PartiPrompts' `PartiPrompts.tsv`).
- `.json` / `.jsonl`: a list of strings, a list of objects with a prompt key (as above), or
  COCO captions (`{"annotations": [{"image_id": .., "caption": ..}, ...]}`; the first caption
  of each image, in file order).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

PROMPT_KEYS = ("prompt", "Prompt", "Prompts", "prompts", "caption", "Caption", "text")
CATEGORY_KEYS = ("category", "Category")


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None


def _pick(row: dict, keys: tuple[str, ...]) -> str | None:
    for k in keys:
        if k in row and row[k] is not None and str(row[k]).strip():
            return str(row[k]).strip()
    return None


def _from_rows(rows: list, where: Path) -> list[Prompt]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if row.strip():
                out.append(Prompt(row.strip()))
            continue
        if not isinstance(row, dict):
            raise ValueError(f"{where}: entry {i} is a {type(row).__name__}; give strings or "
                             f"objects with one of the keys {', '.join(PROMPT_KEYS)}")
        text = _pick(row, PROMPT_KEYS)
        if text is None:
            raise ValueError(f"{where}: entry {i} has none of the keys {', '.join(PROMPT_KEYS)}: "
                             "name the prompt column 'prompt'")
        out.append(Prompt(text, _pick(row, CATEGORY_KEYS)))
    return out


def _coco(doc: dict) -> list[Prompt]:
    seen, out = set(), []
    for a in doc["annotations"]:
        key = a.get("image_id", len(seen))
        if key in seen or not str(a.get("caption", "")).strip():
            continue
        seen.add(key)
        out.append(Prompt(str(a["caption"]).strip()))
    return out


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {p} does not exist: give a .txt (one prompt a line), "
                         ".csv/.tsv or .json file")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"prompt file {p} is not UTF-8 text: re-save it as UTF-8") from None
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames or not set(reader.fieldnames) & set(PROMPT_KEYS):
            raise ValueError(f"{p} has no prompt column (header {reader.fieldnames}): name it "
                             f"one of {', '.join(PROMPT_KEYS)}")
        prompts = _from_rows(list(reader), p)
    elif suffix in (".json", ".jsonl"):
        try:
            doc = ([json.loads(ln) for ln in text.splitlines() if ln.strip()] if suffix == ".jsonl"
                   else json.loads(text))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}): fix the prompt file") from None
        if isinstance(doc, dict) and isinstance(doc.get("annotations"), list):
            prompts = _coco(doc)
        elif isinstance(doc, dict):
            raise ValueError(f"{p} is a JSON object without 'annotations': give a list of prompts "
                             "or COCO captions")
        else:
            prompts = _from_rows(doc, p)
    else:
        prompts = [Prompt(ln.strip()) for ln in text.splitlines() if ln.strip()]
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"{p} holds no prompts: write one prompt per line")
    return prompts
