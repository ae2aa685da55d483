"""Task oracles: the outcome of a response (a final answer, a test verdict) that mining labels are relative to."""
