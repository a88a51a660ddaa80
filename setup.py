"""basicsr-mambair: MambaIR image restoration as a BasicSR plugin (runs with or without a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

here = Path(__file__).parent
# `python -m basicsr.train|test` -> basicsr_mambair.train|test (see _basicsr_mambair_redirect.py): a .pth file
# must sit in site-packages itself, which setuptools offers no option for; its own distutils-precedence.pth
# is installed the same way, by a build step that writes it next to the packages.
# Its one line runs at every start of Python in that environment: it only imports the (tiny) module when the
# command line names `basicsr.`.
PTH = 'basicsr_mambair_redirect.pth'
PTH_LINE = ("import sys; any('basicsr.' in a for a in getattr(sys, 'orig_argv', ())) and "
            "__import__('_basicsr_mambair_redirect').install()\n")


def write_pth(folder: str | Path) -> None:
    os.makedirs(folder, exist_ok=True)
    Path(folder, PTH).write_text(PTH_LINE)


class BuildPyWithPth(build_py):
    """build_py that also puts the .pth file at the root of the wheel (editable wheels: EditableWheelWithPth)."""

    def _pth_outputs(self) -> list[str]:
        return [] if getattr(self, 'editable_mode', False) else [os.path.join(self.build_lib, PTH)]

    def run(self) -> None:
        super().run()
        if self._pth_outputs():
            write_pth(self.build_lib)

    def get_outputs(self, include_bytecode: bool = True) -> list:
        return [*super().get_outputs(include_bytecode), *self._pth_outputs()]


cmdclass = {'build_py': BuildPyWithPth}
try:  # setuptools >= 64: `pip install -e` builds an editable wheel, which ignores build_py's extra files
    from setuptools.command.editable_wheel import editable_wheel

    class EditableWheelWithPth(editable_wheel):
        """editable_wheel that also puts the .pth file at the root of the editable wheel."""

        def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
            outputs = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
            write_pth(unpacked_wheel)
            return outputs

    cmdclass['editable_wheel'] = EditableWheelWithPth
except ImportError:
    pass

version = {}
exec((here / 'basicsr_mambair' / 'version.py').read_text(), version)

setup(
    name='basicsr-mambair',
    version=version['__version__'],
    description='MambaIR / MambaIRUNet image restoration as a BasicSR plugin, exact on CPU and GPU',
    long_description=(here / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    packages=find_packages(include=['basicsr_mambair', 'basicsr_mambair.*']),
    py_modules=['_basicsr_mambair_redirect'],
    cmdclass=cmdclass,
    include_package_data=True,
    # the C scan kernel, compiled on first use (ops/scan/compiled.py)
    package_data={'basicsr_mambair.ops.scan': ['scan_kernel.c', 'scan_fused.c', 'scan_common.h']},
    python_requires='>=3.9',
    install_requires=[
        'basicsr>=1.4.2',
        'torch>=2.0',
        'torchvision',
        'opencv-python',
        'lmdb',
        'tensorboard',
        'scikit-image',
        'pyyaml',
        'tqdm',
        'numpy',
        'scipy',
        'safetensors',  # small; .safetensors checkpoints are read wherever .pth ones are
    ],
    extras_require={
        # The official CUDA selective-scan kernel; needs a CUDA toolchain (see README).
        'cuda': ['mamba-ssm>=1.0.1', 'causal-conv1d>=1.0.0'],
        'test': ['pytest>=7', 'ruff', 'spandrel>=0.4'],
        # basicsr_mambair.spandrel: the archs in spandrel / chaiNNer (see README)
        'spandrel': ['spandrel>=0.4'],
        'bench': ['mambapy', 'spandrel>=0.4'],  # spandrel: SwinIR for benchmarks/bench_models.py
        # mambair-export / basicsr_mambair.deploy; onnxscript only for torch's dynamo exporter (--exporter dynamo,
        # and 'auto' once torch drops the TorchScript exporter)
        'onnx': ['onnx>=1.16', 'onnxruntime>=1.16', 'onnxscript'],
    },
    entry_points={
        'console_scripts': [
            'mambair-train=basicsr_mambair.cli.train:main_train',
            'mambair-test=basicsr_mambair.cli.train:main_test',
            'mambair-demo=basicsr_mambair.cli.demo:main',
            'mambair-restore=basicsr_mambair.cli.restore:main',
            'mambair-export=basicsr_mambair.cli.export:main',
            'mambair-convert=basicsr_mambair.cli.convert:main',
            'mambair-profile=basicsr_mambair.cli.profile:main',
            'mambair-prepare-sidd=basicsr_mambair.cli.prepare_sidd:main',
            'mambair-extract-subimages=basicsr_mambair.cli.extract_subimages:main',
            'mambair-make-lr=basicsr_mambair.cli.make_lr:main',
            'mambair-make-jpeg=basicsr_mambair.cli.make_jpeg:main',
            'mambair-make-lmdb=basicsr_mambair.cli.make_lmdb:main',
            'mambair-make-meta-info=basicsr_mambair.cli.make_meta_info:main',
        ],
    },
)
