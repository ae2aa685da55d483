"""Async HTTP load generator for OpenAI-compatible endpoints (httpx and tqdm only; imports nothing from this repo)."""
