"""The student detector: trains a Grounding DINO on GranuCap shards and scores detectors with COCO AP.

The rule of the house: `detector/` reads what the engine wrote and imports from `engine` only

- the records: `engine.records`, and their boxes as columns, `engine.boxes` (numpy only);
- the shard reader: `engine.io.shard_reader` (`open_run`, `complete_unit_ids`, `complete_units`,
  `read_shard`, `read_index`, the layout), never the writer in `engine.io.shards`, and `engine.io.storage`
  (the paths and URIs runs and eval sets live at);
- model loading: `engine.models.loading` (a `tiny:NAME` model comes from the engine's builders and cache).

Nothing else: not the runner, the pipeline config, the stages or the shard writer. What drives the engine
and the detector together (`granucap selftrain`, engine/selftrain.py) or writes shards for them
(engine/synthetic_runs.py) lives on the engine's side. tests/test_detector_imports.py holds `detector/` to
this rule.
"""
