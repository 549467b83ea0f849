"""GGUF checkpoints (llama.cpp's file format) as Hugging Face checkpoint directories.

`reader` opens a file and reads its metadata, `config` maps that metadata to a
config.json, `tensors` dequantizes the weights into HF names and layout,
`tokenizer` rebuilds the `tokenizers` BPE and chat template, `convert` writes
the directory and `cache` keeps one converted copy per file so a relaunch does
not pay the dequantization again.
"""
