"""The network and what it travels in: the timm factory and the self-describing model package
(:mod:`.package`), where ImageNet weights come from (:mod:`.weights`), the package as one ONNX graph
(:mod:`.export`), and melbatch's own instant model, band means (:mod:`.baseline`)."""
