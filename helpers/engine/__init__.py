"""The inference engine: torch, no Ray, no HTTP.

Loading a model (the embedded GGUF, a directory, a hub id), the continuous
batcher that decodes every request in flight together and its batch layouts,
sampling, detokenising, the kit's own decoder (the Llama, Mistral and Qwen
families) and tokenizer, and the CPU kernels for 4-bit and 8-bit weights. It
may import torch, transformers, :mod:`helpers.protocol` and
:mod:`helpers.config` (the variables that choose a model and its weights),
never Ray or FastAPI, so that unit tests, notebooks and GPU benchmarks on machines without
Ray drive exactly what replicas run.
"""
