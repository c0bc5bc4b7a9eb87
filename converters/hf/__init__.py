"""The Hugging Face layout: what transformers, vLLM, SGLang and TensorRT-LLM's PyTorch backend load.

`families/` (one module per architecture) · `plan.py` (HF tensor names, shard assignment) ·
`convert.py` (write one shard file) · `config.py` (`config.json`, generation config, shard index).
"""
