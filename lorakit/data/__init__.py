"""Training data: sources (files, folders, Hub datasets), row formats, labels from the chat template, the pipeline
that mixes and splits them, the content-keyed cache, and the coloured rendering `validate` shows."""

from lorakit.data.formats import FORMAT_COLUMNS, row_to_example
from lorakit.data.labels import IGNORE, Tokenization
from lorakit.data.pipeline import PreparedData, SourceReport, SplitReport, prepare_data, prepare_split
from lorakit.data.sources import LOADERS, detect_format, load_source, source_fingerprint
from lorakit.errors import DataError

__all__ = ["DataError", "FORMAT_COLUMNS", "IGNORE", "LOADERS", "PreparedData", "SourceReport", "SplitReport",
           "Tokenization", "detect_format", "load_source", "prepare_data", "prepare_split", "row_to_example",
           "source_fingerprint"]
