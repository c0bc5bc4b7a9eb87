"""Queue names: `cpu` (inspect, fan-out steps, publish) and `gpu` (engine builds)."""

CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
