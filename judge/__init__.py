"""Judge: the rules and (later) learned heads that decide whether a draft/target mismatch may be accepted."""
