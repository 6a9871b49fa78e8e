from setuptools import setup

setup(cffi_modules=["pyflow/_native_build.py:ffibuilder"])
