"""Task profiles: resolve a request's `task_profile`, `judge_threshold`, `num_speculative_tokens` and `speculative`
into engine `SpecParams` (explicit field > profile > server default) and the effective values echoed back."""

from __future__ import annotations

from dataclasses import dataclass

from engine import LOSSLESS, EngineInfo, ProfileInfo, SpecParams
from server.errors import bad_request


@dataclass(frozen=True, slots=True)
class Resolved:
    spec: SpecParams
    width: int  # effective window W (0 = plain decoding); with `auto`, the cap of the planner's choice
    head_sha256: str | None
    auto: bool  # the planner picks each step's window


@dataclass(frozen=True, slots=True)
class ProfileTable:
    profiles: dict[str, ProfileInfo]
    default: str
    server_width: int  # window W of profiles that set none
    max_width: int
    can_speculate: bool  # a draft is loaded
    auto_window: bool  # the server runs the window planner (requests may still ask for "fixed")

    @classmethod
    def from_info(cls, info: EngineInfo, default: str = LOSSLESS) -> ProfileTable:
        """Refuses, at start-up, a default profile that is not loaded and a profile window beyond the limit."""
        profiles = {p.name: p for p in info.profiles}
        if default not in profiles:
            raise ValueError(f"default profile {default!r} is not loaded; loaded: {', '.join(profiles)}")
        for p in info.profiles:
            if (p.num_speculative_tokens or 0) > info.max_speculative_tokens:
                raise ValueError(
                    f"profile {p.name!r}: num_speculative_tokens {p.num_speculative_tokens} exceeds "
                    f"max_speculative_tokens {info.max_speculative_tokens}"
                )
        return cls(
            profiles,
            default,
            info.default_speculative_tokens,
            info.max_speculative_tokens,
            info.draft_name is not None,
            info.auto_window,
        )

    def resolve(
        self,
        task_profile: str | None,
        judge_threshold: float | None,
        num_speculative_tokens: int | None,
        speculative: bool | None,
        speculative_window: str | None = None,
    ) -> Resolved:
        name = self.default if task_profile is None else task_profile
        profile = self.profiles.get(name)
        if profile is None:
            known = ", ".join(self.profiles)
            raise bad_request(f"unknown task_profile {name!r}; known profiles: {known}", "task_profile")
        width = self.default_width(profile) if num_speculative_tokens is None else num_speculative_tokens
        if width > self.max_width:
            raise bad_request(
                f"num_speculative_tokens must be in [0, {self.max_width}], got {width}", "num_speculative_tokens"
            )
        if speculative_window == "auto" and not self.auto_window:
            raise bad_request(
                "speculative_window 'auto' needs a server started with --num-speculative-tokens auto",
                "speculative_window",
            )
        enabled = (speculative is not False) and self.can_speculate and width > 0
        tau = profile.judge_threshold if judge_threshold is None else judge_threshold
        fixed = speculative_window == "fixed" or not self.auto_window
        spec = SpecParams(enabled, width, name, tau, fixed_window=fixed and self.auto_window)
        return Resolved(spec, width if enabled else 0, profile.head_sha256, enabled and not fixed)

    def default_width(self, profile: ProfileInfo) -> int:
        """The profile's own window, else the server's; 0 without a draft."""
        if not self.can_speculate:
            return 0
        return self.server_width if profile.num_speculative_tokens is None else profile.num_speculative_tokens
