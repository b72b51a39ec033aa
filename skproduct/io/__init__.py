"""Readers for the formats product catalogues come in.

- :func:`read_bson`: Cdiscount-style BSON files (``_id``, ``category_id``, ``imgs``).
- :func:`read_table`: a CSV of file names and labels plus an image folder (Shopee's layout).
- :func:`default_index_path`: where a BSON file's offset index goes when its folder must stay untouched.
"""

from ..exceptions import BsonFormatError, BsonTruncatedError, MissingImagesError
from .bson_reader import read_bson
from .bson_refs import BsonImageRef, BsonImagesArray
from .bson_sidecar import default_index_path
from .table import read_table

__all__ = [
    "BsonFormatError",
    "BsonImageRef",
    "BsonImagesArray",
    "BsonTruncatedError",
    "MissingImagesError",
    "default_index_path",
    "read_bson",
    "read_table",
]
