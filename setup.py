import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _bpf_builder():
    spec = importlib.util.spec_from_file_location("build_bpf", ROOT / "csrc" / "build_bpf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithDatapath(build_py):
    """Put the datapath into the package twice over: the prebuilt BPF object
    (pyflow/datapath/pyflow_xdp.bpf.o, compiled here once with clang; what pyflowd
    loads by default, with libbpf) and the C source (top-level ebpf/ as pyflow/ebpf,
    for datapath_build = "bcc"). Editable installs build the object in the source
    tree (when its sources changed) and read the source tree's ebpf/ directly."""

    def run(self):
        super().run()
        builder = _bpf_builder()
        if self.editable_mode:
            if not builder.up_to_date(builder.OUTPUT):
                builder.build(builder.OUTPUT)
            return
        builder.build(Path(self.build_lib) / "pyflow" / "datapath" / builder.OUTPUT.name)
        dst = Path(self.build_lib) / "pyflow" / "ebpf"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(ROOT / "ebpf", dst, ignore=shutil.ignore_patterns("*.o", "*~"))


setup(cffi_modules=["csrc/build_native.py:ffibuilder"], cmdclass={"build_py": BuildPyWithDatapath})
