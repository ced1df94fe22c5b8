"""Benchmarks. Run each from the repository root as ``python -m bench.NAME`` (its docstring has the options):
that is how one imports its siblings (``bench.ds_launch``) and the test helpers (``tests.fixtures``)."""

import os


def machine() -> dict:
    """The CPU a figure was measured on. Its instruction set changes float rounding, and ``auto`` encoder
    precision is bf16 only where the CPU runs bf16 natively: on another CPU class a seed builds another tree and
    trains another trajectory, so per-seed figures compare only within one class."""
    import torch

    from index.encoder import cpu_has_bf16

    model = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    return {
        "cpu": model,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_bf16(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
    }


def machine_line(m: dict | None) -> str:
    if not m:
        return "Machine: not recorded (a result from before bench.machine)."
    bf16 = "native bf16" if m["native_bf16"] else "no native bf16"
    return f"Machine: {m['cpu'] or 'CPU'} ({m['cpu_capability']}, {bf16}), {m['cores']} cores, torch {m['torch']}."
