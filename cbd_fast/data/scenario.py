"""Continual scenarios: a ``data_cfg`` dict → a list of :class:`Task`.

``scenario`` picks the source: ``synthetic`` (default, generated), ``pascal_sentence``, ``wikipedia``,
``karpathy``, ``csv`` (CSV or JSONL), or ``multi`` (sub-scenarios chained, e.g. Wikipedia tasks then Pascal
tasks). Labelled sources are split into class-disjoint tasks; unlabelled ones (Karpathy, label-less tables)
into disjoint random chunks of images. Class labels are unique across a whole scenario: contiguous per task,
in task order (``task.class_ids``). Everything random is drawn from ``seed`` (or ``data_seed`` when set), so a
configuration always gives the same tasks.

Train datasets of file-based scenarios are augmented by default (``augment``: a mild random resized crop, no
flip; see :class:`~cbd_fast.data.images.Augment`); synthetic ones are not. ``on_bad_image`` (file-based):
``error`` (default) fails on a missing or undecodable image file, ``skip`` drops it with its captions and logs
one warning per :func:`build_tasks` call (paths in ``dataset.skipped``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, check_keys, get_augment, get_bool, get_choice, get_fraction, get_int
from .dataset import ON_BAD_IMAGE, ImageTextDataset, Task, report_skipped_images
from .formats import Record, load_karpathy, load_pascal_sentence, load_table, load_wikipedia
from .images import Augment
from .splits import even_chunks, rng_for, split_classes, split_train_test
from .synthetic import SYNTHETIC_KEYS, build_synthetic_tasks

# keys every file-based scenario understands
_FILE_KEYS = {"scenario", "name", "num_tasks", "data_seed", "preload", "max_train_per_task", "max_test_per_task",
              "augment", "on_bad_image"}
# train augmentation of file-based scenarios when ``augment`` is absent: a mild crop; no flip, since captions
# may say left or right
FILE_AUGMENT = Augment(crop_scale=(0.9, 1.0), flip=False)
_CLASS_KEYS = {"classes_per_task", "shuffle_classes"}
SCENARIO_KEYS: dict[str, set[str]] = {
    "synthetic": SYNTHETIC_KEYS,
    "pascal_sentence": _FILE_KEYS | _CLASS_KEYS | {"root", "test_fraction"},
    "wikipedia": _FILE_KEYS | _CLASS_KEYS | {"root", "max_words"},
    "karpathy": _FILE_KEYS | {"root", "annotations", "train_splits", "test_split"},
    "csv": _FILE_KEYS | _CLASS_KEYS | {"path", "train_path", "test_path", "test_fraction"},
    "multi": {"scenario", "name", "num_tasks", "data_seed", "tasks"},
}


def scenario_kind(cfg: Mapping[str, Any]) -> str:
    """The ``scenario`` value (``synthetic`` when absent), checked against the known kinds."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"data config must be a mapping of keys, got {type(cfg).__name__}")
    kind = cfg.get("scenario", "synthetic")
    if kind not in SCENARIO_KEYS:
        raise ConfigError(f"unknown scenario {kind!r}; choose one of {', '.join(SCENARIO_KEYS)}")
    return kind


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Check keys (recursively for ``multi``) without reading any dataset: fails fast on typos."""
    kind = scenario_kind(cfg)
    check_keys(cfg, SCENARIO_KEYS[kind], f"{kind} scenario")
    if kind == "multi":
        for sub in _sub_scenarios(cfg):
            validate_config(sub)


def build_tasks(data_cfg: Mapping[str, Any], image_size: int, seed: int) -> list[Task]:
    """All tasks of the scenario described by ``data_cfg``, images at ``image_size × image_size``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ConfigError(f"image_size must be an integer ≥ 8, got {image_size!r}")
    validate_config(data_cfg)
    tasks = _build(data_cfg, image_size, int(seed), label_offset=0, prefix=None)
    report_skipped_images([(path, dataset.skip_reasons[path]) for task in tasks
                           for dataset in (task.train, task.test) for path in dataset.skipped])
    return tasks


def _data_seed(cfg: Mapping[str, Any], seed: int, where: str) -> int:
    value = cfg.get("data_seed")
    if value is None:
        return seed
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: data_seed must be an integer or null, got {value!r}")
    return value


def _build(cfg: Mapping[str, Any], image_size: int, seed: int, label_offset: int, prefix: str | None) -> list[Task]:
    kind = scenario_kind(cfg)
    where = f"{kind} scenario"
    seed = _data_seed(cfg, seed, where)
    prefix = str(cfg.get("name") or prefix or kind)
    if kind == "synthetic":
        return build_synthetic_tasks(cfg, image_size, seed, label_offset, prefix)
    if kind == "multi":
        return _build_multi(cfg, image_size, seed, label_offset, prefix)
    records = _load_records(kind, cfg, where)
    return tasks_from_records(records, cfg, image_size=image_size, seed=seed, label_offset=label_offset,
                              prefix=prefix, where=where)


def _root(cfg: Mapping[str, Any], where: str) -> Path:
    root = cfg.get("root")
    if not root:
        raise ConfigError(f"{where}: set 'root' to the dataset folder")
    return Path(str(root)).expanduser()


def _load_records(kind: str, cfg: Mapping[str, Any], where: str) -> list[Record]:
    # with on_bad_image: skip, missing files are dropped (and reported) by the datasets instead
    require = get_choice(cfg, "on_bad_image", ON_BAD_IMAGE, "error", where) == "error"
    if kind == "pascal_sentence":
        return load_pascal_sentence(_root(cfg, where))
    if kind == "wikipedia":
        return load_wikipedia(_root(cfg, where), max_words=get_int(cfg, "max_words", 64, where, minimum=1),
                              require_images=require)
    if kind == "karpathy":
        root = _root(cfg, where)
        annotations = cfg.get("annotations")
        if not annotations:
            raise ConfigError(f"{where}: set 'annotations' to the Karpathy-split JSON (e.g. dataset_flickr30k.json)")
        annotations = Path(str(annotations)).expanduser()
        train_splits = cfg.get("train_splits", ["train", "restval"])
        if isinstance(train_splits, str):
            train_splits = [train_splits]
        return load_karpathy(annotations if annotations.is_absolute() else root / annotations, root,
                             train_splits=tuple(train_splits), test_split=str(cfg.get("test_split", "test")),
                             require_images=require)
    if kind == "csv":
        single, train_path, test_path = cfg.get("path"), cfg.get("train_path"), cfg.get("test_path")
        if single and not (train_path or test_path):
            return load_table(Path(str(single)).expanduser(), require_images=require)
        if train_path and test_path and not single:
            return (load_table(Path(str(train_path)).expanduser(), split="train", require_images=require)
                    + load_table(Path(str(test_path)).expanduser(), split="test", require_images=require))
        raise ConfigError(f"{where}: set either 'path' (one file, split by test_fraction or its split column) "
                          f"or both 'train_path' and 'test_path'")
    raise AssertionError(kind)


def _assign_splits(records: Sequence[Record], test_fraction: float, seed: int) -> None:
    """Give unsplit records a train/test split: per class (so every class is in both), by seeded ratio."""
    by_class: dict[str | None, list[Record]] = {}
    for record in records:
        if record.split is None:
            by_class.setdefault(record.class_name, []).append(record)
    for class_name, members in sorted(by_class.items(), key=lambda item: str(item[0])):
        members.sort(key=lambda r: str(r.image))  # the split must not depend on listing order
        train, test = split_train_test(len(members), test_fraction,
                                       rng_for(seed, "train-test", class_name or "<unlabelled>"))
        for index in train:
            members[index].split = "train"
        for index in test:
            members[index].split = "test"


def _cap(records: list[Record], limit: int | None, seed: int, stream: str) -> list[Record]:
    """At most ``limit`` records, a seeded subset kept in its original order."""
    if limit is None or len(records) <= limit:
        return records
    keep = sorted(rng_for(seed, stream).permutation(len(records))[:limit].tolist())
    return [records[i] for i in keep]


def tasks_from_records(records: Sequence[Record], cfg: Mapping[str, Any], *, image_size: int, seed: int,
                       label_offset: int, prefix: str, where: str) -> list[Task]:
    """Split records into tasks (class-disjoint when labelled, random disjoint chunks otherwise)."""
    records = list(records)
    _assign_splits(records, get_fraction(cfg, "test_fraction", 0.2, where), seed)
    max_train = cfg.get("max_train_per_task")
    max_test = cfg.get("max_test_per_task")
    max_train = None if max_train is None else get_int(cfg, "max_train_per_task", 0, where, minimum=1)
    max_test = None if max_test is None else get_int(cfg, "max_test_per_task", 0, where, minimum=1)
    preload = get_bool(cfg, "preload", False, where)
    augment = get_augment(cfg, FILE_AUGMENT, where)
    on_bad_image = get_choice(cfg, "on_bad_image", ON_BAD_IMAGE, "error", where)
    labelled = records[0].class_name is not None

    groups: list[tuple[list[str], list[Record], list[Record]]] = []  # class names, train, test
    if labelled:
        class_groups = split_classes(sorted({r.class_name for r in records}), _num_tasks(cfg, where),
                                     cfg.get("classes_per_task"), seed,
                                     shuffle=get_bool(cfg, "shuffle_classes", True, where), where=where)
        for names in class_groups:
            order = {name: position for position, name in enumerate(names)}
            members = sorted((r for r in records if r.class_name in order),
                             key=lambda r: (order[r.class_name], str(r.image)))
            groups.append((names, [r for r in members if r.split == "train"],
                           [r for r in members if r.split == "test"]))
    else:
        if cfg.get("classes_per_task") is not None:
            raise ConfigError(f"{where}: classes_per_task needs class labels, which this dataset does not have")
        num_tasks = _num_tasks(cfg, where) or 1
        chunks = {}
        for split in ("train", "test"):
            members = [r for r in records if r.split == split]
            order = rng_for(seed, "chunks", split).permutation(len(members))
            if len(members) < num_tasks:
                raise ConfigError(f"{where}: {len(members)} {split} images cannot fill {num_tasks} tasks")
            chunks[split] = [[members[i] for i in sorted(order[c.start:c.stop].tolist())]
                             for c in even_chunks(len(members), num_tasks)]
        groups = [([], train, test) for train, test in zip(chunks["train"], chunks["test"])]

    tasks = []
    for task_index, (names, train, test) in enumerate(groups):
        name = f"{prefix}/task{task_index}"
        train = _cap(train, max_train, seed, f"{name}-train")
        test = _cap(test, max_test, seed, f"{name}-test")
        label_of = {class_name: label_offset + k for k, class_name in enumerate(names)}

        def dataset(members: list[Record], train_split: bool) -> ImageTextDataset:
            return ImageTextDataset([r.image for r in members], [r.captions for r in members],
                                    [label_of.get(r.class_name, -1) for r in members], image_size=image_size,
                                    train=train_split, seed=seed, preload=preload,
                                    augment=augment if train_split else None, on_bad_image=on_bad_image,
                                    report_skipped=False)  # build_tasks reports all skipped files at once

        train_set, test_set = dataset(train, True), dataset(test, False)
        if not len(train_set) or not len(test_set):
            dropped = len(train_set.skipped) + len(test_set.skipped)
            raise ConfigError(f"{where}: task {name} ({', '.join(names) or 'unlabelled'}) has "
                              f"{len(train_set)} train and {len(test_set)} test images"
                              + (f" after skipping {dropped} bad image file(s)" if dropped else "")
                              + "; both must be non-empty")
        tasks.append(Task(name=name, train=train_set, test=test_set, class_names=list(names),
                          class_ids=[label_of[n] for n in names]))
        label_offset += len(names)
    return tasks


def _num_tasks(cfg: Mapping[str, Any], where: str) -> int | None:
    if cfg.get("num_tasks") is None:
        return None
    return get_int(cfg, "num_tasks", 1, where, minimum=1)


def _sub_scenarios(cfg: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    subs = cfg.get("tasks")
    if not isinstance(subs, list) or not subs or not all(isinstance(sub, Mapping) for sub in subs):
        raise ConfigError("multi scenario: 'tasks' must be a non-empty list of sub-scenario mappings")
    for sub in subs:
        if sub.get("scenario", "synthetic") == "multi":
            raise ConfigError("multi scenario: a sub-scenario cannot itself be 'multi'")
    return subs


def _build_multi(cfg: Mapping[str, Any], image_size: int, seed: int, label_offset: int, prefix: str) -> list[Task]:
    """Sub-scenarios one after another; labels continue across them, task names are prefixed by source."""
    subs = _sub_scenarios(cfg)
    kinds = [scenario_kind(sub) for sub in subs]
    tasks: list[Task] = []
    for index, (sub, kind) in enumerate(zip(subs, kinds)):
        # two sub-scenarios of the same kind would give equal task names: number them
        sub_prefix = f"{prefix}/{kind}{index}" if kinds.count(kind) > 1 else f"{prefix}/{kind}"
        sub_tasks = _build(sub, image_size, seed, label_offset, sub_prefix)
        label_offset += sum(len(task.class_ids) for task in sub_tasks)
        tasks.extend(sub_tasks)
    expected = cfg.get("num_tasks")
    if expected is not None and expected != len(tasks):
        raise ConfigError(f"multi scenario: num_tasks={expected} but the sub-scenarios give {len(tasks)} tasks")
    return tasks
