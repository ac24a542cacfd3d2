"""Sound in: bytes → waveform (:mod:`.decode`), waveform → log-mel image (:mod:`.logmel`), and one
audio object → its clips' images, staged until the file is known to be good (:mod:`.objects`)."""
