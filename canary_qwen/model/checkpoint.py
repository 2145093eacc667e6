"""Find and read a Canary-Qwen checkpoint in the Hugging Face layout.

Layout (the real ``nvidia/canary-qwen-2.5b``): ``config.json`` (NeMo SALM config) and
``model.safetensors``. The Qwen3 config and tokenizer come from ``llm_backbone/config.json`` and
tokenizer files beside ``config.json`` when present (NeMo's offline layout), otherwise from the
hub repository named by ``pretrained_llm``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from .config import LlmConfig, SalmConfig, parse_llm_config, parse_salm_config, read_json
from .tokenizer import TOKENIZER_FILES

WEIGHTS_FILE = "model.safetensors"
LLM_BACKBONE_DIR = "llm_backbone"
HUB_PATTERNS = [
    "config.json",
    WEIGHTS_FILE,
    "tokenizer.json",
    "tokenizer_config.json",
    f"{LLM_BACKBONE_DIR}/config.json",
]


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    config: SalmConfig
    llm_config: LlmConfig
    tokenizer_dir: Path

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS_FILE


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_download(repo_id: str, patterns: list[str], what: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated: one clear message, on one line
        reason = " ".join(str(e).split())
        raise CheckpointError(
            f"cannot fetch {what} from the Hugging Face hub repo {repo_id!r} ({type(e).__name__}: {reason}). "
            "Offline, pass a local checkpoint directory instead."
        ) from None


def _first_dir_with(candidates, files) -> Path | None:
    return next((d for d in candidates if all((d / f).is_file() for f in files)), None)


def _llm_source(root: Path, salm: SalmConfig) -> tuple[Path, Path]:
    """Directories holding the Qwen3 config.json and the tokenizer files.

    Looked for beside the checkpoint first, then where the config points (a checkpoint NeMo saved
    after loading local files names those directories), then on the hub.
    """
    llm = Path(salm.pretrained_llm).expanduser()
    named_tokenizer = Path(salm.raw.get("tokenizer_path") or llm).expanduser()
    tokenizer_dir = _first_dir_with([root, named_tokenizer, llm], TOKENIZER_FILES)
    llm_dir = _first_dir_with([root / LLM_BACKBONE_DIR, llm], ["config.json"])
    if tokenizer_dir and llm_dir:
        return llm_dir, tokenizer_dir
    missing = ([] if tokenizer_dir else list(TOKENIZER_FILES)) + (
        [] if llm_dir else [f"{LLM_BACKBONE_DIR}/config.json"]
    )
    try:
        fetched = _hub_download(
            salm.pretrained_llm, ["config.json", *TOKENIZER_FILES], "the Qwen3 config and tokenizer"
        )
    except CheckpointError as e:
        raise CheckpointError(
            f"{root} lacks {', '.join(missing)} and {e} "
            f"For offline use put {', '.join(TOKENIZER_FILES)} and {LLM_BACKBONE_DIR}/config.json beside config.json."
        ) from None
    return llm_dir or fetched, tokenizer_dir or fetched


def resolve_checkpoint(source: str | os.PathLike) -> CheckpointFiles:
    """A local checkpoint directory, or a hub id such as ``nvidia/canary-qwen-2.5b``."""
    source = str(source)
    root = Path(source).expanduser()
    if not root.exists():
        if not HUB_ID.match(source):
            raise CheckpointError(f"checkpoint directory {source} does not exist")
        root = _hub_download(source, HUB_PATTERNS, "the checkpoint")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory (expected config.json + {WEIGHTS_FILE})")
    for name in ("config.json", WEIGHTS_FILE):
        if not (root / name).is_file():
            raise CheckpointError(f"{root} has no {name}: not a Canary-Qwen checkpoint directory")
    salm = parse_salm_config(read_json(root / "config.json"), str(root / "config.json"))
    llm_dir, tokenizer_dir = _llm_source(root, salm)
    llm = parse_llm_config(read_json(llm_dir / "config.json"), str(llm_dir / "config.json"))
    return CheckpointFiles(root=root, config=salm, llm_config=llm, tokenizer_dir=tokenizer_dir)


def llm_prefix(has_lora: bool) -> str:
    return "llm.base_model.model.model." if has_lora else "llm.model."


def checkpoint_key(our_key: str, lora_targets: tuple[str, ...]) -> str:
    """Map a parameter name of ``CanaryQwen`` to its name in NeMo's ``model.safetensors``."""
    if our_key.startswith("mel."):
        return "perception.preprocessor.featurizer." + our_key[len("mel.") :]
    if our_key.startswith(("encoder.", "proj.")):
        return "perception." + our_key
    if our_key == "lm_head.weight":
        return ("llm.base_model.model." if lora_targets else "llm.") + "lm_head.weight"
    if our_key.startswith("llm."):
        rest = our_key[len("llm.") :]
        for target in lora_targets:
            marker = f".{target}."
            if marker in rest:
                head, tail = rest.split(marker)
                tail = {
                    "weight": "base_layer.weight",
                    "lora_A": "lora_A.default.weight",
                    "lora_B": "lora_B.default.weight",
                }[tail]
                rest = f"{head}{marker}{tail}"
        return llm_prefix(bool(lora_targets)) + rest
    return our_key
