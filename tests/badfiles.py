"""The image-file writers of the reliability catalogue live in the package (``fkd-dali doctor`` writes them
too): :mod:`fkd_dali.imagefiles`."""

from fkd_dali.imagefiles import *  # noqa: F401,F403
from fkd_dali.imagefiles import DECODABLE, JPEG_KINDS, UNUSABLE, expected_rgb  # noqa: F401
