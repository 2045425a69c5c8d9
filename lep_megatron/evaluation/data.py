"""Read the public Darumeru datasets from local files in the layout the hub repositories have.

`data_dir/<hub repo id>/` holds a repository as `huggingface-cli download` writes it; a split is
found as `[data/]<config>/<split>.jsonl`, `<split>-*.parquet`, `<split>/*.parquet` (the hub's
auto-converted layout) and the like. See README.md for the fetch command. Nothing is downloaded.
"""
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from lep_megatron.common.io import UserInputError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


@dataclass(frozen=True)
class HubDataset:
    repo_id: str
    """The hub repository; also the folder under data_dir."""

    def root(self, data_dir: Path) -> Path:
        return Path(data_dir) / self.repo_id


DARUMERU = HubDataset("RefalMachine/darumeru")
MMLU_RU = HubDataset("NLPCoreTeam/mmlu_ru")
RUCOLA = HubDataset("RussianNLP/rucola")
TREEWAY = HubDataset("dichspace/daru_treeway_eval")
ALL_DATASETS = (DARUMERU, MMLU_RU, RUCOLA, TREEWAY)

FETCH_HINT = "fetch the datasets on a machine with hub access as lep_megatron/evaluation/README.md shows"


def split_files(root: Path, config: Optional[str], split: str) -> List[Path]:
    """Files of one split, in the first folder layout that has them; [] if none."""
    folders = [root / config, root / "data" / config] if config else [root, root / "data", root / "default"]
    for folder in folders:
        found = [*folder.glob(f"{split}.*"), *folder.glob(f"{split}-*"), *(folder / split).glob("*")]
        found = sorted(p for p in found if p.is_file() and p.name.endswith(SUFFIXES))
        if found:
            return found
    return []


def read_records(path: Path) -> List[Dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # lazy: JSONL-only users need no pyarrow

        return pq.read_table(path).to_pylist()
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_split(dataset: HubDataset, data_dir: Path, config: Optional[str], split: str, task: str) -> List[Dict]:
    """All records of a split; a UserInputError naming the task and the folder if absent."""
    root = dataset.root(data_dir)
    files = split_files(root, config, split)
    if not files:
        where = root / config if config else root
        raise UserInputError(
            f"task {task}: no '{split}' split of {dataset.repo_id}"
            f"{f' (config {config})' if config else ''} under {where} "
            f"(looked for {split}.jsonl/.json/.parquet/.csv, {split}-*.*, {split}/*.*, also under data/); "
            f"set data_dir or {FETCH_HINT}"
        )
    return [record for f in files for record in read_records(f)]
