"""Values a job spec may name, importable without numpy (the command line and the job service
check specs with them; the converters map them to `converters.dtypes.DType`)."""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # output dtypes, as TensorRT-LLM names them
NONFINITE_POLICIES = ("warn", "error")  # NaN/infinite weights: list them, or fail the step
POWERINFER_BATCH = 256  # neurons per group of the PowerInfer GPU-index solver (its default)
