"""Datasets: bundled offline datasets, user tensor files / image folders, calibration subsets.

Example:
    >>> from thrifty.data import load_dataset, calibration_subset
    >>> s = load_dataset("digits", seed=0)
    >>> calib = calibration_subset(s.train, per_class=10)
    >>> len(calib)
    100
"""
from .builtin import DATASETS, MNIST1D_NUM_SAMPLES, load_dataset
from .common import Splits, calibration_subset, labels_of, stratified_split
from .text import GROUPS as TEXT_GROUPS
from .text import load_texts, text_corpus
from .user import IMAGE_EXTENSIONS, load_image_folder, load_tensors

__all__ = [
    "Splits", "load_dataset", "load_texts", "text_corpus", "load_tensors", "load_image_folder",
    "calibration_subset", "stratified_split", "labels_of", "DATASETS", "MNIST1D_NUM_SAMPLES",
    "TEXT_GROUPS", "IMAGE_EXTENSIONS",
]
