"""vesuvius_lab: patch-based, topology-aware 3D surface segmentation of scroll CT."""

__version__ = "0.1.0"
TORCH_PIN = "2.13.0"
