"""Datasets, SID catalog, trie and the shared prompt template (torch-free).

``load_dataset(path, index=None, fmt="auto")`` reads the LC-Rec/LETTER json or the MiniOneRec csv
layout into a ``Dataset`` (users, item sequences, item texts, ``Catalog`` with its ``Trie``);
``Dataset.splits(max_history)`` gives the train/valid/test samples. ``write_synthetic`` writes a
small seeded synthetic dataset for tests and demos. The prompt lives in :mod:`pauserec.prompt`.
"""

from pauserec.data.catalog import Catalog
from pauserec.data.datasets import Dataset, ItemText, load_dataset
from pauserec.data.splits import Splits, SplitSamples
from pauserec.data.synthetic import write_synthetic
from pauserec.data.trie import Trie

__all__ = [
    "Catalog",
    "Dataset",
    "ItemText",
    "SplitSamples",
    "Splits",
    "Trie",
    "load_dataset",
    "write_synthetic",
]
