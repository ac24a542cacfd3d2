"""Typed, frozen configuration for every stage, plus loading it from YAML and flags.

Precedence is defaults < YAML file < command-line flags. Every dataclass validates itself in
``__post_init__`` and raises :class:`ConfigError` with a message that says what to change, so a
wrong config fails before any storage or cluster work starts.

Three modules, imported here so that ``from melbatch.config import TrainConfig`` names every config:
:mod:`.fields` (what configs are made of, and loading them), :mod:`.features` (the feature contract
and featurize's settings), :mod:`.jobs` (train, classify, scan, review, similar, discover).
"""

from __future__ import annotations

from melbatch.config.features import (  # noqa: F401
    AUDIO_EXTENSIONS,
    CLIP_NORMS,
    COMPRESSIONS,
    DEFAULT_EXTENSIONS,
    DENOISE_METHODS,
    FEATURE_DTYPES,
    LABEL_SOURCES,
    LOCAL_WORK_BYTES,
    TAIL_POLICIES,
    FeatureConfig,
    FeaturizeConfig,
)
from melbatch.config.fields import (  # noqa: F401
    SCHEMA_VERSION,
    ConfigError,
    Seconds,
    build,
    flag,
    merge,
    nested,
    parse_yaml,
    require,
    sections,
)
from melbatch.config.jobs import (  # noqa: F401
    AUGMENTED_MIN_STEPS,
    BALANCING,
    DEFAULT_THRESHOLD,
    NORMALIZATIONS,
    PLAIN_MIN_STEPS,
    POOL_ABOVE_FRAMES,
    REVIEW_COUNT,
    REVIEW_STRATEGIES,
    AugmentConfig,
    ClassifyConfig,
    DetectConfig,
    DiscoverConfig,
    ReviewConfig,
    ScanConfig,
    SimilarConfig,
    TrainConfig,
    parse_threshold,
)
