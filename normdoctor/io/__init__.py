"""Reading models and data from files: every loader raises :class:`normdoctor.LoadError` or
:class:`normdoctor.DataError` with a one-line reason, and none runs code stored in a file unless
``trust_pickle`` says so."""

from .data import (
    GRAYSCALE_MEAN,
    GRAYSCALE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderData,
    RandomDataWarning,
    load_data,
)
from .models import (
    Checkpoint,
    CheckpointFormat,
    import_object,
    load_checkpoint,
    load_model,
    load_state_dict_into,
    resolve_arch,
)

__all__ = [
    "GRAYSCALE_MEAN",
    "GRAYSCALE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Checkpoint",
    "CheckpointFormat",
    "ImageFolderData",
    "RandomDataWarning",
    "import_object",
    "load_checkpoint",
    "load_data",
    "load_model",
    "load_state_dict_into",
    "resolve_arch",
]
