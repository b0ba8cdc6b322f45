"""Generation: an arm's answer to a prompt, decoded by transformers' own `generate`, streamed token by token.

Greedy by default; with a temperature, sampling draws from a generator seeded by `GenerationConfig.seed` before each
answer, so every arm (and the base model) answers one prompt from the same random stream. A `stop` event ends an
answer at its next token; so do the token budget and the wall cap. `generate` runs in a thread of its own, as
transformers' streaming does, and the tokens come back through a queue.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from crma.config import JSONConfig, is_int, is_number, require

_END = object()


@dataclass
class GenerationConfig(JSONConfig):
    """How an answer is decoded and bounded.

    Args:
        max_new_tokens (`int`): new tokens an answer may have at most.
        temperature (`float`): 0 decodes greedily; above 0 samples at that temperature.
        top_p (`float`): nucleus sampling's probability mass (with a temperature).
        seed (`int`): the sampling generator's seed, reset before every answer.
        max_prompt_tokens (`int`): a longer prompt is refused (it would be cut in training too).
        max_seconds (`float`): an answer stops once it has taken this long.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    max_prompt_tokens: int = 1024
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, name, "an integer ≥ 1", value)
        require(
            is_number(self.temperature) and 0 <= self.temperature <= 5, "temperature", "in [0, 5]", self.temperature
        )
        require(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer ≥ 0", self.seed)
        require(is_number(self.max_seconds) and self.max_seconds > 0, "max_seconds", "a number > 0", self.max_seconds)


@dataclass
class Answer:
    """One arm's (or the base model's) answer to one prompt.

    Args:
        arm (`str`): the arm's label, or `base` (every adapter off, CRMA included).
        text (`str`): the decoded new tokens (special tokens left out).
        tokens (`int`): new tokens generated.
        seconds (`float`): wall time of the answer.
        ended (`str`): `eos`, `length` (the token budget), `time` (the wall cap) or `stopped`.
        token_ids (`list[int]`): the new token ids.
    """

    arm: str
    text: str
    tokens: int
    seconds: float
    ended: str
    token_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the token ids left out: the text is what a reader wants)."""
        return {
            "arm": self.arm,
            "text": self.text,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "ended": self.ended,
        }


class _Queue:
    """A transformers streamer that hands each new token id to a queue (the prompt's ids, sent first, are skipped)."""

    def __init__(self) -> None:
        self.tokens: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens.put(int(token))

    def end(self) -> None:
        self.tokens.put(_END)


class _Until:
    """Stop `generate` at the next token once `stop` is set, the reader went away, or the wall cap has passed."""

    def __init__(self, stop: threading.Event, deadline: float):
        self.stop, self.deadline, self.reason = stop, deadline, None
        self.abandoned = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.stop.is_set() or self.abandoned:
            self.reason = "stopped"
        elif time.monotonic() > self.deadline:
            self.reason = "time"
        return torch.full((input_ids.shape[0],), self.reason is not None, dtype=torch.bool, device=input_ids.device)


def stream_answer(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    cfg: GenerationConfig,
    *,
    arm: str,
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, Answer | None]]:
    """Decode `model`'s answer to `prompt_ids` (as the active adapter makes it), yielding the text so far after each
    new token, and last `(text, Answer)`.

    Raises:
        `ValueError`: an empty prompt, or one longer than `cfg.max_prompt_tokens`.
    """
    from transformers import StoppingCriteriaList

    if not prompt_ids:
        raise ValueError("the prompt is empty: type a question, or pick a held-out row")
    if len(prompt_ids) > cfg.max_prompt_tokens:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; at most {cfg.max_prompt_tokens} are allowed here")
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    streamer, until = _Queue(), _Until(stop or threading.Event(), time.monotonic() + cfg.max_seconds)
    sample = cfg.temperature > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": cfg.max_new_tokens}
    if sample:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p)
    else:  # a model's generation_config may ask for sampling: this answer is greedy, whatever it says
        options.update(temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if sample:
                torch.manual_seed(cfg.seed)  # every arm answers from the same random stream
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([until]),
                    pad_token_id=tokenizer.pad_token_id,
                    **options,
                )
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)
            streamer.end()

    started = time.monotonic()
    worker = threading.Thread(target=run, name="crma-generate", daemon=True)
    rng = torch.get_rng_state()
    worker.start()
    new: list[int] = []
    try:
        while (token := streamer.tokens.get()) is not _END:
            new.append(token)
            yield tokenizer.decode(new, skip_special_tokens=True), None
    finally:
        until.abandoned = True  # a no-op after the last token; a reader that leaves early ends generate here
        worker.join()
        torch.set_rng_state(rng)  # sampling must not move the caller's random stream
    if errors:
        raise errors[0]
    if until.reason is not None:
        ended = until.reason
    elif new and new[-1] == tokenizer.eos_token_id:
        ended = "eos"
    else:
        ended = "length"
    text = tokenizer.decode(new, skip_special_tokens=True)
    yield text, Answer(arm, text, len(new), time.monotonic() - started, ended, new)
