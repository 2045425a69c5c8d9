"""The LEP model's tokenizer: the donor's vocabulary with the instruct model's added (chat and
special) tokens, special-token map and chat template.

Each added token of the instruct model keeps the donor's id when the donor already has that
string (e.g. Llama-3's <|eot_id|>), else it is appended after the donor vocabulary. Either way its
embedding and head rows are copied from the instruct model (`instruct_rows`).
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from lep_megatron.common.io import UserInputError
from lep_megatron.tokenizer import vocab as V

SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                "additional_special_tokens", "extra_special_tokens", "chat_template")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def token_ids(spec: dict) -> Dict[str, int]:
    """string -> id over a tokenizer.json's model vocabulary and added tokens."""
    ids = V.model_vocab(spec)
    ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    return ids


@dataclass
class MergedTokenizer:
    """tokenizer.json + tokenizer_config.json of the output, and where its special rows come from."""

    spec: dict
    """The merged tokenizer.json."""
    config: dict
    """The merged tokenizer_config.json."""
    vocab_size: int
    """1 + the largest id of the merged tokenizer."""
    instruct_rows: Dict[int, int]
    """Output id -> instruct id for the instruct model's added tokens (their rows are copied)."""
    instruct_strings: Dict[int, str]
    """Instruct id -> string, over the instruct tokenizer (to carry ids of config files over)."""

    def from_instruct_id(self, instruct_id: int, source: str) -> int:
        """The output id of an instruct token id (e.g. eos_token_id of its config.json)."""
        ids = token_ids(self.spec)
        text = self.instruct_strings.get(instruct_id)
        if text not in ids:
            raise UserInputError(f"{source}: token id {instruct_id} ({text!r}) of the instruct model has no "
                                 "counterpart in the donor tokenizer; fix the instruct model's special tokens")
        return ids[text]

    def save(self, instruct_dir: Path, out_dir: Path) -> None:
        V.save_tokenizer_dir(out_dir, self.spec, self.config)
        inst = Path(instruct_dir)
        for name in CHAT_TEMPLATE_FILES + ("special_tokens_map.json",):
            if (inst / name).is_file():
                (Path(out_dir) / name).write_bytes((inst / name).read_bytes())

    def remap_ids(self, config: dict, source: str) -> dict:
        """A copy of an instruct config.json / generation_config.json with token ids in output ids."""
        out = dict(config)
        for key in ID_KEYS:
            value = config.get(key)
            if isinstance(value, list):
                out[key] = [self.from_instruct_id(v, f"{source}: {key}") for v in value]
            elif value is not None:
                out[key] = self.from_instruct_id(value, f"{source}: {key}")
        return out


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def merge_tokenizers(donor: dict, donor_dir: Path, inst: dict, instruct_dir: Path) -> MergedTokenizer:
    """Merge the tokenizer.json `donor` (of donor_dir) with `inst` (of instruct_dir)."""
    spec = dict(donor, added_tokens=list(donor.get("added_tokens", [])))  # only added_tokens changes
    ids = token_ids(donor)
    donor_added = {t["content"] for t in donor.get("added_tokens", [])}
    next_id = max(ids.values()) + 1
    instruct_rows = {}
    for token in inst.get("added_tokens", []):
        text = token["content"]
        if text in ids:
            out_id = ids[text]
        else:
            out_id, next_id = next_id, next_id + 1
        if text not in donor_added:
            spec["added_tokens"].append(dict(token, id=out_id))
        instruct_rows[out_id] = token["id"]
    spec["added_tokens"].sort(key=lambda t: t["id"])

    config = _read_json(Path(donor_dir) / "tokenizer_config.json") or V.tokenizer_config(spec, None, None)
    inst_config = _read_json(Path(instruct_dir) / "tokenizer_config.json") or {}
    for key in SPECIAL_KEYS:
        config.pop(key, None)
        if key in inst_config:
            config[key] = inst_config[key]
    config["added_tokens_decoder"] = V.tokenizer_config(spec, None, None)["added_tokens_decoder"]
    strings = {i: s for s, i in token_ids(inst).items()}
    return MergedTokenizer(spec, config, next_id, instruct_rows, strings)
