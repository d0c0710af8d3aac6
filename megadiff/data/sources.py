"""Inputs of the shard builders, cut into slices.

A slice is the unit of parallel work and of resume: the input is planned into the same list
of slices on every rank (image folder: `slice_size` images; JSONL / prompt text: line ranges;
Parquet: whole row groups; WebDataset: one `.tar`), each slice is written to its own part
directory, and a finished part is never rebuilt. Reading a slice yields `Item`s (something
to encode) and `Skip`s (bad input, with a reason and the file it came from).

Formats:
  folder    images (jpg/png/webp/...) with a same-name `.txt` caption, searched recursively
  jsonl     one JSON object a line: `image` (a path relative to the manifest, or
            {"bytes": base64} / {"path": ...}) and `caption`
  parquet   `image` (binary, a path string, or the Hugging Face {bytes, path} struct) and
            `caption` columns (names configurable)
  wds       WebDataset `.tar`: members `KEY.jpg|png|webp` with `KEY.txt|caption` (or a
            `KEY.json` holding "caption")
  prompts   plain text, one prompt a line (the DMDR t2i-2m-filtered-prompts.txt format)
  pickapic  Parquet in the Pick-a-Pic v2 layout: caption, jpg_0, jpg_1, label_0
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megadiff.data.images import IMAGE_EXTENSIONS

FORMATS = ("folder", "jsonl", "parquet", "wds")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                  ".tar": "wds"}
_WDS_IMAGE = ("jpg", "jpeg", "png", "webp", "bmp")
_WDS_CAPTION = ("txt", "caption")


@dataclass(frozen=True)
class Skip:
    key: str        # where: file, or file:line / file:row / tar/member key
    reason: str     # a short token counted in the summary (see REASONS)
    detail: str = ""


REASONS = {
    "bad_image": "unreadable, truncated or not an image",
    "missing_image": "no image for the caption (or an empty image field)",
    "missing_caption": "no caption for the image",
    "empty_caption": "the caption is empty",
    "bad_text_encoding": "the caption is not UTF-8",
    "bad_caption": "the caption is not a string",
    "bad_json": "the manifest line is not a JSON object",
    "missing_column": "the manifest or Parquet file lacks a required column",
    "corrupt_tar_member": "a tar member could not be read",
    "corrupt_tar": "the tar file is damaged; the rest of it was not read",
    "too_small": "the image is smaller than --min-size",
    "non_finite": "the encoders produced inf/nan (fp16 overflow?)",
    "empty_line": "an empty line in a prompt file",
    "tie": "a tied preference pair (kept with --keep-ties)",
    "bad_label": "label_0 is not 0, 0.5 or 1",
}


@dataclass
class Item:
    key: str
    caption: str
    images: tuple = ()      # bytes or Path, one per image (two for a preference pair)
    label_w: float = 1.0    # pairs: 1.0 or 0.5 (tie)


@dataclass(frozen=True)
class Slice:
    index: int
    fmt: str
    path: str                       # the file, or the folder for `folder`
    start: int = 0                  # line / row range [start, stop)
    stop: int = 0
    files: tuple[str, ...] = field(default=(), repr=False)  # folder: image paths under `path`
    label: str = ""                 # the input's name in sample keys (unique among the inputs)
    offset: int = 0                 # jsonl / prompts: byte offset of line `start`

    @property
    def name(self) -> str:
        return self.label or Path(self.path).name

    @property
    def size(self) -> int | None:
        """Items in the slice (None when unknown before reading: a .tar)."""
        if self.fmt == "folder":
            return len(self.files)
        if self.fmt == "wds":
            return None
        return self.stop - self.start

    def describe(self) -> dict:
        d = {"index": self.index, "format": self.fmt, "path": self.path}
        if self.fmt == "folder":
            d.update(count=len(self.files), first=self.files[0], last=self.files[-1])
        elif self.fmt != "wds":
            d.update(start=self.start, stop=self.stop)
        return d


# ---- planning ------------------------------------------------------------------------------

def _need(path: Path) -> Path:
    if not path.exists():
        raise ValueError(f"input {path} does not exist: check the path (inputs are image folders, "
                         ".jsonl/.parquet manifests or WebDataset .tar files)")
    return path


def detect_format(path: Path) -> str:
    _need(path)
    if path.is_file():
        fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"cannot tell the format of {path} from its suffix: pass --format "
                             f"({'|'.join(FORMATS)})")
        return fmt
    for p in path.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            return "folder"
    for suffix, fmt in ((".tar", "wds"), (".parquet", "parquet"), (".jsonl", "jsonl")):
        if any(path.glob(f"*{suffix}")):
            return fmt
    raise ValueError(f"{path} holds no images, .tar, .parquet or .jsonl files: point the build "
                     "at an image folder with .txt captions or at manifest/tar files")


def expand_inputs(inputs: list[str], fmt: str) -> tuple[str, list[Path]]:
    """The format (one for all inputs) and the input files/folders, in order."""
    if not inputs:
        raise ValueError("no inputs given: name image folders, manifests or .tar files")
    paths = [_need(Path(p).expanduser()).resolve() for p in inputs]
    fmts = {detect_format(p) for p in paths} if fmt == "auto" else {fmt}
    if len(fmts) > 1:
        raise ValueError(f"the inputs mix formats ({', '.join(sorted(fmts))}): build each format "
                         "into its own --out and join them with `megadiff data merge`")
    (fmt,) = fmts
    suffix = {"wds": ".tar", "parquet": ".parquet", "jsonl": ".jsonl"}.get(fmt)
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and suffix is not None:
            found = sorted(p.glob(f"*{suffix}"))
            if not found:
                raise ValueError(f"{p} holds no *{suffix} files for --format {fmt}")
            out.extend(found)
        elif p.is_file() and fmt == "folder":
            raise ValueError(f"{p} is a file but --format folder needs a directory of images")
        else:
            out.append(p)
    return fmt, out


def _line_ranges(path: Path, slice_size: int) -> list[tuple[int, int, int]]:
    """(first line, end line, byte offset of the first line) per `slice_size` lines, in one pass,
    so that reading a slice seeks instead of scanning the file from the top."""
    ranges, line, offset, start, start_offset = [], 0, 0, 0, 0
    with open(path, "rb") as f:
        for raw in f:
            line += 1
            offset += len(raw)
            if line - start == slice_size:
                ranges.append((start, line, start_offset))
                start, start_offset = line, offset
    if line > start:
        ranges.append((start, line, start_offset))
    return ranges


def _parquet_groups(path: Path, slice_size: int) -> list[tuple[int, int]]:
    """Row ranges made of whole row groups (each read once), about `slice_size` rows each."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:
        raise ValueError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e}): "
                         "re-export it or leave it out") from None
    ranges, start, pos = [], 0, 0
    for g in range(meta.num_row_groups):
        pos += meta.row_group(g).num_rows
        if pos - start >= slice_size:
            ranges.append((start, pos))
            start = pos
    if pos > start:
        ranges.append((start, pos))
    return ranges


def input_labels(paths: list[Path]) -> dict[Path, str]:
    """Each input's name in sample keys: its file/folder name, or as many trailing path parts as
    it takes to tell apart inputs of the same name (a/train.tar, b/train.tar)."""
    labels = {}
    for p in paths:
        n = 1
        while n < len(p.parts) and any(q != p and q.parts[-n:] == p.parts[-n:] for q in paths):
            n += 1
        labels[p] = "/".join(p.parts[-n:])
    return labels


def plan_slices(fmt: str, paths: list[Path], slice_size: int) -> list[Slice]:
    """The same list on every rank: it depends only on the inputs and `slice_size`."""
    if slice_size < 1:
        raise ValueError(f"--slice-size {slice_size} must be >= 1")
    slices: list[Slice] = []

    labels = input_labels(paths)

    def add(**kw) -> None:
        slices.append(Slice(index=len(slices), fmt=fmt, label=labels[p], **kw))

    for p in paths:
        if fmt == "folder":
            files = sorted(q.relative_to(p).as_posix() for q in p.rglob("*")
                           if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            for i in range(0, len(files), slice_size):
                add(path=str(p), files=tuple(files[i:i + slice_size]))
        elif fmt in ("jsonl", "prompts"):
            for a, b, offset in _line_ranges(p, slice_size):
                add(path=str(p), start=a, stop=b, offset=offset)
        elif fmt in ("parquet", "pickapic"):
            for a, b in _parquet_groups(p, slice_size):
                add(path=str(p), start=a, stop=b)
        elif fmt == "wds":
            add(path=str(p))
        else:
            raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    return slices


# ---- reading -------------------------------------------------------------------------------

def _caption(value, key: str) -> str | Skip:
    if value is None:
        return Skip(key, "empty_caption")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            return Skip(key, "bad_text_encoding", str(e))
    if not isinstance(value, str):
        return Skip(key, "bad_caption", f"caption is a {type(value).__name__}")
    value = value.replace("\x00", "").strip()
    return value if value else Skip(key, "empty_caption")


def _image_ref(value, base: Path, key: str) -> bytes | Path | Skip:
    """bytes, a path (relative to the manifest's folder), or {bytes|path} (HF datasets layout)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            return Skip(key, "missing_image", "image field has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value) if value else Skip(key, "missing_image", "empty image bytes")
    if isinstance(value, str) and value:
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    return Skip(key, "missing_image", f"image field is {type(value).__name__}")


def _iter_folder(s: Slice) -> Iterator[Item | Skip]:
    root = Path(s.path)
    for rel in s.files:
        key = f"{s.name}/{rel}"
        txt = (root / rel).with_suffix(".txt")
        try:
            raw = txt.read_bytes()
        except FileNotFoundError:
            yield Skip(key, "missing_caption", f"no {txt.name} beside the image")
            continue
        except OSError as e:
            yield Skip(key, "missing_caption", f"{txt.name}: {e.strerror}")
            continue
        cap = _caption(raw, key)
        yield cap if isinstance(cap, Skip) else Item(key, cap, (root / rel,))


def _iter_lines(s: Slice) -> Iterator[tuple[int, bytes]]:
    with open(s.path, "rb") as f:
        f.seek(s.offset)
        for i, line in enumerate(f, start=s.start):
            if i >= s.stop:
                break
            yield i, line.rstrip(b"\r\n")


def _iter_jsonl(s: Slice, image_col: str, caption_col: str) -> Iterator[Item | Skip]:
    path = Path(s.path)
    for i, raw in _iter_lines(s):
        key = f"{s.name}:{i + 1}"
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Skip(key, "bad_text_encoding", str(e))
            continue
        except json.JSONDecodeError as e:
            yield Skip(key, "bad_json", str(e))
            continue
        if not isinstance(obj, dict):
            yield Skip(key, "bad_json", f"a JSON {type(obj).__name__}, not an object")
            continue
        missing = [c for c in (image_col, caption_col) if c not in obj]
        if missing:
            yield Skip(key, "missing_column", f"no {' or '.join(map(repr, missing))} "
                                              f"(keys: {', '.join(sorted(obj)[:8])})")
            continue
        img = obj[image_col]
        if isinstance(img, dict) and isinstance(img.get("bytes"), str):
            try:
                img = {"bytes": base64.b64decode(img["bytes"], validate=True)}
            except (binascii.Error, ValueError) as e:
                yield Skip(key, "bad_image", f"image bytes are not base64: {e}")
                continue
        ref = _image_ref(img, path.parent, key)
        cap = _caption(obj[caption_col], key)
        bad = next((x for x in (ref, cap) if isinstance(x, Skip)), None)
        yield bad if bad is not None else Item(key, cap, (ref,))


def _iter_parquet_rows(s: Slice, columns: list[str]) -> Iterator[tuple[int, dict] | Skip]:
    import pyarrow.parquet as pq

    path = Path(s.path)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        detail = (f"{path.name} has no column {' or '.join(map(repr, missing))} "
                  f"(columns: {', '.join(names[:12])})")
        for r in range(s.start, s.stop):
            yield Skip(f"{s.name}:{r}", "missing_column", detail)
        return
    pos = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if pos + n > s.start and pos < s.stop:
            table = pf.read_row_group(g, columns=columns)
            lo, hi = max(s.start - pos, 0), min(s.stop - pos, n)
            cols = {c: table.column(c).slice(lo, hi - lo).to_pylist() for c in columns}
            for j in range(hi - lo):
                yield pos + lo + j, {c: cols[c][j] for c in columns}
        pos += n
        if pos >= s.stop:
            break


def _iter_parquet(s: Slice, image_col: str, caption_col: str) -> Iterator[Item | Skip]:
    path = Path(s.path)
    for row in _iter_parquet_rows(s, [image_col, caption_col]):
        if isinstance(row, Skip):
            yield row
            continue
        r, values = row
        key = f"{s.name}:{r}"
        ref = _image_ref(values[image_col], path.parent, key)
        cap = _caption(values[caption_col], key)
        bad = next((x for x in (ref, cap) if isinstance(x, Skip)), None)
        yield bad if bad is not None else Item(key, cap, (ref,))


_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")   # webdataset's base_plus_ext


def _wds_group(tar_name: str, key: str, members: dict[str, bytes | Skip]) -> Item | Skip:
    skey = f"{tar_name}/{key}"
    bad = next((v for v in members.values() if isinstance(v, Skip)), None)
    if bad is not None:
        return Skip(skey, bad.reason, bad.detail)
    image = next((members[e] for e in _WDS_IMAGE if e in members), None)
    raw_cap = next((members[e] for e in _WDS_CAPTION if e in members), None)
    if raw_cap is None and "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            raw_cap = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return Skip(skey, "bad_json", f"{key}.json: {e}")
    if image is None:
        return Skip(skey, "missing_image", f"members: {', '.join(sorted(members))}")
    if raw_cap is None:
        return Skip(skey, "missing_caption", f"members: {', '.join(sorted(members))}")
    cap = _caption(raw_cap, skey)
    return cap if isinstance(cap, Skip) else Item(skey, cap, (image,))


def _zero_region(path: Path, start: int, stop: int) -> bool:
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                return True
            if chunk.count(0) != len(chunk):
                return False
            left -= len(chunk)
    return True


def _iter_wds(s: Slice) -> Iterator[Item | Skip]:
    """Members grouped by key in archive order. A damaged member header is stepped over
    (`ignore_zeros` scans on to the next valid header): the sample it belonged to is skipped as
    `corrupt_tar_member`; so is a sample whose member data is cut short."""
    path = Path(s.path)
    wanted = set(_WDS_IMAGE) | set(_WDS_CAPTION) | {"json"}
    plain = path.suffix.lower() == ".tar"
    try:
        tf = tarfile.open(path, mode="r:*", ignore_zeros=True)
    except (tarfile.TarError, OSError, EOFError) as e:
        yield Skip(s.name, "corrupt_tar", f"{type(e).__name__}: {e}")
        return
    key, group, expected = None, {}, 0
    gap: str | None = None          # an unreadable stretch not yet charged to a sample
    read_failed = False

    def flush() -> Iterator[Item | Skip]:
        nonlocal gap
        r = _wds_group(s.name, key, group)
        if gap is not None and isinstance(r, Skip) and r.reason in ("missing_image", "missing_caption"):
            r, gap = Skip(r.key, "corrupt_tar_member", gap), None
        yield r

    with tf:
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, OSError, EOFError) as e:
                if group:
                    yield from flush()
                if not read_failed:     # else the cut-short member already counts
                    yield Skip(s.name, "corrupt_tar", f"after member {key!r}: "
                                                         f"{type(e).__name__}: {e}")
                return
            if m is None:
                break
            if plain and m.offset > expected and not _zero_region(path, expected, m.offset):
                if gap is not None:
                    yield Skip(s.name, "corrupt_tar_member", gap)
                gap = f"{m.offset - expected} unreadable bytes at offset {expected} (before {m.name})"
            expected = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if not m.isfile():
                continue
            match = _WDS_KEY.match(m.name)
            if match is None:
                continue
            k, ext = match.group(1), match.group(2).lower()
            if k != key:
                if group:
                    yield from flush()
                key, group = k, {}
            if ext not in wanted:
                continue
            try:
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"{len(data)} of {m.size} bytes")
                group[ext] = data
                read_failed = False
            except (tarfile.TarError, OSError, EOFError) as e:
                group[ext] = Skip(m.name, "corrupt_tar_member", f"{m.name}: {e}")
                read_failed = True
    if group:
        yield from flush()
    if gap is not None:
        yield Skip(s.name, "corrupt_tar_member", gap)
    if plain:
        size = path.stat().st_size
        if size > expected and not _zero_region(path, expected, size):
            yield Skip(s.name, "corrupt_tar", f"{size - expected} bytes after the last "
                                                 "member are not a tar header (truncated?)")


def _iter_prompts(s: Slice) -> Iterator[Item | Skip]:
    for i, raw in _iter_lines(s):
        key = f"{s.name}:{i + 1}"
        cap = _caption(raw, key)
        if isinstance(cap, Skip) and cap.reason == "empty_caption":
            cap = Skip(key, "empty_line")
        yield cap if isinstance(cap, Skip) else Item(key, cap)


PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def _iter_pickapic(s: Slice, keep_ties: bool) -> Iterator[Item | Skip]:
    path = Path(s.path)
    for row in _iter_parquet_rows(s, list(PICKAPIC_COLUMNS)):
        if isinstance(row, Skip):
            yield row
            continue
        r, v = row
        key = f"{s.name}:{r}"
        try:
            label = float(v["label_0"])
        except (TypeError, ValueError):
            label = float("nan")
        if label not in (0.0, 0.5, 1.0):
            yield Skip(key, "bad_label", f"label_0 = {v['label_0']!r}")
            continue
        if label == 0.5 and not keep_ties:
            yield Skip(key, "tie")
            continue
        refs = [_image_ref(v[c], path.parent, key) for c in ("jpg_0", "jpg_1")]
        cap = _caption(v["caption"], key)
        bad = next((x for x in (*refs, cap) if isinstance(x, Skip)), None)
        if bad is not None:
            yield bad
            continue
        w, l = (refs[1], refs[0]) if label == 0.0 else (refs[0], refs[1])
        yield Item(key, cap, (w, l), label_w=max(label, 1.0 - label))


def iter_slice(s: Slice, image_column: str = "image", caption_column: str = "caption",
               keep_ties: bool = False) -> Iterator[Item | Skip]:
    if s.fmt == "folder":
        return _iter_folder(s)
    if s.fmt == "jsonl":
        return _iter_jsonl(s, image_column, caption_column)
    if s.fmt == "parquet":
        return _iter_parquet(s, image_column, caption_column)
    if s.fmt == "wds":
        return _iter_wds(s)
    if s.fmt == "prompts":
        return _iter_prompts(s)
    if s.fmt == "pickapic":
        return _iter_pickapic(s, keep_ties)
    raise AssertionError(s.fmt)
