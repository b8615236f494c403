"""zoo: the local model zoo (Caffe's model-zoo folders), fetching and resolving zoo:NAME."""

from brewnet.zoo.fetch import DEADLINE, MAX_BYTES, download, import_folder
from brewnet.zoo.registry import (
    ZooError,
    ZooModel,
    cache_dir,
    check_model_name,
    file_inside,
    find_model,
    is_zoo_spec,
    list_models,
    read_front_matter,
    resolve_model,
    resolve_weights,
    search_path,
    sha1_of,
)

__all__ = ["DEADLINE", "MAX_BYTES", "ZooError", "ZooModel", "cache_dir", "check_model_name", "download",
           "file_inside", "find_model", "import_folder", "is_zoo_spec", "list_models", "read_front_matter",
           "resolve_model", "resolve_weights", "search_path", "sha1_of"]
