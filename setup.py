"""Build script for sapsel-kernels.

The C++ extension ``sapsel_kernels._C`` is optional: the package imports and runs on its pure-PyTorch reference path
without it. Settings (environment variables):

* ``SAPSEL_BUILD_EXT=auto|0|1``  auto (default): build, and on failure warn once and install without the extension;
  0: never build; 1: build and fail loudly on any error.
* ``MAX_JOBS``                    parallel compile jobs, read by torch's BuildExtension (default: ninja's, which is
  derived from the number of cores).

torch is imported lazily (inside the build step), never at the top of this file, and the extension is built against
the torch that is installed in the environment: install with ``pip install --no-build-isolation``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

MODE = os.environ.get("SAPSEL_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"SAPSEL_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")
HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg):
    bar = "=" * 100
    sys.stderr.write(f"\n{bar}\nsapsel-kernels: {msg}\n{bar}\n\n")


def _extensions():
    if MODE == "0":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing in an isolated build env
        if MODE == "1":
            raise
        _warn(f"torch is not importable at build time ({exc}); installing without the C++ extension. "
              "Install torch first and use `pip install --no-build-isolation`.")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extra_cxx = ["-O3", "-std=c++17", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
    ext = CppExtension(
        "sapsel_kernels._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": extra_cxx},
        extra_link_args=["-fopenmp"],
    )

    class OptionalBuildExtension(BuildExtension):
        """BuildExtension that, in auto mode, degrades to the reference path instead of failing the install.

        ``Extension(optional=True)`` is not honoured by torch's ninja build, so the error is caught here.
        """

        def run(self):
            try:
                super().run()
            except Exception as exc:
                if MODE == "1":
                    raise
                _warn(f"building the C++ extension failed ({type(exc).__name__}: {exc}); the package will use its "
                      "pure-PyTorch reference path on CPU. Set SAPSEL_BUILD_EXT=1 to make this an error.")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if MODE == "1":
                    raise
                _warn(f"building {ext.name} failed ({type(exc).__name__}: {exc}); continuing without it. "
                      "Set SAPSEL_BUILD_EXT=1 to make this an error.")

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def _readme():
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = _extensions()

setup(
    name="sapsel-kernels",
    version="0.1.0",
    description="Fused kernels for sharpness-aware parameter selection in machine unlearning",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["sapsel_kernels", "sapsel_kernels.*"]),
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "demo": ["scikit-learn", "matplotlib>=3.7"],
        "forget": ["transformers>=4.40", "matplotlib>=3.7"],  # sapsel forget: HF model folders, the report plot
        # triton pinned to the version the GPU check runs with; on CPU it serves the interpreter tests.
        # transformers: real Hugging Face model classes (built from config, no downloads) for the batch/loss rules.
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "matplotlib>=3.7", "transformers>=4.40",
                 "triton==3.6.0; platform_machine == 'x86_64'"],
    },
    entry_points={"console_scripts": ["sapsel=sapsel_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
