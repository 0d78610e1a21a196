"""lwqc: a compiler for mixed-precision weight quantization of transformer language models."""
