"""Torch building blocks of Llama-family decoders: norm, rotary embedding, paged attention."""
