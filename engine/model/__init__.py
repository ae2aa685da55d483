"""Model side of the engine: our Llama-style decoder, its attention paths, int8 draft and checkpoint loading."""
