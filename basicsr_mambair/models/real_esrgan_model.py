"""Real-world SR training: BasicSR's Real-ESRGAN models with :class:`MambaIRModel`'s testing and checkpoint I/O.

Training is BasicSR's, unchanged (the two-stage recipe of Real-ESRGAN and HAT's Real-HAT-GAN):

- stage 1, ``MambaIRRealESRNetModel`` = ``RealESRNetModel``: high-order degradations (blur, resize, noise,
  JPEG, twice, then a sinc filter) synthesised on the fly from the HR crops of ``RealESRGANDataset``, a
  training-pair pool that mixes degradations across batches, L1 loss (optionally to a USM-sharpened GT);
- stage 2, ``MambaIRRealESRGANModel`` = ``RealESRGANModel``: the same data, L1 + perceptual + GAN losses with a
  discriminator (``UNetDiscriminatorSN``), EMA of the generator, started from stage 1's weights.

What :class:`MambaIRModel` adds, as HAT's ``RealHATMSEModel`` / ``RealHATGANModel`` do for HAT: tiled and
self-ensemble validation (a whole real photo rarely fits one forward of a full-size MambaIR in a CPU's memory),
validation sets without ground truth scored with a no-reference metric (NIQE), per-image results,
``weights_only`` checkpoint reading and atomic checkpoint writing. Stage 1 also stops on a non-finite loss.

BasicSR 1.4.2 allocates the degradation tools and the pool with ``.cuda()``; :func:`basicsr_mambair.compat.
patch_basicsr` (run by ``mambair-train`` / ``mambair-test``) makes them follow the model's device.
"""

from __future__ import annotations

from basicsr.models.realesrgan_model import RealESRGANModel
from basicsr.models.realesrnet_model import RealESRNetModel
from basicsr.utils.registry import MODEL_REGISTRY

from .mambair_model import MambaIRModel


@MODEL_REGISTRY.register()
class MambaIRRealESRNetModel(RealESRNetModel, MambaIRModel):
    """Stage 1 (L1 on synthesised degradations): ``RealESRNetModel``'s data synthesis, ``MambaIRModel``'s
    training step (non-finite loss check), testing and checkpoint I/O."""


@MODEL_REGISTRY.register()
class MambaIRRealESRGANModel(RealESRGANModel, MambaIRModel):
    """Stage 2 (L1 + perceptual + GAN): ``RealESRGANModel``'s data synthesis and generator/discriminator steps,
    ``MambaIRModel``'s testing and checkpoint I/O."""
