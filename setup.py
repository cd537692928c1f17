"""Metadata lives in pyproject.toml; this file only decides about the optional CUDA extension.

DPKERNELS_BUILD_CUDA=0 skips the extension, =1 makes any failure to build it an error, unset
builds it when it can and otherwise says why not in one line.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    mode = os.environ.get("DPKERNELS_BUILD_CUDA", "auto")
    if mode == "0":
        print("dpkernels: DPKERNELS_BUILD_CUDA=0, not building the CUDA extension dpkernels._C")
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    if not sources:
        reason = "csrc/ holds no extension sources yet"
        if mode == "1":
            raise RuntimeError(f"DPKERNELS_BUILD_CUDA=1 but {reason}")
        print(f"dpkernels: not building the CUDA extension dpkernels._C: {reason}")
        return [], {}
    raise RuntimeError("csrc/ has sources but this setup.py does not build them yet")


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
