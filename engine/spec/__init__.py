"""Speculation: drafting, verification, the judge hook and the pure acceptance rules."""
