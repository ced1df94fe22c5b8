"""Everything is in pyproject.toml except the routing kernel, a C extension (index/route.py loads it with ctypes)."""
from setuptools import Extension, setup

# -ffp-contract=off: no fused operations beyond the kernel's explicit fmaf, so every
# compiler and CPU computes the same bits and the job and the router agree on every path.
setup(ext_modules=[Extension("index._descend", sources=["index/_descend.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
