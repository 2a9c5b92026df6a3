"""Datasets (uint8 arrays in one global index space), reference recipes, splits, augmentation."""

from jaxmu.data import augment, splits
from jaxmu.data.sources import Dataset, load, recipe

__all__ = ["Dataset", "augment", "load", "recipe", "splits"]
