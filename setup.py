"""basicsr-mambair: MambaIR image restoration as a BasicSR plugin (runs with or without a GPU)."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
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
