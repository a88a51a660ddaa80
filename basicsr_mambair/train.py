"""``python basicsr_mambair/train.py -opt options/train/X.yml`` (same as the ``mambair-train`` console script)."""

import os.path as osp
import sys

if __name__ == '__main__' and not __package__:  # run as a file: import the package, not its sub-folders
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))

from basicsr_mambair.cli.train import main_train  # noqa: E402

if __name__ == '__main__':
    sys.exit(main_train())
