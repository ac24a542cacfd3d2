"""The batch jobs on Ray Data, each top-down in its module: :mod:`.featurize` (audio → log-mel
shards), :mod:`.classify` (a model over an archive; its pipeline's stages in :mod:`.chunks`),
:mod:`.scan` (classify, incremental and exactly once), and what they share: :mod:`.runs`
(content-named batches, part files, resuming), :mod:`.workers` (a worker's CPU threads and memory),
:mod:`.detections` (clip probabilities → events and their export formats). Train, the fourth job,
has a folder of its own (:mod:`melbatch.train`)."""
