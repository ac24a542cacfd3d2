"""The network and what it travels in: the timm factory and the self-describing model package
(:mod:`.package`), where ImageNet weights come from (:mod:`.weights`), the package as one ONNX graph
(:mod:`.export`), melbatch's own instant model, band means (:mod:`.baseline`); the audio backbones that
already know sound (:mod:`.backbones`, the registry, with one module each: :mod:`.birdnet`,
:mod:`.speaker`) and the head fitted on their embeddings (:mod:`.heads`)."""
