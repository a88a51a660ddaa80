"""``python basicsr_mambair/test.py -opt options/test/X.yml`` (same as the ``mambair-test`` console script)."""

import os.path as osp
import sys

if __name__ == '__main__' and not __package__:  # run as a file: import the package, not its sub-folders
    sys.path[0] = osp.dirname(osp.dirname(osp.abspath(__file__)))

from basicsr_mambair.cli.train import main_test  # noqa: E402

if __name__ == '__main__':
    sys.exit(main_test())
