"""dicomnode: a DICOM node that synthesizes T2-weighted MRI from T1 (and back)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicomnode")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+src"
