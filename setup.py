"""Builds the C++ kernels of the sparse-cpu runtime (sparse_export/runtimes/sparse_cpu/kernel.cpp).

Everything else about the package (name, version, dependencies, packages) is in pyproject.toml.
The library is loaded with ctypes, so it needs no Python or torch headers; it is compiled without
-march flags (the AVX-512 code carries its own target attributes and is picked at run time).
optional=True: without a C++ compiler the install still succeeds and the runtime says it is not built.
"""

from setuptools import Extension, setup

KERNEL = Extension(
    "sparse_export.runtimes.sparse_cpu._kernel",
    sources=["sparse_export/runtimes/sparse_cpu/kernel.cpp"],
    language="c++",
    # -ffp-contract=off: no fused multiply-adds, so both code paths round the output identically
    extra_compile_args=["-O3", "-std=c++17", "-pthread", "-ffp-contract=off", "-Wno-uninitialized",
                        "-Wno-maybe-uninitialized"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[KERNEL])
