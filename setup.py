"""Build kvstore: compile the Cython WAL (native/) and generate the gRPC code.

Generated files (kvstore/v1/*_pb2*.py, native/*.c, *.so) are build outputs and
never committed. `python setup.py build_proto build_ext --inplace` builds
everything in place for development; `pip install .` does the same for a wheel.
"""
import glob
import os

from setuptools import Command, Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildProto(Command):
    """Generate kvstore/v1/*_pb2.py and *_pb2_grpc.py from proto/."""

    description = "generate protobuf and gRPC code from proto/"
    user_options = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        from grpc_tools import protoc
        import grpc_tools

        protos = sorted(glob.glob(os.path.join(HERE, "proto", "kvstore", "v1", "*.proto")))
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        args = [
            "protoc",
            f"-I{os.path.join(HERE, 'proto')}",
            f"-I{well_known}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            f"--pyi_out={HERE}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")


class BuildPyWithProto(build_py):
    def run(self):
        self.run_command("build_proto")
        super().run()


class BuildExtWithProto(build_ext):
    def run(self):
        self.run_command("build_proto")
        super().run()


def extensions():
    from Cython.Build import cythonize

    exts = [
        Extension(
            "kvstore._wal",
            ["native/_wal.pyx"],
            extra_compile_args=["-O2"],
        ),
    ]
    return cythonize(exts, language_level=3, compiler_directives={"boundscheck": False, "wraparound": False})


setup(
    ext_modules=extensions(),
    cmdclass={"build_proto": BuildProto, "build_py": BuildPyWithProto, "build_ext": BuildExtWithProto},
)
