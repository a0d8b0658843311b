"""The input formats, one module each (webdataset tars, parquet files, folders of images with a captions.jsonl),
and what they share (common.py). The rest of the engine reads through engine/io/readers.py, which picks the
module for a unit's kind and holds the rules every format follows."""
