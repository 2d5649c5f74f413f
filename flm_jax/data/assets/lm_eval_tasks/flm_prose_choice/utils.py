"""Loads a task's local JSON/JSONL files, named relative to this folder (not to the working directory)."""

from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_local_json(data_files: dict[str, str], **_metadata) -> datasets.DatasetDict:
    """lm-eval calls this with the task's dataset_kwargs and its metadata (the model's arguments included)."""
    return datasets.load_dataset("json", data_files={split: str(HERE / name) for split, name in data_files.items()})
