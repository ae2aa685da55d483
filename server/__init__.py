"""HTTP front end (OpenAI-compatible server); built on the engine in a later issue. Never imports torch."""
