"""Data layer: continual image–text retrieval scenarios.

``build_tasks(data_cfg, image_size, seed)`` turns a scenario configuration (``configs/scenarios/*.yaml``, read
with :func:`load_scenario`) into a list of :class:`Task`, each holding a train and a test
:class:`ImageTextDataset`. The default scenario is generated in memory (:mod:`cbd_fast.data.synthetic`); the
real datasets are read from local folders (:mod:`cbd_fast.data.formats`).
"""
from .config import ConfigError, load_scenario
from .dataset import ImageTextDataset, Task
from .formats import DatasetLayoutError
from .images import CLIP_MEAN, CLIP_STD, Augment, BadImageError
from .scenario import build_tasks, validate_config

__all__ = [
    "Augment",
    "BadImageError",
    "CLIP_MEAN",
    "CLIP_STD",
    "ConfigError",
    "DatasetLayoutError",
    "ImageTextDataset",
    "Task",
    "build_tasks",
    "load_scenario",
    "validate_config",
]
