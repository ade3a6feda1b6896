"""An in-memory stand-in for medssl.preprocess.cache.VolumeCache (the has/get/cfg contract) for tests that
build their preprocessed arrays directly. `cfg` describes the arrays as a VolumeCache's settings would
(dimensionality and size from the first array), so models logged from them carry a true description."""
from medssl.config import PreprocessConfig


class MemoryCache:
    def __init__(self, arrays: dict, cfg: PreprocessConfig | None = None):
        self.arrays = arrays  # image_id -> (C, *spatial) array
        if cfg is None and arrays:
            shape = next(iter(arrays.values())).shape
            cfg = PreprocessConfig(spatial_dims=len(shape) - 1, size=list(shape[1:]))
        self.cfg = cfg

    def has(self, image_id):
        return image_id in self.arrays

    def get(self, image_id):
        return self.arrays[image_id]
