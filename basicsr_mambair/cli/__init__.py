"""The console scripts, one module each, sharing one error and exit-status convention (:mod:`.common`).

``mambair-train`` / ``mambair-test`` (:mod:`.train`), ``mambair-restore`` (:mod:`.restore`), ``mambair-demo``
(:mod:`.demo`), ``mambair-convert`` (:mod:`.convert`), ``mambair-profile`` (:mod:`.profile`) and the data tools
``mambair-make-lr``, ``mambair-make-jpeg``, ``mambair-make-lmdb``, ``mambair-extract-subimages``,
``mambair-prepare-sidd`` (on :mod:`.data_tool`). The library never imports
this package.
"""
