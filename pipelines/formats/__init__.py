"""One reader module per on-disk dataset layout; importing this package registers them all."""

from pipelines.formats.base import (ArraySplit, DatasetFormat, FileSplit, Split, check_labels, get_format, head, list_formats,
                                    read_split, register_format)

from pipelines.formats import cifar, fashion_mnist, stl10, folders  # noqa: F401,E402  (registration)

__all__ = ["ArraySplit", "DatasetFormat", "FileSplit", "Split", "check_labels", "get_format", "head", "list_formats", "read_split", "register_format"]
