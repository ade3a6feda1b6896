"""An in-memory stand-in for medssl.data.cache.VolumeCache (the has/get contract) for tests that build
their preprocessed arrays directly."""


class MemoryCache:
    def __init__(self, arrays: dict):
        self.arrays = arrays  # image_id -> (C, *spatial) array

    def has(self, image_id):
        return image_id in self.arrays

    def get(self, image_id):
        return self.arrays[image_id]
