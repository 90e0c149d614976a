"""Procedurally generated captioned images: the embedded default scenario (no files, no downloads).

Each image shows one object described by five attributes — shape, colour, size, position (3×3 grid cell),
texture — on a plain or noisy dark background, sometimes with a small grey distractor object that no caption
mentions. A class is a combination of the ``class_by`` attributes (default: a coloured shape such as
"red circle"); the others are nuisance attributes. Every class holds out a fraction of its nuisance
combinations from training: its test items use only held-out combinations, so retrieval on the test split
measures generalisation to unseen (size, position, texture) combinations of attributes seen separately.

Tasks reuse colours and shapes in new pairings (the default 2 shapes × 2 colours per task share a colour with
the neighbouring task), and every task uses all sizes, positions and textures, so training on a new task
moves the same features earlier tasks rely on.

Determinism: every sample is drawn from its own generator seeded by ``(seed, class, split, index)`` and rendered
with single-threaded numpy arithmetic, so images (``uint8``) and captions are bitwise identical for a given seed,
whatever the thread count or the order of generation. Attributes and captions do not depend on ``image_size``.

No train augmentation by default (``augment`` absent or null): captions name positions ("top left"), which a
flip would contradict and a strong crop could cut off; a mild crop can be asked for with ``augment``.
"""
from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import ConfigError, check_keys, get_augment, get_fraction, get_int
from .dataset import ImageTextDataset, Task
from .images import Augment
from .splits import rng_for, split_classes

# ---------------------------------------------------------------------------------------------- vocabulary
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "crescent")
COLOURS = {  # well separated hues, none of them grey (grey is reserved for distractors and backgrounds)
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (1.00, 0.50, 0.75),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "medium", "large")
SIZE_RADIUS = (0.11, 0.15, 0.20)  # object radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
CELL_CENTRES = (0.22, 0.5, 0.78)  # not 1/6, 1/2, 5/6: keeps a large object (almost) inside the image
TEXTURES = ("solid", "striped", "dotted", "checkered")
ATTRIBUTES = {"shape": SHAPES, "colour": COLOUR_NAMES, "size": SIZES, "position": POSITIONS, "texture": TEXTURES}

TEXTURE_PERIOD = 0.12  # pattern period as a fraction of the image side (≈ 4 pixels at 32)
PATTERN_DARKNESS = 0.4  # stripes/dots/checks are the object colour scaled by this factor
DISTRACTOR_RADIUS = 0.07
NOISE_STD = 0.06
POSITION_JITTER = 0.03

# ------------------------------------------------------------------------------------------------ captions
_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "mid-sized"), "large": ("large", "big")}
_SIZE_NOUNS = {"small": "small", "medium": "medium", "large": "large"}
_POSITION_PHRASES = {
    "top left": ("in the top left", "in the upper left corner", "at the top left"),
    "top": ("at the top", "in the top middle", "near the top edge"),
    "top right": ("in the top right", "in the upper right corner", "at the top right"),
    "left": ("on the left", "at the left side", "in the middle of the left side"),
    "center": ("in the center", "in the middle", "at the center of the image"),
    "right": ("on the right", "at the right side", "in the middle of the right side"),
    "bottom left": ("in the bottom left", "in the lower left corner", "at the bottom left"),
    "bottom": ("at the bottom", "in the bottom middle", "near the bottom edge"),
    "bottom right": ("in the bottom right", "in the lower right corner", "at the bottom right"),
}
_TEXTURE_ADJECTIVES = {"solid": ("solid", "plain"), "striped": ("striped",), "dotted": ("dotted", "spotted"),
                       "checkered": ("checkered", "chequered")}
_TEXTURE_PHRASES = {"solid": ("in a solid color", "with no pattern"),
                    "striped": ("with stripes", "with diagonal stripes"),
                    "dotted": ("with dots", "covered in dots"),
                    "checkered": ("with a checkerboard pattern", "with checks")}
_BACKGROUND_PHRASES = {False: ("on a plain dark background", "on a dark background"),
                       True: ("on a noisy background", "on a grainy background")}
TEMPLATES = (
    "{a} {size} {colour} {texture} {shape} {where}",
    "{where_label}: a {colour} {shape} {texture_phrase}, {size}",
    "there is {a} {size} {texture} {shape} {where}, and it is {colour}",
    "{a} {colour} {shape} {texture_phrase} {where} {background}",
    "{size} {colour} {shape}, {texture}, {where}",
    "this picture shows {a} {texture} {colour} {shape} of {size_noun} size {where}",
)


_ARTICLE_SLOT = re.compile(r"\x00 (\w)")  # the article placeholder and the first letter of the next word


def _article(match: re.Match) -> str:
    letter = match.group(1)
    return ("an " if letter in "aeiou" else "a ") + letter


def make_captions(attrs: Mapping[str, str], noisy_background: bool, rng: np.random.Generator,
                  count: int) -> list[str]:
    """``count`` captions, each from a different template, with synonyms drawn from ``rng``.

    Shape and colour always appear under their canonical names (``attrs['shape']``, ``attrs['colour']``), so a
    caption always names its class.
    """
    def pick(options: Sequence[str]) -> str:
        return options[int(rng.integers(len(options)))]

    captions = []
    for template_index in rng.permutation(len(TEMPLATES))[:count]:
        words = {
            "size": pick(_SIZE_WORDS[attrs["size"]]),
            "size_noun": _SIZE_NOUNS[attrs["size"]],
            "colour": attrs["colour"],
            "shape": attrs["shape"],
            "texture": pick(_TEXTURE_ADJECTIVES[attrs["texture"]]),
            "texture_phrase": pick(_TEXTURE_PHRASES[attrs["texture"]]),
            "where": pick(_POSITION_PHRASES[attrs["position"]]),
            "where_label": attrs["position"].replace(" ", "-"),
            "background": pick(_BACKGROUND_PHRASES[noisy_background]),
        }
        text = TEMPLATES[template_index].format(a="\x00", **words)
        # "a" or "an", agreeing with the word that follows the article in this template
        captions.append(_ARTICLE_SLOT.sub(_article, text))
    return captions


# ----------------------------------------------------------------------------------------------- rendering
def _star_vertices(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_POLYGONS = {
    "triangle": np.array([[0.0, -1.0], [0.95, 0.72], [-0.95, 0.72]]),  # y grows downwards: apex at the top
    "star": _star_vertices(),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even–odd crossing test for points ``(u, v)`` (broadcast together) against a closed polygon."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, np.roll(vertices, -1, axis=0)):
        if y1 == y2:  # a horizontal edge is never crossed by a horizontal ray
            continue
        crosses = (y1 > v) != (y2 > v)
        x_cross = x1 + (v - y1) * ((x2 - x1) / (y2 - y1))
        inside ^= crosses & (u < x_cross)
    return inside


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` at offsets ``(u, v)`` from its centre, in units of its radius."""
    if shape == "circle":
        return u * u + v * v <= 0.9 ** 2
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= 0.95 ** 2) & (d2 >= 0.5 ** 2)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.32) & (av <= 0.95)) | ((av <= 0.32) & (au <= 0.95))
    if shape == "crescent":
        return (u * u + v * v <= 0.95 ** 2) & ((u - 0.45) ** 2 + (v + 0.15) ** 2 > 0.8 ** 2)
    if shape in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """Where the pattern is dark, at offsets ``(du, dv)`` from the object centre (image-side units)."""
    u, v = du / TEXTURE_PERIOD, dv / TEXTURE_PERIOD
    if texture == "solid":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if texture == "striped":
        return np.floor(u + v) % 2 == 1
    if texture == "checkered":
        return (np.floor(u) + np.floor(v)) % 2 == 1
    if texture == "dotted":
        return (u - np.floor(u) - 0.5) ** 2 + (v - np.floor(v) - 0.5) ** 2 < 0.28 ** 2
    raise ValueError(f"unknown texture {texture!r}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object to paint: centre and radius in image-side units, RGB colour in [0, 1]."""

    shape: str
    centre_x: float
    centre_y: float
    radius: float
    rgb: tuple[float, float, float]
    texture: str = "solid"


@dataclass(frozen=True)
class SampleSpec:
    """Everything drawn for one sample; independent of the image size it is rendered at."""

    attrs: dict  # shape, colour, size, position, texture (the words)
    objects: tuple[ObjectSpec, ...]  # painted in order (distractor first, main object on top)
    background_level: float
    noisy_background: bool
    noise_seed: int
    captions: tuple[str, ...]


def _paint(canvas: np.ndarray, grid: np.ndarray, obj: ObjectSpec) -> None:
    """Paint ``obj`` into ``canvas`` ``[n, n, 3]`` (float, in place); ``grid`` holds the n pixel centres."""
    n = canvas.shape[0]
    # only the object's bounding box is evaluated: keeps 224-pixel rendering cheap
    lo_x = max(0, int(np.floor((obj.centre_x - obj.radius) * n)))
    hi_x = min(n, int(np.ceil((obj.centre_x + obj.radius) * n)) + 1)
    lo_y = max(0, int(np.floor((obj.centre_y - obj.radius) * n)))
    hi_y = min(n, int(np.ceil((obj.centre_y + obj.radius) * n)) + 1)
    du = grid[None, lo_x:hi_x] - obj.centre_x  # [1, w]
    dv = grid[lo_y:hi_y, None] - obj.centre_y  # [h, 1]
    inside = shape_mask(obj.shape, du / obj.radius, dv / obj.radius)
    dark = texture_mask(obj.texture, du, dv)
    rgb = np.asarray(obj.rgb)
    colour = np.where(dark[..., None], rgb * PATTERN_DARKNESS, rgb)  # [h, w, 3]
    region = canvas[lo_y:hi_y, lo_x:hi_x]
    region[inside] = colour[inside]


def supersampling(image_size: int) -> int:
    """Sub-pixels per pixel side used for anti-aliasing (fewer at large sizes, where edges are already fine)."""
    return 4 if image_size <= 64 else 2 if image_size <= 128 else 1


def render(spec: SampleSpec, image_size: int) -> np.ndarray:
    """Render ``spec`` to ``uint8 [3, S, S]`` (S = image_size)."""
    factor = supersampling(image_size)
    n = image_size * factor
    grid = (np.arange(n) + 0.5) / n
    canvas = np.full((n, n, 3), spec.background_level)
    for obj in spec.objects:
        _paint(canvas, grid, obj)
    image = canvas.reshape(image_size, factor, image_size, factor, 3).mean(axis=(1, 3))
    if spec.noisy_background:
        # luminance noise drawn at the output resolution from the sample's own stream (so the other draws
        # do not depend on image_size); it covers the object too, as sensor noise would
        noise = np.random.default_rng(spec.noise_seed).normal(0.0, NOISE_STD, (image_size, image_size, 1))
        image = image + noise
    image = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def draw_sample(attrs: dict, rng: np.random.Generator, captions_per_image: int, distractor_prob: float,
                noise_prob: float) -> SampleSpec:
    """Draw the continuous details (jitter, colour shade, background, distractor, captions) of one sample."""
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    jitter = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    base = np.asarray(COLOURS[attrs["colour"]])
    shade = np.clip(base * rng.uniform(0.85, 1.05) + rng.uniform(-0.04, 0.04, size=3), 0.0, 1.0)
    main = ObjectSpec(shape=attrs["shape"], centre_x=CELL_CENTRES[col] + jitter[0],
                      centre_y=CELL_CENTRES[row] + jitter[1], radius=SIZE_RADIUS[SIZES.index(attrs["size"])],
                      rgb=tuple(float(c) for c in shade), texture=attrs["texture"])
    background_level = float(rng.uniform(0.04, 0.28))
    noisy = bool(rng.random() < noise_prob)
    noise_seed = int(rng.integers(1 << 63))
    objects: tuple[ObjectSpec, ...] = (main,)
    if rng.random() < distractor_prob:
        other_cells = [cell for cell in range(9) if cell != row * 3 + col]
        cell = other_cells[int(rng.integers(len(other_cells)))]
        grey = float(rng.uniform(0.5, 0.75))
        offset = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        distractor = ObjectSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))],
                                centre_x=CELL_CENTRES[cell % 3] + offset[0],
                                centre_y=CELL_CENTRES[cell // 3] + offset[1],
                                radius=DISTRACTOR_RADIUS, rgb=(grey, grey, grey))
        objects = (distractor, main)
    captions = make_captions(attrs, noisy, rng, captions_per_image)
    return SampleSpec(attrs=dict(attrs), objects=objects, background_level=background_level,
                      noisy_background=noisy, noise_seed=noise_seed, captions=tuple(captions))


# --------------------------------------------------------------------------------------------- the scenario
SYNTHETIC_KEYS = {"scenario", "name", "num_tasks", "classes_per_task", "class_by", "task_grid", "train_per_class",
                  "test_per_class", "heldout_fraction", "captions_per_image", "distractor_prob", "noise_prob",
                  "data_seed", "augment"}


@dataclass(frozen=True)
class SyntheticOptions:
    """The synthetic scenario's settings (see ``configs/scenarios/synthetic3.yaml`` for each key)."""

    num_tasks: int = 3
    classes_per_task: Any = None
    class_by: tuple[str, ...] = ("shape", "colour")
    task_grid: tuple[int, int] = (2, 2)
    train_per_class: int = 75
    test_per_class: int = 20
    heldout_fraction: float = 0.25
    captions_per_image: int = 3
    distractor_prob: float = 0.3
    noise_prob: float = 0.5
    augment: Augment | None = None  # train augmentation (none by default); generated images do not depend on it

    @property
    def nuisance(self) -> tuple[str, ...]:
        return tuple(axis for axis in ATTRIBUTES if axis not in self.class_by)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], where: str = "synthetic scenario") -> SyntheticOptions:
        check_keys(cfg, SYNTHETIC_KEYS, where)
        class_by = cfg.get("class_by", ["shape", "colour"])
        if isinstance(class_by, str):
            class_by = [class_by]
        class_by = tuple("colour" if axis == "color" else axis for axis in class_by)
        if not class_by or set(class_by) - {"shape", "colour"} or len(set(class_by)) != len(class_by):
            raise ConfigError(f"{where}: class_by must be [shape, colour], [shape] or [colour], got {class_by!r}")
        class_by = tuple(axis for axis in ("shape", "colour") if axis in class_by)  # canonical order
        grid = cfg.get("task_grid", [2, 2])
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
            raise ConfigError(f"{where}: task_grid must be [shapes per task, colours per task], got {grid!r}")
        options = cls(
            num_tasks=get_int(cfg, "num_tasks", 3, where, minimum=1),
            classes_per_task=cfg.get("classes_per_task"),
            class_by=class_by,
            task_grid=(int(grid[0]), int(grid[1])),
            train_per_class=get_int(cfg, "train_per_class", 75, where, minimum=1),
            test_per_class=get_int(cfg, "test_per_class", 20, where, minimum=1),
            heldout_fraction=get_fraction(cfg, "heldout_fraction", 0.25, where),
            captions_per_image=get_int(cfg, "captions_per_image", 3, where, minimum=1),
            distractor_prob=get_fraction(cfg, "distractor_prob", 0.3, where),
            noise_prob=get_fraction(cfg, "noise_prob", 0.5, where),
            augment=get_augment(cfg, None, where),
        )
        if options.captions_per_image > len(TEMPLATES):
            raise ConfigError(f"{where}: captions_per_image must be ≤ {len(TEMPLATES)} (one per template)")
        if not 0.0 < options.heldout_fraction < 1.0:
            raise ConfigError(f"{where}: heldout_fraction must be strictly between 0 and 1")
        return options


def class_name(key: Mapping[str, str], class_by: Sequence[str]) -> str:
    """``"red circle"`` for ``class_by=(shape, colour)``, ``"circle"`` or ``"red"`` for one attribute."""
    return " ".join(key[axis] for axis in ("colour", "shape") if axis in class_by)


def all_classes(class_by: Sequence[str]) -> dict[str, dict[str, str]]:
    """Every class name of ``class_by`` → its attribute values, in a fixed order (colour-major)."""
    axes = [axis for axis in ("colour", "shape") if axis in class_by]
    classes = {}
    for values in itertools.product(*(ATTRIBUTES[axis] for axis in axes)):
        key = dict(zip(axes, values))
        classes[class_name(key, class_by)] = key
    return classes


def grid_design(num_tasks: int, task_grid: tuple[int, int], seed: int) -> list[list[str]]:
    """Default class groups for ``class_by=(shape, colour)``: task ``t`` crosses ``gs`` shapes × ``gc`` colours.

    Shapes advance by ``gs`` per task and colours by one, over seeded permutations of the vocabulary: so every
    task needs both attributes to tell its classes apart, consecutive tasks share colours, and shapes recur
    once the vocabulary wraps (5 tasks) — always in new (shape, colour) pairings.
    """
    shapes_per_task, colours_per_task = task_grid
    if shapes_per_task > len(SHAPES) or colours_per_task > len(COLOUR_NAMES):
        raise ConfigError(f"task_grid {list(task_grid)} exceeds the {len(SHAPES)} shapes × "
                          f"{len(COLOUR_NAMES)} colours available")
    rng = rng_for(seed, "synthetic-design")
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colours = [COLOUR_NAMES[i] for i in rng.permutation(len(COLOUR_NAMES))]
    groups, used = [], set()
    for task in range(num_tasks):
        task_shapes = [shapes[(shapes_per_task * task + k) % len(shapes)] for k in range(shapes_per_task)]
        task_colours = [colours[(task + k) % len(colours)] for k in range(colours_per_task)]
        names = [f"{colour} {shape}" for shape in task_shapes for colour in task_colours]
        if used.intersection(names) or len(set(names)) != len(names):
            raise ConfigError(f"task_grid {list(task_grid)} cannot give {num_tasks} class-disjoint tasks "
                              f"(task {task} repeats a class); use fewer tasks or explicit classes_per_task")
        used.update(names)
        groups.append(names)
    return groups


def task_classes(options: SyntheticOptions, seed: int) -> list[list[str]]:
    """Class names per task, following ``classes_per_task`` (null: the grid design or an even split)."""
    if options.classes_per_task is None and options.class_by == ("shape", "colour"):
        return grid_design(options.num_tasks, options.task_grid, seed)
    num_tasks = None if isinstance(options.classes_per_task, (list, tuple)) else options.num_tasks
    return split_classes(list(all_classes(options.class_by)), num_tasks, options.classes_per_task, seed,
                         shuffle=True, where="synthetic scenario")


def heldout_split(nuisance: Sequence[str], fraction: float, rng: np.random.Generator
                  ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Split all nuisance combinations into (train, held-out) lists of value-index tuples.

    The held-out draw is repeated (deterministically) until every single value of every nuisance attribute
    still occurs in training, so test items are new *combinations* of seen values, never unseen values.
    """
    combos = list(itertools.product(*(range(len(ATTRIBUTES[axis])) for axis in nuisance)))
    num_heldout = min(len(combos) - 1, max(1, round(fraction * len(combos))))
    for _ in range(1000):
        order = rng.permutation(len(combos))
        heldout = [combos[i] for i in order[:num_heldout]]
        train = [combos[i] for i in order[num_heldout:]]
        covered = all({combo[k] for combo in train} == set(range(len(ATTRIBUTES[axis])))
                      for k, axis in enumerate(nuisance))
        if covered:
            return train, heldout
    raise ConfigError(f"heldout_fraction={fraction} leaves some attribute value out of training; lower it")


def generate_class(name: str, key: Mapping[str, str], options: SyntheticOptions, seed: int, image_size: int
                   ) -> dict[str, tuple[list[SampleSpec], np.ndarray]]:
    """Specs and rendered images (``uint8 [n, 3, S, S]``) of one class, for ``"train"`` and ``"test"``."""
    nuisance = options.nuisance
    train_combos, heldout_combos = heldout_split(nuisance, options.heldout_fraction,
                                                 rng_for(seed, "synthetic-heldout", name))
    result = {}
    for split, combos, count in (("train", train_combos, options.train_per_class),
                                 ("test", heldout_combos, options.test_per_class)):
        # cycle through a shuffled list of the split's combinations: balanced coverage, distinct ones first
        order = rng_for(seed, "synthetic-order", name, split).permutation(len(combos))
        specs, images = [], []
        for index in range(count):
            combo = combos[order[index % len(combos)]]
            attrs = dict(key)
            attrs.update({axis: ATTRIBUTES[axis][value] for axis, value in zip(nuisance, combo)})
            spec = draw_sample(attrs, rng_for(seed, "synthetic-sample", name, split, index),
                               options.captions_per_image, options.distractor_prob, options.noise_prob)
            specs.append(spec)
            images.append(render(spec, image_size))
        result[split] = (specs, np.stack(images))
    return result


def build_synthetic_tasks(cfg: Mapping[str, Any], image_size: int, seed: int, label_offset: int = 0,
                          prefix: str = "synthetic") -> list[Task]:
    """The synthetic scenario's tasks; labels start at ``label_offset`` and are contiguous per task."""
    options = SyntheticOptions.from_config(cfg)
    classes = all_classes(options.class_by)
    tasks = []
    for task_index, names in enumerate(task_classes(options, seed)):
        splits = {"train": ([], [], []), "test": ([], [], [])}  # images, captions, labels
        for local, name in enumerate(names):
            generated = generate_class(name, classes[name], options, seed, image_size)
            for split, (specs, images) in generated.items():
                splits[split][0].append(images)
                splits[split][1].extend(list(spec.captions) for spec in specs)
                splits[split][2].extend([label_offset + local] * len(specs))
        datasets = {
            split: ImageTextDataset(torch.from_numpy(np.concatenate(images)), captions, labels,
                                    image_size=image_size, train=split == "train", seed=seed,
                                    augment=options.augment if split == "train" else None)
            for split, (images, captions, labels) in splits.items()
        }
        tasks.append(Task(name=f"{prefix}/task{task_index}", train=datasets["train"], test=datasets["test"],
                          class_names=list(names),
                          class_ids=list(range(label_offset, label_offset + len(names)))))
        label_offset += len(names)
    return tasks
