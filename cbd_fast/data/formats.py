"""Readers for the on-disk formats users bring: Pascal Sentence, Wikipedia, Karpathy-split JSON, CSV/JSONL.

Every reader returns a list of :class:`Record` (image path, all its captions, class name or None, split or None)
in a deterministic order, after checking that every image file exists (``require_images=False`` leaves that to
the caller, for ``on_bad_image: skip``); turning records into tasks is
:mod:`cbd_fast.data.scenario`'s job. Missing files and folders raise :class:`DatasetLayoutError` naming the
path and the layout that was expected.
"""
from __future__ import annotations

import csv
import html
import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .images import IMAGE_EXTENSIONS


class DatasetLayoutError(InputError, FileNotFoundError):
    """A dataset folder or file is missing or malformed; the message shows the expected layout."""


@dataclass
class Record:
    """One image and everything said about it."""

    image: Path
    captions: list[str]
    class_name: str | None = None
    split: str | None = None  # "train", "test", or None when the source does not split (split by ratio later)


def _require_dir(path: Path, what: str, layout: str) -> None:
    if not path.is_dir():
        raise DatasetLayoutError(f"{what}: folder not found: {path}\nexpected layout:\n{layout}")


def _require_file(path: Path, what: str, layout: str) -> None:
    if not path.is_file():
        raise DatasetLayoutError(f"{what}: file not found: {path}\nexpected layout:\n{layout}")


def check_images_exist(records: Iterable[Record], what: str, layout: str) -> None:
    """Fail before training, not in the middle of an epoch, when images listed by an index are absent."""
    missing = [str(r.image) for r in records if not r.image.is_file()]
    if missing:
        shown = "\n  ".join(missing[:5])
        raise DatasetLayoutError(f"{what}: {len(missing)} image file(s) not found, e.g.\n  {shown}\n"
                                 f"expected layout:\n{layout}")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines (tolerates stray bytes: these corpora are not always clean UTF-8)."""
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if line.strip()]


# --------------------------------------------------------------------------------------------- Pascal
PASCAL_LAYOUT = """  root/images/<category>/<stem>.jpg      (one folder per category; "dataset/" also accepted)
  root/sentences/<category>/<stem>.txt   (same stem, one sentence per line; "sentence/" also accepted)
or
  root/<category>/<stem>.jpg with <stem>.txt beside it"""
# folder names of the parallel layout: ours first, then those of a widely shared copy of the corpus
_PASCAL_IMAGE_DIRS = ("images", "dataset")
_PASCAL_SENTENCE_DIRS = ("sentences", "sentence")


def load_pascal_sentence(root: str | Path) -> list[Record]:
    """Pascal Sentence (20 categories × 50 images × 5 sentences): one record per image, class = category."""
    root = Path(root)
    what = "Pascal Sentence"
    _require_dir(root, what, PASCAL_LAYOUT)
    image_root = next((root / d for d in _PASCAL_IMAGE_DIRS if (root / d).is_dir()), None)
    if image_root is not None:
        sentence_root = next((root / d for d in _PASCAL_SENTENCE_DIRS if (root / d).is_dir()), None)
        if sentence_root is None:
            _require_dir(root / _PASCAL_SENTENCE_DIRS[0], what, PASCAL_LAYOUT)
    else:
        image_root = sentence_root = root
    records = []
    for category_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
        for image in _image_files(category_dir):
            sentence_file = sentence_root / category_dir.name / f"{image.stem}.txt"
            _require_file(sentence_file, f"{what}: sentences of {image}", PASCAL_LAYOUT)
            sentences = _read_lines(sentence_file)
            if not sentences:
                raise DatasetLayoutError(f"{what}: {sentence_file} holds no sentence")
            records.append(Record(image=image, captions=sentences, class_name=category_dir.name))
    if not records:
        raise DatasetLayoutError(f"{what}: no category folder with images under {image_root}\n"
                                 f"expected layout:\n{PASCAL_LAYOUT}")
    return records


# ------------------------------------------------------------------------------------------ Wikipedia
WIKIPEDIA_LAYOUT = """  root/trainset_txt_img_cat.list   (lines: <text id> <image id> <category 1-10>)
  root/testset_txt_img_cat.list
  root/categories.list             (one category name per line, in category-number order)
  root/texts/<text id>.xml         (article body between <text> and </text>)
  root/images/<category name>/<image id>.jpg"""

_TEXT_BODY = re.compile(r"<text>(.*?)</text>", re.S | re.I)
_TAG = re.compile(r"<[^>]+>")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def truncate_text(text: str, max_words: int) -> str:
    """Whole leading sentences up to ``max_words`` words (the first sentence cut at ``max_words`` if longer)."""
    kept: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text):
        words = sentence.split()
        if not words:
            continue
        if count + len(words) > max_words:
            if not kept:
                kept.append(" ".join(words[:max_words]))
            break
        kept.append(" ".join(words))
        count += len(words)
    return " ".join(kept)


def wikipedia_article_text(path: Path, max_words: int) -> str:
    """The article body of a Wikipedia-dataset XML file, unescaped, whitespace-collapsed and truncated.

    A regular expression, not an XML parser: the released files contain bare ``&`` and other invalid XML.
    """
    raw = path.read_text(encoding="utf-8", errors="replace")
    match = _TEXT_BODY.search(raw)
    if match is None:
        raise DatasetLayoutError(f"Wikipedia: no <text>…</text> element in {path}")
    body = " ".join(html.unescape(_TAG.sub(" ", match.group(1))).split())
    if not body:
        raise DatasetLayoutError(f"Wikipedia: empty <text> element in {path}")
    return truncate_text(body, max_words)


def _category_names(path: Path) -> list[str]:
    names = []
    for line in _read_lines(path):
        parts = line.split()
        # accept "art" as well as "1 art" (number then name)
        names.append(" ".join(parts[1:]) if len(parts) > 1 and parts[0].isdigit() else line)
    return names


def load_wikipedia(root: str | Path, max_words: int = 64, require_images: bool = True) -> list[Record]:
    """Wikipedia (Rasiwasia et al.): one record per (article, image) pair with its official train/test split."""
    root = Path(root)
    what = "Wikipedia"
    _require_dir(root, what, WIKIPEDIA_LAYOUT)
    categories_file = root / "categories.list"
    _require_file(categories_file, what, WIKIPEDIA_LAYOUT)
    categories = _category_names(categories_file)
    list_files = {"train": root / "trainset_txt_img_cat.list", "test": root / "testset_txt_img_cat.list"}
    for list_file in list_files.values():  # both indices before any article: layout errors come first
        _require_file(list_file, what, WIKIPEDIA_LAYOUT)
    records = []
    for split, list_file in list_files.items():
        for line_number, line in enumerate(_read_lines(list_file), start=1):
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit() or not 1 <= int(parts[2]) <= len(categories):
                raise DatasetLayoutError(f"{what}: {list_file}:{line_number}: expected '<text id> <image id> "
                                         f"<category 1-{len(categories)}>', got {line!r}")
            text_id, image_id, category = parts[0], parts[1], categories[int(parts[2]) - 1]
            text_file = root / "texts" / f"{text_id}.xml"
            _require_file(text_file, what, WIKIPEDIA_LAYOUT)
            records.append(Record(image=root / "images" / category / f"{image_id}.jpg",
                                  captions=[wikipedia_article_text(text_file, max_words)],
                                  class_name=category, split=split))
    if require_images:
        check_images_exist(records, what, WIKIPEDIA_LAYOUT)
    return records


# ------------------------------------------------------------------------------------------- Karpathy
KARPATHY_LAYOUT = """  annotations JSON: {"images": [{"filename": ..., "filepath": ... (optional),
                       "split": "train" | "val" | "test" | "restval", "sentences": [{"raw": ...}, ...]}, ...]}
  image files at <image root>/<filepath>/<filename> (or <image root>/<filename>)"""


def load_karpathy(annotations: str | Path, image_root: str | Path,
                  train_splits: Sequence[str] = ("train", "restval"), test_split: str = "test",
                  require_images: bool = True) -> list[Record]:
    """Karpathy-split JSON (Flickr30K, MS-COCO): records of the train splits and the test split; no classes."""
    annotations, image_root = Path(annotations), Path(image_root)
    what = "Karpathy split"
    _require_file(annotations, what, KARPATHY_LAYOUT)
    _require_dir(image_root, what, KARPATHY_LAYOUT)
    with annotations.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetLayoutError(f"{what}: {annotations} has no top-level 'images' list\n"
                                 f"expected layout:\n{KARPATHY_LAYOUT}")
    records = []
    for number, entry in enumerate(data["images"]):
        try:
            filename, split, sentences = entry["filename"], entry["split"], entry["sentences"]
        except (KeyError, TypeError):
            raise DatasetLayoutError(f"{what}: images[{number}] of {annotations} lacks filename, split or "
                                     f"sentences\nexpected layout:\n{KARPATHY_LAYOUT}") from None
        if split in train_splits:
            split = "train"
        elif split == test_split:
            split = "test"
        else:
            continue
        # "raw" is the untokenised sentence; fall back to the tokens for files that only keep those
        captions = [s.get("raw") or " ".join(s.get("tokens", [])) for s in sentences]
        captions = [c.strip() for c in captions if c and c.strip()]
        if not captions:
            raise DatasetLayoutError(f"{what}: images[{number}] ({filename}) of {annotations} has no sentence")
        records.append(Record(image=image_root / entry.get("filepath", "") / filename, captions=captions,
                              split=split))
    if not records:
        raise DatasetLayoutError(f"{what}: {annotations} lists no image in splits {list(train_splits)} or "
                                 f"{test_split!r}")
    if require_images:
        check_images_exist(records, what, KARPATHY_LAYOUT)
    return records


# ---------------------------------------------------------------------------------------------- tables
TABLE_LAYOUT = """  a .csv file with a header row, or a .jsonl file with one JSON object per line, holding
  image_path, caption, and optionally label and split ("train" | "test");
  relative image paths are resolved against the file's folder; rows sharing an image = several captions"""


def _read_utf8(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, and bytes that are not UTF-8
    stay as lone surrogates for :func:`_check_utf8` to report where they are."""
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def _check_utf8(path: Path, where: str, *texts: str | None) -> None:
    for text in texts:
        bad = next((ch for ch in text or "" if "\udc80" <= ch <= "\udcff"), None)
        if bad is not None:
            raise DatasetLayoutError(f"{path}: {where}: not UTF-8 text (byte 0x{ord(bad) - 0xDC00:02x}); save the "
                                     f"file as UTF-8 (in Excel: CSV UTF-8)")


def _table_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for line_number, line in enumerate(_read_utf8(path).splitlines(), start=1):
            if not line.strip():
                continue
            _check_utf8(path, f"line {line_number}", line)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetLayoutError(f"{path}:{line_number}: not a JSON object ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DatasetLayoutError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(_read_utf8(path), newline=""),
                                delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        _check_utf8(path, "header", *(reader.fieldnames or []))
        rows = []
        for number, row in enumerate(reader, start=1):  # numbered like load_table's messages: data rows from 1
            _check_utf8(path, f"row {number} (line {reader.line_num})", *(v for v in row.values() if
                                                                          isinstance(v, str)))
            rows.append(row)
        return rows
    raise DatasetLayoutError(f"{path}: unknown table type (use .csv, .tsv or .jsonl)\n{TABLE_LAYOUT}")


def load_table(path: str | Path, split: str | None = None, require_images: bool = True) -> list[Record]:
    """Generic CSV/JSONL pairs; ``split`` (if given) is assigned to every record of this file."""
    path = Path(path)
    what = "CSV/JSONL"
    _require_file(path, what, TABLE_LAYOUT)
    rows = _table_rows(path)
    by_image: dict[Path, Record] = {}
    for number, row in enumerate(rows, start=1):
        if not row.get("image_path") or not isinstance(row.get("caption"), str):
            raise DatasetLayoutError(f"{path}: row {number} needs image_path and caption, has columns "
                                     f"{sorted(map(str, row))}\nexpected layout:\n{TABLE_LAYOUT}")
        if not row["caption"].strip():
            raise DatasetLayoutError(f"{path}: row {number}: the caption of {row['image_path']} is empty; give "
                                     f"every row a caption or remove the row")
        label = row.get("label")
        label = None if label is None or str(label).strip() == "" else str(label).strip()
        row_split = split or (str(row["split"]).strip() if row.get("split") else None)
        if row_split not in (None, "train", "test"):
            raise DatasetLayoutError(f"{path}: row {number}: split must be 'train' or 'test', got {row_split!r}")
        image = Path(row["image_path"])
        image = image if image.is_absolute() else path.parent / image
        record = by_image.get(image)
        if record is None:
            by_image[image] = Record(image=image, captions=[row["caption"].strip()], class_name=label,
                                     split=row_split)
            continue
        if record.class_name != label or record.split != row_split:
            raise DatasetLayoutError(f"{path}: row {number}: {image} appears with different label or split "
                                     f"({record.class_name!r}/{record.split!r} vs {label!r}/{row_split!r})")
        record.captions.append(row["caption"].strip())
    if not by_image:
        raise DatasetLayoutError(f"{what}: {path} holds no row\nexpected layout:\n{TABLE_LAYOUT}")
    records = list(by_image.values())
    labelled = {r.class_name is not None for r in records}
    if len(labelled) > 1:
        raise DatasetLayoutError(f"{what}: {path}: either every row has a label or none does")
    if require_images:
        check_images_exist(records, what, TABLE_LAYOUT)
    return records
