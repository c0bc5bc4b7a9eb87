"""PowerInfer GPU index: activation statistics → per-layer hot-neuron split → `PWRI` GGUF file.

Modules: `activations` (safe loading and validation), `solver` (how many neurons per layer),
`select` (which neurons), `gpuindex` (the file: writer, reader, summary).
"""
