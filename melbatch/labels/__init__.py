"""What a clip is called: where labels come from (:mod:`.sources`: folders, manifests, reviewed clips)
and how several labels at once are written and scored (:mod:`.multilabel`)."""
