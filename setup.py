import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithDatapath(build_py):
    """Copy the datapath's C source (top-level ebpf/) into the built package as
    pyflow/ebpf, so that a wheel carries what bcc compiles at start-up. Editable
    installs read the source tree's ebpf/ directly (pyflow/datapath/bpfsource.py)."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        src = Path(__file__).resolve().parent / "ebpf"
        dst = Path(self.build_lib) / "pyflow" / "ebpf"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.o", "*~"))


setup(cffi_modules=["csrc/build_native.py:ffibuilder"], cmdclass={"build_py": BuildPyWithDatapath})
