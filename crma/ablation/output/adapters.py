"""Every arm of a run folder on one base model, switched per answer: what "Try the adapters", `python -m crma
generate`, `/generate` and the answers of a finished run all use.

The folder's `adapters/<arm>/` hold peft's files (PiSSA converted to a plain LoRA on the original base) and, for the
CRMA arms, `crma_config.json` + `crma.safetensors`. They are loaded once onto one base model — peft's multi-adapter
switching for LoRA, `crma.set_active` / `crma.disable` for CRMA — and the base answers with every adapter off (peft's
`disable_adapter()`, which turns CRMA off too). So a run made anywhere, a downloaded Hub repo included, answers the
same way, and switching arms leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crma

from ..data import prompt_token_ids
from ..engine.generation import Answer, GenerationConfig, stream_answer
from .run_folder import ADAPTERS, CONFIG, locate

BASE = "base"


def adapter_folders(run_folder: str | Path) -> dict[str, Path]:
    """`{arm label: folder}` of a run's saved adapters (the first seed's, with several seeds), in the run's order."""
    root = Path(run_folder) / ADAPTERS
    if not root.is_dir():
        return {}
    seeds = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("seed-"))
    if seeds:
        root = seeds[0]
    found = {p.name: p for p in root.iterdir() if (p / "adapter_config.json").is_file()}
    try:
        from ..spec.config import AblationConfig

        order = AblationConfig.from_json((Path(run_folder) / CONFIG).read_text(encoding="utf-8")).arm_labels
    except (OSError, ValueError):
        order = sorted(found)
    return {label: found[label] for label in order if label in found}


class AdapterBank:
    """A run's arms on one base model. Use as a context manager: the adapters come off the base on exit.

    Args:
        loaded (`LoadedModel`): the run's base model (as `load_model` gives it: never touched by peft or CRMA) and
            its tokenizer.
        folders (`dict[str, Path]`): `{arm label: adapter folder}` (`adapter_folders`).
    """

    def __init__(self, loaded: Any, folders: dict[str, Path]):
        from peft import PeftModel

        if not folders:
            raise ValueError(
                "this run saved no adapters (it ran without save_adapters, or before its first seed ended)"
            )
        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        self.names = {label: f"arm{i}" for i, label in enumerate(folders)}  # peft / CRMA names cannot hold '.'
        self.crma_arms: set[str] = set()
        model = None
        for label, folder in folders.items():
            name = self.names[label]
            if model is None:
                model = PeftModel.from_pretrained(loaded.model, folder, adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(folder, adapter_name=name, is_trainable=False)
            if (folder / crma.serialization.WEIGHTS_NAME).is_file():
                crma.load(model, folder, adapter_name=name)
                self.crma_arms.add(label)
        self.model = model.eval()

    @classmethod
    def from_run(
        cls, out: str | Path, *, loaded: Any = None, token: Any = None, allow_local: bool = True
    ) -> AdapterBank:
        """The bank of run folder `out` (complete: a run still training has no adapters yet), its base model loaded
        from the run's config unless given."""
        from ..models import load_model
        from ..spec.config import AblationConfig

        folder = locate(out)
        if folder is None or folder != Path(out):
            raise ValueError(f"no finished run in {Path(out).name}: its adapters are written when it ends")
        cfg = AblationConfig.from_json((folder / CONFIG).read_text(encoding="utf-8"))
        if loaded is None:
            loaded = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, token=token, allow_local=allow_local)
        return cls(loaded, adapter_folders(folder))

    @property
    def labels(self) -> list[str]:
        """The arms, in the run's order."""
        return list(self.names)

    def __enter__(self) -> AdapterBank:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Take every adapter off the base model (the `LoadedModel` is the pure base again)."""
        if self.model is None:
            return
        if self.crma_arms:
            crma.detach(self.model)
        self.loaded.model = self.model.unload()
        self.model = None

    @contextlib.contextmanager
    def use(self, arm: str) -> Iterator[Any]:
        """The model as arm `arm` computes it (`base`: every adapter off, CRMA included)."""
        if arm == BASE:
            with self.model.disable_adapter():
                yield self.model
            return
        if arm not in self.names:
            raise ValueError(f"no arm {arm!r} in this run; it has {self.labels}")
        self.model.set_adapter(self.names[arm])
        if arm in self.crma_arms:
            crma.set_active(self.model, self.names[arm])
        elif self.crma_arms:
            crma.disable(self.model)
        yield self.model

    def prompt_ids(self, row: dict[str, str]) -> list[int]:
        """A row's prompt as the arms trained on it (the same template and special tokens)."""
        return prompt_token_ids({"input": "", "output": "", **row}, self.tokenizer)

    def stream(
        self, arm: str, prompt_ids: list[int], cfg: GenerationConfig, *, stop: threading.Event | None = None
    ) -> Iterator[tuple[str, Answer | None]]:
        """`arm`'s answer, token by token (see `generation.stream_answer`)."""
        with self.use(arm) as model:
            yield from stream_answer(model, self.tokenizer, prompt_ids, cfg, arm=arm, stop=stop)

    def answer(self, arm: str, prompt_ids: list[int], cfg: GenerationConfig) -> Answer:
        """`arm`'s whole answer."""
        *_, (_, answer) = self.stream(arm, prompt_ids, cfg)
        return answer


def answer_rows(
    bank: AdapterBank, rows: list[dict[str, Any]], cfg: GenerationConfig, *, arms: list[str] | None = None
) -> dict[str, Any]:
    """Every arm's and the base model's answer to each row: the `answers` block of `summary.json`.

    Returns:
        `dict` with `decoding` (the `GenerationConfig`), `prompts` (`[{"row", "instruction", "input",
        "reference"}]`) and `by_arm` (`{"base" | arm: [answer dict per prompt]}`).
    """
    arms = [BASE, *(arms or bank.labels)]
    by_arm: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    prompts = []
    for row in rows:
        ids = bank.prompt_ids(row)
        prompts.append(
            {"row": row.get("row"), "instruction": row["instruction"], "input": row.get("input", ""),
             "reference": row.get("output")}
        )  # fmt: skip
        for arm in arms:
            by_arm[arm].append(bank.answer(arm, ids, cfg).to_dict())
    return {"decoding": cfg.to_dict(), "prompts": prompts, "by_arm": by_arm}
