"""Sequence: the engine-private mutable state of one request (tokens, slot, cache lengths, running counts)."""

from __future__ import annotations

import enum

import torch

from engine.types import Request, SpecCounts


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """NOTE: at the start of every cycle `target_len == len(token_ids) - 1` (the last token is fed by verify)
    and `draft_len <= target_len`: by one or two tokens after a drafting cycle, by any number while the `auto`
    planner keeps a row from drafting (the drafter catches it up when it drafts again)."""

    def __init__(self, request: Request, num_speculative: int, device: torch.device) -> None:
        self.request = request
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_speculative = num_speculative  # W for this request, 0 = plain target decoding
        self.slot = -1
        self.target_len = 0
        self.draft_len = 0
        self.num_cached_tokens = 0  # prompt positions its slot still held from an earlier request
        self.draft_failed = False  # its draft logits overflowed once: it decodes without drafts from then on
        self.status = Status.WAITING
        self.counts = SpecCounts()
        self.window_counts = [0] * (num_speculative + 1)  # steps run at each window W (0: plain decoding)
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.generator: torch.Generator | None = None
        if not request.sampling.greedy:
            self.generator = torch.Generator(device=device)
            if request.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(request.sampling.seed)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def remaining_tokens(self) -> int:
        return self.request.sampling.max_tokens - self.num_output_tokens
