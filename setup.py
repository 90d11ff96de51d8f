"""The build of offlog's optional C hot path, ``offlog._speedups``; all else is in pyproject.toml.

Where it cannot be built (no C compiler, no Python headers) the install goes on
without it and says so in one line; offlog then runs in pure Python
(``offlog.__with_speedups__`` is False), as it does with ``OFFLOG_PUREPYTHON=1``.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError


class OptionalBuildExt(build_ext):
    """A build error of an extension is a one-line note (``optional=True`` then lets the install go on)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (BaseError, CCompilerError) as exc:
            print(f"offlog: {ext.name} not built ({exc}); offlog runs in pure Python", file=sys.stderr)


setup(
    ext_modules=[
        Extension("offlog._speedups", sources=["offlog/_speedups.c"], depends=["offlog/_ring_core.h"], optional=True)
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
