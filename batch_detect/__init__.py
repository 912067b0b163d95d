"""batch_detect: distributed batch object detection with TensorFlow Lite on Ray."""

__version__ = "0.1.0"
