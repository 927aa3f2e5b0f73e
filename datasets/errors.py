"""The one error type of the data pipeline, and the advice given when no dataset is found."""
from __future__ import annotations

from utils.errors import UserError

from .naming import LAYOUT


class DataError(UserError, ValueError):
    """A dataset on disk that cannot be used as it is; the message names the file or folder and the fix."""


GET_DATA_HINT = f"""\
To get data:
  - demo data with the BRISC layout: python -m datasets.synthetic --out DIR   (then set data.root=DIR),
    or set data.generated.enabled=true to generate it at data.root on first use;
  - the real BRISC 2025 release: download the Kaggle dataset briscdataset/brisc2025 and set data.root to the
    folder that holds classification_task/ and segmentation_task/.
{LAYOUT}"""
