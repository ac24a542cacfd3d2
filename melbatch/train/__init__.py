"""Fine-tuning on Ray Train, top-down: :mod:`.driver` (the command: checks, budget, workers),
:mod:`.data` (shards → labels, a split by file, Ray Datasets), :mod:`.loop` (what each worker runs),
:mod:`.augment` (the field shifts and SpecAugment, on waveforms or images), :mod:`.finish` (the best
epoch → the model package, validation scored, the temperature fitted); and :mod:`.heads`
(``--backbone birdnet|speaker``: a head on a frozen audio backbone's embeddings instead)."""
