"""What a person looks at: :mod:`.pictures` (spectrograms on real axes), :mod:`.html` (the pieces every
page is built from), :mod:`.report` (one HTML page per run), :mod:`.review` (the clips worth a
person's time, chosen by :mod:`.candidates`),
:mod:`.similar` (nearest clips by embedding), :mod:`.timeline` (a long recording on one time axis)."""
