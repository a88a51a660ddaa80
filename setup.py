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
    ],
    extras_require={
        # The official CUDA selective-scan kernel; needs a CUDA toolchain (see README).
        'cuda': ['mamba-ssm>=1.0.1', 'causal-conv1d>=1.0.0'],
        'test': ['pytest>=7', 'ruff'],
        'bench': ['mambapy', 'spandrel'],  # spandrel: SwinIR for benchmarks/bench_models.py
    },
    entry_points={
        'console_scripts': [
            'mambair-train=basicsr_mambair.launch:main_train',
            'mambair-test=basicsr_mambair.launch:main_test',
            'mambair-demo=basicsr_mambair.demo:main',
            'mambair-restore=basicsr_mambair.restore_cli:main',
            'mambair-prepare-sidd=basicsr_mambair.tools.prepare_sidd:main',
            'mambair-extract-subimages=basicsr_mambair.tools.extract_subimages:main',
            'mambair-make-lr=basicsr_mambair.tools.make_lr:main',
            'mambair-make-jpeg=basicsr_mambair.tools.make_jpeg:main',
            'mambair-make-lmdb=basicsr_mambair.tools.make_lmdb:main',
        ],
    },
)
