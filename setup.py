"""Build the fedge distribution, compiling the Cython kernels when possible.

One list of kernel modules, one set of compiler directives, portable flags only:
the same source must build on a Raspberry Pi and give wheels that run on any CPU
of the target architecture, so no ``-march=native`` and no ``-ffast-math`` (which
would also break the kernels' NaN checks). ``-ffp-contract=off`` keeps GCC from
fusing ``a * b + c`` into an FMA on aarch64, so the compiled kernels give the same
bits as their NumPy twins on every architecture.

``KERNELS_PUREPYTHON=1`` (or no Cython / no C compiler) installs the package
without the extensions; ``kernels`` then runs on its NumPy reference path.
``KERNELS_DEBUG=1`` turns bounds and wraparound checks on.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

KERNEL_FAMILIES = ["quantize", "sparsify"]

DEBUG = os.environ.get("KERNELS_DEBUG") == "1"

COMPILER_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

PORTABLE_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing"]


class OptionalBuildExt(build_ext):
    """Build the kernels, but let the install succeed on the NumPy path without a compiler."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all
            print(
                f"fedge: kernels not compiled ({exc}); using the NumPy reference path",
                file=sys.stderr,
            )

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(
                f"fedge: could not compile {ext.name} ({exc}); using the NumPy reference path",
                file=sys.stderr,
            )


def kernel_extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("KERNELS_PUREPYTHON") == "1":
        return []
    try:
        import numpy as np
        from Cython.Build import cythonize
    except ImportError as exc:
        print(f"fedge: {exc}; installing without compiled kernels", file=sys.stderr)
        return []
    from setuptools import Extension

    cflags = [] if sys.platform == "win32" else PORTABLE_CFLAGS
    extensions = [
        Extension(
            f"kernels._{family}",
            [f"kernels/_{family}.pyx"],
            include_dirs=[np.get_include(), "kernels"],
            depends=[f"kernels/_{family}_simd.h", "kernels/_stream.h"],
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            extra_compile_args=cflags,
        )
        for family in KERNEL_FAMILIES
    ]
    return cythonize(extensions, compiler_directives=COMPILER_DIRECTIVES, quiet=True)


setup(ext_modules=kernel_extensions(), cmdclass={"build_ext": OptionalBuildExt})
