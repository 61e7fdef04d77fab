"""Only the optional compiled kernels; everything else about the package is in pyproject.toml.

``optional=True``: where no C compiler or Python headers are at hand the install still
succeeds and the recommenders run their numpy code (``agent/recommenders/native.py``).
"""

import numpy
from setuptools import Extension, setup

setup(ext_modules=[Extension("agent.recommenders._native", ["agent/recommenders/_native.c"],
                             include_dirs=[numpy.get_include()],
                             # no fused multiply-add (aarch64's default): the kernels round as numpy does
                             extra_compile_args=["-ffp-contract=off"],
                             optional=True)])
